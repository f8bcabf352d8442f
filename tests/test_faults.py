"""Faults: non-finite gradients never reach weights or state; crash-safe checkpoints resume exactly."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import riemannlora as rl
from riemannlora.checkpoint import load_checkpoint, save_checkpoint
from riemannlora.optim.guard import NonFiniteError, all_finite
from riemannlora.pairs import LoraPair

torch.set_num_threads(2)

OPTIMIZERS = {
    "ScaledAdamW": lambda m, **kw: rl.ScaledAdamW(m, lr=1e-2, weight_decay=0.01, **kw),
    "ScaledSGD": lambda m, **kw: rl.ScaledSGD(m, lr=0.1, momentum=0.9, **kw),
}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(8, 16)
        self.drop = nn.Dropout(0.2)
        self.l2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.l2(self.drop(torch.tanh(self.l1(x))))))


def peft_net(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["l1", "l2"], modules_to_save=["head"])
    return get_peft_model(Net(), config)


def backward(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
    torch.manual_seed(seed)  # dropout
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def snapshot(model, opt) -> tuple[dict, dict]:
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def assert_unchanged(before, model, opt) -> None:
    params, state = before
    for k, v in model.state_dict().items():
        assert torch.equal(params[k], v), k
    now = opt.state_dict()
    assert now["param_groups"] == state["param_groups"]
    assert now["state"].keys() == state["state"].keys()
    for idx, st in state["state"].items():
        for k, v in st.items():
            assert torch.equal(now["state"][idx][k], v), (idx, k)


def lora_param(model, which: str):
    return next(p for n, p in model.named_parameters() if which in n)


POISONS = {
    "nan-in-lora_A-grad": ("lora_A", float("nan")),
    "inf-in-lora_B-grad": ("lora_B", float("inf")),
    "-inf-in-head-grad": ("modules_to_save", float("-inf")),
}


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("poison", sorted(POISONS))
def test_nonfinite_gradient_skips_the_whole_step(opt_name, poison, caplog):
    which, value = POISONS[poison]
    model = peft_net()
    twin = copy.deepcopy(model)
    opt = OPTIMIZERS[opt_name](model)
    twin_opt = OPTIMIZERS[opt_name](twin)
    for t in range(2):  # two good steps: the state exists when the bad one comes
        for m, o in ((model, opt), (twin, twin_opt)):
            backward(m, seed=t)
            o.step()
    backward(model, seed=99)
    lora_param(model, which).grad.view(-1)[3] = value
    before = snapshot(model, opt)
    with caplog.at_level(logging.WARNING, logger="riemannlora"):
        opt.step()
    assert_unchanged(before, model, opt)
    assert opt.skipped_steps == 1
    assert "skipped step (1 so far): non-finite values (NaN/Inf) in the" in caplog.text
    assert which in caplog.text
    # the run goes on exactly as if the bad batch had never been seen
    for t in range(2, 4):
        for m, o in ((model, opt), (twin, twin_opt)):
            backward(m, seed=t)
            o.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_nonfinite_on_the_first_step_creates_no_state(opt_name):
    model = peft_net()
    opt = OPTIMIZERS[opt_name](model)
    backward(model)
    lora_param(model, "lora_B").grad[0, 0] = float("nan")
    before = snapshot(model, opt)
    opt.step()
    assert_unchanged(before, model, opt)
    assert len(opt.state) == 0


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_nonfinite_raise_names_the_tensor_and_changes_nothing(opt_name):
    model = peft_net()
    opt = OPTIMIZERS[opt_name](model, nonfinite="raise")
    backward(model)
    opt.step()
    backward(model, seed=1)
    lora_param(model, "l2.lora_A").grad[1, 2] = float("nan")
    before = snapshot(model, opt)
    with pytest.raises(NonFiniteError, match=r"gradient of .*l2\.default\.lora_A"):
        opt.step()
    assert_unchanged(before, model, opt)
    assert opt.skipped_steps == 0


def test_nonfinite_off_lets_nan_through_like_torch():
    model = peft_net()
    opt = rl.ScaledSGD(model, lr=0.1, nonfinite="off")
    backward(model)
    lora_param(model, "lora_B").grad[0, 0] = float("nan")
    opt.step()
    assert not torch.isfinite(lora_param(model, "lora_B")).all()


def test_nonfinite_direction_from_finite_gradients_is_caught():
    # finite but huge float32 gradient with a tiny B: D_A = (B^T B + reg I)^{-1} G_A overflows
    a = nn.Parameter(torch.randn(2, 5))
    b = nn.Parameter(torch.full((4, 2), 1e-8))
    a.grad = torch.full((2, 5), 1e36)
    b.grad = torch.ones(4, 2)
    opt = rl.ScaledSGD([LoraPair(a, b, 1.0)], lr=1e-3, reg=1e-6, nonfinite="raise")
    a0 = a.detach().clone()
    with pytest.raises(NonFiniteError, match=r"preconditioned direction of pair\.lora_A"):
        opt.step()
    assert torch.equal(a, a0)


def test_all_finite_one_reduction_over_mixed_dtypes_and_empty_tensors():
    ok = [torch.ones(3), torch.ones(2, dtype=torch.float64), torch.ones(4, dtype=torch.bfloat16)]
    ok.append(torch.ones(0, 5))  # empty shard (FSDP with r < world size)
    assert all_finite(ok)
    assert all_finite([])
    assert all_finite([*ok, torch.full((1000,), 1e17), torch.full((10,), 60000.0).half()])
    # entries whose squares overflow float32 count as non-finite (AdamW's v would overflow too)
    assert not all_finite([torch.full((10,), 1e20)])
    assert not all_finite([*ok, torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)])
    assert not all_finite([*ok, torch.tensor([float("-inf")], dtype=torch.float64)])


# ----------------------------------------------------------------------------- checkpoints
def run(model, opt, sched, start: int, stop: int, ckpt=None, every: int = 3, crash_at=None):
    """Steps ``start..stop-1``; dropout and batch order draw from the global torch RNG."""
    g_data = torch.Generator().manual_seed(7)
    xs, ys = torch.randn(64, 8, generator=g_data), torch.randint(0, 3, (64,), generator=g_data)
    for t in range(start, stop):
        if t == crash_at:
            raise RuntimeError("simulated crash")
        idx = torch.randperm(64)[:16]  # global RNG: must be restored on resume
        model.zero_grad()
        nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()
        opt.step()
        sched.step()
        if ckpt is not None and (t + 1) % every == 0:
            save_checkpoint(
                ckpt, model=model, optimizer=opt, scheduler=sched, extra={"step": t + 1}
            )


def fresh(opt_name: str, seed: int = 0):
    model = peft_net(seed)
    opt = OPTIMIZERS[opt_name](model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + 0.1 * t))
    return model, opt, sched


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_crash_and_resume_from_last_checkpoint_is_bitwise(opt_name, tmp_path):
    torch.manual_seed(1234)
    model, opt, sched = fresh(opt_name)
    torch.manual_seed(1234)
    run(model, opt, sched, 0, 10)

    ckpt = tmp_path / "last.pt"
    crashed, c_opt, c_sched = fresh(opt_name)
    torch.manual_seed(1234)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crashed, c_opt, c_sched, 0, 10, ckpt=ckpt, crash_at=7)
    torch.manual_seed(999)  # the new process has another RNG state
    resumed, r_opt, r_sched = fresh(opt_name)  # the same frozen base model, rebuilt
    with torch.no_grad():  # adapters and head must come from the checkpoint
        for p in resumed.parameters():
            if p.requires_grad:
                p.normal_()
    extra = load_checkpoint(ckpt, model=resumed, optimizer=r_opt, scheduler=r_sched)
    assert extra == {"step": 6}
    run(resumed, r_opt, r_sched, extra["step"], 10)
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model, opt, sched = fresh("ScaledAdamW")
    run(model, opt, sched, 0, 2)
    ckpt = tmp_path / "last.pt"
    save_checkpoint(ckpt, model=model, optimizer=opt, extra={"step": 2})
    good = ckpt.read_bytes()
    run(model, opt, sched, 2, 3)

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(ckpt, model=model, optimizer=opt, extra={"step": 3})
    monkeypatch.undo()
    assert ckpt.read_bytes() == good  # the previous checkpoint survives intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left
    assert load_checkpoint(ckpt, model=model, optimizer=opt) == {"step": 2}


def test_checkpoint_stores_only_trainable_parameters_by_default(tmp_path):
    model = peft_net()
    save_checkpoint(tmp_path / "c.pt", model=model)
    saved = torch.load(tmp_path / "c.pt", weights_only=True)["model"]
    assert saved.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    save_checkpoint(tmp_path / "full.pt", model=model, trainable_only=False)
    full = torch.load(tmp_path / "full.pt", weights_only=True)["model"]
    assert full.keys() == model.state_dict().keys()


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_skip_warning_is_one_short_line_whatever_is_broken(opt_name, caplog):
    """Every gradient non-finite: one line naming the first tensor and how many more."""
    model = peft_net()
    opt = OPTIMIZERS[opt_name](model)
    backward(model)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.fill_(float("nan"))
    with caplog.at_level(logging.WARNING, logger="riemannlora"):
        opt.step()
    (record,) = [r for r in caplog.records if r.name == "riemannlora"]
    text = record.getMessage()
    assert "\n" not in text and len(text) < 300, text
    assert "more)" in text


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_a_broken_weight_is_blamed_not_the_gradients(opt_name, caplog):
    """A weight that an earlier update overflowed (float16 head under AdamW) makes every later
    gradient non-finite: the warning names the weight and what to do."""
    model = peft_net()
    opt = OPTIMIZERS[opt_name](model)
    backward(model)
    opt.step()
    head = lora_param(model, "modules_to_save")
    with torch.no_grad():
        head.view(-1)[0] = float("inf")
    backward(model, seed=1)
    with caplog.at_level(logging.WARNING, logger="riemannlora"):
        opt.step()
    assert opt.skipped_steps == 1
    assert "modules_to_save" in caplog.text and "itself holds NaN/Inf" in caplog.text
    assert "float32/bfloat16" in caplog.text
