"""The head's AdamW lr under the manifold optimizers (the measurement behind RiemannianSGD's
``adamw_lr`` default): all-MiniLM-L6-v2 + a new 150-way head, LoRA r=8 on query/key/value/dense,
CLINC150 training queries (90 steps of batch 8), validation loss and accuracy on the first 256
validation queries, for each optimizer lr and head lr (``=lr``: the head at the optimizer's lr).

    python benchmarks/head_lr.py            # about 4 minutes on one CPU thread
"""

from __future__ import annotations

import time

import torch
from peft import LoraConfig, TaskType, get_peft_model

import riemannlora as rl
from riemannlora.bench.assets import MINILM_ID, load_sequence_classifier
from riemannlora.bench.tasks import Collator, load_task

STEPS, BATCH = 90, 8
GRID = (("RiemannianSGD", (0.1, 0.3)), ("Riemannion", (3e-3,)))
HEADS = (None, 1e-3, 3e-3, 1e-2, 3e-2)


def main() -> None:
    torch.set_num_threads(1)
    _, tok = load_sequence_classifier(MINILM_ID, num_labels=150)
    train = load_task("clinc150", tok, "train", n=BATCH * STEPS, max_length=48)
    collate = Collator.for_tokenizer(tok)
    val = collate(load_task("clinc150", tok, "validation", n=256, max_length=48))
    batches = [collate(train[i : i + BATCH]) for i in range(0, len(train), BATCH)]
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16,
        target_modules=["query", "key", "value", "dense"],
    )  # fmt: skip

    def run(name: str, lr: float, head: float | None) -> tuple[float, float]:
        torch.manual_seed(0)
        model = get_peft_model(load_sequence_classifier(MINILM_ID, num_labels=150)[0], config)
        kw = {} if head is None else {"adamw_lr": head}
        opt = getattr(rl, name)(
            model, lr=lr, momentum=0.9, generator=torch.Generator().manual_seed(0), **kw
        )
        if head is None:  # the head at the optimizer's own lr (the old default of both)
            for group in opt.param_groups:
                if not group["manifold"]:
                    group["lr"] = lr
        for batch in batches:
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            out = model(**val)
        return out.loss.item(), (out.logits.argmax(-1) == val["labels"]).float().mean().item()

    for name, lrs in GRID:
        for lr in lrs:
            for head in HEADS:
                t = time.time()
                loss, acc = run(name, lr, head)
                label = "=lr" if head is None else f"{head:g}"
                print(f"{name} lr={lr:g} head={label}: val loss {loss:.4f} acc {acc:.4f} "
                      f"({time.time() - t:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
