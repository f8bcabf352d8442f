"""Worker for tests/test_distributed.py: DDP and FSDP2 training on 2 CPU processes (gloo).

Run as ``python tests/dist_worker.py OUT_DIR``. Every scenario trains the same small LoRA model
(PEFT's module layout, built without importing peft to keep start-up short) on a global batch
split between the ranks, and compares with single-process training on the whole batch computed
on rank 0. Rank 0 writes ``OUT_DIR/results.json``: per scenario the largest deviation from the
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


def train(model, opt, data, rank=None, steps=None, poison=None):
    """``rank=None``: the whole batch; else this rank's half. ``poison``: (step, rank) whose
    local lora_B gradient shard gets a NaN just before ``step()``."""
    for t, (x, y) in enumerate(data[:steps]):
        if rank is not None:
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if poison is not None and poison == (t, rank):
            grad = model.l1.lora_B["default"].weight.grad
            grad.to_local()[0, 0] = float("nan")
        opt.step()


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


def worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=WORLD
    )
    try:
        results = scenarios(rank)
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
