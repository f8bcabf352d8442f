"""Riemannion / RiemannianSGD against a dense float64 re-implementation of the spec, invariance
to the factorization, state-dict resume, the AdamW group, and argument validation."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import riemannlora as rl
from riemannlora.manifold import manifold_layers
from riemannlora.optim.riemannion import manifold_step
from test_manifold import (
    assert_bitwise_equal,
    base_weights,
    dense_gradients,
    lm_loss,
    logits,
    mlp_data,
    mlp_loss,
    peft_llama,
    peft_mlp,
    token_batch,
)

torch.set_num_threads(2)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


# --------------------------------------------------------------------------------------------
# dense float64 reference of the spec's step
# --------------------------------------------------------------------------------------------


def proj(U, Q, Z):
    """P_X(Z) = U U^T Z + (I - U U^T) Z Q Q^T."""
    P = U @ U.T
    return P @ Z + (Z - P @ Z) @ Q @ Q.T


def dense_msign(Z):
    u, s, vh = torch.linalg.svd(Z, full_matrices=False)
    keep = s > 1e-12 * s.max()
    return u[:, keep] @ vh[keep]


def dense_step(U, V, Q, G, M_prev, *, lr, wd, beta, nesterov, orth, store_orth, damp=0.0):
    """X_new (dense) and the momentum to store, per the spec (section 'Riemannion, one step')."""
    r = U.shape[1]
    X = U @ V.T
    g = proj(U, Q, G)
    M = (1 - damp) * g + (beta * proj(U, Q, M_prev) if M_prev is not None else 0)
    D = beta * M + (1 - damp) * g if nesterov else M
    D_o = proj(U, Q, dense_msign(D)) if orth else D
    u, s, vh = torch.linalg.svd(X - lr * (D_o + wd * X), full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r], (D_o if store_orth else M)


def momentum_factors(opt, layer):
    """The momentum of a layer as a factor pair ``M = Pm Rm^T`` (the state's core, if any,
    folded into the left factor), or (None, None)."""
    left = opt.state[layer.b].get("momentum_left")
    right = opt.state[layer.a].get("momentum_right")
    if left is None or right is None:
        return None, None
    core = opt.state[layer.b].get("momentum_core")
    return (left if core is None else left @ core), right


def run_dense_check(opt_cls, steps=3, **kw):
    lr = kw.pop("lr", 0.05)
    wd = kw.get("weight_decay", 0.0)
    beta = kw.get("momentum", 0.9)
    nesterov = kw.get("nesterov", False)
    store_orth = kw.get("store_orthogonalized", False)
    orth = opt_cls is rl.Riemannion
    default_scale = inspect.signature(rl.Riemannion).parameters["scale_lr"].default
    scale = kw.get("scale_lr", default_scale if orth else None)
    _, model = peft_mlp(init=kw.pop("init", False))
    data = mlp_data()
    opt = opt_cls(model, lr=lr, generator=torch.Generator().manual_seed(0), **kw)
    layers = manifold_layers(model)
    momentum = {layer.name: None for layer in layers}
    for _ in range(steps):
        G = dense_gradients(model, lambda mdl: mlp_loss(mdl, data))
        before = {
            layer.name: (
                layer.U().detach().clone(),
                layer.V().detach().clone(),
                layer.Q().detach().clone(),
            )
            for layer in layers
        }
        opt.zero_grad()
        mlp_loss(model, data).backward()
        opt.step()
        for layer in layers:
            U, V, Q = before[layer.name]
            m, n = layer.m, layer.n
            step_lr = lr * (0.2 * max(m, n) ** 0.5 if scale == "match_adamw" else 1.0)
            X_ref, M_ref = dense_step(
                U, V, Q, G[layer.name], momentum[layer.name],
                lr=step_lr, wd=wd * lr / step_lr, beta=beta, nesterov=nesterov, orth=orth,
                store_orth=store_orth, damp=beta if opt_cls is rl.RiemannianSGD else 0.0,
            )  # fmt: skip
            torch.testing.assert_close(layer.point().detach(), X_ref, atol=1e-11, rtol=1e-9)
            if beta:
                Pm, Rm = momentum_factors(opt, layer)
                torch.testing.assert_close(Pm @ Rm.T, M_ref, atol=1e-11, rtol=1e-9)
            momentum[layer.name] = M_ref if beta else None
    return model, opt, layers


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"weight_decay": 0.1, "nesterov": True},
        {"store_orthogonalized": True, "momentum": 0.5},
        {"store_orthogonalized": True, "nesterov": True},
        {"scale_lr": "match_adamw", "lr": 0.01, "weight_decay": 0.05},
        {"scale_lr": None, "lr": 0.05, "weight_decay": 0.05},
        {"momentum": 0.0},
        {"init": True},  # first step from V = 0 (X = 0)
    ],
)
def test_riemannion_matches_dense_reference(kw):
    run_dense_check(rl.Riemannion, **kw)


@pytest.mark.parametrize("kw", [{}, {"nesterov": True, "weight_decay": 0.1}, {"momentum": 0.0}])
def test_riemannian_sgd_matches_dense_reference(kw):
    run_dense_check(rl.RiemannianSGD, lr=0.5, **kw)


def test_invariants_after_steps():
    """Rank r, orthonormal U, Z1 = 0, Q spans V, base bitwise unchanged; first step from X = 0."""
    _, model = peft_mlp(init=True)  # PEFT default: B = 0
    base = base_weights(model)
    data = mlp_data()
    opt = rl.Riemannion(
        model, lr=0.05, weight_decay=0.01, generator=torch.Generator().manual_seed(0)
    )
    layers = manifold_layers(model)
    for _ in range(4):
        opt.zero_grad()
        mlp_loss(model, data).backward()
        opt.step()
        for layer in layers:
            r = layer.rank
            U, V, Q = layer.U().detach(), layer.V().detach(), layer.Q().detach()
            eye = torch.eye(r, dtype=U.dtype)
            torch.testing.assert_close(U.T @ U, eye, atol=1e-12, rtol=0)
            torch.testing.assert_close(Q.T @ Q, eye, atol=1e-12, rtol=0)
            assert torch.equal(layer.Z1(), torch.zeros_like(layer.Z1()))
            s = torch.linalg.svdvals(layer.point().detach())
            assert s[r - 1] > 1e-6 * s[0] and (r == len(s) or s[r] < 1e-12 * s[0])
            torch.testing.assert_close(Q @ (Q.T @ V), V, atol=1e-12, rtol=0)
    assert_bitwise_equal(base, model)


@settings(deadline=None, max_examples=4)
@given(seed=st.integers(0, 10_000))
def test_riemannion_is_invariant_to_factorization(seed):
    """(B S, S^-1 A) and (B, A) give the same X after 3 Riemannion steps."""
    X1 = _effective_after_steps(seed, rl.Riemannion, transform=False)
    X2 = _effective_after_steps(seed, rl.Riemannion, transform=True)
    for k in X1:
        torch.testing.assert_close(X2[k], X1[k], atol=1e-10, rtol=1e-8)


def test_riemannian_sgd_is_invariant_to_factorization():
    X1 = _effective_after_steps(7, rl.RiemannianSGD, transform=False, lr=0.5)
    X2 = _effective_after_steps(7, rl.RiemannianSGD, transform=True, lr=0.5)
    for k in X1:
        torch.testing.assert_close(X2[k], X1[k], atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("opt_name", ["AdamW", "Muon"])
def test_euclidean_optimizers_are_not_invariant(opt_name):
    X1 = _effective_after_steps(7, opt_name, transform=False)
    X2 = _effective_after_steps(7, opt_name, transform=True)
    rel = max(((X2[k] - X1[k]).norm() / X1[k].norm()).item() for k in X1)
    assert rel > 1e-2, rel


def _effective_after_steps(seed, opt, transform, steps=3, lr=0.02):
    """Effective deltas after ``steps`` steps from the adapter (B, A) or (B S, S^-1 A)."""
    _, model = peft_mlp(seed=0)
    if transform:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, "lora_A") and "default" in m.lora_A:
                    r = m.lora_A["default"].weight.shape[0]
                    S = torch.randn(r, r, generator=g, dtype=torch.float64) + 2 * torch.eye(
                        r, dtype=torch.float64
                    )
                    m.lora_B["default"].weight.copy_(m.lora_B["default"].weight @ S)
                    m.lora_A["default"].weight.copy_(
                        torch.linalg.solve(S, m.lora_A["default"].weight)
                    )
    if opt in ("AdamW", "Muon"):
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        optimizer = (
            torch.optim.AdamW(lora, lr=lr, weight_decay=0.0)
            if opt == "AdamW"
            else torch.optim.Muon(lora, lr=lr, weight_decay=0.0)
        )
    else:
        optimizer = opt(model, lr=lr)
    data = mlp_data()
    for _ in range(steps):
        optimizer.zero_grad()
        mlp_loss(model, data).backward()
        optimizer.step()
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            out[name] = (
                m.lora_B["default"].weight @ m.lora_A["default"].weight * m.scaling["default"]
            ).detach()
    return out


def _train(model, opt, ids, steps):
    for _ in range(steps):
        opt.zero_grad()
        lm_loss(model, ids).backward()
        opt.step()


@pytest.mark.parametrize("use_loi", [False, True])
def test_state_dict_resume_is_bitwise(use_loi):
    ids = token_batch()
    kw = {"lr": 0.01, "weight_decay": 0.01, "adamw_lr": 1e-3, "adamw_weight_decay": 0.1}

    def fresh():
        _, model = peft_llama(modules_to_save=["lm_head"])
        return model

    def start():
        model = fresh()
        if use_loi:
            rl.init_loi(
                model, lambda: lm_loss(model, ids), generator=torch.Generator().manual_seed(1)
            )
        return model, rl.Riemannion(model, generator=torch.Generator().manual_seed(0), **kw)

    model, opt = start()
    _train(model, opt, ids, 2)
    buf_m, buf_o = io.BytesIO(), io.BytesIO()
    torch.save(model.state_dict(), buf_m)
    torch.save(opt.state_dict(), buf_o)
    _train(model, opt, ids, 3)

    resumed = fresh()
    rl.to_manifold(resumed, with_offset=use_loi)
    buf_m.seek(0)
    buf_o.seek(0)
    resumed.load_state_dict(torch.load(buf_m))
    opt2 = rl.Riemannion(resumed, **kw)
    opt2.load_state_dict(torch.load(buf_o))
    _train(resumed, opt2, ids, 3)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), resumed.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_resume_rejects_other_layout():
    ids = token_batch()
    _, model = peft_llama()
    opt = rl.Riemannion(model, lr=0.01)
    _train(model, opt, ids, 1)
    sd = opt.state_dict()
    _, other = peft_llama(r=3)
    with pytest.raises(ValueError, match="ranks differ"):
        rl.Riemannion(other, lr=0.01).load_state_dict(sd)


def test_resume_rejects_other_class_corrupt_or_misshapen_state():
    ids = token_batch()
    _, model = peft_llama(modules_to_save=["lm_head"])
    opt = rl.Riemannion(model, lr=0.01)
    _train(model, opt, ids, 1)
    sd = opt.state_dict()

    def fresh(cls=rl.Riemannion):
        _, m = peft_llama(modules_to_save=["lm_head"])
        return cls(m, lr=0.01)

    with pytest.raises(ValueError, match="another manifold optimizer than RiemannianSGD"):
        fresh(rl.RiemannianSGD).load_state_dict(copy.deepcopy(sd))
    other = fresh(rl.RiemannianSGD)
    _, m2 = peft_llama(modules_to_save=["lm_head"])
    sgd = rl.RiemannianSGD(m2, lr=0.01)
    _train(m2, sgd, ids, 1)
    with pytest.raises(ValueError, match="another manifold optimizer than Riemannion"):
        fresh().load_state_dict(sgd.state_dict())
    other.load_state_dict(sgd.state_dict())  # its own class loads

    first = sd["param_groups"][0]["params"][1]  # lora_B of the first layer
    for key, bad, match in (
        ("momentum_left", lambda t: t.clone().fill_(float("nan")), "NaN/Inf"),
        ("momentum_left", lambda t: t[:, :-1].clone(), "has shape"),
    ):
        broken = copy.deepcopy(sd)
        broken["state"][first][key] = bad(broken["state"][first][key])
        target = fresh()
        saved = copy.deepcopy(target.state_dict())
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(broken)
        assert target.state_dict()["state"] == saved["state"] == {}  # nothing was loaded
    head = sd["param_groups"][1]["params"][0]
    broken = copy.deepcopy(sd)
    broken["state"][head]["exp_avg"] = broken["state"][head]["exp_avg"].clone().fill_(float("inf"))
    with pytest.raises(ValueError, match=r"exp_avg.*NaN/Inf"):
        fresh().load_state_dict(broken)
    with pytest.raises(TypeError, match="must be a dict"):
        fresh().load_state_dict([])


def test_other_parameters_follow_torch_adamw_bitwise():
    ids = token_batch()
    _, model = peft_llama(modules_to_save=["lm_head"])
    ref = copy.deepcopy(model)
    opt = rl.Riemannion(
        model,
        lr=0.01,
        adamw_lr=3e-3,
        adamw_betas=(0.8, 0.99),
        adamw_eps=1e-6,
        adamw_weight_decay=0.1,
    )
    rl.to_manifold(ref)
    others = [p for n, p in ref.named_parameters() if p.requires_grad and "lora_" not in n]
    assert others and len(opt.param_groups) == 2 and not opt.param_groups[1]["manifold"]
    ref_opt = torch.optim.AdamW(others, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        lm_loss(model, ids).backward()
        for n, p in model.named_parameters():  # the same gradients for the reference
            if p.requires_grad and "lora_" not in n:
                ref.get_parameter(n).grad = p.grad.clone()
        opt.step()
        ref_opt.step()
        for n, p in model.named_parameters():
            if p.requires_grad and "lora_" not in n:
                assert torch.equal(p, ref.get_parameter(n)), n
                # torch's own state layout
                assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}


def test_lr_scheduler_is_honoured():
    _, m1 = peft_mlp()
    _, m2 = peft_mlp()
    data = mlp_data()
    o1 = rl.Riemannion(m1, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(o1, lambda step: 0.25)
    assert o1.param_groups[0]["lr"] == pytest.approx(0.025)
    o2 = rl.Riemannion(m2, lr=0.025)
    for mdl, o in ((m1, o1), (m2, o2)):
        mlp_loss(mdl, data).backward()
        o.step()
    sched.step()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)


def test_low_precision_adapter_weights():
    """bf16 adapter weights: QR/SVD run in float32, U stays orthonormal to bf16 accuracy."""
    _, model = peft_mlp(init=False, dtype=torch.bfloat16)
    data = tuple(t.to(torch.bfloat16) for t in mlp_data())
    opt = rl.Riemannion(model, lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        mlp_loss(model, data).float().backward()
        opt.step()
    for layer in manifold_layers(model):
        U = layer.U().float()
        torch.testing.assert_close(U.T @ U, torch.eye(layer.rank), atol=2e-2, rtol=0)
        assert opt.state[layer.b]["momentum_left"].dtype == torch.float32


@pytest.mark.parametrize("first", ["Riemannion", "RiemannianSGD", "ScaledAdamW", "ScaledSGD"])
@pytest.mark.parametrize("then", ["init_loi", "to_manifold(with_offset=True)", "Riemannion"])
def test_replacing_factors_an_optimizer_holds_raises_before_anything_changes(first, then):
    """init_loi / to_manifold / a manifold optimizer after a riemannlora optimizer was created on
    the same factors: a clear error naming the order, the model untouched; once the old
    optimizer is dropped, the same call works. (A manifold optimizer on factors already in
    manifold form replaces nothing and is allowed.)"""
    ids = token_batch()
    _, model = peft_llama()
    opt = getattr(rl, first)(model, lr=0.01)
    calls = {
        "init_loi": lambda: rl.init_loi(model, lambda: lm_loss(model, ids)),
        "to_manifold(with_offset=True)": lambda: rl.to_manifold(model, with_offset=True),
        "Riemannion": lambda: rl.Riemannion(model, lr=0.01),
    }
    if then == "Riemannion" and not first.startswith("Scaled"):
        calls[then]()
        return
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=f"the {first} created earlier holds") as err:
        calls[then]()
    assert "create the optimizer afterwards" in str(err.value)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    del opt
    calls[then]()  # the stale optimizer is gone: the conversion goes ahead


@pytest.mark.parametrize("what", ["weight", "module"])
def test_optimizer_detects_factors_replaced_between_steps(what):
    """A factor replaced after a step (a new weight Parameter, or a new factor module) is
    noticed at the next step, though the optimizer's own parameters kept their storage."""
    ids = token_batch()
    _, model = peft_llama()
    opt = rl.Riemannion(model, lr=0.01)
    _train(model, opt, ids, 2)
    layer = manifold_layers(model)[1]
    if what == "weight":
        layer.module.lora_A["default"].weight = nn.Parameter(layer.a.detach().clone())
    else:
        old = layer.module.lora_B["default"]
        new = nn.Linear(old.in_features, old.out_features, bias=False)
        with torch.no_grad():
            new.weight.copy_(old.weight)
        layer.module.lora_B["default"] = new
    lm_loss(model, ids).backward()
    with pytest.raises(RuntimeError, match="were replaced after this optimizer was created"):
        opt.step()


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"lr": 0.0}, ValueError, "lr must be > 0.0, got 0.0"),
        ({"lr": -1e-3}, ValueError, "lr must be > 0.0"),
        ({"lr": float("nan")}, ValueError, "lr must be finite"),
        ({"lr": 0.1, "momentum": 1.0}, ValueError, r"momentum must be in \[0, 1\), got 1.0"),
        ({"lr": 0.1, "momentum": -0.1}, ValueError, r"momentum must be in \[0, 1\)"),
        ({"lr": 0.1, "weight_decay": -1.0}, ValueError, "weight_decay must be >= 0.0"),
        ({"lr": 0.1, "momentum": 0.0, "nesterov": True}, ValueError, "nesterov"),
        ({"lr": 0.1, "scale_lr": "muon"}, ValueError, "scale_lr must be one of"),
        ({"lr": 0.1, "adamw_betas": (0.9, 1.0)}, ValueError, r"adamw_betas\[1\]"),
        ({"lr": 0.1, "adamw_lr": 0.0}, ValueError, "adamw_lr must be > 0.0"),
    ],
)
def test_argument_validation(kw, exc, match):
    _, model = peft_mlp()
    with pytest.raises(exc, match=match):
        rl.Riemannion(model, **kw)


def test_rejects_parameter_lists():
    _, model = peft_mlp()
    with pytest.raises(TypeError, match="takes the model itself"):
        rl.Riemannion(list(model.parameters()), lr=0.1)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        rl.RiemannianSGD(model, lr=0.1, momentum=1.5)


# --------------------------------------------------------------------------------------------
# the structured fast path of manifold_step against the spec's literal formulas
# --------------------------------------------------------------------------------------------


def _random_stack(seed, L=3, m=12, n=9, r=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(L, m, r, generator=g, dtype=torch.float64)).Q
    V = torch.randn(L, n, r, generator=g, dtype=torch.float64)
    Q = torch.linalg.qr(V).Q
    GQ = torch.randn(L, m, r, generator=g, dtype=torch.float64)
    GtU = torch.randn(L, n, r, generator=g, dtype=torch.float64)
    # an old momentum at another point: [dU_old | U_old], [Q_old | dV_old]
    U0 = torch.linalg.qr(torch.randn(L, m, r, generator=g, dtype=torch.float64)).Q
    dU0 = torch.randn(L, m, r, generator=g, dtype=torch.float64)
    dU0 = dU0 - U0 @ (U0.mT @ dU0)
    Q0 = torch.linalg.qr(torch.randn(L, n, r, generator=g, dtype=torch.float64)).Q
    Pm = torch.cat([dU0, U0], -1)
    Rm = torch.cat([Q0, torch.randn(L, n, r, generator=g, dtype=torch.float64)], -1)
    return tuple(x.to(dtype) for x in (U, V, Q, GQ, GtU, Pm, Rm))


@pytest.mark.parametrize(
    "kw",
    [
        {"momentum": 0.9},
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
        {"momentum": 0.5, "store_orthogonalized": True},
        {"momentum": 0.0},
        {"momentum": 0.9, "dampening": 0.9, "orthogonalize": False},  # Riemannian SGD
        {"momentum": 0.9, "dampening": 0.9, "orthogonalize": False, "nesterov": True},
    ],
)
@pytest.mark.parametrize("first", [False, True])
def test_structured_manifold_step_equals_literal(kw, first):
    U, V, Q, GQ, GtU, Pm, Rm = _random_stack(0)
    if first:
        Pm = Rm = None
    inputs = [x.clone() for x in (U, V, Q, GQ, GtU)]
    args = {"lr": 0.1, "weight_decay": 0.0, **kw}
    fast = manifold_step(U, V, Q, GQ, GtU, Pm, Rm, **args)
    lit = manifold_step(U, V, Q, GQ, GtU, Pm, Rm, structured=False, **args)
    for x, y in zip(inputs, (U, V, Q, GQ, GtU)):  # inputs are not modified
        assert torch.equal(x, y)
    close = {"atol": 1e-12, "rtol": 1e-10}
    torch.testing.assert_close(fast[0] @ fast[1].mT, lit[0] @ lit[1].mT, **close)
    eye = torch.eye(3, dtype=U.dtype).expand(3, 3, 3)
    torch.testing.assert_close(fast[0].mT @ fast[0], eye, **close)
    torch.testing.assert_close(fast[2].mT @ fast[2], eye, **close)
    torch.testing.assert_close(fast[2] @ fast[2].mT, lit[2] @ lit[2].mT, **close)  # same span
    if kw["momentum"]:
        torch.testing.assert_close(fast[3] @ fast[4].mT, lit[3] @ lit[4].mT, **close)
    else:
        assert fast[3] is None and fast[4] is None


def test_structured_manifold_step_float32():
    """float32 (float64 Gram eigh for the 2r x 2r SVDs, Cholesky-QR) against the literal
    formulas in float64 on the same rounded inputs."""
    U, V, Q, GQ, GtU, Pm, Rm = _random_stack(1, dtype=torch.float32)
    args = {"lr": 0.1, "weight_decay": 0.01, "momentum": 0.9}
    fast = manifold_step(U, V, Q, GQ, GtU, Pm, Rm, **args)
    assert all(x.dtype == torch.float32 for x in fast)
    ref = manifold_step(*(x.double() for x in (U, V, Q, GQ, GtU, Pm, Rm)), structured=False, **args)
    X, X_ref = (fast[0] @ fast[1].mT).double(), ref[0] @ ref[1].mT
    torch.testing.assert_close(X, X_ref, atol=1e-5 * X_ref.abs().max().item(), rtol=0)
    M, M_ref = (fast[3] @ fast[4].mT).double(), ref[3] @ ref[4].mT
    torch.testing.assert_close(M, M_ref, atol=1e-5 * M_ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize(
    ("opt_cls", "kw"),
    [
        (rl.Riemannion, {}),
        (rl.Riemannion, {"nesterov": True, "weight_decay": 0.1}),
        (rl.Riemannion, {"scale_lr": None, "weight_decay": 0.1}),
        (rl.RiemannianSGD, {"lr": 0.5}),
    ],
)
def test_float32_optimizer_step_matches_literal_float64(opt_cls, kw):
    """The optimizer's in-place, batched float32 path against manifold_step's literal
    formulas in float64, from the same stored float32 point, gradients and momentum."""
    _check_optimizer_against_literal(opt_cls, kw)


def test_optimizer_householder_fallback_matches_literal_float64(monkeypatch):
    """Every Cholesky-QR refused (the branch of degenerate steps): the retraction's
    Householder results are written back to the parameters just as well."""
    import riemannlora.core.geometry as geo

    monkeypatch.setattr(geo, "_cholesky_factors", lambda gram: None)
    _check_optimizer_against_literal(rl.Riemannion, {"weight_decay": 0.1})


@pytest.mark.parametrize("opt_cls", [rl.Riemannion, rl.RiemannianSGD])
def test_step_after_a_zero_lr_step_matches_literal_float64(opt_cls):
    """lr = 0 keeps the point bit for bit (no write-back): the momentum's coordinates are
    then those of the old point in the new bases, and the next steps still match the literal
    formulas."""
    _check_optimizer_against_literal(opt_cls, {"weight_decay": 0.1}, (1.0, 0.0, 1.0, 1.0))


def _check_optimizer_against_literal(opt_cls, kw, lr_factors=(1.0, 1.0, 1.0)):
    _, model = peft_mlp(dtype=torch.float32)
    data = mlp_data(dtype=torch.float32)
    kw = {"lr": 0.05, **kw}
    opt = opt_cls(model, **kw)
    layers = manifold_layers(model)
    damp = opt_cls is rl.RiemannianSGD
    for factor in lr_factors:
        opt.param_groups[0]["lr"] = kw["lr"] * factor
        opt.zero_grad()
        mlp_loss(model, data).backward()
        before = {}
        for layer in layers:
            Pm, Rm = momentum_factors(opt, layer)
            before[layer.name] = [
                x.detach().double().clone() if x is not None else None
                for x in (layer.U(), layer.V(), layer.Q(), layer.GQ(), layer.GtU(), Pm, Rm)
            ]
        opt.step()
        for layer in layers:
            # the default scale_lr="match_adamw": lr times 0.2 sqrt(max(m, n)), decay unscaled
            scaled = opt.param_groups[0].get("scale_lr") == "match_adamw"
            mult = 0.2 * max(layer.m, layer.n) ** 0.5 if scaled else 1.0
            U_ref, V_ref, _, Pm_ref, Rm_ref = manifold_step(
                *before[layer.name],
                lr=kw["lr"] * factor * mult,
                weight_decay=kw.get("weight_decay", 0.0) / mult,
                momentum=0.9,
                dampening=0.9 if damp else 0.0,
                nesterov=kw.get("nesterov", False),
                orthogonalize=not damp,
                structured=False,
            )
            X_ref = U_ref @ V_ref.mT
            scale = X_ref.abs().max().item()
            torch.testing.assert_close(
                layer.point().detach().double(), X_ref, atol=1e-5 * scale, rtol=0
            )
            Pm, Rm = momentum_factors(opt, layer)
            M, M_ref = Pm @ Rm.mT, Pm_ref @ Rm_ref.mT
            torch.testing.assert_close(
                M.double(), M_ref, atol=1e-5 * M_ref.abs().max().item(), rtol=0
            )
            U = layer.U().detach().double()
            torch.testing.assert_close(
                U.mT @ U, torch.eye(layer.rank, dtype=U.dtype), atol=1e-6, rtol=0
            )


def _llama_run(steps, before_step=None):
    """Riemannion on the tiny Llama (two equal-shape layers per group); ``before_step(k, model,
    layers)`` runs after each backward pass. Returns (model, layers, points per step)."""
    _, model = peft_llama()
    ids = token_batch()
    opt = rl.Riemannion(model, lr=0.05, generator=torch.Generator().manual_seed(0))
    layers = manifold_layers(model)
    points = []
    for k in range(steps):
        opt.zero_grad()
        lm_loss(model, ids).backward()
        if before_step is not None:
            before_step(k, model, layers)
        opt.step()
        points.append([layer.point().detach().clone() for layer in layers])
    return model, layers, points


def test_step_follows_factors_moved_to_new_storage():
    """The optimizer keeps per-group buffers and views of the factors across steps; factors
    given new storage (``p.data = ...``) between steps, which are then no longer packed, are
    read and written there, by the same arithmetic as packed ones (bit for bit)."""

    def move(k, model, layers):
        for layer in layers:
            for p in (layer.a, layer.b):
                p.data = p.data.clone()

    _, _, plain = _llama_run(4)
    _, _, moved = _llama_run(4, move)
    for step_plain, step_moved in zip(plain, moved):
        for x, y in zip(step_plain, step_moved):
            assert torch.equal(x, y)


def test_step_reads_gradients_in_any_layout():
    """The step reads the gradient blocks whatever the gradients' layout (the usual
    column-major ``lora_B`` gradient by one strided view per layer; a row-major one, or a
    view into a larger buffer, by slicing), with the same result bit for bit."""

    def relayout(k, model, layers):
        for j, layer in enumerate(layers):
            g = layer.b.grad
            # step 0: every gradient column-major at an offset; 1: row-major; 2: mixed
            if (k == 1) or (k == 2 and j % 2):  # row-major
                layer.b.grad = g.contiguous()
            else:  # column-major, at an offset inside a larger buffer
                buf = g.new_zeros(g.numel() + 7)
                layer.b.grad = buf[7:].view(g.shape[1], g.shape[0]).mT.copy_(g)
            assert layer.b.grad.stride() != g.stride() or layer.b.grad.storage_offset()

    _, _, plain = _llama_run(3)
    _, _, moved = _llama_run(3, relayout)
    for step_plain, step_moved in zip(plain, moved):
        for x, y in zip(step_plain, step_moved):
            assert torch.equal(x, y)


@pytest.mark.parametrize("skip", [0, 1])
def test_layer_without_gradient_is_left_alone_for_that_step(skip):
    """A layer whose gradients are None in one step keeps its point (and its group's other
    layers step as usual); the next step with every gradient present steps it again (with
    ``skip=0`` the groups, and the buffers they share, grow after the first step)."""

    def drop(k, model, layers):
        if k == skip:
            layers[0].a.grad = layers[0].b.grad = None

    _, _, plain = _llama_run(3)
    _, layers, dropped = _llama_run(3, drop)
    _, model = peft_llama()
    rl.to_manifold(model, generator=torch.Generator().manual_seed(0))
    start = [layer.point().detach() for layer in manifold_layers(model)]
    before = start if skip == 0 else dropped[skip - 1]
    assert torch.equal(dropped[skip][0], before[0])
    for j in range(1, len(layers)):  # the other layers had the same history so far
        torch.testing.assert_close(dropped[skip][j], plain[skip][j], rtol=1e-5, atol=1e-7)
    assert not torch.equal(dropped[skip + 1][0], dropped[skip][0])
    for layer in layers:
        U = layer.U().detach()
        torch.testing.assert_close(U.mT @ U, torch.eye(layer.rank), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# the momentum kept in the bases of its direction: transport without tall products
# --------------------------------------------------------------------------------------------


def _llama64_run(steps, before_forward=None, setup=None):
    """float64 Riemannion on the tiny Llama; ``before_forward(k, layers)`` runs before each
    step's forward pass, ``setup(opt)`` once. Returns (optimizer, points X after each step)."""
    _, model = peft_llama(dtype=torch.float64)
    ids = token_batch()
    opt = rl.Riemannion(
        model, lr=0.05, weight_decay=0.01, generator=torch.Generator().manual_seed(0)
    )
    if setup is not None:
        setup(opt)
    layers = manifold_layers(model)
    points = []
    for k in range(steps):
        if before_forward is not None:
            before_forward(k, layers)
        opt.zero_grad()
        lm_loss(model, ids).backward()
        opt.step()
        points.append([layer.point().detach().clone() for layer in layers])
    return opt, points


def _count_transport_checks(opt):
    calls = []
    check = opt._check_transport

    def counted(mom, Ut, Qt):
        calls.append(mom.in_span)
        return check(mom, Ut, Qt)

    opt._check_transport = counted
    return calls


def test_transport_from_small_matrices_equals_the_computed_one():
    """While the point stays as the optimizer wrote it, the momentum's coordinates come from
    the retraction's small matrices (no transport product at all); computing them from the
    point and the momentum's bases every step, with the general formulas, gives the same
    trajectory."""

    def bump(k, layers):  # an in-place no-op: new version counters, same values
        with torch.no_grad():
            for layer in layers:
                layer.a.mul_(1.0)
                layer.b.mul_(1.0)

    def computed(opt):
        def check(mom, Ut, Qt):
            cu, cq = mom.transport(Ut, Qt)
            return dataclasses.replace(mom, cu=cu, cq=cq, in_span=False)

        opt._check_transport = check

    opt, fast = _llama64_run(5, setup=lambda o: setattr(o, "_calls", _count_transport_checks(o)))
    assert opt._calls == []  # every step after the first took the coordinates as they were
    _, slow = _llama64_run(5, before_forward=bump, setup=computed)
    for step_fast, step_slow in zip(fast, slow):
        for x, y in zip(step_fast, step_slow):
            torch.testing.assert_close(x, y, atol=1e-12 * y.abs().max().item(), rtol=0)


def test_factors_changed_in_place_between_steps_are_seen():
    """Re-gauging every layer in place between steps (U S, V S, Q S with S orthogonal: the same
    X, other factors) changes the factors' version counters: the transport is then computed
    from the new point, and X follows the same trajectory as without the re-gauge."""
    g = torch.Generator().manual_seed(3)

    def regauge(k, layers):
        if k not in (2, 3):
            return
        with torch.no_grad():
            for layer in layers:
                r = layer.rank
                S = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64)).Q
                layer.b[:, r : 2 * r] = layer.b[:, r : 2 * r] @ S
                layer.a[: 2 * r] = torch.cat([S.T @ layer.a[:r], S.T @ layer.a[r : 2 * r]])

    _, plain = _llama64_run(5)
    opt, regauged = _llama64_run(
        5, before_forward=regauge, setup=lambda o: setattr(o, "_calls", _count_transport_checks(o))
    )
    assert len(opt._calls) == 2 * len(opt._momentum_cache)  # steps 3 and 4, every group
    for step_plain, step_regauged in zip(plain, regauged):
        for x, y in zip(step_plain, step_regauged):
            torch.testing.assert_close(y, x, atol=1e-11 * x.abs().max().item(), rtol=0)


def test_resume_after_factors_changed_in_place_is_bitwise():
    """After a step that had to compute the transport (the factors were re-gauged in place),
    the state still holds the momentum's current coordinates: a run resumed from a later
    checkpoint steps bit for bit as the uninterrupted one."""
    ids = token_batch()
    g = torch.Generator().manual_seed(5)

    def fresh():
        _, model = peft_llama(dtype=torch.float64)
        rl.to_manifold(model, generator=torch.Generator().manual_seed(0))
        return model, rl.Riemannion(model, lr=0.05, weight_decay=0.01)

    model, opt = fresh()
    _train(model, opt, ids, 2)
    with torch.no_grad():
        for layer in manifold_layers(model):
            r = layer.rank
            S = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64)).Q
            layer.b[:, r : 2 * r] = layer.b[:, r : 2 * r] @ S
            layer.a[: 2 * r] = torch.cat([S.T @ layer.a[:r], S.T @ layer.a[r : 2 * r]])
    _train(model, opt, ids, 2)
    buf_m, buf_o = io.BytesIO(), io.BytesIO()
    torch.save(model.state_dict(), buf_m)
    torch.save(opt.state_dict(), buf_o)
    _train(model, opt, ids, 2)
    resumed, opt2 = fresh()
    buf_m.seek(0)
    buf_o.seek(0)
    resumed.load_state_dict(torch.load(buf_m))
    opt2.load_state_dict(torch.load(buf_o))
    _train(resumed, opt2, ids, 2)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), resumed.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_momentum_state_as_a_plain_factor_pair_resumes():
    """A momentum saved as a plain factor pair (``momentum_left``, ``momentum_right`` only: an
    FSDP2 run or an older checkpoint) loads; its transport is computed once from the point."""
    ids = token_batch()

    def fresh():
        _, model = peft_llama(dtype=torch.float64)
        rl.to_manifold(model, generator=torch.Generator().manual_seed(0))
        return model

    model = fresh()
    opt = rl.Riemannion(model, lr=0.05, weight_decay=0.01)
    _train(model, opt, ids, 2)
    saved_model = copy.deepcopy(model.state_dict())
    sd = copy.deepcopy(opt.state_dict())
    _train(model, opt, ids, 2)
    for st_ in sd["state"].values():
        core = st_.pop("momentum_core", None)
        if core is not None:
            st_["momentum_left"] = st_["momentum_left"] @ core
        st_.pop("transport_left", None)
        st_.pop("transport_right", None)
    resumed = fresh()
    resumed.load_state_dict(saved_model)
    opt2 = rl.Riemannion(resumed, lr=0.05, weight_decay=0.01)
    opt2.load_state_dict(sd)
    calls = _count_transport_checks(opt2)
    _train(resumed, opt2, ids, 2)
    assert calls and not any(calls)  # computed (nothing stored to check against), then kept
    for x, y in zip(manifold_layers(model), manifold_layers(resumed)):
        ref = x.point().detach()
        torch.testing.assert_close(
            y.point().detach(), ref, atol=1e-11 * ref.abs().max().item(), rtol=0
        )


def _storage(t):
    return t.untyped_storage().data_ptr()


def test_optimizer_packs_factors_per_shape():
    """Without a process group the optimizer moves the factors of the layers of each shape into
    two buffers (same values, same Parameter objects; ``lora_B`` column-major, so that its
    gradient arrives column-major too); the step then writes the point there in place and
    tells autograd that the factors changed."""
    _, model = peft_llama()
    ids = token_batch()
    rl.to_manifold(model, generator=torch.Generator().manual_seed(0))
    before = logits(model, ids)
    layers = manifold_layers(model)
    params = [(layer.a, layer.b) for layer in layers]
    values = [(a.detach().clone(), b.detach().clone()) for a, b in params]
    opt = rl.Riemannion(model, lr=0.05)
    layers = manifold_layers(model)
    for layer, (a, b), (va, vb) in zip(layers, params, values):
        assert layer.a is a and layer.b is b and torch.equal(a, va) and torch.equal(b, vb)
        assert a.is_contiguous() and b.stride() == (1, layer.m)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-6, atol=1e-6)
    by_shape = {}
    for layer in layers:
        by_shape.setdefault((layer.m, layer.n), []).append(layer)
    assert len(by_shape) == 2 and all(len(group) == 2 for group in by_shape.values())
    for group in by_shape.values():
        for name in ("a", "b"):
            ts = [getattr(layer, name) for layer in group]
            assert len({_storage(t) for t in ts}) == 1  # one buffer per shape and factor
            step = ts[0].numel()
            assert [t.storage_offset() - ts[0].storage_offset() for t in ts] == [0, step]
    assert len({_storage(layer.a) for layer in layers}) == 2
    lm_loss(model, ids).backward()
    assert all(layer.b.grad.stride() == (1, layer.m) for layer in layers)
    ptrs = [(_storage(layer.a), _storage(layer.b)) for layer in layers]
    versions = [(layer.a._version, layer.b._version) for layer in layers]
    points = [layer.point().detach().clone() for layer in layers]
    opt.step()
    for layer, ptr, version, point in zip(layers, ptrs, versions, points):
        assert (_storage(layer.a), _storage(layer.b)) == ptr  # written in place
        assert layer.a._version > version[0] and layer.b._version > version[1]
        assert not torch.equal(layer.point(), point)
    # a graph recorded before the step sees that its saved factors changed, as with any
    # optimizer that updates parameters in place
    opt.zero_grad()
    loss = lm_loss(model, ids)
    lm_loss(model, ids).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # a second optimizer on the packed model leaves the buffers alone
    rl.Riemannion(model, lr=0.05)
    assert [(_storage(layer.a), _storage(layer.b)) for layer in layers] == ptrs


def test_state_dict_of_packed_factors_is_standalone(tmp_path):
    """``state_dict()`` returns each packed factor as a contiguous tensor of its own, so that
    safetensors saves it and Accelerate's checkpoint (which drops all but one tensor of a
    shared storage) keeps it; ``keep_vars=True`` still returns the Parameters; the model
    loads back from either."""
    import safetensors.torch
    from accelerate.utils.other import clean_state_dict_for_safetensors

    _, model = peft_llama()
    ids = token_batch()
    opt = rl.Riemannion(model, lr=0.05)
    lm_loss(model, ids).backward()
    opt.step()
    layers = manifold_layers(model)
    sd = model.state_dict()
    named = dict(model.named_parameters())
    factors = [k for k in sd if ".lora_A." in k or ".lora_B." in k]
    assert len(factors) == 2 * len(layers)
    for k in factors:
        t = sd[k]
        assert torch.equal(t, named[k]) and t.is_contiguous() and t.storage_offset() == 0
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
        assert _storage(t) != _storage(named[k])
    kept = model.state_dict(keep_vars=True)
    assert all(kept[k] is named[k] for k in factors)
    assert clean_state_dict_for_safetensors(dict(sd)).keys() == sd.keys()
    safetensors.torch.save_file(sd, tmp_path / "model.safetensors")
    out = logits(model, ids)
    _, fresh = peft_llama()
    rl.to_manifold(fresh)
    fresh.load_state_dict(safetensors.torch.load_file(tmp_path / "model.safetensors"))
    torch.testing.assert_close(logits(fresh, ids), out, rtol=0, atol=0)
    rl.Riemannion(fresh, lr=0.05)  # packs fresh's factors; load_state_dict copies in place
    fresh.load_state_dict(sd)
    torch.testing.assert_close(logits(fresh, ids), out, rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_model_with_packed_factors_matches_eager():
    """``torch.compile`` (dynamo + AOT autograd) handles the packed factors, which are views of
    shared buffers: the compiled model trains exactly as the eager one."""
    ids = token_batch()
    losses = []
    for compiled in (False, True):
        _, model = peft_llama()
        opt = rl.Riemannion(model, lr=0.05, generator=torch.Generator().manual_seed(0))
        run = torch.compile(model, backend="aot_eager") if compiled else model
        steps = []
        for _ in range(3):
            opt.zero_grad()
            loss = run(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            steps.append(loss.detach())
        losses.append(torch.stack(steps))
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    assert not torch.equal(losses[0][0], losses[0][-1])


def test_write_through_data_between_steps_is_read():
    """The point is read from the factors' own memory: a change written through ``p.data``
    in place (which no version counter records) enters the next step (here V scaled, which
    leaves the momentum's transport exact), as for factors moved to new storage."""
    r = 2

    def scale_v(k, model, layers):
        if k == 2:
            for layer in layers:
                layer.a.data[r : 2 * r].mul_(0.5)

    def move_and_scale_v(k, model, layers):
        if k == 2:
            for layer in layers:
                layer.a.data = layer.a.data.clone()
        scale_v(k, model, layers)

    _, _, in_place = _llama_run(4, scale_v)
    _, _, moved = _llama_run(4, move_and_scale_v)
    _, _, plain = _llama_run(4)
    for k in range(4):
        for x, y, z in zip(in_place[k], moved[k], plain[k]):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
            assert k < 2 or not torch.allclose(x, z, rtol=1e-3, atol=1e-4)


def test_momentum_buffers_are_updated_in_place():
    """After the first step the stacked momentum buffers are reused: same tensors in the state,
    new values; a state replaced by load_state_dict is picked up instead."""
    _, model = peft_mlp()
    data = mlp_data()
    opt = rl.Riemannion(model, lr=0.05)
    layer = manifold_layers(model)[0]
    for _ in range(2):
        opt.zero_grad()
        mlp_loss(model, data).backward()
        opt.step()
    left = opt.state[layer.b]["momentum_left"]
    before = left.clone()
    opt.zero_grad()
    mlp_loss(model, data).backward()
    opt.step()
    assert opt.state[layer.b]["momentum_left"] is left and not torch.equal(left, before)
    assert all(opt.state[x.b]["step"].item() == 3.0 for x in manifold_layers(model))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt.load_state_dict(torch.load(buf))
    assert opt.state[layer.b]["momentum_left"] is not left
    opt.zero_grad()
    mlp_loss(model, data).backward()
    opt.step()
    assert all(opt.state[x.b]["step"].item() == 4.0 for x in manifold_layers(model))


# --------------------------------------------------------------------------------------------
# non-finite gradients, lr = 0
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opt_cls", [rl.Riemannion, rl.RiemannianSGD])
def test_nonfinite_gradient_skips_the_whole_step(opt_cls, caplog):
    _, model = peft_mlp(init=False)
    data = mlp_data()
    opt = opt_cls(model, lr=0.05, generator=torch.Generator().manual_seed(0))
    _, ref = peft_mlp(init=False)
    ref_opt = opt_cls(ref, lr=0.05, generator=torch.Generator().manual_seed(0))
    for step in range(3):
        for mdl, o in ((model, opt), (ref, ref_opt)):
            if mdl is ref and step == 1:
                continue  # the reference never sees the poisoned batch
            o.zero_grad()
            mlp_loss(mdl, data).backward()
            if mdl is model and step == 1:
                manifold_layers(mdl)[2].b.grad[0, 0] = float("inf")
            o.step()
    assert opt.skipped_steps == 1 and "skipped step (1 so far)" in caplog.text
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert all(int(s["step"]) == 2 for s in opt.state.values() if "step" in s)


def test_nonfinite_raise_names_the_tensor_before_anything_changes():
    _, model = peft_mlp(init=False)
    data = mlp_data()
    opt = rl.Riemannion(model, lr=0.05, nonfinite="raise")
    mlp_loss(model, data).backward()
    manifold_layers(model)[0].a.grad[3, 1] = float("nan")  # a row of (G^T U)^T
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(rl.optim.guard.NonFiniteError, match=r"fc1\.default\.lora_A"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        rl.RiemannianSGD(model, lr=0.1, nonfinite="ignore")


@pytest.mark.parametrize("opt_cls", [rl.Riemannion, rl.RiemannianSGD])
def test_zero_lr_keeps_the_point_and_moves_the_momentum(opt_cls):
    """lr = 0 (a warmup's first step; torch.distributed.checkpoint's state initialization) must
    not re-gauge the factors: the point stays bit for bit, the momentum still accumulates."""
    _, model = peft_mlp(init=False)
    data = mlp_data()
    opt = opt_cls(model, lr=0.05, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: float(t))  # 0, then 1
    before = [p.detach().clone() for p in model.parameters()]
    before_a = manifold_layers(model)[0].a.detach().clone()
    mlp_loss(model, data).backward()
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    left = opt.state[manifold_layers(model)[0].b]["momentum_left"]
    assert left.abs().sum() > 0
    sched.step()
    opt.zero_grad()
    mlp_loss(model, data).backward()
    opt.step()
    assert not torch.equal(before_a, manifold_layers(model)[0].a)  # now it moves


def test_add_param_group_plain_params_get_adamw():
    """A plain group added later (a new head) is updated by torch's AdamW with the optimizer's
    adamw_* settings, bitwise; LoRA groups cannot be added."""
    _, model = peft_mlp(init=False)
    opt = rl.Riemannion(model, lr=0.05, adamw_lr=1e-2, adamw_weight_decay=0.1)
    extra = nn.Parameter(torch.randn(5, 3))
    twin = nn.Parameter(extra.detach().clone())
    opt.add_param_group({"params": [extra], "eps": 1e-6})
    ref = torch.optim.AdamW([twin], lr=1e-2, weight_decay=0.1, eps=1e-6)
    data = mlp_data()
    for _ in range(3):
        opt.zero_grad()
        ref.zero_grad()
        mlp_loss(model, data).backward()
        extra.grad = torch.full_like(extra, 0.5)
        twin.grad = torch.full_like(twin, 0.5)
        opt.step()
        ref.step()
    assert torch.equal(extra, twin)
    layer = manifold_layers(model)[0]
    with pytest.raises(ValueError, match="already optimized"):
        opt.add_param_group({"params": [layer.a]})
    with pytest.raises(ValueError, match="create a new optimizer"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "manifold": True})


def test_registration_hooks_live_as_long_as_the_optimizer():
    """The torch-global module and parameter registration hooks that tell the optimizer when
    factors may have been replaced belong to the optimizer: they go away with it."""
    import gc

    from torch.nn.modules import module as torch_module

    def installed():
        return (
            len(torch_module._global_module_registration_hooks),
            len(torch_module._global_parameter_registration_hooks),
        )

    gc.collect()
    before = installed()
    _, model = peft_mlp()
    opt = rl.Riemannion(model, lr=0.05)
    opt.zero_grad()
    mlp_loss(model, mlp_data()).backward()
    opt.step()
    assert installed() == (before[0] + 1, before[1] + 1)
    model.register_parameter("extra", nn.Parameter(torch.ones(1)))  # seen, not an error
    opt.step()
    del opt
    gc.collect()
    assert installed() == before


def test_global_optimizer_hooks_see_one_step():
    """The plain parameters' AdamW runs inside the optimizer's step: torch's global step
    hooks fire once per step, as for any optimizer."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    _, model = peft_llama(modules_to_save=["lm_head"])
    opt = rl.Riemannion(model, lr=0.01)
    seen = []
    handle = register_optimizer_step_post_hook(lambda o, args, kwargs: seen.append(type(o)))
    try:
        opt.zero_grad()
        lm_loss(model, token_batch()).backward()
        opt.step()
    finally:
        handle.remove()
    assert seen == [rl.Riemannion]


@pytest.mark.parametrize("opt_cls", [rl.Riemannion, rl.RiemannianSGD])
@pytest.mark.parametrize(("key", "value"), [("lr", float("nan")), ("lr", float("inf")),
                                            ("lr", -1.0), ("momentum", float("nan"))])  # fmt: skip
def test_bad_hyperparameter_set_after_construction_raises_before_any_work(opt_cls, key, value):
    """A scheduler or a user writing nan / inf / a negative lr into a param group gets the
    documented ValueError naming the group and key, and nothing changes."""
    _, model = peft_mlp()
    opt = opt_cls(model, lr=0.05)
    mlp_loss(model, mlp_data()).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=f"param group 0: {key}"):
        opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    opt.param_groups[0][key] = 0.05 if key == "lr" else 0.9
    opt.step()  # the optimizer is still usable
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_head_lr_defaults_riemannion_to_lr_and_riemannian_sgd_to_adamw_default():
    """An SGD-scale lr must not become the head's AdamW lr (it wrecks heads)."""
    from riemannlora.optim.riemannion import DEFAULT_HEAD_LR

    for cls, lr, head in ((rl.Riemannion, 3e-3, 3e-3), (rl.RiemannianSGD, 0.3, DEFAULT_HEAD_LR)):
        _, model = peft_llama(modules_to_save=["lm_head"])
        opt = cls(model, lr=lr)
        (plain,) = [g for g in opt.param_groups if not g["manifold"]]
        assert plain["lr"] == head
        _, model = peft_llama(modules_to_save=["lm_head"])
        (plain,) = [g for g in cls(model, lr=lr, adamw_lr=0.02).param_groups if not g["manifold"]]
        assert plain["lr"] == 0.02
    assert DEFAULT_HEAD_LR == 1e-3
