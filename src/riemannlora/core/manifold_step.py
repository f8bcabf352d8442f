r"""One Riemannion / Riemannian-SGD step on a stack of equal-shape layers: pure functions.

Bogachev et al., "LoRA meets Riemannion: Muon Optimizer for Parametrization-independent Low-Rank
Adapters", arXiv 2507.12142. Each layer's delta ``X = U V^T`` (rank r, U with orthonormal
columns, ``Q`` an orthonormal basis of V's columns) is a point of the manifold of rank-r
matrices; ``G = dL/dW`` is known only through ``G Q`` and ``G^T U``. One step::

    xi_g  = P_X(G)                                   Riemannian gradient (dU_g, dV_g)
    M     = beta P_X(M_prev) + (1 - tau) xi_g        transport by projection, heavy ball
    D     = beta M + (1 - tau) xi_g  (Nesterov)  or  M
    D_o   = P_X(msign(D))                            Riemannion only ("OrthoLR", exact SVD)
    X    <- best rank-r approximation of  X - lr * (D_o + wd' X)       (truncated SVD)

with ``tau = 0`` for Riemannion and ``tau = beta`` for Riemannian SGD (which skips the msign).
Tangent vectors stay in factor form ``dU Q^T + U dV^T`` (never an ``m x n`` matrix).

Two kernels compute it, with the same results up to round-off: :func:`literal_step`, the
spec's formulas term by term (:mod:`riemannlora.core.geometry`'s literal functions), and
:func:`structured_step`, which uses the structure of a stored point (two QRs of width r, one
``2r x 2r`` SVD for ``P_X(msign(.))``, a retraction with no QR of width 2r) and works on
stacked buffers with every tall matrix transposed (``(L, r, rows)``, column-major), in place.
It is written over this process's rows of the tall matrices (:func:`structured_steps`, see
:mod:`riemannlora.core.rows`), so that FSDP2-sharded factors take the same step
(:mod:`riemannlora.distributed`).

The momentum ``M`` (a tangent vector at the point of the step that made it) is kept in the
bases of that step's direction, ``M = Lb core Rb^T`` with ``Lb = [Qd | U_old]`` ``(m, 2r)`` and
``Rb = [Q_old | Qv]`` ``(n, 2r)`` orthonormal and a ``2r x 2r`` core (:class:`Momentum`). The
new point lies in their span, ``U = Lb cu``, ``Q = Rb cq``, with ``cu``, ``cq`` known from the
retraction's small matrices, so the next step transports M by projection with no product
between two tall matrices: ``(I - U U^T) M Q = Lb ((I - cu cu^T) core cq)`` and
``M^T U = Rb (core^T cu)``. A momentum without a core is the plain factor pair
``M = Lb Rb^T``; Nesterov's raw momentum is stored as ``[dU | U_old]``, ``[Q_old | dV]`` with
an identity core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from riemannlora.core.geometry import (
    msign_tangent,
    msign_tangent_qr,
    orthonormal_basis,
    project_tangent,
    retract,
    retract_qr_steps,
    riemannian_gradient,
    tangent_core,
    tangent_qr_steps,
    tangent_to_factors,
    to_compute_dtype,
    transport,
)
from riemannlora.core.rows import RowSteps, RowSum, over_whole_rows

__all__ = [
    "SCALE_LR_CHOICES",
    "Momentum",
    "StepConfig",
    "StepResult",
    "literal_step",
    "lr_multiplier",
    "manifold_step",
    "structured_shape",
    "structured_step",
    "structured_steps",
]

#: Accepted values of ``Riemannion(scale_lr=...)``.
SCALE_LR_CHOICES = (None, "match_adamw")


@dataclass(frozen=True)
class StepConfig:
    """The hyper-parameters of one step of a group of layers.

    ``lr``: the step size of X (``lr * lr_multiplier`` of the layers' shape); ``weight_decay``:
    decoupled, ``X <- X - lr (D + weight_decay X)``; ``momentum``: beta in ``[0, 1)``;
    ``dampening``: tau, the new gradient enters as ``(1 - tau) xi_g`` (0 for Riemannion, beta
    for Riemannian SGD); ``nesterov``: step along ``beta M + (1 - tau) xi_g`` instead of ``M``;
    ``orthogonalize``: apply ``P_X(msign(.))`` (Riemannion) or not (SGD);
    ``store_orthogonalized``: keep the orthogonalized direction as the momentum instead of M.
    """

    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    orthogonalize: bool = True
    store_orthogonalized: bool = False

    @property
    def keeps_bases(self) -> bool:
        """Whether the step keeps its momentum in the bases of its direction (every momentum
        but Nesterov's raw one, which is not the direction the QRs factor)."""
        return bool(self.momentum) and not (self.nesterov and not self.store_orthogonalized)


class StepResult(NamedTuple):
    """What a kernel returns: the new point ``U`` ``(L, m, r)``, ``V``, ``Q`` ``(L, n, r)``; the
    new ``momentum`` (None without momentum); and ``coords = (cu, cq)``, the new point's
    coordinates in the momentum's bases (``U = Lb cu``, ``Q = Rb cq``; None when not known)."""

    U: Tensor
    V: Tensor
    Q: Tensor
    momentum: Momentum | None
    coords: tuple[Tensor, Tensor] | None


def lr_multiplier(scale_lr: str | None, m: int, n: int) -> float:
    """Learning-rate multiplier of a ``(m, n)`` layer: 1, or ``0.2 sqrt(max(m, n))`` for
    ``"match_adamw"`` (Moonlight's rule, which gives the update the RMS of an AdamW update)."""
    if scale_lr is None:
        return 1.0
    if scale_lr == "match_adamw":
        return 0.2 * math.sqrt(max(m, n))
    raise ValueError(f"scale_lr must be one of {SCALE_LR_CHOICES}, got {scale_lr!r}")


def manifold_step(
    U: Tensor,
    V: Tensor,
    Q: Tensor,
    GQ: Tensor,
    GtU: Tensor,
    Pm: Tensor | None,
    Rm: Tensor | None,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float = 0.0,
    nesterov: bool = False,
    orthogonalize: bool = True,
    store_orthogonalized: bool = False,
    structured: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """One Riemannion / Riemannian-SGD step for a stack of layers of equal shape.

    Args:
        U ``(..., m, r)``: orthonormal left factor; V ``(..., n, r)``: right factor;
        Q ``(..., n, r)``: the row basis the forward pass used.
        GQ ``(..., m, r)``, GtU ``(..., n, r)``: ``G Q`` and ``G^T U`` from the backward pass.
        Pm ``(..., m, 2r)``, Rm ``(..., n, 2r)``: momentum ``Pm Rm^T`` of the previous step
            (None: zero momentum).
        lr, weight_decay, momentum, dampening, nesterov, orthogonalize, store_orthogonalized:
            the fields of :class:`StepConfig`.
        structured: the kernel, as ``torch.optim.adamw`` picks one by a flag:
            :func:`structured_step`, which uses the structure of a stored point (orthonormal U
            and Q, V in ``span(Q)``; the directions built here are tangent), or
            :func:`literal_step`, the spec's formulas, which also accept a non-orthonormal
            point. Same result up to rounding. With ``2r > min(m, n)`` the literal formulas
            are used.

    Returns:
        ``(U_new, V_new, Q_new, Pm_new, Rm_new)`` in the compute dtype; the momentum factors are
        None when ``momentum == 0``.
    """
    cfg = StepConfig(
        lr, weight_decay, momentum, dampening, nesterov, orthogonalize, store_orthogonalized
    )
    U, V, Q, GQ, GtU = to_compute_dtype(U, V, Q, GQ, GtU)
    m, r = U.shape[-2:]
    n = V.shape[-2]
    batch = U.shape[:-2]
    if structured and structured_shape(m, n, r):
        kernel = structured_step

        def wide(t: Tensor) -> Tensor:  # an owned (L, cols, rows) buffer: the kernel writes it
            return t.mT.reshape(-1, *t.shape[-1:], t.shape[-2]).clone(
                memory_format=torch.contiguous_format
            )

        def wide_view(t: Tensor) -> Tensor:
            return t.mT.reshape(-1, *t.shape[-1:], t.shape[-2])
    else:
        kernel = literal_step
        wide = wide_view = _transposed
    Ut, Qt, Vt, GQt, GtUt = wide(U), wide(Q), wide(V), wide(GQ), wide(GtU)
    mom = out = None
    if momentum:
        if Pm is not None and Rm is not None:
            Pm, Rm = to_compute_dtype(Pm, Rm)
            mom = Momentum(wide_view(Pm), wide_view(Rm))
        if kernel is structured_step:
            out = Momentum.empty(Ut, Ut.shape[0], r, m, n)
    res = kernel(Ut, Qt, Vt, GQt, GtUt, mom, cfg, out=out)
    U_new = res.U.reshape(*batch, m, r)
    V_new, Q_new = res.V.reshape(*batch, n, r), res.Q.reshape(*batch, n, r)
    if res.momentum is None:
        return U_new, V_new, Q_new, None, None
    # the plain factor pair: M = Lb core Rb^T = Lb (Rb core^T)^T
    Pt, Rt, core = res.momentum.Pt, res.momentum.Rt, res.momentum.core
    Rm_new = (Rt if core is None else core @ Rt).mT
    return U_new, V_new, Q_new, Pt.mT.reshape(*batch, m, 2 * r), Rm_new.reshape(*batch, n, 2 * r)


def _transposed(t: Tensor) -> Tensor:
    return t.mT


def literal_step(
    Ut: Tensor,
    Qt: Tensor,
    Vt: Tensor,
    GQt: Tensor,
    GtUt: Tensor,
    mom: Momentum | None,
    cfg: StepConfig,
    *,
    out: Momentum | None = None,
    scratch: Tensor | None = None,
    packed: tuple[Tensor, Tensor, Tensor] | None = None,
) -> StepResult:
    """The step by the spec's formulas, term by term, on the transposed point and gradient
    blocks: Ut ``(..., r, m)`` = U^T, Qt, Vt ``(..., r, n)`` = Q^T, V^T, GQt ``(..., r, m)`` =
    (G Q)^T, GtUt ``(..., r, n)`` = (G^T U)^T (any layout, read only), in the compute dtype;
    ``mom``: the previous momentum (None: zero). The new momentum is the plain factor pair
    ``M = [mU | U] [Q | mV]^T`` (no core); ``out``, ``scratch`` and ``packed`` are the
    structured kernel's buffers, unused here."""
    U, V, Q, GQ, GtU = Ut.mT, Vt.mT, Qt.mT, GQt.mT, GtUt.mT
    dU_g, dV_g = riemannian_gradient(U, GQ, GtU)
    g = 1.0 - cfg.dampening
    beta = cfg.momentum
    if beta:
        if mom is None:
            dU, dV = g * dU_g, g * dV_g
        else:
            Pm = mom.Pt.mT if mom.core is None else mom.Pt.mT @ mom.core
            dU_p, dV_p = transport(U, Q, Pm, mom.Rt.mT)
            dU, dV = beta * dU_p + g * dU_g, beta * dV_p + g * dV_g
        if cfg.nesterov:
            uU, uV = beta * dU + g * dU_g, beta * dV + g * dV_g
        else:
            uU, uV = dU, dV
    else:
        dU, dV = uU, uV = dU_g, dV_g
    if cfg.orthogonalize:
        O_L, O_R = msign_tangent(U, Q, uU, uV)
        oU, oV = project_tangent(U, Q, O_L, O_R)
    else:
        oU, oV = uU, uV
    U_new, V_new = retract(U, V, Q, oU, oV, cfg.lr, cfg.weight_decay)
    Q_new = orthonormal_basis(V_new)
    if not beta:
        return StepResult(U_new, V_new, Q_new, None, None)
    mU, mV = (oU, oV) if cfg.store_orthogonalized else (dU, dV)
    Pm_new, Rm_new = tangent_to_factors(U, Q, mU, mV)
    return StepResult(U_new, V_new, Q_new, Momentum(Pm_new.mT, Rm_new.mT), None)


@dataclass(eq=False)
class Momentum:
    """The momentum of a stack of ``L`` layers of equal shape, ``M = Lb core Rb^T`` per layer,
    in the wide layout of the kernels: ``Pt = Lb^T`` ``(L, 2r, m)``,
    ``Rt = Rb^T`` ``(L, 2r, n)`` contiguous, ``core`` ``(L, 2r, 2r)`` (None: the identity, i.e.
    the factor pair ``M = Lb Rb^T``).

    The step stores its momentum in orthonormal bases, ``Lb = [Qd | U]`` and
    ``Rb = [Q | Qv]`` (the bases of its direction, :class:`~riemannlora.core.geometry.TangentQR`),
    and the new point lies in their span. ``cu = Lb^T U`` and ``cq = Rb^T Q`` ``(L, 2r, r)``
    are then the coordinates of the point in the bases, known from the retraction's small
    matrices; with them (``in_span``: ``U = Lb cu``, ``Q = Rb cq``) transporting the momentum
    to the point takes no product with a tall matrix. None: not known (they are computed,
    ``in_span=False``)."""

    Pt: Tensor
    Rt: Tensor
    core: Tensor | None = None
    cu: Tensor | None = None
    cq: Tensor | None = None
    in_span: bool = False

    @staticmethod
    def empty(like: Tensor, L: int, r: int, m: int, n: int) -> Momentum:
        """Buffers for a new momentum (bases and core), in ``like``'s dtype and device."""
        return Momentum(
            like.new_empty(L, 2 * r, m),
            like.new_empty(L, 2 * r, n),
            like.new_empty(L, 2 * r, 2 * r),
        )

    def transport(self, Ut: Tensor, Qt: Tensor) -> tuple[Tensor, Tensor]:
        """``(Lb^T U, Rb^T Q)`` by products with the tall bases (computed transposed, as
        ``(r x k) (k x 2r)`` products: the faster order on CPU, see BENCHMARKS.md)."""
        return (Ut @ self.Pt.mT).mT, (Qt @ self.Rt.mT).mT


def structured_steps(
    Ut: Tensor,
    Qt: Tensor,
    Vt: Tensor,
    GQt: Tensor,
    GtUt: Tensor,
    mom: Momentum | None,
    cfg: StepConfig,
    *,
    out: Momentum | None = None,
    scratch: Tensor | None = None,
    packed: tuple[Tensor, Tensor, Tensor] | None = None,
    m: int | None = None,
) -> RowSteps[StepResult]:
    """The structured step on stacked ``(L, ., .)`` buffers in the compute dtype, every tall
    matrix transposed ("wide", ``(L, r, rows)`` contiguous, i.e. column-major): the layout in
    which BLAS's products with a small ``r`` run fastest (BENCHMARKS.md) and LAPACK's QR works
    in place.

    The arguments as :func:`literal_step`'s. Ut ``(L, r, m)`` = U^T, GQt ``(L, r, m)`` =
    (G Q)^T, Qt, Vt, GtUt ``(L, r, n)`` = Q^T, V^T, (G^T U)^T, all owned by the step and
    overwritten (Ut, Qt, Vt may be the blocks of
    ``packed = (pa, pb, Yt)``, see :func:`~riemannlora.core.geometry.retract_qr_`, into which
    the new point is then written whole); ``mom``: the previous momentum (None:
    zero; its ``cu``, ``cq`` are computed when None). The new momentum is written into
    ``out.Pt``, ``out.Rt`` and ``out.core`` (required when ``momentum``; they may be ``mom``'s
    own buffers: those are read before they are written, so the optimizer updates its momentum
    in place). ``scratch``: a contiguous buffer of Ut's shape and dtype (None: one is
    allocated). Products written into a slice of a larger batch go through a temporary on CPU,
    so the outputs are best contiguous (with ``packed``, whole ``pa``, ``pb`` are). The new
    point is column-major, in the memory of Ut, Vt and Qt (views of ``packed``'s buffers when
    given); its coordinates ``(cu, cq)`` in the new momentum's bases are None when not known
    (without momentum; with Nesterov, whose momentum factors ``[dU | U]``, ``[Q | dV]`` are not
    orthonormal; after a Householder fallback of the retraction).

    The tall matrices (``m`` rows: Ut, GQt, ``mom.Pt``, ``out.Pt``) may be this process's rows
    only: the step asks for the sums over rows and the QRs of tall matrices it needs
    (:mod:`riemannlora.core.rows`; :func:`structured_step` answers them for whole rows).
    ``m``: the number of rows over all processes (None: Ut's).

    With the momentum ``M = Lb core Rb^T``, ``cu = Lb^T U``, ``cq = Rb^T Q``,
    ``Z = core cq`` and ``Y = core^T cu`` (so ``M Q = Lb Z``, ``M^T U = Rb Y``), the new
    momentum direction is

        dU = g (I - U U^T) G Q + beta (I - U U^T) M Q = g G Q + beta Lb Z - U K1,
        K1 = g U^T G Q + beta cu^T Z,
        dV = g G^T U + beta M^T U = g G^T U + beta Rb Y,    B = Q^T dV = g Q^T G^T U + beta cq^T Y,

    and its factorization needs ``W = dV - Q B``. When the point lies in the bases
    (``mom.in_span``: ``U = Lb cu``, ``Q = Rb cq``), ``dU = g G Q + Lb (beta Z - cu K1)`` and
    ``W = g G^T U + Rb (beta Y - cq B)``: one product with each stacked basis.
    """
    g = 1.0 - cfg.dampening
    beta = cfg.momentum
    r = Ut.shape[-2]
    prev = mom if beta else None  # the momentum that enters
    # where the new momentum goes: the bases of the direction (QRs below), or for Nesterov's raw
    # momentum, which is not the direction the QRs factor, its own factor pair
    keep = out if beta else None
    raw_pair = not cfg.keeps_bases
    H = Ut @ GQt.mT  # U^T G Q (r, r)
    # Q^T G^T U: (U^T G Q)^T only up to the rounding of the two gradient blocks (bf16 models)
    E = Qt @ GtUt.mT
    if prev is not None and prev.cu is not None:
        cu, cq = prev.cu, prev.cq
        yield RowSum([H])
    elif prev is not None:
        cu, cq = prev.transport(Ut, Qt)
        yield RowSum([H, cu])
    else:
        yield RowSum([H])
    if prev is not None:
        assert cu is not None and cq is not None
        Z = cq if prev.core is None else prev.core @ cq
        Y = cu if prev.core is None else prev.core.mT @ cu
        K1 = torch.baddbmm(H, cu.mT, Z, beta=g, alpha=beta)  # U^T (g G Q + beta M Q)
        B = torch.baddbmm(E, cq.mT, Y, beta=g, alpha=beta)  # Q^T dV
    else:
        K1, B = H * g, E * g
    if beta and cfg.nesterov:
        # the momentum M = (dU, dV) and the direction beta M + g xi_g, which the QRs factor
        if prev is not None:
            dUt = torch.baddbmm(GQt, Z.mT, prev.Pt, beta=g, alpha=beta)
            dUt.baddbmm_(K1.mT, Ut, alpha=-1.0)
            dVt = torch.baddbmm(GtUt, Y.mT, prev.Rt, beta=g, alpha=beta)
        else:
            dUt = torch.baddbmm(GQt, K1.mT, Ut, beta=g, alpha=-1.0)
            dVt = GtUt * g
        uUt = GQt.baddbmm_(H.mT, Ut, alpha=-1.0).mul_(g).add_(dUt, alpha=beta)
        Bu = torch.add(E * g, B, alpha=beta)  # Q^T (beta dV + g G^T U)
        uWt = GtUt.mul_(g).add_(dVt, alpha=beta).baddbmm_(Bu.mT, Qt, alpha=-1.0)
        if keep is not None and raw_pair:  # [dU | U], [Q | dV], identity core
            assert keep.core is not None
            _store_bases(keep, dUt, Ut, Qt, dVt)
            keep.core.copy_(torch.eye(2 * r, dtype=Ut.dtype, device=Ut.device))
        t = yield from tangent_qr_steps(uUt.mT, uWt.mT, Bu)
    else:
        if prev is not None and prev.in_span and prev.cu is not None:
            # U = Lb cu, Q = Rb cq: one product with each basis
            dUt = GQt.baddbmm_(torch.baddbmm(Z, cu, K1, beta=beta, alpha=-1.0).mT, prev.Pt, beta=g)
            Wt = GtUt.baddbmm_(torch.baddbmm(Y, cq, B, beta=beta, alpha=-1.0).mT, prev.Rt, beta=g)
        elif prev is not None:
            dUt = GQt.baddbmm_(Z.mT, prev.Pt, beta=g, alpha=beta).baddbmm_(K1.mT, Ut, alpha=-1.0)
            Wt = GtUt.baddbmm_(Y.mT, prev.Rt, beta=g, alpha=beta).baddbmm_(B.mT, Qt, alpha=-1.0)
        else:
            dUt = GQt.baddbmm_(K1.mT, Ut, beta=g, alpha=-1.0)
            Wt = GtUt.baddbmm_(B.mT, Qt, beta=g, alpha=-1.0)
        t = yield from tangent_qr_steps(dUt.mT, Wt.mT, B)  # Qd, Qv overwrite dU, W
    in_bases = keep if keep is not None and not raw_pair else None
    core = None
    if in_bases is not None:  # bases [Qd | U], [Q | Qv]; the core of the raw direction
        _store_bases(in_bases, t.Qd.mT, Ut, Qt, t.Qv.mT)
        if not cfg.store_orthogonalized:
            core = tangent_core(t, out=in_bases.core)
    if cfg.orthogonalize:
        rtol = torch.finfo(Ut.dtype).eps * max(Ut.shape[-1] if m is None else m, Qt.shape[-1])
        t = msign_tangent_qr(t, rtol=rtol, core=core)
    if in_bases is not None and cfg.store_orthogonalized:
        tangent_core(t, out=in_bases.core)
    U_new, V_new, Q_new, coords = yield from retract_qr_steps(
        Ut.mT,
        Vt.mT,
        Qt.mT,
        t,
        cfg.lr,
        cfg.weight_decay,
        scratch=scratch,
        overwrite=True,
        bases=None if in_bases is None else (in_bases.Pt, in_bases.Rt),
        packed=packed,
    )
    return StepResult(U_new, V_new, Q_new, keep, coords)


#: :func:`structured_steps` over whole rows (one process)
structured_step = over_whole_rows(structured_steps, "structured_step")


def structured_shape(m: int, n: int, r: int) -> bool:
    """Whether layers of this shape step by :func:`structured_step` (``2r <= min(m, n)``, so
    the bases ``[Qd | U]``, ``[Q | Qv]`` fit), when they are not sharded."""
    return 2 * r <= min(m, n)


def _store_bases(out: Momentum, Lt1: Tensor, Ut: Tensor, Qt: Tensor, Rt2: Tensor) -> None:
    """``out.Pt = [Lt1; U^T]``, ``out.Rt = [Q^T; Rt2]`` (stacked copies)."""
    r = Ut.shape[-2]
    out.Pt[:, :r].copy_(Lt1)
    out.Pt[:, r:].copy_(Ut)
    out.Rt[:, :r].copy_(Qt)
    out.Rt[:, r:].copy_(Rt2)
