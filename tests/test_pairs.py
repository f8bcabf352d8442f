"""find_lora_pairs on real PEFT layers of every supported kind."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import riemannlora as rl


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.conv = nn.Conv2d(3, 6, 3)
        self.fc = nn.Linear(12, 12)
        self.proj = nn.Linear(12, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, ids, img):
        h = self.emb(ids).mean(1) + self.conv(img).mean((1, 2, 3))[:, None]
        return self.head(self.proj(torch.relu(self.fc(h))))


def test_all_layer_kinds_and_per_layer_scaling():
    torch.manual_seed(0)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["emb", "conv", "fc", "proj"],
        modules_to_save=["head"],
        rank_pattern={"proj": 2},
        alpha_pattern={"proj": 10},
    )
    model = get_peft_model(Net(), cfg)
    found = rl.find_lora_pairs(model)
    by_name = {p.name.split(".")[-2]: p for p in found.pairs}
    assert set(by_name) == {"emb", "conv", "fc", "proj"}
    assert by_name["conv"].a.dim() == 4 and by_name["conv"].shape == (6, 3 * 9)
    assert by_name["emb"].shape == (12, 20)  # lora_embedding_B (12, r) @ lora_embedding_A (r, 20)
    assert by_name["proj"].rank == 2 and by_name["proj"].scaling == pytest.approx(5.0)
    assert by_name["fc"].scaling == pytest.approx(2.0)
    # heads are "others", listed once
    assert any("head" in n for n in found.other_names)
    assert len({id(p) for p in found.parameters()}) == len(list(found.parameters()))
    # every trainable parameter is covered
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in found.parameters()}
    # and the optimizer trains them all
    opt = rl.ScaledAdamW(model, lr=1e-2)
    ids, img = torch.randint(0, 20, (4, 5)), torch.randn(4, 3, 8, 8)
    for _ in range(2):
        loss = model(ids, img).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_rslora_scaling_is_read_from_layer():
    model = get_peft_model(
        Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["fc"], use_rslora=True)
    )
    (pair,) = rl.find_lora_pairs(model).pairs
    assert pair.scaling == pytest.approx(8 / math.sqrt(4))


def test_gpt2_conv1d_fan_in_fan_out():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2,
            n_embd=32,
            n_head=2,
            vocab_size=50,
            n_positions=16,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    )
    pairs = rl.find_lora_pairs(model).pairs
    assert len(pairs) == 2 * 3  # c_attn, attn.c_proj, mlp.c_proj in each of the 2 blocks
    shapes = {p.name.split(".")[-2]: p.shape for p in pairs}
    assert shapes["c_attn"] == (96, 32)


def test_several_adapters_only_trainable_ones():
    model = get_peft_model(Net(), LoraConfig(r=4, target_modules=["fc"]), adapter_name="first")
    model.add_adapter("second", LoraConfig(r=2, target_modules=["fc", "proj"]))
    model.set_adapter("second")  # PEFT makes only the active adapter trainable
    pairs = rl.find_lora_pairs(model).pairs
    assert {p.name.rsplit(".", 1)[-1] for p in pairs} == {"second"}
    assert len(pairs) == 2


def test_dora_magnitude_is_other():
    model = get_peft_model(Net(), LoraConfig(r=4, target_modules=["fc"], use_dora=True))
    found = rl.find_lora_pairs(model)
    assert len(found.pairs) == 1
    assert any("lora_magnitude_vector" in n for n in found.other_names)


def test_explicit_pairs_for_non_peft_model():
    down = nn.Parameter(torch.randn(2, 6))
    up = nn.Parameter(torch.zeros(5, 2))
    bias = nn.Parameter(torch.zeros(5))
    params = rl.LoraParams([rl.LoraPair(a=down, b=up, scaling=0.5, name="mine")], others=[bias])
    opt = rl.ScaledSGD(params, lr=0.1)
    x = torch.randn(3, 6)
    (0.5 * x @ down.T @ up.T + bias).sum().backward()
    opt.step()
    assert up.abs().sum() > 0 and bias.abs().sum() > 0


def test_same_parameter_twice_is_rejected():
    p = nn.Parameter(torch.randn(2, 6))
    q = nn.Parameter(torch.randn(5, 2))
    with pytest.raises(ValueError, match="appears twice"):
        rl.LoraParams([rl.LoraPair(p, q), rl.LoraPair(p, nn.Parameter(torch.randn(4, 2)))])
    with pytest.raises(ValueError, match="same tensor"):
        rl.LoraPair(p, p)
    with pytest.raises(ValueError, match="both as a LoRA factor"):
        rl.LoraParams([rl.LoraPair(p, q)], others=[q])


def test_not_a_module():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        rl.find_lora_pairs("model")
