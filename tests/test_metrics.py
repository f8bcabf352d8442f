"""BLEU and ROUGE-L of riemannlora.bench.metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from riemannlora.bench.metrics import corpus_bleu, nist, rouge_l


def test_identical_strings_score_perfectly():
    hyps = ["the cat sat on the mat", "a restaurant near the river"]
    refs = [[h] for h in hyps]
    assert corpus_bleu(hyps, refs) == pytest.approx(100.0)
    assert rouge_l(hyps, refs) == pytest.approx(1.0)


def test_bleu_hand_computed():
    # hypothesis "the cat sat on the mat" vs reference "the cat is on the mat":
    # 1-grams 5/6, 2-grams 3/5 (the cat, on the, the mat), 3-grams 1/4 (on the mat),
    # 4-grams 0/3 -> sacrebleu's "exp" smoothing uses 1 / (2 * 3); equal lengths: no penalty
    expected = 100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    got = corpus_bleu(["the cat sat on the mat"], [["the cat is on the mat"]])
    assert got == pytest.approx(expected, abs=1e-9)
    assert got == pytest.approx(37.9918, abs=1e-4)


def test_bleu_brevity_penalty_uses_closest_reference():
    hyp = ["the cat sat on"]  # 4 words, every n-gram matches the first reference
    one_ref = corpus_bleu(hyp, [["the cat sat on the mat"]])
    assert one_ref == pytest.approx(100 * math.exp(1 - 6 / 4), abs=1e-9)
    # a second reference of length 4 removes the brevity penalty (closest reference length)
    assert corpus_bleu(hyp, [["the cat sat on the mat", "w x y z"]]) == pytest.approx(100.0)


def test_bleu_variable_number_of_references():
    hyps = ["a b c d e", "hello there general kenobi"]
    refs = [["a b c d e", "something else entirely"], ["hello there general kenobi"]]
    assert corpus_bleu(hyps, refs) == pytest.approx(100.0)


def test_rouge_l_hand_computed():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat": 5 tokens,
    # precision = recall = 5/6
    assert rouge_l(["the cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx(5 / 6)


def test_rouge_l_max_over_references_mean_over_examples():
    hyps = ["a b c", "p q r s"]
    refs = [["x y z", "a b c"], ["p q"]]  # 1.0 (second ref), then LCS 2: P 2/4, R 2/2, F 2/3
    assert rouge_l(hyps, refs) == pytest.approx((1.0 + 2 / 3) / 2)


@pytest.mark.parametrize("metric", [corpus_bleu, rouge_l, nist])
def test_bad_inputs_raise(metric):
    with pytest.raises(ValueError, match="hypotheses"):
        metric(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="no hypotheses"):
        metric([], [])
    with pytest.raises(ValueError, match="non-empty list"):
        metric(["a"], [[]])
    with pytest.raises(ValueError, match="non-empty list"):
        metric(["a"], ["a"])


def test_multi_reference_bleu_matches_sacrebleu_and_hand_counts():
    import sacrebleu

    # two examples, references of different counts: clipped counts take the max over refs
    hyps = ["the the the cat", "a dog barks"]
    refs = [["the cat is here", "the the dog"], ["a dog barks loudly"]]
    got = corpus_bleu(hyps, refs)
    streams = [["the cat is here", "a dog barks loudly"], ["the the dog", None]]
    assert got == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score, abs=1e-9)
    # by hand: 1-grams: "the" x3 clipped to 2 (second ref), cat 1 -> 3/4; a dog barks 3/3
    # -> 6/7. 2-grams: "the the" 1 (clip 1), "the the" again 0, "the cat" 1 -> 2/3; a dog,
    # dog barks -> 2/2: 4/5. 3-grams: "the the the" 0, "the the cat" 0; "a dog barks" 1 -> 1/3.
    # 4-grams: "the the the cat" 0 -> 0/1 -> exp smoothing 1 / 2. Lengths: hyp 4 + 3 = 7;
    # closest reference lengths 4 (exact) and 4 -> 8: brevity penalty exp(1 - 8 / 7).
    expected = 100 * math.exp(1 - 8 / 7) * (6 / 7 * 4 / 5 * 1 / 3 * 1 / 2) ** 0.25
    assert got == pytest.approx(expected, abs=1e-9)


def _nist_by_hand(hyps: list[list[str]], refs: list[list[str]], n: int) -> float:
    """Doddington (2002) NIST with one reference per example, written from the formulas."""
    from collections import Counter

    def grams(words: list[str], k: int) -> Counter:
        return Counter(tuple(words[i : i + k]) for i in range(len(words) - k + 1))

    counts: Counter = Counter()
    for ref in refs:
        for k in range(1, n + 1):
            counts.update(grams(ref, k))
    total = sum(len(r) for r in refs)

    def info(gram: tuple) -> float:
        prefix = counts[gram[:-1]] if len(gram) > 1 else total
        return math.log2(prefix / counts[gram])

    score = 0.0
    for k in range(1, n + 1):
        matched = sum(
            info(g) * c for h, r in zip(hyps, refs) for g, c in (grams(h, k) & grams(r, k)).items()
        )
        score += matched / sum(sum(grams(h, k).values()) for h in hyps)
    ratio = sum(map(len, hyps)) / sum(map(len, refs))
    beta = math.log(0.5) / math.log(1.5) ** 2
    return score * (math.exp(beta * math.log(ratio) ** 2) if ratio < 1 else 1.0)


def test_nist_hand_computed():

    hyps = ["the cat sat on the mat", "a dog ran"]
    refs = ["the cat is on the mat", "a dog ran away fast"]
    expected = _nist_by_hand([h.split() for h in hyps], [r.split() for r in refs], n=3)
    assert nist(hyps, [[r] for r in refs], n=3) == pytest.approx(expected, rel=1e-12)
    # case and 13a tokenization: punctuation splits off, upper case folds
    assert nist(["The cat."], [["the cat ."]], n=2) == pytest.approx(
        _nist_by_hand([["the", "cat", "."]], [["the", "cat", "."]], n=2), rel=1e-12
    )
    # orders longer than every hypothesis add nothing instead of dividing by zero
    assert nist(["a b"], [["a b c"]], n=5) == pytest.approx(
        _nist_by_hand([["a", "b"]], [["a", "b", "c"]], n=2), rel=1e-12
    )
    assert nist([""], [["a"]]) == 0.0
