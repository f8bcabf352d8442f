"""Tests of riemannlora.bench.tasks and its embedded data: the real splits of the built-in
tasks, tokenization, collation and the scoring helpers."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import lzma
import math
import shutil
from collections import Counter

import pytest
import torch

from riemannlora.bench import data as bench_data
from riemannlora.bench import tasks
from riemannlora.bench.data import DataError, embedded_bytes, embedded_files
from riemannlora.bench.tasks import (
    COMMONSENSE_TEST_SETS,
    IGNORE_INDEX,
    TASKS,
    Collator,
    answer_options,
    extract_choice,
    extract_number,
    load_task,
    option_logprobs,
    task_data,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The model calls here are small: one thread avoids OpenMP stalls on a shared 2-core box."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class CharTokenizer:
    """A stand-in tokenizer: one token per character, bos (1) with special tokens, eos 2."""

    eos_token_id, pad_token_id = 2, None

    def _ids(self, text: str, special: bool) -> list[int]:
        return [1] * special + [ord(ch) + 3 for ch in text]

    def __call__(self, text, add_special_tokens=True, truncation=False, max_length=None):
        if isinstance(text, str):
            return {"input_ids": self._ids(text, add_special_tokens)}
        ids = [self._ids(t, add_special_tokens) for t in text]
        return {"input_ids": [i[:max_length] if truncation else i for i in ids]}

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i - 3) for i in ids if i > 2)


def _instruction(row: dict) -> str:
    head, tail = tasks.INSTRUCTION_TEMPLATE.split("{instruction}")
    assert row["prompt"].startswith(head) and row["prompt"].endswith(tail)
    return row["prompt"][len(head) : -len(tail)]


# --------------------------------------------------------------------------------------------
# fast tests: embedded data, splits, tokenization, scoring helpers
# --------------------------------------------------------------------------------------------


def test_collator_pads_right():
    batch = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    out = Collator(pad_token_id=0)(batch)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(t.dtype == torch.long for t in out.values())
    out = Collator(pad_token_id=1)(
        [{"input_ids": [3], "labels": 2}, {"input_ids": [3, 4], "labels": 0}]
    )
    assert out["labels"].tolist() == [2, 0]  # classification: one label per example
    assert out["input_ids"].tolist() == [[3, 1], [3, 4]]
    assert Collator.for_tokenizer(CharTokenizer()).pad_token_id == 2  # no pad token: eos


def test_join_truncation_keeps_a_target_token():
    p, t = tasks._join(list(range(10)), [100, 101, 102], max_length=8)
    assert t == [100, 101, 102] and p == list(range(5, 10))  # prompt cut on the left
    p, t = tasks._join(list(range(10)), [100, 101, 102], max_length=4)
    assert p == [8, 9] and t == [100, 101]  # prompt keeps half the budget, target cut
    p, t = tasks._join([1, 2, 3], list(range(100, 110)), max_length=2)
    assert p == [3] and t == [100]
    assert tasks._join([], list(range(10)), 4) == ([], [0, 1, 2, 3])
    assert tasks._join([1, 2], [3], 10) == ([1, 2], [3])
    with pytest.raises(ValueError, match="max_length"):
        tasks._join([1], [2], 1)


def test_tokenize_causal_masks_the_prompt_and_truncates():
    tok = CharTokenizer()
    item = tasks.tokenize_causal(tok, "ab", " cd", max_length=16)
    assert item["input_ids"] == [1, *tok("ab cd", add_special_tokens=False)["input_ids"], 2]
    assert item["labels"] == [IGNORE_INDEX] * 3 + item["input_ids"][3:]
    short = tasks.tokenize_causal(tok, "abcdefgh", " xyz", max_length=6)
    assert len(short["input_ids"]) == 6 and tok.decode(short["input_ids"]) == "fgh xy"
    assert short["labels"][:3] == [IGNORE_INDEX] * 3 and IGNORE_INDEX not in short["labels"][3:]


def test_embedded_files_match_their_checksums():
    names = embedded_files()
    on_disk = sorted(
        str(p.relative_to(bench_data.DATA_DIR)).removesuffix(".xz")
        for p in bench_data.DATA_DIR.rglob("*.xz")
    )
    assert names == on_disk and len(names) == 16
    sums = (bench_data.DATA_DIR / "SHA256SUMS").read_text().split()
    for name in names:
        digest = sums[sums.index(f"./{name}") - 1]
        assert hashlib.sha256(embedded_bytes(name)).hexdigest() == digest
    with pytest.raises(DataError, match="no embedded data file"):
        embedded_bytes("e2e/trainset.csv")


@pytest.fixture
def data_copy(tmp_path, monkeypatch):
    """A private copy of the embedded data, in place of the package's."""
    copy = tmp_path / "data"
    shutil.copytree(bench_data.DATA_DIR, copy, ignore=shutil.ignore_patterns("*.py", "__*"))
    monkeypatch.setattr(bench_data, "DATA_DIR", copy)
    bench_data._checksums.cache_clear()
    yield copy
    bench_data._checksums.cache_clear()


def test_damaged_embedded_files_raise(data_copy):
    name, path = "e2e/devset.csv", data_copy / "e2e/devset.csv.xz"
    original = bytearray(embedded_bytes(name))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit in the compressed stream
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="reinstall"):
        embedded_bytes(name)
    original[100] ^= 0x01  # well-formed xz, but not the original bytes
    path.write_bytes(lzma.compress(bytes(original)))
    with pytest.raises(DataError, match="checksum"):
        embedded_bytes(name)
    path.unlink()
    with pytest.raises(DataError, match="missing or damaged"):
        embedded_bytes(name)


def test_split_sizes_and_labels():
    sizes = {name: tuple(len(task_data(name).split(s)) for s in tasks.SPLITS) for name in TASKS}
    assert sizes == {
        "e2e": (4205, 467, 4693),
        "clinc150": (15000, 3000, 4500),
        "clinc150-oos": (15100, 3100, 5500),
        "commonsense": (17254, 500, 12377),
        "gsm8k": (6973, 500, 1319),
    }
    for name, (kind, _) in TASKS.items():
        assert task_data(name).kind == kind and task_data(name).name == name
    plain, oos = task_data("clinc150"), task_data("clinc150-oos")
    assert len(plain.labels) == len(set(plain.labels)) == 150 and "oos" not in plain.labels
    assert oos.labels == (*plain.labels, "oos") and oos.info["oos_label"] == 150
    assert plain.info["oos_label"] is None
    for d in (plain, oos):
        for split in tasks.SPLITS:
            counts = Counter(r["label"] for r in d.split(split))
            assert set(counts) == set(range(len(d.labels)))  # every intent in every split
    assert Counter(r["label"] for r in oos.test)[150] == 1000
    with pytest.raises(ValueError, match="split"):
        plain.split("dev")
    with pytest.raises(ValueError, match="unknown task"):
        task_data("mathqa")


def test_e2e_splits():
    d = task_data("e2e")
    mrs = {s: {r["mr"] for r in d.split(s)} for s in tasks.SPLITS}
    assert [len(mrs[s]) for s in tasks.SPLITS] == [492, 55, 630]
    for splits, file in (("train", "validation"), "devset"), (("test",), "testset_w_refs"):
        text = embedded_bytes(f"e2e/{file}.csv").decode("utf-8")
        raw = csv.DictReader(io.StringIO(text))
        want = Counter((r["mr"].strip(), " " + r["ref"].strip()) for r in raw)
        assert Counter((r["mr"], r["completion"]) for s in splits for r in d.split(s)) == want
    assert not mrs["train"] & mrs["validation"]  # no validation MR is trained on
    assert not mrs["test"] & (mrs["train"] | mrs["validation"])
    for row in d.train + d.validation + d.test:
        assert row["prompt"] == tasks.E2E_TEMPLATE.format(mr=row["mr"])
    assert [d.to_datasets()[s].num_rows for s in tasks.SPLITS] == [4205, 467, 4693]


def test_clinc_evaluation_rows_are_the_authors():
    raw = json.loads(embedded_bytes("clinc150/data_full.json"))
    for d in (task_data("clinc150"), task_data("clinc150-oos")):
        extra = "oos_" if d.name == "clinc150-oos" else None
        for split, key in (("train", "train"), ("validation", "val"), ("test", "test")):
            got = Counter((r["text"], d.labels[r["label"]]) for r in d.split(split))
            want = Counter(map(tuple, raw[key] + (raw[extra + key] if extra else [])))
            assert got == want
        train = {r["text"] for r in d.train}
        assert len(train) == len(d.train)  # no duplicate training query
        # the authors' files repeat five training queries in val / test, under other intents
        assert {r["text"] for r in d.validation} & train == {
            "what is on my to do list", "turn up your volume", "hey what's up",
        }  # fmt: skip
        assert {r["text"] for r in d.test} & train == {
            "where did you grow up", "what's your designation",
        }  # fmt: skip
        assert not {r["text"] for r in d.validation} & {r["text"] for r in d.test}


def test_commonsense_splits():
    d = task_data("commonsense")
    counts = Counter(r["set"] for r in d.test)
    assert counts == {
        "boolq": 3270, "piqa": 1838, "social_i_qa": 1954, "ARC-Challenge": 1172,
        "ARC-Easy": 2376, "openbookqa": 500, "winogrande": 1267,
    }  # fmt: skip
    order = [r["set"] for r in d.test]
    assert sorted(order, key=COMMONSENSE_TEST_SETS.index) == order  # in blocks, suite order
    for name in COMMONSENSE_TEST_SETS:
        assert counts[name] == len(json.loads(embedded_bytes(f"commonsense/{name}/test.json")))
    trained = Counter(r["set"] for r in d.train + d.validation)
    assert trained == {
        name: len(json.loads(embedded_bytes(f"commonsense/{name}/train.json")))
        for name in tasks.COMMONSENSE_TRAIN_SETS
    }
    train = {r["prompt"] for r in d.train}
    assert not {r["prompt"] for r in d.validation} & train
    # the authors' ARC-Easy files share two questions between train and test
    assert [r["set"] for r in d.test if r["prompt"] in train] == ["ARC-Easy"] * 2


def test_gsm8k_splits():
    d = task_data("gsm8k")
    questions = {s: [r["prompt"] for r in d.split(s)] for s in tasks.SPLITS}
    assert all(len(set(q)) == len(q) for q in questions.values())
    assert not set(questions["validation"]) & set(questions["train"])
    assert not set(questions["test"]) & set(questions["train"] + questions["validation"])
    for split, n in (("train", 6973 + 500), ("test", 1319)):
        assert embedded_bytes(f"gsm8k/{split}.jsonl").decode("utf-8").strip().count("\n") == n - 1
    for row in d.train + d.validation + d.test:
        assert row["prompt"].startswith("Question: ") and row["prompt"].endswith("\nAnswer:")
        assert row["completion"].startswith(" ") and "####" in row["completion"]


def test_splits_are_deterministic_and_nested():
    first = {name: task_data(name) for name in TASKS}
    tasks._task_data.cache_clear()  # rebuild from the embedded files: the seeded order repeats
    for name in TASKS:
        again = task_data(name)
        assert again is not first[name] and again == first[name]
    tok = CharTokenizer()
    for name in TASKS:
        for split in tasks.SPLITS:
            few, more = (load_task(name, tok, split, n=n) for n in (3, 8))
            assert few == more[:3] and len(more) == 8
    rows = task_data("e2e").train[:3]
    for row, item in zip(rows, load_task("e2e", tok, n=3, max_length=1000), strict=True):
        assert tok.decode(item["input_ids"]) == row["prompt"] + row["completion"]
    labels = [it["labels"] for it in load_task("clinc150", tok, "test", n=20)]
    assert labels == [r["label"] for r in task_data("clinc150").test[:20]]
    assert load_task("gsm8k", tok, "test", n=0) == []
    with pytest.raises(ValueError, match="n must be"):
        load_task("gsm8k", tok, n=-1)
    with pytest.raises(ValueError, match="unknown task"):
        load_task("mathqa", tok)


def _numbered(word: str, *counts: int) -> set[tuple[str, ...]]:
    return {tuple(f"{word}{i}" for i in range(1, k + 1)) for k in counts}


_SET_OPTIONS = {
    "boolq": {("true", "false")},
    "piqa": _numbered("solution", 2),
    "social_i_qa": _numbered("answer", 3),
    "ARC-Challenge": _numbered("answer", 3, 4, 5),
    "ARC-Easy": _numbered("answer", 3, 4, 5),
    "openbookqa": _numbered("answer", 4),
    "winogrande": _numbered("option", 2),
}


@pytest.mark.parametrize("name", COMMONSENSE_TEST_SETS)
def test_answer_options_and_extract_choice_on_real_rows(name):
    rows = [r for r in task_data("commonsense").test if r["set"] == name]
    assert {tuple(r["options"]) for r in rows} == _SET_OPTIONS[name]
    for row in rows:
        options = row["options"]
        assert answer_options(_instruction(row)) == options and row["answer"] in options
        if name != "boolq":  # the instruction lists each option ("Answer2: ...")
            assert all(f"{o.capitalize()}:" in row["prompt"] for o in options)
        generated = f"Sure! {row['completion']}. Because the other choices do not fit."
        assert extract_choice(generated, options) == row["answer"]
        assert extract_choice(generated.upper(), options) == row["answer"]
        assert extract_choice(row["completion"] + "0", options) is None  # "answer20"
        assert extract_choice("I do not know.", options) is None


def test_answer_options_and_extract_choice_edge_cases():
    opts = ["answer1", "answer2", "answer3"]
    assert answer_options("Pick one.\n\nAnswer format: answer1/answer2/answer3") == opts
    with pytest.raises(ValueError, match="Answer format"):
        answer_options("Pick one.")
    assert extract_choice("answer10 or answer12", opts) is None  # whole words only
    assert extract_choice("answer10, so answer2", opts) == "answer2"
    assert extract_choice("answer3 rather than answer1", opts) == "answer3"  # the first in text
    assert extract_choice("The Answer Is ANSWER1.", opts) == "answer1"
    assert extract_choice("that is untrue", ["true", "false"]) is None
    assert extract_choice("True.", ["true", "false"]) == "true"
    assert extract_choice("x+y", ["x+y", "x"]) == "x+y"  # options are literal text


def test_extract_number():
    rows = task_data("gsm8k").test
    for row in rows:
        final = row["completion"].rsplit("####", 1)[1].strip().replace(",", "")
        assert row["number"] is not None and extract_number(row["completion"]) == row["number"]
        assert row["number"] == final
        # a generation without the marker: its last number
        assert extract_number(row["completion"].replace("####", "so")) == row["number"]
    assert all(r["number"] is not None for r in task_data("gsm8k").train)
    cases = {
        "#### 1,000.00": "1000", "1,000.00": "1000", "The loss is -3": "-3", "#### -3": "-3",
        "#### 0.0": "0", "#### 2.50": "2.5", "no number here": None,
        "3 apples, then 4 more: 7 apples.": "7",  # no ####: the last number
        "2 + 3 = 5\n#### 5\nand 9 more": "5",  # the first number after ####
    }  # fmt: skip
    assert {text: extract_number(text) for text in cases} == cases


def test_e2e_references():
    rows = task_data("e2e").test
    prompts, refs = tasks.e2e_references(rows)
    assert len(prompts) == len(set(prompts)) == len(refs) == 630
    assert sum(len(r) for r in refs) == 4693
    by_prompt: dict[str, list[str]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt"], []).append(row["completion"].strip())
    assert list(by_prompt) == prompts  # first appearance order
    assert refs == list(by_prompt.values())


# --------------------------------------------------------------------------------------------
# slow tests: real tokenizers and models
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol():
    from riemannlora.bench.assets import SMOLLM2_ID, load_causal_lm

    return load_causal_lm(SMOLLM2_ID)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from riemannlora.bench.assets import MINILM_ID, resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(MINILM_ID))


@torch.no_grad()
def _direct_logprob(model, tok, prompt: str, completion: str, eos: bool = True) -> float:
    """log p(completion (+ eos) | prompt), one unpadded forward pass of the whole sequence."""
    context = tok(prompt)["input_ids"]
    target = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] * eos
    logits = model(input_ids=torch.tensor([context + target])).logits[0].double()
    lp = logits[len(context) - 1 : -1].log_softmax(-1)
    return float(lp[torch.arange(len(target)), torch.tensor(target)].sum())


@pytest.mark.slow
def test_option_logprobs_match_a_direct_computation(smol):
    model, tok = smol
    test = task_data("commonsense").test
    sets = ("boolq", "ARC-Challenge", "winogrande")
    rows = [next(r for r in test if r["set"] == s) for s in sets]
    prompts = [r["prompt"] for r in rows]
    cands = [[f"the correct answer is {o}" for o in r["options"]] for r in rows]
    scores = option_logprobs(model, tok, prompts, cands, batch_size=16)
    one_by_one = option_logprobs(model, tok, prompts, cands, batch_size=1)
    flat = [v for s in scores for v in s]
    assert [v for s in one_by_one for v in s] == pytest.approx(flat, abs=1e-4)
    for prompt, cs, got in zip(prompts, cands, scores, strict=True):
        full = [_direct_logprob(model, tok, prompt, c) for c in cs]
        assert len(got) == len(cs) and all(math.isfinite(v) and v < 0 for v in got)
        # the candidates' shared prefix is not scored: the full log-likelihoods less its own
        ids = [tok(c, add_special_tokens=False)["input_ids"] for c in cs]
        n = next(i for i, column in enumerate(zip(*ids)) if len(set(column)) > 1)
        common = tok.decode(ids[0][:n])  # "the correct answer is", then " answer" for ARC
        shared = _direct_logprob(model, tok, prompt, common, eos=False)
        assert [f - shared for f in full] == pytest.approx(got, abs=1e-4)

    # candidates with multi-token tails and no common token prefix: full log-likelihoods
    e2e = task_data("e2e").test
    prompt, first = e2e[0]["prompt"], e2e[0]["completion"]
    other = next(r["completion"] for r in e2e if r["completion"].split()[0] != first.split()[0])
    assert tok(first)["input_ids"][0] != tok(other)["input_ids"][0]
    scores = option_logprobs(model, tok, [prompt] * 2, [[first, other], [other, other]])
    direct = [_direct_logprob(model, tok, prompt, c) for c in (first, other)]
    assert scores[0] == pytest.approx(direct, rel=1e-5, abs=1e-4)  # float32 sums
    # identical candidates share everything but eos: the one-pass path scores eos alone
    eos = direct[1] - _direct_logprob(model, tok, prompt, other, eos=False)
    assert scores[1] == pytest.approx([eos, eos], abs=1e-4)
    model.train()
    option_logprobs(model, tok, [prompt], [["a", "b"]])
    assert model.training  # the mode is restored
    model.eval()


@pytest.mark.slow
def test_greedy_generate_batched_matches_single(smol):
    model, tok = smol
    prompts, _ = tasks.e2e_references(task_data("e2e").test[:40])
    prompts = sorted(prompts[:4], key=len)[::3]  # two prompts of different lengths
    assert len(tok(prompts[0])["input_ids"]) != len(tok(prompts[1])["input_ids"])
    batched = tasks.greedy_generate(model, tok, prompts, max_new_tokens=8, batch_size=2)
    single = [tasks.greedy_generate(model, tok, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == single and len(batched) == 2 and all(batched)
    assert not model.training


@pytest.mark.slow
@pytest.mark.parametrize("name", ["e2e", "gsm8k", "commonsense"])
def test_collated_causal_batch(smol, name):
    model, tok = smol
    rows = task_data(name).train[:3]
    items = load_task(name, tok, "train", n=3)
    for row, item in zip(rows, items, strict=True):
        ids, labels = item["input_ids"], item["labels"]
        assert len(ids) == len(labels) <= TASKS[name][1]
        n_prompt = labels.count(IGNORE_INDEX)
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt  # the prompt, and only it
        assert labels[n_prompt:] == ids[n_prompt:] and n_prompt > 0
        prompt_ids = tok(row["prompt"])["input_ids"]
        assert ids[:n_prompt] == prompt_ids[len(prompt_ids) - n_prompt :]
        target = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert labels[n_prompt:] == target[: len(labels) - n_prompt]
        if len(ids) < TASKS[name][1]:  # not truncated
            assert n_prompt == len(prompt_ids) and labels[-1] == tok.eos_token_id
            assert tok.decode(ids[:n_prompt]) == row["prompt"]
    batch = Collator.for_tokenizer(tok)(items)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    with torch.no_grad():
        loss = model(**batch).loss
    assert math.isfinite(loss.item()) and loss.item() > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["clinc150", "clinc150-oos"])
def test_clinc_tokenization_with_minilm(minilm_tokenizer, name):
    tok = minilm_tokenizer
    rows = task_data(name).test[:300]
    items = load_task(name, tok, "test", n=300)
    assert [it["labels"] for it in items] == [r["label"] for r in rows]
    if name == "clinc150-oos":
        assert 150 in {r["label"] for r in rows}  # some out-of-scope queries among them
    for row, item in zip(rows, items, strict=True):
        ids = item["input_ids"]
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert len(ids) <= TASKS[name][1]
        assert ids == tok(row["text"])["input_ids"]  # row i's own text
    batch = Collator.for_tokenizer(tok)(items[:8])
    assert batch["labels"].shape == (8,)
    assert batch["input_ids"].shape == batch["attention_mask"].shape
