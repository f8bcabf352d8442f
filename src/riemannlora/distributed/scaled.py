"""The scaled optimizers' preconditioner on FSDP2-sharded factors (see
:mod:`riemannlora.distributed`): the single-process :func:`precondition_pairs` with ``A`` and
``G_A`` gathered and the ``B`` Grams all-reduced through its ``reduce_gram_b`` hook."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from riemannlora.core.preconditioner import precondition_pairs
from riemannlora.distributed.tensors import (
    all_reduce_sum,
    gather_rows,
    local,
    row_range,
    shard_group,
)

__all__ = ["precondition_local"]


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
    """:func:`~riemannlora.core.preconditioner.precondition_pairs` for factors that may be DTensors.

    Returns the local shard of every ``D`` (plain tensors). Pairs of plain tensors take the
    single-process path; row-sharded pairs are grouped by process group and preconditioned
    exactly, with one all-gather and one all-reduce per group (see the module docstring).
    """
    by_group: dict[Any, list[int]] = {}
    for i, (fa, fb) in enumerate(zip(a, b)):
        ga, gb = shard_group(fa, "lora_A"), shard_group(fb, "lora_B")
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
                lo, hi = row_range(a[i].shape[0], dist.get_world_size(group), dist.get_rank(group))
                da[j] = da[j][lo:hi]
            out_a[i], out_b[i] = da[j], db[j]
    return out_a, out_b
