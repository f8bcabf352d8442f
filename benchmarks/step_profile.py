"""Where Riemannion's step spends its time: the step's internal functions wrapped with timers.

SmolLM2-135M-Instruct, LoRA r = 8 on every linear layer, one real E2E batch; the gradients are
restored and a 96 MB buffer written before every step (cold cache, as after a backward pass).
Prints the mean step time and each function's share (nested functions are counted inside
their callers too).

    python benchmarks/step_profile.py --steps 20 --threads 1
"""

from __future__ import annotations

import argparse
import collections
import functools
import time

import torch

from riemannion_overhead import batches, build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import riemannlora as rl
    import riemannlora.core.geometry as geometry
    import riemannlora.core.manifold_step as core_step
    import riemannlora.optim.riemannion as riemannion

    spent: dict[str, float] = collections.defaultdict(float)

    def wrap(owner, name):
        f = getattr(owner, name)

        @functools.wraps(f)
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t0

        setattr(owner, name, timed)

    for name in ("_plan", "_stack_group", "_cached_grouping", "_structured_group"):
        wrap(riemannion._ManifoldOptimizer, name)
    wrap(riemannion, "structured_step")
    for name in ("retract_qr_", "msign_tangent_qr", "tangent_qr_parts_"):
        wrap(core_step, name)
    for name in ("retraction_core", "_cholesky_qr"):
        wrap(geometry, name)
    model, tok = build(8, "cpu")
    opt = rl.Riemannion(model, lr=1e-4)
    model(**batches(tok, 1, 8, "cpu")[0]).loss.backward()
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    grads = [p.grad.clone() for p in params]
    flush = torch.empty(96 * 2**20 // 4)
    for _ in range(3):
        torch._foreach_copy_([p.grad for p in params], grads)
        opt.step()
    spent.clear()
    total = 0.0
    for _ in range(args.steps):
        torch._foreach_copy_([p.grad for p in params], grads)
        flush.fill_(1.0)
        t0 = time.perf_counter()
        opt.step()
        total += time.perf_counter() - t0
    print(f"step {total / args.steps * 1e3:.1f} ms")
    for name, t in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {name:20} {t / args.steps * 1e3:6.2f} ms  {100 * t / total:4.0f} %")


if __name__ == "__main__":
    main()
