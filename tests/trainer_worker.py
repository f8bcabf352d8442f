"""Worker for tests/test_trainer_distributed.py: RiemannTrainer on 2 CPU processes.

Launched by ``torchrun --nproc_per_node=2`` with ``OUT_DIR`` as its argument; Trainer's
Accelerate then runs ``MULTI_CPU`` data parallelism on gloo (DDP). Each rank saves its trainable
parameters, the logged grad norms and the adapter (rank 0) under ``OUT_DIR``.
"""

from __future__ import annotations

import os
import sys

import torch
from transformers import default_data_collator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import riemannlora as rl
from riemannlora.integrations.trainer import RiemannTrainer
from test_trainer import LORA, tiny_llama, token_data, training_args


def peft_llama_without_dropout():
    """The tiny LoRA llama without LoRA dropout (dropout masks differ between processes)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_llama(), LoraConfig(**{**LORA, "lora_dropout": 0.0}))


def make_trainer(out: str, per_device_batch: int) -> RiemannTrainer:
    """The run of the test: Riemannion (momentum 0.9), 4 steps, a checkpoint every 2."""
    return RiemannTrainer(
        model=peft_llama_without_dropout(),
        args=training_args(
            out, per_device_train_batch_size=per_device_batch, max_steps=4, save_steps=2
        ),
        train_dataset=token_data(),
        data_collator=default_data_collator,
        optimizer_factory=lambda m: rl.Riemannion(m, lr=1e-2, momentum=0.9),
    )


def main(out: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    trainer = make_trainer(out, per_device_batch=2)
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    inner = trainer.optimizer.optimizer
    torch.save(
        {
            "distributed": str(trainer.accelerator.distributed_type),
            "world": trainer.accelerator.num_processes,
            "optimizer": type(inner).__name__,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "grad_norms": [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h],
        },
        os.path.join(out, f"rank{rank}.pt"),
    )
    trainer.save_model(os.path.join(out, "adapter"))


if __name__ == "__main__":
    main(sys.argv[1])
