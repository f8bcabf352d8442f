"""The plan of a manifold optimizer's step, kept between steps: one cache object per param group.

A manifold param group's layers with gradients are grouped by :class:`GroupKey` (shape, rank,
offset, dtype, device, process group); each :class:`LayerGroup` steps as one stack. A
structured group (not sharded, ``2r <= min(m, n)``) steps in a :class:`Workspace`, with its
momentum stacked in buffers that the step updates in place and of which ``state`` holds
per-layer views (:mod:`riemannlora.optim._momentum`); :mod:`riemannlora.optim._group_step`
runs it.

:class:`ManifoldPlan` holds all of it, and :meth:`ManifoldPlan.reusable` is its one
invalidation rule: the plan is reused while the param group holds the same parameter objects
with the same storage, each still the factor of its layer, all with gradients, with the version
counters of the optimizer's last write, and ``state`` holds exactly the tensors the plan put
there (or stacked its buffers from). Anything else (new factors, a change through the
parameters, ``load_state_dict``, a layer without gradients, sharded factors) rebuilds it from
the parameters and ``state``. In-place changes through the parameters bump their version
counters, so the momentum's transport is then computed from the point; a change through
``p.data`` in place, which no counter records, is read by the step all the same.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from riemannlora import distributed
from riemannlora.core.geometry import compute_dtype
from riemannlora.core.manifold_step import Momentum, StepConfig, structured_shape
from riemannlora.manifold import ManifoldLayer
from riemannlora.manifold.layers import group_indices
from riemannlora.optim._momentum import (
    STATE_KEYS_A,
    STATE_KEYS_B,
    points_match,
    stack_momentum,
)
from riemannlora.optim._packing import packed_buffer

__all__ = ["GroupKey", "LayerGroup", "ManifoldPlan", "RegistrationWatch", "Workspace"]

# C-level accessors for the per-step checks over every layer (no Python frame per layer)
GRAD = operator.attrgetter("grad")
_VERSION = operator.attrgetter("_version")
_MODULES = operator.attrgetter("_modules")
_PARAMS = operator.attrgetter("_parameters")
_WEIGHT = operator.itemgetter("weight")
_DATA_PTR = operator.methodcaller("data_ptr")
_STRIDE = operator.methodcaller("stride")


class GroupKey(NamedTuple):
    """What layers must share to step as one stack."""

    m: int
    n: int
    rank: int
    offset: bool
    dtype: torch.dtype
    device: torch.device
    process_group: Any  # None: whole factors

    @property
    def structured(self) -> bool:
        """Stepped by the structured kernel in a workspace (not sharded, ``2r <= min(m, n)``)."""
        return self.process_group is None and structured_shape(self.m, self.n, self.rank)


class RegistrationWatch:
    """Counts the submodules and parameters registered on any module of the process
    (``nn.Module.__setattr__``, ``add_module``, ``register_parameter``, ``ModuleDict``
    assignment) through torch's global registration hooks, for as long as it lives: the hooks
    are removed by :meth:`close` or when the watch is garbage-collected (with its optimizer).
    While ``epoch`` stands still, no factor module or weight can have been replaced, and the
    per-step check that each layer still holds the optimizer's factors (a walk over every
    layer's modules, slow on a cold cache) is skipped."""

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

    def close(self) -> None:
        """Removes the hooks now (idempotent)."""
        self._finalizer()


def _remove_hooks(handles: tuple[Any, ...]) -> None:
    for handle in handles:
        handle.remove()


@dataclass(eq=False)
class Workspace:
    """The buffers a structured group of layers steps in, kept with the plan. Every buffer is
    contiguous, in the compute dtype (a step writes its products into them; CPU ``bmm`` into a
    slice of a larger batch goes through a temporary).

    The point lives in ``pa`` ``(L, 2r, n)`` (``[Q^T; V^T]`` per layer: the ``lora_A``
    factors) and ``pb`` ``(L, 2r, m)`` (``[Z1^T; U^T]``: the transposed ``lora_B`` factors).
    When the factors are packed (:func:`~riemannlora.optim._packing.pack_factors_`) these are
    the parameters' own buffers (``packed``), which the step reads and writes in place;
    otherwise they are buffers of the workspace (``own_pa``, ``own_pb``) into which the factors
    are stacked and from which they are copied back, layer by layer. Either way the step's
    arithmetic is the same."""

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
    ) -> Workspace:
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
        pa = packed_buffer(A, w, n, transposed=False) if A[0].dtype == cdt else None
        pb = packed_buffer(B, w, m, transposed=True) if B[0].dtype == cdt else None
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

    def gather_gradients(self, A: list[Tensor], B: list[Tensor], r: int) -> None:
        """Stacks the gradient blocks the step reads, ``(G Q)^T`` and ``(G^T U)^T``."""
        torch.stack(_left_blocks_t(list(map(GRAD, B)), r), out=self.GQt)
        torch.stack([a.grad[r : 2 * r] for a in A], out=self.GtUt)

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


def _left_blocks_t(grads: list[Tensor], r: int) -> list[Tensor]:
    """``(G Q)^T = grad[:, :r].mT`` of every ``lora_B`` gradient ``(m, w)``: one ``as_strided``
    view each when all are column-major like their factors (the usual case; cheaper than
    slicing and transposing, which adds up over hundreds of layers every step)."""
    m = grads[0].shape[0]
    if all(map(operator.eq, map(_STRIDE, grads), repeat((1, m)))):
        return list(map(operator.methodcaller("as_strided", (r, m), (m, 1)), grads))
    return [g[:, :r].mT for g in grads]


@dataclass(eq=False)
class LayerGroup:
    """Layers stepped together: ``A``, ``B`` their factors, ``cfg`` this step's settings; a
    structured group also has its workspace ``ws`` and its stacked momentum ``mom`` (None: no
    momentum yet), in the compute dtype ``cdt``. ``fresh``: ``mom`` and the step counters were
    stacked from ``state`` and the state does not hold views of them yet. ``counts``: the
    stacked step counters; ``held``: per key of ``STATE_KEYS_B + STATE_KEYS_A``, the tensors of
    the layers' states that this group wrote or stacked its buffers from."""

    key: GroupKey
    A: list[Tensor]
    B: list[Tensor]
    cfg: StepConfig = field(default_factory=lambda: StepConfig(lr=0.0))
    ws: Workspace | None = None
    mom: Momentum | None = None
    cdt: torch.dtype = torch.float32
    fresh: bool = True
    counts: Tensor | None = None
    held: tuple[tuple[Any, ...], ...] = ()
    #: the state came with the fingerprint of exactly this point (a resumed run): its
    #: transport coordinates are used as stored, as the run that saved it would have
    exact_point: bool = False

    def states(self, state: dict[Tensor, dict[str, Any]]) -> tuple[list[Any], list[Any]]:
        """The per-layer state dicts of ``lora_B`` and ``lora_A`` (created where missing)."""
        return list(map(state.__getitem__, self.B)), list(map(state.__getitem__, self.A))

    def _held_now(self, state: dict[Tensor, dict[str, Any]]) -> Any:
        """Per key of ``STATE_KEYS_B + STATE_KEYS_A``, an iterator over the layers' entries
        (None where absent; no state dict is created)."""
        for keys, params in ((STATE_KEYS_B, self.B), (STATE_KEYS_A, self.A)):
            states = [state.get(p, _NO_STATE) for p in params]
            for key in keys:
                yield map(operator.methodcaller("get", key), states)

    def remember(self, state: dict[Tensor, dict[str, Any]]) -> None:
        """Records what the layers' states hold now (see :meth:`holds`)."""
        self.held = tuple(map(tuple, self._held_now(state)))

    def holds(self, state: dict[Tensor, dict[str, Any]]) -> bool:
        """Whether the layers' states hold exactly the tensors recorded by :meth:`remember`."""
        return all(
            all(map(operator.is_, now, held))
            for now, held in zip(self._held_now(state), self.held, strict=True)
        )


#: the state of a layer that has none yet
_NO_STATE: dict[str, Any] = {}


@dataclass(eq=False)
class ManifoldPlan:
    """The step plan of a manifold param group: its layer groups with their buffers and stacked
    momentum, reused while :meth:`reusable` (the module docstring's rule). ``keep``: every
    layer had gradients and none is sharded (otherwise the plan serves one step only)."""

    params: list[Tensor]
    ptrs: list[int]
    versions: list[int]
    epoch: int
    groups: list[LayerGroup]
    arenas: dict[tuple[torch.dtype, torch.device], Tensor]
    keep: bool

    def reusable(
        self,
        params: list[Tensor],
        state: dict[Tensor, dict[str, Any]],
        watch: RegistrationWatch,
        slots: tuple[list[Any], list[str]],
    ) -> bool:
        """The one invalidation rule, checked in a few passes with no per-layer tensor ops:
        the same parameter objects with the same storage and version counters, all with
        gradients and still the factors of their layers (``slots``: each layer's module dict
        and adapter, walked only when a module or parameter was registered somewhere since the
        last check), and ``state`` holding what the groups recorded."""
        if (
            not self.keep
            or len(params) != len(self.params)
            or not all(map(operator.is_, params, self.params))
            or any(map(operator.is_, map(GRAD, params), repeat(None)))
        ):
            return False
        if watch.epoch != self.epoch:
            mods, adapters = slots
            try:
                same = all(
                    all(map(operator.is_, _slot_weights(mods, name, adapters), factors))
                    for name, factors in (("lora_A", params[0::2]), ("lora_B", params[1::2]))
                )
            except (KeyError, AttributeError):
                return False
            if not same:
                return False
            self.epoch = watch.epoch
        return (
            list(map(_DATA_PTR, params)) == self.ptrs
            and list(map(_VERSION, params)) == self.versions
            and all(g.holds(state) for g in self.groups)
        )

    @classmethod
    def build(
        cls,
        group: dict[str, Any],
        layers: list[ManifoldLayer],
        state: dict[Tensor, dict[str, Any]],
        watch: RegistrationWatch,
        arenas: dict[tuple[torch.dtype, torch.device], Tensor],
    ) -> ManifoldPlan:
        """A new plan of the manifold param group ``group`` (its layers ``layers``), from the
        parameters and ``state``: the layers walked one by one (raising before anything
        changes on replaced factors or a layer with only one gradient), grouped, the momentum
        of the structured groups stacked and their workspaces built (their buffers carved out
        of ``arenas``, one flat buffer per compute dtype and device, grown when too small)."""
        params = group["params"]
        active: list[int] = []
        keys = []
        for k, layer in enumerate(layers):
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
            keys.append(
                GroupKey(
                    b.shape[0],
                    a.shape[1],
                    group["ranks"][k],
                    group["offsets"][k],
                    a.dtype,
                    a.device,
                    pg,
                )
            )
        groups = []
        for key, idx in group_indices(keys).items():
            ks = [active[i] for i in idx]
            A, B = [params[2 * k] for k in ks], [params[2 * k + 1] for k in ks]
            groups.append(LayerGroup(key, A, B))  # type: ignore[arg-type]
        structured = [g for g in groups if g.key.structured]
        for g in structured:
            if group["momentum"]:
                states_b, states_a = g.states(state)
                g.mom = stack_momentum(states_b, states_a, g.key.m, g.key.n, g.key.rank)
                g.exact_point = points_match(g.A, g.B, states_b) and g.mom is not None
            g.cdt = compute_dtype(g.A[0], *([] if g.mom is None else [g.mom.Pt]))
        _reserve(arenas, structured)
        for g in structured:
            r = g.key.rank
            g.ws = Workspace.build(g.A, g.B, r, g.cdt, arenas[(g.cdt, g.A[0].device)])
            # Z1 = 0 always: nothing but to_manifold writes it, so it is reset here, once per
            # new workspace, instead of every step
            torch._foreach_zero_([b[:, :r] for b in g.B])
        for g in groups:
            g.remember(state)
        keep = len(active) == len(layers) and all(key.process_group is None for key in keys)
        return cls(
            list(params),
            list(map(_DATA_PTR, params)),
            list(map(_VERSION, params)),
            watch.epoch,
            groups,
            arenas,
            keep,
        )

    def wrote(self, state: dict[Tensor, dict[str, Any]]) -> None:
        """After a step: records the parameters' version counters and what the states hold."""
        self.versions = list(map(_VERSION, self.params))
        for g in self.groups:
            g.remember(state)


def _reserve(
    arenas: dict[tuple[torch.dtype, torch.device], Tensor], groups: list[LayerGroup]
) -> None:
    """Makes the shared buffers (per compute dtype and device) large enough for every group."""
    need: dict[tuple[torch.dtype, torch.device], int] = {}
    for g in groups:
        where = (g.cdt, g.A[0].device)
        need[where] = max(need.get(where, 0), Workspace.arena_size(g.A, g.B, g.key.rank))
    for where, size in need.items():
        arena = arenas.get(where)
        if arena is None or arena.numel() < size:
            arenas[where] = torch.empty(size, dtype=where[0], device=where[1])


def _slot_weights(mods: list[dict[str, Any]], name: str, adapters: list[str]) -> Any:
    """``module._modules[name]._modules[adapter]._parameters["weight"]`` of every layer, where
    the layer's factor lives now (an iterator)."""
    dicts = map(_MODULES, map(operator.itemgetter(name), mods))
    return map(_WEIGHT, map(_PARAMS, map(operator.getitem, dicts, adapters)))


def _factor(layer: ManifoldLayer, name: str) -> Any:
    """``layer.module.<name>[layer.adapter].weight`` by plain dict lookups (``layer.a`` / ``.b``
    go through ``nn.Module.__getattr__`` three times)."""
    try:
        return layer.module._modules[name]._modules[layer.adapter]._parameters["weight"]  # type: ignore[union-attr]
    except (KeyError, AttributeError):
        return getattr(layer, "a" if name == "lora_A" else "b")
