"""The benchmark's workloads: which model, which LoRA layers, which data, which final metrics.

The tasks and their data are those of :mod:`riemannlora.bench.tasks` (embedded real data sets)
or a user's data set (:mod:`riemannlora.bench.userdata`, ``--data``). During training the
eval-loss curve is measured on the ``validation`` split (the sweep picks learning rates by it);
the final metrics are measured once, on the ``test`` split:

* ``clinc150`` -- 150-intent classification with an encoder (default
  ``sentence-transformers/all-MiniLM-L6-v2`` + a new linear head, trained with the LoRA factors
  through PEFT's ``modules_to_save``). Final: ``accuracy`` on the first ``final_eval_size``
  test queries, and ``test_loss``. ``clinc150-oos`` adds the out-of-scope label and reports
  in-scope ``accuracy`` and ``oos_recall`` (out-of-scope test queries predicted as ``oos``).
* ``e2e`` -- E2E NLG data-to-text with a causal LM (default
  ``HuggingFaceTB/SmolLM2-135M-Instruct``). Final: greedy decoding of the first
  ``final_eval_size`` distinct test meaning representations, scored against all their
  references: multi-reference corpus ``bleu`` (0-100), ``rouge_l`` (0-1) and ``nist``
  (:mod:`riemannlora.bench.metrics`); ``test_loss`` on the completion tokens of the first
  ``eval_size`` test pairs.
* ``commonsense`` -- the seven commonsense-reasoning test sets with a causal LM (default
  SmolLM2). Final: accuracy on the first ``final_eval_size`` rows of each set and their
  average (``accuracy``). ``scoring="likelihood"`` (default) picks the answer word whose
  completion "the correct answer is <word>" (without eos) is most likely; ``scoring="generate"`` decodes
  greedily and extracts the first answer word of the text, as the suite does.
* ``gsm8k`` -- math word problems with a causal LM (default SmolLM2). Final:
  ``answer_loss`` (test loss on the solution tokens of the first ``eval_size`` test problems)
  and ``exact_match`` of the final number of a greedy decoding (first ``final_eval_size``
  problems, ``max_new_tokens`` tokens).
* ``diffusion`` -- DreamBooth-style subject learning with a small text-to-image diffusion model
  pretrained here (:mod:`riemannlora.bench.diffusion`; default ``riemannlora/mnist-digits-unet``,
  quick runs ``riemannlora/mnist-digits-unet-tiny``): LoRA on the UNet's attention projections
  learns the held-out digit from 10 training images bound to "a handwritten digit sks", with
  prior preservation. Eval loss: denoising loss on unseen test images of the new class. Final
  metrics: classifier accuracy of generated subject samples (``subject_accuracy``) and of
  samples of the pretrained classes (``retained_accuracy``: forgetting lowers it), and a PNG
  grid of samples.
* ``custom`` -- a user's data (``--data``): classification as ``clinc150`` (``accuracy``), causal
  LM with ``test_loss`` on the completion tokens.

LoRA is put on every ``nn.Linear`` except the output head (``classifier``, ``score``,
``lm_head``) -- for ``diffusion`` on ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` -- with
``lora_alpha = 2 r`` (scaling 2) and no dropout, so every method sees the same deterministic
function of its parameters.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from riemannlora.bench import scoring as scorers
from riemannlora.bench.assets import MINILM_ID, SMOLLM2_ID, load_causal_lm, load_sequence_classifier
from riemannlora.bench.scoring import SCORINGS, FinalEval, Scorer, eval_loss
from riemannlora.bench.tasks import (
    COMMONSENSE_TEST_SETS,
    Collator,
    TaskData,
    task_data,
    tokenize_rows,
)

__all__ = [
    "HEAD_NAMES",
    "SCORINGS",
    "TARGET_CHOICES",
    "WORKLOADS",
    "Workload",
    "eval_loss",
    "final_metrics",
    "get_workload",
    "train_batches",
]

#: Names of output layers that never get LoRA.
HEAD_NAMES = ("classifier", "score", "lm_head")


@dataclass(frozen=True)
class Workload:
    """A task of the benchmark and its per-preset sizes.

    ``presets[name]`` maps setting names of :class:`riemannlora.bench.runner.RunConfig`
    (``steps``, ``batch_size``, ``eval_every``, ``eval_size``, ``final_eval_size``,
    ``max_length``, ``max_new_tokens``) to values. ``scorer``: how the test split is scored
    (:mod:`riemannlora.bench.scoring`; the diffusion task scores itself). ``data``: the
    ``--data`` source of a ``custom`` workload.
    """

    name: str
    kind: str  # "classification", "causal" or "diffusion"
    default_model: str
    metric: str  # name of the primary final metric
    presets: dict[str, dict[str, int]]
    eval_batch_size: int
    metrics: tuple[str, ...] = ()  # every final metric of the table (default: (metric,))
    quick_model: str | None = None  # model of the quick preset (default: default_model)
    scorer: Scorer | None = None  # None only for the diffusion task
    data: str = ""
    columns: str = ""

    def settings(self, preset: str) -> dict[str, int]:
        """Sizes of ``preset`` (``"full"`` uses the default sizes, ``"gpu"`` its own where the
        workload has them)."""
        return dict(self.presets.get(preset, self.presets["default"]))

    def model_for(self, preset: str) -> str:
        """The default model of ``preset``."""
        return self.quick_model if preset == "quick" and self.quick_model else self.default_model

    def table_metrics(self) -> list[str]:
        """The final metrics of the results table."""
        return list(self.metrics or (self.metric,))

    def task(self) -> TaskData:
        """The task's data (built-in or the user's), read once per process."""
        return _user_task(self.data, self.columns) if self.data else task_data(self.name)

    def size_limits(self, model: str = "") -> dict[str, tuple[int, str]]:
        """The largest ``eval_size`` / ``final_eval_size`` the task's data hold, each with
        what bounds it: ``{setting: (limit, reason)}``. A larger value would silently read
        fewer rows than the run records. ``diffusion``: the eval set is the test images of
        ``model``'s subject class (a built-in model; a saved one's is checked when its eval set
        is built), and the final samples are generated, so unbounded."""
        if self.kind == "diffusion":
            from riemannlora.bench.diffusion.model import PRETRAIN_CONFIGS, load_mnist

            if model not in PRETRAIN_CONFIGS:
                return {}
            config = PRETRAIN_CONFIGS[model]
            n = int((load_mnist("test", config.image_size)[1] == config.subject).sum())
            return {"eval_size": (n, f"its subject, digit {config.subject}, has {n} test images")}
        if self.scorer is None:
            raise ValueError(f"workload {self.name!r} has no scorer")
        task = self.task()
        n_val, test = len(task.split("validation")), task.split("test")
        limits = {"eval_size": (n_val, f"its validation split has {n_val} rows")}
        if self.scorer.test_loss_rows and len(test) < n_val:  # its test loss reads them too
            limits["eval_size"] = (len(test), f"its test split has {len(test)} rows")
        limits["final_eval_size"] = self.scorer.final_limit(test)
        return limits


def _sizes(steps: int, batch: int, every: int, evals: int, final: int, length: int, new: int):
    return dict(
        steps=steps,
        batch_size=batch,
        eval_every=every,
        eval_size=evals,
        final_eval_size=final,
        max_length=length,
        max_new_tokens=new,
    )


_CLASSIFIER_PRESETS = {
    "default": _sizes(300, 16, 50, 512, 1500, 32, 0),
    "quick": _sizes(12, 16, 4, 32, 64, 32, 0),
    "gpu": _sizes(1000, 32, 100, 3000, 5500, 32, 0),
}
_CLINC = Workload(
    name="clinc150",
    kind="classification",
    default_model=MINILM_ID,
    metric="accuracy",
    metrics=("accuracy", "test_loss"),
    presets=_CLASSIFIER_PRESETS,
    eval_batch_size=128,
    scorer=scorers.CLASSIFICATION,
)
_CLINC_OOS = dataclasses.replace(
    _CLINC, name="clinc150-oos", metrics=("accuracy", "oos_recall", "test_loss")
)
_E2E = Workload(
    name="e2e",
    kind="causal",
    default_model=SMOLLM2_ID,
    metric="bleu",
    metrics=("bleu", "rouge_l", "nist", "test_loss"),
    presets={
        "default": _sizes(150, 8, 25, 64, 40, 128, 48),
        "quick": _sizes(4, 8, 2, 8, 4, 128, 16),
        "gpu": _sizes(800, 16, 100, 467, 630, 128, 64),
    },
    eval_batch_size=16,
    scorer=scorers.E2E,
)
_COMMONSENSE = Workload(
    name="commonsense",
    kind="causal",
    default_model=SMOLLM2_ID,
    metric="accuracy",
    metrics=("accuracy", *COMMONSENSE_TEST_SETS),
    presets={
        "default": _sizes(150, 8, 25, 64, 50, 256, 12),
        "quick": _sizes(4, 8, 2, 8, 2, 256, 12),
        "gpu": _sizes(1500, 16, 100, 500, 500, 256, 12),
    },
    eval_batch_size=16,
    scorer=scorers.COMMONSENSE,
)
_GSM8K = Workload(
    name="gsm8k",
    kind="causal",
    default_model=SMOLLM2_ID,
    metric="exact_match",
    metrics=("exact_match", "answer_loss"),
    presets={
        "default": _sizes(150, 8, 25, 64, 40, 384, 192),
        "quick": _sizes(4, 4, 2, 8, 2, 384, 24),
        "gpu": _sizes(1500, 16, 100, 500, 1319, 384, 256),
    },
    eval_batch_size=8,
    scorer=scorers.GSM8K,
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
        "default": _sizes(150, 8, 25, 128, 64, 0, 0),
        "quick": _sizes(4, 4, 2, 16, 8, 0, 0),
        # every test image of the held-out class (at least 892 per digit), 4x the samples
        "gpu": _sizes(600, 16, 50, 892, 256, 0, 0),
    },
    eval_batch_size=64,
)

#: Built-in task name -> workload.
WORKLOADS: dict[str, Workload] = {
    w.name: w for w in (_CLINC, _CLINC_OOS, _E2E, _COMMONSENSE, _GSM8K, _DIFFUSION)
}


@functools.lru_cache(maxsize=4)
def _user_task_at(data: str, columns: str, stamp: tuple) -> TaskData:
    from riemannlora.bench.userdata import user_task

    return user_task(data, columns)


def _user_task(data: str, columns: str = "") -> TaskData:
    """A user's task, read again when its files changed (size or modification time)."""
    from riemannlora.bench.data import source_stamp

    return _user_task_at(data, columns, source_stamp(data))


def get_workload(task: str, data: str = "", columns: str = "") -> Workload:
    """The workload of a built-in ``task``, or (``data`` given) of a user's data set: its kind
    (classification or causal LM) comes from the data's columns. Raises ``ValueError`` for an
    unknown task and :class:`riemannlora.bench.data.DataError` for bad data."""
    if data:
        kind = _user_task(data, columns).kind
        if kind == "classification":
            return dataclasses.replace(_CLINC, name="custom", data=data, columns=columns)
        return Workload(
            name="custom",
            kind="causal",
            default_model=SMOLLM2_ID,
            metric="test_loss",
            presets={
                "default": _sizes(150, 8, 25, 64, 256, 256, 0),
                "quick": _sizes(4, 4, 2, 8, 8, 256, 0),
            },
            eval_batch_size=16,
            scorer=scorers.TEST_LOSS,
            data=data,
            columns=columns,
        )
    if task not in WORKLOADS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(WORKLOADS)}")
    return WORKLOADS[task]


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


def load_base(
    workload: Workload, model: str, device: str, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: the pretrained model (``dtype``, eval mode) on ``device``. For
    ``diffusion``: a :class:`riemannlora.bench.diffusion.DenoisingLoss` around the pretrained UNet
    and, in place of the tokenizer, its :class:`riemannlora.bench.diffusion.DreamBoothData`."""
    if workload.kind == "diffusion":
        from riemannlora.bench.diffusion import DenoisingLoss, DreamBoothData, pretrained

        base = pretrained(model, device=device)
        return DenoisingLoss(base.unet).to(device).eval(), DreamBoothData(base)
    if workload.kind == "classification":
        labels = workload.task().labels
        return load_sequence_classifier(model, len(labels), dtype=dtype, device=device)
    return load_causal_lm(model, dtype=dtype, device=device)


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


#: Values of ``--targets`` besides a list of leaf names.
TARGET_CHOICES = ("all-linear", "attention")


def _is_attention_path(name: str) -> bool:
    return any("attn" in part or "attention" in part for part in name.split(".")[:-1])


def lora_target_modules(model: nn.Module, targets: str = "all-linear") -> list[str]:
    """The module names PEFT's ``target_modules`` gets for ``targets``:

    * ``"all-linear"``: the leaf names of every ``nn.Linear`` but the output heads
      (:func:`lora_target_names`);
    * ``"attention"``: the full names of the ``nn.Linear`` layers inside an attention block (a
      parent module named ``*attn*`` or ``*attention*``: Llama's ``self_attn.{q,k,v,o}_proj``,
      BERT's ``attention.self.{query,key,value}`` and ``attention.output.dense``);
    * ``"name,name,..."``: those leaf names, each of which must name an ``nn.Linear``.

    ``ValueError`` naming what the model has when nothing (or an unknown name) matches.
    """
    text = targets.strip()
    if text == "all-linear":
        return lora_target_names(model)
    linear = {
        name: name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in HEAD_NAMES
    }
    leaves = sorted(set(linear.values()))
    if text == "attention":
        chosen = sorted(name for name in linear if _is_attention_path(name))
        if not chosen:
            raise ValueError(
                "targets 'attention': no nn.Linear of this model sits inside a module named "
                f"*attn* or *attention*; name the layers instead (its Linear leaves: "
                f"{', '.join(leaves)})"
            )
        return chosen
    wanted = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(wanted) - set(leaves))
    if not wanted or unknown:
        raise ValueError(
            f"targets {targets!r}: use {' or '.join(map(repr, TARGET_CHOICES))} or "
            f"comma-separated names of this model's Linear layers ({', '.join(leaves)})"
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
        )
    return sorted(set(wanted))


def fixed_lora_targets(workload: Workload) -> tuple[str, ...] | None:
    """The LoRA targets a task always uses whatever ``--targets`` says (the diffusion task: the
    UNet's attention projections), or None where ``--targets`` decides."""
    if workload.kind != "diffusion":
        return None
    from riemannlora.bench.diffusion import LORA_TARGETS

    return LORA_TARGETS


def lora_config(
    workload: Workload, model: nn.Module, rank: int, targets: str = "all-linear", **init: Any
) -> Any:
    """The ``peft.LoraConfig`` of the benchmark: LoRA on ``targets``
    (:func:`lora_target_modules`), or on the task's :func:`fixed_lora_targets`;
    ``init``: extra fields such as ``init_lora_weights``."""
    from peft import LoraConfig, TaskType

    fixed = fixed_lora_targets(workload)
    if fixed is not None:
        return LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(fixed), **init
        )
    task_type = TaskType.SEQ_CLS if workload.kind == "classification" else TaskType.CAUSAL_LM
    return LoraConfig(
        task_type=task_type,
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=lora_target_modules(model, targets),
        **init,
    )


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


_EXAMPLES: dict[tuple, tuple[dict[str, Any], ...]] = {}


def _examples(
    workload: Workload, tokenizer: Any, split: str, n: int | None, max_length: int
) -> tuple:
    """Tokenized rows (the first ``n`` of ``split``), memoized per (task, data, tokenizer,
    split, n, max_length) so that the runs of a sweep tokenize once."""
    name = getattr(tokenizer, "name_or_path", id(tokenizer))
    key = (workload.name, workload.data, name, split, n, max_length)
    if key not in _EXAMPLES:
        if len(_EXAMPLES) >= 8:
            _EXAMPLES.pop(next(iter(_EXAMPLES)))
        task = workload.task()
        rows = task.split(split)[:n]
        _EXAMPLES[key] = tuple(tokenize_rows(task.kind, tokenizer, rows, max_length))
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
    with ``seed``. ``diffusion``: :meth:`riemannlora.bench.diffusion.DreamBoothData.train_batches`."""
    if workload.kind == "diffusion":
        yield from tokenizer.train_batches(steps, batch_size, seed)
        return
    examples = _examples(workload, tokenizer, "train", steps * batch_size, max_length)
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
    workload: Workload, tokenizer: Any, *, n: int, max_length: int, split: str = "validation"
) -> list[dict[str, torch.Tensor]]:
    """The first ``n`` rows of ``split`` in batches, sorted by length (less padding; the order
    does not change the mean)."""
    if workload.kind == "diffusion":
        return tokenizer.eval_batches(n, workload.eval_batch_size)
    examples = sorted(
        _examples(workload, tokenizer, split, n, max_length), key=lambda ex: len(ex["input_ids"])
    )
    collate = Collator.for_tokenizer(tokenizer)
    size = workload.eval_batch_size
    return [collate(list(examples[i : i + size])) for i in range(0, len(examples), size)]


def final_metrics(
    workload: Workload,
    model: nn.Module,
    tokenizer: Any,
    *,
    final_eval_size: int,
    max_length: int,
    max_new_tokens: int,
    eval_size: int = 64,
    scoring: str = "likelihood",
    progress: bool = True,
) -> dict[str, Any]:
    """The task's final metrics on its test split after training (its
    :attr:`Workload.scorer`; the diffusion task's own). e2e also returns ``"samples"``: the
    first three (prompt, generation) pairs."""
    if workload.kind == "diffusion":
        return tokenizer.final_metrics(model, final_eval_size)
    if workload.scorer is None:
        raise ValueError(f"workload {workload.name!r} has no scorer")

    def test_batches(n: int) -> list[dict[str, torch.Tensor]]:
        return eval_batches(workload, tokenizer, n=n, max_length=max_length, split="test")

    return workload.scorer.score(
        FinalEval(
            model=model,
            tokenizer=tokenizer,
            task=workload.task(),
            test_batches=test_batches,
            batch_size=workload.eval_batch_size,
            final_eval_size=final_eval_size,
            eval_size=eval_size,
            max_length=max_length,
            max_new_tokens=max_new_tokens,
            scoring=scoring,
            progress=progress,
        )
    )
