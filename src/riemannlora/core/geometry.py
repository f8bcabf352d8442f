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

Two implementations of the step's building blocks:

* literal (:func:`msign_tangent`, :func:`project_tangent`, :func:`retract`): the spec's
  formulas term by term, QRs of the width-2r factors ``[dU | U]``, ``[Q | dV]``, ...; valid for
  any inputs (a non-orthonormal U or Q included).
* structured (:class:`TangentQR`, :func:`tangent_qr`, :func:`msign_tangent_qr`,
  :func:`retract_qr`): the same results up to round-off for a stored point (orthonormal U and
  Q, V in ``span(Q)``) and a tangent direction, using that ``[dU | U]`` and ``[Q | dV]`` already
  contain an orthonormal block: two QRs of width r per direction instead of four of width 2r,
  ``P_X(msign(.))`` as one ``2r x 2r`` SVD with no tall product, and the new point
  re-orthonormalized by Cholesky-QR (with a Householder fallback for degenerate steps). In
  float32 the ``2r x 2r`` SVDs are float64 ``eigh`` of Gram matrices (as accurate, faster).
  Tall results are column-major (the layout LAPACK works in). This is what the optimizers use.

Reference: Bogachev et al., "LoRA meets Riemannion: Muon Optimizer for
Parametrization-independent Low-Rank Adapters", arXiv 2507.12142 (ProjectLR, OrthoLR and the
retraction of its algorithm boxes, with the block order corrected).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from riemannlora.core.rows import RowSteps, RowSum, TallQR, over_whole_rows, positive_diagonal_

__all__ = [
    "TangentQR",
    "cholesky_qr2_steps",
    "compute_dtype",
    "msign_tangent",
    "msign_tangent_qr",
    "orthonormal_basis",
    "project_tangent",
    "qr_positive",
    "retract",
    "retract_qr",
    "retract_qr_",
    "retract_qr_steps",
    "retraction_core",
    "riemannian_gradient",
    "tangent_core",
    "tangent_qr",
    "tangent_qr_parts_",
    "tangent_qr_steps",
    "tangent_qr_to_factors",
    "tangent_to_dense",
    "tangent_to_factors",
    "to_compute_dtype",
    "to_dense",
    "transport",
]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the geometry computes in: the promotion of the inputs' dtypes and float32."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def to_compute_dtype(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors in their common :func:`compute_dtype` (no copy where they are in it)."""
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
    (A,) = to_compute_dtype(A)
    Q, R = torch.linalg.qr(A, mode="reduced")
    return positive_diagonal_(Q, R)


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
    U, Q, P, R = to_compute_dtype(U, Q, P, R)
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
    U, GQ, GtU = to_compute_dtype(U, GQ, GtU)
    return GQ - U @ (U.mT @ GQ), GtU


def tangent_to_factors(U: Tensor, Q: Tensor, dU: Tensor, dV: Tensor) -> tuple[Tensor, Tensor]:
    """Factor form ``xi = L R^T`` of the tangent vector ``xi = dU Q^T + U dV^T``:
    ``L = [dU | U]`` ``(..., m, 2r)``, ``R = [Q | dV]`` ``(..., n, 2r)``."""
    U, Q, dU, dV = to_compute_dtype(U, Q, dU, dV)
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
    U, V, Q, dU, dV = to_compute_dtype(U, V, Q, dU, dV)
    r = U.shape[-1]
    L = torch.cat([U, -lr * dU], dim=-1)
    R = torch.cat([V - lr * (dV + weight_decay * V), Q], dim=-1)
    Q1, T1 = qr_positive(L)
    Q2, T2 = qr_positive(R)
    Uc, S, Vch = torch.linalg.svd(T1 @ T2.mT, full_matrices=False)
    U_new = Q1 @ Uc[..., :r]
    V_new = (Q2 @ Vch[..., :r, :].mT) * S[..., None, :r]
    return U_new, V_new


# ----------------------------------------------------------------------------------------------
# Structured ("QR") form of tangent vectors: the fast path of the optimizers
# ----------------------------------------------------------------------------------------------


class TangentQR(NamedTuple):
    """A tangent vector ``xi = dU Q^T + U dV^T`` at ``(U, Q)`` with its two factors expanded in
    orthonormal bases orthogonal to the point::

        dU = Qd A,   dV = Q B + Qv C,     Qd^T U = 0,  Qv^T Q = 0,

    Qd ``(..., m, r)``, Qv ``(..., n, r)`` with orthonormal columns, A, B, C ``(..., r, r)``.
    Then ``xi = [Qd | U] [[A, 0], [B^T, C^T]] [Q | Qv]^T`` with both outer factors orthonormal,
    so every small-matrix operation on the ``2r x 2r`` core is exact on xi itself.
    """

    Qd: Tensor
    A: Tensor
    Qv: Tensor
    B: Tensor
    C: Tensor


def _mm(A: Tensor, B: Tensor, out: Tensor | None = None) -> Tensor:
    """``A @ B``, into ``out`` when given (a preallocated contiguous buffer: no allocation)."""
    return torch.matmul(A, B) if out is None else torch.matmul(A, B, out=out)


def _addmm_(C: Tensor, A: Tensor, B: Tensor, *, alpha: float = 1.0) -> Tensor:
    """``C += alpha * (A @ B)`` in place (one BLAS call; C contiguous)."""
    if C.dim() == 3 and A.dim() == 3 and B.dim() == 3:
        return C.baddbmm_(A, B, alpha=alpha)
    if C.dim() == 2 and A.dim() == 2 and B.dim() == 2:
        return C.addmm_(A, B, alpha=alpha)
    return C.add_(A @ B, alpha=alpha)


def _colmajor_copy(A: Tensor) -> Tensor:
    """A fresh column-major copy of A ``(..., k, r)`` (``.mT`` contiguous): the layout LAPACK
    works in, and the one every tall buffer of the structured functions uses."""
    return A.mT.clone(memory_format=torch.contiguous_format).mT


def tangent_qr(U: Tensor, Q: Tensor, dU: Tensor, dV: Tensor) -> TangentQR:
    """:class:`TangentQR` form of the tangent vector ``xi = dU Q^T + U dV^T``.

    ``Qd A = qr(dU)`` (normalized to ``diag(A) >= 0``) and ``Qv C = qr(dV - Q (Q^T dV))``,
    ``B = Q^T dV``: two QRs of width r instead of the two width-2r QRs of ``[dU | U]``,
    ``[Q | dV]`` (the blocks U and Q are already orthonormal). Requires orthonormal U and Q and a tangent ``dU`` (``U^T dU = 0``);
    the result is then exact up to rounding. When ``dU`` (or the part of ``dV`` outside
    ``span(Q)``) is rank-deficient, some columns of Qd (Qv) are arbitrary orthonormal
    completions, not necessarily orthogonal to U (Q); A (C) then maps into the subspace on which
    ``[Qd | U]`` (``[Q | Qv]``) is still an isometry, so every product with the core is
    unaffected, and :func:`retract_qr` re-orthonormalizes its output.

    U, dU ``(..., m, r)``; Q, dV ``(..., n, r)``. Cost ``O((m + n) r^2)``. Qd and Qv are
    column-major.
    """
    U, Q, dU, dV = to_compute_dtype(U, Q, dU, dV)
    return _tangent_qr_(Q, _colmajor_copy(dU), _colmajor_copy(dV))


def _tangent_qr_(Q: Tensor, dU: Tensor, dV: Tensor) -> TangentQR:
    """:func:`tangent_qr` overwriting its column-major inputs: Qd takes dU's memory and Qv
    dV's (LAPACK's QR runs in place there; no tall allocation)."""
    B = Q.mT @ dV
    W = _addmm_(dV.mT, B.mT, Q.mT, alpha=-1.0).mT  # dV - Q B, in place
    return tangent_qr_parts_(dU, W, B)


def tangent_qr_steps(dU: Tensor, W: Tensor, B: Tensor) -> RowSteps[TangentQR]:
    """:class:`TangentQR` of ``dU Q^T + U (Q B + W)^T`` from its parts (``U^T dU = 0``,
    ``Q^T W = 0``), by QRs in place in the column-major dU (-> Qd) and W (-> Qv), on this
    process's rows of dU (see :mod:`riemannlora.core.rows`; W and B whole;
    :func:`tangent_qr_parts_` over whole rows). The QR of dU is asked with ``diag(A) >= 0``:
    for a full-rank dU the factors are then unique, so a sharded answer (Cholesky-QR from
    all-reduced Grams) gives the same Qd as Householder's."""
    r = dU.shape[-1]
    C = dU.new_empty(*W.shape[:-2], r, r)
    Qd, A = yield TallQR(dU, positive=True)
    torch.linalg.qr(W, out=(W, C))
    return TangentQR(Qd, A, W, B, C)


tangent_qr_parts_ = over_whole_rows(tangent_qr_steps, "tangent_qr_parts_")


def tangent_core(t: TangentQR, out: Tensor | None = None) -> Tensor:
    """The ``2r x 2r`` core ``[[A, 0], [B^T, C^T]]`` of a :class:`TangentQR`:
    ``xi = [Qd | U] core [Q | Qv]^T`` (into ``out`` when given)."""
    A, B, C = t.A, t.B, t.C
    r = A.shape[-1]
    if out is None:
        out = A.new_empty(*A.shape[:-2], 2 * r, 2 * r)
    out[..., :r, :r] = A
    out[..., :r, r:] = 0.0
    out[..., r:, :r] = B.mT
    out[..., r:, r:] = C.mT
    return out


def tangent_qr_to_factors(Q: Tensor, t: TangentQR) -> tuple[Tensor, Tensor]:
    """``(dU, dV) = (Qd A, Q B + Qv C)`` of a :class:`TangentQR` at a point with row basis Q
    (column-major)."""
    (Q,) = to_compute_dtype(Q)
    return (t.A.mT @ t.Qd.mT).mT, _addmm_(t.B.mT @ Q.mT, t.C.mT, t.Qv.mT).mT


def msign_tangent_qr(
    t: TangentQR, rtol: float | None = None, core: Tensor | None = None
) -> TangentQR:
    """``P_X(msign(xi))`` of a :class:`TangentQR`, as a :class:`TangentQR` on the same bases.

    With ``xi = [Qd | U] M [Q | Qv]^T``, ``M = [[A, 0], [B^T, C^T]]`` and both outer factors
    orthonormal, ``msign(xi) = [Qd | U] N [Q | Qv]^T`` with ``N = Uc Vc^T`` over the nonzero
    singular values of M (``Uc S Vc^T = svd(M)``; zero means ``S <= rtol * S.max()`` per batch
    element, default ``rtol = eps * max(m, n)``, as :func:`msign_tangent`). Projecting back onto
    the tangent space only keeps blocks of N:

        P_X(msign(xi)) = Qd N11 Q^T + U (Q N21^T + Qv N22^T)^T,

    so OrthoLR + ProjectLR cost one ``2r x 2r`` SVD and no product with a tall matrix. Same
    result as :func:`msign_tangent` followed by :func:`project_tangent`. ``core``: M, when the
    caller has built it already (:func:`tangent_core`).
    """
    r = t.A.shape[-1]
    M = tangent_core(t) if core is None else core
    if rtol is None:
        rtol = torch.finfo(M.dtype).eps * max(t.Qd.shape[-2], t.Qv.shape[-2])
    N = _small_polar(M, rtol)
    return TangentQR(t.Qd, N[..., :r, :r], t.Qv, N[..., r:, :r].mT, N[..., r:, r:].mT)


def _gram_eigh(M: Tensor, left: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Singular values (descending) and right (``left=False``) or left singular vectors of a
    small float32 matrix from ``eigh`` of its Gram matrix computed in float64: faster than a
    ``2r x 2r`` SVD and, since the Gram matrix carries 53 bits, as accurate as a
    float32 SVD for every singular value above ``1e-9 * s_max`` (smaller ones are float32
    noise either way). Returns ``(M64, S, W)`` with ``M64 = M`` in float64."""
    M64 = M.to(torch.float64)
    w, W = torch.linalg.eigh(M64 @ M64.mT if left else M64.mT @ M64)
    return M64, w.flip(-1).clamp_min(0.0).sqrt(), W.flip(-1)


def _small_polar(M: Tensor, rtol: float) -> Tensor:
    """``Uc Vc^T`` over the singular values ``S > rtol * S.max()`` of a small square ``M``
    (``Uc S Vc^T = svd(M)``): LAPACK's SVD in float64, the float64 Gram ``eigh`` in float32."""
    if M.dtype != torch.float32:
        Uc, S, Vch = torch.linalg.svd(M, full_matrices=False)
        keep = (S > rtol * S.amax(dim=-1, keepdim=True)).to(S.dtype).unsqueeze(-2)
        return (Uc * keep) @ Vch
    M64, S, Vc = _gram_eigh(M, left=False)
    keep = S > rtol * S[..., :1]
    inv = torch.where(keep, 1.0 / torch.where(keep, S, 1.0), 0.0)
    return ((M64 @ (Vc * inv.unsqueeze(-2))) @ Vc.mT).to(M.dtype)


def _small_top_svd(K: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(Uc[:, :r], Vc[:, :r], S[:r])`` of a small square K (``Uc S Vc^T = svd(K)``, S
    descending): LAPACK's SVD in float64, the float64 Gram ``eigh`` in float32 (then
    ``Vc[:, :r] S[:r] = K^T Uc[:, :r]``; a column with ``S = 0`` is left zero)."""
    if K.dtype != torch.float32:
        Uc, S, Vch = torch.linalg.svd(K, full_matrices=False)
        return Uc[..., :r], Vch[..., :r, :].mT, S[..., :r]
    K64, _, Uc = _gram_eigh(K, left=True)
    Ur = Uc[..., :r]
    VS = K64.mT @ Ur
    S = (VS * VS).sum(-2).sqrt()
    Vr = VS / torch.where(S > 0, S, 1.0).unsqueeze(-2)
    return Ur.to(K.dtype), Vr.to(K.dtype), S.to(K.dtype)


def _cholesky_qr(Y: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(R^{-1}, R)`` with ``Y R^{-1}`` orthonormal, ``R`` upper triangular with a positive
    diagonal, for a matrix Y ``(..., k, r)`` that is orthonormal up to round-off: one Cholesky-QR
    step, i.e. the Gram ``Y^T Y`` and a small Cholesky instead of a Householder QR (faster, and
    the same factors up to round-off since ``cond(Y) ~ 1``). None unless
    ``||Y^T Y - I||_F <= 1/2`` in every batch element (then ``cond(Y) <= sqrt(3)`` and the step
    is accurate to a few eps); the caller falls back to Householder."""
    return _cholesky_factors(Y.mT @ Y)


def _cholesky_factors(G: Tensor) -> tuple[Tensor, Tensor] | None:
    """:func:`_cholesky_qr` from the Gram ``G = Y^T Y`` ``(..., r, r)`` (e.g. all-reduced over
    the row shards of Y): ``(R^{-1}, R)``, or None when ``||G - I||_F > 1/2`` somewhere."""
    r = G.shape[-1]
    eye = torch.eye(r, dtype=G.dtype, device=G.device)
    R, info = torch.linalg.cholesky_ex(G, upper=True)
    ok = (info == 0) & (torch.linalg.matrix_norm(G - eye) <= 0.5)
    if not bool(ok.all()):  # a degenerate step (see retract_qr); one host sync per call
        return None
    return torch.linalg.solve_triangular(R, eye.expand_as(R), upper=True), R


def cholesky_qr2_steps(Y: Tensor) -> RowSteps[tuple[Tensor, Tensor] | None]:
    """``(Q, R)`` with ``Y = Q R``, Q orthonormal to working precision and ``diag(R) > 0`` (the
    normalized Householder factors, up to rounding), by Cholesky-QR2 on this process's rows of
    the tall Y ``(..., k, r)``: two Grams in float64, each summed over the row shards (see
    :mod:`riemannlora.core.rows`), the second pass making the basis orthonormal. None when
    Y is rank-deficient or too ill-conditioned for it (the caller falls back to Householder)."""
    y64 = Y.to(torch.float64)
    G1 = y64.mT @ y64
    yield RowSum([G1])
    R1, info = torch.linalg.cholesky_ex(G1, upper=True)
    if not bool((info == 0).all()):  # the same on every process: G1 was summed
        return None
    eye = torch.eye(Y.shape[-1], dtype=R1.dtype, device=R1.device)
    Q1 = Y @ torch.linalg.solve_triangular(R1, eye, upper=True).to(Y.dtype)
    q64 = Q1.to(torch.float64)
    G2 = q64.mT @ q64
    yield RowSum([G2])
    chol = _cholesky_factors(G2)
    if chol is None:
        return None
    return Q1 @ chol[0].to(Q1.dtype), (chol[1] @ R1).to(Q1.dtype)


def retract_qr(
    U: Tensor,
    V: Tensor,
    Q: Tensor,
    t: TangentQR,
    lr: float | Tensor,
    weight_decay: float | Tensor = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`retract` for a tangent vector in :class:`TangentQR` form; also returns the new
    row basis ``Q_new`` (an orthonormal basis of ``span(V_new)`` with ``Q_new^T V_new``
    diagonal up to round-off, i.e. the positive QR basis of V_new).

    With ``V = Q S0`` (``S0 = Q^T V``: V lies in ``span(Q)``, as for every stored point) the
    step is ``L R^T = [U | Qd] K [Q | Qv]^T`` with the ``2r x 2r`` core

        K = [[E^T, -lr C^T], [-lr A, 0]],   E = (1 - lr weight_decay) S0 - lr B,

    and both outer factors orthonormal, so no QR of the width-2r factors is needed:
    ``Uc S Vc^T = svd(K)``, ``U_new = [U | Qd] Uc[:, :r]``, ``V_new = [Q | Qv] Vc[:, :r] S[:r]``.
    Both ``[U | Qd] Uc[:, :r]`` and ``[Q | Qv] Vc[:, :r]`` are orthonormal up to round-off
    (every singular vector with ``S > 0`` lies in the subspace on which the outer factor is an
    isometry), so one Cholesky-QR step re-orthonormalizes each (``U_new <- U_new Ru^{-1}``,
    ``V_new <- V_new Ru^T``, X unchanged): the gauge is exact every step and round-off does not
    accumulate. A step of rank below r, whose extra singular vectors are arbitrary, falls back
    to Householder QRs, which keep U orthonormal in that case too.

    Requires orthonormal U and Q, ``V = Q Q^T V`` and a tangent vector (``Qd^T U = 0``,
    ``Qv^T Q = 0``). Returns ``(U_new, V_new, Q_new)`` in the compute dtype (column-major).
    """
    U, V, Q = to_compute_dtype(U, V, Q)
    return retract_qr_(U, V, Q, t, lr, weight_decay)[:3]


def retraction_core(
    V: Tensor, Q: Tensor, t: TangentQR, lr: float | Tensor, weight_decay: float | Tensor = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """The retraction's small step: the top-r SVD ``(Ur, Vr, S)`` of the ``2r x 2r`` core
    ``K`` of ``X - lr (xi + weight_decay X)`` in the bases ``[U | Qd]`` and ``[Q | Qv]``. Only
    replicated ``r``-sized blocks enter, so sharded callers (FSDP2) share it."""
    r = V.shape[-1]
    E = (1.0 - lr * weight_decay) * (Q.mT @ V) - lr * t.B
    K = torch.cat(
        [
            torch.cat([E.mT, -lr * t.C.mT], -1),
            torch.cat([-lr * t.A, torch.zeros_like(t.A)], -1),
        ],
        -2,
    )
    Ur, Vr, S = _small_top_svd(K, r)
    return Ur, Vr, S


def retract_qr_steps(
    U: Tensor,
    V: Tensor,
    Q: Tensor,
    t: TangentQR,
    lr: float | Tensor,
    weight_decay: float | Tensor = 0.0,
    scratch: Tensor | None = None,
    overwrite: bool = False,
    bases: tuple[Tensor, Tensor] | None = None,
    packed: tuple[Tensor, Tensor, Tensor] | None = None,
) -> RowSteps[tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor] | None]]:
    """:func:`retract_qr` on this process's rows of U, ``t.Qd`` and ``bases[0]`` (see
    :mod:`riemannlora.core.rows`; the n-side whole; :func:`retract_qr_` over whole rows).
    ``overwrite=True`` reuses the memory of its inputs for the outputs (U_new in U, Q_new in
    Q, V_new in V, which also holds a scratch column basis; U, V, Q, ``t.Qv`` column-major)
    and ``scratch`` (a contiguous tensor of U^T's shape) for ``([U | Qd] Uc)^T``: no tall
    allocation on the fast path; the Householder fallbacks copy their results into the same
    memory, so callers read U, V and Q whichever path ran.

    ``bases``: ``(Lt, Rt)``, contiguous copies of the transposed bases ``Lt = [Qd | U]^T``
    ``(..., 2r, m)`` and ``Rt = [Q | Qv]^T`` ``(..., 2r, n)`` (e.g. the new momentum's): the new
    point is then one product with each, and the fourth result is its coordinates in them,
    ``(cu, cq)`` ``(..., 2r, r)`` with ``U_new = [Qd | U] cu`` and ``Q_new = [Q | Qv] cq``
    (None without bases or after a Householder fallback).

    ``packed``: ``(pa, pb, Yt)``, the point's buffers ``pa = [Q^T; V^T]`` ``(..., 2r, n)`` and
    ``pb = [0; U^T]`` ``(..., 2r, m)`` (U, Q, V are views of them; best contiguous) and a
    contiguous scratch Yt of Q^T's shape, with ``overwrite``: the new point is then written by
    one product per buffer, ``pa = [Ry^{-T}; T Ry^{-T}] Y^T`` (``V_new = Q_new T^T``) and
    ``pb = [0; Ru^{-T}] U_raw^T``, instead of one per block."""
    r = U.shape[-1]
    Ur, Vr, S = retraction_core(V, Q, t, lr, weight_decay)
    # U_raw = [U | Qd] Ur, column-major (computed transposed: BLAS accumulates into a wide
    # (r, m) output faster than into a tall (m, r) one)
    if bases is None:
        Ur_b = None
        U_raw = _addmm_(_mm(Ur[..., :r, :].mT, U.mT, out=scratch), Ur[..., r:, :].mT, t.Qd.mT).mT
    else:
        Ur_b = torch.cat([Ur[..., r:, :], Ur[..., :r, :]], -2)  # in the order of Lt
        U_raw = _mm(Ur_b.mT, bases[0], out=scratch).mT
    gram = U_raw.mT @ U_raw
    yield RowSum([gram])
    chol = _cholesky_factors(gram)  # one Cholesky-QR step (see _cholesky_qr)
    cu = None  # U_new = [Qd | U] cu, when the bases are given and Cholesky-QR ran
    if chol is None:
        U_new, Ru = yield TallQR(U_raw, positive=False)
        if overwrite:
            U_new = U.copy_(U_new)
    else:
        Ri, Ru = chol
        if packed is not None:  # pb = [0; Ru^{-T}] U_raw^T: U^T and the zero block
            coef = torch.cat([torch.zeros_like(Ri), Ri], -1).mT
            U_new = torch.matmul(coef, U_raw.mT, out=packed[1])[..., r:, :].mT
        else:
            # (U_raw Ru^{-1})^T, computed transposed: column-major like every tall result
            U_new = _mm(Ri.mT, U_raw.mT, out=U.mT if overwrite else None).mT
        if Ur_b is not None:
            cu = Ur_b @ Ri
    # Y = [Q | Qv] Vr, column-major (computed transposed), into V's memory when overwriting
    y_out = packed[2] if packed is not None else V.mT if overwrite else None
    if bases is None:
        Yt = _addmm_(_mm(Vr[..., :r, :].mT, Q.mT, out=y_out), Vr[..., r:, :].mT, t.Qv.mT)
    else:
        Yt = _mm(Vr.mT, bases[1], out=y_out)
    chol = _cholesky_qr(Yt.mT)
    if chol is None:
        W = (Vr * S.unsqueeze(-2)) @ Ru.mT  # (2r, r): V_new = [Q | Qv] W
        V_new = _addmm_((W[..., :r, :].mT @ Q.mT), W[..., r:, :].mT, t.Qv.mT).mT
        Q_new = qr_positive(V_new)[0]
        if overwrite:  # V_new was computed from Q, so Q is overwritten last
            V_new, Q_new = V.copy_(V_new), Q.copy_(Q_new)
        return U_new, V_new, Q_new, None
    Riy, Ry = chol
    # Q_new = Y Ry^{-1} and V_new = Y S Ru^T = Q_new T^T with T = Ru S Ry^T
    T = (Ru * S.unsqueeze(-2)) @ Ry.mT
    coords = None if cu is None else (cu, Vr @ Riy)
    if packed is not None:  # [Q_new^T; V_new^T] = [Ry^{-T}; T Ry^{-T}] Y^T, one product
        pa = torch.matmul(torch.cat([Riy.mT, T @ Riy.mT], -2), Yt, out=packed[0])
        return U_new, pa[..., r:, :].mT, pa[..., :r, :].mT, coords
    Q_newt = _mm(Riy.mT, Yt, out=Q.mT if overwrite else None)
    # V_new into V's memory (Y is no longer needed)
    V_newt = _mm(T, Q_newt, out=V.mT if overwrite else None)
    return U_new, V_newt.mT, Q_newt.mT, coords


retract_qr_ = over_whole_rows(retract_qr_steps, "retract_qr_")


def to_dense(U: Tensor, V: Tensor) -> Tensor:
    """``X = U V^T`` ``(..., m, n)`` (tests and debugging only)."""
    U, V = to_compute_dtype(U, V)
    return U @ V.mT


def tangent_to_dense(U: Tensor, Q: Tensor, dU: Tensor, dV: Tensor) -> Tensor:
    """``xi = dU Q^T + U dV^T`` ``(..., m, n)`` (tests and debugging only)."""
    U, Q, dU, dV = to_compute_dtype(U, Q, dU, dV)
    return dU @ Q.mT + U @ dV.mT
