"""Manifold form of PEFT LoRA layers: conversion, gradients through backward, errors.

The model builders and the dense-gradient helper here are imported by test_riemannion.py,
test_loi.py and test_export.py (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import riemannlora as rl
from riemannlora.core.geometry import orthonormal_basis, riemannian_gradient, tangent_to_dense
from riemannlora.manifold import MANIFOLD_ATTR, manifold_layers

torch.set_num_threads(2)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

# --------------------------------------------------------------------------------------------
# model builders shared by the test modules
# --------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Four Linear layers, two of equal shape (batched together), two of their own shape."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 12)
        self.fc2 = nn.Linear(12, 12)
        self.fc3 = nn.Linear(12, 12)
        self.fc4 = nn.Linear(12, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.fc1(x))
        x = torch.tanh(self.fc2(x))
        x = torch.tanh(self.fc3(x))
        return self.fc4(x)


MLP_TARGETS = ["fc1", "fc2", "fc3", "fc4"]


def peft_mlp(r=3, seed=0, init=False, dtype=torch.float64, **kwargs):
    """(original base copy, PeftModel) of the MLP; ``init=False``: B random (X != 0)."""
    torch.manual_seed(seed)
    base = MLP()
    original = copy.deepcopy(base)
    cfg = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=MLP_TARGETS, init_lora_weights=init, **kwargs
    )
    model = get_peft_model(base, cfg).to(dtype)
    return original.to(dtype), model


def mlp_data(seed=1, dtype=torch.float64, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=g, dtype=dtype), torch.randn(n, 7, generator=g, dtype=dtype)


def mlp_loss(model, data):
    x, y = data
    return ((model(x) - y) ** 2).mean()


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    return LlamaForCausalLM(cfg).eval()


def peft_llama(r=2, seed=0, targets=("q_proj", "v_proj"), dtype=torch.float32, **kwargs):
    """(original base copy, PeftModel) of a tiny random Llama (q_proj 32x32, v_proj 16x32)."""
    base = tiny_llama(seed)
    original = copy.deepcopy(base)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), **kwargs)
    model = get_peft_model(base, cfg).to(dtype)
    return original.to(dtype), model


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_embd=32,
        n_layer=1,
        n_head=4,
        vocab_size=100,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()  # no dropout: deterministic outputs


def peft_gpt2(r=2, seed=0, dtype=torch.float32, **kwargs):
    base = tiny_gpt2(seed)
    original = copy.deepcopy(base)
    cfg = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=["c_attn"], fan_in_fan_out=True, **kwargs
    )
    model = get_peft_model(base, cfg).to(dtype)
    return original.to(dtype), model


def token_batch(seed=1, batch=2, length=8, vocab=100):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def dense_gradients(model, loss_fn):
    """``G = dL/dW`` ``(m, n)`` of every manifold layer, by autograd through a merged dense copy
    (``W = W0 + X - X0``); keyed by layer name."""
    merged = copy.deepcopy(model).merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    weights = {}
    for layer in manifold_layers(model):
        path = layer.path.removeprefix("base_model.model.")
        mod = merged.get_submodule(path)
        mod.weight.requires_grad_(True)
        weights[layer.name] = (mod, getattr(mod, "nf", None) is not None)  # Conv1D: (n, m)
    loss_fn(merged).backward()
    return {
        k: (mod.weight.grad.T if conv1d else mod.weight.grad)
        for k, (mod, conv1d) in weights.items()
    }


def _is_base(name, p):
    return "lora_" not in name and not p.requires_grad


def base_weights(model):
    """Clones of every frozen non-LoRA parameter (the base model)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if _is_base(n, p)}


def assert_bitwise_equal(before, model):
    after = {n: p for n, p in model.named_parameters() if _is_base(n, p)}
    assert before.keys() == after.keys()
    for n, p in before.items():
        assert torch.equal(p, after[n]), n


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


def test_zero_b_start_is_documented_point():
    _, model = peft_llama()
    A0 = {
        n: m.lora_A["default"].weight.detach().clone()
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }
    ids = token_batch()
    before = logits(model, ids)
    base = base_weights(model)
    layers = rl.to_manifold(model, generator=torch.Generator().manual_seed(0))
    assert len(layers) == 4
    for layer in layers:
        r = layer.rank
        assert r == 2 and layer.width == 4 and not layer.offset
        assert layer.module.scaling["default"] == 1.0
        U, V, Q = layer.U(), layer.V(), layer.Q()
        torch.testing.assert_close(U.T @ U, torch.eye(r), atol=1e-6, rtol=0)
        assert torch.equal(V, torch.zeros_like(V))
        assert torch.equal(layer.Z1(), torch.zeros_like(layer.Z1()))
        torch.testing.assert_close(Q, orthonormal_basis(A0[layer.path].T), atol=1e-6, rtol=0)
        assert layer.entry["orig_scaling"] == 2.0 and layer.entry["orig_rank"] == 2
    torch.testing.assert_close(logits(model, ids), before, atol=0, rtol=0)
    assert_bitwise_equal(base, model)
    # the random U comes from the generator
    _, model2 = peft_llama()
    layers2 = rl.to_manifold(model2, generator=torch.Generator().manual_seed(0))
    for a, b in zip(layers, layers2):
        assert torch.equal(a.U(), b.U())


@pytest.mark.parametrize("builder", [peft_llama, peft_gpt2])
def test_conversion_of_trained_adapter_keeps_outputs(builder):
    _, model = builder(init_lora_weights=False)  # B random: X = s B A != 0
    model = model.double()
    deltas = {}
    for n, m in model.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            s = m.scaling["default"]
            deltas[n] = s * m.lora_B["default"].weight @ m.lora_A["default"].weight
    ids = token_batch()
    before = logits(model, ids)
    layers = rl.to_manifold(model)
    for layer in layers:
        X = layer.point()
        torch.testing.assert_close(X, deltas[layer.path].detach(), atol=1e-12, rtol=1e-12)
        U = layer.U()
        torch.testing.assert_close(
            U.T @ U, torch.eye(layer.rank, dtype=U.dtype), atol=1e-12, rtol=0
        )
        torch.testing.assert_close(layer.Q(), orthonormal_basis(layer.V()), atol=1e-12, rtol=0)
    torch.testing.assert_close(logits(model, ids), before, atol=1e-10, rtol=1e-10)


def test_conversion_float32_logits_close():
    _, model = peft_llama(init_lora_weights=False)
    ids = token_batch()
    before = logits(model, ids)
    rl.to_manifold(model)
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("builder", [peft_llama, peft_gpt2])
@pytest.mark.parametrize("init", [True, False])
def test_riemannian_gradient_through_backward_equals_projection(builder, init):
    _, model = builder(init_lora_weights=init)
    model = model.double()
    layers = rl.to_manifold(model, generator=torch.Generator().manual_seed(3))
    if init:  # move X off zero so that both terms of the projection matter
        with torch.no_grad():
            for layer in layers:
                layer.V().copy_(torch.randn_like(layer.V()))
                layer.Q().copy_(orthonormal_basis(layer.V()))
    ids = token_batch()
    G = dense_gradients(model, lambda mdl: lm_loss(mdl, ids))
    lm_loss(model, ids).backward()
    for layer in layers:
        U, Q = layer.U().detach(), layer.Q().detach()
        dU, dV = riemannian_gradient(U, layer.GQ(), layer.GtU())
        g = G[layer.name]
        P = U @ U.T
        expected = P @ g + (torch.eye(layer.m, dtype=g.dtype) - P) @ g @ Q @ Q.T
        torch.testing.assert_close(tangent_to_dense(U, Q, dU, dV), expected, atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(layer.GQ(), g @ Q, atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(layer.GtU(), g.T @ U, atol=1e-12, rtol=1e-9)


def test_idempotent_and_with_offset():
    _, model = peft_mlp()
    data = mlp_data()
    out0 = model(data[0]).detach()
    layers = rl.to_manifold(model)
    weights = [(layer.a, layer.b) for layer in layers]
    again = rl.to_manifold(model)
    assert [(layer.a, layer.b) for layer in again] == weights  # same tensors, untouched
    layers = rl.to_manifold(model, with_offset=True)
    for layer in layers:
        assert layer.offset and layer.width == 3 * layer.rank
        assert torch.equal(layer.U0(), torch.zeros_like(layer.U0()))
        assert torch.equal(layer.V0(), torch.zeros_like(layer.V0()))
    torch.testing.assert_close(model(data[0]).detach(), out0, atol=1e-12, rtol=1e-12)
    for layer in rl.to_manifold(model):  # still idempotent, offsets kept
        assert layer.offset


def test_peft_bookkeeping_consistent():
    """PEFT's own r/lora_alpha/use_rslora agree with scaling 1 (e.g. for set_scale)."""
    _, model = peft_mlp(use_rslora=True)
    layers = rl.to_manifold(model)
    for layer in layers:
        mod = layer.module
        assert mod.r["default"] == layer.width == mod.lora_alpha["default"]
        assert mod.use_rslora["default"] is False
        assert getattr(mod, MANIFOLD_ATTR)["default"]["orig_use_rslora"] is True


def test_deepcopy_rebinds_save_pretrained():
    _, model = peft_mlp()
    rl.to_manifold(model)
    clone = copy.deepcopy(model)
    assert clone.save_pretrained.__self__ is clone
    assert model.save_pretrained.__self__ is model


def test_error_rank_too_large():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 4))
    model = get_peft_model(base, LoraConfig(r=5, target_modules=["0"]))
    with pytest.raises(ValueError, match=r"rank r=5 exceeds min\(out_features, in_features\)"):
        rl.to_manifold(model)


def test_error_embedding_lora():
    _, model = peft_llama(targets=("q_proj", "embed_tokens"))
    with pytest.raises(TypeError, match="linear layers only"):
        rl.to_manifold(model)


def test_error_dora_and_lora_bias():
    _, model = peft_mlp(use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        rl.to_manifold(model)
    _, model = peft_mlp(lora_bias=True)
    with pytest.raises(ValueError, match="lora_bias"):
        rl.to_manifold(model)


def test_error_no_lora_pairs():
    with pytest.raises(ValueError, match="no trainable LoRA adapter"):
        rl.to_manifold(MLP())
    _, model = peft_mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable LoRA adapter"):
        rl.to_manifold(model)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        rl.to_manifold([torch.zeros(3)])
