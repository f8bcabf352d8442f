"""``transformers.Trainer`` with riemannlora optimizers.

The recommended route is :class:`RiemannTrainer`, a ``Trainer`` whose ``create_optimizer()``
builds the optimizer from the model itself::

    from riemannlora.integrations.trainer import RiemannTrainer

    trainer = RiemannTrainer(
        model=peft_model,
        args=TrainingArguments(output_dir="out", learning_rate=2e-4, lr_scheduler_type="cosine"),
        train_dataset=train,
        optimizer_factory=lambda model: riemannlora.ScaledAdamW(model, lr=2e-4),  # optional
    )
    trainer.train()                                  # later: trainer.train(resume_from_checkpoint=True)

Without ``optimizer_factory`` it builds :func:`default_optimizer`, a ``ScaledAdamW`` with
``learning_rate``, ``adam_beta1/2``, ``adam_epsilon`` and ``weight_decay`` from the
``TrainingArguments``. A factory's ``lr`` is the base rate that Trainer's scheduler
(``lr_scheduler_type``, ``warmup_*``) then scales, as it would scale ``learning_rate``. Only this
route works with every launcher: ``create_optimizer()`` is called by Trainer itself, after
Accelerate has set up the model, and the factory receives the unwrapped model, where the LoRA
pairs can be found. Under FSDP2, Accelerate then swaps the optimizer's parameters for their
sharded DTensors, which the optimizers handle exactly (:mod:`riemannlora.distributed`). FSDP1's
flattened parameters cannot be paired; use FSDP2 (``fsdp_version: 2``).

The plain route also works (not under FSDP, which Trainer refuses): build the optimizer and
scheduler yourself and pass ``Trainer(..., optimizers=(opt, sched))``. Then ``learning_rate`` and
``lr_scheduler_type`` are ignored.

Either way, checkpoints (``save_steps``) store the optimizer's ``state_dict()`` in
``optimizer.pt``, and ``resume_from_checkpoint`` restores it through the optimizer's validating
``load_state_dict``. ``trainer.save_model()`` writes a standard PEFT adapter. Gradient
accumulation and ``bf16`` autocast happen before ``step()`` and need nothing special. A step
that the optimizer skips because of non-finite gradients is logged as ``skipped_steps``.
Trainer still advances its LR scheduler for that step.

Riemannion / RiemannianSGD (manifold form, :mod:`riemannlora.manifold`):

* The optimizer converts the model when it is created. Trainer creates it before wrapping the
  model (DDP, and FSDP2 under Accelerate), so the factory route needs nothing more; with the
  plain route the optimizer exists before the Trainer anyway. ``riemannlora.init_loi`` must run
  before the optimizer is created, e.g. on a batch of ``trainer.get_train_dataloader()``
  (:func:`first_batch`).
* Checkpoints hold the adapter exported by :func:`riemannlora.export_adapter` (a standard PEFT
  adapter, plus each layer's row basis). ``resume_from_checkpoint`` reads it back into the
  manifold form bit for bit (:func:`riemannlora.load_exported_adapter`: here in
  ``_load_from_checkpoint``, which converts a fresh model first; on the plain route through
  the converted model's redirected ``load_adapter``), so a resumed run equals the
  uninterrupted one. ``trainer.save_model()`` writes the standard adapter.
* ``max_grad_norm``: this Trainer clips (and logs ``grad_norm``) by the norm of the Riemannian
  gradient, :func:`riemannlora.clip_grad_norm_`. A plain ``Trainer`` clips by the Euclidean
  norm of every gradient block of the converted layers, including blocks the optimizer
  ignores; with the plain route pass ``max_grad_norm=0`` and clip yourself, or use this class.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from riemannlora.clip import clip_grad_norm_, unwrap_optimizer
from riemannlora.diagnostics import DiagnosticsCallback
from riemannlora.distributed import is_dtensor
from riemannlora.loi import LoiInfo, init_loi
from riemannlora.manifold import is_exported_adapter, load_exported_adapter
from riemannlora.optim import RiemannianSGD, Riemannion, ScaledAdamW
from riemannlora.optim.validation import SHARDED_ROUTE

__all__ = [
    "RiemannTrainer",
    "RiemannTrainerMixin",
    "default_optimizer",
    "first_batch",
    "init_loi_from_trainer",
]

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


def default_optimizer(model: nn.Module, args: TrainingArguments) -> ScaledAdamW:
    """``ScaledAdamW`` with the AdamW hyper-parameters of ``args`` (lr, betas, eps, decay)."""
    return ScaledAdamW(
        model,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
    )


def first_batch(trainer: Trainer) -> dict[str, Any]:
    """The first training batch of ``trainer``, collated and on the model's device, e.g. for
    ``riemannlora.init_loi(model, lambda: trainer.compute_loss(model, first_batch(trainer)))``
    before ``trainer.train()``. Uses a fresh dataloader; the global RNG is left as it was."""
    state = torch.random.get_rng_state()
    try:
        batch = next(iter(trainer.get_train_dataloader()))
    finally:
        torch.random.set_rng_state(state)
    return trainer._prepare_inputs(batch)


def _manifold_optimizer(optimizer: Any) -> Any:
    """The riemannlora manifold optimizer inside ``optimizer`` (Accelerate wraps it), or None."""
    inner = unwrap_optimizer(optimizer)
    return inner if isinstance(inner, Riemannion | RiemannianSGD) else None


class RiemannTrainerMixin:
    """What makes a ``transformers.Trainer`` (or a subclass such as TRL's ``SFTTrainer``) train
    with a riemannlora optimizer; mix it in *before* the trainer class (see
    :class:`RiemannTrainer` and :class:`riemannlora.integrations.trl.RiemannSFTTrainer`).

    * ``create_optimizer()`` builds the optimizer from the unwrapped model with
      ``optimizer_factory`` (default :func:`default_optimizer`);
    * checkpoints of a model in manifold form are read back bit for bit;
    * ``max_grad_norm`` clips, and ``grad_norm`` logs, the Riemannian gradient's norm for
      Riemannion / RiemannianSGD;
    * the optimizer's ``skipped_steps`` are logged.
    """

    optimizer: Any
    args: Any
    model: Any
    accelerator: Any

    def __init__(
        self, *args: Any, optimizer_factory: OptimizerFactory | None = None, **kwargs: Any
    ):
        if optimizer_factory is not None and not callable(optimizer_factory):
            raise TypeError(
                f"optimizer_factory must be callable (model -> optimizer), got "
                f"{type(optimizer_factory).__name__}"
            )
        for key in ("optimizers", "optimizer_cls_and_kwargs"):
            if kwargs.get(key) not in (None, (None, None)):
                raise ValueError(
                    f"{type(self).__name__} builds the optimizer with optimizer_factory; do not "
                    f"pass {key!r} too (or use the plain trainer class with optimizers=...)"
                )
        super().__init__(*args, **kwargs)
        self.optimizer_factory = optimizer_factory

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build the optimizer from the unwrapped model (once; Trainer calls this itself)."""
        if self.optimizer is None:
            if getattr(self, "is_deepspeed_enabled", False):
                raise ValueError(f"{type(self).__name__}: DeepSpeed is enabled. {SHARDED_ROUTE}")
            target = self.accelerator.unwrap_model(self.model if model is None else model)
            if self.optimizer_factory is None:
                optimizer = default_optimizer(target, self.args)
            else:
                optimizer = self.optimizer_factory(target)
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(
                    f"optimizer_factory returned {type(optimizer).__name__}, not a "
                    "torch.optim.Optimizer"
                )
            optimizer._riemannlora_trainer = True  # clipping is handled here: no warning
            self.optimizer = optimizer
        return self.optimizer

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None):
        """Checkpoints of a model in manifold form (an adapter written by
        :func:`riemannlora.export_adapter`) are read back bit for bit, converting a fresh model
        first; everything else (FSDP's sharded checkpoints included) as ``Trainer`` does."""
        target = self.model if model is None else model
        target = self.accelerator.unwrap_model(target)
        sharded = any(is_dtensor(p) for p in target.parameters())  # FSDP: its own checkpoints
        if (
            is_exported_adapter(resume_from_checkpoint)
            and hasattr(target, "peft_config")
            and not sharded
        ):
            adapters = getattr(target, "active_adapters", None) or ["default"]
            load_exported_adapter(target, resume_from_checkpoint, adapters[0])
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        """``max_grad_norm`` by the norm of the Riemannian gradient for Riemannion /
        RiemannianSGD (:func:`riemannlora.clip_grad_norm_`), as ``Trainer`` otherwise."""
        inner = _manifold_optimizer(self.optimizer)
        if inner is None:
            return super()._clip_grad_norm(model)  # type: ignore[misc]
        self.accelerator.unscale_gradients()
        return clip_grad_norm_(inner, self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        """The logged ``grad_norm``: the Riemannian gradient's for the manifold optimizers."""
        inner = _manifold_optimizer(self.optimizer)
        if grad_norm is None and inner is not None:
            self.accelerator.unscale_gradients()
            grad_norm = clip_grad_norm_(inner, float("inf"))
        return super()._get_grad_norm(model, grad_norm=grad_norm)  # type: ignore[misc]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's logging, plus the optimizer's ``skipped_steps`` when it has any."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # AcceleratedOptimizer
        skipped = getattr(inner, "skipped_steps", 0)
        if skipped:
            logs = {**logs, "skipped_steps": skipped}
        for callback in self.callback_handler.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, DiagnosticsCallback):  # before every logger sees the logs
                logs = {**logs, **callback.take_pending()}
        super().log(logs, start_time)  # type: ignore[misc]


class RiemannTrainer(RiemannTrainerMixin, Trainer):
    """A ``transformers.Trainer`` that trains with a riemannlora optimizer
    (:class:`RiemannTrainerMixin`).

    Args:
        *args, **kwargs: as ``transformers.Trainer`` (except ``optimizers`` /
            ``optimizer_cls_and_kwargs``, which would bypass the factory).
        optimizer_factory: ``model -> optimizer``, called once with the unwrapped model;
            default: :func:`default_optimizer` from the ``TrainingArguments``.
    """


def init_loi_from_trainer(trainer: Trainer, **kwargs: Any) -> LoiInfo:
    """:func:`riemannlora.init_loi` on the trainer's (unwrapped) model, from its first training
    batch and its own loss (``trainer.compute_loss``: TRL's SFT loss for an ``SFTTrainer``, the
    completion tokens only where it masks the prompt). Call it before ``trainer.train()`` (the
    optimizer must not exist yet). ``kwargs`` go to ``init_loi`` (``generator``,
    ``power_iters``, ...). The per-batch metrics TRL records inside ``compute_loss`` during the
    passes are discarded (they are not training batches)."""
    if trainer.optimizer is not None:
        raise RuntimeError(
            "init_loi_from_trainer must run before the trainer creates its optimizer (before "
            "trainer.train()): LOI rebuilds the LoRA layers the optimizer would hold"
        )
    model = trainer.accelerator.unwrap_model(trainer.model)
    batch = first_batch(trainer)
    metrics = copy.deepcopy(getattr(trainer, "_metrics", None))
    try:
        return init_loi(model, lambda: trainer.compute_loss(model, dict(batch)), **kwargs)
    finally:
        if metrics is not None:
            trainer._metrics = metrics
