r"""Gradient clipping by the norm of the gradient the optimizer actually uses.

For a model in manifold form (:mod:`riemannlora.manifold`), ``loss.backward()`` leaves in each
converted layer's ``lora_B.grad = [G Q | G V | -G V0]`` and ``lora_A.grad = [Z1^T G | U^T G |
U0^T G]`` (transposed blocks, ``G = dL/dW``). Riemannion and RiemannianSGD use only ``G Q`` and
``G^T U``: the Riemannian gradient is the tangent vector ``xi = dU Q^T + U dV^T`` with
``dU = (I - U U^T) G Q`` and ``dV = G^T U``, of norm ``||xi||_F^2 = ||dU||^2 + ||dV||^2``
(``U^T dU = 0``, Q orthonormal). ``torch.nn.utils.clip_grad_norm_(model.parameters())`` instead
measures every block, including ``G V`` and the offset's blocks, which the optimizer ignores,
and counts ``U^T G Q`` twice. :func:`clip_grad_norm_` measures ``sum ||xi||^2`` over the
manifold layers plus ``||g||^2`` of every other trainable parameter (torch's AdamW group), and
scales all those gradients by ``min(1, max_norm / (norm + 1e-6))``, as torch does. Since the
step reads ``G Q`` and ``G^T U`` linearly, that scales the Riemannian gradient by the same
factor. For any other optimizer (e.g. ScaledAdamW, whose gradients are the Euclidean ones) it
is torch's norm over the optimizer's parameters.

FSDP2 factors (row-sharded DTensors) need two all-reduces per process group, whatever the
number of layers: the ``r x r`` products ``U^T G Q``, then the partial sums of squares. Under
DDP the gradients are already identical on every rank and nothing is communicated.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from riemannlora import distributed
from riemannlora.manifold import manifold_layers

__all__ = ["clip_grad_norm_", "unwrap_optimizer"]


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside wrappers such as Accelerate's ``AcceleratedOptimizer``."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


class _Layer(NamedTuple):
    """A manifold layer's name, rank and factors ``lora_A`` ``(w, n)``, ``lora_B`` ``(m, w)``."""

    name: str
    rank: int
    a: Tensor
    b: Tensor


def _targets(obj: Any) -> tuple[list[_Layer], list[Tensor]]:
    """(manifold layers, other parameters) whose gradients the optimizer / model uses: the
    model's converted layers, or the layers of an optimizer's manifold param groups
    (``manifold=True``: params ``[A0, B0, A1, B1, ...]`` with ``ranks`` and ``layer_names``)."""
    if isinstance(obj, nn.Module):
        layers = [_Layer(x.name, x.rank, x.a, x.b) for x in manifold_layers(obj)]
        params = [p for p in obj.parameters() if p.requires_grad]
    else:
        opt = unwrap_optimizer(obj)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                "clip_grad_norm_ takes a model (nn.Module) or an optimizer, got "
                f"{type(obj).__name__}"
            )
        layers = [
            _Layer(name, rank, a, b)
            for g in opt.param_groups
            if g.get("manifold")
            for name, rank, a, b in zip(
                g["layer_names"], g["ranks"], g["params"][0::2], g["params"][1::2]
            )
        ]
        params = [p for g in opt.param_groups for p in g["params"]]
    in_layers = {id(p) for layer in layers for p in (layer.a, layer.b)}
    return layers, [p for p in params if id(p) not in in_layers]


def _sq(t: Tensor) -> Tensor:
    """``||t||_F^2`` in float64 (the norm itself in float32 or better)."""
    dtype = torch.promote_types(t.dtype, torch.float32)
    return torch.linalg.vector_norm(t, dtype=dtype).to(torch.float64).square()


@torch.no_grad()
def clip_grad_norm_(
    model_or_optimizer: nn.Module | torch.optim.Optimizer,
    max_norm: float,
    *,
    error_if_nonfinite: bool = False,
) -> Tensor:
    """Clip gradients in place by the norm of the gradient the optimizer uses.

    Args:
        model_or_optimizer: a :class:`~riemannlora.Riemannion` / :class:`~riemannlora.RiemannianSGD`
            (or any optimizer; also wrapped, e.g. by Accelerate), or the model itself, where
            every converted LoRA layer counts by its Riemannian gradient and every other
            trainable parameter by its gradient.
        max_norm: the largest allowed norm (``float("inf")``: only measure).
        error_if_nonfinite: raise ``RuntimeError`` when the norm is NaN or Inf.

    Returns:
        The total norm before clipping (a 0-d tensor, float32 or float64), the same on every
        rank.
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, int | float) or max_norm < 0:
        raise ValueError(f"max_norm must be a number >= 0, got {max_norm!r}")
    layers, others = _targets(model_or_optimizer)
    scaled: list[Tensor] = []  # gradients (local shards) that the clipping multiplies
    plain: list[Tensor] = []  # squared norms complete on this rank
    partial: dict[Any, list[Tensor]] = defaultdict(list)  # per process group: to all-reduce
    out_dtype = torch.float32
    sharded: dict[Any, list[tuple[Tensor, Tensor, Tensor]]] = defaultdict(list)
    for layer in layers:
        a, b = layer.a, layer.b
        if a.grad is None or b.grad is None:
            continue
        r = layer.rank
        out_dtype = torch.promote_types(out_dtype, a.grad.dtype)
        ga, gb = distributed.local(a.grad), distributed.local(b.grad)
        scaled += [ga, gb]
        group = distributed.pair_group(a, b, repr(layer.name))
        U = distributed.local(b)[:, r : 2 * r]
        GQ = gb[:, :r]
        cdt = torch.promote_types(torch.promote_types(U.dtype, GQ.dtype), torch.float32)
        U, GQ = U.to(cdt), GQ.to(cdt)
        if group is None:
            plain.append(_sq(GQ - U @ (U.mT @ GQ)) + _sq(ga[r : 2 * r]))
            continue
        lo, hi = distributed.row_range(a.shape[0], *_world_rank(group))
        rows = ga[max(r - lo, 0) : max(min(2 * r, hi) - lo, 0)]  # this rank's rows of (G^T U)^T
        partial[group].append(_sq(rows))
        sharded[group].append((U, GQ, U.mT @ GQ))
    for group, items in sharded.items():  # ONE all-reduce of every U^T G Q per group
        distributed.all_reduce_sum(group)([s for _, _, s in items])
        partial[group] += [_sq(GQ - U @ s) for U, GQ, s in items]
    for p in others:
        if p.grad is None:
            continue
        out_dtype = torch.promote_types(out_dtype, p.grad.dtype)
        g = distributed.local(p.grad)
        scaled.append(g)
        group = distributed.shard_group(p.grad, "parameter") if distributed.is_dtensor(p) else None
        (plain if group is None else partial[group]).append(_sq(g))
    device = scaled[0].device if scaled else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for t in plain:
        total = total + t.to(device)
    for group, parts in partial.items():  # ONE all-reduce of the partial sums per group
        s = torch.stack([t.to(device) for t in parts]).sum().reshape(1)
        distributed.all_reduce_sum(group)([s])
        total = total + s[0]
    norm = total.sqrt()
    if error_if_nonfinite and not bool(torch.isfinite(norm)):
        raise RuntimeError(
            f"the total norm of the gradients is {float(norm)}: non-finite, so clip_grad_norm_ "
            "cannot clip them (error_if_nonfinite=True)"
        )
    if scaled and not math.isinf(max_norm):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        by_key: dict[tuple[Any, Any], list[Tensor]] = defaultdict(list)
        for g in scaled:
            by_key[(g.device, g.dtype)].append(g)
        for (dev, _), grads in by_key.items():
            torch._foreach_mul_(grads, coef.to(device=dev))
    return norm.to(out_dtype)


def _world_rank(group: Any) -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_world_size(group), dist.get_rank(group)
