r"""Riemannion (Muon on the fixed-rank manifold) and Riemannian SGD for PEFT LoRA.

Bogachev et al., "LoRA meets Riemannion: Muon Optimizer for Parametrization-independent Low-Rank
Adapters", arXiv 2507.12142. Each adapted layer's effective delta ``X = U V^T`` (rank r, U with
orthonormal columns) is optimized as a point of the manifold of rank-r matrices, so the
trajectory of X does not depend on how it is factored. One step for one layer, with
``G = dL/dW`` known only through ``G Q`` and ``G^T U`` (see :mod:`riemannlora.manifold`)::

    xi_g  = P_X(G)                                   Riemannian gradient (dU_g, dV_g)
    M     = beta P_X(M_prev) + (1 - tau) xi_g        transport by projection, heavy ball
    D     = beta M + (1 - tau) xi_g  (Nesterov)  or  M
    D_o   = P_X(msign(D))                            Riemannion only ("OrthoLR", exact SVD)
    X    <- best rank-r approximation of  X - lr * (D_o + wd' X)       (truncated SVD)

with ``tau = 0`` for Riemannion and ``tau = beta`` for Riemannian SGD (which skips the msign).
All tangent vectors are kept in factor form ``dU Q^T + U dV^T`` (never an ``m x n`` matrix);
the small QR/SVDs run in float32 or better and are batched over layers of equal shape, by the
structured path of :func:`manifold_step` (:func:`riemannlora.core.geometry.tangent_qr`,
:func:`~riemannlora.core.geometry.msign_tangent_qr`, :func:`~riemannlora.core.geometry.retract_qr`;
same results as the literal formulas up to round-off). Per group of equal-shape layers a step
gathers the gradient blocks (before the non-finite check) into buffers kept across steps, every
tall matrix transposed (``(L, r, rows)``, the layout in which MKL's thin products are
fastest), works in buffers kept across steps (on CPU the page faults of fresh multi-MB buffers
cost as much as the arithmetic; the gradient stacks take ``r (m + n)`` numbers per layer, the
rest is shared by the groups, which step one after the other) and updates the stacked momentum
buffers in place. Without a process group the optimizer packs the factors of each group into
two buffers, ``lora_A`` ``(w, n)`` as ``pa[i]`` and ``lora_B`` ``(m, w)`` as ``pb[i]^T``
(column-major; ``_pack_factors_``): the step reads the point there and writes the new one with
one product per buffer. Factors that are not so packed (moved since, or created under a
process group) are stacked into the workspace's own ``pa``, ``pb`` and copied back, with the
same arithmetic; their ``state_dict`` entries are standalone contiguous copies either way.

The momentum ``M`` (a tangent vector at the point of the step that made it) is kept in the
bases of that step's direction, ``M = Lb core Rb^T`` with ``Lb = [Qd | U_old]`` ``(m, 2r)`` and
``Rb = [Q_old | Qv]`` ``(n, 2r)`` orthonormal and a ``2r x 2r`` core (see :class:`Momentum`).
The new point lies in their span, ``U = Lb cu``, ``Q = Rb cq``, with ``cu``, ``cq`` known from
the retraction's small matrices, so the next step transports M by projection with no product
between a tall matrix and another: ``(I - U U^T) M Q = Lb ((I - cu cu^T) core cq)`` and
``M^T U = Rb (core^T cu)``. The coordinates are used as they are while nothing can have moved
the point since the optimizer wrote it (same parameter objects and storage, unchanged version
counters, which every in-place change made through the parameters bumps); otherwise they are
computed from the point. ``self.state`` holds per-layer views of the stacked buffers:
``momentum_left`` (``Lb``) ``momentum_core`` and ``transport_left`` (``cu``) on ``lora_B``,
``momentum_right`` (``Rb``) and ``transport_right`` (``cq``) on ``lora_A``, so
``state_dict()``/``load_state_dict()`` resume bit for bit (the loaded coordinates are checked
against the point once). A momentum without a core is the plain factor pair
``M = momentum_left momentum_right^T`` (FSDP2-sharded layers, layers with ``2r > min(m, n)``,
older checkpoints); Nesterov's raw momentum is stored as ``[dU | U_old]``, ``[Q_old | dV]`` with
an identity core, and its coordinates are computed every step.

Every other trainable parameter (biases, heads, ``modules_to_save``) is updated by
``torch.optim.AdamW``'s own functional kernel, bitwise as ``torch.optim.AdamW`` would.

Before anything changes, the gradients are checked for NaN/Inf (``nonfinite``, see
:mod:`riemannlora.optim.guard`; for a group of equal-shape layers through the sums of the
stacked gradient blocks the step reads, one reduction per group). Factors sharded by FSDP2 (DTensors) take
:func:`riemannlora.distributed.manifold_step_sharded`, the same step up to summation order; the
momentum of such layers is stored as DTensors (``momentum_left`` sharded like ``lora_B``,
``momentum_right`` replicated). A step with ``lr == 0`` (e.g. the first warmup step) updates the
momentum and leaves the point exactly as it is.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import chain, repeat
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from riemannlora import distributed
from riemannlora.core.geometry import compute_dtype
from riemannlora.core.manifold_step import (
    SCALE_LR_CHOICES,
    Momentum,
    kept_in_bases,
    lr_multiplier,
    manifold_step,
    structured_shape,
    structured_step,
)
from riemannlora.manifold import ManifoldLayer, to_manifold
from riemannlora.manifold.layers import group_indices
from riemannlora.optim.functional import adamw_from_group
from riemannlora.optim.guard import NonFiniteGuard
from riemannlora.optim.validation import check_number, check_state_dict_header

__all__ = ["SCALE_LR_CHOICES", "RiemannianSGD", "Riemannion", "lr_multiplier", "manifold_step"]

#: the per-layer momentum state of the manifold optimizers (see :class:`Momentum`):
#: ``momentum_left`` ``(m, 2r)``, ``momentum_core`` ``(2r, 2r)`` (optional, identity when absent)
#: and ``transport_left`` ``(2r, r)`` (optional) on ``lora_B``; ``momentum_right`` ``(n, 2r)``
#: and ``transport_right`` ``(2r, r)`` (optional) on ``lora_A``
_MOMENTUM_KEYS = (
    "momentum_left",
    "momentum_right",
    "momentum_core",
    "transport_left",
    "transport_right",
)
#: keys of a manifold param group that only Riemannion has (tells its state from RiemannianSGD's)
_CLASS_KEYS = ("store_orthogonalized", "scale_lr")


@dataclass(eq=False)
class _Workspace:
    """The buffers a structured group of layers steps in, kept across steps: on CPU the page
    faults of fresh multi-MB buffers cost as much as the arithmetic, and slicing the parameters
    anew costs microseconds per layer. Every buffer is contiguous, in the compute dtype (a step
    writes its products into them; CPU ``bmm`` into a slice of a larger batch goes through a
    temporary).

    The point lives in ``pa`` ``(L, 2r, n)`` (``[Q^T; V^T]`` per layer: the ``lora_A``
    factors) and ``pb`` ``(L, 2r, m)`` (``[Z1^T; U^T]``: the transposed ``lora_B`` factors).
    When the factors are packed (:func:`_pack_factors_`) these are the parameters' own
    buffers (``packed``), which the step reads and writes in place; otherwise they are buffers
    of the workspace (``own_pa``, ``own_pb``) into which the factors are stacked and from which
    they are copied back, layer by layer. Either way the step's arithmetic is the same."""

    cdt: torch.dtype
    A: list[Tensor]
    Bt: list[Tensor]
    packed_pa: Tensor | None
    packed_pb: Tensor | None
    own_pa: Tensor
    own_pb: Tensor
    GQt: Tensor
    GtUt: Tensor
    scratch: Tensor
    y_scratch: Tensor

    @property
    def packed(self) -> bool:
        """Whether the factors are the views of ``pa``, ``pb`` that the step writes."""
        return self.packed_pa is not None and self.packed_pb is not None

    @staticmethod
    def arena_size(A: list[Tensor], B: list[Tensor], r: int) -> int:
        """Numbers the buffers a step uses only while it runs take (``own_pa``, ``own_pb``,
        scratches; the pages of the first two are touched only by groups that are not
        packed)."""
        return len(A) * r * 3 * (B[0].shape[0] + A[0].shape[1])

    @classmethod
    def build(
        cls, A: list[Tensor], B: list[Tensor], r: int, cdt: torch.dtype, arena: Tensor
    ) -> _Workspace:
        """The workspace of a group: its own gradient stacks (gathered for every group before
        the non-finite check) and the point and scratch buffers carved out of ``arena`` (a flat
        buffer of at least :meth:`arena_size` numbers, shared by the groups, which step one
        after the other)."""
        L, m, n = len(A), B[0].shape[0], A[0].shape[1]
        offset = 0

        def carve(rows: int, width: int) -> Tensor:
            nonlocal offset
            size = L * width * rows
            offset += size
            return arena[offset - size : offset].view(L, width, rows)

        w = A[0].shape[0]  # 2r, or 3r with an offset (whose block the step leaves alone)
        pa = _packed(A, w, n, transposed=False) if A[0].dtype == cdt else None
        pb = _packed(B, w, m, transposed=True) if B[0].dtype == cdt else None
        return cls(
            cdt=cdt,
            A=[a[: 2 * r] for a in A],
            Bt=[b[:, : 2 * r].mT for b in B],
            packed_pa=None if pa is None else pa[:, : 2 * r],
            packed_pb=None if pb is None else pb[:, : 2 * r],
            own_pa=carve(n, 2 * r),
            own_pb=carve(m, 2 * r),
            GQt=A[0].new_empty(L, r, m, dtype=cdt),
            GtUt=A[0].new_empty(L, r, n, dtype=cdt),
            scratch=carve(m, r),
            y_scratch=carve(n, r),
        )

    def point(self, in_place: bool) -> tuple[Tensor, Tensor]:
        """``(pa, pb)`` holding the current point: the parameters' own buffers when packed and
        ``in_place``, else the workspace's, into which the factors are stacked."""
        if in_place and self.packed:
            assert self.packed_pa is not None and self.packed_pb is not None
            return self.packed_pa, self.packed_pb
        torch.stack(self.A, out=self.own_pa)
        torch.stack(self.Bt, out=self.own_pb)
        return self.own_pa, self.own_pb

    def write_back(self) -> None:
        """Copies the new point from the workspace's buffers into the factors, per layer."""
        torch._foreach_copy_(self.A, list(self.own_pa.unbind(0)))
        torch._foreach_copy_(self.Bt, list(self.own_pb.unbind(0)))


@dataclass(eq=False)
class _GroupPlan:
    """A group of manifold layers stepped together (equal shape, rank, offset, dtype, device
    and process group): its step settings and, for the structured path, its stacked momentum
    and its workspace, whose gradient blocks are filled before the non-finite check."""

    key: tuple[Any, ...]
    A: list[Tensor]
    B: list[Tensor]
    kw: dict[str, Any]
    ws: _Workspace | None = None
    mom: Momentum | None = None
    fresh: bool = True
    cached: bool = False
    cdt: torch.dtype = torch.float32

    @property
    def structured(self) -> bool:
        """Stepped by :func:`structured_step` (not sharded, ``2r <= min(m, n)``)."""
        m, n, r, pg = self.key[0], self.key[1], self.key[2], self.key[-1]
        return pg is None and structured_shape(m, n, r)


@dataclass(eq=False)
class _MomentumCache:
    """A group's momentum as this optimizer last wrote it: the stacked buffers and the
    per-layer views of them that ``self.state`` holds (``momentum_left``, ``momentum_right``,
    ``momentum_core``, ``transport_left``, ``transport_right``; None where absent)."""

    mom: Momentum
    views: tuple[Any, ...]


def _versions(A: list[Tensor], B: list[Tensor]) -> list[int]:
    """The version counters of a group's factors (every in-place change bumps them)."""
    return list(map(_VERSION, chain(A, B)))


# C-level accessors for the per-step checks over every layer (no Python frame per layer)
_GRAD = operator.attrgetter("grad")
_VERSION = operator.attrgetter("_version")
_MODULES = operator.attrgetter("_modules")
_PARAMS = operator.attrgetter("_parameters")
_WEIGHT = operator.itemgetter("weight")
_DATA_PTR = operator.methodcaller("data_ptr")
_STRIDE = operator.methodcaller("stride")


def _left_blocks_t(grads: list[Tensor], r: int) -> list[Tensor]:
    """``(G Q)^T = grad[:, :r].mT`` of every ``lora_B`` gradient ``(m, w)``: one ``as_strided``
    view each when all are column-major like their factors (the usual case; half the cost of
    slicing and transposing, which adds up over hundreds of layers every step)."""
    m = grads[0].shape[0]
    if all(map(operator.eq, map(_STRIDE, grads), repeat((1, m)))):
        return list(map(operator.methodcaller("as_strided", (r, m), (m, 1)), grads))
    return [g[:, :r].mT for g in grads]


def _state_get(key: str) -> Callable[[dict[str, Any]], Any]:
    """``state.get(key)`` as a C-level callable."""
    return operator.methodcaller("get", key)


def _slot_weights(mods: list[dict[str, Any]], name: str, adapters: list[str]) -> Any:
    """``module._modules[name]._modules[adapter]._parameters["weight"]`` of every layer, where
    the layer's factor lives now (an iterator)."""
    dicts = map(_MODULES, map(operator.itemgetter(name), mods))
    return map(_WEIGHT, map(_PARAMS, map(operator.getitem, dicts, adapters)))


@dataclass(eq=False)
class _Grouping:
    """The grouping of a manifold param group's layers by key, valid while the group holds
    exactly these parameter objects with this storage and every layer has both gradients.
    ``epoch``: the :class:`_RegistrationWatch`'s epoch when the factors were last found in
    their layers."""

    params: list[Tensor]
    ptrs: list[int]
    groups: list[tuple[tuple[Any, ...], list[int]]]
    epoch: int


class _RegistrationWatch:
    """Counts the submodules and parameters registered on any module of the process
    (``nn.Module.__setattr__``, ``add_module``, ``register_parameter``, ``ModuleDict``
    assignment) through torch's global registration hooks, for as long as it lives: the hooks
    are removed by :meth:`close` or when the watch is garbage-collected (its optimizer's
    lifetime). While ``epoch`` stands still, no factor module or weight can have been replaced,
    and the per-step check that each layer still holds the optimizer's factors (a walk over
    every layer's modules, slow on a cold cache) is skipped."""

    def __init__(self) -> None:
        self.epoch = 0
        ref = weakref.ref(self)

        def bump(*_: Any) -> None:
            watch = ref()
            if watch is not None:
                watch.epoch += 1

        handles = (
            register_module_module_registration_hook(bump),
            register_module_parameter_registration_hook(bump),
        )
        self._finalizer = weakref.finalize(self, _remove_hooks, handles)

    @property
    def alive(self) -> bool:
        """Whether the hooks are installed (not closed)."""
        return self._finalizer.alive

    def close(self) -> None:
        """Removes the hooks now (idempotent)."""
        self._finalizer()


def _remove_hooks(handles: tuple[Any, ...]) -> None:
    for handle in handles:
        handle.remove()


def _factor(layer: ManifoldLayer, name: str) -> Any:
    """``layer.module.<name>[layer.adapter].weight`` by plain dict lookups (``layer.a`` / ``.b``
    go through ``nn.Module.__getattr__`` three times; this runs for every layer every step)."""
    try:
        return layer.module._modules[name]._modules[layer.adapter]._parameters["weight"]  # type: ignore[union-attr]
    except (KeyError, AttributeError):
        return getattr(layer, "a" if name == "lora_A" else "b")


def _column_major_(p: nn.Parameter) -> None:
    """Stores a ``lora_B`` factor ``(m, w)`` column-major, in place (same Parameter, same
    values): its block ``U^T`` and, by autograd's gradient layout contract, its gradient's
    ``(G Q)^T`` are then contiguous ``(r, m)`` rows, the layout the step stacks them in, so the
    step gathers and writes them back with plain copies instead of transposing ones (the
    forward and backward products run as fast in either layout). Sharded factors and factors
    already laid out so are left alone."""
    if distributed.is_dtensor(p) or p.dim() != 2 or p.stride() == (1, p.shape[0]):
        return
    p.data = p.data.mT.contiguous().mT
    if p.grad is not None:
        p.grad = p.grad.mT.contiguous().mT


def _pack_factors_(layers: list[ManifoldLayer]) -> None:
    """Moves the factors of every group of equal-shape layers into two buffers per group, in
    place (same Parameters, same values): ``lora_A`` ``(w, n)`` becomes ``pa[i]`` of a
    contiguous ``pa`` ``(L, w, n)`` and ``lora_B`` ``(m, w)`` becomes ``pb[i]^T`` of a
    contiguous ``pb`` ``(L, w, m)`` (column-major, see :func:`_column_major_`; ``w = 2r``, or
    ``3r`` with an offset). The step then reads the point ``Q^T = pa[:, :r]``,
    ``V^T = pa[:, r:2r]``, ``U^T = pb[:, r:2r]`` in place and writes the new one with one
    product per buffer, instead of stacking the factors into buffers of its own and copying
    the result back layer by layer. Layers that cannot step structured, and sharded ones, are
    only made column-major."""
    keys = []
    for layer in layers:
        a, b = layer.a, layer.b
        _column_major_(b)
        ok = not (distributed.is_dtensor(a) or distributed.is_dtensor(b)) and a.dim() == 2
        m, n, w = b.shape[0], a.shape[1], a.shape[0]
        ok = ok and structured_shape(m, n, layer.rank) and b.shape[1] == w
        # the step's grouping (_group_layers), so that each of its groups is one buffer
        keys.append((m, n, layer.rank, layer.offset, w, a.dtype, a.device) if ok else None)
    for key, idx in group_indices(keys).items():
        if key is None:
            continue
        m, n, _, _, w, dtype, device = key
        A, B = [layers[k].a for k in idx], [layers[k].b for k in idx]
        if _packed(A, w, n, False) is not None and _packed(B, w, m, True) is not None:
            continue  # packed so already (e.g. by an earlier optimizer)
        pa = torch.empty(len(idx), w, n, dtype=dtype, device=device)
        pb = torch.empty(len(idx), w, m, dtype=dtype, device=device)
        for j, k in enumerate(idx):
            a, b = layers[k].a, layers[k].b
            pa[j].copy_(a.data)
            pb[j].copy_(b.data.mT)
            a.data = pa[j]
            b.data = pb[j].mT
    for layer in layers:
        for name in ("lora_A", "lora_B"):
            module = layer.module._modules[name]._modules[layer.adapter]  # type: ignore[union-attr]
            if not getattr(module, "_riemannlora_standalone_state", False):
                module.register_state_dict_post_hook(_standalone_state)
                module._riemannlora_standalone_state = True  # type: ignore[assignment]


def _standalone_state(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """``state_dict`` post-hook of the factors' modules: a factor that is a view into a larger
    buffer (:func:`_pack_factors_`) or not contiguous (``lora_B``) is returned as a contiguous
    copy of its own, so that ``safetensors`` (which refuses shared or strided tensors) and
    Accelerate's checkpoints (which drop all but one of the tensors that share a storage)
    get every factor whole. ``keep_vars=True`` still returns the Parameters themselves."""
    key = prefix + "weight"
    t = state_dict.get(key)
    if t is None or isinstance(t, nn.Parameter) or distributed.is_dtensor(t):
        return
    if (
        not t.is_contiguous()
        or t.storage_offset() != 0
        or t.untyped_storage().nbytes() != t.numel() * t.element_size()
    ):
        state_dict[key] = t.clone(memory_format=torch.contiguous_format)


def _packed(ts: list[Tensor], rows: int, cols: int, transposed: bool) -> Tensor | None:
    """The ``(L, rows, cols)`` buffer of :func:`_pack_factors_` whose per-layer blocks are
    ``ts`` (transposed ones for ``lora_B``), in this order; None if they are not laid out so."""
    t0 = ts[0]
    storage = t0.untyped_storage()
    base = t0.storage_offset()
    size = rows * cols
    stride = (1, cols) if transposed else (cols, 1)
    for i, t in enumerate(ts):
        if (
            t.untyped_storage().data_ptr() != storage.data_ptr()
            or t.storage_offset() != base + i * size
            or t.stride() != stride
        ):
            return None
    if (base + len(ts) * size) * t0.element_size() > storage.nbytes():
        return None
    return t0.new_empty(0).set_(storage, base, (len(ts), rows, cols), (size, cols, 1))


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def _check_beta(name: str, value: Any) -> None:
    check_number(name, value)
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


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
        _check_beta("momentum", momentum)
        check_number("weight_decay", weight_decay, low=0.0)
        _check_bool("nesterov", nesterov)
        if nesterov and not momentum:
            raise ValueError("nesterov=True requires momentum > 0")
        if adamw_lr is not None:
            check_number("adamw_lr", adamw_lr, low=0.0, strict=True)
        if not isinstance(adamw_betas, tuple | list) or len(adamw_betas) != 2:
            raise ValueError(f"adamw_betas must be a pair (beta1, beta2), got {adamw_betas!r}")
        for k, beta in enumerate(adamw_betas):
            _check_beta(f"adamw_betas[{k}]", beta)
        check_number("adamw_eps", adamw_eps, low=0.0)
        check_number("adamw_weight_decay", adamw_weight_decay, low=0.0)
        self._init_guard(nonfinite)

        layers = to_manifold(model, generator=generator)
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            # no process group, so no DDP/FSDP wrapper yet (DDP built before a change of a
            # parameter's layout reduces its gradients wrongly; FSDP2 takes only contiguous
            # parameters): the factors packed, lora_B column-major, see _pack_factors_
            _pack_factors_(layers)
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
        self._layers: list[ManifoldLayer] = layers
        # where each layer's factors live (module dict, adapter): the per-step check that they
        # were not replaced, without nn.Module.__getattr__
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
        # per group of equal-shape layers: the stacked momentum buffers of the last step and the
        # views of them held in self.state (reused while the state still holds those views)
        self._momentum_cache: dict[tuple[Any, ...], _MomentumCache] = {}
        #: the factors' version counters after this optimizer's last write, per group
        self._versions: dict[tuple[Any, ...], list[int]] = {}
        self._workspaces: dict[tuple[Any, ...], _Workspace] = {}
        self._arenas: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self._grouping: _Grouping | None = None
        self._step_cache: dict[tuple[Any, ...], Any] = {}
        self._watch = _RegistrationWatch()
        #: torch's AdamW for the plain parameters' groups (created at their first step)
        self._adamw: torch.optim.AdamW | None = None

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
        plans = [self._plan(g) if g["manifold"] else None for g in self.param_groups]
        # what the guard checks: the raw gradients, except that a structured group of layers is
        # checked through the sums of its stacked gradient blocks (the only parts of the
        # gradients the step reads), a single reduction instead of one per tensor
        tensors: list[Tensor] = []
        labels: list[Any] = []
        like: list[Tensor] = []
        for group, plan in zip(self.param_groups, plans):
            if plan is None:
                ps = [p for p in group["params"] if p.grad is not None]
            else:
                ps = []
                for item in plan:
                    if item.ws is None:
                        ps += [p for pair in zip(item.A, item.B) for p in pair]
                        continue
                    tensors.append(torch.stack([item.ws.GQt.sum(), item.ws.GtUt.sum()]))
                    labels.append(item)
            tensors += [p.grad for p in ps]
            labels += ps
            like += ps

        def names() -> list[str]:
            return [
                self._bad_group_grads(x)
                if isinstance(x, _GroupPlan)
                else f"gradient of {self._names.get(id(x), 'a parameter')}"
                for x in labels
            ]

        if not self._step_allowed(tensors, names, sharded_like=like):
            return loss
        for plan in plans:
            if plan is not None:
                self._manifold_step(plan)
        self._adamw_step([g for g in self.param_groups if not g["manifold"]])
        return loss

    def _bad_group_grads(self, item: _GroupPlan) -> str:
        """Names the factors of a structured group whose gradient blocks are not finite (the
        slow path of a failed check)."""
        r = item.key[2]
        blocks = [(a, a.grad[r : 2 * r]) for a in item.A] + [(b, b.grad[:, :r]) for b in item.B]
        bad = [
            self._names.get(id(p), "a LoRA factor")
            for p, block in blocks
            if not bool(torch.isfinite(block).all())
        ]
        return "gradient of " + (", ".join(bad) if bad else f"one of {len(blocks)} LoRA factors")

    def _plan(self, group: dict[str, Any]) -> list[_GroupPlan]:
        """The manifold layers with gradients, grouped by shape (rank, offset, dtype, device and
        process group) with their step settings; a structured group also gets its stacked
        momentum and its workspace with the gradient blocks. Raises before anything changes on
        replaced factors or a layer with only one gradient."""
        params = group["params"]
        groups = self._cached_grouping(params)
        cached = groups is not None
        if groups is None:
            groups = self._group_layers(group)
        lr, wd, beta = float(group["lr"]), group["weight_decay"], group["momentum"]
        plan = []
        for key, ks in groups:
            m, n = key[0], key[1]
            A = [params[2 * k] for k in ks]
            B = [params[2 * k + 1] for k in ks]
            mult = lr_multiplier(group.get("scale_lr"), m, n)
            kw = {
                "lr": lr * mult,
                # decoupled decay with the unscaled lr, as torch's Muon: X (1 - lr wd) - step_lr D
                # (written as wd / mult so that lr = 0, e.g. at the start of a warmup, works)
                "weight_decay": wd / mult,
                "momentum": beta,
                "dampening": beta if self._damped else 0.0,
                "nesterov": group["nesterov"],
                "orthogonalize": self._orthogonalize,
                "store_orthogonalized": group.get("store_orthogonalized", False),
            }
            plan.append(_GroupPlan(key, A, B, kw))
        structured = [item for item in plan if item.structured]
        for item in structured:
            if item.kw["momentum"]:
                item.mom, item.fresh = self._stacked_momentum(item.key, item.A, item.B)
            item.cdt = compute_dtype(item.A[0], *([] if item.mom is None else [item.mom.Pt]))
        cached = self._reserve_arenas(structured) and cached
        for item in structured:
            self._stack_group(item, cached)
        return plan

    def _reserve_arenas(self, items: list[_GroupPlan]) -> bool:
        """Makes the shared buffers (per compute dtype and device) large enough for every
        group; returns False when one had to grow (the cached workspaces then point into the
        old one and are rebuilt)."""
        need: dict[tuple[torch.dtype, torch.device], int] = {}
        for item in items:
            where = (item.cdt, item.A[0].device)
            need[where] = max(
                need.get(where, 0), _Workspace.arena_size(item.A, item.B, item.key[2])
            )
        kept = True
        for where, size in need.items():
            arena = self._arenas.get(where)
            if arena is None or arena.numel() < size:
                self._arenas[where] = torch.empty(size, dtype=where[0], device=where[1])
                kept = False
        if not kept:
            self._workspaces.clear()
        return kept

    def _cached_grouping(
        self, params: list[Tensor]
    ) -> list[tuple[tuple[Any, ...], list[int]]] | None:
        """The grouping of the last step when nothing it depends on changed: the same parameter
        objects with the same storage, still the factors of their layers, all with gradients
        (the common case; checked in one pass, with no per-layer tensor ops)."""
        cache = self._grouping
        if (
            cache is None
            or len(params) != len(cache.params)
            or not all(map(operator.is_, params, cache.params))
            or any(map(operator.is_, map(_GRAD, params), repeat(None)))
        ):
            return None
        epoch = self._watch.epoch
        if cache.epoch != epoch:
            mods, adapters = self._slots
            try:
                same = all(
                    all(map(operator.is_, _slot_weights(mods, name, adapters), factors))
                    for name, factors in (("lora_A", params[0::2]), ("lora_B", params[1::2]))
                )
            except (KeyError, AttributeError):
                return None
            if not same:
                return None
            cache.epoch = epoch
        if list(map(_DATA_PTR, params)) != cache.ptrs:
            return None
        return cache.groups

    def _group_layers(self, group: dict[str, Any]) -> list[tuple[tuple[Any, ...], list[int]]]:
        """:meth:`_cached_grouping` from scratch, layer by layer (with the errors), cached when
        every layer has gradients."""
        params = group["params"]
        ranks, offsets = group["ranks"], group["offsets"]
        active: list[int] = []
        keys = []
        for k, layer in enumerate(self._layers):
            a, b = params[2 * k], params[2 * k + 1]
            if _factor(layer, "lora_A") is not a or _factor(layer, "lora_B") is not b:
                raise RuntimeError(
                    f"the LoRA factors of {layer.name!r} were replaced after this optimizer was "
                    "created (e.g. by riemannlora.init_loi or to_manifold(with_offset=True)); "
                    "create the optimizer after initializing the model"
                )
            if a.grad is None and b.grad is None:
                continue
            if a.grad is None or b.grad is None:
                raise RuntimeError(f"{layer.name!r}: only one of lora_A/lora_B has a gradient")
            active.append(k)
            pg = distributed.pair_group(a, b, repr(layer.name))
            keys.append((b.shape[0], a.shape[1], ranks[k], offsets[k], a.dtype, a.device, pg))
        groups = [([active[i] for i in idx], key) for key, idx in group_indices(keys).items()]
        out = [(key, ks) for ks, key in groups]
        cacheable = len(active) == len(self._layers) and all(key[-1] is None for key in keys)
        self._grouping = (
            _Grouping(list(params), list(map(_DATA_PTR, params)), out, self._watch.epoch)
            if cacheable
            else None
        )
        return out

    def _manifold_step(self, plan: list[_GroupPlan]) -> None:
        sharded: dict[Any, list[tuple[tuple[Any, ...], distributed.ShardedManifoldGroup]]] = {}
        for item in plan:
            key, A, B, kw = item.key, item.A, item.B, item.kw
            m, n, r, _, dtype, _, pg = key
            if pg is not None:
                sharded.setdefault(pg, []).append((key, self._sharded_group(A, B, r, kw)))
                continue
            if item.ws is not None:
                self._structured_group(item)
            else:
                self._literal_group(A, B, m, n, r, dtype, kw)
            self._count_step(key, B)
        for pg, items in sharded.items():
            distributed.manifold_step_sharded([g for _, g in items], pg)
            for key, g in items:
                self._store_sharded_momentum(g)
                self._count_step(key, g.B)

    def _sharded_group(
        self, A: list[Tensor], B: list[Tensor], r: int, kw: dict[str, Any]
    ) -> distributed.ShardedManifoldGroup:
        """A group of FSDP2-sharded layers with its momentum (local rows of the left factors,
        whole right factors) for :func:`riemannlora.distributed.manifold_step_sharded`."""
        Pm = Rmt = None
        lefts = [self._plain_left(b) for b in B]
        rights = [self.state[a].get("momentum_right") for a in A]
        present = [x for x in lefts if x is not None]
        if kw["momentum"] and present:
            ref = present[0]
            Pm = torch.stack(
                [
                    ref.new_zeros(distributed.local(b).shape[0], 2 * r) if x is None else x
                    for b, x in zip(B, lefts)
                ]
            )
            n = A[0].shape[1]
            Rmt = torch.stack(
                [ref.new_zeros(2 * r, n) if x is None else distributed.local(x).mT for x in rights]
            )
        cdt = compute_dtype(distributed.local(A[0]), *([] if Pm is None else [Pm]))
        return distributed.ShardedManifoldGroup(A, B, r, kw, Pm, Rmt, cdt)

    def _store_sharded_momentum(self, g: distributed.ShardedManifoldGroup) -> None:
        """The new momentum of a sharded group as DTensors: ``momentum_left`` ``(m, 2r)``
        row-sharded like ``lora_B``, ``momentum_right`` ``(n, 2r)`` replicated."""
        if g.P_out is None or g.Rt_out is None:
            return
        r = g.rank
        for j, (a, b) in enumerate(zip(g.A, g.B)):
            self.state[b]["momentum_left"] = distributed.wrap_rows(g.P_out[j], b, (g.m, 2 * r))
            self.state[a]["momentum_right"] = distributed.wrap_replicated(g.Rt_out[j].mT, a)
            self._drop_core(a, b)

    def _plain_left(self, b: Tensor) -> Tensor | None:
        """A layer's ``momentum_left`` with its core folded in (``M = left core right^T``), as
        a local tensor: the plain factor pair ``M = Pm Rm^T`` of the literal and sharded
        paths."""
        st = self.state[b]
        left = st.get("momentum_left")
        if left is None:
            return None
        left = distributed.local(left)
        core = st.get("momentum_core")
        return left if core is None else left @ distributed.local(core).to(left)

    def _drop_core(self, a: Tensor, b: Tensor) -> None:
        """Removes what only the structured path keeps (core, transport coefficients) from the
        state of a layer whose momentum is stored as a plain factor pair."""
        for key in ("momentum_core", "transport_left"):
            self.state[b].pop(key, None)
        self.state[a].pop("transport_right", None)

    def _count_step(self, key: tuple[Any, ...], B: list[Tensor]) -> None:
        """``state[b]["step"] += 1`` for a group: the counters are 0-d views of one tensor per
        group, incremented by a single op while the state still holds exactly those views."""
        steps = list(map(_state_get("step"), map(self.state.__getitem__, B)))
        cached = self._step_cache.get(key)
        if (
            cached is not None
            and len(cached[1]) == len(steps)
            and all(map(operator.is_, steps, cached[1]))
        ):
            cached[0].add_(1.0)
            return
        zero = torch.tensor(0.0)
        counts = torch.stack([zero if x is None else x.reshape(()) for x in steps]).add_(1.0)
        views = counts.unbind(0)
        for b, view in zip(B, views):
            self.state[b]["step"] = view
        self._step_cache[key] = (counts, views)

    def _stack_group(self, item: _GroupPlan, cached: bool) -> None:
        """The workspace of a structured group, into which its gradient blocks ``(G Q)^T``,
        ``(G^T U)^T`` are gathered (the workspace of the last step when the grouping is
        ``cached`` and it still matches)."""
        key, A, B, cdt = item.key, item.A, item.B, item.cdt
        r = key[2]
        # a cached grouping has checked that the parameters (objects, storage) are unchanged
        ws = self._workspaces.get(key) if cached else None
        item.cached = ws is not None and ws.cdt == cdt
        if ws is None or ws.cdt != cdt:
            ws = _Workspace.build(A, B, r, cdt, self._arenas[(cdt, A[0].device)])
            if cached or self._grouping is not None:
                self._workspaces[key] = ws
            # Z1 = 0 always: nothing but to_manifold writes it, so it is reset here, once per
            # new workspace, instead of every step
            torch._foreach_zero_([b[:, :r] for b in B])
        torch.stack(_left_blocks_t(list(map(_GRAD, B)), r), out=ws.GQt)
        torch.stack([a.grad[r : 2 * r] for a in A], out=ws.GtUt)
        item.ws = ws

    def _structured_group(self, item: _GroupPlan) -> None:
        """One group of equal-shape layers by :func:`structured_step`, in its workspace. The
        momentum buffers of the group are stacked once and then updated in place every step
        while the state still holds exactly their views.

        The momentum's transport coefficients (``cu``, ``cq``, see :class:`Momentum`) of the
        last step are used as they are when nothing can have moved the point since this
        optimizer wrote it: the state holds this optimizer's buffers, the parameters are the
        same objects with the same storage, and their version counters (which every in-place
        change through the parameters bumps: ``copy_``, ``load_state_dict``, ``nn.init``)
        are unchanged. Otherwise (after ``load_state_dict`` of either, or a change of the
        factors) they are computed from the point and the momentum's bases, and the stored ones
        are kept only when they agree (a resumed run then steps bit for bit as the one that
        saved it)."""
        key, A, B, kw, cdt, ws = item.key, item.A, item.B, item.kw, item.cdt, item.ws
        assert ws is not None
        m, n, r = key[0], key[1], key[2]
        L = len(A)
        # every tall block transposed ("wide", see structured_step): U^T = pb[:, r:],
        # Q^T = pa[:, :r], V^T = pa[:, r:], the parameters' own memory when they are packed;
        # lr = 0 (e.g. the first warmup step) keeps the point exactly: the step then works on
        # copies and nothing is written back (the momentum still moves)
        moves = kw["lr"] != 0
        in_place = moves and ws.packed
        pa, pb = ws.point(in_place)
        Ut, Qt, Vt = pb[:, r:], pa[:, :r], pa[:, r:]
        mom, fresh = item.mom, item.fresh
        if mom is not None and mom.Pt.dtype != cdt:
            mom = Momentum(
                *(
                    None if x is None else x.to(cdt)
                    for x in (mom.Pt, mom.Rt, mom.core, mom.cu, mom.cq)
                ),
                in_span=mom.in_span,
            )
            fresh = True
        if mom is not None:
            fast = (
                not fresh
                and item.cached
                and mom.in_span
                and self._versions.get(key) == _versions(A, B)
            )
            if not fast:
                mom = self._check_transport(mom, Ut, Qt)
            out = Momentum(mom.Pt, mom.Rt, mom.core)
            if out.core is None:
                out.core = ws.GQt.new_empty(L, 2 * r, 2 * r)
        elif kw["momentum"]:
            out = Momentum.empty(ws.GQt, L, r, m, n)
        else:
            out = None
        # the new point lands in pa and pb (on every path)
        _, _, _, coords = structured_step(
            Ut,
            Qt,
            Vt,
            ws.GQt,
            ws.GtUt,
            mom,
            out,
            scratch=ws.scratch,
            packed=(pa, pb, ws.y_scratch),
            **kw,
        )
        if in_place:  # written through the buffers: tell autograd the factors changed
            torch.autograd.graph.increment_version(chain(A, B))
        elif moves:
            ws.write_back()
        elif kept_in_bases(kw["momentum"], kw["nesterov"], kw["store_orthogonalized"]):
            # the momentum's bases [Qd | U], [Q | Qv] hold the old point: U = [Qd | U] [0; I],
            # Q = [Q | Qv] [I; 0]
            eye = torch.eye(r, dtype=cdt, device=pa.device).expand(L, r, r)
            zero = torch.zeros_like(eye)
            coords = (torch.cat([zero, eye], -2), torch.cat([eye, zero], -2))
        self._versions[key] = _versions(A, B)
        if out is None:
            return
        self._keep_momentum(key, A, B, out, coords, fresh)

    def _keep_momentum(
        self,
        key: tuple[Any, ...],
        A: list[Tensor],
        B: list[Tensor],
        out: Momentum,
        coords: tuple[Tensor, Tensor] | None,
        fresh: bool,
    ) -> None:
        """Keeps a group's new momentum (updated in place in ``out``'s buffers) and the point's
        coordinates in its bases (into buffers kept with it); ``self.state`` holds per-layer
        views of them, assigned anew only when the buffers or the presence of the coordinates
        changed."""
        cached = self._momentum_cache.get(key)
        last = cached.mom if cached is not None and not fresh else None
        cu = cq = None
        if coords is not None:
            if last is not None and last.cu is not None and last.cq is not None:
                cu, cq = last.cu.copy_(coords[0]), last.cq.copy_(coords[1])
            else:
                cu, cq = coords[0].clone(), coords[1].clone()
        assert out.core is not None
        mom = Momentum(out.Pt, out.Rt, out.core, cu, cq, in_span=cu is not None)
        if cached is not None and last is not None and last.Pt is out.Pt and last.cu is cu:
            cached.mom = mom  # the state holds views of these very buffers
            return
        lefts, rights, cores = out.Pt.mT.unbind(0), out.Rt.mT.unbind(0), out.core.unbind(0)
        cus = cu.unbind(0) if cu is not None else (None,) * len(A)
        cqs = cq.unbind(0) if cq is not None else (None,) * len(A)
        for a, b, left, right, c, tu, tq in zip(A, B, lefts, rights, cores, cus, cqs):
            sb, sa = self.state[b], self.state[a]
            sb["momentum_left"], sa["momentum_right"], sb["momentum_core"] = left, right, c
            if tu is None:
                sb.pop("transport_left", None)
                sa.pop("transport_right", None)
            else:
                sb["transport_left"], sa["transport_right"] = tu, tq
        self._momentum_cache[key] = _MomentumCache(mom, (lefts, rights, cores, cus, cqs))

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

    def _stacked_momentum(
        self, key: tuple[Any, ...], A: list[Tensor], B: list[Tensor]
    ) -> tuple[Momentum | None, bool]:
        """The momentum of a group, stacked (None: no momentum yet), and whether it is
        ``fresh``: a new stack of the state's tensors, not the buffers of the previous step
        whose views the state still holds exactly (same layout either way, so a resumed run is
        bitwise the same). The transport coefficients of a fresh stack are those of the state,
        if every layer has them (``in_span`` claimed, to be checked)."""
        states_b = list(map(self.state.__getitem__, B))
        states_a = list(map(self.state.__getitem__, A))
        lefts = list(map(_state_get("momentum_left"), states_b))
        cached = self._momentum_cache.get(key)
        if cached is not None and len(cached.views[0]) == len(lefts):
            lv, rv, cv, uv, qv = cached.views
            if all(
                all(map(operator.is_, map(_state_get(name), states), views))
                for name, states, views in (
                    ("momentum_right", states_a, rv),
                    ("momentum_core", states_b, cv),
                    ("transport_left", states_b, uv),
                    ("transport_right", states_a, qv),
                )
            ) and all(map(operator.is_, lefts, lv)):
                return cached.mom, False
        present = [x for x in lefts if x is not None]
        if not present:
            return None, True
        ref = present[0]
        m, n, r = key[0], key[1], key[2]
        rights = [st.get("momentum_right") for st in states_a]
        lefts = [ref.new_zeros(m, 2 * r) if x is None else x for x in lefts]
        rights = [ref.new_zeros(n, 2 * r) if x is None else x for x in rights]
        mom = Momentum(torch.stack([x.mT for x in lefts]), torch.stack([x.mT for x in rights]))
        cores = [st.get("momentum_core") for st in states_b]
        if any(x is not None for x in cores):
            eye = torch.eye(2 * r, dtype=ref.dtype, device=ref.device)
            mom.core = torch.stack([eye if x is None else x.to(ref) for x in cores])
        cus = [st.get("transport_left") for st in states_b]
        cqs = [st.get("transport_right") for st in states_a]
        if all(x is not None for x in cus + cqs):
            mom.cu = torch.stack([x.to(ref) for x in cus])  # type: ignore[union-attr]
            mom.cq = torch.stack([x.to(ref) for x in cqs])  # type: ignore[union-attr]
            mom.in_span = True
        return mom, True

    def _literal_group(
        self,
        A: list[Tensor],
        B: list[Tensor],
        m: int,
        n: int,
        r: int,
        dtype: torch.dtype,
        kw: dict[str, Any],
    ) -> None:
        """One group by the spec's literal formulas (``2r > min(m, n)``)."""
        U = torch.stack([b[:, r : 2 * r] for b in B])
        V = torch.stack([a[r : 2 * r].mT for a in A])
        Q = torch.stack([a[:r].mT for a in A])
        GQ = torch.stack([b.grad[:, :r] for b in B])
        GtU = torch.stack([a.grad[r : 2 * r].mT for a in A])
        lefts = [self._plain_left(b) for b in B]
        rights = [self.state[a].get("momentum_right") for a in A]
        Pm = Rm = None
        present = [x for x in lefts if x is not None]
        if present:
            ref = present[0]
            Pm = torch.stack([ref.new_zeros(m, 2 * r) if x is None else x for x in lefts])
            Rm = torch.stack([ref.new_zeros(n, 2 * r) if x is None else x for x in rights])
        U_new, V_new, Q_new, Pm_new, Rm_new = manifold_step(
            U, V, Q, GQ, GtU, Pm, Rm, structured=False, **kw
        )
        torch._foreach_zero_([b[:, :r] for b in B])  # Z1 stays 0
        if kw["lr"] != 0:  # lr = 0 keeps the point exactly
            torch._foreach_copy_([b[:, r : 2 * r] for b in B], list(U_new.to(dtype).unbind(0)))
            torch._foreach_copy_([a[:r] for a in A], list(Q_new.mT.to(dtype).unbind(0)))
            torch._foreach_copy_([a[r : 2 * r] for a in A], list(V_new.mT.to(dtype).unbind(0)))
        if Pm_new is not None and Rm_new is not None:
            for j, (a, b) in enumerate(zip(A, B)):
                self.state[b]["momentum_left"] = Pm_new[j]
                self.state[a]["momentum_right"] = Rm_new[j]
                self._drop_core(a, b)

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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict after checking it was saved by this optimizer class for the same
        manifold layers and parameters, with finite values of the right shapes (nothing is
        loaded otherwise); the momentum factors keep their saved (compute) dtype."""
        groups, state = check_state_dict_header(self, state_dict)
        cls = type(self).__name__
        for mine, saved in zip(self.param_groups, groups):
            if not isinstance(saved, dict) or len(saved.get("params", ())) != len(mine["params"]):
                raise ValueError(
                    "optimizer state dict does not match this optimizer's parameters (different "
                    "number of parameters in a group): it was saved for another model"
                )
            if bool(saved.get("manifold")) != mine["manifold"]:
                raise ValueError("optimizer state dict was saved by another optimizer class")
            if mine["manifold"]:
                if {k for k in _CLASS_KEYS if k in saved} != {k for k in _CLASS_KEYS if k in mine}:
                    raise ValueError(
                        f"optimizer state dict was saved by another manifold optimizer than "
                        f"{cls} (Riemannion and RiemannianSGD keep different momenta)"
                    )
                for key in ("layer_names", "ranks", "offsets"):
                    if list(saved.get(key, [])) != list(mine[key]):
                        raise ValueError(
                            f"optimizer state dict does not match this model's manifold layers "
                            f"({key} differ: saved {saved.get(key)!r}, model {mine[key]!r}). "
                            "Convert the model the same way first (with_offset=True for a run "
                            "started with init_loi)."
                        )
            for k, (idx, p) in enumerate(zip(saved["params"], mine["params"])):
                st = state.get(idx, {})
                for key, value in st.items() if isinstance(st, dict) else ():
                    if not isinstance(value, Tensor):
                        continue
                    name = self._names.get(id(p), f"parameter of shape {tuple(p.shape)}")
                    if mine["manifold"] and key in _MOMENTUM_KEYS:
                        r = mine["ranks"][k // 2]
                        expected: tuple[int, ...] = {
                            "momentum_left": (p.shape[0], 2 * r),
                            "momentum_right": (p.shape[1], 2 * r),
                            "momentum_core": (2 * r, 2 * r),
                        }.get(key, (2 * r, r))
                    else:
                        expected = () if value.dim() == 0 else tuple(p.shape)
                    if tuple(value.shape) != expected:
                        raise ValueError(
                            f"optimizer state '{key}' of {name} has shape {tuple(value.shape)}, "
                            f"expected {expected}: the state dict is from another model or rank"
                        )
                    if value.is_floating_point() and not bool(
                        torch.isfinite(distributed.local(value)).all()
                    ):
                        raise ValueError(
                            f"optimizer state '{key}' of {name} holds NaN/Inf: the checkpoint "
                            "is corrupt; nothing was loaded"
                        )
        super().load_state_dict(state_dict)
        for mine, saved in zip(self.param_groups, groups):
            if not mine["manifold"]:
                continue
            for idx, p in zip(saved["params"], mine["params"]):
                for key, value in state_dict["state"].get(idx, {}).items():
                    if key in _MOMENTUM_KEYS:
                        self.state[p][key] = value.to(device=p.device)


class Riemannion(_ManifoldOptimizer):
    r"""Riemannion: Muon's orthogonalized momentum on the manifold of rank-r matrices.

    For each LoRA layer, with ``X = U V^T`` the effective delta and ``P_X`` the projection onto
    its tangent space::

        M_t   = beta P_X(M_{t-1}) + P_X(G_t)
        D_t   = beta M_t + P_X(G_t)   if nesterov  else  M_t
        X    <- rank-r truncated SVD of  X (1 - lr wd) - lr_l P_X(msign(D_t))

    with ``lr_l = lr`` or ``lr * 0.2 sqrt(max(m, n))`` (``scale_lr="match_adamw"``). The
    trajectory of X is the same for every factorization of the starting point.

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
        lr: learning rate (> 0; paper: 1e-4 for Llama-3-8B). LR schedulers work as usual.
        momentum: beta in ``[0, 1)`` (0.9).
        weight_decay: decoupled weight decay of X (``>= 0``; paper: 0.00316).
        nesterov: Nesterov-style update ``beta M + grad``.
        store_orthogonalized: keep ``P_X(msign(D_t))`` as the momentum (the paper's algorithm
            box) instead of the raw ``M_t`` (default, as Muon).
        scale_lr: None or ``"match_adamw"``.
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
        scale_lr: str | None = None,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        generator: torch.Generator | None = None,
        nonfinite: str = "skip",
    ) -> None:
        _check_bool("store_orthogonalized", store_orthogonalized)
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


class RiemannianSGD(_ManifoldOptimizer):
    r"""Riemannian SGD with momentum on the manifold of rank-r matrices (no orthogonalization)::

        M_t = beta P_X(M_{t-1}) + (1 - beta) P_X(G_t)
        D_t = beta M_t + (1 - beta) P_X(G_t)   if nesterov  else  M_t
        X  <- rank-r truncated SVD of  X (1 - lr wd) - lr D_t

    ``momentum=0`` is plain Riemannian gradient descent. Everything else (conversion, other
    parameters, state, arguments) is as :class:`Riemannion`.
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
            adamw_lr,
            adamw_betas,
            adamw_eps,
            adamw_weight_decay,
            generator,
            nonfinite,
        )
