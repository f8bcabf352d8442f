"""Riemannion's cost next to AdamW-LoRA and per-factor torch.optim.Muon, measured side by side.

SmolLM2-135M-Instruct (real weights), LoRA r=8 on every linear layer (210 layers), real
batches of the E2E NLG Challenge's training examples (task ``e2e`` of
``riemannlora.bench.tasks``, at most 96 tokens). Four measurements, all interleaved in one
process except memory:

1. ``optimizer.step()`` alone: torch AdamW (foreach) on the LoRA factors, torch.optim.Muon on
   the LoRA factors (per-factor, ``adjust_lr_fn="match_rms_adamw"``), Riemannion.
2. the whole training step (forward + backward + step) on the same real batches: AdamW-LoRA vs
   Riemannion (whose adapters run at width 2r for the one-backward Riemannian gradient).
3. peak memory of a training run: fresh subprocesses per method (three each, alternating;
   medians); on CPU the peak resident set
   (``VmHWM``) during the training steps, reset after the model is loaded through
   ``/proc/self/clear_refs`` (Linux); on GPU ``torch.cuda.max_memory_allocated``.
4. ``init_loi`` (p=16, q=1: 4 backward passes) as a multiple of one training step.

    python benchmarks/riemannion_overhead.py            # CPU
    python benchmarks/riemannion_overhead.py --device cuda --rounds 20
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(rank: int, device: str, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    from riemannlora.bench.assets import load_causal_lm

    torch.manual_seed(seed)
    model, tok = load_causal_lm(MODEL)
    model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
    )
    return model.to(device), tok


def batches(tok, n: int, batch_size: int, device: str):
    from riemannlora.bench.tasks import Collator, load_task

    data = load_task("e2e", tok, "train", n=n * batch_size, max_length=96)
    collate = Collator.for_tokenizer(tok)
    return [
        {k: v.to(device) for k, v in collate(data[i : i + batch_size]).items()}
        for i in range(0, len(data), batch_size)
    ]


def make_optimizer(name: str, model, lr: float = 1e-4):
    import riemannlora as rl

    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True)
    if name == "adamw-default":  # torch's own kernel choice (CPU: the single-tensor loop)
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "adamw-fused":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    if name == "muon":
        return torch.optim.Muon(params, lr=lr, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    if name == "riemannion":
        return rl.Riemannion(model, lr=lr)
    raise ValueError(name)


def _median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def step_only(args) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """1. optimizer.step() alone, on fixed real gradients: medians and median per-round
    ratios."""
    out = {}
    setups = {}
    for name in ("adamw", "adamw-default", "adamw-fused", "muon", "riemannion"):
        model, tok = build(args.rank, args.device)
        opt = make_optimizer(name, model)
        batch = batches(tok, 1, args.batch_size, args.device)[0]
        model(**batch).loss.backward()
        trainable = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        setups[name] = (opt, trainable, [p.grad.clone() for p in trainable])
    times: dict[str, list[float]] = {k: [] for k in setups}
    for k in range(args.step_rounds + 1):
        for name, (opt, trainable, grads) in setups.items():
            torch._foreach_copy_([p.grad for p in trainable], grads)
            _sync(args.device)
            t0 = time.perf_counter()
            opt.step()
            _sync(args.device)
            if k:
                times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        out[name] = _median_ms(ts)
    # the median of the per-round ratios is steadier than the ratio of medians on a noisy
    # machine: both steps of a round see the same load
    per_round = {
        (a, b): statistics.median(x / y for x, y in zip(times[a], times[b]))
        for a, b in (
            ("riemannion", "adamw"),
            ("riemannion", "adamw-default"),
            ("riemannion", "muon"),
            ("riemannion", "adamw-fused"),
        )
    }
    print(
        "median per-round ratios: "
        + ", ".join(f"{a} / {b} = {v:.2f}x" for (a, b), v in per_round.items()),
        flush=True,
    )
    return out, per_round


def train_step(args) -> tuple[dict[str, float], float]:
    """2. whole training step on real batches; 4. LOI time."""
    import riemannlora as rl

    runs = {}
    for name in ("adamw", "riemannion"):
        model, tok = build(args.rank, args.device)
        data = batches(tok, args.rounds + 1, args.batch_size, args.device)
        runs[name] = (model, make_optimizer(name, model), data)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for k in range(args.rounds + 1):
        for name, (model, opt, data) in runs.items():
            _sync(args.device)
            t0 = time.perf_counter()
            loss = model(**data[k]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(args.device)
            if k:
                times[name].append(time.perf_counter() - t0)
    med = {name: _median_ms(ts) for name, ts in times.items()}
    # LOI on a fresh model, one fixed batch
    model, tok = build(args.rank, args.device, seed=1)
    batch = batches(tok, 1, args.batch_size, args.device)[0]
    _sync(args.device)
    t0 = time.perf_counter()
    rl.init_loi(model, lambda: model(**batch).loss, oversampling=16, power_iters=1)
    _sync(args.device)
    loi_ms = (time.perf_counter() - t0) * 1e3
    return med, loi_ms


def _peak_child(name: str, args, q) -> None:
    torch.set_num_threads(args.threads)
    model, tok = build(args.rank, args.device)
    data = batches(tok, 4, args.batch_size, args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
            f.write("5")
    opt = make_optimizer(name, model)
    for batch in data:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if args.device.startswith("cuda"):
        q.put(torch.cuda.max_memory_allocated() / 2**20)
    else:
        q.put(_vm_hwm_mib())


def _vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    return float("nan")


def peak_memory(args) -> dict[str, list[float]]:
    """3. peak memory of a short training run, one fresh process per method and run (the runs
    alternate between the methods; a single peak RSS varies by a few percent from process to
    process with the allocator's luck, so the medians are the statistic to read)."""
    ctx = mp.get_context("spawn")
    out: dict[str, list[float]] = {"adamw": [], "riemannion": []}
    for k in range(args.memory_runs):
        for name in ("adamw", "riemannion") if k % 2 == 0 else ("riemannion", "adamw"):
            q = ctx.Queue()
            p = ctx.Process(target=_peak_child, args=(name, args, q))
            p.start()
            out[name].append(q.get())
            p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=10, help="training steps timed per method")
    ap.add_argument(
        "--step-rounds",
        type=int,
        default=40,
        help="optimizer steps timed per method (interleaved; the per-round ratios are the "
        "statistic to read on a noisy machine)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument(
        "--memory-runs", type=int, default=3, help="fresh processes per method for the peak"
    )
    ap.add_argument("--step-only", action="store_true", help="only time optimizer.step()")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    step, per_round = step_only(args)
    print("| optimizer.step() | median (ms) | vs AdamW |\n|---|---|---|")
    for name, ms in step.items():
        print(f"| {name} | {ms:.1f} | {ms / step['adamw']:.2f}x |")
    adamw, muon = per_round[("riemannion", "adamw")], per_round[("riemannion", "muon")]
    print(
        f"\nRiemannion / AdamW = {adamw:.2f}x per round (target <= 2x; ratio of the medians "
        f"{step['riemannion'] / step['adamw']:.2f}x); Riemannion / per-factor Muon = "
        f"{muon:.2f}x per round (target <= 0.3x; ratio of the medians "
        f"{step['riemannion'] / step['muon']:.2f}x); Muon / AdamW = "
        f"{step['muon'] / step['adamw']:.2f}x; Riemannion / fused AdamW = "
        f"{step['riemannion'] / step['adamw-fused']:.2f}x\n",
        flush=True,
    )
    if args.step_only:
        return
    med, loi_ms = train_step(args)
    print("| training step (fwd+bwd+step) | median (ms) | vs AdamW-LoRA |\n|---|---|---|")
    for name, ms in med.items():
        print(f"| {name} | {ms:.0f} | {ms / med['adamw']:.3f}x |")
    print(
        f"\nwhole step Riemannion / AdamW-LoRA = {med['riemannion'] / med['adamw']:.3f}x "
        f"(target <= 1.10x); init_loi (p=16, q=1) = {loi_ms:.0f} ms = "
        f"{loi_ms / med['adamw']:.1f} AdamW training steps\n",
        flush=True,
    )
    if not args.skip_memory:
        runs = peak_memory(args)
        mem = {name: statistics.median(xs) for name, xs in runs.items()}
        what = "max allocated" if args.device.startswith("cuda") else "peak RSS while training"
        print(f"| peak memory ({what}) | median MiB | runs (MiB) | vs AdamW-LoRA |")
        print("|---|---|---|---|")
        for name, mib in mem.items():
            each = ", ".join(f"{x:.0f}" for x in runs[name])
            print(f"| {name} | {mib:.0f} | {each} | {mib / mem['adamw']:.3f}x |")
        print(
            f"\npeak memory Riemannion / AdamW-LoRA = {mem['riemannion'] / mem['adamw']:.3f}x "
            f"(medians of {args.memory_runs} runs each; target <= 1.05x)"
        )


if __name__ == "__main__":
    main()
