"""A manifold optimizer's per-layer momentum state and the stacks a group of layers steps with.

The state of a layer (see :class:`~riemannlora.core.manifold_step.Momentum`):
``momentum_left`` ``(m, 2r)``, ``momentum_core`` ``(2r, 2r)`` (optional, identity when absent),
``transport_left`` ``(2r, r)`` (optional) and ``step`` on ``lora_B``; ``momentum_right``
``(n, 2r)`` and ``transport_right`` ``(2r, r)`` (optional) on ``lora_A``. A structured group
stacks them once (:func:`stack_momentum`), the step updates the stacks in place, and the state
holds per-layer views of them, so ``state_dict()`` / ``load_state_dict()`` resume bit for bit.
A momentum without a core is the plain factor pair ``M = momentum_left momentum_right^T``
(FSDP2-sharded layers, layers with ``2r > min(m, n)``, older checkpoints).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor

from riemannlora import distributed
from riemannlora.core.manifold_step import Momentum

__all__ = [
    "MOMENTUM_KEYS",
    "POINT_KEY",
    "STATE_KEYS_A",
    "STATE_KEYS_B",
    "drop_core",
    "point_fingerprint",
    "points_match",
    "stack_momentum",
    "stack_zero_filled",
]

#: the momentum's entries in a layer's state
MOMENTUM_KEYS = (
    "momentum_left",
    "momentum_right",
    "momentum_core",
    "transport_left",
    "transport_right",
)
#: the state entry of ``lora_B`` in a state dict that fingerprints the point its transport
#: coordinates belong to (:func:`point_fingerprint`; added by ``state_dict()``, consumed when
#: the state is stacked again)
POINT_KEY = "transport_point"
#: everything a step puts into the state of ``lora_B`` and of ``lora_A``
STATE_KEYS_B = ("momentum_left", "momentum_core", "transport_left", "step")
STATE_KEYS_A = ("momentum_right", "transport_right")


def stack_zero_filled(ts: list[Tensor | None], shape: tuple[int, ...], ref: Tensor) -> Tensor:
    """``torch.stack(ts)`` with zeros of ``shape`` (``ref``'s dtype and device) in place of the
    entries that are None (layers without a momentum yet)."""
    return torch.stack([ref.new_zeros(shape) if x is None else x for x in ts])


def stack_momentum(
    states_b: list[dict[str, Any]], states_a: list[dict[str, Any]], m: int, n: int, r: int
) -> Momentum | None:
    """The momentum of a group of layers of rank r stacked from their states (local shards of
    DTensors: ``m`` is the number of this process's rows of ``momentum_left``), in the wide
    layout (None: no layer has one yet). Its transport coordinates are those of the states
    when every layer has them (``in_span`` claimed, to be checked against the point)."""
    local = distributed.local
    lefts = [st.get("momentum_left") for st in states_b]
    present = [x for x in lefts if x is not None]
    if not present:
        return None
    ref = local(present[0])
    rights = [st.get("momentum_right") for st in states_a]
    mom = Momentum(
        stack_zero_filled([None if x is None else local(x).mT for x in lefts], (2 * r, m), ref),
        stack_zero_filled([None if x is None else local(x).mT for x in rights], (2 * r, n), ref),
    )
    cores = [st.get("momentum_core") for st in states_b]
    if any(x is not None for x in cores):
        eye = torch.eye(2 * r, dtype=ref.dtype, device=ref.device)
        mom.core = torch.stack([eye if x is None else local(x).to(ref) for x in cores])
    cus = [st.get("transport_left") for st in states_b]
    cqs = [st.get("transport_right") for st in states_a]
    if all(x is not None for x in cus + cqs):
        mom.cu = torch.stack([local(x).to(ref) for x in cus])  # type: ignore[arg-type]
        mom.cq = torch.stack([local(x).to(ref) for x in cqs])  # type: ignore[arg-type]
        mom.in_span = True
    return mom


def point_fingerprint(a: Tensor, b: Tensor) -> Tensor:
    """A 64-bit hash (int64 scalar, on the CPU) of the exact bits of a layer's factors: the point
    that a momentum's transport coordinates (``cu``, ``cq``) were computed for. A state dict
    carries it so that a resumed run knows its point is bitwise the saved one and uses the
    stored coordinates as the uninterrupted run does (recomputing them rounds differently,
    and the orthogonalized step amplifies that). Only called on save and on resume."""
    h = hashlib.blake2b(digest_size=8)
    for t in (a, b):
        t = distributed.local(t).detach().to("cpu").contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return torch.tensor(int.from_bytes(h.digest(), "little", signed=True), dtype=torch.int64)


def points_match(A: list[Tensor], B: list[Tensor], states_b: list[dict[str, Any]]) -> bool:
    """Whether every layer's state holds the fingerprint of its current factors (removing the
    fingerprints from the states: they describe the point of the save only)."""
    saved = [st.pop(POINT_KEY, None) for st in states_b]
    return all(
        isinstance(x, Tensor) and int(x) == int(point_fingerprint(a, b))
        for x, a, b in zip(saved, A, B)
    )


def drop_core(sb: dict[str, Any], sa: dict[str, Any]) -> None:
    """Removes what only the structured path keeps (core, transport coordinates) from the
    state of a layer whose momentum is stored as a plain factor pair."""
    for key in ("momentum_core", "transport_left"):
        sb.pop(key, None)
    sa.pop("transport_right", None)
