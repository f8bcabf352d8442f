"""Riemannion's step at two (or more) revisions of this repository, side by side in one process.

Each revision's ``src/riemannlora`` is extracted with ``git archive`` into a temporary folder as
a package of its own (``riemannlora_<tag>``, imports rewritten), so the versions run in the
same process on twin models (SmolLM2-135M-Instruct, LoRA r = 8 on every linear layer, real
E2E NLG gradients), interleaved in a random order every round, with torch AdamW (foreach) on
another twin. Before every step a 96 MB buffer is written, so each step starts on a cold cache
as it does after a backward pass. Prints the median step time of each and the median of the
per-round ratios against the first revision (the statistic to read on a noisy machine).

    python benchmarks/step_ab.py HEAD~1 HEAD            # run from the repository root
    python benchmarks/step_ab.py c048f24 WORKTREE --rounds 60
"""

from __future__ import annotations

import argparse
import importlib
import io
import pathlib
import random
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import torch

from riemannion_overhead import batches, build

ROOT = pathlib.Path(__file__).resolve().parent.parent


def extract(rev: str, tag: str, dest: pathlib.Path) -> None:
    """``src/riemannlora`` at ``rev`` (``WORKTREE``: the working tree) as ``dest/riemannlora_<tag>``."""
    pkg = dest / f"riemannlora_{tag}"
    pkg.mkdir(parents=True)
    if rev == "WORKTREE":
        files = {p.relative_to(ROOT / "src" / "riemannlora"): p.read_bytes()
                 for p in (ROOT / "src" / "riemannlora").rglob("*.py")}  # fmt: skip
    else:
        tar = subprocess.run(
            ["git", "-C", str(ROOT), "archive", rev, "src/riemannlora"],
            check=True,
            capture_output=True,
        ).stdout
        files = {}
        with tarfile.open(fileobj=io.BytesIO(tar)) as t:
            for m in t.getmembers():
                if m.isfile() and m.name.endswith(".py"):
                    f = t.extractfile(m)
                    assert f is not None
                    files[pathlib.Path(m.name).relative_to("src/riemannlora")] = f.read()
    for rel, data in files.items():
        text = re.sub(r"\briemannlora\b", f"riemannlora_{tag}", data.decode())
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("revs", nargs="+", help="git revisions, or WORKTREE for the working tree")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    flush = torch.empty(96 * 2**20 // 4)
    tmp = pathlib.Path(tempfile.mkdtemp())
    sys.path.insert(0, str(tmp))
    setups = {}
    for i, rev in enumerate(args.revs):
        tag = f"v{i}"
        extract(rev, tag, tmp)
        pkg = importlib.import_module(f"riemannlora_{tag}")
        model, tok = build(8, "cpu")
        setups[f"{rev} ({tag})"] = (pkg.Riemannion(model, lr=1e-4), model, tok)
    model, tok = build(8, "cpu")
    setups["torch AdamW"] = (torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True), model, tok)  # fmt: skip
    runs = {}
    for name, (opt, model, tok) in setups.items():
        model(**batches(tok, 1, 8, "cpu")[0]).loss.backward()
        trainable = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        runs[name] = (opt, trainable, [p.grad.clone() for p in trainable])
    times: dict[str, list[float]] = {name: [] for name in runs}
    rng = random.Random(0)
    for k in range(args.rounds + 2):
        order = list(runs.items())
        rng.shuffle(order)
        for name, (opt, trainable, grads) in order:
            torch._foreach_copy_([p.grad for p in trainable], grads)
            flush.add_(1.0)
            t0 = time.perf_counter()
            opt.step()
            if k >= 2:  # the first steps build buffers
                times[name].append(time.perf_counter() - t0)
    first = next(iter(times))
    print(f"| step | median (ms) | per-round ratio to {first} |\n|---|---|---|")
    for name, ts in times.items():
        ratio = statistics.median(a / b for a, b in zip(ts, times[first]))
        print(f"| {name} | {statistics.median(ts) * 1e3:.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
