"""Text-generation metrics of the E2E task: corpus BLEU (sacrebleu), ROUGE-L (rouge-score) and
NIST (nltk).

Both take one hypothesis per example and *all* reference texts of that example (E2E has several
references per meaning representation):

* :func:`corpus_bleu` -- sacrebleu's multi-reference corpus BLEU (default ``13a`` tokenizer,
  exponential smoothing), on the 0-100 scale. Examples with fewer references are padded with
  ``None``, which sacrebleu skips.
* :func:`rouge_l` -- ROUGE-L F1 of each hypothesis against each of its references
  (``rouge_score.rouge_scorer`` with stemming), the maximum over references, averaged over the
  examples; on the 0-1 scale.
* :func:`nist` -- nltk's multi-reference corpus NIST (n-grams up to 5, information-weighted),
  on lower-cased text with sacrebleu's ``13a`` tokenization.

METEOR and CIDEr, the challenge's other two metrics, are not computed: nltk's METEOR needs the
WordNet corpus, which no package on the registry ships, and the CIDEr implementation of
``pycocoevalcap`` comes in a 100 MB wheel with Java tools.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["corpus_bleu", "nist", "rouge_l"]


def _check(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"got {len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{i}] must be a non-empty list of strings, got {refs!r}")


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Multi-reference corpus BLEU in [0, 100].

    Args:
        hypotheses: one generated text per example.
        references: ``references[i]`` is the list of reference texts of example ``i``.
    """
    import sacrebleu

    _check(hypotheses, references)
    width = max(len(refs) for refs in references)
    # sacrebleu wants reference *streams*: stream j holds the j-th reference of every example
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """ROUGE-L F1 in [0, 1]: max over each example's references, mean over examples."""
    from rouge_score import rouge_scorer

    _check(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    best = [
        max(scorer.score(ref, hyp)["rougeL"].fmeasure for ref in refs)
        for hyp, refs in zip(hypotheses, references, strict=True)
    ]
    return sum(best) / len(best)


def nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 5) -> float:
    """Multi-reference corpus NIST in [0, inf) (nltk, n-grams up to ``n``; orders longer than
    every hypothesis count 0)."""
    from nltk.translate.nist_score import corpus_nist
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    _check(hypotheses, references)
    tok = Tokenizer13a()

    def words(text: str) -> list[str]:
        return tok(text.lower()).split()

    hyps = [words(h) for h in hypotheses]
    # orders no hypothesis reaches add nothing (nltk would divide by their zero count)
    order = min(n, max(len(h) for h in hyps))
    if order == 0:
        return 0.0
    refs = [[words(r) for r in rs] for rs in references]
    return float(corpus_nist(refs, hyps, n=order))
