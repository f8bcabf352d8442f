"""The benchmark's tasks on real data: fixed train / validation / test splits, tokenization,
and the scoring helpers (answer extraction, option likelihood, greedy decoding).

Built-in tasks (the data ship with the package, :mod:`riemannlora.bench.data`):

* ``e2e`` -- the E2E NLG Challenge (data-to-text, causal LM). The embedded snapshot has the
  challenge's dev and test sets: the task trains on dev's (MR, reference) pairs and evaluates
  on test. Validation: the pairs of 55 dev meaning representations (MRs, 10 % of 547, seeded)
  held out of training, so no validation MR is trained on. Train 4,205 pairs (492 MRs),
  validation 467 pairs (55 MRs), test 4,693 pairs over 630 MRs. Prompt
  :data:`E2E_TEMPLATE`, completion ``" " + reference``. Evaluation decodes once per distinct
  test MR and scores against all of its references (:func:`e2e_references`).
* ``clinc150`` -- CLINC150 intent classification (150 intents; encoder classifier): the
  authors' train 15,000 / val 3,000 / test 4,500 in-scope queries. ``clinc150-oos`` adds
  their out-of-scope queries as a 151st label ``"oos"`` (train 15,100 / 3,100 / 5,500), so
  out-of-scope recall can be measured.
* ``commonsense`` -- the commonsense-reasoning suite of LLM-Adapters (causal LM): trained on
  the mix of the BoolQ, ARC-Easy, ARC-Challenge and OpenBookQA train sets (17,754 examples; 500
  of them, seeded, held out as validation), tested on the seven test sets
  (:data:`COMMONSENSE_TEST_SETS`). Prompt: the suite's instruction inside
  :data:`INSTRUCTION_TEMPLATE`; completion: the suite's own answer sentence ("the correct
  answer is answer2").
* ``gsm8k`` -- GSM8K math word problems (causal LM): train 6,973 / validation 500 (seeded,
  from the authors' train set) / test 1,319. Prompt :data:`GSM8K_TEMPLATE`, completion
  ``" " + solution`` (which ends in ``#### <number>``).

Rows are plain dicts. Classification: ``{"text": str, "label": int}`` (``label`` indexes
:attr:`TaskData.labels`). Causal: ``{"prompt": str, "completion": str, ...}`` following TRL's
prompt-completion convention (the completion is appended to the prompt as is), plus the
task's extras (``mr``; ``set``, ``answer``, ``options``; ``number``). Every split is in a fixed
seeded order (``random.Random(SPLIT_SEED)``), so ``rows[:n]`` is the same subset everywhere and
smaller subsets are nested.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from riemannlora.bench.data import DataError, embedded_bytes

__all__ = [
    "COMMONSENSE_TEST_SETS",
    "COMMONSENSE_TRAIN_SETS",
    "E2E_TEMPLATE",
    "GSM8K_TEMPLATE",
    "IGNORE_INDEX",
    "INSTRUCTION_TEMPLATE",
    "SPLITS",
    "SPLIT_SEED",
    "TASKS",
    "Collator",
    "TaskData",
    "answer_options",
    "e2e_references",
    "extract_choice",
    "extract_number",
    "greedy_generate",
    "load_task",
    "option_logprobs",
    "task_data",
    "tokenize_causal",
    "tokenize_rows",
]

SPLIT_SEED = 0
IGNORE_INDEX = -100
SPLITS = ("train", "validation", "test")

E2E_TEMPLATE = "Restaurant attributes: {mr}\nDescription:"
E2E_VALIDATION_MRS = 55
INSTRUCTION_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
GSM8K_TEMPLATE = "Question: {question}\nAnswer:"
COMMONSENSE_TRAIN_SETS = ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa")
COMMONSENSE_TEST_SETS = (
    "boolq", "piqa", "social_i_qa", "ARC-Challenge", "ARC-Easy", "openbookqa", "winogrande",
)  # fmt: skip
COMMONSENSE_VALIDATION = 500
GSM8K_VALIDATION = 500


@dataclass(frozen=True)
class TaskData:
    """The three splits of a task (lists of row dicts, see the module docstring)."""

    name: str
    kind: str  # "classification" or "causal"
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]
    labels: tuple[str, ...] = ()  # classification: label names, indexed by row["label"]
    info: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> list[dict[str, Any]]:
        """The rows of split ``name`` (``"train"``, ``"validation"`` or ``"test"``)."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)

    def to_datasets(self) -> Any:
        """The splits as a :class:`datasets.DatasetDict` (extras included)."""
        import datasets

        return datasets.DatasetDict(
            {s: datasets.Dataset.from_list(self.split(s)) for s in SPLITS if self.split(s)}
        )


def _shuffled(items: list, salt: str = "") -> list:
    items = list(items)
    random.Random(f"{SPLIT_SEED}{salt}").shuffle(items)
    return items


def _json(name: str) -> Any:
    return json.loads(embedded_bytes(name).decode("utf-8"))


def _csv(name: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(embedded_bytes(name).decode("utf-8"))))


# --------------------------------------------------------------------------------------------
# the built-in tasks
# --------------------------------------------------------------------------------------------


def _e2e_rows(pairs: list[dict[str, str]]) -> list[dict[str, Any]]:
    return [
        {"prompt": E2E_TEMPLATE.format(mr=p["mr"]), "completion": " " + p["ref"], "mr": p["mr"]}
        for p in pairs
    ]


def _e2e() -> TaskData:
    dev = [{"mr": r["mr"].strip(), "ref": r["ref"].strip()} for r in _csv("e2e/devset.csv")]
    test = [
        {"mr": r["mr"].strip(), "ref": r["ref"].strip()} for r in _csv("e2e/testset_w_refs.csv")
    ]
    held = set(_shuffled(sorted({p["mr"] for p in dev}), "e2e")[:E2E_VALIDATION_MRS])
    return TaskData(
        "e2e",
        "causal",
        train=_shuffled(_e2e_rows([p for p in dev if p["mr"] not in held]), "train"),
        validation=_shuffled(_e2e_rows([p for p in dev if p["mr"] in held]), "validation"),
        test=_shuffled(_e2e_rows(test), "test"),
        info={"source": "E2E NLG Challenge: trained on dev, tested on test"},
    )


def e2e_references(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """``(prompts, references)``: one prompt per distinct MR of ``rows`` (in order of first
    appearance) with all of that MR's reference texts, as the challenge's scoring wants."""
    refs: dict[str, list[str]] = {}
    prompts: dict[str, str] = {}
    for row in rows:
        refs.setdefault(row["mr"], []).append(row["completion"].strip())
        prompts.setdefault(row["mr"], row["prompt"])
    return list(prompts.values()), list(refs.values())


def _clinc(with_oos: bool) -> TaskData:
    raw = _json("clinc150/data_full.json")
    labels = sorted({intent for _, intent in raw["train"]})
    if with_oos:
        labels.append("oos")
    index = {name: i for i, name in enumerate(labels)}
    splits = {}
    for split, key in (("train", "train"), ("validation", "val"), ("test", "test")):
        pairs = raw[key] + (raw[f"oos_{key}"] if with_oos else [])
        splits[split] = _shuffled(
            [{"text": text, "label": index[intent]} for text, intent in pairs], split
        )
    return TaskData(
        "clinc150-oos" if with_oos else "clinc150",
        "classification",
        labels=tuple(labels),
        info={"oos_label": index.get("oos")},
        **splits,
    )


def answer_options(instruction: str) -> list[str]:
    """The answer words of a commonsense instruction, from its last line
    ``"Answer format: answer1/answer2/..."`` (e.g. ``["true", "false"]``)."""
    match = re.search(r"Answer format:\s*(\S+)\s*$", instruction)
    if match is None:
        raise ValueError(f"no 'Answer format: ...' at the end of {instruction[-80:]!r}")
    return match.group(1).split("/")


def _commonsense_rows(name: str, split: str) -> list[dict[str, Any]]:
    rows = []
    for ex in _json(f"commonsense/{name}/{split}.json"):
        instruction = ex["instruction"].strip()
        options = answer_options(instruction)
        if ex["answer"] not in options:
            raise ValueError(f"{name}: answer {ex['answer']!r} is not one of {options}")
        rows.append({
            "prompt": INSTRUCTION_TEMPLATE.format(instruction=instruction),
            "completion": ex["output"].strip(),
            "set": name,
            "answer": ex["answer"],
            "options": options,
        })  # fmt: skip
    return rows


def _commonsense() -> TaskData:
    mix = _shuffled(
        [row for name in COMMONSENSE_TRAIN_SETS for row in _commonsense_rows(name, "train")], "mix"
    )
    test = [
        row
        for name in COMMONSENSE_TEST_SETS
        for row in _shuffled(_commonsense_rows(name, "test"), name)
    ]
    return TaskData(
        "commonsense",
        "causal",
        train=mix[COMMONSENSE_VALIDATION:],
        validation=mix[:COMMONSENSE_VALIDATION],
        test=test,
        info={"test_sets": list(COMMONSENSE_TEST_SETS)},
    )


_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?|\d[\d,]*(?:\.\d+)?")


def extract_number(text: str) -> str | None:
    """The final answer of a GSM8K solution or generation: the number after the first
    ``####`` if there is one, else the last number in the text; commas and a trailing ``.0``
    removed (``"1,000.00"`` -> ``"1000"``). ``None`` when the text has no number."""
    head, marker, tail = text.partition("####")
    found = _NUMBER.findall(tail) if marker else _NUMBER.findall(head)
    if not found:
        return None
    number = (found[0] if marker else found[-1]).replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number or "0"


def _gsm8k() -> TaskData:
    def rows(split: str) -> list[dict[str, Any]]:
        out = []
        for line in embedded_bytes(f"gsm8k/{split}.jsonl").decode("utf-8").splitlines():
            if line.strip():
                ex = json.loads(line)
                out.append({
                    "prompt": GSM8K_TEMPLATE.format(question=ex["question"].strip()),
                    "completion": " " + ex["answer"].strip(),
                    "number": extract_number(ex["answer"]),
                })  # fmt: skip
        return _shuffled(out, split)

    train = rows("train")
    return TaskData(
        "gsm8k",
        "causal",
        train=train[GSM8K_VALIDATION:],
        validation=train[:GSM8K_VALIDATION],
        test=rows("test"),
    )


_BUILDERS = {
    "e2e": _e2e,
    "clinc150": lambda: _clinc(False),
    "clinc150-oos": lambda: _clinc(True),
    "commonsense": _commonsense,
    "gsm8k": _gsm8k,
}
#: Built-in task name -> (kind, default max_length in tokens).
TASKS: dict[str, tuple[str, int]] = {
    "e2e": ("causal", 128),
    "clinc150": ("classification", 64),
    "clinc150-oos": ("classification", 64),
    "commonsense": ("causal", 256),
    "gsm8k": ("causal", 384),
}


@functools.cache
def _task_data(name: str) -> TaskData:
    return _BUILDERS[name]()


def task_data(name: str) -> TaskData:
    """The splits of a built-in task (:data:`TASKS`), read from the embedded data once per
    process. The rows are shared: copy before changing them."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(_BUILDERS)}")
    return _task_data(name)


# --------------------------------------------------------------------------------------------
# tokenization and collation
# --------------------------------------------------------------------------------------------


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token")
    return int(tokenizer.eos_token_id)


def _join(prompt: list[int], target: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Fit prompt + target into ``max_length`` tokens: first cut the prompt on the left, but not
    below half the budget, then cut the target on the right (always keeping one token)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if len(prompt) + len(target) > max_length:
        keep = max(max_length - len(target), min(len(prompt), max_length // 2))
        keep = min(keep, max_length - 1)
        prompt = prompt[len(prompt) - keep :]
        target = target[: max_length - keep]
    return prompt, target


def _completion_ids(tokenizer: Any, completion: str) -> list[int]:
    return [*tokenizer(completion, add_special_tokens=False)["input_ids"], _eos_id(tokenizer)]


def tokenize_causal(
    tokenizer: Any, prompt: str, completion: str, max_length: int, special_tokens: bool = True
) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` (lists of ints) for ``prompt + completion`` + eos.

    The prompt is tokenized with the tokenizer's special tokens, the completion (appended as
    is, TRL's convention) without, and the two are concatenated; ``labels`` is ``-100`` on the
    prompt tokens. Longer sequences are truncated to ``max_length``: the prompt loses its
    beginning first (down to half the budget), then the completion its end.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=special_tokens)["input_ids"]
    p, c = _join(prompt_ids, _completion_ids(tokenizer, completion), max_length)
    return {"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c}


def _tokenize_causal_row(tokenizer: Any, row: dict[str, Any], max_length: int) -> dict:
    if "messages" not in row:
        return tokenize_causal(tokenizer, row["prompt"], row["completion"], max_length)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the data are chats ('messages') but the model's tokenizer has no chat template: "
            "use a chat model, or give prompt / completion columns instead"
        )
    turns = row["messages"]
    prompt = tokenizer.apply_chat_template(turns[:-1], add_generation_prompt=True, tokenize=False)
    # the rendered template carries its own special tokens
    return tokenize_causal(tokenizer, prompt, turns[-1]["content"], max_length, False)


def tokenize_rows(
    kind: str, tokenizer: Any, rows: Sequence[dict[str, Any]], max_length: int
) -> list[dict[str, Any]]:
    """Tokenized rows: causal ``{"input_ids", "labels"}`` lists (:func:`tokenize_causal`),
    classification ``{"input_ids": list[int], "labels": int}`` (truncated to ``max_length``).
    Chat rows (``messages``) are rendered with the tokenizer's chat template."""
    if kind == "causal":
        return [_tokenize_causal_row(tokenizer, r, max_length) for r in rows]
    if not rows:
        return []
    enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length)
    return [
        {"input_ids": list(ids), "labels": int(r["label"])}
        for ids, r in zip(enc["input_ids"], rows, strict=True)
    ]


def load_task(
    name: str,
    tokenizer: Any,
    split: str = "train",
    n: int | None = None,
    max_length: int | None = None,
) -> list[dict[str, Any]]:
    """Tokenized rows of a built-in task's split in its fixed order (``n``: the first n).
    ``max_length`` defaults to :data:`TASKS`. Batch them with :class:`Collator`."""
    data = task_data(name)
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rows = data.split(split)[:n]
    return tokenize_rows(data.kind, tokenizer, rows, max_length or TASKS[name][1])


@dataclass(frozen=True)
class Collator:
    """Right-pad a list of tokenized examples into a batch of tensors.

    Returns ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long and ``labels``:
    (B, T) long padded with ``-100`` when the examples carry label lists (causal LM), or (B,)
    long when they carry one int each (classification).
    """

    pad_token_id: int

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(ex["input_ids"]) for ex in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ex in enumerate(batch):
            ids[i, : len(ex["input_ids"])] = torch.tensor(ex["input_ids"], dtype=torch.long)
            mask[i, : len(ex["input_ids"])] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        if batch and "labels" in batch[0]:
            if isinstance(batch[0]["labels"], list):
                labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
                for i, ex in enumerate(batch):
                    labels[i, : len(ex["labels"])] = torch.tensor(ex["labels"], dtype=torch.long)
            else:
                labels = torch.tensor([int(ex["labels"]) for ex in batch], dtype=torch.long)
            out["labels"] = labels
        return out

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> Collator:
        """A collator padding with the tokenizer's pad token (or eos when it has none)."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)
        return cls(int(pad))


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------


def extract_choice(text: str, options: Sequence[str]) -> str | None:
    """The first of ``options`` that occurs in ``text`` as a whole word (case-insensitive), the
    way the suite scores generations ("the correct answer is answer2" -> ``"answer2"``);
    ``None`` if none does."""
    pattern = r"\b(" + "|".join(re.escape(o) for o in options) + r")\b"
    match = re.search(pattern, text, flags=re.IGNORECASE)
    if match is None:
        return None
    found = match.group(1).lower()
    return next(o for o in options if o.lower() == found)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def option_logprobs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[Sequence[str]],
    batch_size: int = 16,
    max_length: int = 512,
    eos: bool = True,
) -> list[list[float]]:
    """Log-likelihood scores of candidate completions after their prompt, for ranking them.

    ``completions[i]`` lists the candidates of prompt ``i`` (each followed by eos if ``eos``).
    The candidates' common token prefix adds the same log-probability to each, so it is left
    out: a score is the summed log-probability of the tokens after that prefix, and ranking by
    it is ranking by the full likelihood. When every candidate has one token left (the suite's
    answers without eos: "... is answer1" / "... is answer2"), one forward pass per prompt
    scores them all. Returns one list of floats per prompt.
    """
    jobs: list[tuple[int, list[int], list[list[int]]]] = []  # (prompt idx, context, tails)
    for i, (prompt, cands) in enumerate(zip(prompts, completions, strict=True)):
        ids = [
            _completion_ids(tokenizer, c)
            if eos
            else tokenizer(c, add_special_tokens=False)["input_ids"]
            for c in cands
        ]
        if not all(ids):
            raise ValueError(f"an empty candidate completion for prompt {i}")
        common = 0
        while all(len(c) > common + 1 for c in ids) and len({c[common] for c in ids}) == 1:
            common += 1
        longest = max(len(c) - common for c in ids)
        if longest >= max_length:
            raise ValueError(f"a candidate of prompt {i} is longer than max_length={max_length}")
        context = (tokenizer(prompt)["input_ids"] + ids[0][:common])[-(max_length - longest) :]
        jobs.append((i, context, [c[common:] for c in ids]))

    # one sequence per (prompt, candidate) unless every tail is a single token
    seqs: list[tuple[int, int, list[int], list[int]]] = []  # (prompt, cand, ids, scored)
    for i, context, tails in jobs:
        if all(len(t) == 1 for t in tails):
            seqs.append((i, -1, context, [t[0] for t in tails]))
        else:
            for j, tail in enumerate(tails):
                seqs.append((i, j, context + tail, tail))
    out: list[list[float]] = [[0.0] * len(c) for c in completions]
    was_training = model.training
    model.eval()
    pad = Collator.for_tokenizer(tokenizer).pad_token_id
    try:
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start : start + batch_size]
            batch = Collator(pad)([{"input_ids": ids} for _, _, ids, _ in chunk])
            logits = model(
                input_ids=batch["input_ids"].to(_device(model)),
                attention_mask=batch["attention_mask"].to(_device(model)),
            ).logits.float()
            for row, (i, j, ids, scored) in enumerate(chunk):
                if j < 0:  # single-token tails: the next-token distribution after the context
                    lp = logits[row, len(ids) - 1].log_softmax(-1)
                    out[i] = [float(lp[t]) for t in scored]
                else:  # logits at position t predict token t + 1
                    n = len(scored)
                    lp = logits[row, len(ids) - n - 1 : len(ids) - 1].log_softmax(-1)
                    target = torch.tensor(scored, device=lp.device)
                    out[i][j] = float(lp.gather(-1, target[:, None]).sum())
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), decoded without special
    tokens and stripped; generation stops at eos."""
    was_training = model.training
    model.eval()
    pad = Collator.for_tokenizer(tokenizer).pad_token_id
    texts: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            rows = [tokenizer(p)["input_ids"] for p in prompts[start : start + batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                if r:
                    ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
                    mask[i, width - len(r) :] = 1
            out = model.generate(
                input_ids=ids.to(_device(model)),
                attention_mask=mask.to(_device(model)),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=_eos_id(tokenizer),
            )
            new = out[:, width:]
            texts.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return texts
