"""DDP and FSDP2 on 2 CPU processes (gloo) give the single-process result (tests/dist_worker.py):
the scaled optimizers and the manifold ones (Riemannion, RiemannianSGD)."""

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


# ------------------------------------------------------------- Riemannion / RiemannianSGD
MANIFOLD = [
    "Riemannion",
    "Riemannion-nesterov-orth-scaled",
    "RiemannianSGD",
    "RiemannianSGD-no-momentum",
]


@pytest.mark.parametrize("name", MANIFOLD)
def test_ddp_manifold_optimizers_match_single_process(results, name):
    r = results[f"ddp-{name}"]
    assert r["dev"] < TOL
    assert r["agree"]


@pytest.mark.parametrize("name", MANIFOLD)
def test_fsdp2_manifold_optimizers_on_sharded_factors_match_single_process(results, name):
    r = results[f"fsdp-{name}"]
    assert r["param_types"] == ["DTensor"]  # uneven shards, an empty one, a literal-path layer
    # the momentum is kept sharded like lora_B (left factors) and replicated (right factors)
    assert r["momentum_types"] == ([] if name.endswith("no-momentum") else ["DTensor"])
    assert r["dev"] < TOL  # every parameter, not only X = U V^T: the same gauge too
    assert r["agree"]


@pytest.mark.parametrize("name", MANIFOLD)
def test_fsdp2_manifold_step_batches_its_collectives(results, name):
    # one all-gather (A and G_A of every layer, plus the whole tall factors of layers with
    # 2r > min(m, n)); four all-reduces of small Grams (U^T G Q and Pm^T U; two Cholesky-QR
    # passes of dU; the new U) and the non-finite verdict, whatever the number of layers
    assert results[f"fsdp-{name}"]["collectives"] == {"all_gather_into_tensor": 1, "all_reduce": 5}


@pytest.mark.parametrize("name", MANIFOLD)
def test_fsdp2_manifold_resume_through_distributed_checkpoint_state_dicts(results, name):
    r = results[f"fsdp-resume-{name}"]
    assert r["dev"] < TOL
    assert r["agree"]


@pytest.mark.parametrize("name", ["Riemannion", "RiemannianSGD"])
def test_fsdp2_manifold_with_loi_offsets(results, name):
    r = results[f"fsdp-loi-{name}"]
    assert r["dev"] < TOL  # deltas B A = X - X0 (the first step's gauge is a rounding choice)
    assert r["agree"]


def test_fsdp2_manifold_degenerate_steps_gather_and_match_single_process(results):
    r = results["fsdp-fallback-Riemannion"]
    assert r["dev"] < TOL
    assert r["agree"]
    # the two fallbacks (dU and the new U by Householder) each add one all-gather
    assert r["collectives"] == {"all_gather_into_tensor": 3, "all_reduce": 5}


def test_fsdp2_manifold_nonfinite_shard_on_one_rank_skips_the_step_everywhere(results):
    r = results["fsdp-nonfinite-skip-Riemannion"]
    assert r["skipped"] == [1, 1]
    assert r["dev"] < TOL
    assert r["agree"]


def test_fsdp2_clip_grad_norm_by_the_riemannian_gradient(results):
    r = results["fsdp-clip-Riemannion"]
    assert r["clipped"]  # every step was clipped
    assert r["norm_dev"] < TOL  # the sharded norm is the single-process norm
    assert r["dev"] < TOL
    assert r["agree"]


def test_fsdp2_converting_an_already_sharded_model_is_refused(results):
    assert "convert the model first" in results["fsdp-convert-after-shard"]["refused"]


# ------------------------------------------------------------- order of DDP and conversion
WRONG_ORDERS = [
    "Riemannion(model)",
    "Riemannion(ddp)",
    "RiemannianSGD(model)",
    "to_manifold(model)",
    "init_loi(model)",
    "init_loi(ddp)",
]


@pytest.mark.parametrize("name", WRONG_ORDERS)
def test_ddp_then_conversion_raises_before_anything_changes(results, name):
    r = results[f"order-ddp-then-{name}"]
    assert "wrapped in DistributedDataParallel" in r["error"]
    assert "then DistributedDataParallel(model), then create the optimizer" in r["error"]
    assert r["unchanged"]


@pytest.mark.parametrize(
    "name",
    [
        "to_manifold-ddp-Riemannion(ddp)",
        "to_manifold-ddp-Riemannion(model)",
        "init_loi-ddp-Riemannion(ddp)",
        "init_loi-ddp-RiemannianSGD(model)",
        "ddp-ScaledAdamW(ddp)",
    ],
)
def test_converting_first_then_ddp_trains_in_sync_in_either_form(results, name):
    r = results[f"order-{name}"]
    assert r["dev"] < TOL
    assert r["agree"]
