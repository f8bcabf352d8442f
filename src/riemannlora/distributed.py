r"""Sharded (FSDP2 / DTensor) LoRA factors: the exact preconditioner with few collectives.

Under DDP every rank holds whole factors and identical all-reduced gradients, so the optimizers
need nothing from this module. Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every
parameter is a DTensor sharded on dim 0 over ``W`` ranks (``torch.chunk`` layout, the last ranks'
shards possibly empty): ``A`` ``(r, n)`` by rows of the rank dimension, ``B`` ``(m, r)`` by output
rows, and their gradients alike. Rank ``k`` computes exactly the single-process step for its shard:

* ``B^T B = sum_k B_k^T B_k``: the local ``(r, r)`` Grams are summed by an all-reduce.
* ``A A^T`` mixes all rows of ``A``, and ``D_A = (c B^T B + reg I)^{-1} G_A`` mixes all rows of
  ``G_A``: both ``A`` and ``G_A`` are gathered (they are small, ``r x n``). Every rank then holds the
  same ``(r, r)`` inverses and takes its rows of ``D_A``.
* ``D_B = G_B (A A^T + reg I)^{-1} / c`` is row-local: ``D_B`` rows of rank ``k`` are
  ``G_{B,k}`` times the (replicated) inverse, no communication.

Communication per optimizer step, for the pairs ``p`` sharded over one process group of ``W``
ranks, with every collective batched over all pairs (not one per layer):

* one all-reduce of ``sum_p r_p^2`` values in the compute dtype (the ``B`` Grams, float32),
* one all-gather in which each rank sends ``sum_p 2 * ceil(r_p / W) * n_p`` values in the factors'
  dtype (the rows of ``A`` and ``G_A``; padded to equal shard sizes),
* one all-reduce of one value (the verdict of the non-finite check, see
  :mod:`riemannlora.optim.guard`; none with ``nonfinite="off"``).

For a model with ``L`` adapted ``(m, n)`` layers of rank ``r`` that is ``L r^2`` plus
``2 L r n`` values received per rank: less than the LoRA gradients' own reduce-scatter when
``n <= m``, and a fraction ``2 r / m`` of what FSDP already all-gathers for the frozen base
weights each step. Both Grams and ``D`` equal the single-process values up to the summation
order of the all-reduced ``B^T B``.

Supported layouts: ``Shard(0)`` on one mesh dimension, ``Replicate`` on the others (FSDP, HSDP).
The building blocks (:func:`gather_rows`, :func:`all_reduce_sum`, :func:`any_across`,
:func:`local`, :func:`wrap_like`) are meant for the other optimizers too: Riemannion's factor
QRs need the same gathered rows and all-reduced Grams (Cholesky-QR).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from riemannlora.preconditioner import precondition_pairs

__all__ = [
    "all_reduce_sum",
    "any_across",
    "gather_rows",
    "is_dtensor",
    "local",
    "precondition_local",
    "wrap_like",
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


def _shard_group(t: Tensor, what: str) -> Any:
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


def _row_range(rows: int, world: int, rank: int) -> tuple[int, int]:
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
        lo, hi = _row_range(rows, world, rank)
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
    ``reduce_gram_b`` of :func:`~riemannlora.preconditioner.precondition_pairs`)."""

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


def precondition_local(
    a: Sequence[Tensor],
    b: Sequence[Tensor],
    grad_a: Sequence[Tensor | None],
    grad_b: Sequence[Tensor | None],
    scalings: Sequence[float],
    reg: float,
    scale_aware: bool,
    gram_dtype: torch.dtype | None = None,
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """:func:`~riemannlora.preconditioner.precondition_pairs` for factors that may be DTensors.

    Returns the local shard of every ``D`` (plain tensors). Pairs of plain tensors take the
    single-process path; row-sharded pairs are grouped by process group and preconditioned
    exactly, with one all-gather and one all-reduce per group (see the module docstring).
    """
    by_group: dict[Any, list[int]] = {}
    for i, (fa, fb) in enumerate(zip(a, b)):
        ga, gb = _shard_group(fa, "lora_A"), _shard_group(fb, "lora_B")
        if ga is not gb:
            raise NotImplementedError(
                "a LoRA pair whose factors are sharded over different process groups (or only "
                "one of them sharded) is not supported; shard both factors of a layer together"
            )
        by_group.setdefault(ga, []).append(i)
    out_a: list[Tensor | None] = [None] * len(a)
    out_b: list[Tensor | None] = [None] * len(b)
    for group, idx in by_group.items():
        sub_a = [local(a[i]) for i in idx]
        sub_ga = [None if grad_a[i] is None else local(grad_a[i]) for i in idx]
        hook = None
        if group is not None:
            with_grad = [j for j, g in enumerate(sub_ga) if g is not None]
            shards = sub_a + [sub_ga[j] for j in with_grad]
            shapes = [a[i].shape for i in idx] + [a[idx[j]].shape for j in with_grad]
            whole = gather_rows(shards, shapes, group)
            sub_a = whole[: len(idx)]
            for j, g in zip(with_grad, whole[len(idx) :]):
                sub_ga[j] = g
            hook = all_reduce_sum(group)
        da, db = precondition_pairs(
            sub_a,
            [local(b[i]) for i in idx],
            sub_ga,
            [None if grad_b[i] is None else local(grad_b[i]) for i in idx],
            [scalings[i] for i in idx],
            reg,
            scale_aware,
            gram_dtype,
            reduce_gram_b=hook,
        )
        for j, i in enumerate(idx):
            if group is not None and da[j] is not None:
                lo, hi = _row_range(a[i].shape[0], dist.get_world_size(group), dist.get_rank(group))
                da[j] = da[j][lo:hi]
            out_a[i], out_b[i] = da[j], db[j]
    return out_a, out_b
