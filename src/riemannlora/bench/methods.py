"""The optimizers the benchmark compares, with their hyper-parameters and learning rates.

Every method trains the same PEFT LoRA model (rank r, ``lora_alpha = 2 r``, no dropout, LoRA on
every linear layer but the head) on the same batches from the same seed. Weight decay is 0
everywhere, no gradient clipping; every param group's learning rate decays linearly from its
initial value to 0 over the run (:mod:`riemannlora.bench.runner`). The peak learning rate
``lr`` is the only tuned knob. Methods and their fixed settings:

``sgd``
    ``torch.optim.SGD(lr)`` on every trainable parameter (no momentum).
``adamw``
    ``torch.optim.AdamW(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)``.
``loraplus``
    LoRA+: ``peft.optimizers.create_loraplus_optimizer(AdamW, lr, loraplus_lr_ratio=16)``
    (``lora_B`` and 1-D parameters at ``16 lr``).
``peft-riemannian``
    ``peft.optimizers.create_riemannian_optimizer(AdamW, lr, reg=1e-2)``: PEFT's scaled AdamW
    (``pinv`` preconditioner, LoRA scaling ignored).
``muon``
    ``torch.optim.Muon(lr, momentum=0.95, nesterov=True, weight_decay=0,
    adjust_lr_fn="match_rms_adamw")`` on the 2-D LoRA factors (each factor orthogonalized
    separately), ``AdamW(lr)`` on the other parameters (the classifier head).
``scaled-sgd``
    ``riemannlora.ScaledSGD(lr)`` (reg 1e-6, scale-aware, no momentum).
``scaled-adamw``
    ``riemannlora.ScaledAdamW(lr)`` (reg 1e-6, scale-aware, AdamW betas/eps).
``riemannian-sgd``
    ``riemannlora.RiemannianSGD(lr, momentum=0.9)`` on the fixed-rank manifold; the other
    parameters (head) use AdamW at the task's ``adamw`` default lr (an SGD-scale lr would
    not suit Adam).
``riemannion``
    ``riemannlora.Riemannion(lr, momentum=0.9, scale_lr="match_adamw")``: Muon's msign step on
    the manifold, lr multiplied by ``0.2 sqrt(max(m, n))`` per layer so that ``lr`` is on
    AdamW's scale; the other parameters use ``AdamW(lr)``.
``riemannion-loi``
    :func:`riemannlora.init_loi` (oversampling 16, 1 power iteration, alpha ``-0.01/sqrt(r)``) on
    the first training batch, then ``riemannion``.
``riemannian-sgd-loi``
    :func:`riemannlora.init_loi` on the first training batch, then ``riemannian-sgd`` (the
    second paper's "Riemannian SGD + LOI").
``pissa``
    ``AdamW(lr)`` from PEFT's ``init_lora_weights="pissa"`` (principal singular vectors; the
    base weight becomes ``W - s B A``).
``lora-ga``
    ``AdamW(lr)`` from LoRA-GA: PEFT's ``preprocess_loraga`` estimates the full-weight gradient
    on the first training batch, then ``init_lora_weights="lora_ga"`` with
    ``LoraGAConfig()`` (direction ``ArB2r``, scale ``stable``, gamma 16).

Ablations (not in ``--preset full``; run them with ``--methods``):

``riemannion-storeortho``
    ``riemannion`` with ``store_orthogonalized=True``: the momentum buffer keeps the
    orthogonalized step ``P_X(msign(D_t))`` (the paper's algorithm box) instead of the raw
    ``M_t`` (Muon's rule, the default).
``riemannion-unscaled``
    ``riemannion`` with ``scale_lr=None``: every layer's manifold step is ``lr`` times the
    orthogonalized direction, with no ``0.2 sqrt(max(m, n))`` factor. It measures whether
    that factor is what lets AdamW's lr transfer.
``riemannion-pissa`` / ``riemannion-lora-ga``
    ``riemannion`` started from PEFT's PiSSA / LoRA-GA init instead of the standard one (the
    second paper's init ablation, beside ``pissa``, ``lora-ga`` and ``riemannion-loi``).
``sgd-momentum``
    ``torch.optim.SGD(lr, momentum=0.9)`` on every trainable parameter: the control for
    ``riemannian-sgd``, whose momentum is 0.9 too, so that a comparison with it isolates the
    manifold step (``sgd`` has no momentum).
``riemannion-fixhead`` / ``adamw-fixhead``
    ``riemannion`` / ``adamw`` with the non-LoRA parameters (the classifier head) at the task's
    ``adamw`` default lr instead of ``lr``: an lr sweep then moves only the LoRA optimizer, which
    separates the LoRA factors' lr sensitivity from the head's.

Learning rates: ``default_lr[kind]`` for ``kind`` in (``"classification"``, ``"causal"``,
``"diffusion"``) is the
single learning rate of the default run; the sweep grid is :func:`lr_grid` around it: 7 points,
half a decade apart, three decades in all. The classification lrs of the four main methods were
tuned on MultiEmo + MiniLM (r 8, batch 16, linear decay, seed 0; final eval loss on the 256
eval sentences of the curve) with 200 steps (the default run) and 300 steps; the chosen lr
(``*``) has the lowest sum over the two:

==============  =========  =====================  =====================  =========
method          3e-4       1e-3 (200 / 300 st.)   3e-3 (200 / 300 st.)   1e-2
==============  =========  =====================  =====================  =========
adamw           0.871      0.829 / 0.821          0.791 / 0.839 *
scaled-adamw               0.829 / 0.814 *        0.863 / 0.798          1.285
riemannion                 0.802 / 0.790          0.778 / 0.788 *        1.284
riemannion-loi             0.811 / 0.776          0.758 / 0.792 *        1.287
==============  =========  =====================  =====================  =========

(3e-4 and 1e-2: 300 steps only; at 1e-2 every method collapses to the majority class.) One
seed per cell: differences of a few hundredths are within seed noise, which is what the
``full`` preset's three seeds measure. The other methods' lrs
and all causal-LM lrs are educated guesses (typical LoRA values; SGD-type methods at the
scale where ScaledSGD trains MiniLM), placed so that the 3-decade grid brackets the optimum.

Diffusion lrs: the four main methods' lr with the lowest final eval loss at seed 0 in the sweep
``riemannlora bench --task diffusion --lrs 1e-4,3e-4,1e-3,3e-3,1e-2,3e-2 --seeds 0,1,2``
(BENCHMARKS.md): AdamW and ScaledAdamW 3e-3, Riemannion (+ LOI) 1e-2. The other methods use
their classification lr there (untuned).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "MAIN_METHODS",
    "METHODS",
    "Method",
    "MethodContext",
    "available_methods",
    "build_optimizer",
    "get_method",
    "lr_grid",
    "refined_lrs",
]


@dataclass
class MethodContext:
    """What a method may need beyond the model and lr.

    ``compute_loss(model)`` runs ``model`` on the first training batch and returns the loss
    (for data-dependent inits); ``adamw_lr`` is the task's AdamW default lr; ``seed`` seeds the
    random draws of the method; ``head_lr``: when set, :func:`build_optimizer` trains the
    parameters outside the LoRA pairs (a new classifier head) with ``AdamW(head_lr)`` for every
    method, so that an lr sweep moves only the LoRA optimizer.
    """

    compute_loss: Callable[[nn.Module], torch.Tensor]
    adamw_lr: float
    seed: int
    head_lr: float | None = None

    def generator(self) -> torch.Generator:
        """A CPU generator seeded with :attr:`seed`."""
        return torch.Generator().manual_seed(self.seed)


class OptimizerList:
    """Several optimizers stepped as one (Muon on the factors + AdamW on the rest)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = [o for o in optimizers if o is not None]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


def build_optimizer(method: Method, model: nn.Module, lr: float, ctx: MethodContext) -> Any:
    """``method.build(model, lr, ctx)``; with ``ctx.head_lr`` set, the parameters outside the
    LoRA pairs (the head) are hidden from the method (``requires_grad`` off while it is built)
    and get their own ``AdamW(head_lr, weight_decay=0)`` instead, stepped with it."""
    if ctx.head_lr is None:
        return method.build(model, lr, ctx)
    from riemannlora import find_lora_pairs

    head = find_lora_pairs(model).others
    if not head:
        return method.build(model, lr, ctx)
    for p in head:
        p.requires_grad_(False)
    try:
        inner = method.build(model, lr, ctx)
    finally:
        for p in head:
            p.requires_grad_(True)
    return OptimizerList(inner, torch.optim.AdamW(head, lr=ctx.head_lr, weight_decay=0.0))


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _sgd(model: nn.Module, lr: float, ctx: MethodContext) -> Any:
    return torch.optim.SGD(_trainable(model), lr=lr)


def _sgd_momentum(model: nn.Module, lr: float, ctx: MethodContext) -> Any:
    return torch.optim.SGD(_trainable(model), lr=lr, momentum=0.9)


def _adamw(model: nn.Module, lr: float, ctx: MethodContext) -> Any:
    return torch.optim.AdamW(_trainable(model), lr=lr, weight_decay=0.0)


def _loraplus(model: nn.Module, lr: float, ctx: MethodContext) -> Any:
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=16, weight_decay=0.0
    )


def _peft_riemannian(model: nn.Module, lr: float, ctx: MethodContext) -> Any:
    from peft.optimizers import create_riemannian_optimizer

    return create_riemannian_optimizer(model, torch.optim.AdamW, lr=lr, weight_decay=0.0)


def _muon(model: nn.Module, lr: float, ctx: MethodContext) -> Any:
    from riemannlora import find_lora_pairs

    found = find_lora_pairs(model)
    factors = [p for pair in found.pairs for p in (pair.a, pair.b)]
    muon = torch.optim.Muon(factors, lr=lr, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    rest = torch.optim.AdamW(found.others, lr=lr, weight_decay=0.0) if found.others else None
    return OptimizerList(muon, rest)


def _adamw_fixhead(model: nn.Module, lr: float, ctx: MethodContext) -> Any:
    from riemannlora import find_lora_pairs

    found = find_lora_pairs(model)
    groups = [{"params": [p for pair in found.pairs for p in (pair.a, pair.b)], "lr": lr}]
    if found.others:
        groups.append({"params": found.others, "lr": ctx.adamw_lr})
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)


def _scaled_sgd(model: nn.Module, lr: float, ctx: MethodContext) -> Any:
    import riemannlora

    return riemannlora.ScaledSGD(model, lr=lr)


def _scaled_adamw(model: nn.Module, lr: float, ctx: MethodContext) -> Any:
    import riemannlora

    return riemannlora.ScaledAdamW(model, lr=lr)


def _riemannian_sgd(model: nn.Module, lr: float, ctx: MethodContext) -> Any:
    import riemannlora

    return riemannlora.RiemannianSGD(
        model, lr=lr, momentum=0.9, adamw_lr=ctx.adamw_lr, generator=ctx.generator()
    )


def _riemannion(model: nn.Module, lr: float, ctx: MethodContext, **kw: Any) -> Any:
    import riemannlora

    kw.setdefault("scale_lr", "match_adamw")
    return riemannlora.Riemannion(model, lr=lr, momentum=0.9, generator=ctx.generator(), **kw)


def _riemannion_unscaled(model: nn.Module, lr: float, ctx: MethodContext) -> Any:
    return _riemannion(model, lr, ctx, scale_lr=None)


def _riemannion_storeortho(model: nn.Module, lr: float, ctx: MethodContext) -> Any:
    return _riemannion(model, lr, ctx, store_orthogonalized=True)


def _riemannion_fixhead(model: nn.Module, lr: float, ctx: MethodContext) -> Any:
    return _riemannion(model, lr, ctx, adamw_lr=ctx.adamw_lr)


# --------------------------------------------------------------------------------------------
# initializations: (base model, LoraConfig, ctx) -> PEFT model
# --------------------------------------------------------------------------------------------


def _init_default(base: nn.Module, config: Any, ctx: MethodContext) -> nn.Module:
    from peft import get_peft_model

    return get_peft_model(base, config)


def _init_pissa(base: nn.Module, config: Any, ctx: MethodContext) -> nn.Module:
    config.init_lora_weights = "pissa"
    return _init_default(base, config, ctx)


def _init_lora_ga(base: nn.Module, config: Any, ctx: MethodContext) -> nn.Module:
    from peft import LoraGAConfig, preprocess_loraga

    config.init_lora_weights = "lora_ga"
    config.lora_ga_config = LoraGAConfig()
    with warnings.catch_warnings():  # PEFT's counting hooks warn when the inputs need no grad
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        preprocess_loraga(base, config, lambda: ctx.compute_loss(base).backward())
    return _init_default(base, config, ctx)


def _init_loi(base: nn.Module, config: Any, ctx: MethodContext) -> nn.Module:
    import riemannlora

    model = _init_default(base, config, ctx)
    riemannlora.init_loi(model, lambda: ctx.compute_loss(model), generator=ctx.generator())
    return model


INITS: dict[str, Callable[[nn.Module, Any, MethodContext], nn.Module]] = {
    "lora": _init_default,
    "pissa": _init_pissa,
    "lora-ga": _init_lora_ga,
    "loi": _init_loi,
}


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A benchmarked method: an initialization, an optimizer factory and its learning rates.

    ``build(model, lr, ctx)`` returns an object with ``step()`` and ``zero_grad()``;
    ``init`` names an entry of :data:`INITS`; ``requires`` names attributes of the
    ``riemannlora`` package the method needs (it is unavailable without them); an ``ablation``
    is a variant of another method, left out of ``--preset full``.
    """

    name: str
    summary: str
    build: Callable[[nn.Module, float, MethodContext], Any]
    default_lr: dict[str, float]
    init: str = "lora"
    requires: tuple[str, ...] = field(default=())
    ablation: bool = False

    def available(self) -> bool:
        """Whether the ``riemannlora`` features this method needs exist."""
        import riemannlora

        return all(hasattr(riemannlora, name) for name in self.requires)

    def lr_for(self, kind: str) -> float:
        """Default learning rate for a task kind (``"classification"`` or ``"causal"``)."""
        return self.default_lr[kind]

    def initialize(self, base: nn.Module, config: Any, ctx: MethodContext) -> nn.Module:
        """Wrap ``base`` into the PEFT model this method starts from."""
        return INITS[self.init](base, config, ctx)


def _m(
    name: str,
    summary: str,
    build: Callable,
    cls_lr: float,
    lm_lr: float,
    diff_lr: float | None = None,
    **kw: Any,
) -> Method:
    lrs = {"classification": cls_lr, "causal": lm_lr, "diffusion": diff_lr or cls_lr}
    return Method(name, summary, build, lrs, **kw)


_ADAM = "betas (0.9, 0.999), eps 1e-8"
#: Every method, in table order.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        _m("sgd", "torch SGD, momentum 0", _sgd, 1.0, 0.3),
        _m("adamw", f"torch AdamW, {_ADAM}", _adamw, 3e-3, 5e-4, 3e-3),
        _m("loraplus", "LoRA+ (peft), AdamW, lora_B and 1-D params at 16 lr", _loraplus,
           2e-4, 1e-4),
        _m("peft-riemannian", "peft create_riemannian_optimizer(AdamW, reg=1e-2)",
           _peft_riemannian, 1e-3, 5e-4),
        _m("muon", "torch Muon (momentum 0.95, nesterov, match_rms_adamw) on the LoRA "
           "factors, AdamW on the head", _muon, 1e-3, 5e-4),
        _m("scaled-sgd", "riemannlora ScaledSGD, reg 1e-6, scale-aware", _scaled_sgd, 0.3, 0.1),
        _m("scaled-adamw", f"riemannlora ScaledAdamW, reg 1e-6, scale-aware, {_ADAM}",
           _scaled_adamw, 1e-3, 5e-4, 3e-3),
        _m("riemannian-sgd", "riemannlora RiemannianSGD, momentum 0.9; head: AdamW at the "
           "adamw default lr", _riemannian_sgd, 1.0, 0.3, requires=("RiemannianSGD",)),
        _m("riemannion", "riemannlora Riemannion, momentum 0.9, scale_lr=match_adamw; head: "
           "AdamW at lr", _riemannion, 3e-3, 5e-4, 1e-2, requires=("Riemannion",)),
        _m("riemannion-loi", "init_loi (oversampling 16, 1 power iteration) on the first "
           "batch, then riemannion", _riemannion, 3e-3, 5e-4, 1e-2, init="loi",
           requires=("Riemannion", "init_loi")),
        _m("riemannian-sgd-loi", "init_loi on the first batch, then riemannian-sgd",
           _riemannian_sgd, 1.0, 0.3, init="loi", requires=("RiemannianSGD", "init_loi")),
        _m("pissa", "AdamW from PEFT's PiSSA init (exact SVD)", _adamw, 2e-4, 1e-4,
           init="pissa"),
        _m("lora-ga", "AdamW from PEFT's LoRA-GA init (gradient of the first batch, "
           "ArB2r, stable scale)", _adamw, 2e-4, 1e-4, init="lora-ga"),
        _m("riemannion-storeortho", "ablation: riemannion storing the orthogonalized momentum",
           _riemannion_storeortho, 3e-3, 5e-4, 1e-2, requires=("Riemannion",), ablation=True),
        _m("riemannion-unscaled", "ablation: riemannion with scale_lr=None (the lr is the "
           "manifold step's own)", _riemannion_unscaled, 1e-2, 3e-3, 3e-2,
           requires=("Riemannion",), ablation=True),
        _m("riemannion-pissa", "ablation (init): riemannion from PEFT's PiSSA init",
           _riemannion, 3e-3, 5e-4, 1e-2, init="pissa", requires=("Riemannion",),
           ablation=True),
        _m("riemannion-lora-ga", "ablation (init): riemannion from PEFT's LoRA-GA init",
           _riemannion, 3e-3, 5e-4, 1e-2, init="lora-ga", requires=("Riemannion",),
           ablation=True),
        _m("riemannion-fixhead", "ablation: riemannion with the head at the adamw default lr",
           _riemannion_fixhead, 3e-3, 5e-4, 1e-2, requires=("Riemannion",), ablation=True),
        _m("sgd-momentum", "ablation: torch SGD, momentum 0.9 (riemannian-sgd's momentum)",
           _sgd_momentum, 0.1, 0.03, ablation=True),
        _m("adamw-fixhead", "ablation: adamw with the head at the adamw default lr",
           _adamw_fixhead, 3e-3, 5e-4, 3e-3, ablation=True),
    )
}  # fmt: skip

#: The methods of the default run (those available).
MAIN_METHODS = ("adamw", "scaled-adamw", "riemannion", "riemannion-loi")


def get_method(name: str) -> Method:
    """The method called ``name``; ``ValueError`` naming the choices otherwise."""
    key = name.strip().lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    method = METHODS[key]
    if not method.available():
        raise ValueError(
            f"method {name!r} needs riemannlora.{', riemannlora.'.join(method.requires)}, "
            "which this installation does not have"
        )
    return method


def available_methods(ablations: bool = True) -> list[str]:
    """Names of the methods usable with this installation, in table order (without the
    ablations if ``ablations`` is false)."""
    return [name for name, m in METHODS.items() if m.available() and (ablations or not m.ablation)]


def lr_grid(center: float, decades: float = 3.0, points_per_decade: int = 2) -> list[float]:
    """Log-spaced learning rates centred on ``center``: ``center * 10**(k / points_per_decade)``
    for ``|k| <= decades * points_per_decade / 2`` (default: 7 points over 3 decades)."""
    if center <= 0:
        raise ValueError(f"lr must be > 0, got {center}")
    half = round(decades * points_per_decade / 2)
    return [float(f"{center * 10 ** (k / points_per_decade):.3g}") for k in range(-half, half + 1)]


def refined_lrs(best: float, lrs: list[float], step_decades: float = 0.25) -> list[float]:
    """The quarter-decade neighbours ``best * 10**(+-step_decades)`` of a grid's best lr that
    the grid does not already hold (3 significant digits, like :func:`lr_grid`)."""
    out = []
    for sign in (-1, 1):
        lr = float(f"{best * 10 ** (sign * step_decades):.3g}")
        if all(abs(math.log10(lr / x)) > 1e-3 for x in lrs):
            out.append(lr)
    return out
