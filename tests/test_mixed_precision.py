"""Mixed precision and what happens before step(): bf16, autocast, GradScaler, accumulation, clipping."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import riemannlora as rl
from riemannlora.core import preconditioner

torch.set_num_threads(2)

OPTIMIZERS = {
    "ScaledAdamW": lambda m: rl.ScaledAdamW(m, lr=1e-2),
    "ScaledSGD": lambda m: rl.ScaledSGD(m, lr=0.1, momentum=0.9),
}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(8, 32)
        self.l2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def peft_net(dtype=torch.float32):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["l1", "l2"], modules_to_save=["head"])
    # PEFT upcasts bf16 adapters to float32 unless told not to: keep the factors in ``dtype``
    return get_peft_model(Net().to(dtype), config, autocast_adapter_dtype=False)


def data(n=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 8, generator=g).to(dtype), torch.randint(0, 3, (n,), generator=g)


@pytest.fixture
def gram_dtypes(monkeypatch):
    """Records the dtype of every batched r x r factorization."""
    seen: list[torch.dtype] = []
    original = preconditioner._spd_inverse

    def spy(grams):
        seen.append(grams.dtype)
        return original(grams)

    monkeypatch.setattr(preconditioner, "_spd_inverse", spy)
    return seen


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_bf16_model_trains_with_float32_rxr_algebra(opt_name, gram_dtypes):
    model = peft_net(torch.bfloat16)
    opt = OPTIMIZERS[opt_name](model)
    x, y = data(dtype=torch.bfloat16)
    losses = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert gram_dtypes and set(gram_dtypes) == {torch.float32}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.skipped_steps == 0 and losses[-1] < losses[0]


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_bf16_autocast_tracks_float32_training(opt_name, gram_dtypes):
    x, y = data()
    runs = []
    for autocast in (False, True):
        model = peft_net()
        opt = OPTIMIZERS[opt_name](model)
        for _ in range(5):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert set(gram_dtypes) == {torch.float32}  # float32 factors and grads under autocast
    assert torch.isfinite(runs[1]).all()
    assert (runs[1] - runs[0]).norm() < 0.05 * runs[0].norm()  # bf16 matmuls, same trajectory


def test_fp16_grad_scaler_skips_overflow_itself():
    model = peft_net()
    opt = rl.ScaledAdamW(model, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x, y = data()
    for step in range(3):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        if step == 1:  # an overflow: GradScaler must skip this step without calling step()
            next(p for n, p in model.named_parameters() if "lora_B" in n).grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == 2.0**15  # halved once, on the overflow
    assert opt.skipped_steps == 0  # the scaler, not our guard, handled it
    assert all(int(s["step"]) == 2 for s in opt.state.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _full_and_accumulated(make_opt):
    """Two copies of a float64 net trained 3 steps by ``make_opt``: on the full batch, and with
    the same batch in 4 accumulated micro-batches. Returns ``(full, accum, x)``."""
    x, y = data(dtype=torch.float64)
    full = peft_net(torch.float64)
    accum = copy.deepcopy(full)
    opt_full, opt_accum = make_opt(full), make_opt(accum)
    for _ in range(3):
        opt_full.zero_grad()
        nn.functional.cross_entropy(full(x), y).backward()
        opt_full.step()
        opt_accum.zero_grad()
        for xs, ys in zip(x.chunk(4), y.chunk(4)):
            (nn.functional.cross_entropy(accum(xs), ys) / 4).backward()
        opt_accum.step()
    return full, accum, x


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_gradient_accumulation_equals_the_full_batch_step(opt_name):
    full, accum, _ = _full_and_accumulated(OPTIMIZERS[opt_name])
    for p, q in zip(full.parameters(), accum.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_clipping_before_step_is_what_the_optimizer_sees(opt_name):
    x, y = data(dtype=torch.float64)
    clipped = peft_net(torch.float64)
    manual = copy.deepcopy(clipped)
    opt_c, opt_m = OPTIMIZERS[opt_name](clipped), OPTIMIZERS[opt_name](manual)
    for _ in range(2):
        for m in (clipped, manual):
            m.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
        params = [p for p in clipped.parameters() if p.requires_grad]
        total = torch.nn.utils.clip_grad_norm_(params, max_norm=0.05)
        assert total > 0.05  # clipping is active
        after_clip = [p.grad.clone() for p in params]
        with torch.no_grad():
            for p in manual.parameters():
                if p.grad is not None:
                    p.grad.mul_(0.05 / (total + 1e-6))
        opt_c.step()
        opt_m.step()
        # step() never rewrites .grad: logging after step() sees the clipped gradients
        assert all(torch.equal(p.grad, g) for p, g in zip(params, after_clip))
    for p, q in zip(clipped.parameters(), manual.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# the manifold optimizers (geometry in float32 or float64, whatever the model's dtype)
# --------------------------------------------------------------------------------------------

MANIFOLD = {
    "Riemannion": lambda m: rl.Riemannion(m, lr=1e-2, generator=torch.Generator().manual_seed(0)),
    "RiemannianSGD": lambda m: rl.RiemannianSGD(
        m, lr=0.1, generator=torch.Generator().manual_seed(0)
    ),
}


@pytest.mark.parametrize("opt_name", sorted(MANIFOLD))
def test_manifold_bf16_autocast_and_scheduler_track_float32_training(opt_name):
    x, y = data()
    runs = []
    for autocast in (False, True):
        model = peft_net()
        opt = MANIFOLD[opt_name](model)
        sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=5)
        for _ in range(5):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(opt.defaults["lr"] * 0.1)
        with torch.no_grad():  # the factors are defined up to rotations: compare the function
            runs.append(model(x))
    assert torch.isfinite(runs[1]).all()
    assert (runs[1] - runs[0]).norm() < 0.05 * runs[0].norm()  # bf16 matmuls, same trajectory


@pytest.mark.parametrize("opt_name", sorted(MANIFOLD))
def test_manifold_gradient_accumulation_equals_the_full_batch_step(opt_name):
    full, accum, x = _full_and_accumulated(MANIFOLD[opt_name])
    with torch.no_grad():  # factors are fixed only up to rotations/signs: compare the function
        torch.testing.assert_close(accum(x), full(x), rtol=1e-9, atol=1e-11)
