"""DeepSpeed ZeRO cannot carry riemannlora's optimizers (it flattens the LoRA factors into
partitions): every route is detected and refused with a message naming FSDP2, never a silent
fall-back (real DeepSpeed on its CPU accelerator, tests/deepspeed_worker.py)."""

from __future__ import annotations

import json
import pathlib
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed

WORKER = pathlib.Path(__file__).with_name("deepspeed_worker.py")


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("deepspeed")
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out), free_port()],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("name", ["ScaledAdamW", "Riemannion", "RiemannianSGD"])
def test_zero2_wrapping_our_optimizer_is_refused_at_the_step(results, name):
    r = results[f"zero2-{name}"]
    assert r["type"] == "RuntimeError"
    assert "DeepSpeed ZeRO" in r["error"] and "FSDP2" in r["error"]
    assert not r["changed"]


@pytest.mark.parametrize("where", ["engine", "module"])
@pytest.mark.parametrize("name", ["ScaledAdamW", "Riemannion"])
def test_zero3_models_are_refused_when_the_optimizer_is_built(results, where, name):
    r = results[f"zero3-{where}-{name}"]
    assert r["type"] == "ValueError"
    assert ("DeepSpeed engine" if where == "engine" else "partitioned by ZeRO-3") in r["error"]
    assert "FSDP2" in r["error"]


def test_zero3_init_loi_is_refused(results):
    r = results["zero3-init_loi"]
    assert r["type"] == "ValueError" and "FSDP2" in r["error"]
