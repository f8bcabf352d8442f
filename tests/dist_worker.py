"""Worker for tests/test_distributed.py: DDP and FSDP2 training on 2 CPU processes (gloo).

Run as ``python tests/dist_worker.py OUT_DIR``. Every scenario trains the same small LoRA model
on a global batch split between the ranks, and compares with single-process training on the
whole batch computed on every rank. The scaled optimizers train a model in PEFT's module layout
built without peft; Riemannion and RiemannianSGD need real PEFT layers (imported only for them). Rank 0 writes ``OUT_DIR/results.json``: per scenario the largest deviation from the
single-process run and whether the ranks agree. float64 throughout, so that the only differences
are summation orders.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2
STEPS = 4


class LoraLinear(nn.Module):
    """A frozen linear layer with one LoRA adapter, laid out as PEFT lays out ``LoraLayer``."""

    def __init__(self, n: int, m: int, r: int, alpha: float):
        super().__init__()
        self.base_layer = nn.Linear(n, m).requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(n, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, m, bias=False)})
        nn.init.normal_(self.lora_B["default"].weight, std=0.3)  # non-zero: B^T B matters
        self.scaling = {"default": alpha / r}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = self.lora_B["default"](self.lora_A["default"](x))
        return self.base_layer(x) + self.scaling["default"] * lora


class Net(nn.Module):
    """Shards are uneven on purpose: r=3 splits 2/1 over 2 ranks, r=1 leaves rank 1 empty."""

    def __init__(self):
        super().__init__()
        self.l1 = LoraLinear(8, 15, r=3, alpha=6.0)
        self.l2 = LoraLinear(15, 6, r=1, alpha=2.0)
        self.head = nn.Linear(6, 3)  # trainable, not LoRA: torch's own update rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def make_model() -> Net:
    torch.manual_seed(0)
    return Net().double()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(8, 8, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (8,), generator=g),
        )
        for _ in range(STEPS)
    ]


OPTIMIZERS = {
    "ScaledSGD": lambda rl, m: rl.ScaledSGD(m, lr=0.2, momentum=0.9, weight_decay=0.01),
    "ScaledAdamW": lambda rl, m: rl.ScaledAdamW(m, lr=0.05, weight_decay=0.01),
    "ScaledAdamW-foreach-amsgrad": lambda rl, m: rl.ScaledAdamW(
        m, lr=0.05, weight_decay=0.01, foreach=True, amsgrad=True
    ),
}


def train(model, opt, data, rank=None, steps=None, poison=None, poisoned=None, clip=None):
    """``rank=None``: the whole batch; else this rank's half. ``poison``: (step, rank) whose
    local lora_B gradient shard (of ``poisoned(model)``, default l1's) gets a NaN just before
    ``step()``. ``clip``: ``riemannlora.clip_grad_norm_(opt, clip)`` before every step; returns
    the norms."""
    import riemannlora as rl

    norms = []
    for t, (x, y) in enumerate(data[:steps]):
        if rank is not None:
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if poison is not None and poison == (t, rank):
            layer = model.l1 if poisoned is None else poisoned(model)
            grad = layer.lora_B["default"].weight.grad
            grad.to_local()[0, 0] = float("nan")
        if clip is not None:
            norms.append(float(rl.clip_grad_norm_(opt, clip)))
        opt.step()
    return norms


def full_params(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = t.detach().clone()
    return out


def deviation(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def ranks_agree(params: dict) -> bool:
    flat = torch.cat([p.reshape(-1) for p in params.values()])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def count_collectives(step) -> dict[str, int]:
    """How many collectives of each kind ``step()`` issues."""
    counts: dict[str, int] = {}
    originals = {
        k: getattr(dist, k) for k in ("all_reduce", "all_gather_into_tensor", "all_gather")
    }

    def counting(kind):
        def call(*args, **kwargs):
            counts[kind] = counts.get(kind, 0) + 1
            return originals[kind](*args, **kwargs)

        return call

    for kind in originals:
        setattr(dist, kind, counting(kind))
    try:
        step()
    finally:
        for kind, fn in originals.items():
            setattr(dist, kind, fn)
    return counts


def shard(model):
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.l1)
    fully_shard(model.l2)
    fully_shard(model)
    return model


def scenarios(rank: int) -> dict:
    import riemannlora as rl

    results: dict[str, dict] = {}
    data = batches()
    for name, make_opt in OPTIMIZERS.items():
        ref = make_model()
        train(ref, make_opt(rl, ref), data)
        reference = full_params(ref)

        ddp = nn.parallel.DistributedDataParallel(make_model())
        train(ddp, make_opt(rl, ddp.module), data, rank)
        got = full_params(ddp.module)
        results[f"ddp-{name}"] = {"dev": deviation(got, reference), "agree": ranks_agree(got)}

        model = shard(make_model())
        opt = make_opt(rl, model)
        train(model, opt, data, rank)
        got = full_params(model)
        kinds = sorted({type(p).__name__ for p in model.parameters()})
        x, y = data[0][0].chunk(WORLD)[rank], data[0][1].chunk(WORLD)[rank]
        nn.functional.cross_entropy(model(x), y).backward()
        results[f"fsdp-{name}"] = {
            "dev": deviation(got, reference),
            "agree": ranks_agree(got),
            "param_types": kinds,
            "collectives": count_collectives(opt.step),
        }

        # FSDP2 checkpoint through torch.distributed.checkpoint's optimizer state dict
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        model = shard(make_model())
        opt = make_opt(rl, model)
        train(model, opt, data, rank, steps=2)
        msd, osd = get_model_state_dict(model), get_optimizer_state_dict(model, opt)
        resumed = shard(make_model())
        opt2 = make_opt(rl, resumed)
        set_model_state_dict(resumed, msd)
        set_optimizer_state_dict(resumed, opt2, osd)
        train(resumed, opt2, data[2:], rank)
        got = full_params(resumed)
        results[f"fsdp-resume-{name}"] = {"dev": deviation(got, reference), "agree": True}

    # a NaN in rank 1's shard only: every rank must skip the same step, also when only LoRA
    # factors train (then the guard sees only local directions, no DTensor gradient)
    for label, head in (("", True), ("-lora-only", False)):
        model = make_model()
        model.head.requires_grad_(head)
        model = shard(model)
        opt = rl.ScaledAdamW(model, lr=0.05)
        train(model, opt, data, rank, poison=(1, 1))
        ref = make_model()
        ref.head.requires_grad_(head)
        train(ref, rl.ScaledAdamW(ref, lr=0.05), [data[0], data[2], data[3]])
        got = full_params(model)
        skipped = torch.tensor([float(opt.skipped_steps)])
        every = [torch.empty(1) for _ in range(WORLD)]
        dist.all_gather(every, skipped)
        results[f"fsdp-nonfinite-skip{label}"] = {
            "dev": deviation(got, full_params(ref)),
            "agree": ranks_agree(got),
            "skipped": [int(t.item()) for t in every],
        }
    return results


# ---------------------------------------------------------------------- manifold optimizers


class PeftNet(nn.Module):
    """The base model of the manifold scenarios. With PEFT LoRA on fc1 (r=3), fc2 (r=1) and gate
    (r=1) over 2 ranks: fc1's lora_A [Q | V]^T (6, 8) splits 3/3 (5/4 with the LOI offset, V
    split between ranks), its lora_B (15, 6) 8/7; gate (out 1, 2r > min(m, n): the literal
    path) leaves rank 1 an empty lora_B shard."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 15)
        self.fc2 = nn.Linear(15, 6)
        self.gate = nn.Linear(6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc2(torch.tanh(self.fc1(x))))
        return self.head(h + self.gate(h))


def make_manifold_model(loi: bool = False, convert: bool = True):
    """The PEFT model in manifold form (converted before any DDP/FSDP wrapping), identical on
    every rank; ``loi``: LOI on fc1/fc2 from the first global batch (offset, width 3r);
    ``convert=False``: the plain PEFT model."""
    from peft import LoraConfig, get_peft_model

    import riemannlora as rl

    torch.manual_seed(0)
    targets = ["fc1", "fc2"] if loi else ["fc1", "fc2", "gate"]
    config = LoraConfig(
        r=3,
        lora_alpha=6,
        target_modules=targets,
        rank_pattern={"fc2": 1, "gate": 1},
        alpha_pattern={"fc2": 2, "gate": 2},
        init_lora_weights=False,  # random B: X != 0
    )
    model = get_peft_model(PeftNet(), config).double()
    model.base_model.model.head.requires_grad_(True)  # trained by torch's AdamW
    if not convert:
        return model
    if loi:
        x, y = batches()[0]
        rl.init_loi(
            model,
            lambda: nn.functional.cross_entropy(model(x), y),
            generator=torch.Generator().manual_seed(0),
        )
    else:
        rl.to_manifold(model)
    return model


def shard_peft(model):
    from torch.distributed.fsdp import fully_shard

    inner = model.base_model.model
    for name in ("fc1", "fc2", "gate"):
        fully_shard(getattr(inner, name))
    fully_shard(model)
    return model


def deltas(params: dict) -> dict:
    """The effective delta ``lora_B @ lora_A`` of every LoRA layer, and the other parameters."""
    out = {k: v for k, v in params.items() if "lora_" not in k}
    for k, a in params.items():
        if "lora_A" in k:
            out[k.replace("lora_A", "delta")] = params[k.replace("lora_A", "lora_B")] @ a
    return out


def fc1(model):
    return model.base_model.model.fc1


MANIFOLD_OPTIMIZERS = {
    "Riemannion": lambda rl, m: rl.Riemannion(
        m, lr=0.05, momentum=0.9, weight_decay=0.01, adamw_lr=0.01
    ),
    "Riemannion-nesterov-orth-scaled": lambda rl, m: rl.Riemannion(
        m, lr=0.01, nesterov=True, store_orthogonalized=True, scale_lr="match_adamw"
    ),
    "RiemannianSGD": lambda rl, m: rl.RiemannianSGD(m, lr=0.5, momentum=0.9, weight_decay=0.01),
    "RiemannianSGD-no-momentum": lambda rl, m: rl.RiemannianSGD(m, lr=0.5, momentum=0.0),
}


def manifold_scenarios(rank: int) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    import riemannlora as rl
    import riemannlora.core.geometry as geometry

    results: dict[str, dict] = {}
    data = batches()
    for name, make_opt in MANIFOLD_OPTIMIZERS.items():
        ref = make_manifold_model()
        train(ref, make_opt(rl, ref), data)
        reference = full_params(ref)

        model = make_manifold_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        train(ddp, make_opt(rl, model), data, rank)
        got = full_params(model)
        results[f"ddp-{name}"] = {"dev": deviation(got, reference), "agree": ranks_agree(got)}

        model = shard_peft(make_manifold_model())
        opt = make_opt(rl, model)
        train(model, opt, data, rank)
        got = full_params(model)
        kinds = sorted({type(p).__name__ for p in model.parameters()})
        momentum = {
            type(v).__name__ for s in opt.state.values() for k, v in s.items() if "momentum" in k
        }
        x, y = data[0][0].chunk(WORLD)[rank], data[0][1].chunk(WORLD)[rank]
        nn.functional.cross_entropy(model(x), y).backward()
        results[f"fsdp-{name}"] = {
            "dev": deviation(got, reference),
            "agree": ranks_agree(got),
            "param_types": kinds,
            "momentum_types": sorted(momentum),
            "collectives": count_collectives(opt.step),
        }

        model = shard_peft(make_manifold_model())
        opt = make_opt(rl, model)
        train(model, opt, data, rank, steps=2)
        msd, osd = get_model_state_dict(model), get_optimizer_state_dict(model, opt)
        resumed = shard_peft(make_manifold_model())
        opt2 = make_opt(rl, resumed)
        set_model_state_dict(resumed, msd)
        set_optimizer_state_dict(resumed, opt2, osd)
        train(resumed, opt2, data[2:], rank)
        got = full_params(resumed)
        results[f"fsdp-resume-{name}"] = {
            "dev": deviation(got, reference),
            "agree": ranks_agree(got),
        }

    # LOI: offset blocks (width 3r), V rows split between the ranks. X0 has r equal singular
    # values, so the first step's new factors are only defined up to a rotation (rounding picks
    # it, single-process too): compare the gauge-invariant deltas B A = X - X0 of every layer
    for name in ("Riemannion", "RiemannianSGD"):
        make_opt = MANIFOLD_OPTIMIZERS[name]
        ref = make_manifold_model(loi=True)
        train(ref, make_opt(rl, ref), data)
        model = shard_peft(make_manifold_model(loi=True))
        train(model, make_opt(rl, model), data, rank)
        got = full_params(model)
        results[f"fsdp-loi-{name}"] = {
            "dev": deviation(deltas(got), deltas(full_params(ref))),
            "agree": ranks_agree(got),
        }

    make_opt = MANIFOLD_OPTIMIZERS["Riemannion"]

    # every Cholesky-QR refused: the sharded step takes its gather-and-Householder fallbacks,
    # which must equal the single-process step's Householder fallbacks
    original = geometry._cholesky_factors
    geometry._cholesky_factors = lambda gram: None
    try:
        ref = make_manifold_model()
        train(ref, make_opt(rl, ref), data)
        model = shard_peft(make_manifold_model())
        opt = make_opt(rl, model)
        train(model, opt, data, rank, steps=STEPS - 1)
        x, y = data[-1][0].chunk(WORLD)[rank], data[-1][1].chunk(WORLD)[rank]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        collectives = count_collectives(opt.step)
    finally:
        geometry._cholesky_factors = original
    got = full_params(model)
    results["fsdp-fallback-Riemannion"] = {
        "dev": deviation(got, full_params(ref)),
        "agree": ranks_agree(got),
        "collectives": collectives,
    }

    # gradient clipping by the Riemannian gradient's norm (sharded: two all-reduces)
    ref = make_manifold_model()
    ref_norms = train(ref, make_opt(rl, ref), data, clip=0.05)
    model = shard_peft(make_manifold_model())
    norms = train(model, make_opt(rl, model), data, rank, clip=0.05)
    got = full_params(model)
    results["fsdp-clip-Riemannion"] = {
        "dev": deviation(got, full_params(ref)),
        "agree": ranks_agree(got),
        "norm_dev": max(abs(a - b) / b for a, b in zip(norms, ref_norms)),
        "clipped": min(ref_norms) > 0.05,
    }

    # converting after fully_shard would replace sharded modules: refused with a message
    from peft import LoraConfig, get_peft_model

    plain = shard_peft(get_peft_model(PeftNet(), LoraConfig(r=1, target_modules=["fc1", "fc2"])))
    try:
        rl.Riemannion(plain, lr=0.1)
        results["fsdp-convert-after-shard"] = {"refused": ""}
    except ValueError as exc:
        results["fsdp-convert-after-shard"] = {"refused": str(exc)}

    # a NaN in rank 1's shard only: every rank skips the same step
    model = shard_peft(make_manifold_model())
    opt = make_opt(rl, model)
    train(model, opt, data, rank, poison=(1, 1), poisoned=fc1)
    ref = make_manifold_model()
    train(ref, make_opt(rl, ref), [data[0], data[2], data[3]])
    got = full_params(model)
    skipped = torch.tensor([float(opt.skipped_steps)])
    every = [torch.empty(1) for _ in range(WORLD)]
    dist.all_gather(every, skipped)
    results["fsdp-nonfinite-skip-Riemannion"] = {
        "dev": deviation(got, full_params(ref)),
        "agree": ranks_agree(got),
        "skipped": [int(t.item()) for t in every],
    }
    return results


def order_scenarios(rank: int) -> dict:
    """Every order of DDP wrapping and conversion, 2 ranks on different halves of the batch.
    Converting after DDP registered the factors raises before anything changes (DDP would
    never all-reduce the new factors); converting first, then DDP, then the optimizer (given
    the model or the DDP wrapper) trains in sync and equals single-process training."""
    import riemannlora as rl

    data = batches()
    results: dict[str, dict] = {}

    def loss_of(model):
        x, y = data[0]
        return lambda: nn.functional.cross_entropy(model(x), y)

    wrong = {
        "Riemannion(model)": lambda ddp, m: rl.Riemannion(m, lr=0.05),
        "Riemannion(ddp)": lambda ddp, m: rl.Riemannion(ddp, lr=0.05),
        "RiemannianSGD(model)": lambda ddp, m: rl.RiemannianSGD(m, lr=0.5),
        "to_manifold(model)": lambda ddp, m: rl.to_manifold(m),
        "init_loi(model)": lambda ddp, m: rl.init_loi(m, loss_of(m)),
        "init_loi(ddp)": lambda ddp, m: rl.init_loi(ddp, loss_of(ddp)),
    }
    for name, call in wrong.items():
        model = make_manifold_model(convert=False)
        ddp = nn.parallel.DistributedDataParallel(model)
        before = full_params(model)
        try:
            call(ddp, model)
            error = ""
        except RuntimeError as exc:
            error = str(exc)
        after = full_params(model)
        results[f"order-ddp-then-{name}"] = {
            "error": error,
            "unchanged": before.keys() == after.keys() and deviation(after, before) == 0.0,
        }

    right = {
        "to_manifold-ddp-Riemannion(ddp)": (False, lambda ddp, m: rl.Riemannion(ddp, lr=0.05)),
        "to_manifold-ddp-Riemannion(model)": (False, lambda ddp, m: rl.Riemannion(m, lr=0.05)),
        "init_loi-ddp-Riemannion(ddp)": (True, lambda ddp, m: rl.Riemannion(ddp, lr=0.05)),
        "init_loi-ddp-RiemannianSGD(model)": (
            True,
            lambda ddp, m: rl.RiemannianSGD(m, lr=0.5, momentum=0.9),
        ),
    }
    for name, (loi, make_opt) in right.items():
        ref = make_manifold_model(loi=loi)
        train(ref, make_opt(ref, ref), data)
        model = make_manifold_model(loi=loi)
        ddp = nn.parallel.DistributedDataParallel(model)
        train(ddp, make_opt(ddp, model), data, rank)
        got = full_params(model)
        results[f"order-{name}"] = {
            # the trained model (with LOI the step's gauge is degenerate: U, V may differ by a
            # rotation at rounding level, U V^T does not)
            "dev": deviation(deltas(got), deltas(full_params(ref))),
            "agree": ranks_agree(got),
        }
    # the scaled optimizers replace nothing: any order works
    ref = make_manifold_model(convert=False)
    train(ref, rl.ScaledAdamW(ref, lr=0.05), data)
    model = make_manifold_model(convert=False)
    ddp = nn.parallel.DistributedDataParallel(model)
    train(ddp, rl.ScaledAdamW(ddp, lr=0.05), data, rank)
    got = full_params(model)
    results["order-ddp-ScaledAdamW(ddp)"] = {
        "dev": deviation(got, full_params(ref)),
        "agree": ranks_agree(got),
    }
    return results


def worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=WORLD
    )
    try:
        results = scenarios(rank)
        results.update(manifold_scenarios(rank))
        results.update(order_scenarios(rank))
        if rank == 0:
            with open(os.path.join(out, "results.json"), "w") as f:
                json.dump(results, f, indent=1)
    except Exception:
        with open(os.path.join(out, f"error-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(os.path.abspath(sys.argv[1]),), nprocs=WORLD)
