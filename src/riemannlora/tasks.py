"""Fixed, deterministic train/eval splits of three BIG-bench tasks for LoRA fine-tuning.

Every split is built from a BIG-bench 1.0.0 task file (:func:`riemannlora.assets.bigbench_task`)
by a seeded shuffle (``random.Random(SPLIT_SEED)``, ``SPLIT_SEED = 0``), so it is the same on
every machine and run. ``n`` always takes a prefix of a split, so smaller subsets are nested.

Split sizes:

* ``e2e`` -- ``gem/e2e_nlg``: 1000 (MR, text) pairs over 213 distinct meaning representations
  (MRs). 40 MRs are held out: train 779 pairs (173 MRs), eval 221 pairs (40 MRs;
  :func:`e2e_eval_data` gives the 40 prompts with all their references).
* ``multiemo`` -- ``multiemo/all_sentence_en``: 57,466 sentences, 57,262 distinct:
  train 55,262, eval 2,000.
* ``mathqa`` -- ``elementary_math_qa/question_only``: 7,688 problems: train 7,188, eval 500.

Formats:

* ``e2e`` (causal LM, data-to-text): the split is by MR, so no eval MR is seen in training.
  Prompt :data:`E2E_TEMPLATE` = ``"Restaurant attributes: {mr}\\nDescription:"``; the target is
  ``" " + text + eos``; the loss is on the target tokens only.
* ``multiemo`` (encoder classifier): 4 classes, ids in :data:`MULTIEMO_LABELS` =
  ``("negative", "neutral", "positive", "ambivalent")`` (from ``target_scores``, exactly one 1).
  Duplicate sentences are dropped (first occurrence kept) before splitting.
* ``mathqa`` (causal LM, multiple choice): ``question_only`` is the plain MathQA question (the
  other subtasks add hints). Prompt :data:`MATHQA_TEMPLATE` =
  ``"Question: {question}\\nChoices: {choices}\\nAnswer:"`` (choices in file order, joined by
  ``" | "``); training target ``" " + correct choice + eos``; evaluation
  (:func:`mathqa_accuracy`) picks the choice whose continuation ``" " + choice + eos`` has the
  largest summed log-likelihood (``length_normalize=True``: mean per token).

Tokenized examples (:func:`load_task`) are dicts of plain lists: causal tasks
``{"input_ids": list[int], "labels": list[int]}`` (labels ``-100`` on prompt tokens), multiemo
``{"input_ids": list[int], "labels": int}``. :class:`Collator` pads them (right padding) into
``input_ids``/``attention_mask``/``labels`` tensors.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from riemannlora.assets import bigbench_task

__all__ = [
    "E2E_EVAL_MRS",
    "E2E_TEMPLATE",
    "IGNORE_INDEX",
    "MATHQA_EVAL_SIZE",
    "MATHQA_TEMPLATE",
    "MULTIEMO_EVAL_SIZE",
    "MULTIEMO_LABELS",
    "SPLIT_SEED",
    "TASKS",
    "Collator",
    "e2e_eval_data",
    "e2e_examples",
    "e2e_prompt",
    "greedy_generate",
    "load_task",
    "mathqa_accuracy",
    "mathqa_choice_logprobs",
    "mathqa_examples",
    "mathqa_prompt",
    "multiemo_examples",
    "tokenize_causal",
]

SPLIT_SEED = 0
IGNORE_INDEX = -100

E2E_TASK = "gem/e2e_nlg"
E2E_TEMPLATE = "Restaurant attributes: {mr}\nDescription:"
E2E_EVAL_MRS = 40

MULTIEMO_TASK = "multiemo/all_sentence_en"
MULTIEMO_LABELS: tuple[str, ...] = ("negative", "neutral", "positive", "ambivalent")
MULTIEMO_EVAL_SIZE = 2000

MATHQA_TASK = "elementary_math_qa/question_only"
MATHQA_TEMPLATE = "Question: {question}\nChoices: {choices}\nAnswer:"
MATHQA_EVAL_SIZE = 500

#: Task name -> (kind, default max_length). Aliases: ``e2e_nlg``, ``elementary_math_qa``.
TASKS: dict[str, tuple[str, int]] = {
    "e2e": ("causal", 128),
    "multiemo": ("classification", 128),
    "mathqa": ("causal", 256),
}
_ALIASES = {"e2e_nlg": "e2e", "elementary_math_qa": "mathqa"}
_SPLITS = ("train", "eval")


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")


def _take(items: Sequence[dict[str, Any]], n: int | None) -> list[dict[str, Any]]:
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    chosen = items if n is None else items[:n]
    return [{k: (list(v) if isinstance(v, list) else v) for k, v in d.items()} for d in chosen]


# --------------------------------------------------------------------------------------------
# raw splits
# --------------------------------------------------------------------------------------------


@functools.cache
def _e2e_splits() -> dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    refs: dict[str, list[str]] = {}
    pairs: list[tuple[str, str]] = []
    for ex in bigbench_task(E2E_TASK)["examples"]:
        mr = ex["input"].strip()
        targets = ex["target"] if isinstance(ex["target"], list) else [ex["target"]]
        targets = [t.strip() for t in targets]
        refs.setdefault(mr, []).extend(targets)
        pairs.append((mr, targets[0]))
    mrs = sorted(refs)
    random.Random(SPLIT_SEED).shuffle(mrs)
    eval_mrs = set(mrs[:E2E_EVAL_MRS])
    out = {}
    for split in _SPLITS:
        in_split = (lambda m: m in eval_mrs) if split == "eval" else (lambda m: m not in eval_mrs)
        split_pairs = [
            {"mr": m, "target": t, "references": refs[m]} for m, t in pairs if in_split(m)
        ]
        random.Random(SPLIT_SEED).shuffle(split_pairs)
        by_mr = [{"mr": m, "references": refs[m]} for m in mrs if in_split(m)]
        out[split] = (split_pairs, by_mr)
    return out


def e2e_prompt(mr: str) -> str:
    """The E2E prompt for a meaning representation (:data:`E2E_TEMPLATE`)."""
    return E2E_TEMPLATE.format(mr=mr)


def e2e_examples(split: str = "train", n: int | None = None) -> list[dict[str, Any]]:
    """E2E (MR, text) pairs: dicts ``{"mr": str, "target": str, "references": list[str]}``.

    ``references`` holds every reference text of that MR (train: 779 pairs, eval: 221).
    """
    _check_split(split)
    return _take(_e2e_splits()[split][0], n)


def e2e_eval_data(split: str = "eval", n: int | None = None) -> tuple[list[str], list[list[str]]]:
    """``(prompts, references)`` for greedy-decoding evaluation: one entry per distinct MR.

    ``prompts[i]`` is :func:`e2e_prompt` of the i-th MR, ``references[i]`` all its reference
    texts (eval: 40 MRs, train: 173).
    """
    _check_split(split)
    items = _take(_e2e_splits()[split][1], n)
    return [e2e_prompt(d["mr"]) for d in items], [d["references"] for d in items]


@functools.cache
def _multiemo_splits() -> dict[str, list[dict[str, Any]]]:
    seen: set[str] = set()
    items: list[dict[str, Any]] = []
    for ex in bigbench_task(MULTIEMO_TASK)["examples"]:
        text = ex["input"].strip()
        if text in seen:
            continue
        seen.add(text)
        positive = [k for k, v in ex["target_scores"].items() if v == 1]
        if len(positive) != 1 or positive[0] not in MULTIEMO_LABELS:
            raise ValueError(f"unexpected multiemo target_scores: {ex['target_scores']}")
        items.append({"text": text, "label": MULTIEMO_LABELS.index(positive[0])})
    random.Random(SPLIT_SEED).shuffle(items)
    return {"eval": items[:MULTIEMO_EVAL_SIZE], "train": items[MULTIEMO_EVAL_SIZE:]}


def multiemo_examples(split: str = "train", n: int | None = None) -> list[dict[str, Any]]:
    """MultiEmo sentences: dicts ``{"text": str, "label": int}``, label indexes
    :data:`MULTIEMO_LABELS` (train: 55,262, eval: 2,000)."""
    _check_split(split)
    return _take(_multiemo_splits()[split], n)


@functools.cache
def _mathqa_splits() -> dict[str, list[dict[str, Any]]]:
    items = []
    for ex in bigbench_task(MATHQA_TASK)["examples"]:
        choices = list(ex["target_scores"])
        correct = [i for i, c in enumerate(choices) if ex["target_scores"][c] == 1]
        if len(correct) != 1:
            raise ValueError(f"expected one correct choice: {ex['target_scores']}")
        items.append({"question": ex["input"].strip(), "choices": choices, "answer": correct[0]})
    random.Random(SPLIT_SEED).shuffle(items)
    return {"eval": items[:MATHQA_EVAL_SIZE], "train": items[MATHQA_EVAL_SIZE:]}


def mathqa_prompt(question: str, choices: Sequence[str]) -> str:
    """The MathQA prompt (:data:`MATHQA_TEMPLATE`, choices joined by ``" | "``)."""
    return MATHQA_TEMPLATE.format(question=question, choices=" | ".join(choices))


def mathqa_examples(split: str = "train", n: int | None = None) -> list[dict[str, Any]]:
    """MathQA problems: dicts ``{"question": str, "choices": list[str], "answer": int}``
    (index of the correct choice; 3-10 choices, mostly 5; train: 7,188, eval: 500)."""
    _check_split(split)
    return _take(_mathqa_splits()[split], n)


# --------------------------------------------------------------------------------------------
# tokenization and collation
# --------------------------------------------------------------------------------------------


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token")
    return int(tokenizer.eos_token_id)


def _continuation_ids(tokenizer: Any, text: str) -> list[int]:
    return [*tokenizer(text, add_special_tokens=False)["input_ids"], _eos_id(tokenizer)]


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


def tokenize_causal(tokenizer: Any, prompt: str, target: str, max_length: int) -> dict[str, Any]:
    """``{"input_ids", "labels"}`` (lists of ints) for ``prompt`` + ``" " + target`` + eos.

    The prompt is tokenized with the tokenizer's special tokens, the continuation without, and
    the two are concatenated; ``labels`` is ``-100`` on the prompt tokens. Longer sequences are
    truncated to ``max_length``: the prompt loses its beginning first (down to half the
    budget), then the target its end.
    """
    p = tokenizer(prompt)["input_ids"]
    t = _continuation_ids(tokenizer, " " + target)
    p, t = _join(p, t, max_length)
    return {"input_ids": p + t, "labels": [IGNORE_INDEX] * len(p) + t}


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


def load_task(
    name: str,
    tokenizer: Any,
    split: str = "train",
    n: int | None = None,
    max_length: int | None = None,
) -> list[dict[str, Any]]:
    """Tokenized examples of a task split, in the fixed split order (``n``: the first n).

    ``name``: ``"e2e"``, ``"multiemo"`` or ``"mathqa"``. ``max_length`` defaults to
    :data:`TASKS` (128, 128, 256). Causal tasks give ``{"input_ids": list[int], "labels":
    list[int]}`` (e2e: one per (MR, text) pair; mathqa: prompt + correct choice), multiemo
    ``{"input_ids": list[int], "labels": int}`` (tokenizer's special tokens, truncated). Batch
    them with :class:`Collator`.
    """
    _check_split(split)
    key = _ALIASES.get(name, name)
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    length = max_length if max_length is not None else TASKS[key][1]
    if key == "e2e":
        return [
            tokenize_causal(tokenizer, e2e_prompt(ex["mr"]), ex["target"], length)
            for ex in e2e_examples(split, n)
        ]
    if key == "mathqa":
        return [
            tokenize_causal(
                tokenizer,
                mathqa_prompt(ex["question"], ex["choices"]),
                ex["choices"][ex["answer"]],
                length,
            )
            for ex in mathqa_examples(split, n)
        ]
    items = multiemo_examples(split, n)
    if not items:
        return []
    enc = tokenizer([ex["text"] for ex in items], truncation=True, max_length=length)
    return [
        {"input_ids": list(ids), "labels": ex["label"]}
        for ids, ex in zip(enc["input_ids"], items, strict=True)
    ]


# --------------------------------------------------------------------------------------------
# evaluation helpers
# --------------------------------------------------------------------------------------------


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def mathqa_choice_logprobs(
    model: Any,
    tokenizer: Any,
    examples: Sequence[dict[str, Any]],
    batch_size: int = 8,
    max_length: int = 256,
    length_normalize: bool = False,
) -> list[list[float]]:
    """Log-likelihood of each choice's continuation ``" " + choice + eos`` after the prompt.

    Returns one list per example with one float per choice: the sum of the continuation's token
    log-probabilities (mean per token if ``length_normalize``). ``batch_size`` counts
    (example, choice) sequences per forward pass. The model is run in eval mode and its
    training flag restored.
    """
    seqs: list[tuple[list[int], int]] = []  # (token ids, continuation length)
    owners: list[int] = []
    for i, ex in enumerate(examples):
        prompt = tokenizer(mathqa_prompt(ex["question"], ex["choices"]))["input_ids"]
        for choice in ex["choices"]:
            p, c = _join(prompt, _continuation_ids(tokenizer, " " + choice), max_length)
            seqs.append((p + c, len(c)))
            owners.append(i)

    was_training = model.training
    model.eval()
    device = _model_device(model)
    pad = Collator.for_tokenizer(tokenizer).pad_token_id
    scores: list[float] = []
    try:
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start : start + batch_size]
            batch = Collator(pad)([{"input_ids": s} for s, _ in chunk])
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            ).logits
            for row, (ids, n_cont) in enumerate(chunk):
                end = len(ids)
                # logits at position t predict token t + 1
                pred = logits[row, end - n_cont - 1 : end - 1].float().log_softmax(-1)
                target = torch.tensor(ids[end - n_cont :], device=pred.device)
                lp = pred.gather(-1, target[:, None]).sum()
                scores.append(float(lp / n_cont if length_normalize else lp))
    finally:
        model.train(was_training)

    out: list[list[float]] = [[] for _ in examples]
    for owner, score in zip(owners, scores, strict=True):
        out[owner].append(score)
    return out


def mathqa_accuracy(
    model: Any,
    tokenizer: Any,
    examples: Sequence[dict[str, Any]],
    batch_size: int = 8,
    max_length: int = 256,
    length_normalize: bool = False,
) -> float:
    """Multiple-choice accuracy in [0, 1] on :func:`mathqa_examples`-style dicts: an example
    counts as correct when its answer has the highest :func:`mathqa_choice_logprobs` score."""
    if not examples:
        raise ValueError("no examples")
    scores = mathqa_choice_logprobs(
        model, tokenizer, examples, batch_size, max_length, length_normalize
    )
    hits = sum(
        max(range(len(s)), key=s.__getitem__) == ex["answer"]
        for s, ex in zip(scores, examples, strict=True)
    )
    return hits / len(examples)


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
    device = _model_device(model)
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
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
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
