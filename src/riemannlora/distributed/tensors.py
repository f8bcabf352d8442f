"""DTensor helpers of the sharded (FSDP2) paths: local shards, re-wrapping, row ranges, and
the collectives both optimizer families batch over all their layers (:func:`gather_rows`,
:func:`all_reduce_sum`, :func:`any_across`).

Supported layouts: ``Shard(0)`` on one mesh dimension, ``Replicate`` on the others (FSDP,
HSDP); rows are split in ``torch.chunk``'s layout (the last ranks' shards possibly empty).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "all_reduce_sum",
    "any_across",
    "gather_rows",
    "is_dtensor",
    "local",
    "pair_group",
    "row_range",
    "shard_group",
    "wrap_like",
    "wrap_replicated",
    "wrap_rows",
]

try:  # torch builds without distributed support have no DTensor
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (shares storage under ``no_grad``), else ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def wrap_like(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (a local shard) as a DTensor laid out like ``like``; ``t`` if ``like`` is plain or
    ``t`` already a DTensor."""
    if not is_dtensor(like) or is_dtensor(t):
        return t
    return DTensor.from_local(
        t,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def any_across(flag: Tensor, meshes: Sequence[Any]) -> Tensor:
    """Logical OR of a boolean scalar over every rank of the given device meshes."""
    value = flag.to(torch.float32).reshape(1)
    for mesh in meshes:
        for dim in range(mesh.ndim):
            dist.all_reduce(value, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    return value[0] > 0


def shard_group(t: Tensor, what: str) -> Any:
    """The process group over which ``t`` is row-sharded (``None``: whole on every rank)."""
    if not is_dtensor(t):
        return None
    group = None
    for dim, placement in enumerate(t.placements):
        if isinstance(placement, Shard) and placement.dim == 0 and group is None:
            group = t.device_mesh.get_group(dim)
        elif not isinstance(placement, Replicate):
            raise NotImplementedError(
                f"{what}: unsupported DTensor placements {t.placements}; riemannlora supports "
                "Shard(0) on one mesh dimension (FSDP2, HSDP) and Replicate"
            )
    return group


def row_range(rows: int, world: int, rank: int) -> tuple[int, int]:
    """Rows of rank ``rank`` under ``torch.chunk`` sharding of ``rows`` rows (FSDP2's layout)."""
    chunk = math.ceil(rows / world)
    lo = min(rank * chunk, rows)
    return lo, min(lo + chunk, rows)


def gather_rows(shards: list[Tensor], shapes: list[torch.Size], group: Any) -> list[Tensor]:
    """Whole tensors (global ``shapes``) from their local dim-0 shards (``torch.chunk`` layout
    over ``group``), with ONE all-gather for all of them (shards padded to equal size)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    dtype = shards[0].dtype
    for t in shards[1:]:
        dtype = torch.promote_types(dtype, t.dtype)  # upcasts are exact
    pieces, layout = [], []
    for t, shape in zip(shards, shapes):
        rows, cols = shape[0], math.prod(shape[1:])
        chunk = math.ceil(rows / world)
        lo, hi = row_range(rows, world, rank)
        if t.shape[0] != hi - lo:
            raise NotImplementedError(
                f"unexpected shard of {tuple(shape)}: rank {rank} holds {t.shape[0]} rows, "
                f"torch.chunk layout gives {hi - lo}"
            )
        padded = t.new_zeros((chunk, cols), dtype=dtype)
        padded[: hi - lo] = t.reshape(hi - lo, cols)
        pieces.append(padded.reshape(-1))
        layout.append((rows, cols, chunk))
    send = torch.cat(pieces)
    recv = send.new_empty(world * send.numel())
    dist.all_gather_into_tensor(recv, send, group=group)
    recv = recv.view(world, -1)
    out, offset = [], 0
    for (rows, cols, chunk), t, shape in zip(layout, shards, shapes):
        block = recv[:, offset : offset + chunk * cols].reshape(world * chunk, cols)[:rows]
        out.append(block.to(t.dtype).reshape(shape))
        offset += chunk * cols
    return out


def all_reduce_sum(group: Any) -> Callable[[list[Tensor]], None]:
    """A callback summing a list of tensors in place over ``group`` with ONE all-reduce (the
    ``reduce_gram_b`` of :func:`~riemannlora.core.preconditioner.precondition_pairs`)."""

    def reduce(grams: list[Tensor]) -> None:
        dtype = grams[0].dtype
        for g in grams[1:]:
            dtype = torch.promote_types(dtype, g.dtype)
        flat = torch.cat([g.reshape(-1).to(dtype) for g in grams])
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in grams:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    return reduce


def pair_group(a: Tensor, b: Tensor, what: str = "LoRA layer") -> Any:
    """The process group over which both factors of a layer are row-sharded (None: plain)."""
    ga, gb = shard_group(a, f"{what} lora_A"), shard_group(b, f"{what} lora_B")
    if ga is not gb:
        raise NotImplementedError(
            f"{what}: factors sharded over different process groups (or only one of them "
            "sharded) are not supported; shard both factors of a layer together"
        )
    return ga


def wrap_rows(t: Tensor, like: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Local rows ``t`` of a tensor of global ``shape`` as a DTensor row-sharded like ``like``
    (e.g. Riemannion's momentum ``(m, 2r)`` next to ``lora_B`` ``(m, w)``)."""
    t = t.contiguous()
    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    return DTensor.from_local(
        t,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=torch.Size(shape),
        stride=stride,
    )


def wrap_replicated(t: Tensor, like: Tensor) -> Tensor:
    """A tensor every rank holds whole (and equal) as a replicated DTensor on ``like``'s mesh."""
    t = t.contiguous()
    placements = [Replicate()] * like.device_mesh.ndim
    return DTensor.from_local(
        t, like.device_mesh, placements, run_check=False, shape=t.shape, stride=t.stride()
    )
