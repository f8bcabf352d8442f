"""Running a planned step (:mod:`riemannlora.optim._plan`) group by group: the structured
kernel in a group's workspace, the literal one, or the FSDP2-sharded step, and what each leaves
in the state (:mod:`riemannlora.optim._momentum`)."""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from riemannlora import distributed
from riemannlora.core.geometry import compute_dtype, to_compute_dtype
from riemannlora.core.manifold_step import Momentum, literal_step, structured_step
from riemannlora.optim._momentum import drop_core, stack_momentum
from riemannlora.optim._plan import LayerGroup, ManifoldPlan

__all__ = ["run_plan"]

State = dict[Tensor, dict[str, Any]]
CheckTransport = Callable[[Momentum, Tensor, Tensor], Momentum]


def run_plan(plan: ManifoldPlan, state: State, check_transport: CheckTransport) -> None:
    """Steps every group of ``plan`` (the gradient blocks of the structured ones gathered, the
    groups' settings set), counts the steps, and records what the state holds now."""
    sharded: dict[Any, list[LayerGroup]] = {}
    for g in plan.groups:
        if g.key.process_group is not None:
            sharded.setdefault(g.key.process_group, []).append(g)
        elif g.ws is not None:
            step_structured(g, state, check_transport)
        else:
            step_literal(g, state)
    for process_group, groups in sharded.items():
        step_sharded(groups, process_group, state)
    for g in plan.groups:
        _count_steps(g, state)
        g.fresh = False
    plan.wrote(state)


def step_structured(g: LayerGroup, state: State, check_transport: CheckTransport) -> None:
    """One structured group's step in its workspace (the gradient blocks gathered there).

    The momentum's transport coordinates (``cu``, ``cq``) of the last step are used as they
    are when the group is not ``fresh`` (the plan was reused: nothing can have moved the point
    since this optimizer wrote it), and after ``load_state_dict`` of a state dict whose
    fingerprint of the point matches the factors bit for bit (``exact_point``: a resumed run then
    steps bit for bit as the one that saved it). Otherwise (a change of the factors, an old
    checkpoint) ``check_transport`` computes them from the point and the momentum's bases and
    keeps the stored ones only when they agree to round-off."""
    cfg, cdt, ws = g.cfg, g.cdt, g.ws
    assert ws is not None
    m, n, r = g.key.m, g.key.n, g.key.rank
    L = len(g.A)
    # every tall block transposed ("wide", see structured_step): U^T = pb[:, r:],
    # Q^T = pa[:, :r], V^T = pa[:, r:], the parameters' own memory when they are packed;
    # lr = 0 (e.g. the first warmup step) keeps the point exactly: the step then works on
    # copies and nothing is written back (the momentum still moves)
    moves = cfg.lr != 0
    in_place = moves and ws.packed
    pa, pb = ws.point(in_place)
    Ut, Qt, Vt = pb[:, r:], pa[:, :r], pa[:, r:]
    mom, fresh, exact = g.mom, g.fresh, g.fresh and g.exact_point
    if mom is not None and mom.Pt.dtype != cdt:
        mom = Momentum(
            *(None if x is None else x.to(cdt) for x in (mom.Pt, mom.Rt, mom.core, mom.cu, mom.cq)),
            in_span=mom.in_span,
        )
        fresh, exact = True, False
    if mom is not None:
        if (fresh and not exact) or not mom.in_span:
            mom = check_transport(mom, Ut, Qt)
        out = Momentum(mom.Pt, mom.Rt, mom.core)
        if out.core is None:
            out.core = ws.GQt.new_empty(L, 2 * r, 2 * r)
    elif cfg.momentum:
        out = Momentum.empty(ws.GQt, L, r, m, n)
    else:
        out = None
    # the new point lands in pa and pb (on every path)
    res = structured_step(
        Ut,
        Qt,
        Vt,
        ws.GQt,
        ws.GtUt,
        mom,
        cfg,
        out=out,
        scratch=ws.scratch,
        packed=(pa, pb, ws.y_scratch),
    )
    coords = res.coords
    if in_place:  # written through the buffers: tell autograd the factors changed
        torch.autograd.graph.increment_version(chain(g.A, g.B))
    elif moves:
        ws.write_back()
    elif cfg.keeps_bases:
        # the momentum's bases [Qd | U], [Q | Qv] hold the old point: U = [Qd | U] [0; I],
        # Q = [Q | Qv] [I; 0]
        eye = torch.eye(r, dtype=cdt, device=pa.device).expand(L, r, r)
        zero = torch.zeros_like(eye)
        coords = (torch.cat([zero, eye], -2), torch.cat([eye, zero], -2))
    if out is not None:
        _keep_momentum(g, state, out, coords, fresh)


def _keep_momentum(
    g: LayerGroup,
    state: State,
    out: Momentum,
    coords: tuple[Tensor, Tensor] | None,
    fresh: bool,
) -> None:
    """Keeps a group's new momentum (updated in place in ``out``'s buffers) and the point's
    coordinates in its bases (into buffers kept with it); ``state`` holds per-layer views of
    them, assigned anew only when the buffers or the presence of the coordinates changed."""
    last = None if fresh else g.mom
    cu = cq = None
    if coords is not None:
        if last is not None and last.cu is not None and last.cq is not None:
            cu, cq = last.cu.copy_(coords[0]), last.cq.copy_(coords[1])
        else:
            cu, cq = coords[0].clone(), coords[1].clone()
    assert out.core is not None
    g.mom = Momentum(out.Pt, out.Rt, out.core, cu, cq, in_span=cu is not None)
    if last is not None and last.Pt is out.Pt and last.cu is cu:
        return  # the state holds views of these very buffers
    lefts, rights, cores = out.Pt.mT.unbind(0), out.Rt.mT.unbind(0), out.core.unbind(0)
    cus = cu.unbind(0) if cu is not None else (None,) * len(g.A)
    cqs = cq.unbind(0) if cq is not None else (None,) * len(g.A)
    for a, b, left, right, c, tu, tq in zip(g.A, g.B, lefts, rights, cores, cus, cqs):
        sb, sa = state[b], state[a]
        sb["momentum_left"], sa["momentum_right"], sb["momentum_core"] = left, right, c
        if tu is None:
            sb.pop("transport_left", None)
            sa.pop("transport_right", None)
        else:
            sb["transport_left"], sa["transport_right"] = tu, tq


def step_literal(g: LayerGroup, state: State) -> None:
    """One group by the literal kernel (``2r > min(m, n)``); the momentum is stored as a plain
    factor pair."""
    A, B, cfg = g.A, g.B, g.cfg
    r, dtype = g.key.rank, g.key.dtype
    U, V, Q, GQ, GtU = to_compute_dtype(
        torch.stack([b[:, r : 2 * r] for b in B]),
        torch.stack([a[r : 2 * r].mT for a in A]),
        torch.stack([a[:r].mT for a in A]),
        torch.stack([b.grad[:, :r] for b in B]),
        torch.stack([a.grad[r : 2 * r].mT for a in A]),
    )
    states_b, states_a = g.states(state)
    mom = stack_momentum(states_b, states_a, g.key.m, g.key.n, r)
    res = literal_step(U.mT, Q.mT, V.mT, GQ.mT, GtU.mT, mom, cfg)
    torch._foreach_zero_([b[:, :r] for b in B])  # Z1 stays 0
    if cfg.lr != 0:  # lr = 0 keeps the point exactly
        torch._foreach_copy_([b[:, r : 2 * r] for b in B], list(res.U.to(dtype).unbind(0)))
        torch._foreach_copy_([a[:r] for a in A], list(res.Q.mT.to(dtype).unbind(0)))
        torch._foreach_copy_([a[r : 2 * r] for a in A], list(res.V.mT.to(dtype).unbind(0)))
    if res.momentum is not None:
        lefts, rights = res.momentum.Pt.mT, res.momentum.Rt.mT
        for j, (a, b) in enumerate(zip(A, B)):
            state[b]["momentum_left"] = lefts[j]
            state[a]["momentum_right"] = rights[j]
            drop_core(state[b], state[a])


def step_sharded(groups: list[LayerGroup], process_group: Any, state: State) -> None:
    """The groups of layers row-sharded over one process group, by
    :func:`riemannlora.distributed.manifold_step_sharded` (every collective batched over all
    of them), with the momentum stacked from the local shards of the states. It is stored as
    the plain factor pair ``M = Lb (Rb core^T)^T`` of DTensors: ``momentum_left`` ``(m, 2r)``
    row-sharded like ``lora_B``, ``momentum_right`` ``(n, 2r)`` replicated."""
    sharded = []
    for g in groups:
        mom = None
        states_b, states_a = g.states(state)
        if g.cfg.momentum:
            rows = distributed.local(g.B[0]).shape[0]
            mom = stack_momentum(states_b, states_a, rows, g.key.n, g.key.rank)
        if mom is not None:
            mom.cu = mom.cq = None  # the transport is computed from the point
            mom.in_span = False
        cdt = compute_dtype(distributed.local(g.A[0]), *([] if mom is None else [mom.Pt]))
        sharded.append(distributed.ShardedManifoldGroup(g.A, g.B, g.key.rank, g.cfg, mom, cdt))
    distributed.manifold_step_sharded(sharded, process_group)
    for s in sharded:
        new = s.new_momentum
        if new is None:
            continue
        right = new.Rt if new.core is None else new.core @ new.Rt
        for j, (a, b) in enumerate(zip(s.A, s.B)):
            state[b]["momentum_left"] = distributed.wrap_rows(new.Pt[j].mT, b, (s.m, 2 * s.rank))
            state[a]["momentum_right"] = distributed.wrap_replicated(right[j].mT, a)
            drop_core(state[b], state[a])


def _count_steps(g: LayerGroup, state: State) -> None:
    """``state[b]["step"] += 1`` for a group: the counters are 0-d views of one stacked tensor,
    incremented by a single op once the state holds them."""
    if g.counts is not None and not g.fresh:
        g.counts.add_(1.0)
        return
    steps = [state[b].get("step") for b in g.B]
    zero = torch.tensor(0.0)
    g.counts = torch.stack([zero if x is None else x.reshape(()) for x in steps]).add_(1.0)
    for b, view in zip(g.B, g.counts.unbind(0)):
        state[b]["step"] = view
