"""Why Riemannion's step stores its tall buffers transposed: thin batched products by layout.

The step's products multiply stacks of tall ``(rows, r)`` factors (r = 8) with small r x r
matrices or reduce two of them to r x r. This times each product with the tall operands stored
row-major ``(L, rows, r)`` and transposed ``(L, r, rows)`` contiguous, next to a plain copy of
the same data, on one thread (median of ``--repeats``).

    python benchmarks/thin_products.py                 # L = 60, rows = 1536, r = 8
    python benchmarks/thin_products.py --rows 576
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _median_us(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--rows", type=int, default=1536)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    L, m, r = args.layers, args.rows, args.rank
    X, Y = torch.randn(L, m, r), torch.randn(L, m, r)  # row-major tall
    Xt, Yt = X.mT.contiguous(), Y.mT.contiguous()  # transposed ("wide")
    K = torch.randn(L, r, r)
    rows = {
        "X^T Y (r x r)": (lambda: X.mT @ Y, lambda: Xt @ Yt.mT),
        "X K (tall result)": (lambda: X @ K, lambda: K.mT @ Xt),
    }
    print(f"L={L} rows={m} r={r}, {args.threads} thread(s), median of {args.repeats} (us)\n")
    print("| product | row-major (rows, r) | transposed (r, rows) | speed-up |\n|---|---|---|---|")
    for name, (slow, fast) in rows.items():
        a, b = _median_us(slow, args.repeats), _median_us(fast, args.repeats)
        print(f"| {name} | {a:.0f} | {b:.0f} | {a / b:.2f}x |")
    copy = _median_us(lambda: Xt.clone(), args.repeats)
    print(f"\ncopy of the same {X.numel() * 4 / 2**20:.1f} MiB: {copy:.0f} us")


if __name__ == "__main__":
    main()
