"""Tests of riemannlora.tasks: fixed splits, tokenization, collation, evaluation helpers."""

from __future__ import annotations

import math

import pytest
import torch

from riemannlora import tasks
from riemannlora.tasks import (
    E2E_TEMPLATE,
    IGNORE_INDEX,
    MULTIEMO_LABELS,
    Collator,
    e2e_eval_data,
    e2e_examples,
    e2e_prompt,
    greedy_generate,
    load_task,
    mathqa_accuracy,
    mathqa_choice_logprobs,
    mathqa_examples,
    mathqa_prompt,
    multiemo_examples,
    tokenize_causal,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The model calls here are small: one thread avoids OpenMP stalls on a shared 2-core box."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------------------------------------
# fast tests
# --------------------------------------------------------------------------------------------


def test_collator_causal_pads_right_with_ignore_index():
    batch = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    out = Collator(pad_token_id=0)(batch)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(t.dtype == torch.long for t in out.values())


def test_collator_classification_labels():
    out = Collator(pad_token_id=1)(
        [{"input_ids": [3], "labels": 2}, {"input_ids": [3, 4], "labels": 0}]
    )
    assert out["labels"].tolist() == [2, 0]
    assert out["input_ids"].tolist() == [[3, 1], [3, 4]]
    assert out["attention_mask"].tolist() == [[1, 0], [1, 1]]


def test_join_truncation_keeps_a_target_token():
    p, t = tasks._join(list(range(10)), [100, 101, 102], max_length=8)
    assert len(p) + len(t) == 8
    assert t == [100, 101, 102] and p == list(range(5, 10))  # prompt cut on the left
    p, t = tasks._join(list(range(10)), [100, 101, 102], max_length=4)
    assert p == [8, 9] and t == [100, 101]  # prompt keeps half the budget, target cut
    p, t = tasks._join([1, 2, 3], list(range(100, 110)), max_length=2)
    assert p == [3] and t == [100]
    assert tasks._join([], list(range(10)), 4) == ([], [0, 1, 2, 3])
    assert tasks._join([1, 2], [3], 10) == ([1, 2], [3])


def test_templates():
    assert e2e_prompt("name: X") == E2E_TEMPLATE.format(mr="name: X")
    assert mathqa_prompt("1 + 1 ?", ["2", "3"]).endswith("Choices: 2 | 3\nAnswer:")


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        e2e_examples("test")
    with pytest.raises(ValueError, match="unknown task"):
        load_task("nope", tokenizer=None)


# --------------------------------------------------------------------------------------------
# slow tests: real BIG-bench data, real tokenizers / models
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from riemannlora.assets import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2"))


@pytest.fixture(scope="module")
def smol():
    from riemannlora.assets import load_causal_lm

    return load_causal_lm("smollm2")


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from riemannlora.assets import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("minilm"))


@pytest.mark.slow
def test_split_sizes():
    assert (len(e2e_examples("train")), len(e2e_examples("eval"))) == (779, 221)
    assert tuple(len(e2e_eval_data(s)[0]) for s in ("train", "eval")) == (173, 40)
    assert (len(multiemo_examples("train")), len(multiemo_examples("eval"))) == (55262, 2000)
    assert (len(mathqa_examples("train")), len(mathqa_examples("eval"))) == (7188, 500)


@pytest.mark.slow
def test_splits_are_deterministic_and_disjoint():
    first = (e2e_examples("train"), multiemo_examples("eval"), mathqa_examples("eval"))
    for fn in (tasks._e2e_splits, tasks._multiemo_splits, tasks._mathqa_splits):
        fn.cache_clear()  # rebuild from the task files: the seeded shuffle must repeat
    second = (e2e_examples("train"), multiemo_examples("eval"), mathqa_examples("eval"))
    assert first == second

    assert not {e["mr"] for e in e2e_examples("train")} & {e["mr"] for e in e2e_examples("eval")}
    assert not {e["text"] for e in multiemo_examples("train")} & {
        e["text"] for e in multiemo_examples("eval")
    }
    assert not {e["question"] for e in mathqa_examples("train")} & {
        e["question"] for e in mathqa_examples("eval")
    }
    # n takes a prefix, and callers get copies they may mutate
    assert mathqa_examples("train", 3) == mathqa_examples("train")[:3]
    mathqa_examples("train", 1)[0]["choices"].append("x")
    assert "x" not in mathqa_examples("train", 1)[0]["choices"]


@pytest.mark.slow
def test_e2e_eval_data_references():
    prompts, refs = e2e_eval_data()
    assert len(prompts) == len(refs) == 40
    by_mr = {}
    for ex in e2e_examples("eval"):
        by_mr.setdefault(ex["mr"], []).append(ex["target"])
    assert sum(len(r) for r in refs) == 221
    for prompt, ref in zip(prompts, refs, strict=True):
        mr = prompt.removeprefix("Restaurant attributes: ").removesuffix("\nDescription:")
        assert sorted(ref) == sorted(by_mr[mr])


@pytest.mark.slow
def test_e2e_labels_mask_the_prompt(smol_tokenizer):
    tok = smol_tokenizer
    raw = e2e_examples("train", 20)
    data = load_task("e2e", tok, "train", n=20)
    assert data == load_task("e2e", tok, "train", n=20)
    assert len(data) == 20
    for ex, item in zip(raw, data, strict=True):
        ids, labels = item["input_ids"], item["labels"]
        assert len(ids) == len(labels) <= 128
        n_prompt = len(tok(e2e_prompt(ex["mr"]))["input_ids"])
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:]
        assert tok.decode(ids[:n_prompt]) == e2e_prompt(ex["mr"])
        assert labels[-1] == tok.eos_token_id
        supervised = [t for t in labels if t != IGNORE_INDEX]
        assert tok.decode(supervised, skip_special_tokens=True).strip() == ex["target"]


@pytest.mark.slow
def test_e2e_truncation(smol_tokenizer):
    for item in load_task("e2e", smol_tokenizer, "eval", n=10, max_length=24):
        assert len(item["input_ids"]) <= 24
        assert any(t != IGNORE_INDEX for t in item["labels"])


@pytest.mark.slow
def test_multiemo_labels_and_tokens(minilm_tokenizer):
    tok = minilm_tokenizer
    data = load_task("multiemo", tok, "eval", n=400, max_length=64)
    assert len(data) == 400
    labels = [d["labels"] for d in data]
    assert set(labels) == {0, 1, 2, 3}
    assert labels == [e["label"] for e in multiemo_examples("eval", 400)]
    for d in data:
        assert d["input_ids"][0] == tok.cls_token_id
        assert d["input_ids"][-1] == tok.sep_token_id
        assert len(d["input_ids"]) <= 64
    batch = Collator.for_tokenizer(tok)(data[:8])
    assert batch["labels"].shape == (8,)
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert len(MULTIEMO_LABELS) == 4


@pytest.mark.slow
def test_mathqa_training_examples(smol_tokenizer):
    tok = smol_tokenizer
    raw = mathqa_examples("train", 10)
    for ex, item in zip(raw, load_task("mathqa", tok, "train", n=10), strict=True):
        supervised = [t for t in item["labels"] if t != IGNORE_INDEX]
        assert (
            tok.decode(supervised, skip_special_tokens=True).strip() == ex["choices"][ex["answer"]]
        )


@pytest.mark.slow
def test_mathqa_scoring_with_real_model(smol):
    model, tok = smol
    examples = mathqa_examples("eval", 3)
    scores = mathqa_choice_logprobs(model, tok, examples, batch_size=8)
    assert [len(s) for s in scores] == [len(e["choices"]) for e in examples]
    assert all(math.isfinite(v) and v < 0 for s in scores for v in s)

    # the summed log-likelihood of the correct choice equals -(mean loss) x (number of tokens)
    ex = examples[0]
    item = tasks.tokenize_causal(
        tok, mathqa_prompt(ex["question"], ex["choices"]), ex["choices"][ex["answer"]], 256
    )
    n_target = sum(t != IGNORE_INDEX for t in item["labels"])
    with torch.no_grad():
        loss = model(
            input_ids=torch.tensor([item["input_ids"]]), labels=torch.tensor([item["labels"]])
        ).loss
    assert scores[0][ex["answer"]] == pytest.approx(-loss.item() * n_target, rel=1e-4)

    acc = mathqa_accuracy(model, tok, examples[:2], batch_size=8)
    assert 0.0 <= acc <= 1.0
    hits = [
        max(range(len(s)), key=s.__getitem__) == e["answer"]
        for s, e in zip(scores, examples, strict=True)
    ]
    assert acc == sum(hits[:2]) / 2
    assert not model.training


@pytest.mark.slow
def test_greedy_generate_batched_matches_single(smol):
    model, tok = smol
    prompts, _ = e2e_eval_data("eval", 2)
    batched = greedy_generate(model, tok, prompts, max_new_tokens=8, batch_size=2)
    single = [greedy_generate(model, tok, [p], max_new_tokens=8)[0] for p in prompts]
    assert len(batched) == 2 and all(batched)
    assert batched == single


@pytest.mark.slow
def test_collated_causal_batch_gives_finite_loss(smol):
    model, tok = smol
    batch = Collator.for_tokenizer(tok)(load_task("e2e", tok, "train", n=4))
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    with torch.no_grad():
        loss = model(**batch).loss
    assert math.isfinite(loss.item())
    assert tokenize_causal(tok, "a", "b", 8)["labels"][-1] == tok.eos_token_id
