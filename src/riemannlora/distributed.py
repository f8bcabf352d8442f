r"""Sharded (FSDP2 / DTensor) LoRA factors: exact optimizer steps with few collectives.

Under DDP every rank holds whole factors and identical all-reduced gradients, so the optimizers
need nothing from this module (convert a model to manifold form *before* wrapping it). Under
FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter is a DTensor sharded on dim 0
over ``W`` ranks (``torch.chunk`` layout, the last ranks' shards possibly empty): ``A``
``(r, n)`` by rows of the rank dimension, ``B`` ``(m, r)`` by output rows, and their gradients
alike. Rank ``k`` computes exactly the single-process step for its shard.

**ScaledSGD / ScaledAdamW** (:func:`precondition_local`):

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

**Riemannion / RiemannianSGD** (:func:`manifold_step_sharded`). The manifold form
(:mod:`riemannlora.manifold`) stores ``lora_A = [Q | V | -V0]^T`` ``(w, n)`` and
``lora_B = [Z1 | U | U0]`` ``(m, w)``, ``w = 2r`` (``3r`` with an LOI offset); the gradients
carry ``G Q`` (rows of ``lora_B.grad``) and ``G^T U`` (rows of ``lora_A.grad``). What must be
whole is gathered, the large dimension ``m`` stays sharded:

* ``A`` and ``G_A`` (small, ``w x n``) are all-gathered: ``Q``, ``V``, ``G^T U``, the momentum's
  right factor ``Rm`` ``(n, 2r)``, the QR of the ``n``-side direction and the new ``V`` and ``Q``
  are whole and identical on every rank (replicated work, ``O(n r^2)``).
* Everything with ``m`` rows (``U``, ``G Q``, the momentum's left factor ``Pm`` ``(m, 2r)``,
  the direction ``dU``, the new ``U``) stays row-sharded; it enters the small algebra only
  through ``r x r`` Grams that are all-reduced: ``U^T G Q`` and ``Pm^T U`` (projection and
  transport); ``dU^T dU`` twice, for the tall QR of ``dU`` as Cholesky-QR2 (Grams in float64,
  a second pass that makes the basis orthonormal to working precision, ``diag(R) > 0``, which
  is the normalization of the single-process Householder QR, so both give the same basis up to
  rounding); and the Gram of the new ``U`` (the retraction's Cholesky re-orthonormalization,
  as single-process). The ``2r x 2r`` cores (msign, the retraction's SVD) are replicated.
* Layers with ``2r > min(m, n)`` (the literal path: tiny, rare) are gathered whole in the same
  all-gather and stepped identically on every rank.
* A degenerate step, i.e. ``dU`` rank-deficient or too ill-conditioned for Cholesky-QR2 (e.g. an
  all-zero gradient) or a retraction whose Cholesky check fails, gathers the affected ``(m, r)``
  factors and takes the single-process Householder route: one more all-gather each, only in
  such steps. Every rank takes the same decision, from the same all-reduced Grams.

Communication per optimizer step, for the layers ``p`` sharded over one process group of ``W``
ranks, every collective batched over all layers: one all-gather in which each rank sends
``sum_p 2 * ceil(w_p / W) * n_p`` values (rows of ``A`` and ``G_A``); four all-reduces of small
Grams, ``sum_p 6 r_p^2`` values in all (``4 r_p^2`` while there is no momentum yet; two of the
four in float64); one all-reduce of one value (the non-finite verdict). For ``L`` layers of rank
``r`` without offset each rank receives about ``4 L r n`` values, twice the scaled optimizers'
``2 L r n`` because ``lora_A`` has width ``2r``, still a fraction ``4 r / m`` of the frozen base
weights FSDP gathers anyway; ``m``-sized data is never communicated. The momentum is stored as
DTensors: ``momentum_left`` ``(m, 2r)`` sharded like ``lora_B``, ``momentum_right`` ``(n, 2r)``
replicated, so ``torch.distributed.checkpoint`` state dicts save and reshard them. The result
equals the single-process step up to summation order (checked in float64 to ``1e-12``).

Supported layouts: ``Shard(0)`` on one mesh dimension, ``Replicate`` on the others (FSDP, HSDP).
The building blocks (:func:`gather_rows`, :func:`all_reduce_sum`, :func:`any_across`,
:func:`local`, :func:`wrap_like`) are shared by both families.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from riemannlora.core.manifold_step import StepConfig, manifold_step
from riemannlora.core.preconditioner import precondition_pairs

__all__ = [
    "ShardedManifoldGroup",
    "all_reduce_sum",
    "any_across",
    "gather_rows",
    "is_dtensor",
    "local",
    "manifold_step_sharded",
    "pair_group",
    "precondition_local",
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


# ----------------------------------------------------------------------------------------------
# Riemannion / RiemannianSGD on row-sharded manifold factors
# ----------------------------------------------------------------------------------------------


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


class ShardedManifoldGroup:
    """Equal-shape manifold layers (see :mod:`riemannlora.manifold`) whose factors are DTensors
    row-sharded over one process group, for :func:`manifold_step_sharded`.

    ``A``: the ``lora_A`` weights ``[Q | V | -V0]^T`` ``(w, n)``; ``B``: the ``lora_B`` weights
    ``[Z1 | U | U0]`` ``(m, w)``; ``rank``: r; ``cfg``: the step's settings; ``Pm`` ``(L, m_k, 2r)``: this rank's rows
    of the previous momentum's left factors, ``Rmt`` ``(L, 2r, n)``: its right factors,
    transposed (whole on every rank); None: no momentum yet. After the step ``P_out``,
    ``Rt_out`` hold the new momentum in the same layouts (None without momentum).
    """

    def __init__(
        self,
        A: list[Tensor],
        B: list[Tensor],
        rank: int,
        cfg: StepConfig,
        Pm: Tensor | None = None,
        Rmt: Tensor | None = None,
        cdt: torch.dtype = torch.float32,
    ) -> None:
        self.A, self.B, self.rank, self.cfg = A, B, rank, cfg
        self.Pm, self.Rmt, self.cdt = Pm, Rmt, cdt
        self.m, self.n = B[0].shape[0], A[0].shape[1]
        self.literal = 2 * rank > min(self.m, self.n)
        self.P_out: Tensor | None = None
        self.Rt_out: Tensor | None = None
        self.s: dict[str, Any] = {}  # scratch between the phases


def _reduce(tensors: list[Tensor], group: Any) -> None:
    """In-place sum over ``group`` of all ``tensors`` with ONE all-reduce (none if empty)."""
    if tensors:
        all_reduce_sum(group)(tensors)


def _positive_qr(Y: Tensor) -> tuple[Tensor, Tensor]:
    """Householder QR normalized to ``diag(R) >= 0``, as the single-process tangent QR."""
    Qd, R = torch.linalg.qr(Y)
    sign = torch.where(torch.diagonal(R, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(R.dtype)
    return Qd * sign.unsqueeze(-2), R * sign.unsqueeze(-1)


def manifold_step_sharded(groups: Sequence[ShardedManifoldGroup], group: Any) -> None:
    """One Riemannion / Riemannian-SGD step of every layer in ``groups`` (factors row-sharded
    over the process group ``group``), exactly as the single-process structured step, writing
    this rank's rows of the new point into the parameters and setting ``P_out``/``Rt_out``.

    Every collective is batched over all groups; see the module docstring for the schedule and
    its communication volume.
    """
    from riemannlora.core.geometry import (
        TangentQR,
        _cholesky_factors,
        _cholesky_qr,
        msign_tangent_qr,
        qr_positive,
        retraction_core,
        tangent_qr_to_factors,
    )

    world, rank = dist.get_world_size(group), dist.get_rank(group)

    # -- phase 0: ONE all-gather of the small factors (A, G_A) of every layer, and of the tall
    # ones (B, G_B, momentum rows) of the rare layers with 2r > min(m, n) (literal path)
    shards: list[Tensor] = []
    shapes: list[torch.Size] = []
    for g in groups:
        r, L = g.rank, len(g.A)
        shards += [local(a) for a in g.A] + [local(a.grad) for a in g.A]
        shapes += [a.shape for a in g.A] * 2
        if g.literal:
            shards += [local(b) for b in g.B] + [local(b.grad) for b in g.B]
            shapes += [b.shape for b in g.B] * 2
            if g.Pm is not None:
                shards += list(g.Pm.unbind(0))
                shapes += [torch.Size((g.m, 2 * r))] * L
    whole = gather_rows(shards, shapes, group)
    pos = 0
    for g in groups:
        r, L, cdt = g.rank, len(g.A), g.cdt
        A_full = torch.stack(whole[pos : pos + L]).to(cdt)
        GA_full = torch.stack(whole[pos + L : pos + 2 * L]).to(cdt)
        pos += 2 * L
        s = g.s
        s["Qt"], s["Vt"], s["GtUt"] = A_full[:, :r], A_full[:, r : 2 * r], GA_full[:, r : 2 * r]
        s["rows"] = row_range(g.m, world, rank)
        if g.literal:
            B_full = torch.stack(whole[pos : pos + L]).to(cdt)
            GB_full = torch.stack(whole[pos + L : pos + 2 * L]).to(cdt)
            pos += 2 * L
            Pm = None
            if g.Pm is not None:
                Pm = torch.stack(whole[pos : pos + L]).to(cdt)
                pos += L
            Rm = None if g.Rmt is None else g.Rmt.to(cdt).mT
            U_new, V_new, Q_new, Pm_new, Rm_new = manifold_step(
                B_full[:, :, r : 2 * r],
                s["Vt"].mT,
                s["Qt"].mT,
                GB_full[:, :, :r],
                s["GtUt"].mT,
                Pm,
                Rm,
                structured=False,
                **dataclasses.asdict(g.cfg),
            )
            lo, hi = s["rows"]
            s["U_new"], s["V_new"], s["Q_new"] = U_new[:, lo:hi], V_new, Q_new
            if Pm_new is not None and Rm_new is not None:
                g.P_out, g.Rt_out = Pm_new[:, lo:hi], Rm_new.mT
    structured = [g for g in groups if not g.literal]

    # -- phase 1: ONE all-reduce of U^T G Q and Pm^T U (r x r, 2r x r per layer)
    grams: list[Tensor] = []
    for g in structured:
        r, s, cdt = g.rank, g.s, g.cdt
        s["U"] = torch.stack([local(b)[:, r : 2 * r] for b in g.B]).to(cdt)
        s["GQ"] = torch.stack([local(b.grad)[:, :r] for b in g.B]).to(cdt)
        s["UtGQ"] = s["U"].mT @ s["GQ"]
        grams.append(s["UtGQ"])
        if g.cfg.momentum and g.Pm is not None:
            s["Pold"], s["Rtold"] = g.Pm.to(cdt), g.Rmt.to(cdt)  # type: ignore[union-attr]
            s["PtU"] = s["Pold"].mT @ s["U"]
            grams.append(s["PtU"])
    _reduce(grams, group)

    # -- phase 2 (local): the momentum direction; ONE all-reduce of the float64 Grams of dU
    grams = []
    for g in structured:
        r, s, cfg = g.rank, g.s, g.cfg
        beta, tau = cfg.momentum, cfg.dampening
        c = 1.0 - tau
        U, GQ, Q = s["U"], s["GQ"], s["Qt"].mT
        GtU = s["GtUt"].mT
        proj_GQ = GQ - U @ s["UtGQ"]  # (I - U U^T) G Q, row-local
        if "PtU" in s:
            RtQ = s["Rtold"] @ Q  # (L, 2r, r)
            K = c * s["UtGQ"] + beta * (s["PtU"].mT @ RtQ)
            dU = beta * (s["Pold"] @ RtQ) - U @ K + c * GQ
            dV = c * GtU + beta * (s["Rtold"].mT @ s["PtU"])
        else:
            dU, dV = c * proj_GQ, c * GtU
        if beta and cfg.nesterov:
            uU, uV = beta * dU + c * proj_GQ, beta * dV + c * GtU
        else:
            uU, uV = dU, dV
        s["dU"], s["dV"], s["uU"] = dU, dV, uU
        Bm = Q.mT @ uV
        Qv, C = torch.linalg.qr(uV - Q @ Bm)  # whole on every rank: as single-process
        s["Bm"], s["Qv"], s["C"] = Bm, Qv, C
        u64 = uU.to(torch.float64)
        s["G1"] = u64.mT @ u64
        grams.append(s["G1"])
    _reduce(grams, group)

    # -- phase 3: Cholesky-QR of dU, first pass; ONE all-reduce of the second pass's Grams
    grams = []
    for g in structured:
        s = g.s
        R1, info = torch.linalg.cholesky_ex(s["G1"], upper=True)
        s["ok"] = bool((info == 0).all())  # G1 is the same on every rank: so is the verdict
        if s["ok"]:
            eye = torch.eye(g.rank, dtype=R1.dtype, device=R1.device)
            Qd1 = s["uU"] @ torch.linalg.solve_triangular(R1, eye, upper=True).to(g.cdt)
            q64 = Qd1.to(torch.float64)
            s["R1"], s["Qd1"], s["G2"] = R1, Qd1, q64.mT @ q64
            grams.append(s["G2"])
    _reduce(grams, group)

    # -- phase 4: second pass (CholeskyQR2: orthonormal to working precision); degenerate dU
    # (rank-deficient or too ill-conditioned) is gathered and factored by Householder, as the
    # single-process step does -- one extra all-gather, only in such steps
    fallback = []
    for g in structured:
        s = g.s
        if s["ok"]:
            chol = _cholesky_factors(s["G2"])
            if chol is None:
                s["ok"] = False
            else:
                s["Qd"] = s["Qd1"] @ chol[0].to(g.cdt)
                s["A"] = (chol[1] @ s["R1"]).to(g.cdt)
        if not s["ok"]:
            fallback.append(g)
    _gathered_qr(fallback, "uU", ("Qd", "A"), _positive_qr, group)

    # -- phase 5: msign on the 2r x 2r core (replicated), the retraction's core SVD and the
    # new left factor's rows; ONE all-reduce of their Grams
    grams = []
    for g in structured:
        r, s, cfg = g.rank, g.s, g.cfg
        Q, V = s["Qt"].mT, s["Vt"].mT
        t = TangentQR(s["Qd"], s["A"], s["Qv"], s["Bm"], s["C"])
        if cfg.orthogonalize:
            t = msign_tangent_qr(t, rtol=torch.finfo(g.cdt).eps * max(g.m, g.n))
        if cfg.momentum:
            mU, mV = tangent_qr_to_factors(Q, t) if cfg.store_orthogonalized else (s["dU"], s["dV"])
            g.P_out = torch.cat([mU, s["U"]], dim=-1)
            g.Rt_out = torch.cat([s["Qt"], mV.mT], dim=-2)
        Ur, Vr, S = retraction_core(V, Q, t, cfg.lr, cfg.weight_decay)
        s["U_raw"] = s["U"] @ Ur[..., :r, :] + t.Qd @ Ur[..., r:, :]
        s["Vr"], s["S"], s["t"] = Vr, S, t
        s["G3"] = s["U_raw"].mT @ s["U_raw"]
        grams.append(s["G3"])
    _reduce(grams, group)

    # -- phase 6: the new point (rows of U, whole V and Q); a degenerate step gathers U_raw
    fallback = []
    for g in structured:
        s = g.s
        chol = _cholesky_factors(s["G3"])
        if chol is None:
            fallback.append(g)
        else:
            s["U_new"], s["Ru"] = s["U_raw"] @ chol[0], chol[1]
    _gathered_qr(fallback, "U_raw", ("U_new", "Ru"), torch.linalg.qr, group)
    for g in structured:
        r, s = g.rank, g.s
        Q, Qv, Vr, S, Ru = s["Qt"].mT, s["Qv"], s["Vr"], s["S"], s["Ru"]
        Yt = Vr[..., :r, :].mT @ Q.mT + Vr[..., r:, :].mT @ Qv.mT
        chol = _cholesky_qr(Yt.mT)
        if chol is None:
            W = (Vr * S.unsqueeze(-2)) @ Ru.mT
            V_new = Q @ W[..., :r, :] + Qv @ W[..., r:, :]
            s["V_new"], s["Q_new"] = V_new, qr_positive(V_new)[0]
        else:
            Q_newt = chol[0].mT @ Yt
            s["V_new"] = (((Ru * S.unsqueeze(-2)) @ chol[1].mT) @ Q_newt).mT
            s["Q_new"] = Q_newt.mT

    # write this rank's rows of the new point (the point stays as it is when lr = 0)
    for g in groups:
        r, s = g.rank, g.s
        with torch.no_grad():
            for b in g.B:
                local(b)[:, :r].zero_()  # Z1 = 0
            if g.cfg.lr == 0:
                continue
            new_rows = torch.cat([s["Q_new"].mT, s["V_new"].mT], dim=-2)  # (L, 2r, n)
            for j, (a, b) in enumerate(zip(g.A, g.B)):
                bl, al = local(b), local(a)
                bl[:, r : 2 * r].copy_(s["U_new"][j])
                lo, hi = row_range(a.shape[0], world, rank)
                top = min(hi, 2 * r)
                if lo < top:
                    al[: top - lo].copy_(new_rows[j, lo:top])
        g.s = {}


def _gathered_qr(groups: list, key: str, out: tuple[str, str], qr: Callable, group: Any) -> None:
    """The degenerate-step fallback: gather the row-sharded ``(m, r)`` tensors ``s[key]`` of
    ``groups`` whole (one all-gather), QR them on every rank and keep this rank's rows of the
    Q factor: ``s[out[0]]`` (rows) and ``s[out[1]]`` (the small R, replicated)."""
    if not groups:
        return
    full = gather_rows(
        [u for g in groups for u in g.s[key].unbind(0)],
        [torch.Size((g.m, g.rank)) for g in groups for _ in g.A],
        group,
    )
    pos = 0
    for g in groups:
        L = len(g.A)
        Qf, R = qr(torch.stack(full[pos : pos + L]))
        pos += L
        lo, hi = g.s["rows"]
        g.s[out[0]], g.s[out[1]] = Qf[:, lo:hi], R
