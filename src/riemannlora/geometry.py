"""Geometry of the manifold of fixed-rank matrices, on factors.

A point of the rank-``r`` manifold of ``m x n`` matrices is stored as ``X = U V^T`` with ``U``
``(m, r)`` having orthonormal columns (the left-orthonormal gauge) and ``V`` ``(n, r)`` free;
``Q = orthonormal_basis(V)`` ``(n, r)`` spans X's row space. A tangent vector at X is

    xi = dU Q^T + U dV^T,   U^T dU = 0,                              (rank <= 2r)

stored as the pair ``(dU, dV)`` with ``dU`` ``(m, r)`` and ``dV`` ``(n, r)``. No function here
ever forms an ``m x n`` matrix (except the ``*_dense`` helpers, meant for tests).

Conventions shared by every function:

* Batched: every tensor has shape ``(..., rows, cols)`` with the same leading dimensions
  (e.g. ``(L,)`` for a stack of ``L`` layers of equal shape, or none for a single layer).
* Precision: QR/SVD and all products run in ``torch.promote_types(dtype, torch.float32)``
  (bfloat16/float16 -> float32, float64 stays float64); results are returned in that compute
  dtype and the caller casts back.
* Determinism: QR factors are normalized so that ``diag(R) >= 0``. SVD signs are left as
  LAPACK returns them; they cancel in the gauge-invariant products (``O_L O_R^T``,
  ``U_new V_new^T``) that carry meaning.

Reference: Bogachev et al., "LoRA meets Riemannion: Muon Optimizer for
Parametrization-independent Low-Rank Adapters", arXiv 2507.12142 (ProjectLR, OrthoLR and the
retraction of its algorithm boxes, with the block order corrected).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "compute_dtype",
    "msign_tangent",
    "orthonormal_basis",
    "project_tangent",
    "qr_positive",
    "retract",
    "riemannian_gradient",
    "tangent_to_dense",
    "tangent_to_factors",
    "to_dense",
    "transport",
]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the geometry computes in: the promotion of the inputs' dtypes and float32."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _cast(*tensors: Tensor) -> tuple[Tensor, ...]:
    dtype = compute_dtype(*tensors)
    return tuple(t.to(dtype) for t in tensors)


def qr_positive(A: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced QR ``A = Q R`` with ``diag(R) >= 0``, which makes the factors unique when A has
    full column rank (and reproducible otherwise).

    A: ``(..., m, k)``. Returns ``Q`` ``(..., m, p)`` with orthonormal columns and ``R``
    ``(..., p, k)`` upper triangular, ``p = min(m, k)``, in the compute dtype. A column of A that
    depends linearly on earlier ones gets ``R_jj = 0`` and an arbitrary (still orthonormal)
    ``Q_j``.
    """
    (A,) = _cast(A)
    Q, R = torch.linalg.qr(A, mode="reduced")
    diag = torch.diagonal(R, dim1=-2, dim2=-1)
    sign = torch.where(diag < 0, -1.0, 1.0).to(A.dtype)
    return Q * sign.unsqueeze(-2), R * sign.unsqueeze(-1)


def orthonormal_basis(V: Tensor) -> Tensor:
    """``Q = qr(V).Q`` ``(..., n, r)``: orthonormal basis of the column space of V ``(..., n, r)``
    (X's row space), with the sign convention ``diag(Q^T V) >= 0``."""
    return qr_positive(V)[0]


def project_tangent(U: Tensor, Q: Tensor, P: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
    """Orthogonal projection onto the tangent space at X of a low-rank ``Z = P R^T`` (ProjectLR).

    U ``(..., m, r)``, Q ``(..., n, r)``: the point (orthonormal U, row basis Q).
    P ``(..., m, k)``, R ``(..., n, k)``: the ambient matrix in factor form.
    Returns ``(dU, dV)`` ``(..., m, r), (..., n, r)`` with

        dU = (P - U (U^T P)) (R^T Q),   dV = R (P^T U),

    i.e. ``dU Q^T + U dV^T = U U^T Z + (I - U U^T) Z Q Q^T``. Cost ``O((m + n) k r)``.
    """
    U, Q, P, R = _cast(U, Q, P, R)
    RtQ = R.mT @ Q  # (k, r)
    PtU = P.mT @ U  # (k, r)
    dU = P @ RtQ - U @ (PtU.mT @ RtQ)
    dV = R @ PtU
    return dU, dV


def transport(U_new: Tensor, Q_new: Tensor, P: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
    """Vector transport by projection: the tangent vector ``P R^T`` of an earlier point (e.g.
    ``P = [dU | U_old]``, ``R = [Q_old | dV]``, see :func:`tangent_to_factors`) projected onto
    the tangent space at the new point ``(U_new, Q_new)``. Same as :func:`project_tangent`."""
    return project_tangent(U_new, Q_new, P, R)


def riemannian_gradient(U: Tensor, GQ: Tensor, GtU: Tensor) -> tuple[Tensor, Tensor]:
    """Riemannian gradient ``P(G)`` from the two products ``G Q`` and ``G^T U`` of the Euclidean
    gradient ``G`` (m x n), which is never formed.

    U ``(..., m, r)``, GQ ``(..., m, r)``, GtU ``(..., n, r)``. Returns ``(dU, dV)`` with
    ``dU = G Q - U (U^T G Q)``, ``dV = G^T U``.
    """
    U, GQ, GtU = _cast(U, GQ, GtU)
    return GQ - U @ (U.mT @ GQ), GtU


def tangent_to_factors(U: Tensor, Q: Tensor, dU: Tensor, dV: Tensor) -> tuple[Tensor, Tensor]:
    """Factor form ``xi = L R^T`` of the tangent vector ``xi = dU Q^T + U dV^T``:
    ``L = [dU | U]`` ``(..., m, 2r)``, ``R = [Q | dV]`` ``(..., n, 2r)``."""
    U, Q, dU, dV = _cast(U, Q, dU, dV)
    return torch.cat([dU, U], dim=-1), torch.cat([Q, dV], dim=-1)


def msign_tangent(
    U: Tensor, Q: Tensor, dU: Tensor, dV: Tensor, rtol: float | None = None
) -> tuple[Tensor, Tensor]:
    """Matrix sign (orthogonalization) of a tangent vector in factor form (OrthoLR).

    With ``xi = dU Q^T + U dV^T = [dU | U] [Q | dV]^T``:

        Q_L T_L = qr([dU | U]),  Q_R T_R = qr([Q | dV]),  Uc S Vc^T = svd(T_L T_R^T),
        O_L = Q_L Uc,  O_R = Q_R Vc,

    so that ``O_L O_R^T = msign(xi)``: the SVD of xi with every *nonzero* singular value set to 1.
    xi has rank <= 2r, so some of the 2r singular values may be zero; a singular value counts as
    zero when ``S <= rtol * S.max()`` (per batch element), with the default
    ``rtol = eps * max(m, n)`` of the compute dtype, as in ``torch.linalg.matrix_rank``. The
    columns of O_L and O_R belonging to zero singular values are set to zero, so ``xi = 0`` gives
    ``O_L = 0``, ``O_R = 0`` (no NaN).

    U, dU ``(..., m, r)``; Q, dV ``(..., n, r)``. Returns O_L ``(..., m, 2r)``, O_R
    ``(..., n, 2r)``; the nonzero columns of each are orthonormal.
    """
    L, R = tangent_to_factors(U, Q, dU, dV)
    QL, TL = qr_positive(L)
    QR, TR = qr_positive(R)
    Uc, S, Vch = torch.linalg.svd(TL @ TR.mT, full_matrices=False)
    if rtol is None:
        rtol = torch.finfo(S.dtype).eps * max(L.shape[-2], R.shape[-2])
    keep = (S > rtol * S.amax(dim=-1, keepdim=True)).to(S.dtype).unsqueeze(-2)
    return (QL @ Uc) * keep, (QR @ Vch.mT) * keep


def retract(
    U: Tensor,
    V: Tensor,
    Q: Tensor,
    dU: Tensor,
    dV: Tensor,
    lr: float | Tensor,
    weight_decay: float | Tensor = 0.0,
) -> tuple[Tensor, Tensor]:
    """Retraction by truncated SVD: the best rank-r approximation of the step
    ``X - lr * (xi + weight_decay * X)`` with ``X = U V^T`` and ``xi = dU Q^T + U dV^T``.

    The step is the rank-2r product ``L R^T`` with

        L = [U | -lr dU]  (m, 2r),   R = [V - lr (dV + weight_decay V) | Q]  (n, 2r),

    and with ``Q1 T1 = qr(L)``, ``Q2 T2 = qr(R)``, ``Uc S Vc^T = svd(T1 T2^T)``:

        U_new = Q1 Uc[:, :r],   V_new = Q2 Vc[:, :r] diag(S[:r]).

    U_new has orthonormal columns (the left-orthonormal gauge is kept). If the step has rank
    below r, the trailing columns of V_new are zero. Cost ``O((m + n) r^2 + r^3)``.

    U, dU ``(..., m, r)``; V, Q, dV ``(..., n, r)``; lr, weight_decay: Python floats or 0-d
    tensors. Returns ``(U_new, V_new)`` ``(..., m, r), (..., n, r)``.
    """
    U, V, Q, dU, dV = _cast(U, V, Q, dU, dV)
    r = U.shape[-1]
    L = torch.cat([U, -lr * dU], dim=-1)
    R = torch.cat([V - lr * (dV + weight_decay * V), Q], dim=-1)
    Q1, T1 = qr_positive(L)
    Q2, T2 = qr_positive(R)
    Uc, S, Vch = torch.linalg.svd(T1 @ T2.mT, full_matrices=False)
    U_new = Q1 @ Uc[..., :r]
    V_new = (Q2 @ Vch[..., :r, :].mT) * S[..., None, :r]
    return U_new, V_new


def to_dense(U: Tensor, V: Tensor) -> Tensor:
    """``X = U V^T`` ``(..., m, n)`` (tests and debugging only)."""
    U, V = _cast(U, V)
    return U @ V.mT


def tangent_to_dense(U: Tensor, Q: Tensor, dU: Tensor, dV: Tensor) -> Tensor:
    """``xi = dU Q^T + U dV^T`` ``(..., m, n)`` (tests and debugging only)."""
    U, Q, dU, dV = _cast(U, Q, dU, dV)
    return dU @ Q.mT + U @ dV.mT
