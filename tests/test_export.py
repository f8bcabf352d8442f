"""Export of a model in manifold form as a standard PEFT adapter, loaded by vanilla PEFT."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import riemannlora as rl
from riemannlora.manifold import manifold_layers
from test_manifold import (
    assert_bitwise_equal,
    base_weights,
    lm_loss,
    logits,
    peft_gpt2,
    peft_llama,
    peft_mlp,
    token_batch,
)

torch.set_num_threads(2)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def train(model, ids, steps=3, use_loi=False, **kw):
    if use_loi:
        rl.init_loi(model, lambda: lm_loss(model, ids), generator=torch.Generator().manual_seed(0))
    opt = rl.Riemannion(
        model, lr=kw.pop("lr", 0.02), generator=torch.Generator().manual_seed(1), **kw
    )
    for _ in range(steps):
        opt.zero_grad()
        lm_loss(model, ids).backward()
        opt.step()
    return opt


@pytest.mark.parametrize("use_loi", [False, True])
def test_round_trip_with_vanilla_peft(tmp_path, use_loi):
    original, model = peft_llama(r=2, modules_to_save=["lm_head"])
    ids = token_batch()
    base = base_weights(model)
    train(model, ids, use_loi=use_loi, adamw_lr=1e-2)
    expected = logits(model, ids)
    out = rl.export_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "riemannlora.json",
        "riemannlora_row_bases.safetensors",
    ]
    loaded = PeftModel.from_pretrained(original, str(out))
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-6, rtol=1e-6)
    assert_bitwise_equal(base, model)

    config = json.loads((out / "adapter_config.json").read_text())
    rank = 4 if use_loi else 2
    assert set(config["rank_pattern"].values()) == {rank} and config["r"] == rank
    assert config["alpha_pattern"] == config["rank_pattern"]
    assert config["use_rslora"] is False and config["init_lora_weights"] is True
    tensors = load_file(out / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    assert tensors[key].shape == (rank, 32)
    assert tensors[key.replace("lora_A", "lora_B")].shape == (16, rank)
    assert any("lm_head" in k for k in tensors)  # modules_to_save are exported too
    info = json.loads((out / "riemannlora.json").read_text())
    assert info["layers"]["model.layers.0.self_attn.v_proj"] == {
        "rank": 2,
        "offset": use_loi,
        "exported_rank": rank,
    }


def test_round_trip_gpt2_conv1d(tmp_path):
    original, model = peft_gpt2(r=2)
    ids = token_batch()
    train(model, ids, use_loi=True)
    expected = logits(model, ids)
    rl.export_adapter(model, tmp_path)
    loaded = PeftModel.from_pretrained(original, str(tmp_path))
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-6, rtol=1e-6)


def test_save_pretrained_is_redirected(tmp_path):
    original, model = peft_llama(r=2)
    ids = token_batch()
    train(model, ids)
    expected = logits(model, ids)
    model.save_pretrained(str(tmp_path / "a"))
    assert (tmp_path / "a" / "riemannlora.json").is_file()
    loaded = PeftModel.from_pretrained(original, str(tmp_path / "a"))
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-6, rtol=1e-6)
    # an explicit state dict (Trainer's gathered FSDP one) is exported instead of the weights
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.save_pretrained(str(tmp_path / "b"), state_dict=state)
    for name in ("adapter_model.safetensors", "riemannlora_row_bases.safetensors"):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="export_adapter"):
        model.save_pretrained(str(tmp_path / "e"), path_initial_model_for_weight_conversion="x")
    with pytest.raises(TypeError, match="does not support"):
        model.save_pretrained(str(tmp_path / "c"), max_shard_size="1GB")
    model.save_pretrained(str(tmp_path / "d"), is_main_process=False)
    assert not (tmp_path / "d").exists()


def manifold_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


@pytest.mark.parametrize("use_loi", [False, True])
def test_load_exported_adapter_restores_the_manifold_form_bitwise(tmp_path, use_loi):
    _, model = peft_llama(r=2, modules_to_save=["lm_head"])
    ids = token_batch()
    opt = train(model, ids, use_loi=use_loi, adamw_lr=1e-2)
    rl.export_adapter(model, tmp_path)
    saved = manifold_state(model)
    opt_state = copy.deepcopy(opt.state_dict())
    head = model.base_model.model.lm_head.modules_to_save["default"].weight.detach().clone()
    # a fresh PEFT model (not converted): converted first, with offsets when the export has them
    _, fresh = peft_llama(r=2, modules_to_save=["lm_head"])
    rl.load_exported_adapter(fresh, tmp_path)
    got = manifold_state(fresh)
    assert saved.keys() == got.keys()
    for k in saved:
        assert torch.equal(saved[k], got[k]), k
    assert torch.equal(fresh.base_model.model.lm_head.modules_to_save["default"].weight, head)
    assert torch.equal(logits(fresh, ids), logits(model, ids))

    # the redirected load_adapter of a converted model (Trainer's resume): the run continues
    # bit for bit, as from the optimizer's own state dict
    _, other = peft_llama(r=2, modules_to_save=["lm_head"])
    if use_loi:  # the script runs LOI again; the loaded adapter replaces its result
        rl.init_loi(other, lambda: lm_loss(other, ids), generator=torch.Generator().manual_seed(5))
    opt2 = rl.Riemannion(other, lr=0.02, generator=torch.Generator().manual_seed(1), adamw_lr=1e-2)
    other.load_adapter(str(tmp_path), "default", is_trainable=True)
    opt2.load_state_dict(opt_state)
    for o, m in ((opt, model), (opt2, other)):
        for _ in range(2):
            o.zero_grad()
            lm_loss(m, ids).backward()
            o.step()
    a, b = manifold_state(model), manifold_state(other)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_load_exported_adapter_without_row_bases_and_errors(tmp_path):
    _, model = peft_llama(r=2)
    ids = token_batch()
    train(model, ids)
    rl.export_adapter(model, tmp_path / "a")
    (tmp_path / "a" / "riemannlora_row_bases.safetensors").unlink()
    _, fresh = peft_llama(r=2)
    rl.load_exported_adapter(fresh, tmp_path / "a")  # Q recomputed as qr(V): same point
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), atol=1e-6, rtol=1e-6)
    for layer in manifold_layers(fresh):
        torch.testing.assert_close(layer.Q().mT @ layer.Q(), torch.eye(2), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="not an adapter exported by riemannlora"):
        rl.load_exported_adapter(fresh, tmp_path / "missing")
    _, wider = peft_llama(r=3)
    with pytest.raises(ValueError, match="has rank 3, the export has 2"):
        rl.load_exported_adapter(wider, tmp_path / "a")
    # plain PEFT adapters still go to PEFT's own load_adapter
    _, plain = peft_llama(r=2, init_lora_weights=False)
    plain.save_pretrained(str(tmp_path / "plain"))
    _, target = peft_llama(r=2)
    rl.to_manifold(target)
    with pytest.raises(RuntimeError, match="size mismatch"):
        target.load_adapter(str(tmp_path / "plain"), "default")


def test_export_overwrites_files_and_keeps_others(tmp_path):
    original, model = peft_llama(r=2)
    ids = token_batch()
    opt = train(model, ids, steps=1)
    rl.export_adapter(model, tmp_path)
    (tmp_path / "README.md").write_text("keep me")
    for _ in range(2):
        opt.zero_grad()
        lm_loss(model, ids).backward()
        opt.step()
    rl.export_adapter(model, tmp_path)
    assert (tmp_path / "README.md").read_text() == "keep me"
    assert not [p for p in tmp_path.parent.iterdir() if p.name.endswith(".tmp")]
    loaded = PeftModel.from_pretrained(original, str(tmp_path))
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=1e-6, rtol=1e-6)


def test_export_errors(tmp_path):
    _, model = peft_mlp()
    with pytest.raises(TypeError, match=r"peft\.PeftModel"):
        rl.export_adapter(model.base_model, tmp_path)
    with pytest.raises(ValueError, match="not found"):
        rl.export_adapter(model, tmp_path, adapter_name="other")
    _, model = peft_mlp(init="pissa")
    rl.to_manifold(model)
    with pytest.raises(ValueError, match="rewrote the base weights"):
        rl.export_adapter(model, tmp_path)


@pytest.mark.slow
def test_smollm2_end_to_end(tmp_path):
    """Real SmolLM2-135M-Instruct, LoRA r=8 on q_proj/v_proj: conversion keeps the logits, LOI +
    5 Riemannion steps lower the loss on a real text batch, the export round-trips."""
    import copy

    from peft import LoraConfig, get_peft_model

    from riemannlora.bench.assets import load_causal_lm

    model_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    base, tokenizer = load_causal_lm(model_id)
    original = copy.deepcopy(base)
    texts = [
        "The capital of France is Paris. The capital of Italy is Rome.",
        "Water boils at one hundred degrees Celsius at sea level.",
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    model = get_peft_model(
        base,
        LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    )
    model.eval()

    def loss_fn():
        return model(**batch, labels=labels).loss

    def out():
        with torch.no_grad():
            return model(**batch).logits

    before = out()
    rl.to_manifold(model)
    torch.testing.assert_close(out(), before, atol=1e-4, rtol=1e-4)

    with torch.no_grad():
        pretrained = original(**batch).logits
    rl.init_loi(model, loss_fn, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out(), pretrained, atol=1e-4, rtol=1e-4)
    opt = rl.Riemannion(model, lr=2e-3)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = loss_fn()
        losses.append(loss.item())
        loss.backward()
        opt.step()
    final = loss_fn().item()
    assert final < losses[0] - 0.05, (losses, final)

    expected = out()
    rl.export_adapter(model, tmp_path)
    loaded = PeftModel.from_pretrained(original, str(tmp_path)).eval()
    with torch.no_grad():
        got = loaded(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("how", ["torch.save", "pickle", "deepcopy"])
def test_converted_model_pickles_and_copies_with_its_redirections(tmp_path, how):
    """A converted model survives torch.save/torch.load, pickle (multiprocessing) and
    copy.deepcopy: same outputs, and the copy's save_pretrained/load_adapter act on the copy."""
    import pickle

    original, model = peft_llama(r=2)
    ids = token_batch()
    train(model, ids, use_loi=True)
    expected = logits(model, ids)
    if how == "torch.save":
        torch.save(model, tmp_path / "model.pt")
        other = torch.load(tmp_path / "model.pt", weights_only=False)
    elif how == "pickle":
        other = pickle.loads(pickle.dumps(model))
    else:
        other = copy.deepcopy(model)
    assert other is not model
    assert_same(manifold_state(model), manifold_state(other))
    torch.testing.assert_close(logits(other, ids), expected, atol=0, rtol=0)
    assert other.save_pretrained.__self__ is other
    assert other.load_adapter.__self__ is other
    # the copy trains on its own (its layers are its own), and saves what it holds
    train(other, ids, steps=1)
    assert not torch.equal(logits(other, ids), expected)
    torch.testing.assert_close(logits(model, ids), expected, atol=0, rtol=0)
    other.save_pretrained(str(tmp_path / "copy"))
    loaded = PeftModel.from_pretrained(original, str(tmp_path / "copy"))
    torch.testing.assert_close(logits(loaded, ids), logits(other, ids), atol=1e-6, rtol=1e-6)
    # and loads back into its manifold form bit for bit
    third = copy.deepcopy(model)
    third.load_adapter(str(tmp_path / "copy"), "default")
    assert_same(manifold_state(other), manifold_state(third))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
