"""QLoRA: the manifold optimizers and LOI on PEFT's LoRA layers over real quantized bases that
run on this CPU -- bitsandbytes 4-bit (NF4) and 8-bit (``lora.bnb.Linear4bit`` /
``Linear8bitLt``) and torchao int8 weight-only (``lora.torchao.TorchaoLoraLinear``). The
quantized base weights are never changed (their storage is compared bit for bit), and the
exported adapter, loaded by vanilla PEFT onto a fresh base quantized the same way, reproduces
the trained model."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import riemannlora as rl
from riemannlora.manifold import manifold_layers

torch.set_num_threads(2)
pytestmark = pytest.mark.filterwarnings("ignore")


class Net(nn.Module):
    def __init__(self, linear=nn.Linear):
        super().__init__()
        self.l1 = linear(64, 64)
        self.l2 = linear(64, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def quantized_net(kind: str) -> nn.Module:
    """The same float network (seed 0), its l1/l2 quantized by ``kind``."""
    torch.manual_seed(0)
    dense = Net()
    if kind.startswith("bnb"):
        import bitsandbytes as bnb

        if kind == "bnb-4bit":
            make = lambda i, o: bnb.nn.Linear4bit(  # noqa: E731
                i, o, compute_dtype=torch.float32, quant_type="nf4"
            )
        else:
            make = lambda i, o: bnb.nn.Linear8bitLt(i, o, has_fp16_weights=False)  # noqa: E731
        net = Net(make)
        net.load_state_dict(dense.state_dict())
        # what transformers sets on a model loaded in 4/8 bits; PEFT dispatches on it
        net.is_loaded_in_4bit, net.is_loaded_in_8bit = kind == "bnb-4bit", kind == "bnb-8bit"
        for module in net.modules():
            # on AVX512-BF16 CPUs bitsandbytes repacks a 4-bit weight into an inference-only
            # layout at the first eval-mode forward, after which the layer cannot train (with
            # any optimizer); LOI's passes run in eval mode, so keep the trainable layout
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
        return net.to("cpu")  # bitsandbytes quantizes on the device move
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(dense, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in ("l1", "l2"))
    return dense


KINDS = {
    "bnb-4bit": "Linear4bit",
    "bnb-8bit": "Linear8bitLt",
    "torchao-int8": "TorchaoLoraLinear",
}


def storage(model) -> dict[str, torch.Tensor]:
    """The raw bytes of every quantized base weight (and its scales), as stored."""
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "base_layer" in name:
            data = t.data
            for attr in ("CB", "SCB", "qdata", "scale"):
                if isinstance(getattr(data, attr, None), torch.Tensor):
                    out[f"{name}.{attr}"] = getattr(data, attr).clone()
            if type(data) is torch.Tensor or hasattr(data, "quant_state"):
                out[name] = data.clone().view(torch.uint8) if data.dtype != torch.bool else data
    return out


@pytest.mark.parametrize("opt_name", ["Riemannion", "RiemannianSGD"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_manifold_training_with_loi_on_a_quantized_base_exports_a_standard_adapter(
    kind, opt_name, tmp_path
):
    model = get_peft_model(
        quantized_net(kind),
        LoraConfig(r=4, lora_alpha=8, target_modules=["l1", "l2"], modules_to_save=["head"]),
    )
    assert type(model.base_model.model.l1).__name__ == KINDS[kind]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 64, generator=g), torch.randint(0, 3, (16,), generator=g)

    def loss():
        return nn.functional.cross_entropy(model(x), y)

    base = storage(model)
    assert base  # the quantized storage is found
    with torch.no_grad():
        out0 = model.eval()(x).clone()
    model.train()
    rl.init_loi(model, loss, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # LOI leaves the outputs as they were
        torch.testing.assert_close(model.eval()(x), out0, atol=1e-5, rtol=1e-5)
    model.train()
    assert [layer.offset for layer in manifold_layers(model)] == [True, True]
    lr = 0.05 if opt_name == "Riemannion" else 0.5
    opt = getattr(rl, opt_name)(model, lr=lr, adamw_lr=1e-2)
    first = float(loss())
    for _ in range(5):
        loss().backward()
        opt.step()
        opt.zero_grad()
    assert float(loss()) < first  # it trains
    after = storage(model)
    assert base.keys() == after.keys()
    assert all(torch.equal(base[k], after[k]) for k in base)  # never dequantized in place

    out = rl.export_adapter(model, tmp_path / "adapter")
    fresh = quantized_net(kind)
    loaded = PeftModel.from_pretrained(fresh, str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_scaled_adamw_on_a_quantized_base(kind):
    model = get_peft_model(quantized_net(kind), LoraConfig(r=4, target_modules=["l1", "l2"]))
    opt = rl.ScaledAdamW(model, lr=1e-2)
    assert len(opt.param_groups[0]["scalings"]) == 2
    x = torch.randn(8, 64)
    before = copy.deepcopy(storage(model))
    model(x).square().mean().backward()
    opt.step()
    after = storage(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
