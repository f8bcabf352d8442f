"""LoRA layers of a PEFT model in manifold form: discovery, checks, and the conversion.

The layout (see :mod:`riemannlora.manifold`): ``lora_B.weight = [Z1 | U | U0]`` ``(m, w)``,
``lora_A.weight = [Q | V | -V0]^T`` ``(w, n)``, scaling 1. :class:`ManifoldLayer` is a live view
of one converted adapter; :func:`lora_targets` finds and checks every trainable adapter;
:func:`install` writes a point into new factor modules; :func:`convert` converts a model (what
:func:`riemannlora.to_manifold` does, without redirecting ``save_pretrained``).
"""

from __future__ import annotations

import sys
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from riemannlora.core.geometry import orthonormal_basis, qr_positive
from riemannlora.distributed import is_dtensor
from riemannlora.manifold.holders import check_replaceable
from riemannlora.pairs import reject_deepspeed, reject_meta

__all__ = [
    "MANIFOLD_ATTR",
    "LoraTarget",
    "ManifoldLayer",
    "convert",
    "group_indices",
    "install",
    "lora_targets",
    "manifold_layers",
    "orig_entries",
    "reject_sharded",
]

#: Name of the per-module registry attribute of converted LoRA layers.
MANIFOLD_ATTR = "_riemannlora_manifold"


@dataclass(frozen=True, eq=False)
class ManifoldLayer:
    """One adapter of one PEFT LoRA layer in manifold form (a live view: the accessors read the
    module's current weights, so the record stays valid when the factor modules are rebuilt).

    ``m``: out features, ``n``: in features, ``rank``: r. ``path`` is the module's name in the
    model passed to :func:`to_manifold`, ``name`` is ``f"{path}.{adapter}"``.
    """

    module: nn.Module = field(repr=False)
    adapter: str
    path: str

    @property
    def name(self) -> str:
        return f"{self.path}.{self.adapter}" if self.path else self.adapter

    @property
    def entry(self) -> dict[str, Any]:
        return getattr(self.module, MANIFOLD_ATTR)[self.adapter]

    @property
    def rank(self) -> int:
        return int(self.entry["rank"])

    @property
    def offset(self) -> bool:
        """Whether a frozen offset ``X0 = U0 V0^T`` is present (width 3r)."""
        return bool(self.entry["offset"])

    @property
    def width(self) -> int:
        return self.rank * (3 if self.offset else 2)

    @property
    def a(self) -> nn.Parameter:
        """``lora_A`` weight ``[Q | V | -V0]^T`` ``(w, n)``."""
        return self.module.lora_A[self.adapter].weight

    @property
    def b(self) -> nn.Parameter:
        """``lora_B`` weight ``[Z1 | U | U0]`` ``(m, w)``."""
        return self.module.lora_B[self.adapter].weight

    @property
    def m(self) -> int:
        return self.b.shape[0]

    @property
    def n(self) -> int:
        return self.a.shape[1]

    def U(self) -> Tensor:
        """``(m, r)`` view, orthonormal columns."""
        r = self.rank
        return self.b[:, r : 2 * r]

    def V(self) -> Tensor:
        """``(n, r)`` view."""
        r = self.rank
        return self.a[r : 2 * r].mT

    def Q(self) -> Tensor:
        """``(n, r)`` view: orthonormal basis of ``V``'s columns."""
        return self.a[: self.rank].mT

    def Z1(self) -> Tensor:
        """``(m, r)`` view of the always-zero block that carries ``G Q`` in its gradient."""
        return self.b[:, : self.rank]

    def U0(self) -> Tensor | None:
        """``(m, r)`` view of the frozen offset's left factor, or None."""
        r = self.rank
        return self.b[:, 2 * r :] if self.offset else None

    def V0(self) -> Tensor | None:
        """``(n, r)`` copy of the frozen offset's right factor (stored negated), or None."""
        r = self.rank
        return -self.a[2 * r :].mT if self.offset else None

    def GQ(self) -> Tensor | None:
        """``G Q`` ``(m, r)``: view into ``lora_B.weight.grad`` (None before a backward pass)."""
        g = self.b.grad
        return None if g is None else g[:, : self.rank]

    def GtU(self) -> Tensor | None:
        """``G^T U`` ``(n, r)``: view into ``lora_A.weight.grad`` (None before a backward)."""
        g = self.a.grad
        r = self.rank
        return None if g is None else g[r : 2 * r].mT

    def point(self) -> Tensor:
        """Dense ``X = U V^T`` ``(m, n)`` (tests and debugging)."""
        return self.U() @ self.V().mT

    def delta(self) -> Tensor:
        """Dense effective weight delta ``X - X0`` ``(m, n)`` that the forward pass adds."""
        return self.b @ self.a


#: PEFT's LoRA layers on quantized bases (QLoRA), by module and class name. Their forward is
#: PEFT's plain one, ``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``, so the manifold
#: form works as on ``nn.Linear`` and never touches (or dequantizes) the quantized base weight.
#: (torchao's ``TorchaoLoraLinear`` subclasses PEFT's ``Linear`` and needs no entry.)
#: Entries: (PEFT module, class, the quantization library a model with such layers has imported).
QUANTIZED_LORA_LAYERS = (
    ("peft.tuners.lora.bnb", "Linear8bitLt", "bitsandbytes"),
    ("peft.tuners.lora.bnb", "Linear4bit", "bitsandbytes"),
    ("peft.tuners.lora.hqq", "HqqLoraLinear", "hqq"),
    ("peft.tuners.lora.gptq", "GPTQLoraLinear", "gptqmodel"),
    ("peft.tuners.lora.awq", "AwqLoraLinear", "awq"),
    ("peft.tuners.lora.eetq", "EetqLoraLinear", "eetq"),
    ("peft.tuners.lora.aqlm", "AqlmLoraLinear", "aqlm"),
)


def _lora_linear_cls() -> tuple[type, ...]:
    """PEFT's LoRA ``Linear`` and the quantized LoRA linear layers this PEFT defines."""
    import importlib

    try:
        from peft.tuners.lora.layer import Linear
    except ImportError as exc:  # pragma: no cover - peft is an optional dependency
        raise ImportError("the manifold form needs peft (pip install 'riemannlora[peft]')") from exc
    classes: list[type] = [Linear]
    for module_name, cls_name, library in QUANTIZED_LORA_LAYERS:
        if library not in sys.modules:  # no such layer can exist: nothing to import
            continue
        try:
            cls = getattr(importlib.import_module(module_name), cls_name, None)
        except ImportError:  # the quantization library is not installed
            continue
        if isinstance(cls, type):
            classes.append(cls)
    return tuple(classes)


@dataclass(frozen=True)
class LoraTarget:
    """A trainable adapter of a supported LoRA layer, converted or not."""

    module: nn.Module
    adapter: str
    path: str
    rank: int
    m: int
    n: int
    converted: bool

    @property
    def name(self) -> str:
        return f"{self.path}.{self.adapter}" if self.path else self.adapter


def _requires_grad(x: Any) -> bool:
    w = getattr(x, "weight", x)
    return isinstance(w, Tensor) and w.requires_grad


def lora_targets(model: nn.Module) -> list[LoraTarget]:
    """Every trainable adapter of the model's LoRA layers, checked for manifold support.

    Raises TypeError for unsupported layer types and ValueError for unsupported options.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"expected an nn.Module (e.g. a peft.PeftModel), got {type(model).__name__}"
        )
    reject_deepspeed(model, model.parameters(), "riemannlora")
    linear_cls = _lora_linear_cls()
    targets: list[LoraTarget] = []
    seen: set[tuple[int, str]] = set()
    for path, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        emb_a = getattr(module, "lora_embedding_A", None)
        adapters: list[str] = []
        if isinstance(lora_a, nn.ModuleDict):
            adapters += [k for k, v in lora_a.items() if _requires_grad(v)]
        if isinstance(emb_a, nn.ParameterDict):
            adapters += [k for k, v in emb_a.items() if _requires_grad(v)]
        lora_b = getattr(module, "lora_B", None)
        if isinstance(lora_b, nn.ModuleDict):
            for k, v in lora_b.items():
                if _requires_grad(v) and k not in adapters:
                    adapters.append(k)
        for adapter in adapters:
            if (id(module), adapter) in seen:
                continue
            seen.add((id(module), adapter))
            targets.append(_check_target(module, adapter, path, linear_cls))
    return targets


def _check_target(
    module: nn.Module, adapter: str, path: str, linear_cls: tuple[type, ...]
) -> LoraTarget:
    name = f"{path}.{adapter}" if path else adapter
    where = f"LoRA layer {name!r} ({type(module).__name__})"
    if not isinstance(module, linear_cls):
        raise TypeError(
            f"{where}: Riemannion and the manifold form support LoRA on linear layers only "
            "(nn.Linear, GPT-2 Conv1D, and quantized linear bases: bitsandbytes 4/8-bit, "
            "torchao, HQQ, GPTQ, AWQ, EETQ, AQLM), not embeddings, convolutions, "
            "MultiheadAttention or parameter targets. Remove this module from "
            "LoraConfig.target_modules, freeze its adapter, or train the model with "
            "riemannlora.ScaledAdamW."
        )
    mag = getattr(module, "lora_magnitude_vector", None)
    if getattr(module, "use_dora", {}).get(adapter, False) or (
        isinstance(mag, nn.ModuleDict) and adapter in mag
    ):
        raise ValueError(
            f"{where}: DoRA (LoraConfig(use_dora=True)) is not supported: its magnitude "
            "normalisation is not a fixed-rank delta. Use use_dora=False."
        )
    if getattr(module, "lora_bias", {}).get(adapter, False):
        raise ValueError(
            f"{where}: lora_bias=True is not supported (the bias of lora_B would be "
            "reset by the conversion). Use LoraConfig(lora_bias=False)."
        )
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is not None:
        raise ValueError(
            f"{where}: the LoRA variant {type(variant).__name__} changes the forward pass and is "
            "not supported; use a plain LoRA config."
        )
    if adapter in getattr(module, "merged_adapters", ()):
        raise ValueError(f"{where}: the adapter is merged into the base weight; unmerge it first.")
    mod_a, mod_b = module.lora_A[adapter], module.lora_B[adapter]
    if type(mod_a) is not nn.Linear or type(mod_b) is not nn.Linear:
        raise TypeError(
            f"{where}: expected nn.Linear factor modules, got {type(mod_a).__name__} and "
            f"{type(mod_b).__name__}"
        )
    w_a, w_b = mod_a.weight, mod_b.weight
    reject_meta((w_a, w_b), where)
    if w_a.requires_grad != w_b.requires_grad:
        frozen = "lora_A" if not w_a.requires_grad else "lora_B"
        raise ValueError(
            f"{where}: {frozen} is frozen but its partner is trainable; the manifold form "
            "needs both factors trainable."
        )
    registry = getattr(module, MANIFOLD_ATTR, {})
    m, n = w_b.shape[0], w_a.shape[1]
    if adapter in registry:
        entry = registry[adapter]
        r = int(entry["rank"])
        w = r * (3 if entry["offset"] else 2)
        if tuple(w_a.shape) != (w, n) or tuple(w_b.shape) != (m, w):
            raise ValueError(
                f"{where}: converted to manifold form with width {w}, but its factors now have "
                f"shapes {tuple(w_a.shape)} and {tuple(w_b.shape)}; they were replaced after "
                "conversion. Rebuild the PEFT model and convert it again."
            )
        return LoraTarget(module, adapter, path, r, m, n, converted=True)
    r = w_a.shape[0]
    if r > min(m, n):
        raise ValueError(
            f"{where}: rank r={r} exceeds min(out_features, in_features)=min({m}, {n}); the "
            "fixed-rank manifold needs r <= min(m, n). Lower r for this layer (LoraConfig "
            "rank_pattern) or remove it from target_modules."
        )
    return LoraTarget(module, adapter, path, r, m, n, converted=False)


def reject_sharded(targets: list[LoraTarget], what: str) -> None:
    """Refuse to rebuild the factor modules of layers whose weights are already sharded
    (FSDP2 DTensors): the new modules would not be sharded, and FSDP would not know them."""
    for t in targets:
        if is_dtensor(t.module.lora_A[t.adapter].weight):
            raise ValueError(
                f"{what}: LoRA layer {t.name!r} is already sharded (FSDP2 DTensor weights); "
                "convert the model first (riemannlora.to_manifold, or riemannlora.init_loi), "
                "then apply fully_shard, then create the optimizer"
            )


def group_indices(keys: Iterable[Hashable]) -> dict[Hashable, list[int]]:
    """Indices grouped by key, in first-seen order (for batching layers of equal shape)."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def orig_entries(module: nn.Module, adapter: str) -> dict[str, Any]:
    """The ``orig_*`` registry entries of an adapter: PEFT's scaling, rank, alpha and rsLoRA flag
    before the first conversion (kept from the registry when already converted)."""
    registry = getattr(module, MANIFOLD_ATTR, {})
    if adapter in registry:
        return {k: v for k, v in registry[adapter].items() if k.startswith("orig_")}
    return {
        "orig_scaling": float(module.scaling[adapter]),
        "orig_rank": int(module.r[adapter]),
        "orig_alpha": module.lora_alpha[adapter],
        "orig_use_rslora": bool(getattr(module, "use_rslora", {}).get(adapter, False)),
    }


def install(
    module: nn.Module,
    adapter: str,
    U: Tensor,
    V: Tensor,
    Q: Tensor,
    U0: Tensor | None = None,
    V0: Tensor | None = None,
    *,
    orig: dict[str, Any] | None = None,
    like: tuple[nn.Module, nn.Module] | None = None,
) -> None:
    """Write the manifold form ``lora_B = [0 | U | U0]``, ``lora_A = [Q | V | -V0]^T`` into new
    ``nn.Linear`` factor modules of the layer (dtype, device, mode and ``requires_grad`` of the
    old ones), set ``scaling = 1`` and record the layer in the registry.

    U ``(m, r)``, V ``(n, r)``, Q ``(n, r)``, U0 ``(m, r)``, V0 ``(n, r)``; any dtype.
    ``orig`` holds the ``orig_*`` registry entries (taken from the layer when None); ``like`` the
    factor modules to copy dtype, device, mode and ``requires_grad`` from (default: current).
    """
    old_a, old_b = like if like is not None else (module.lora_A[adapter], module.lora_B[adapter])
    dtype, device = old_a.weight.dtype, old_a.weight.device
    (m, r), n = U.shape, V.shape[0]
    offset = U0 is not None
    w = 3 * r if offset else 2 * r
    new_a = nn.utils.skip_init(nn.Linear, n, w, bias=False, device=device, dtype=dtype)
    new_b = nn.utils.skip_init(nn.Linear, w, m, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        left = [torch.zeros_like(U), U] + ([U0] if offset else [])
        right = [Q, V] + ([-V0] if offset else [])  # type: ignore[operator]
        new_a.weight.copy_(torch.cat(right, dim=-1).mT)
        new_b.weight.copy_(torch.cat(left, dim=-1))
    new_a.train(old_a.training)
    new_b.train(old_b.training)
    new_a.weight.requires_grad_(old_a.weight.requires_grad)
    new_b.weight.requires_grad_(old_b.weight.requires_grad)
    if orig is None:
        orig = orig_entries(module, adapter)
    module.lora_A[adapter] = new_a
    module.lora_B[adapter] = new_b
    module.scaling[adapter] = 1.0
    module.r[adapter] = w
    module.lora_alpha[adapter] = w
    if isinstance(getattr(module, "use_rslora", None), dict):
        module.use_rslora[adapter] = False
    registry = getattr(module, MANIFOLD_ATTR, None)
    if registry is None:
        registry = {}
        setattr(module, MANIFOLD_ATTR, registry)
    registry[adapter] = {"rank": r, "offset": offset, **orig}


@torch.no_grad()
def _convert(targets: list[LoraTarget], generator: torch.Generator | None) -> None:
    """Convert plain adapters, batched over layers of equal shape (float64 math)."""
    zero_b = [not bool(t.module.lora_B[t.adapter].weight.any()) for t in targets]
    # random U for zero-B layers, drawn in layer order so results do not depend on batching
    rand: dict[int, Tensor] = {}
    gen_device = generator.device if generator is not None else torch.device("cpu")
    for i, t in enumerate(targets):
        if zero_b[i]:
            rand[i] = torch.randn(
                t.m, t.rank, generator=generator, device=gen_device, dtype=torch.float64
            )
    keys = [
        (t.m, t.n, t.rank, zero_b[i], t.module.lora_A[t.adapter].weight.device)
        for i, t in enumerate(targets)
    ]
    for (_, _, _, is_zero, device), idx in group_indices(keys).items():
        f64 = dict(dtype=torch.float64, device=device)
        A = torch.stack([targets[i].module.lora_A[targets[i].adapter].weight for i in idx]).to(
            **f64
        )  # (L, r, n)
        if is_zero:
            U = qr_positive(torch.stack([rand[i] for i in idx]).to(device))[0]
            V = torch.zeros_like(A.mT)
            Q = orthonormal_basis(A.mT)
        else:
            B = torch.stack([targets[i].module.lora_B[targets[i].adapter].weight for i in idx]).to(
                **f64
            )  # (L, m, r)
            s = torch.tensor(
                [float(targets[i].module.scaling[targets[i].adapter]) for i in idx], **f64
            )
            U, R = qr_positive(B)
            V = (R @ A).mT * s[:, None, None]
            Q = orthonormal_basis(V)
        for j, i in enumerate(idx):
            install(targets[i].module, targets[i].adapter, U[j], V[j], Q[j])


def _add_zero_offset(target: LoraTarget) -> None:
    layer = ManifoldLayer(target.module, target.adapter, target.path)
    with torch.no_grad():
        U, V, Q = layer.U().clone(), layer.V().clone(), layer.Q().clone()
    install(target.module, target.adapter, U, V, Q, torch.zeros_like(U), torch.zeros_like(V))


def manifold_layers(model: nn.Module) -> list[ManifoldLayer]:
    """The converted adapters of ``model`` (trainable ones), without converting anything."""
    return [ManifoldLayer(t.module, t.adapter, t.path) for t in lora_targets(model) if t.converted]


def convert(
    model: nn.Module,
    *,
    generator: torch.Generator | None = None,
    with_offset: bool = False,
    what: str = "to_manifold",
) -> list[ManifoldLayer]:
    """:func:`riemannlora.to_manifold` without redirecting ``save_pretrained`` and
    ``load_adapter`` (see there): converts every trainable adapter, returns its layers.
    ``what`` names the caller in errors."""
    targets = lora_targets(model)
    if not targets:
        raise ValueError(
            "no trainable LoRA adapter found in the model: apply peft.get_peft_model(model, "
            "LoraConfig(target_modules=[...])) first and check that the adapter is trainable"
        )
    rebuilt = [
        t
        for t in targets
        if not t.converted
        or (with_offset and not ManifoldLayer(t.module, t.adapter, t.path).offset)
    ]
    reject_sharded(rebuilt, what)
    check_replaceable(
        model,
        [
            p
            for t in rebuilt
            for p in (t.module.lora_A[t.adapter].weight, t.module.lora_B[t.adapter].weight)
        ],
        what,
    )
    _convert([t for t in targets if not t.converted], generator)
    if with_offset:
        for t in lora_targets(model):
            if not ManifoldLayer(t.module, t.adapter, t.path).offset:
                _add_zero_offset(t)
    return [ManifoldLayer(t.module, t.adapter, t.path) for t in targets]
