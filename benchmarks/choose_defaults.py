"""Evidence for the defaults of ``reg`` and ``scale_aware`` (ScaledAdamW and ScaledSGD).

Real model, real data: all-MiniLM-L6-v2 with PEFT LoRA (r=8, alpha=16 -> s=2) on
query/key/value/dense, CLINC150 intent classification (150 intents; task ``clinc150`` of
``riemannlora.bench.tasks``). Every configuration sees the same batches from the same init; the
held-out loss on the first 256 validation queries after ``--steps`` steps is reported (mean
over seeds).

    python benchmarks/choose_defaults.py --steps 60 --seeds 0 1
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--regs", type=float, nargs="+", default=[0.0, 1e-6, 1e-4, 1e-2, 1.0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--grid",
        nargs="+",
        default=["ScaledAdamW:1e-3", "ScaledAdamW:3e-3", "ScaledSGD:0.1", "ScaledSGD:0.3"],
        help="optimizer:lr pairs",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from peft import LoraConfig, TaskType, get_peft_model

    import riemannlora as rl
    from riemannlora.bench.assets import load_sequence_classifier
    from riemannlora.bench.tasks import Collator, load_task, task_data

    name = "sentence-transformers/all-MiniLM-L6-v2"
    num_labels = len(task_data("clinc150").labels)
    _, tok = load_sequence_classifier(name, num_labels=num_labels)
    collate = Collator.for_tokenizer(tok)
    train = load_task("clinc150", tok, "train", n=args.batch * args.steps, max_length=64)
    batches = [collate(train[i : i + args.batch]) for i in range(0, len(train), args.batch)]
    held_out = collate(load_task("clinc150", tok, "validation", n=256, max_length=64))

    def run(opt_name: str, lr: float, reg: float, aware: bool, seed: int) -> float:
        torch.manual_seed(seed)
        model, _ = load_sequence_classifier(name, num_labels=num_labels)
        cfg = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=8,
            lora_alpha=16,
            target_modules=["query", "key", "value", "dense"],
        )
        model = get_peft_model(model, cfg)
        cls = rl.ScaledAdamW if opt_name == "ScaledAdamW" else rl.ScaledSGD
        opt = cls(model, lr=lr, reg=reg, scale_aware=aware)
        model.train()
        for batch in batches:
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            return model(**held_out).loss.item()

    print("| optimizer | lr | scale_aware | " + " | ".join(f"reg={r:g}" for r in args.regs) + " |")
    print("|---|---|---|" + "---|" * len(args.regs))
    grid = [(g.split(":")[0], float(g.split(":")[1])) for g in args.grid]
    for (opt_name, lr), aware in itertools.product(grid, [True, False]):
        cells = []
        for reg in args.regs:
            vals = [run(opt_name, lr, reg, aware, s) for s in args.seeds]
            cells.append(f"{statistics.mean(vals):.4f}")
        print(f"| {opt_name} | {lr:g} | {aware} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
