"""RiemannTrainer under 2 processes (torchrun; Trainer's Accelerate in MULTI_CPU mode over gloo):
the ranks stay in sync and train as one process on the global batch, with the Riemannian
clipping, and the adapter comes out standard (tests/trainer_worker.py)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

import riemannlora as rl
from test_readme import free_port
from test_trainer import tiny_llama
from trainer_worker import make_trainer, peft_llama_without_dropout

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WORKER = pathlib.Path(__file__).with_name("trainer_worker.py")


def deltas(params: dict) -> dict:
    """``lora_B @ lora_A`` per LoRA layer (the trained function: the factors' gauge may differ at
    rounding level) and every other trainable parameter."""
    out = {k: v for k, v in params.items() if "lora_" not in k}
    for k, a in params.items():
        if "lora_A" in k:
            out[k.replace("lora_A", "delta")] = params[k.replace("lora_A", "lora_B")] @ a
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer2")
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    for _ in range(3):  # another process may take the free port before torchrun binds it
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
        cmd += ["--master_addr=127.0.0.1", f"--master_port={free_port()}", str(WORKER), str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if "address already in use" not in proc.stderr.lower():
            break
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out, [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_two_processes_stay_in_sync_and_equal_one_process_on_the_global_batch(run, tmp_path):
    _, ranks = run
    assert [r["distributed"] for r in ranks] == ["DistributedType.MULTI_CPU"] * 2
    assert all(r["world"] == 2 and r["optimizer"] == "Riemannion" for r in ranks)
    a, b = ranks[0]["params"], ranks[1]["params"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise in sync

    # one process, per-device batch 4 = the global batch of 2 x 2 (Accelerate's batch sharding)
    trainer = make_trainer(str(tmp_path), per_device_batch=4)
    trainer.train()
    single = {n: p.detach() for n, p in trainer.model.named_parameters()}
    got, want = deltas(a), deltas(single)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    single_norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    torch.testing.assert_close(
        torch.tensor(ranks[0]["grad_norms"]), torch.tensor(single_norms), rtol=1e-4, atol=0
    )


def test_the_adapter_saved_under_two_processes_is_standard(run):
    """Vanilla PEFT loads it onto the base model and computes the trained model's outputs; read
    back into manifold form it is rank 0's trained factors bit for bit."""
    out, ranks = run
    restored = peft_llama_without_dropout()
    rl.load_exported_adapter(restored, str(out / "adapter"))
    mine = dict(restored.named_parameters())
    for k, v in ranks[0]["params"].items():
        if "lora_" in k:
            assert torch.equal(mine[k], v), k
    loaded = PeftModel.from_pretrained(tiny_llama(), str(out / "adapter")).eval()
    ids = torch.arange(32).reshape(2, 16) % 64
    with torch.no_grad():
        want = restored.eval()(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        base = tiny_llama().eval()(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-4  # and it holds the training
