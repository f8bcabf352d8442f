"""BLEU and ROUGE-L of riemannlora.bench.metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from riemannlora.bench.metrics import corpus_bleu, rouge_l


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


@pytest.mark.parametrize("metric", [corpus_bleu, rouge_l])
def test_bad_inputs_raise(metric):
    with pytest.raises(ValueError, match="hypotheses"):
        metric(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="no hypotheses"):
        metric([], [])
    with pytest.raises(ValueError, match="non-empty list"):
        metric(["a"], [[]])
    with pytest.raises(ValueError, match="non-empty list"):
        metric(["a"], ["a"])
