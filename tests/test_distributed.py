"""DDP and FSDP2 on 2 CPU processes (gloo) give the single-process result (tests/dist_worker.py)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed

WORKER = pathlib.Path(__file__).with_name("dist_worker.py")
OPTIMIZERS = ["ScaledSGD", "ScaledAdamW", "ScaledAdamW-foreach-amsgrad"]
TOL = 1e-12  # float64: the only differences are summation orders (all-reduced grads and Grams)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """One launch of 2 processes runs every scenario (start-up dominates the cost)."""
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out)], capture_output=True, text=True, timeout=600
    )
    errors = "".join(p.read_text() for p in sorted(out.glob("error-*.txt")))
    assert proc.returncode == 0, errors or proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_ddp_matches_single_process_on_the_global_batch(results, name):
    r = results[f"ddp-{name}"]
    assert r["dev"] < TOL
    assert r["agree"]  # every replica holds the same weights


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp2_sharded_factors_match_single_process(results, name):
    r = results[f"fsdp-{name}"]
    assert r["param_types"] == ["DTensor"]  # really sharded, with uneven and empty shards
    assert r["dev"] < TOL


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp2_step_batches_its_collectives(results, name):
    # one all-gather (A and G_A rows of every pair), one all-reduce (B Grams of every pair),
    # one all-reduce (the non-finite verdict) per step, whatever the number of layers
    assert results[f"fsdp-{name}"]["collectives"] == {"all_gather_into_tensor": 1, "all_reduce": 2}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp2_resume_through_distributed_checkpoint_state_dicts(results, name):
    assert results[f"fsdp-resume-{name}"]["dev"] < TOL


@pytest.mark.parametrize("variant", ["", "-lora-only"])
def test_fsdp2_nonfinite_shard_on_one_rank_skips_the_step_everywhere(results, variant):
    r = results[f"fsdp-nonfinite-skip{variant}"]
    assert r["skipped"] == [1, 1]  # on every rank
    assert r["dev"] < TOL  # equals training without the poisoned batch
