"""Worker for tests/test_deepspeed.py: real DeepSpeed (CPU accelerator, 1 gloo process).

Run as ``python tests/deepspeed_worker.py OUT_DIR PORT``; writes ``OUT_DIR/results.json``: per
scenario the error type and message (empty when nothing was raised) and whether any parameter
changed. DeepSpeed initializes torch.distributed, so it runs in its own process.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_bad_inputs import peft_net


def attempt(fn, *args) -> dict:
    try:
        fn(*args)
        return {"error": "", "type": ""}
    except Exception as exc:  # recorded for the test to judge
        return {"error": str(exc), "type": type(exc).__name__}


def main(out: str, port: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    import deepspeed

    import riemannlora as rl

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for name in ("ScaledAdamW", "Riemannion", "RiemannianSGD"):
        # ZeRO-2 wraps our optimizer and swaps its parameters for flat partitions
        model = peft_net()
        opt = getattr(rl, name)(model, lr=1e-3)
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": {"stage": 2},
            "zero_allow_untested_optimizer": True,
        }
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        before = [p.detach().clone() for p in engine.module.parameters()]

        def step(engine):
            loss = engine(torch.randn(2, 8)).square().sum()
            engine.backward(loss)
            engine.step()

        r = attempt(step, engine)
        r["changed"] = any(
            not torch.equal(a, b) for a, b in zip(before, engine.module.parameters())
        )
        results[f"zero2-{name}"] = r

    # ZeRO-3 partitions the model's parameters: the engine or its module given to us
    model = peft_net()
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    for name in ("ScaledAdamW", "Riemannion"):
        make = getattr(rl, name)
        results[f"zero3-engine-{name}"] = attempt(make, engine, 1e-3)
        results[f"zero3-module-{name}"] = attempt(make, engine.module, 1e-3)
    results["zero3-init_loi"] = attempt(
        lambda: rl.init_loi(engine.module, lambda: engine(torch.randn(2, 8)).sum())
    )
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
