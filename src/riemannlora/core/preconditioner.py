r"""The r x r Riemannian preconditioner of LoRA factors (Zhang & Pilanci, ICML 2024).

For a pair ``Delta W = s * B @ A`` with gradients ``G_A`` (r, n) and ``G_B`` (m, r)::

    D_A = (c B^T B + reg I)^{-1} G_A          c = s^2 if scale_aware else 1
    D_B = G_B (A A^T + reg I)^{-1} / c

Both Gram matrices come from the factors before the step (Jacobi order). The r x r algebra runs
in float32 or better; all pairs of the same rank share one batched Cholesky factorization and
pairs of equal shapes share one batched solve. A Gram whose factorization fails (``B = 0`` at the
standard LoRA init with ``reg = 0``) falls back to the identity preconditioner for that factor:
the step is then the plain gradient step, always finite.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["compute_dtype_for", "precondition_pairs"]


def compute_dtype_for(dtype: torch.dtype, gram_dtype: torch.dtype | None = None) -> torch.dtype:
    """float32 for half/bfloat16/float32 factors, float64 for float64 (or ``gram_dtype``)."""
    base = torch.promote_types(dtype, torch.float32)
    return base if gram_dtype is None else torch.promote_types(base, gram_dtype)


def _spd_inverse(grams: Tensor) -> Tensor:
    """Batched inverse of SPD matrices from their Cholesky factors; identity where the
    factorization fails or the inverse is not finite (no host synchronization)."""
    chol, info = torch.linalg.cholesky_ex(grams)
    eye = torch.eye(grams.shape[-1], dtype=grams.dtype, device=grams.device)
    chol = torch.where((info != 0)[:, None, None], eye, chol)
    inv = torch.cholesky_inverse(chol)
    bad = (info != 0) | ~torch.isfinite(inv).all(dim=(-2, -1))
    return torch.where(bad[:, None, None], eye, inv)


def precondition_pairs(
    a: Sequence[Tensor],
    b: Sequence[Tensor],
    grad_a: Sequence[Tensor | None],
    grad_b: Sequence[Tensor | None],
    scalings: Sequence[float],
    reg: float,
    scale_aware: bool,
    gram_dtype: torch.dtype | None = None,
    stacked: bool | None = None,
    *,
    reduce_gram_b: Callable[[list[Tensor]], None] | None = None,
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """Preconditioned gradients ``(D_A, D_B)`` of every pair, in the factors' shapes and dtypes.

    Args:
        a: ``lora_A`` factors, each ``(r, n)`` or ``(r, c_in, *kernel)``.
        b: ``lora_B`` factors, each ``(m, r)`` or ``(c_out, r, 1, ...)``.
        grad_a, grad_b: their gradients (``None``: no gradient, ``None`` returned).
        scalings: the LoRA scaling ``s`` of each pair.
        reg: damping ``delta >= 0`` added to both Gram matrices.
        scale_aware: use the effective factor ``s * B`` (see module docstring).
        gram_dtype: raise the precision of the r x r algebra (e.g. ``torch.float64``).
        stacked: how the (memory-bound) Gram and apply products run. ``True`` stacks factors of
            equal shape and uses one ``bmm`` per shape (few kernel launches: best on GPUs);
            ``False`` runs one small ``mm`` per factor straight from the parameters' storage
            (no copies: best on CPUs). ``None`` picks by device. Results are the same.
        reduce_gram_b: called once, before any factorization, with the stacked ``B^T B`` of
            every rank group (``(L, r, r)`` tensors in the compute dtype); it must sum them in
            place over the row shards of ``B``. Sharded training passes one batched all-reduce
            here (:mod:`riemannlora.distributed`); ``None`` when ``b`` holds whole factors.
    """
    n_pairs = len(a)
    out_a: list[Tensor | None] = [None] * n_pairs
    out_b: list[Tensor | None] = [None] * n_pairs
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in range(n_pairs):
        if grad_a[i] is None and grad_b[i] is None:
            continue
        cd = compute_dtype_for(torch.promote_types(a[i].dtype, b[i].dtype), gram_dtype)
        groups[(a[i].shape[0], cd, a[i].device)].append(i)
    # 1. Grams (L, r, r) of both factors for every rank group (B's may be partial sums).
    grams: list[tuple[Tensor, Tensor]] = []
    for (r, cd, dev), idx in groups.items():
        use_stack = dev.type != "cpu" if stacked is None else stacked
        # step() runs under no_grad: the parameters are used directly, no detach needed
        mats_b = [_matrix(b[i], r, rank_first=False) for i in idx]
        mats_a = [_matrix(a[i], r, rank_first=True) for i in idx]
        grams.append(
            (
                _gram(mats_b, cd, use_stack, transpose_first=True),
                _gram(mats_a, cd, use_stack, transpose_first=False),
            )
        )
    if reduce_gram_b is not None and grams:
        reduce_gram_b([g_b for g_b, _ in grams])
    # 2. one batched factorization per rank, then D_A = inv_b @ G_A and D_B = G_B @ inv_a.
    for ((r, cd, dev), idx), (grams_b, grams_a) in zip(groups.items(), grams):
        use_stack = dev.type != "cpu" if stacked is None else stacked
        coef = None
        if scale_aware:
            coef = torch.tensor([scalings[i] ** 2 for i in idx], dtype=cd, device=dev)[
                :, None, None
            ]
            grams_b = grams_b * coef
        both = torch.cat([grams_b, grams_a])
        if reg:
            both = both + reg * torch.eye(r, dtype=cd, device=dev)
        inv = _spd_inverse(both)
        n_l = len(idx)
        inv_b = inv[:n_l]  # (c B^T B + reg I)^{-1}
        inv_a = inv[n_l:] if coef is None else inv[n_l:] / coef  # (A A^T + reg I)^{-1} / c
        sel_a = [j for j, i in enumerate(idx) if grad_a[i] is not None]
        sel_b = [j for j, i in enumerate(idx) if grad_b[i] is not None]
        gas = [_matrix(grad_a[idx[j]], r, rank_first=True) for j in sel_a]
        gbs = [_matrix(grad_b[idx[j]], r, rank_first=False) for j in sel_b]
        for j, d in zip(sel_a, _apply(inv_b, sel_a, gas, cd, use_stack, left=True)):
            out_a[idx[j]] = _like(d, a[idx[j]])
        for j, d in zip(sel_b, _apply(inv_a, sel_b, gbs, cd, use_stack, left=False)):
            out_b[idx[j]] = _like(d, b[idx[j]])
    return out_a, out_b


def _matrix(t: Tensor, r: int, rank_first: bool) -> Tensor:
    """The factor (or its gradient) as a matrix: ``(r, n)`` for A, ``(m, r)`` for B."""
    if t.dim() == 2:
        return t
    return t.reshape(r, -1) if rank_first else t.reshape(-1, r)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _like(d: Tensor, p: Tensor) -> Tensor:
    """``d`` in the dtype and shape of parameter ``p`` (no-ops skipped: this runs per pair)."""
    d = _cast(d, p.dtype)
    return d if d.shape == p.shape else d.view(p.shape)


def _buckets(mats: Sequence[Tensor]) -> dict[tuple, list[int]]:
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for j, t in enumerate(mats):
        by_shape[(t.shape, t.dtype)].append(j)
    return by_shape


def _gram(mats: list[Tensor], cd: torch.dtype, use_stack: bool, transpose_first: bool) -> Tensor:
    """``M^T M`` (``transpose_first``) or ``M M^T`` of every matrix, stacked ``(L, r, r)``."""
    if not use_stack:
        mats = [_cast(t, cd) for t in mats]
        if transpose_first:
            return torch.stack([torch.mm(t.mT, t) for t in mats])
        return torch.stack([torch.mm(t, t.mT) for t in mats])
    r = mats[0].shape[1] if transpose_first else mats[0].shape[0]
    out = torch.empty(len(mats), r, r, dtype=cd, device=mats[0].device)
    for _key, js in _buckets(mats).items():
        st = torch.stack([mats[j] for j in js]).to(cd)
        out[js] = st.mT @ st if transpose_first else st @ st.mT
    return out


def _apply(
    inv: Tensor, sel: list[int], grads: list[Tensor], cd: torch.dtype, use_stack: bool, left: bool
) -> list[Tensor]:
    """``inv[j] @ g`` (``left``) or ``g @ inv[j]`` for every selected pair ``j``."""
    if not grads:
        return []
    if not use_stack:
        invs = inv.unbind(0)
        if left:
            return [torch.mm(invs[j], _cast(g, cd)) for j, g in zip(sel, grads)]
        return [torch.mm(_cast(g, cd), invs[j]) for j, g in zip(sel, grads)]
    out: list[Tensor] = [grads[0]] * len(grads)
    for _key, ks in _buckets(grads).items():
        st = torch.stack([grads[k] for k in ks]).to(cd)
        m = inv[[sel[k] for k in ks]]
        res = torch.bmm(m, st) if left else torch.bmm(st, m)
        for k, d in zip(ks, res.unbind(0)):
            out[k] = d
    return out
