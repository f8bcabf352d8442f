"""Riemannion / Riemannian SGD on FSDP2-sharded factors: the core structured step, driven over
row shards (see :mod:`riemannlora.distributed` for the schedule and its communication).

Every group's step is :func:`riemannlora.core.manifold_step.structured_steps` on this rank's
rows of the tall matrices and on the whole small ones. The groups run side by side, one round
of requests at a time (:mod:`riemannlora.core.rows`): the sums over row shards of a round are
one all-reduce for all groups, and the QRs of the row-sharded direction are Cholesky-QR2 from
all-reduced Grams (:func:`_answer_qrs`), with a gather-and-Householder fallback for degenerate
steps. Layers with ``2r > min(m, n)`` are gathered whole and take the literal kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from riemannlora.core.geometry import cholesky_qr2_steps
from riemannlora.core.manifold_step import (
    Momentum,
    StepConfig,
    StepResult,
    literal_step,
    structured_shape,
    structured_steps,
)
from riemannlora.core.rows import RowSteps, RowSum, TallQR, positive_diagonal_
from riemannlora.distributed.tensors import all_reduce_sum, gather_rows, local, row_range

__all__ = ["ShardedManifoldGroup", "manifold_step_sharded"]


@dataclass(eq=False)
class ShardedManifoldGroup:
    """Equal-shape manifold layers (see :mod:`riemannlora.manifold`) whose factors are DTensors
    row-sharded over one process group.

    ``A``: the ``lora_A`` weights ``[Q | V | -V0]^T`` ``(w, n)``; ``B``: the ``lora_B`` weights
    ``[Z1 | U | U0]`` ``(m, w)``; ``rank``: r; ``cfg``: the step's settings; ``mom``: the
    previous momentum, ``Pt`` this rank's rows ``(L, 2r, m_k)`` and ``Rt`` whole
    ``(L, 2r, n)`` (None: no momentum yet); ``cdt``: the compute dtype. The step sets
    ``new_momentum`` in the same layout (None without momentum)."""

    A: list[Tensor]
    B: list[Tensor]
    rank: int
    cfg: StepConfig
    mom: Momentum | None = None
    cdt: torch.dtype = torch.float32
    new_momentum: Momentum | None = field(default=None, init=False)

    @property
    def m(self) -> int:
        return self.B[0].shape[0]

    @property
    def n(self) -> int:
        return self.A[0].shape[1]

    @property
    def literal(self) -> bool:
        return not structured_shape(self.m, self.n, self.rank)


@dataclass(eq=False)
class _Run:
    """A group's computation over row shards in progress: the group, this rank's ``rows`` of
    its tall matrices, the computation (a generator of :mod:`riemannlora.core.rows` requests,
    e.g. the core step) and its result once it returned."""

    group: ShardedManifoldGroup
    rows: tuple[int, int]
    steps: RowSteps[Any] | None = None
    result: Any = None


def manifold_step_sharded(groups: Sequence[ShardedManifoldGroup], process_group: Any) -> None:
    """One Riemannion / Riemannian-SGD step of every layer in ``groups`` (factors row-sharded
    over ``process_group``), as the single-process structured step up to summation order,
    writing this rank's rows of the new point into the parameters and setting
    ``new_momentum``. Every collective is batched over all groups."""
    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    runs = [_Run(g, row_range(g.m, world, rank)) for g in groups]
    _start(runs, _gather_small(runs, process_group))
    _run_side_by_side([run for run in runs if run.steps is not None], process_group)
    for run in runs:
        _write_rows(run, world, rank)


def _gather_small(runs: list[_Run], process_group: Any) -> list[list[Tensor]]:
    """ONE all-gather of the small factors (A, G_A) of every layer, and of the tall ones (B,
    G_B, the momentum's left basis) of the layers that take the literal kernel: per run, the
    whole tensors in that order."""
    shards: list[Tensor] = []
    shapes: list[torch.Size] = []
    counts = []
    for run in runs:
        g = run.group
        L, before = len(g.A), len(shards)
        shards += [local(a) for a in g.A] + [local(a.grad) for a in g.A]
        shapes += [a.shape for a in g.A] * 2
        if g.literal:
            shards += [local(b) for b in g.B] + [local(b.grad) for b in g.B]
            shapes += [b.shape for b in g.B] * 2
            if g.mom is not None:
                shards += list(g.mom.Pt.mT.unbind(0))
                shapes += [torch.Size((g.m, 2 * g.rank))] * L
        counts.append(len(shards) - before)
    whole = gather_rows(shards, shapes, process_group)
    out, pos = [], 0
    for count in counts:
        out.append(whole[pos : pos + count])
        pos += count
    return out


def _start(runs: list[_Run], whole: list[list[Tensor]]) -> None:
    """Steps the literal groups (whole, on every rank) and starts the core structured step of
    the others on this rank's rows."""
    for run, tensors in zip(runs, whole):
        g, r, cdt = run.group, run.group.rank, run.group.cdt
        L = len(g.A)
        A_full = torch.stack(tensors[:L]).to(cdt)
        GA_full = torch.stack(tensors[L : 2 * L]).to(cdt)
        Qt = A_full[:, :r].contiguous()
        Vt = A_full[:, r : 2 * r].contiguous()
        GtUt = GA_full[:, r : 2 * r].contiguous()
        if g.literal:
            B_full = torch.stack(tensors[2 * L : 3 * L]).to(cdt)
            GB_full = torch.stack(tensors[3 * L : 4 * L]).to(cdt)
            mom = None
            if g.mom is not None:
                Pt = torch.stack(tensors[4 * L : 5 * L]).to(cdt).mT
                core = None if g.mom.core is None else g.mom.core.to(cdt)
                mom = Momentum(Pt, g.mom.Rt.to(cdt), core)
            Ut, GQt = B_full[:, :, r : 2 * r].mT, GB_full[:, :, :r].mT
            res = literal_step(Ut, Qt, Vt, GQt, GtUt, mom, g.cfg)
            lo, hi = run.rows
            new = res.momentum
            if new is not None:
                new = Momentum(new.Pt[..., lo:hi], new.Rt)
            run.result = StepResult(res.U[:, lo:hi], res.V, res.Q, new, None)
            continue
        Ut = torch.stack([local(b)[:, r : 2 * r].mT for b in g.B]).to(cdt)
        GQt = torch.stack([local(b.grad)[:, :r].mT for b in g.B]).to(cdt)
        mom = out = None
        if g.cfg.momentum:
            if g.mom is not None:
                mom = Momentum(
                    *(None if x is None else x.to(cdt) for x in (g.mom.Pt, g.mom.Rt, g.mom.core))
                )
            out = Momentum.empty(Ut, L, r, Ut.shape[-1], g.n)
        run.steps = structured_steps(Ut, Qt, Vt, GQt, GtUt, mom, g.cfg, out=out, m=g.m)


def _run_side_by_side(runs: list[_Run], process_group: Any) -> None:
    """Runs the groups' core steps one round of requests at a time: the QRs of a round are
    answered together (:func:`_answer_qrs`); the sums once every pending request is a sum, by
    ONE all-reduce for all of them."""
    pending: dict[_Run, RowSum | TallQR] = {}
    for run in runs:
        _advance(run, None, pending, first=True)
    reduce = all_reduce_sum(process_group)
    while pending:
        qrs = [(run, req) for run, req in pending.items() if isinstance(req, TallQR)]
        if qrs:
            answers = _answer_qrs(qrs, process_group)
            for (run, _), answer in zip(qrs, answers):
                _advance(run, answer, pending)
            continue
        waiting = list(pending.items())
        tensors = [t for _, req in waiting for t in req.tensors]  # type: ignore[union-attr]
        if tensors:
            reduce(tensors)
        for run, _ in waiting:
            _advance(run, None, pending)


def _advance(
    run: _Run, answer: Any, pending: dict[_Run, RowSum | TallQR], first: bool = False
) -> None:
    """Sends ``answer`` to a run's step and records its next request (or its result)."""
    assert run.steps is not None
    try:
        pending[run] = next(run.steps) if first else run.steps.send(answer)
    except StopIteration as stop:
        pending.pop(run, None)
        run.result = stop.value


def _answer_qrs(
    requests: list[tuple[_Run, TallQR]], process_group: Any
) -> list[tuple[Tensor, Tensor]]:
    """The QRs of row-sharded tall matrices, batched: those with ``diag(R) > 0`` (the
    direction's) by Cholesky-QR2 (:func:`~riemannlora.core.geometry.cholesky_qr2_steps`, run
    side by side: two all-reduces for all). A factorization whose Grams fail its checks (a
    rank-deficient or too ill-conditioned Y, e.g. an all-zero gradient), and every QR without
    sign normalization (the retraction's fallback), gathers Y whole (one all-gather for all)
    and takes Householder's, as the single-process step does. Every rank takes the same
    decisions, from the same all-reduced Grams."""
    qr2 = {
        k: _Run(run.group, run.rows, cholesky_qr2_steps(req.Y))
        for k, (run, req) in enumerate(requests)
        if req.positive
    }
    _run_side_by_side(list(qr2.values()), process_group)
    answers = [None if k not in qr2 else qr2[k].result for k in range(len(requests))]
    gather = [k for k, answer in enumerate(answers) if answer is None]
    if gather:
        Ys = [requests[k][1].Y for k in gather]
        full = gather_rows(
            [y for Y in Ys for y in Y.unbind(0)],
            [
                torch.Size((requests[k][0].group.m, Y.shape[-1]))
                for k, Y in zip(gather, Ys)
                for _ in Y
            ],
            process_group,
        )
        pos = 0
        for k, Y in zip(gather, Ys):
            Qf, R = torch.linalg.qr(torch.stack(full[pos : pos + len(Y)]))
            pos += len(Y)
            if requests[k][1].positive:
                Qf, R = positive_diagonal_(Qf, R)
            lo, hi = requests[k][0].rows
            answers[k] = (Qf[:, lo:hi], R)
    return answers  # type: ignore[return-value]


def _sum(tensors: list[Tensor], process_group: Any) -> None:
    """In-place sum over the process group with ONE all-reduce (none if there is nothing)."""
    if tensors:
        all_reduce_sum(process_group)(tensors)


def _write_rows(run: _Run, world: int, rank: int) -> None:
    """Writes this rank's rows of the new point into the factors (Z1 = 0; the point stays as it
    is when lr = 0) and keeps the new momentum."""
    g, res, r = run.group, run.result, run.group.rank
    assert res is not None
    with torch.no_grad():
        for b in g.B:
            local(b)[:, :r].zero_()  # Z1 = 0
        if g.cfg.lr != 0:
            new_rows = torch.cat([res.Q.mT, res.V.mT], dim=-2)  # (L, 2r, n)
            for j, (a, b) in enumerate(zip(g.A, g.B)):
                local(b)[:, r : 2 * r].copy_(res.U[j])
                lo, hi = row_range(a.shape[0], world, rank)
                top = min(hi, 2 * r)
                if lo < top:
                    local(a)[: top - lo].copy_(new_rows[j, lo:top])
    g.new_momentum = res.momentum
