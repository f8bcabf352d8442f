"""How each task of the benchmark scores its test split after training.

A :class:`Scorer` belongs to a :class:`riemannlora.bench.workloads.Workload` and says three
things, so that nothing downstream asks for a task by name:

* ``score(final)``: the final metrics, from a :class:`FinalEval` (the trained model, its
  tokenizer, the task's data, a way to batch test rows and the run's sizes);
* ``final_limit(test)``: the largest ``final_eval_size`` the test split holds, with what bounds
  it (rows, distinct meaning representations, the largest test set);
* ``test_loss_rows``: whether the test loss reads the first ``eval_size`` test rows (so that
  ``eval_size`` is bounded by the test split as well as the validation split);
* ``scorings``: the ways it can score answers (``--scoring``; :data:`SCORINGS` for
  ``commonsense``, none for the others).

The scorers of the built-in tasks: :data:`CLASSIFICATION` (``clinc150``, ``clinc150-oos`` and a
user's classification data), :data:`E2E`, :data:`COMMONSENSE`, :data:`GSM8K` and
:data:`TEST_LOSS` (a user's causal data). The diffusion task scores itself
(:meth:`riemannlora.bench.diffusion.DreamBoothData.final_metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from riemannlora.bench.tasks import (
    COMMONSENSE_TEST_SETS,
    TaskData,
    e2e_references,
    extract_choice,
    extract_number,
    greedy_generate,
    option_logprobs,
)

__all__ = [
    "CLASSIFICATION",
    "COMMONSENSE",
    "E2E",
    "GSM8K",
    "SCORINGS",
    "TEST_LOSS",
    "FinalEval",
    "Scorer",
    "eval_loss",
]

#: How commonsense answers are scored.
SCORINGS = ("likelihood", "generate")

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class FinalEval:
    """What a scorer reads: the trained ``model`` and its ``tokenizer``, the ``task``'s data,
    ``test_batches(n)`` (the first ``n`` test rows, tokenized and batched) and the run's sizes.
    ``batch_size``: rows per forward pass or decoding batch."""

    model: nn.Module
    tokenizer: Any
    task: TaskData
    test_batches: Callable[[int], list[Batch]]
    batch_size: int
    final_eval_size: int
    eval_size: int
    max_length: int
    max_new_tokens: int
    scoring: str = "likelihood"
    progress: bool = True


@dataclass(frozen=True)
class Scorer:
    """A task's final metrics and the sizes its test split bounds (see the module docstring)."""

    score: Callable[[FinalEval], dict[str, Any]]
    final_limit: Callable[[list[dict[str, Any]]], tuple[int, str]]
    test_loss_rows: bool = False
    scorings: tuple[str, ...] = ()


def _rows(test: list[dict[str, Any]]) -> tuple[int, str]:
    return len(test), f"its test split has {len(test)} rows"


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def _weight(batch: Batch) -> int:
    """Number of loss terms in a batch: examples (classification, diffusion) or predicted
    target tokens (causal; the label of position t + 1 is predicted at t)."""
    if "pixel_values" in batch:
        return len(batch["pixel_values"])
    labels = batch["labels"]
    if labels.dim() == 1:
        return labels.numel()
    return int((labels[:, 1:] != -100).sum())


@torch.no_grad()
def eval_loss(model: nn.Module, batches: list[Batch]) -> float:
    """Mean loss over all examples / target tokens of ``batches`` (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for batch in batches:
            w = _weight(batch)
            total += float(model(**_to(batch, device)).loss) * w
            count += w
    finally:
        model.train(was_training)
    return total / count if count else math.nan


@torch.no_grad()
def _predictions(model: nn.Module, batches: list[Batch]) -> tuple[list[int], list[int]]:
    """(predicted, true) labels of classification batches (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    predicted: list[int] = []
    truth: list[int] = []
    try:
        for batch in batches:
            logits = model(**_to(batch, next(model.parameters()).device)).logits
            predicted += logits.argmax(-1).cpu().tolist()
            truth += batch["labels"].tolist()
    finally:
        model.train(was_training)
    return predicted, truth


def _chunks(items: list, size: int, desc: str, progress: bool) -> Iterator[list]:
    from tqdm.auto import tqdm

    starts = range(0, len(items), size)
    bar = tqdm(
        starts, desc=desc, leave=False, unit="batch", disable=not progress, dynamic_ncols=True
    )
    for start in bar:
        yield items[start : start + size]


def _classification(f: FinalEval) -> dict[str, Any]:
    """``accuracy`` and ``test_loss`` on the first ``final_eval_size`` test rows; with an
    out-of-scope label (``task.info["oos_label"]``), in-scope ``accuracy`` and ``oos_recall``."""
    batches = f.test_batches(f.final_eval_size)
    predicted, truth = _predictions(f.model, batches)
    out: dict[str, Any] = {"test_loss": eval_loss(f.model, batches)}
    oos = f.task.info.get("oos_label")
    if oos is None:
        out["accuracy"] = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
        return out
    inscope = [(p, t) for p, t in zip(predicted, truth) if t != oos]
    outscope = [p for p, t in zip(predicted, truth) if t == oos]
    out["accuracy"] = sum(p == t for p, t in inscope) / len(inscope) if inscope else math.nan
    out["oos_recall"] = sum(p == oos for p in outscope) / len(outscope) if outscope else math.nan
    return out


def _test_loss(f: FinalEval) -> dict[str, Any]:
    """``test_loss`` on the completion tokens of the first ``final_eval_size`` test rows."""
    return {"test_loss": eval_loss(f.model, f.test_batches(f.final_eval_size))}


def _e2e(f: FinalEval) -> dict[str, Any]:
    """Greedy decoding of the first ``final_eval_size`` distinct test MRs scored against all
    their references (``bleu``, ``rouge_l``, ``nist``), ``test_loss`` on the first
    ``eval_size`` test pairs, and ``samples``: the first three (prompt, generation) pairs."""
    from riemannlora.bench.metrics import corpus_bleu, nist, rouge_l

    prompts, references = e2e_references(f.task.test)
    prompts, references = prompts[: f.final_eval_size], references[: f.final_eval_size]
    outputs: list[str] = []
    for chunk in _chunks(prompts, f.batch_size, "greedy decode", f.progress):
        outputs += greedy_generate(
            f.model, f.tokenizer, chunk, max_new_tokens=f.max_new_tokens, batch_size=f.batch_size
        )
    return {
        "bleu": corpus_bleu(outputs, references),
        "rouge_l": rouge_l(outputs, references),
        "nist": nist(outputs, references),
        "test_loss": eval_loss(f.model, f.test_batches(f.eval_size)),
        "samples": [{"prompt": p, "output": o} for p, o in list(zip(prompts, outputs))[:3]],
    }


def _e2e_limit(test: list[dict[str, Any]]) -> tuple[int, str]:
    n = len(e2e_references(test)[0])
    return n, f"its test split has {n} distinct MRs"


def _commonsense(f: FinalEval) -> dict[str, Any]:
    """Accuracy on the first ``final_eval_size`` questions of each test set and their average
    (``accuracy``), by ``scoring`` (:data:`SCORINGS`)."""
    if f.scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {f.scoring!r}")
    size = f.batch_size
    out: dict[str, Any] = {"scoring": f.scoring}
    for name in COMMONSENSE_TEST_SETS:
        chosen = [r for r in f.task.test if r["set"] == name][: f.final_eval_size]
        hits = 0
        for chunk in _chunks(chosen, size, f"{name} ({f.scoring})", f.progress):
            prompts = [r["prompt"] for r in chunk]
            if f.scoring == "likelihood":
                cands = [[f"the correct answer is {o}" for o in r["options"]] for r in chunk]
                scores = option_logprobs(
                    f.model, f.tokenizer, prompts, cands, size, f.max_length, eos=False
                )
                picked = [r["options"][max(range(len(s)), key=s.__getitem__)]
                          for r, s in zip(chunk, scores)]  # fmt: skip
            else:
                texts = greedy_generate(f.model, f.tokenizer, prompts, f.max_new_tokens, size)
                picked = [extract_choice(t, r["options"]) for t, r in zip(texts, chunk)]
            hits += sum(p == r["answer"] for p, r in zip(picked, chunk))
        out[name] = hits / len(chosen)
    out["accuracy"] = sum(out[name] for name in COMMONSENSE_TEST_SETS) / len(COMMONSENSE_TEST_SETS)
    return out


def _commonsense_limit(test: list[dict[str, Any]]) -> tuple[int, str]:
    n = max(sum(1 for r in test if r["set"] == name) for name in COMMONSENSE_TEST_SETS)
    return n, f"its largest test set has {n} questions"


def _gsm8k(f: FinalEval) -> dict[str, Any]:
    """``exact_match`` of the final number of a greedy decoding of the first
    ``final_eval_size`` problems, and ``answer_loss`` on the first ``eval_size``."""
    rows = f.task.test[: f.final_eval_size]
    hits = 0
    for chunk in _chunks(rows, f.batch_size, "greedy decode", f.progress):
        prompts = [r["prompt"] for r in chunk]
        texts = greedy_generate(f.model, f.tokenizer, prompts, f.max_new_tokens, f.batch_size)
        hits += sum(extract_number(t) == r["number"] for t, r in zip(texts, chunk))
    return {
        "exact_match": hits / len(rows),
        "answer_loss": eval_loss(f.model, f.test_batches(f.eval_size)),
    }


CLASSIFICATION = Scorer(_classification, _rows)
TEST_LOSS = Scorer(_test_loss, _rows)
E2E = Scorer(_e2e, _e2e_limit, test_loss_rows=True)
COMMONSENSE = Scorer(_commonsense, _commonsense_limit, scorings=SCORINGS)
GSM8K = Scorer(_gsm8k, _rows, test_loss_rows=True)
