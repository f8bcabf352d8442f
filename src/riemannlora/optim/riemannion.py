r"""Riemannion (Muon on the fixed-rank manifold) and Riemannian SGD for PEFT LoRA.

Bogachev et al., "LoRA meets Riemannion: Muon Optimizer for Parametrization-independent Low-Rank
Adapters", arXiv 2507.12142. Each adapted layer's effective delta ``X = U V^T`` (rank r, U with
orthonormal columns) is optimized as a point of the manifold of rank-r matrices, so the
trajectory of X does not depend on how it is factored. The step's math, with ``G = dL/dW``
known only through ``G Q`` and ``G^T U`` (see :mod:`riemannlora.manifold`), is
:mod:`riemannlora.core.manifold_step`::

    M   = beta P_X(M_prev) + (1 - tau) P_X(G)         transport by projection, heavy ball
    D   = beta M + (1 - tau) P_X(G)  (Nesterov)  or  M
    X  <- best rank-r approximation of  X - lr (P_X(msign(D)) + wd' X)   (Riemannion)

with ``tau = 0`` for Riemannion and ``tau = beta`` for Riemannian SGD (which skips the msign).

The optimizer classes here validate the arguments, convert the model
(:func:`riemannlora.to_manifold`), own the state and walk the param groups. Each step plans
the manifold layers in groups of equal shape (:mod:`riemannlora.optim._plan`: the grouping,
the buffers and the stacked momentum, kept between steps as one cache object per param group
with one invalidation rule), checks the gradients for NaN/Inf before anything changes
(``nonfinite``, :mod:`riemannlora.optim.guard`; a structured group through the sums of the
stacked gradient blocks the step reads, one reduction per group), and runs the core step on
each group (:mod:`riemannlora.optim._group_step`). The momentum lives in ``self.state`` as
per-layer views of the stacked buffers (:mod:`riemannlora.optim._momentum`), so
``state_dict()``/``load_state_dict()`` resume bit for bit. Factors sharded by FSDP2
(DTensors) take :func:`riemannlora.distributed.manifold_step_sharded`, the same step up to
summation order. A step with ``lr == 0`` (e.g. the first warmup step) updates the momentum and
leaves the point exactly as it is.

Every other trainable parameter (biases, heads, ``modules_to_save``) is updated by
``torch.optim.AdamW``'s own state initialization and functional kernel, bitwise as
``torch.optim.AdamW`` would.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from riemannlora.core.manifold_step import (
    SCALE_LR_CHOICES,
    Momentum,
    StepConfig,
    lr_multiplier,
    manifold_step,
)
from riemannlora.manifold.holders import track
from riemannlora.manifold.hosts import patch_host
from riemannlora.manifold.layers import convert
from riemannlora.optim._group_step import run_plan
from riemannlora.optim._momentum import MOMENTUM_KEYS, POINT_KEY, point_fingerprint
from riemannlora.optim._packing import pack_factors_
from riemannlora.optim._plan import LayerGroup, ManifoldPlan, RegistrationWatch
from riemannlora.optim.functional import adamw_from_group
from riemannlora.optim.guard import NonFiniteGuard
from riemannlora.optim.validation import (
    check_beta,
    check_betas,
    check_bool,
    check_group_hyperparameters,
    check_manifold_state_dict,
    check_number,
)

__all__ = ["SCALE_LR_CHOICES", "RiemannianSGD", "Riemannion", "lr_multiplier", "manifold_step"]

#: keys of a manifold param group that only Riemannion has (tells its state from RiemannianSGD's)
_CLASS_KEYS = ("store_orthogonalized", "scale_lr")


class _ManifoldOptimizer(NonFiniteGuard, torch.optim.Optimizer):
    """Shared plumbing of :class:`Riemannion` and :class:`RiemannianSGD`."""

    _orthogonalize: bool = True
    _damped: bool = False

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        momentum: float,
        weight_decay: float,
        nesterov: bool,
        extra: dict[str, Any],
        adamw_lr: float | None,
        adamw_betas: tuple[float, float],
        adamw_eps: float,
        adamw_weight_decay: float,
        generator: torch.Generator | None,
        nonfinite: str = "skip",
    ) -> None:
        cls = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{cls} takes the model itself (e.g. the peft.PeftModel), which it converts to "
                f"manifold form; got {type(model).__name__}. A list of parameters cannot work: "
                "the optimizer must rewrite the LoRA layers."
            )
        check_number("lr", lr, low=0.0, strict=True)
        check_beta("momentum", momentum)
        check_number("weight_decay", weight_decay, low=0.0)
        check_bool("nesterov", nesterov)
        if nesterov and not momentum:
            raise ValueError("nesterov=True requires momentum > 0")
        if adamw_lr is not None:
            check_number("adamw_lr", adamw_lr, low=0.0, strict=True)
        check_betas("adamw_betas", adamw_betas)
        check_number("adamw_eps", adamw_eps, low=0.0)
        check_number("adamw_weight_decay", adamw_weight_decay, low=0.0)
        self._init_guard(nonfinite)

        layers = convert(model, generator=generator, what=cls)
        patch_host(model)
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            # no process group, so no DDP/FSDP wrapper yet (DDP built before a change of a
            # parameter's layout reduces its gradients wrongly; FSDP2 takes only contiguous
            # parameters): the factors packed, lora_B column-major
            pack_factors_(layers)
        in_layers = {id(p) for layer in layers for p in (layer.a, layer.b)}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in in_layers]
        defaults = {
            "lr": float(lr),
            "momentum": float(momentum),
            "weight_decay": float(weight_decay),
            "nesterov": nesterov,
            **extra,
        }
        groups: list[dict[str, Any]] = [
            {
                "params": [p for layer in layers for p in (layer.a, layer.b)],
                "manifold": True,
                "layer_names": [layer.name for layer in layers],
                "ranks": [layer.rank for layer in layers],
                "offsets": [layer.offset for layer in layers],
            }
        ]
        #: the settings of groups of plain parameters (AdamW), also for add_param_group
        self._adamw_defaults: dict[str, Any] = {
            "manifold": False,
            "lr": float(lr if adamw_lr is None else adamw_lr),
            "betas": tuple(float(b) for b in adamw_betas),
            "eps": float(adamw_eps),
            "weight_decay": float(adamw_weight_decay),
            "amsgrad": False,
            "maximize": False,
            "foreach": None,
            "capturable": False,
            "differentiable": False,
            "fused": None,
            "decoupled_weight_decay": True,
        }
        if others:
            groups.append({"params": others, **self._adamw_defaults})
        super().__init__(groups, defaults)
        track(self)
        # where each layer's factors live (module dict, adapter): the per-step check that they
        # were not replaced, without nn.Module.__getattr__
        self._layers = layers
        self._slots = (
            [layer.module._modules for layer in layers],
            [layer.adapter for layer in layers],
        )
        self._layer_param_ids = in_layers
        self._built = True
        names = {id(p): n for n, p in model.named_parameters()}
        self._names = {
            id(p): names.get(id(p), f"parameter of shape {tuple(p.shape)}") for p in others
        }
        for layer in layers:
            self._names[id(layer.a)] = f"{layer.name}.lora_A"
            self._names[id(layer.b)] = f"{layer.name}.lora_B"
        #: the step plan of each manifold param group (by index), kept while it is reusable
        self._plans: dict[int, ManifoldPlan] = {}
        self._watch = RegistrationWatch()
        #: torch's AdamW for the plain parameters' groups (created at their first step)
        self._adamw: torch.optim.AdamW | None = None

    def train(self) -> None:
        """Called by ``transformers.Trainer`` (through Accelerate) at every training step, as
        for schedule-free optimizers; nothing changes. The first call warns when the Trainer is
        not riemannlora's and clips gradients (``max_grad_norm > 0``, the default of Trainer
        and TRL): it would clip by the Euclidean norm of every gradient block of the converted
        layers, blocks the step ignores included, instead of the Riemannian gradient's."""
        if getattr(self, "_trainer_checked", False):
            return
        self._trainer_checked = True
        if getattr(self, "_riemannlora_trainer", False):
            return
        trainer = _calling_trainer()
        max_norm = getattr(getattr(trainer, "args", None), "max_grad_norm", None)
        if trainer is not None and max_norm:
            warnings.warn(
                f"{type(trainer).__name__} clips gradients by their Euclidean norm "
                f"(max_grad_norm={max_norm}), the wrong norm for {type(self).__name__}: use "
                "riemannlora's RiemannTrainer / RiemannSFTTrainer, or max_grad_norm=0 and "
                "riemannlora.clip_grad_norm_",
                UserWarning,
                stacklevel=3,
            )

    def eval(self) -> None:
        """The counterpart of :meth:`train` (nothing to do)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of plain parameters (e.g. a new head), updated by AdamW with this
        optimizer's ``adamw_*`` settings unless the group sets its own (``lr``, ``betas``,
        ``eps``, ``weight_decay``). LoRA layers cannot be added: they are converted to
        manifold form when the optimizer is created, so create a new optimizer instead."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if not self.__dict__.get("_built", False):  # the constructor's own groups
            super().add_param_group(param_group)
            return
        if param_group.get("manifold"):
            raise ValueError(
                "manifold (LoRA) groups cannot be added to an existing optimizer: the layers are "
                "converted when it is created; create a new optimizer for the whole model"
            )
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if any(id(p) in self._layer_param_ids for p in params):
            raise ValueError("these parameters are factors of a manifold layer already optimized")
        super().add_param_group({**self._adamw_defaults, **param_group, "manifold": False})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step (``closure`` re-evaluates the model, as in torch).

        Nothing changes when a gradient is not finite (``nonfinite="skip"``: ``skipped_steps``
        goes up; ``"raise"``: :class:`~riemannlora.optim.guard.NonFiniteError`)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for k, group in enumerate(self.param_groups):  # e.g. a scheduler's nan, before any work
            check_group_hyperparameters(k, group)
        plans = {
            k: self._plan(k, group)
            for k, group in enumerate(self.param_groups)
            if group["manifold"]
        }
        # what the guard checks: the raw gradients, except that a structured group of layers is
        # checked through the sums of its stacked gradient blocks (the only parts of the
        # gradients the step reads), a single reduction instead of one per tensor
        tensors: list[Tensor] = []
        labels: list[Any] = []
        like: list[Tensor] = []
        for k, group in enumerate(self.param_groups):
            if k not in plans:
                ps = [p for p in group["params"] if p.grad is not None]
            else:
                ps = []
                for g in plans[k].groups:
                    if g.ws is None:
                        ps += [p for pair in zip(g.A, g.B) for p in pair]
                        continue
                    tensors.append(torch.stack([g.ws.GQt.sum(), g.ws.GtUt.sum()]))
                    labels.append(g)
            tensors += [p.grad for p in ps]
            labels += ps
            like += ps

        def names() -> list[str]:
            return [
                self._bad_group_grads(x)
                if isinstance(x, LayerGroup)
                else f"gradient of {self._names.get(id(x), 'a parameter')}"
                for x in labels
            ]

        if not self._step_allowed(tensors, names, sharded_like=like):
            return loss
        for plan in plans.values():
            run_plan(plan, self.state, self._check_transport)
        self._adamw_step([g for g in self.param_groups if not g["manifold"]])
        return loss

    def _plan(self, index: int, group: dict[str, Any]) -> ManifoldPlan:
        """The plan of a manifold param group, the last step's while it is reusable, with this
        step's settings and the gradient blocks of its structured groups gathered. Raises
        before anything changes on replaced factors or a layer with only one gradient."""
        plan = self._plans.get(index)
        if plan is None or not plan.reusable(group["params"], self.state, self._watch, self._slots):
            arenas = {} if plan is None else plan.arenas
            plan = ManifoldPlan.build(group, self._layers, self.state, self._watch, arenas)
            self._plans[index] = plan
        lr, wd, beta = float(group["lr"]), group["weight_decay"], group["momentum"]
        for g in plan.groups:
            mult = lr_multiplier(group.get("scale_lr"), g.key.m, g.key.n)
            g.cfg = StepConfig(
                lr=lr * mult,
                # decoupled decay with the unscaled lr, as torch's Muon: X (1 - lr wd) - step_lr D
                # (written as wd / mult so that lr = 0, e.g. at the start of a warmup, works)
                weight_decay=wd / mult,
                momentum=beta,
                dampening=beta if self._damped else 0.0,
                nesterov=group["nesterov"],
                orthogonalize=self._orthogonalize,
                store_orthogonalized=group.get("store_orthogonalized", False),
            )
            if g.ws is not None:
                g.ws.gather_gradients(g.A, g.B, g.key.rank)
        return plan

    def _bad_group_grads(self, g: LayerGroup) -> str:
        """Names the factors of a structured group whose gradient blocks are not finite (the
        slow path of a failed check)."""
        r = g.key.rank
        blocks = [(a, a.grad[r : 2 * r]) for a in g.A] + [(b, b.grad[:, :r]) for b in g.B]
        bad = [
            self._names.get(id(p), "a LoRA factor")
            for p, block in blocks
            if not bool(torch.isfinite(block).all())
        ]
        return "gradient of " + (", ".join(bad) if bad else f"one of {len(blocks)} LoRA factors")

    @property
    def _momentum_cache(self) -> dict[Any, Momentum]:
        """The stacked momentum the plans keep, per structured group that has one."""
        return {
            g.key: g.mom
            for plan in self._plans.values()
            for g in plan.groups
            if g.ws is not None and g.mom is not None
        }

    @staticmethod
    def _check_transport(mom: Momentum, Ut: Tensor, Qt: Tensor) -> Momentum:
        """Computes ``cu = Lb^T U``, ``cq = Rb^T Q`` of the current point; the momentum's own
        (e.g. from a state dict) are kept, with the one-product transport, when they agree with
        them to round-off (``U = Lb cu``, ``Q = Rb cq``), and replaced otherwise (in the
        returned momentum: the buffers whose views the state holds are not touched)."""
        cu, cq = mom.transport(Ut, Qt)
        if mom.cu is not None and mom.cq is not None and mom.in_span:
            eps = torch.finfo(cu.dtype).eps
            tol = 4 * eps * max(Ut.shape[-1], Qt.shape[-1])
            if bool(
                torch.stack([(cu - mom.cu).abs().amax(), (cq - mom.cq).abs().amax()]).amax() <= tol
            ):
                return mom
        return replace(mom, cu=cu, cq=cq, in_span=False)

    def _adamw_step(self, groups: list[dict[str, Any]]) -> None:
        """``torch.optim.AdamW``'s update of the groups of plain parameters, bitwise: the
        state initialization of a contained AdamW whose ``state`` is ``self.state`` (so the
        state is exactly torch's and ``state_dict`` holds it), then torch's functional
        kernel."""
        if not groups:
            return
        if self._adamw is None:
            self._adamw = torch.optim.AdamW([dict(g) for g in groups])
        self._adamw.state = self.state
        for group in groups:
            lists: tuple[list[Tensor], ...] = ([], [], [], [], [], [])
            has_complex = self._adamw._init_group(group, *lists)
            if lists[0]:
                adamw_from_group(group, *lists, has_complex)

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, plus, per layer whose momentum holds transport coordinates, the
        fingerprint of the point they belong to (``transport_point`` in the state of
        ``lora_B``), so that a run resumed from it steps bit for bit as this one."""
        out = super().state_dict()
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for layer in self._layers:
            st = self.state.get(layer.b)
            i = index.get(id(layer.b))
            if st and i is not None and "transport_left" in st:
                out["state"][i] = {
                    **out["state"][i],
                    POINT_KEY: point_fingerprint(layer.a, layer.b),
                }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict after checking it was saved by this optimizer class for the same
        manifold layers and parameters, with finite values of the right shapes (nothing is
        loaded otherwise); the momentum factors keep their saved (compute) dtype."""
        check_manifold_state_dict(
            self,
            state_dict,
            _CLASS_KEYS,
            MOMENTUM_KEYS,
            lambda p: self._names.get(id(p), f"parameter of shape {tuple(p.shape)}"),
        )
        groups = state_dict["param_groups"]
        super().load_state_dict(state_dict)
        for mine, saved in zip(self.param_groups, groups):
            if not mine["manifold"]:
                continue
            for idx, p in zip(saved["params"], mine["params"]):
                for key, value in state_dict["state"].get(idx, {}).items():
                    if key in MOMENTUM_KEYS or key == POINT_KEY:  # as saved (torch casts)
                        self.state[p][key] = value.to(device=p.device)


class Riemannion(_ManifoldOptimizer):
    r"""Riemannion: Muon's orthogonalized momentum on the manifold of rank-r matrices.

    For each LoRA layer, with ``X = U V^T`` the effective delta and ``P_X`` the projection onto
    its tangent space::

        M_t   = beta P_X(M_{t-1}) + P_X(G_t)
        D_t   = beta M_t + P_X(G_t)   if nesterov  else  M_t
        X    <- rank-r truncated SVD of  X (1 - lr wd) - lr_l P_X(msign(D_t))

    with ``lr_l = lr * 0.2 sqrt(max(m, n))`` (``scale_lr="match_adamw"``, the default) or
    ``lr_l = lr`` (``scale_lr=None``, the paper's convention). The trajectory of X is the same
    for every factorization of the starting point.

    Learning rate: by default ``lr`` is on AdamW's scale -- the lr you would give
    ``torch.optim.AdamW`` for the same LoRA model works here, and the other trainable
    parameters (a head) get AdamW at that same lr. The per-layer factor ``0.2 sqrt(max(m, n))``
    (Moonlight's rule) gives the orthogonalized step the RMS of an AdamW update. Measured on
    CLINC150/MiniLM and E2E/SmolLM2 (BENCHMARKS.md), the lr selected on validation data was
    AdamW's own with the factor, and 6x larger without it. The paper's lrs (1e-4 for
    Llama-3-8B) are for ``scale_lr=None``.

    Side effect: the model is converted to manifold form (:func:`riemannlora.to_manifold`,
    idempotent) -- create the optimizer *after* :func:`riemannlora.init_loi` if you use it, and
    use :func:`riemannlora.export_adapter` (or ``model.save_pretrained``, which is redirected to
    it) to save a standard PEFT adapter.

    Gradient clipping: use :func:`riemannlora.clip_grad_norm_` (``RiemannTrainer`` does). It clips
    by the norm of the Riemannian gradient ``P_X(G)``; ``torch.nn.utils.clip_grad_norm_`` over
    the converted model also counts gradient blocks the optimizer ignores (``dL/dU``, offsets).

    Distributed: under DDP nothing is needed (convert the model, e.g. by creating the optimizer,
    *before* wrapping it). Under FSDP2 the factors may be sharded DTensors: the step is the
    single-process step up to summation order (:mod:`riemannlora.distributed`); convert the model
    with :func:`riemannlora.to_manifold` (or :func:`riemannlora.init_loi`) before
    ``fully_shard``.

    Layout and changes between steps: created without a ``torch.distributed`` process group,
    the optimizer packs the factors of the layers of each shape into two buffers (the same
    Parameters and values; each ``lora_A`` becomes a contiguous view of one, each ``lora_B`` a
    column-major view of the other, and its gradient follows), so that the step reads and
    writes the point in place with one product per buffer instead of gathering and copying
    back every layer. ``model.state_dict()`` returns the factors as standalone contiguous
    copies (so ``safetensors.torch.save_file``, Accelerate's checkpoints, ``save_pretrained``
    and ``torch.save`` store every factor whole); ``named_parameters()`` yields the views,
    which share storage: clone them before handing them to ``safetensors`` directly.
    Factors may be changed between steps through the parameters (in-place ops,
    ``load_state_dict``, ``p.data = ...``): the step reads them anew and recomputes the
    momentum's transport. A change written through ``p.data`` in place (``p.data.copy_(...)``),
    which no version counter records, is read too, but the momentum is then transported as if
    the factors had not changed for that one step.

    Args:
        model: the PEFT model (``peft.PeftModel``) with LoRA on Linear layers.
        lr: learning rate (> 0), on AdamW's scale by default (see above; the paper's 1e-4 for
            Llama-3-8B is with ``scale_lr=None``). LR schedulers work as usual.
        momentum: beta in ``[0, 1)`` (0.9).
        weight_decay: decoupled weight decay of X (``>= 0``; paper: 0.00316).
        nesterov: Nesterov-style update ``beta M + grad``.
        store_orthogonalized: keep ``P_X(msign(D_t))`` as the momentum (the paper's algorithm
            box) instead of the raw ``M_t`` (default, as Muon).
        scale_lr: ``"match_adamw"`` (default: ``lr * 0.2 sqrt(max(m, n))`` per layer, so that
            AdamW's lr transfers) or None (``lr`` as is: the manifold step's own scale).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: ``torch.optim.AdamW`` settings of
            all other trainable parameters (``adamw_lr`` defaults to ``lr``).
        generator: draws the random orthonormal U of adapters converted from ``lora_B == 0``.
        nonfinite: what a step with NaN/Inf gradients does: ``"skip"`` it (default; nothing
            changes, ``skipped_steps`` goes up), ``"raise"``, or ``"off"`` (no check). See
            :mod:`riemannlora.optim.guard`.
    """

    _orthogonalize = True
    _damped = False

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        nesterov: bool = False,
        store_orthogonalized: bool = False,
        scale_lr: str | None = "match_adamw",
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        generator: torch.Generator | None = None,
        nonfinite: str = "skip",
    ) -> None:
        check_bool("store_orthogonalized", store_orthogonalized)
        if scale_lr not in SCALE_LR_CHOICES:
            raise ValueError(f"scale_lr must be one of {SCALE_LR_CHOICES}, got {scale_lr!r}")
        super().__init__(
            model,
            lr,
            momentum,
            weight_decay,
            nesterov,
            {"store_orthogonalized": store_orthogonalized, "scale_lr": scale_lr},
            adamw_lr,
            adamw_betas,
            adamw_eps,
            adamw_weight_decay,
            generator,
            nonfinite,
        )


#: RiemannianSGD's default AdamW lr for the parameters outside the LoRA layers (heads)
DEFAULT_HEAD_LR = 1e-3


class RiemannianSGD(_ManifoldOptimizer):
    r"""Riemannian SGD with momentum on the manifold of rank-r matrices (no orthogonalization)::

        M_t = beta P_X(M_{t-1}) + (1 - beta) P_X(G_t)
        D_t = beta M_t + (1 - beta) P_X(G_t)   if nesterov  else  M_t
        X  <- rank-r truncated SVD of  X (1 - lr wd) - lr D_t

    ``momentum=0`` is plain Riemannian gradient descent. Everything else (conversion, other
    parameters, state, arguments) is as :class:`Riemannion`, except that the other trainable
    parameters' AdamW lr (``adamw_lr``) defaults to :data:`DEFAULT_HEAD_LR` (1e-3, torch's
    AdamW default), not to ``lr``: SGD-scale lrs (0.1-1) wreck a head under AdamW (measured on
    CLINC150 / MiniLM, 90 steps, lr 0.1: validation loss 5.29 with the head at lr, 4.31 at
    1e-3; lr 0.3: 924 vs 4.27; ``benchmarks/head_lr.py``). A new classifier head trains best at
    about 1e-2 to 3e-2 there: pass ``adamw_lr`` for it.
    """

    _orthogonalize = False
    _damped = True

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        nesterov: bool = False,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        generator: torch.Generator | None = None,
        nonfinite: str = "skip",
    ) -> None:
        super().__init__(
            model,
            lr,
            momentum,
            weight_decay,
            nesterov,
            {},
            DEFAULT_HEAD_LR if adamw_lr is None else adamw_lr,
            adamw_betas,
            adamw_eps,
            adamw_weight_decay,
            generator,
            nonfinite,
        )


def _calling_trainer(depth: int = 6) -> Any:
    """The ``transformers.Trainer`` (duck-typed: ``args.max_grad_norm`` and ``_clip_grad_norm``)
    among the callers of the caller, or None."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if hasattr(owner, "_clip_grad_norm") and hasattr(
            getattr(owner, "args", None), "max_grad_norm"
        ):
            return owner
        frame = frame.f_back
    return None
