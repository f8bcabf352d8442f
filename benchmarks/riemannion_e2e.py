"""Riemannion, Riemannion + LOI and Riemannian SGD on a real LLM and a real task.

SmolLM2-135M-Instruct (real weights), PEFT LoRA r=8 (alpha 16) on every linear layer, the E2E
NLG Challenge (task ``e2e`` of ``riemannlora.bench.tasks``: trained on the challenge's dev set;
loss on the completion tokens only). Every method sees the same batches in the same order from
the same seed. The held-out loss on the first ``--eval-n`` validation examples (dev meaning
representations held out of training) is printed every ``--eval-every`` steps.

    python benchmarks/riemannion_e2e.py --steps 100
"""

from __future__ import annotations

import argparse
import json
import time

import torch

METHODS = {
    # name: (optimizer, lr)
    "adamw": ("adamw", 3e-4),
    "riemannion": ("riemannion", 1e-3),
    "riemannion-loi": ("riemannion", 1e-3),
    "riemannian-sgd": ("riemannian-sgd", 0.3),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-n", type=int, default=48)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the curves to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model

    import riemannlora as rl
    from riemannlora.bench.assets import load_causal_lm
    from riemannlora.bench.tasks import Collator, load_task

    _, tok = load_causal_lm("HuggingFaceTB/SmolLM2-135M-Instruct")
    collate = Collator.for_tokenizer(tok)
    train = load_task("e2e", tok, "train", n=args.steps * args.batch_size, max_length=96)
    bs = args.batch_size
    batches = [collate(train[i : i + bs]) for i in range(0, len(train), bs)]
    held_out = load_task("e2e", tok, "validation", n=args.eval_n, max_length=96)
    eval_batches = [collate(held_out[i : i + 16]) for i in range(0, len(held_out), 16)]

    def eval_loss(model) -> float:
        model.eval()
        with torch.no_grad():
            total = sum(model(**b).loss.item() * len(b["input_ids"]) for b in eval_batches)
        model.train()
        return total / len(held_out)

    results = {}
    print(
        "| method | lr | "
        + " | ".join(f"step {s}" for s in range(0, args.steps + 1, args.eval_every))
        + " | s/step |"
    )
    print("|---|---|" + "---|" * (args.steps // args.eval_every + 2))
    for name in args.methods.split(","):
        kind, lr = METHODS[name]
        torch.manual_seed(0)
        model, _ = load_causal_lm("HuggingFaceTB/SmolLM2-135M-Instruct")
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        if name == "riemannion-loi":
            first = batches[0]
            rl.init_loi(model, lambda m=model, b=first: m(**b).loss)
        if kind == "adamw":
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        elif kind == "riemannion":
            opt = rl.Riemannion(model, lr=lr)
        else:
            opt = rl.RiemannianSGD(model, lr=lr)
        curve = [eval_loss(model)]
        t0 = time.perf_counter()
        model.train()
        for step, batch in enumerate(batches, 1):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % args.eval_every == 0:
                curve.append(eval_loss(model))
        per_step = (time.perf_counter() - t0) / len(batches)
        results[name] = {"lr": lr, "eval_loss": curve, "seconds_per_step": per_step}
        print(
            f"| {name} | {lr:g} | "
            + " | ".join(f"{x:.4f}" for x in curve)
            + f" | {per_step:.2f} |",
            flush=True,
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
