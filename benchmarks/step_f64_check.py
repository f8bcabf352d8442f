"""Riemannion's step at two revisions in float64, and against the literal formulas.

all-MiniLM-L6-v2 with LoRA r = 8 on its attention and MLP layers (36 layers), 18 short
sentences, lr 0.01, weight decay 0.01. Two checks:

1. ``--steps`` steps of each variant (Riemannion, Nesterov, Nesterov + stored orthogonalized
   momentum, no momentum, Riemannian SGD) at two revisions from the same start: the largest
   relative difference of the effective deltas X = U V^T;
2. per step, each revision's new point against the literal float64 step
   (``manifold_step(..., structured=False)``) computed from that revision's own state.

    python benchmarks/step_f64_check.py 2ef57b6 HEAD     # run from the repository root
"""

from __future__ import annotations

import argparse
import copy
import importlib
import pathlib
import sys
import tempfile

import torch

from step_ab import extract

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
TEXTS = ["this is great", "i hate it", "not bad at all", "meh, whatever", "lovely day", "awful"]


def setup():
    from peft import LoraConfig, get_peft_model

    from riemannlora.bench.assets import load_sequence_classifier

    torch.manual_seed(0)
    model, tok = load_sequence_classifier(MODEL, num_labels=4)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    batch = tok(TEXTS * 3, return_tensors="pt", padding=True)
    labels = torch.tensor([0, 1, 2, 3, 0, 1] * 3)
    return model.double(), batch, labels


def make(pkg, model, variant):
    g = torch.Generator().manual_seed(0)
    if variant == "sgd":
        return pkg.RiemannianSGD(model, lr=0.05, generator=g)
    return pkg.Riemannion(model, lr=0.01, weight_decay=0.01, generator=g, **variant)


def momentum_pair(opt, layer):
    left, right = opt.state[layer.b].get("momentum_left"), opt.state[layer.a].get("momentum_right")
    if left is None:
        return None, None
    core = opt.state[layer.b].get("momentum_core")
    return (left if core is None else left @ core), right


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("revs", nargs=2, help="git revisions, or WORKTREE for the working tree")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--literal-steps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(2)
    tmp = pathlib.Path(tempfile.mkdtemp())
    sys.path.insert(0, str(tmp))
    pkgs = []
    for i, rev in enumerate(args.revs):
        extract(rev, f"c{i}", tmp)
        pkgs.append(importlib.import_module(f"riemannlora_c{i}"))
    model, batch, labels = setup()

    def loss(m):
        return torch.nn.functional.cross_entropy(m(**batch).logits, labels)

    variants = [{}, {"nesterov": True}, {"nesterov": True, "store_orthogonalized": True}]
    variants += [{"momentum": 0.0}, "sgd"]
    print(f"1. {args.revs[0]} vs {args.revs[1]}, {args.steps} steps, max relative difference of X")
    for variant in variants:
        points = []
        for pkg in pkgs:
            m = copy.deepcopy(model)
            opt = make(pkg, m, variant)
            for _ in range(args.steps):
                opt.zero_grad()
                loss(m).backward()
                opt.step()
            points.append([x.point().detach() for x in pkg.manifold.manifold_layers(m)])
        rel = max(((a - b).norm() / a.norm()).item() for a, b in zip(*points))
        print(f"   {variant!s:55} {len(points[0])} layers  {rel:.1e}", flush=True)
    print("2. default Riemannion vs the literal float64 step from its own state, per step")
    for rev, pkg in zip(args.revs, pkgs):
        m = copy.deepcopy(model)
        opt = make(pkg, m, {})
        layers = pkg.manifold.manifold_layers(m)
        errs = []
        for _ in range(args.literal_steps):
            opt.zero_grad()
            loss(m).backward()
            before = {
                x.name: [
                    t if t is None else t.detach().clone()
                    for t in (x.U(), x.V(), x.Q(), x.GQ(), x.GtU(), *momentum_pair(opt, x))
                ]
                for x in layers
            }
            opt.step()
            err = 0.0
            for x in layers:
                U, V, *_ = pkg.optim.riemannion.manifold_step(
                    *before[x.name], lr=0.01, weight_decay=0.01, momentum=0.9, dampening=0.0,
                    nesterov=False, orthogonalize=True, structured=False,
                )  # fmt: skip
                X = U @ V.mT
                err = max(err, ((x.point().detach() - X).norm() / X.norm()).item())
            errs.append(err)
        print(f"   {rev:10} " + " ".join(f"{e:.0e}" for e in errs), flush=True)


if __name__ == "__main__":
    main()
