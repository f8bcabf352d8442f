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
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["compute_dtype_for", "precondition_pairs"]


def compute_dtype_for(dtype: torch.dtype, gram_dtype: torch.dtype | None = None) -> torch.dtype:
    """float32 for half/bfloat16/float32 factors, float64 for float64 (or ``gram_dtype``)."""
    base = torch.promote_types(dtype, torch.float32)
    return base if gram_dtype is None else torch.promote_types(base, gram_dtype)


def _identity_fallback_cholesky(grams: Tensor) -> Tensor:
    """Batched lower Cholesky factors, identity where the factorization fails (no sync)."""
    chol, info = torch.linalg.cholesky_ex(grams)
    eye = torch.eye(grams.shape[-1], dtype=grams.dtype, device=grams.device)
    bad = (info != 0) | ~torch.isfinite(chol).all(dim=(-2, -1))
    return torch.where(bad[:, None, None], eye, chol)


def precondition_pairs(
    a: Sequence[Tensor],
    b: Sequence[Tensor],
    grad_a: Sequence[Tensor | None],
    grad_b: Sequence[Tensor | None],
    scalings: Sequence[float],
    reg: float,
    scale_aware: bool,
    gram_dtype: torch.dtype | None = None,
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
    """
    n_pairs = len(a)
    out_a: list[Tensor | None] = [None] * n_pairs
    out_b: list[Tensor | None] = [None] * n_pairs
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i in range(n_pairs):
        if grad_a[i] is None and grad_b[i] is None:
            continue
        buckets[(a[i].shape, b[i].shape, a[i].dtype, b[i].dtype, a[i].device)].append(i)
    if not buckets:
        return out_a, out_b

    # 1. Gram matrices of every bucket, stacked per rank for one batched Cholesky.
    stacked = []
    by_rank: dict[tuple, list[Tensor]] = defaultdict(list)
    for key, idx in buckets.items():
        r = a[idx[0]].shape[0]
        m = b[idx[0]].shape[0]
        cd = compute_dtype_for(torch.promote_types(key[2], key[3]), gram_dtype)
        dev = key[4]
        fa = torch.stack([a[i].detach().reshape(r, -1) for i in idx]).to(cd)  # (L, r, n)
        fb = torch.stack([b[i].detach().reshape(m, r) for i in idx]).to(cd)  # (L, m, r)
        gram_a = fa @ fa.mT
        gram_b = fb.mT @ fb
        coef = None
        if scale_aware:
            coef = torch.tensor([scalings[i] ** 2 for i in idx], dtype=cd, device=dev)
            coef = coef[:, None, None]
            gram_b = gram_b * coef
        rank_key = (r, cd, dev)
        offset = sum(t.shape[0] for t in by_rank[rank_key])
        by_rank[rank_key].append(torch.cat([gram_b, gram_a]))
        stacked.append((key, idx, r, m, cd, rank_key, offset, coef))

    chol_by_rank = {}
    for (r, cd, dev), grams in by_rank.items():
        g = torch.cat(grams) if len(grams) > 1 else grams[0]
        if reg:
            g = g + reg * torch.eye(r, dtype=cd, device=dev)
        chol_by_rank[(r, cd, dev)] = _identity_fallback_cholesky(g)

    # 2. Solves, one batched call per bucket and factor.
    for _key, idx, r, m, cd, rank_key, offset, coef in stacked:
        n_l = len(idx)
        chol = chol_by_rank[rank_key]
        chol_b = chol[offset : offset + n_l]  # factors of c B^T B + reg I
        chol_a = chol[offset + n_l : offset + 2 * n_l]  # factors of A A^T + reg I
        if any(grad_a[i] is not None for i in idx):
            ga = torch.stack([_grad_or_zeros(grad_a[i], a[i]).reshape(r, -1) for i in idx])
            da = torch.cholesky_solve(ga.to(cd), chol_b).to(a[idx[0]].dtype)
            for j, i in enumerate(idx):
                if grad_a[i] is not None:
                    out_a[i] = da[j].view(a[i].shape)
        if any(grad_b[i] is not None for i in idx):
            gb = torch.stack([_grad_or_zeros(grad_b[i], b[i]).reshape(m, r) for i in idx])
            # D_B = G_B M^{-1} with M = L L^T: two right-sided triangular solves keep (L, m, r).
            y = torch.linalg.solve_triangular(chol_a.mT, gb.to(cd), upper=True, left=False)
            db = torch.linalg.solve_triangular(chol_a, y, upper=False, left=False)
            if coef is not None:
                db = db / coef
            db = db.to(b[idx[0]].dtype)
            for j, i in enumerate(idx):
                if grad_b[i] is not None:
                    out_b[i] = db[j].view(b[i].shape)
    return out_a, out_b


def _grad_or_zeros(grad: Tensor | None, like: Tensor) -> Tensor:
    if grad is None:
        return torch.zeros_like(like)
    if grad.is_sparse:
        raise RuntimeError("sparse gradients of LoRA factors are not supported")
    return grad
