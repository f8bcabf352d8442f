"""Where Riemannion's step spends its time: ``cProfile`` over the optimizer's steps.

SmolLM2-135M-Instruct, LoRA r = 8 on every linear layer, one real E2E batch; the gradients are
restored and a 96 MB buffer written before every step (cold cache, as after a backward pass).
Prints the mean step time and the cumulative time of riemannlora's functions per step (nested
functions are counted inside their callers too; the profiler's own overhead inflates short
functions).

    python benchmarks/step_profile.py --steps 20 --threads 1
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from riemannion_overhead import batches, build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=20, help="functions to list")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import riemannlora as rl

    model, tok = build(8, "cpu")
    opt = rl.Riemannion(model, lr=1e-4)
    model(**batches(tok, 1, 8, "cpu")[0]).loss.backward()
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    grads = [p.grad.clone() for p in params]
    flush = torch.empty(96 * 2**20 // 4)
    for _ in range(3):
        torch._foreach_copy_([p.grad for p in params], grads)
        opt.step()
    total = 0.0
    profile = cProfile.Profile()
    for _ in range(args.steps):
        torch._foreach_copy_([p.grad for p in params], grads)
        flush.fill_(1.0)
        t0 = time.perf_counter()
        profile.enable()
        opt.step()
        profile.disable()
        total += time.perf_counter() - t0
    print(f"step {total / args.steps * 1e3:.1f} ms (profiled)")
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    rows = [
        (ct, f"{pathlib_name(file)}:{name}")
        for (file, _, name), (_, _, _, ct, _) in stats.items()
        if "riemannlora" in file
    ]
    for ct, name in sorted(rows, reverse=True)[: args.top]:
        print(f"  {name:45} {ct / args.steps * 1e3:7.2f} ms  {100 * ct / total:4.0f} %")


def pathlib_name(file: str) -> str:
    """``core/manifold_step.py`` from a full path."""
    return file.split("riemannlora/", 1)[-1]


if __name__ == "__main__":
    main()
