"""Bad-input survey: every bad input raises a clear error and changes neither model nor optimizer.

Each case prepares a bad call on a model that has trained one step (so optimizer state exists)
and holds fresh gradients (so a step that went through would change the weights). The test
snapshots parameters, gradients and the optimizer state dict, expects the error type and a
message naming the problem, and compares the snapshot afterwards.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import riemannlora as rl
from riemannlora.checkpoint import load_checkpoint, save_checkpoint
from riemannlora.optim.guard import NonFiniteError
from riemannlora.pairs import LoraPair, LoraParams

torch.set_num_threads(2)

NAN, INF = float("nan"), float("inf")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(8, 16)
        self.l2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def peft_net(r: int = 4, alpha: int = 8, targets=("l1", "l2")):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), modules_to_save=["head"])
    return get_peft_model(Net(), cfg)


def backward(model) -> None:
    x, y = torch.randn(8, 8), torch.randint(0, 3, (8,))
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


@dataclass
class Ctx:
    model: nn.Module
    opt: rl.ScaledAdamW
    tmp: object  # pathlib.Path

    def lora(self, which: str = "l1.lora_A") -> nn.Parameter:
        return next(p for n, p in self.model.named_parameters() if which in n)

    def trained_state(self, make: Callable[[nn.Module], torch.optim.Optimizer], **net) -> dict:
        other = peft_net(**net)
        opt = make(other)
        backward(other)
        opt.step()
        return opt.state_dict()


def explicit_pair(r=2, n=5, m=4, **kw) -> LoraPair:
    return LoraPair(nn.Parameter(torch.randn(r, n)), nn.Parameter(torch.randn(m, r)), **kw)


def frozen_lora(model):
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(False)
    return model


def half_frozen(model):
    model.base_model.model.l1.lora_B["default"].weight.requires_grad_(False)
    return model


def shared_factor():
    p = explicit_pair()
    return [p, LoraPair(p.a, nn.Parameter(torch.randn(6, 2)), name="again")]


def set_group(ctx: Ctx, key: str, value) -> None:
    ctx.opt.param_groups[0][key] = value


def resize_factor(ctx: Ctx) -> None:
    a = ctx.lora("l2.lora_A")
    a.data = torch.randn(5, a.shape[1])
    a.grad = None


def sparse_grad(ctx: Ctx) -> None:
    a = ctx.lora("l1.lora_A")
    a.grad = a.grad.to_sparse()


def poison(ctx: Ctx) -> None:
    ctx.lora("l1.lora_B").grad[0, 0] = NAN


def corrupt_state(ctx: Ctx) -> dict:
    sd = copy.deepcopy(ctx.opt.state_dict())
    sd["state"][0]["exp_avg"][0, 0] = NAN
    return sd


def exported_adapter(ctx: Ctx, **net) -> object:
    """An adapter exported by ``export_adapter`` from a Riemannion-trained model built with
    ``peft_net(**net)`` (another rank or other layers than ctx.model's)."""
    other = peft_net(**net)
    opt = rl.Riemannion(other, lr=1e-2)
    backward(other)
    opt.step()
    return rl.export_adapter(other, ctx.tmp / "exported")


def save_other_model(ctx: Ctx):
    other = peft_net(targets=("l1",))
    return save_checkpoint(ctx.tmp / "other.pt", model=other)


def truncated_checkpoint(ctx: Ctx):
    save_checkpoint(ctx.tmp / "good.pt", model=ctx.model, optimizer=ctx.opt)
    data = (ctx.tmp / "good.pt").read_bytes()
    (ctx.tmp / "torn.pt").write_bytes(data[: len(data) // 2])
    return ctx.tmp / "torn.pt"


Adam = rl.ScaledAdamW
SGD = rl.ScaledSGD

#: name -> (bad call given the context, expected error, regex the message must match)
CASES: dict[str, tuple[Callable[[Ctx], Callable[[], object]], type[Exception], str]] = {
    # --- hyper-parameters
    "lr-nan": (lambda c: lambda: Adam(c.model, lr=NAN), ValueError, "lr must be finite"),
    "lr-inf": (lambda c: lambda: SGD(c.model, lr=INF), ValueError, "lr must be finite"),
    "lr-negative": (lambda c: lambda: Adam(c.model, lr=-1e-3), ValueError, "lr must be > 0"),
    "lr-string": (lambda c: lambda: Adam(c.model, lr="1e-3"), TypeError, "lr must be a number"),
    "lr-bool": (lambda c: lambda: SGD(c.model, lr=True), TypeError, "lr must be a number"),
    "lr-tensor-vector": (
        lambda c: lambda: Adam(c.model, lr=torch.ones(2)),
        ValueError,
        "lr must be a scalar",
    ),
    "eps-nan": (lambda c: lambda: Adam(c.model, 1e-3, eps=NAN), ValueError, "eps must be finite"),
    "eps-negative": (lambda c: lambda: Adam(c.model, 1e-3, eps=-1.0), ValueError, "eps must be >="),
    "reg-inf": (lambda c: lambda: Adam(c.model, 1e-3, reg=INF), ValueError, "reg must be finite"),
    "reg-negative": (lambda c: lambda: SGD(c.model, 1e-3, reg=-1e-3), ValueError, "reg must be >="),
    "reg-string": (lambda c: lambda: SGD(c.model, 1e-3, reg="0.1"), TypeError, "reg must be a num"),
    "weight_decay-nan": (
        lambda c: lambda: SGD(c.model, 1e-3, weight_decay=NAN),
        ValueError,
        "weight_decay must be finite",
    ),
    "betas-nan": (
        lambda c: lambda: Adam(c.model, 1e-3, betas=(NAN, 0.9)),
        ValueError,
        r"betas\[0\] must be finite",
    ),
    "betas-one": (
        lambda c: lambda: Adam(c.model, 1e-3, betas=(0.9, 1.0)),
        ValueError,
        r"betas\[1\] must be in \[0, 1\)",
    ),
    "betas-not-a-pair": (
        lambda c: lambda: Adam(c.model, 1e-3, betas=(0.9,)),
        ValueError,
        "betas must be a pair",
    ),
    "momentum-inf": (
        lambda c: lambda: SGD(c.model, 1e-3, momentum=INF),
        ValueError,
        "momentum must be finite",
    ),
    "scale_aware-string": (
        lambda c: lambda: Adam(c.model, 1e-3, scale_aware="yes"),
        TypeError,
        "scale_aware must be a bool",
    ),
    "gram_dtype-half": (
        lambda c: lambda: Adam(c.model, 1e-3, gram_dtype=torch.float16),
        ValueError,
        "gram_dtype must be None, torch.float32 or torch.float64",
    ),
    "gram_dtype-string": (
        lambda c: lambda: SGD(c.model, 1e-3, gram_dtype="float64"),
        ValueError,
        "gram_dtype must be",
    ),
    "nonfinite-unknown": (
        lambda c: lambda: Adam(c.model, 1e-3, nonfinite="ignore"),
        ValueError,
        "nonfinite must be one of",
    ),
    # --- models and pairs
    "model-none": (lambda c: lambda: Adam(None, 1e-3), TypeError, "expected a model"),
    "model-tensor": (lambda c: lambda: Adam(torch.ones(3, 3), 1e-3), TypeError, "expected a model"),
    "model-dict": (lambda c: lambda: SGD({"a": 1}, 1e-3), TypeError, "expected a model"),
    "plain-parameter-list": (
        lambda c: lambda: Adam([p for p in c.model.parameters() if p.requires_grad], 1e-3),
        TypeError,
        "pairing information",
    ),
    "empty-list": (lambda c: lambda: Adam([], 1e-3), ValueError, "no LoRA pairs given"),
    "adapter-less-model": (lambda c: lambda: Adam(Net(), 1e-3), ValueError, "no trainable LoRA"),
    "all-adapters-frozen": (
        lambda c: lambda: SGD(frozen_lora(peft_net()), 1e-3),
        ValueError,
        "no trainable LoRA pairs",
    ),
    "one-factor-frozen": (
        lambda c: lambda: Adam(half_frozen(peft_net()), 1e-3),
        ValueError,
        "lora_B is frozen",
    ),
    "frozen-explicit-pair": (
        lambda c: lambda: Adam([explicit_pair(), _frozen_pair()], 1e-3),
        ValueError,
        "does not require grad",
    ),
    "same-parameter-in-two-pairs": (
        lambda c: lambda: Adam(shared_factor(), 1e-3),
        ValueError,
        "appears twice",
    ),
    "pair-of-one-tensor": (
        lambda c: lambda: (lambda p: LoraPair(p, p))(nn.Parameter(torch.randn(3, 3))),
        ValueError,
        "same tensor",
    ),
    "factor-also-in-others": (
        lambda c: lambda: (lambda p: LoraParams([p], others=[p.a]))(explicit_pair()),
        ValueError,
        "listed both as a LoRA factor",
    ),
    "mismatched-pair-shapes": (
        lambda c: (
            lambda: LoraPair(nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(8, 3)))
        ),
        ValueError,
        "mismatched pair shapes",
    ),
    "rank-larger-than-layer-mismatch": (
        lambda c: (
            lambda: LoraPair(nn.Parameter(torch.randn(9, 8)), nn.Parameter(torch.randn(4, 8)))
        ),
        ValueError,
        r"rank 9\) but b is \(4, 8\)",
    ),
    "one-dimensional-factor": (
        lambda c: lambda: LoraPair(nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(3, 4))),
        ValueError,
        "at least 2-D",
    ),
    "integer-factor": (
        lambda c: lambda: LoraPair(torch.ones(2, 3, dtype=torch.long), torch.ones(4, 2)),
        TypeError,
        "real floating-point",
    ),
    "complex-factor": (
        lambda c: lambda: LoraPair(torch.ones(2, 3, dtype=torch.cfloat), torch.ones(4, 2)),
        TypeError,
        "real floating-point",
    ),
    "factors-on-two-devices": (
        lambda c: lambda: LoraPair(torch.ones(2, 3), torch.ones(4, 2, device="meta")),
        ValueError,
        "different devices",
    ),
    "scaling-nan": (
        lambda c: lambda: explicit_pair(scaling=NAN),
        ValueError,
        "finite and non-zero",
    ),
    "scaling-zero": (lambda c: lambda: explicit_pair(scaling=0), ValueError, "finite and non-zero"),
    "scaling-string": (
        lambda c: lambda: explicit_pair(scaling="2.0"),
        TypeError,
        "scaling must be a real number",
    ),
    "factor-not-a-tensor": (
        lambda c: lambda: LoraPair([[1.0, 2.0]], torch.ones(2, 1)),
        TypeError,
        "must be a torch.Tensor",
    ),
    "find-pairs-on-a-string": (
        lambda c: lambda: rl.find_lora_pairs("model"),
        TypeError,
        "expects an nn.Module",
    ),
    "lora-group-without-scalings": (
        lambda c: (
            lambda: c.opt.add_param_group(
                {"params": [nn.Parameter(torch.randn(2, 3))], "lora": True}
            )
        ),
        ValueError,
        "one 'scalings' entry per pair",
    ),
    "param-group-with-a-known-parameter": (
        lambda c: lambda: c.opt.add_param_group({"params": [c.lora()]}),
        ValueError,
        "more than one parameter group",
    ),
    # --- exported adapters (the model is converted only after every layer checks out)
    "exported-adapter-of-another-rank": (
        lambda c: (lambda path: lambda: rl.load_exported_adapter(c.model, path))(
            exported_adapter(c, r=2)
        ),
        ValueError,
        "has rank 4, the export has 2",
    ),
    "exported-adapter-of-another-base": (
        lambda c: (lambda path: lambda: rl.load_exported_adapter(c.model, path))(
            exported_adapter(c, targets=("l1",))
        ),
        ValueError,
        "holds no manifold weights for LoRA layer",
    ),
    "plain-directory-as-exported-adapter": (
        lambda c: lambda: rl.load_exported_adapter(c.model, c.tmp),
        ValueError,
        "is not an adapter exported by riemannlora.export_adapter",
    ),
    # --- step
    "closure-not-callable": (lambda c: lambda: c.opt.step(42), TypeError, "closure must be call"),
    "closure-returns-garbage": (
        lambda c: lambda: c.opt.step(lambda: "loss"),
        TypeError,
        "closure must return the loss",
    ),
    "lr-set-to-nan-later": (
        lambda c: (set_group(c, "lr", NAN), c.opt.step)[1],
        ValueError,
        "param group 0: lr is nan",
    ),
    "beta-set-to-inf-later": (
        lambda c: (set_group(c, "betas", (0.9, INF)), c.opt.step)[1],
        ValueError,
        r"betas\[1\] is inf",
    ),
    "factor-resized-after-construction": (
        lambda c: (resize_factor(c), c.opt.step)[1],
        ValueError,
        "resized after the optimizer was built",
    ),
    "sparse-gradient": (
        lambda c: (sparse_grad(c), c.opt.step)[1],
        TypeError,
        "sparse_coo gradients are not supported",
    ),
    "gradient-of-wrong-shape": (  # torch itself refuses the assignment
        lambda c: lambda: setattr(c.lora(), "grad", torch.zeros(3, 3)),
        RuntimeError,
        "gradient and the tensor are the same size",
    ),
    "nonfinite-gradient-raise": (
        lambda c: (poison(c), setattr(c.opt, "nonfinite", "raise"), c.opt.step)[2],
        NonFiniteError,
        r"gradient of .*l1\.default\.lora_B",
    ),
    # --- optimizer state dicts
    "state-dict-not-a-dict": (
        lambda c: lambda: c.opt.load_state_dict("state"),
        TypeError,
        "state_dict must be a dict",
    ),
    "state-dict-empty": (
        lambda c: lambda: c.opt.load_state_dict({}),
        ValueError,
        "not an optimizer state dict",
    ),
    "state-dict-of-another-model": (
        lambda c: (
            lambda: c.opt.load_state_dict(c.trained_state(lambda m: Adam(m, 1e-3), targets=("l1",)))
        ),
        ValueError,
        "another model",
    ),
    "state-dict-of-another-rank": (
        lambda c: (
            lambda: c.opt.load_state_dict(c.trained_state(lambda m: Adam(m, 1e-3), r=8, alpha=16))
        ),
        ValueError,
        "from another model or rank",
    ),
    "state-dict-of-another-alpha": (
        lambda c: lambda: c.opt.load_state_dict(c.trained_state(lambda m: Adam(m, 1e-3), alpha=4)),
        ValueError,
        "saved for LoRA scalings",
    ),
    "state-dict-of-another-optimizer-type": (
        lambda c: (
            lambda: c.opt.load_state_dict(c.trained_state(lambda m: SGD(m, 1e-2, momentum=0.9)))
        ),
        ValueError,
        "saved by another optimizer type",
    ),
    "state-dict-with-nan": (
        lambda c: lambda: c.opt.load_state_dict(corrupt_state(c)),
        ValueError,
        "holds NaN/Inf: the checkpoint is corrupt",
    ),
    # --- checkpoint files
    "checkpoint-missing": (
        lambda c: lambda: load_checkpoint(c.tmp / "nope.pt", model=c.model),
        FileNotFoundError,
        "no checkpoint at",
    ),
    "checkpoint-of-another-model": (
        lambda c: (lambda path: lambda: load_checkpoint(path, model=c.model))(save_other_model(c)),
        ValueError,
        "does not match the model",
    ),
    "checkpoint-truncated": (
        lambda c: (lambda path: lambda: load_checkpoint(path, model=c.model, optimizer=c.opt))(
            truncated_checkpoint(c)
        ),
        ValueError,
        "truncated or corrupt",
    ),
    "checkpoint-extra-not-a-dict": (
        lambda c: lambda: save_checkpoint(c.tmp / "x.pt", model=c.model, extra=[1, 2]),
        TypeError,
        "extra must be a dict",
    ),
}


def _frozen_pair() -> LoraPair:
    pair = explicit_pair()
    pair.b.requires_grad_(False)
    return pair


def snapshot(ctx: Ctx) -> tuple[dict, dict, dict]:
    params = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in ctx.model.named_parameters() if p.grad is not None}
    return params, grads, copy.deepcopy(ctx.opt.state_dict())


def equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality that also holds for NaN entries and sparse tensors."""
    a, b = (t.to_dense() if t.is_sparse else t for t in (a, b))
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(a.isnan(), b.isnan())
        and (torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))
    )


def assert_same(before: tuple[dict, dict, dict], ctx: Ctx) -> None:
    params, grads, state = before
    for n, p in ctx.model.named_parameters():
        assert equal(params[n], p), f"parameter {n} changed"
        if n in grads:
            assert p.grad is not None and equal(grads[n], p.grad), f"gradient {n} changed"
    now = ctx.opt.state_dict()
    assert len(now["param_groups"]) == len(state["param_groups"])
    for g_now, g_then in zip(now["param_groups"], state["param_groups"]):
        assert g_now.keys() == g_then.keys()
        for k in g_now:
            same = g_now[k] == g_then[k] or (g_now[k] != g_now[k] and g_then[k] != g_then[k])
            assert same, f"param group key {k!r} changed"
    assert now["state"].keys() == state["state"].keys()
    for idx, st in state["state"].items():
        for k, v in st.items():
            assert equal(now["state"][idx][k], v), f"optimizer state {idx}/{k} changed"


def test_the_survey_is_large_enough():
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_raises_clearly_and_changes_nothing(name, tmp_path):
    make_call, error, match = CASES[name]
    model = peft_net()
    opt = rl.ScaledAdamW(model, lr=1e-2)
    backward(model)
    opt.step()
    backward(model)  # fresh gradients: a step that went through would change the weights
    ctx = Ctx(model, opt, tmp_path)
    call = make_call(ctx)  # some cases prepare the bad situation (resize, poison, ...) first
    before = snapshot(ctx)
    with pytest.raises(error, match=match):
        call()
    assert_same(before, ctx)


@pytest.mark.parametrize(
    "call", ["ScaledAdamW", "ScaledSGD", "Riemannion", "RiemannianSGD", "init_loi", "to_manifold"]
)
def test_a_model_on_the_meta_device_is_refused_with_what_to_do(call):
    model = peft_net()
    model.to("meta")
    calls = {
        "init_loi": lambda: rl.init_loi(model, lambda: model(torch.zeros(2, 8)).sum()),
        "to_manifold": lambda: rl.to_manifold(model),
    }
    with pytest.raises(ValueError, match=r"meta device .* Materialize them first"):
        calls.get(call, lambda: getattr(rl, call)(model, lr=1e-3))()
