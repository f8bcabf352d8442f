"""The benchmark tasks: which model, which LoRA layers, which data, which final metric.

Three workloads on the fixed BIG-bench splits of :mod:`riemannlora.tasks`:

* ``multiemo`` -- 4-class sentence sentiment with an encoder (default
  ``sentence-transformers/all-MiniLM-L6-v2`` + a new linear head, trained with the LoRA factors
  through PEFT's ``modules_to_save``). Eval loss: cross-entropy on a fixed eval subset. Final
  metric: accuracy on ``final_eval_size`` eval sentences.
* ``e2e`` -- E2E NLG data-to-text with a causal LM (default
  ``HuggingFaceTB/SmolLM2-135M-Instruct``). Eval loss: token-level cross-entropy on the target
  tokens of a fixed eval subset. Final metrics: greedy decoding of ``final_eval_size`` held-out
  meaning representations, multi-reference corpus BLEU (0-100) and ROUGE-L (0-1) against all
  their references (:mod:`riemannlora.bench.metrics`).
* ``mathqa`` -- elementary MathQA with a causal LM (default SmolLM2). Eval loss as e2e. Final
  metric: multiple-choice accuracy (:func:`riemannlora.tasks.mathqa_accuracy`).
* ``diffusion`` -- DreamBooth-style subject learning with a small text-to-image diffusion model
  pretrained here (:mod:`riemannlora.diffusion`; default ``riemannlora/mnist-digits-unet``,
  quick runs ``riemannlora/mnist-digits-unet-tiny``): LoRA on the UNet's attention projections
  learns the held-out digit from 10 training images bound to "a handwritten digit sks", with
  prior preservation. Eval loss: denoising loss on unseen test images of the new class. Final
  metrics: classifier accuracy of generated subject samples (``subject_accuracy``) and of
  samples of the pretrained classes (``retained_accuracy``: forgetting lowers it), and a PNG
  grid of samples.

LoRA is put on every ``nn.Linear`` except the output head (``classifier``, ``score``,
``lm_head``) -- for ``diffusion`` on ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` -- with ``lora_alpha = 2 r`` (scaling 2) and no dropout, so every method sees the
same deterministic function of its parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from riemannlora.assets import MINILM_ID, SMOLLM2_ID, load_causal_lm, load_sequence_classifier
from riemannlora.tasks import (
    MULTIEMO_LABELS,
    Collator,
    e2e_eval_data,
    load_task,
    mathqa_accuracy,
    mathqa_examples,
)

__all__ = ["HEAD_NAMES", "WORKLOADS", "Workload", "eval_loss", "final_metrics", "train_batches"]

#: Names of output layers that never get LoRA.
HEAD_NAMES = ("classifier", "score", "lm_head")


@dataclass(frozen=True)
class Workload:
    """A task of the benchmark and its per-preset sizes.

    ``presets[name]`` maps setting names of :class:`riemannlora.bench.runner.RunConfig`
    (``steps``, ``batch_size``, ``eval_every``, ``eval_size``, ``final_eval_size``,
    ``max_length``, ``max_new_tokens``) to values.
    """

    name: str
    kind: str  # "classification", "causal" or "diffusion"
    default_model: str
    metric: str  # name of the primary final metric (higher is better)
    presets: dict[str, dict[str, int]]
    eval_batch_size: int
    metrics: tuple[str, ...] = ()  # every final metric of the table (default: (metric,))
    quick_model: str | None = None  # model of the quick preset (default: default_model)

    def settings(self, preset: str) -> dict[str, int]:
        """Sizes of ``preset`` (``"full"`` uses the default sizes)."""
        return dict(self.presets["quick" if preset == "quick" else "default"])

    def model_for(self, preset: str) -> str:
        """The default model of ``preset``."""
        return self.quick_model if preset == "quick" and self.quick_model else self.default_model

    def table_metrics(self) -> list[str]:
        """The final metrics of the results table."""
        return list(self.metrics or (self.metric,))


_MULTIEMO = Workload(
    name="multiemo",
    kind="classification",
    default_model=MINILM_ID,
    metric="accuracy",
    presets={
        "default": dict(
            steps=200,
            batch_size=16,
            eval_every=25,
            eval_size=256,
            final_eval_size=1000,
            max_length=64,
            max_new_tokens=0,
        ),
        "quick": dict(
            steps=12,
            batch_size=16,
            eval_every=4,
            eval_size=32,
            final_eval_size=64,
            max_length=64,
            max_new_tokens=0,
        ),
    },
    eval_batch_size=64,
)
_E2E = Workload(
    name="e2e",
    kind="causal",
    default_model=SMOLLM2_ID,
    metric="bleu",
    metrics=("bleu", "rouge_l"),
    presets={
        "default": dict(
            steps=150,
            batch_size=8,
            eval_every=25,
            eval_size=64,
            final_eval_size=40,
            max_length=128,
            max_new_tokens=48,
        ),
        "quick": dict(
            steps=4,
            batch_size=8,
            eval_every=2,
            eval_size=8,
            final_eval_size=4,
            max_length=128,
            max_new_tokens=16,
        ),
    },
    eval_batch_size=16,
)
_MATHQA = Workload(
    name="mathqa",
    kind="causal",
    default_model=SMOLLM2_ID,
    metric="accuracy",
    presets={
        "default": dict(
            steps=150,
            batch_size=8,
            eval_every=25,
            eval_size=64,
            final_eval_size=100,
            max_length=256,
            max_new_tokens=0,
        ),
        "quick": dict(
            steps=4,
            batch_size=8,
            eval_every=2,
            eval_size=8,
            final_eval_size=8,
            max_length=256,
            max_new_tokens=0,
        ),
    },
    eval_batch_size=16,
)

_DIFFUSION = Workload(
    name="diffusion",
    kind="diffusion",
    default_model="riemannlora/mnist-digits-unet",
    quick_model="riemannlora/mnist-digits-unet-tiny",
    metric="subject_accuracy",
    metrics=("subject_accuracy", "retained_accuracy"),
    presets={
        # batch_size: subject images per batch (as many prior-preservation images come along);
        # eval_size: unseen test images of the new class; final_eval_size: subject samples
        "default": dict(
            steps=150,
            batch_size=8,
            eval_every=25,
            eval_size=128,
            final_eval_size=64,
            max_length=0,
            max_new_tokens=0,
        ),
        "quick": dict(
            steps=4,
            batch_size=4,
            eval_every=2,
            eval_size=16,
            final_eval_size=8,
            max_length=0,
            max_new_tokens=0,
        ),
    },
    eval_batch_size=64,
)

#: Task name -> workload.
WORKLOADS: dict[str, Workload] = {w.name: w for w in (_MULTIEMO, _E2E, _MATHQA, _DIFFUSION)}


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


def load_base(workload: Workload, model: str, device: str) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: the pretrained model (float32, eval mode) on ``device``. For
    ``diffusion``: a :class:`riemannlora.diffusion.DenoisingLoss` around the pretrained UNet
    and, in place of the tokenizer, its :class:`riemannlora.diffusion.DreamBoothData`."""
    if workload.kind == "diffusion":
        from riemannlora.diffusion import DenoisingLoss, DreamBoothData, pretrained

        base = pretrained(model, device=device)
        return DenoisingLoss(base.unet).to(device).eval(), DreamBoothData(base)
    if workload.kind == "classification":
        return load_sequence_classifier(model, num_labels=len(MULTIEMO_LABELS), device=device)
    return load_causal_lm(model, device=device)


def lora_target_names(model: nn.Module) -> list[str]:
    """Leaf names of every ``nn.Linear`` of ``model`` except the output heads (sorted)."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in HEAD_NAMES
    }
    if not names:
        raise ValueError("the model has no nn.Linear layer to put LoRA on")
    return sorted(names)


def lora_config(workload: Workload, model: nn.Module, rank: int, **init: Any) -> Any:
    """The ``peft.LoraConfig`` of the benchmark (``init``: extra fields such as
    ``init_lora_weights``)."""
    from peft import LoraConfig, TaskType

    if workload.kind == "diffusion":
        from riemannlora.diffusion import LORA_TARGETS

        return LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=0.0,
            target_modules=list(LORA_TARGETS),
            **init,
        )
    task_type = TaskType.SEQ_CLS if workload.kind == "classification" else TaskType.CAUSAL_LM
    return LoraConfig(
        task_type=task_type,
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=lora_target_names(model),
        **init,
    )


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


_EXAMPLES: dict[tuple, tuple[dict[str, Any], ...]] = {}


def _examples(task: str, tokenizer: Any, split: str, n: int, max_length: int) -> tuple:
    """Tokenized examples, memoized per (task, tokenizer, split, n, max_length) so that the
    runs of a sweep tokenize once."""
    key = (task, getattr(tokenizer, "name_or_path", id(tokenizer)), split, n, max_length)
    if key not in _EXAMPLES:
        if len(_EXAMPLES) >= 8:
            _EXAMPLES.pop(next(iter(_EXAMPLES)))
        _EXAMPLES[key] = tuple(load_task(task, tokenizer, split, n=n, max_length=max_length))
    return _EXAMPLES[key]


def train_batches(
    workload: Workload,
    tokenizer: Any,
    *,
    steps: int,
    batch_size: int,
    max_length: int,
    seed: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """``steps`` training batches, the same for every method: the first ``steps * batch_size``
    examples of the train split (or all of them), reshuffled each epoch by a generator seeded
    with ``seed``. ``diffusion``: :meth:`riemannlora.diffusion.DreamBoothData.train_batches`."""
    if workload.kind == "diffusion":
        yield from tokenizer.train_batches(steps, batch_size, seed)
        return
    examples = _examples(workload.name, tokenizer, "train", steps * batch_size, max_length)
    if not examples:
        raise ValueError(f"task {workload.name!r} has no training examples")
    collate = Collator.for_tokenizer(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order.extend(torch.randperm(len(examples), generator=gen).tolist())
        chosen, order = order[:batch_size], order[batch_size:]
        yield collate([examples[i] for i in chosen])


def eval_batches(
    workload: Workload, tokenizer: Any, *, n: int, max_length: int
) -> list[dict[str, torch.Tensor]]:
    """The fixed eval subset (first ``n`` eval examples) in batches, sorted by length (less
    padding; the order does not change the mean)."""
    if workload.kind == "diffusion":
        return tokenizer.eval_batches(n, workload.eval_batch_size)
    examples = sorted(
        _examples(workload.name, tokenizer, "eval", n, max_length),
        key=lambda ex: len(ex["input_ids"]),
    )
    collate = Collator.for_tokenizer(tokenizer)
    size = workload.eval_batch_size
    return [collate(list(examples[i : i + size])) for i in range(0, len(examples), size)]


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _weight(batch: dict[str, torch.Tensor]) -> int:
    """Number of loss terms in a batch: examples (classification, diffusion) or predicted
    target tokens (causal; the label of position t + 1 is predicted at t)."""
    if "pixel_values" in batch:
        return len(batch["pixel_values"])
    labels = batch["labels"]
    if labels.dim() == 1:
        return labels.numel()
    return int((labels[:, 1:] != -100).sum())


@torch.no_grad()
def eval_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
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
def _correct(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Number of correctly classified examples of a batch (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    try:
        logits = model(**_to(batch, next(model.parameters()).device)).logits
    finally:
        model.train(was_training)
    return int((logits.argmax(-1).cpu() == batch["labels"]).sum())


def _chunks(items: list, size: int, desc: str, progress: bool) -> Iterator[list]:
    from tqdm.auto import tqdm

    starts = range(0, len(items), size)
    bar = tqdm(
        starts, desc=desc, leave=False, unit="batch", disable=not progress, dynamic_ncols=True
    )
    for start in bar:
        yield items[start : start + size]


def final_metrics(
    workload: Workload,
    model: nn.Module,
    tokenizer: Any,
    *,
    final_eval_size: int,
    max_length: int,
    max_new_tokens: int,
    progress: bool = True,
) -> dict[str, Any]:
    """The task's final metrics after training (see the module docstring). e2e also returns
    ``"samples"``: the first three (prompt, generation) pairs."""
    size = workload.eval_batch_size
    if workload.kind == "diffusion":
        return tokenizer.final_metrics(model, final_eval_size)
    if workload.name == "multiemo":
        batches = eval_batches(workload, tokenizer, n=final_eval_size, max_length=max_length)
        correct = sum(
            _correct(model, chunk[0]) for chunk in _chunks(batches, 1, "final eval", progress)
        )
        return {"accuracy": correct / sum(b["labels"].numel() for b in batches)}
    if workload.name == "mathqa":
        examples = mathqa_examples("eval", n=final_eval_size)
        hits = 0.0
        for chunk in _chunks(examples, size, "final eval", progress):
            acc = mathqa_accuracy(model, tokenizer, chunk, batch_size=size, max_length=max_length)
            hits += acc * len(chunk)
        return {"accuracy": hits / len(examples)}
    from riemannlora.bench.metrics import corpus_bleu, rouge_l
    from riemannlora.tasks import greedy_generate

    prompts, references = e2e_eval_data("eval", n=final_eval_size)
    outputs: list[str] = []
    for chunk in _chunks(prompts, size, "greedy decode", progress):
        outputs += greedy_generate(
            model, tokenizer, chunk, max_new_tokens=max_new_tokens, batch_size=size
        )
    return {
        "bleu": corpus_bleu(outputs, references),
        "rouge_l": rouge_l(outputs, references),
        "samples": [{"prompt": p, "output": o} for p, o in list(zip(prompts, outputs))[:3]],
    }
