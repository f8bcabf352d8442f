"""ScaledSGD / ScaledAdamW against independent float64 dense references, and their properties."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import riemannlora as rl
from riemannlora.pairs import LoraPair, LoraParams

torch.set_num_threads(2)


def make_pairs(shapes, scalings, dtype=torch.float64, seed=0, zero_b=False):
    """Random pairs with random gradients; shapes is a list of (m, n, r)."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for k, ((m, n, r), s) in enumerate(zip(shapes, scalings)):
        a = nn.Parameter(torch.randn(r, n, generator=g, dtype=dtype))
        b = nn.Parameter(
            torch.zeros(m, r, dtype=dtype)
            if zero_b
            else torch.randn(m, r, generator=g, dtype=dtype)
        )
        a.grad = torch.randn(r, n, generator=g, dtype=dtype)
        b.grad = torch.randn(m, r, generator=g, dtype=dtype)
        pairs.append(LoraPair(a, b, s, f"p{k}"))
    return pairs


def dense_precondition(a, b, ga, gb, s, reg, scale_aware):
    """float64 reference with explicit inverses (independent of the solver code)."""
    a, b, ga, gb = (t.detach().double() for t in (a, b, ga, gb))
    c = s**2 if scale_aware else 1.0
    r = a.shape[0]
    eye = torch.eye(r, dtype=torch.float64)
    da = torch.linalg.inv(c * b.T @ b + reg * eye) @ ga
    db = gb @ torch.linalg.inv(a @ a.T + reg * eye) / c
    return da, db


SHAPES = [(12, 7, 3), (12, 7, 3), (5, 9, 2), (8, 8, 3), (16, 4, 4)]
SCALINGS = [2.0, 0.5, 1.0, 4.0, 1 / 3**0.5]


@pytest.mark.parametrize("scale_aware", [True, False])
@pytest.mark.parametrize("reg", [0.0, 1e-3, 0.5])
def test_scaled_sgd_matches_dense_reference(scale_aware, reg):
    pairs = make_pairs(SHAPES, SCALINGS)
    before = [
        (p.a.detach().clone(), p.b.detach().clone(), p.a.grad.clone(), p.b.grad.clone())
        for p in pairs
    ]
    lr, wd = 0.05, 0.1
    opt = rl.ScaledSGD(pairs, lr=lr, weight_decay=wd, reg=reg, scale_aware=scale_aware)
    opt.step()
    for pair, (a0, b0, ga, gb) in zip(pairs, before):
        da, db = dense_precondition(a0, b0, ga, gb, pair.scaling, reg, scale_aware)
        torch.testing.assert_close(
            pair.a.detach(), a0 * (1 - lr * wd) - lr * da, rtol=1e-10, atol=1e-10
        )
        torch.testing.assert_close(
            pair.b.detach(), b0 * (1 - lr * wd) - lr * db, rtol=1e-10, atol=1e-10
        )


@pytest.mark.parametrize("scale_aware", [True, False])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_scaled_adamw_matches_dense_reference(scale_aware, bias_correction):
    pairs = make_pairs(SHAPES, SCALINGS)
    lr, b1, b2, eps, wd, reg = 1e-2, 0.8, 0.95, 1e-8, 0.05, 1e-4
    opt = rl.ScaledAdamW(
        pairs,
        lr=lr,
        betas=(b1, b2),
        eps=eps,
        weight_decay=wd,
        reg=reg,
        scale_aware=scale_aware,
        bias_correction=bias_correction,
    )
    ref = [{"a": p.a.detach().clone(), "b": p.b.detach().clone()} for p in pairs]
    moments = [{k: [torch.zeros_like(v), torch.zeros_like(v)] for k, v in r.items()} for r in ref]
    g = torch.Generator().manual_seed(1)
    for t in range(1, 4):
        for pair in pairs:  # fresh gradients each step
            pair.a.grad = torch.randn(pair.a.shape, generator=g, dtype=torch.float64)
            pair.b.grad = torch.randn(pair.b.shape, generator=g, dtype=torch.float64)
        for pair, r, mom in zip(pairs, ref, moments):
            da, db = dense_precondition(
                r["a"], r["b"], pair.a.grad, pair.b.grad, pair.scaling, reg, scale_aware
            )
            for key, d in (("a", da), ("b", db)):
                m, v = mom[key]
                m.mul_(b1).add_((1 - b1) * d)
                v.mul_(b2).add_((1 - b2) * d * d)
                if bias_correction:
                    step = m / (1 - b1**t) / ((v / (1 - b2**t)).sqrt() + eps)
                else:
                    step = m / (v.sqrt() + eps)
                r[key] = r[key] * (1 - lr * wd) - lr * step
        opt.step()
        for pair, r in zip(pairs, ref):
            torch.testing.assert_close(pair.a.detach(), r["a"], rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(pair.b.detach(), r["b"], rtol=1e-9, atol=1e-11)


def _first_order_delta(b, a, s, grad_w, opt_cls, **kw):
    """First-order change of Delta W = s B A after one step from factor gradients of <grad_w, W>."""
    a = nn.Parameter(a.clone())
    b = nn.Parameter(b.clone())
    loss = (grad_w * (s * b @ a)).sum()  # dL/dW = grad_w
    loss.backward()
    a0, b0 = a.detach().clone(), b.detach().clone()
    if opt_cls is torch.optim.SGD:
        opt_cls([a, b], **kw).step()
    else:
        opt_cls([LoraPair(a, b, s)], **kw).step()
    return s * (b0 @ (a.detach() - a0) + (b.detach() - b0) @ a0)


@settings(deadline=None, max_examples=30)
@given(
    m=st.integers(3, 12),
    n=st.integers(3, 12),
    r=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    s=st.sampled_from([1.0, 0.25, 3.0]),
)
def test_scaled_gd_step_invariant_to_factorization(m, n, r, seed, s):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(m, r, generator=g, dtype=torch.float64)
    a = torch.randn(r, n, generator=g, dtype=torch.float64)
    grad_w = torch.randn(m, n, generator=g, dtype=torch.float64)
    # a well-conditioned but far from orthogonal invertible S
    q, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
    scale = torch.exp(torch.linspace(-1.5, 1.5, r, dtype=torch.float64))
    S = q @ torch.diag(scale)
    lr = 0.1
    ref = _first_order_delta(b, a, s, grad_w, rl.ScaledSGD, lr=lr, reg=0.0)
    new = _first_order_delta(
        b @ S, torch.linalg.solve(S, a), s, grad_w, rl.ScaledSGD, lr=lr, reg=0.0
    )
    torch.testing.assert_close(new, ref, rtol=1e-8, atol=1e-10)
    # it is the projected gradient step -lr (P_B G + G P_A) independent of s (scale-aware)
    pb = b @ torch.linalg.pinv(b)
    pa = torch.linalg.pinv(a) @ a
    torch.testing.assert_close(ref, -lr * (pb @ grad_w + grad_w @ pa), rtol=1e-8, atol=1e-10)
    # plain SGD is not invariant
    sgd_ref = _first_order_delta(b, a, s, grad_w, torch.optim.SGD, lr=lr)
    sgd_new = _first_order_delta(b @ S, torch.linalg.solve(S, a), s, grad_w, torch.optim.SGD, lr=lr)
    assert (sgd_new - sgd_ref).norm() > 1e-3 * sgd_ref.norm()


def test_scale_aware_step_independent_of_alpha_paper_convention_not():
    g = torch.Generator().manual_seed(3)
    b = torch.randn(9, 3, generator=g, dtype=torch.float64)
    a = torch.randn(3, 6, generator=g, dtype=torch.float64)
    grad_w = torch.randn(9, 6, generator=g, dtype=torch.float64)

    def delta(s, aware):
        # the same effective factor s*B for every s
        return _first_order_delta(
            b / s, a, s, grad_w, rl.ScaledSGD, lr=0.1, reg=0.0, scale_aware=aware
        )

    torch.testing.assert_close(delta(4.0, True), delta(0.5, True), rtol=1e-9, atol=1e-12)
    assert (delta(4.0, False) - delta(0.5, False)).norm() > 0.1 * delta(0.5, False).norm()


@pytest.mark.parametrize("opt_cls", [rl.ScaledSGD, rl.ScaledAdamW])
def test_singular_gram_gives_finite_steps(opt_cls):
    # B = 0 at the standard init and reg = 0: B^T B is singular -> identity fallback for A
    pairs = make_pairs([(6, 5, 2), (4, 4, 3)], [2.0, 1.0], zero_b=True)
    pairs[1].a.data.zero_()  # both Grams singular for this pair
    grads = [(p.a.grad.clone(), p.b.grad.clone()) for p in pairs]
    before = [(p.a.detach().clone(), p.b.detach().clone()) for p in pairs]
    opt = opt_cls(pairs, lr=0.1, reg=0.0)
    opt.step()
    for p in pairs:
        assert torch.isfinite(p.a).all() and torch.isfinite(p.b).all()
    for st_ in opt.state.values():
        for v in st_.values():
            assert torch.isfinite(v).all()
    if opt_cls is rl.ScaledSGD:
        # fallback: the factor with a singular partner Gram takes the plain gradient step
        torch.testing.assert_close(pairs[0].a.detach(), before[0][0] - 0.1 * grads[0][0])
        torch.testing.assert_close(pairs[1].b.detach(), before[1][1] - 0.1 * grads[1][1])
        torch.testing.assert_close(pairs[1].a.detach(), before[1][0] - 0.1 * grads[1][0])


def test_grad_is_never_modified_and_others_bitwise_like_torch():
    torch.manual_seed(0)
    pairs = make_pairs(SHAPES[:3], SCALINGS[:3], dtype=torch.float32)
    head = nn.Parameter(torch.randn(7, 5))
    head.grad = torch.randn(7, 5)
    grads = [p.grad.clone() for pair in pairs for p in (pair.a, pair.b)] + [head.grad.clone()]
    twin = nn.Parameter(head.detach().clone())
    twin.grad = head.grad.clone()
    opt = rl.ScaledAdamW(LoraParams(pairs, [head]), lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([twin], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.step()
        ref.step()
    assert torch.equal(head, twin)
    after = [p.grad for pair in pairs for p in (pair.a, pair.b)] + [head.grad]
    for g0, g1 in zip(grads, after):
        assert torch.equal(g0, g1)
    # SGD with momentum
    twin2 = nn.Parameter(head.detach().clone())
    twin2.grad = head.grad.clone()
    opt = rl.ScaledSGD(LoraParams(pairs, [head]), lr=1e-2, momentum=0.9)
    ref = torch.optim.SGD([twin2], lr=1e-2, momentum=0.9)
    for _ in range(3):
        opt.step()
        ref.step()
    assert torch.equal(head, twin2)


def test_bf16_factors_match_float32_reference():
    pairs = make_pairs([(32, 24, 4), (32, 24, 4)], [2.0, 2.0], dtype=torch.float32, seed=5)
    ref_in = [
        (p.a.detach().clone(), p.b.detach().clone(), p.a.grad.clone(), p.b.grad.clone())
        for p in pairs
    ]
    bf = [
        LoraPair(
            nn.Parameter(p.a.detach().bfloat16()), nn.Parameter(p.b.detach().bfloat16()), p.scaling
        )
        for p in pairs
    ]
    for q, p in zip(bf, pairs):
        q.a.grad, q.b.grad = p.a.grad.bfloat16(), p.b.grad.bfloat16()
    opt = rl.ScaledSGD(bf, lr=1e-2, reg=1e-3)
    opt.step()
    for q, (a0, b0, ga, gb) in zip(bf, ref_in):
        assert q.a.dtype == torch.bfloat16
        a_ref, b_ref, ga_ref, gb_ref = (t.bfloat16().double() for t in (a0, b0, ga, gb))
        da, db = dense_precondition(a_ref, b_ref, ga_ref, gb_ref, q.scaling, 1e-3, True)
        torch.testing.assert_close(q.a.double(), a_ref - 1e-2 * da, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(q.b.double(), b_ref - 1e-2 * db, rtol=2e-2, atol=2e-2)
        assert torch.isfinite(q.a).all() and torch.isfinite(q.b).all()


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(8, 16)
        self.l2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def tiny_peft(seed=0, **cfg):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = dict(r=4, lora_alpha=8, target_modules=["l1", "l2"], modules_to_save=["head"])
    config.update(cfg)
    return get_peft_model(Tiny(), LoraConfig(**config))


def _train(model, opt, sched, steps, start=0):
    g = torch.Generator().manual_seed(123)
    batches = [
        (torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g))
        for _ in range(12)
    ]
    for t in range(start, start + steps):
        x, y = batches[t]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda m: rl.ScaledAdamW(m, lr=1e-2, weight_decay=0.01),
        lambda m: rl.ScaledSGD(m, lr=1e-1, momentum=0.9),
    ],
)
def test_resume_mid_run_is_bitwise(make_opt):
    model = tiny_peft()
    twin = copy.deepcopy(model)
    opt = make_opt(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    _train(model, opt, sched, 10)
    # interrupted run: 5 steps, checkpoint through bytes, fresh objects, 5 more steps
    opt2 = make_opt(twin)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda t: 1.0 / (1 + t))
    _train(twin, opt2, sched2, 5)
    buf = io.BytesIO()
    torch.save(
        {"model": twin.state_dict(), "opt": opt2.state_dict(), "sched": sched2.state_dict()}, buf
    )
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = tiny_peft(seed=99)
    resumed.load_state_dict(ckpt["model"])
    opt3 = make_opt(resumed)
    sched3 = torch.optim.lr_scheduler.LambdaLR(opt3, lambda t: 1.0 / (1 + t))
    opt3.load_state_dict(ckpt["opt"])
    sched3.load_state_dict(ckpt["sched"])
    _train(resumed, opt3, sched3, 5, start=5)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), resumed.named_parameters()):
        assert n1 == n2
        assert torch.equal(p1, p2), n1


def test_closure_zero_grad_and_scheduler():
    model = tiny_peft()
    opt = rl.ScaledAdamW(model, lr=1e-2)
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.isfinite(loss)
    opt.zero_grad()
    assert all(p.grad is None for g in opt.param_groups for p in g["params"])
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    opt.step(closure)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)


def test_add_param_group_plain_params():
    model = tiny_peft()
    extra = nn.Parameter(torch.randn(3))
    opt = rl.ScaledAdamW(model, lr=1e-2)
    opt.add_param_group({"params": [extra], "lr": 1e-3})
    extra.grad = torch.ones(3)
    before = extra.detach().clone()
    opt.step()
    assert not torch.equal(before, extra)
    with pytest.raises(ValueError, match="scalings"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2, 3))], "lora": True})


# ----------------------------------------------------------------------------- errors
def test_error_no_lora_pairs():
    with pytest.raises(ValueError, match="no trainable LoRA pairs"):
        rl.ScaledAdamW(Tiny(), lr=1e-3)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"lr": float("nan")}, "lr must be finite"),
        ({"lr": 1e-3, "reg": -1e-3}, "reg must be >= 0"),
        ({"lr": 1e-3, "betas": (1.0, 0.9)}, r"betas\[0\] must be in \[0, 1\)"),
        ({"lr": 1e-3, "betas": (0.9, -0.1)}, r"betas\[1\] must be in \[0, 1\)"),
        ({"lr": 1e-3, "weight_decay": -1}, "weight_decay must be >= 0"),
        ({"lr": 1e-3, "scale_aware": "yes"}, "scale_aware must be a bool"),
    ],
)
def test_error_bad_hyperparameters(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        rl.ScaledAdamW(tiny_peft(), **kw)


def test_error_mismatched_pair_shapes():
    with pytest.raises(ValueError, match="mismatched pair shapes"):
        LoraPair(nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(16, 3)))


def test_error_one_half_frozen():
    model = tiny_peft()
    model.base_model.model.l1.lora_B["default"].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="lora_B is frozen"):
        rl.ScaledSGD(model, lr=1e-2)


def test_error_plain_parameter_list():
    model = tiny_peft()
    with pytest.raises(TypeError, match="pairing information"):
        rl.ScaledAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def test_error_state_dict_from_other_model():
    opt = rl.ScaledAdamW(tiny_peft(), lr=1e-3)
    other = rl.ScaledAdamW(tiny_peft(target_modules=["l1"]), lr=1e-3)
    with pytest.raises(ValueError, match="another model"):
        opt.load_state_dict(other.state_dict())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_stacked_and_per_pair_paths_agree(dtype):
    from riemannlora.core.preconditioner import precondition_pairs

    pairs = make_pairs(SHAPES, SCALINGS, dtype=dtype, seed=7)
    args = (
        [p.a for p in pairs],
        [p.b for p in pairs],
        [p.a.grad for p in pairs],
        [None, *[p.b.grad for p in pairs[1:]]],  # one missing gradient
        [p.scaling for p in pairs],
        1e-3,
        True,
    )
    da1, db1 = precondition_pairs(*args, stacked=True)
    da2, db2 = precondition_pairs(*args, stacked=False)
    assert db1[0] is None and db2[0] is None
    tol = 1e-12 if dtype == torch.float64 else 1e-4  # float32: different summation orders
    for x, y in zip(da1 + db1[1:], da2 + db2[1:]):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol * y.abs().max().item())


def _kernel_flags(opt):
    return [(g["lora"], g["fused"], g["foreach"]) for g in opt.param_groups]


def test_lora_factors_use_the_fused_kernel_by_default_others_follow_torch():
    pairs = make_pairs(SHAPES[:2], SCALINGS[:2], dtype=torch.float32)
    head = nn.Parameter(torch.randn(3, 4))
    opt = rl.ScaledAdamW(LoraParams(pairs, [head]), lr=1e-2)
    assert _kernel_flags(opt) == [(True, True, None), (False, None, None)]
    assert _kernel_flags(rl.ScaledAdamW(LoraParams(pairs, [head]), lr=1e-2, foreach=True)) == [
        (True, None, True),
        (False, None, True),
    ]
    assert _kernel_flags(rl.ScaledAdamW(LoraParams(pairs, [head]), lr=1e-2, fused=False))[0] == (
        True,
        False,
        None,
    )
    assert _kernel_flags(rl.ScaledAdamW(LoraParams(pairs, [head]), lr=1e-2, foreach=False)) == [
        (True, None, False),
        (False, None, False),
    ]  # torch's single-tensor loop, as asked
    assert _kernel_flags(rl.ScaledAdamW(LoraParams(pairs, [head]), lr=1e-2, fused=True)) == [
        (True, True, None),
        (False, True, None),
    ]
    with pytest.raises(ValueError, match="cannot be used together"):
        rl.ScaledAdamW(LoraParams(pairs, [head]), lr=1e-2, foreach=True, fused=True)
    # a LoRA group added later gets the same default
    more = make_pairs(SHAPES[2:3], SCALINGS[2:3], dtype=torch.float32, seed=3)
    opt.add_param_group(
        {"params": [more[0].a, more[0].b], "lora": True, "scalings": [more[0].scaling]}
    )
    assert opt.param_groups[-1]["fused"] is True
    # GradScaler must unscale itself: the fused kernel's own AMP unscaling is never used
    assert not getattr(opt, "_step_supports_amp_scaling", False)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_and_foreach_kernels_agree(amsgrad, dtype):
    """Same trajectory (up to rounding) whichever torch kernel updates the LoRA factors."""
    runs = []
    for kernel in ({"fused": True}, {"foreach": True}, {"foreach": False, "fused": False}):
        pairs = make_pairs(SHAPES, SCALINGS, dtype=dtype, seed=11)
        opt = rl.ScaledAdamW(pairs, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, **kernel)
        g = torch.Generator().manual_seed(5)
        for _ in range(4):
            for pair in pairs:
                for p in (pair.a, pair.b):
                    p.grad = torch.randn(p.shape, generator=g).to(dtype)
            opt.step()
        runs.append([p.detach().float() for pair in pairs for p in (pair.a, pair.b)])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for other in runs[1:]:
        for x, y in zip(runs[0], other):
            torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def test_fused_default_under_grad_scaler_and_resume():
    """GradScaler unscales the raw gradients and skips overflowing steps; the fused state
    (device step counters) saves and loads."""
    model = tiny_peft()
    opt = rl.ScaledAdamW(model, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(16, 8)
    for k in range(3):
        opt.zero_grad()
        loss = model(x).pow(2).mean() * (float("inf") if k == 1 else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    steps = {float(s["step"]) for s in opt.state.values()}
    assert steps == {2.0}  # the overflowing step was skipped by the scaler, not by the guard
    assert opt.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    fresh = rl.ScaledAdamW(model, lr=1e-2)
    fresh.load_state_dict(opt.state_dict())
    assert all(s["step"].dtype == torch.float32 for s in fresh.state.values())


def test_fused_default_with_non_contiguous_factors():
    """Factors stored transposed or channels_last: the directions are laid out like the
    parameters before the fused kernel (which walks both with the parameter's strides)."""
    g = torch.Generator().manual_seed(0)
    a_t = nn.Parameter(torch.randn(40, 4, generator=g).T)  # (4, 40), transposed storage
    b_t = nn.Parameter(torch.randn(30, 4, generator=g))
    a_c = nn.Parameter(
        torch.randn(4, 3, 3, 3, generator=g).to(memory_format=torch.channels_last)
    )  # conv LoRA A (r, c_in, k, k), channels_last
    b_c = nn.Parameter(torch.randn(6, 4, 1, 1, generator=g))
    assert not a_t.is_contiguous() and not a_c.is_contiguous()

    def run(**kernel):
        ps = [nn.Parameter(p.detach().clone()) for p in (a_t, b_t, a_c, b_c)]
        ps[0] = nn.Parameter(a_t.detach().T.clone().T)
        ps[2] = nn.Parameter(a_c.detach().clone(memory_format=torch.channels_last))
        pairs = [LoraPair(ps[0], ps[1], 2.0, "lin"), LoraPair(ps[2], ps[3], 0.5, "conv")]
        opt = rl.ScaledAdamW(pairs, lr=0.1, **kernel)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in ps:
                p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen))
            opt.step()
        return [p.detach() for p in ps]

    for x, y in zip(run(), run(fused=False)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_kernel_choice_survives_load_state_dict():
    """The optimizer's kernel flags win over the checkpoint's; the step counters are cast."""

    def opt_for(**kernel):
        pairs = make_pairs(SHAPES[:2], SCALINGS[:2], dtype=torch.float32, seed=4)
        opt = rl.ScaledAdamW(pairs, lr=1e-2, **kernel)
        opt.step()
        return opt

    fused_sd = opt_for().state_dict()
    unfused = opt_for(fused=False)
    unfused.load_state_dict(fused_sd)
    assert unfused.param_groups[0]["fused"] is False
    legacy = opt_for(foreach=True).state_dict()  # e.g. saved before the fused default
    fresh = opt_for()
    fresh.load_state_dict(legacy)
    assert fresh.param_groups[0]["fused"] is True
    assert all(s["step"].dtype == torch.float32 for s in fresh.state.values())
    fresh.step()


def test_differentiable_lora_group_is_never_fused():
    pairs = make_pairs(SHAPES[:1], SCALINGS[:1], dtype=torch.float32)
    opt = rl.ScaledAdamW(make_pairs(SHAPES[1:2], SCALINGS[1:2], dtype=torch.float32), lr=1e-2)
    opt.add_param_group(
        {
            "params": [pairs[0].a, pairs[0].b],
            "lora": True,
            "scalings": [pairs[0].scaling],
            "differentiable": True,
        }
    )
    assert opt.param_groups[-1]["fused"] is None


def test_float16_factors_need_the_fused_kernel():
    """float16 factors: the default (fused, float32 arithmetic) stays finite where torch's
    float16 kernels write Inf/NaN; asking for those is refused with a message."""

    def fp16_pairs():
        g = torch.Generator().manual_seed(0)
        a = nn.Parameter(torch.randn(4, 32, generator=g).half())
        b = nn.Parameter((0.1 * torch.randn(16, 4, generator=g)).half())
        return [LoraPair(a, b, 2.0, "x")]

    pairs = fp16_pairs()
    opt = rl.ScaledAdamW(pairs, lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in (pairs[0].a, pairs[0].b):
            p.grad = torch.randn(p.shape, generator=g).half()
        pairs[0].b.grad[0] = 0.0  # v = 0 there: 0 / (0 + eps) must not become NaN
        opt.step()
    assert all(torch.isfinite(p).all() for p in (pairs[0].a, pairs[0].b))
    for kw in ({"fused": False}, {"foreach": True}, {"bias_correction": False}):
        with pytest.raises(ValueError, match="float16 LoRA factors"):
            rl.ScaledAdamW(fp16_pairs(), lr=1e-3, **kw)
