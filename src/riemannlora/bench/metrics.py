"""Text-generation metrics of the E2E task: corpus BLEU (sacrebleu) and ROUGE-L (rouge-score).

Both take one hypothesis per example and *all* reference texts of that example (E2E has several
references per meaning representation):

* :func:`corpus_bleu` -- sacrebleu's multi-reference corpus BLEU (default ``13a`` tokenizer,
  exponential smoothing), on the 0-100 scale. Examples with fewer references are padded with
  ``None``, which sacrebleu skips.
* :func:`rouge_l` -- ROUGE-L F1 of each hypothesis against each of its references
  (``rouge_score.rouge_scorer`` with stemming), the maximum over references, averaged over the
  examples; on the 0-1 scale.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["corpus_bleu", "rouge_l"]


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
