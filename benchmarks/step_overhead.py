"""Time ``optimizer.step()`` of LoRA optimizers side by side, interleaved in one process.

SmolLM2-135M-Instruct (real weights) with LoRA r=8 on every linear layer (210 pairs), real
gradients from one forward/backward on a real batch: the first 8 training examples of the E2E
NLG Challenge (task ``e2e`` of ``riemannlora.bench.tasks``; loss on the completions). Each round
times every optimizer for ``--steps`` consecutive steps (gradients restored before each step,
outside the timer, because PEFT's wrapper overwrites ``.grad``); the medians over rounds are
compared. Also reports the bytes of optimizer state.

    python benchmarks/step_overhead.py                 # CPU, float32
    python benchmarks/step_overhead.py --device cuda --rounds 50
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for st in opt.state.values()
        for v in st.values()
        if isinstance(v, torch.Tensor)
    )


def build_model(model_id: str, rank: int, device: str, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model

    from riemannlora.bench.assets import load_causal_lm

    model, tok = load_causal_lm(model_id, dtype=dtype)
    model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
    ).to(device)
    # a real batch: E2E restaurant descriptions after their meaning representations
    from riemannlora.bench.tasks import Collator, load_task

    rows = load_task("e2e", tok, "train", n=8, max_length=96)
    batch = {k: v.to(device) for k, v in Collator.for_tokenizer(tok)(rows).items()}
    model(**batch).loss.backward()
    # move B away from its zero init so every Gram is a generic SPD matrix
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-3)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per optimizer per round")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from peft.optimizers import create_riemannian_optimizer

    import riemannlora as rl

    dtype = getattr(torch, args.dtype)
    model = build_model(args.model, args.rank, args.device, dtype)
    pairs = rl.find_lora_pairs(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad.detach().clone() for p in trainable]
    print(
        f"{args.model}: {len(pairs)} LoRA pairs (r={args.rank}), "
        f"{sum(p.numel() for p in trainable):,} trainable parameters, {args.device}, {args.dtype}"
    )
    lr = 1e-4
    opts = {
        "torch AdamW (foreach)": torch.optim.AdamW(
            trainable, lr=lr, weight_decay=0.0, foreach=True
        ),
        "torch AdamW (fused)": torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0, fused=True),
        "PEFT riemannian(AdamW)": create_riemannian_optimizer(
            model, torch.optim.AdamW, lr=lr, weight_decay=0.0, foreach=True
        ),
        "PEFT riemannian(AdamW fused)": create_riemannian_optimizer(
            model, torch.optim.AdamW, lr=lr, weight_decay=0.0, fused=True
        ),
        # defaults: torch's fused kernel for the LoRA factors
        "riemannlora ScaledAdamW": rl.ScaledAdamW(model, lr=lr),
        "riemannlora ScaledAdamW (foreach)": rl.ScaledAdamW(model, lr=lr, foreach=True),
        "torch SGD (foreach)": torch.optim.SGD(trainable, lr=lr, foreach=True),
        "riemannlora ScaledSGD": rl.ScaledSGD(model, lr=lr, foreach=True),
    }
    times: dict[str, list[float]] = {k: [] for k in opts}
    for k in range(args.rounds + 1):  # round 0 is warm-up
        for name, opt in opts.items():
            elapsed = 0.0
            for _ in range(args.steps):
                torch._foreach_copy_([p.grad for p in trainable], grads)
                _sync(args.device)
                t0 = time.perf_counter()
                opt.step()
                _sync(args.device)
                elapsed += time.perf_counter() - t0
            if k > 0:
                times[name].append(elapsed / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = {"Adam": med["torch AdamW (foreach)"], "SGD": med["torch SGD (foreach)"]}
    peft_t = med["PEFT riemannian(AdamW)"]
    print(
        "\n| optimizer | step median (ms) | IQR (ms) | vs torch baseline | state (MiB) |\n"
        "|---|---|---|---|---|"
    )
    for name, v in times.items():
        q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0], v[0], v[0]]
        ref = base["SGD"] if "SGD" in name else base["Adam"]
        print(
            f"| {name} | {med[name] * 1e3:.2f} | {(q[2] - q[0]) * 1e3:.2f} | "
            f"{med[name] / ref:.2f}x | {state_bytes(opts[name]) / 2**20:.2f} |"
        )

    def per_round(a: str, b: str) -> float:  # steadier under load than a ratio of medians
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    print(
        "\nmedian per-round ratios: ScaledAdamW / torch AdamW (foreach) = "
        f"{per_round('riemannlora ScaledAdamW', 'torch AdamW (foreach)'):.2f}x; "
        "PEFT wrapper / ScaledAdamW = "
        f"{per_round('PEFT riemannian(AdamW)', 'riemannlora ScaledAdamW'):.2f}x; "
        "ScaledAdamW / torch AdamW (fused) = "
        f"{per_round('riemannlora ScaledAdamW', 'torch AdamW (fused)'):.2f}x"
    )
    ours = med["riemannlora ScaledAdamW"]
    print(
        f"\nScaledAdamW / torch AdamW (foreach) = {ours / base['Adam']:.2f}x (target <= 1.2x); "
        f"PEFT wrapper / ScaledAdamW = {peft_t / ours:.2f}x (target >= 2.5x); "
        f"ScaledSGD / torch SGD = {med['riemannlora ScaledSGD'] / base['SGD']:.2f}x\n"
        f"Same kernel on both sides: ScaledAdamW / torch AdamW (fused) = "
        f"{ours / med['torch AdamW (fused)']:.2f}x; ScaledAdamW (foreach) / torch AdamW "
        f"(foreach) = {med['riemannlora ScaledAdamW (foreach)'] / base['Adam']:.2f}x; "
        f"PEFT wrapper (fused) / ScaledAdamW = {med['PEFT riemannian(AdamW fused)'] / ours:.2f}x"
    )


if __name__ == "__main__":
    main()
