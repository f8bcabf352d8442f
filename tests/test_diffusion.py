"""The diffusion task: the pretrained digit model's parts checked against diffusers' own
implementations, the DreamBooth data, LoRA through PEFT with every main optimizer, and the
quick benchmark end to end (real MNIST, real MiniLM text encoder, real diffusers UNet)."""

from __future__ import annotations

import base64
import io
import json
import math

import pytest
import torch

from riemannlora.bench import diffusion as d

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = "riemannlora/mnist-digits-unet-tiny"


@pytest.fixture(scope="module")
def tiny() -> d.Pretrained:
    """The tiny pretrained model (built into the riemannlora cache on first use, ~40 s)."""
    torch.manual_seed(0)
    return d.pretrained(TINY, progress=False)


def test_captions_and_prompt_bank_cover_every_class():
    assert d.caption(3) == "a handwritten digit three"
    assert len({d.caption(c) for c in range(10)}) == 10
    assert d.SUBJECT_PROMPT not in {d.caption(c) for c in range(10)}


def test_pretrain_config_validates_and_hashes_every_field():
    base = d.PRETRAIN_CONFIGS[TINY]
    assert base.subject == 7 and 7 not in base.known and len(base.known) == 9
    assert base.key() != d.PretrainConfig(**{**base.__dict__, "steps": base.steps + 1}).key()
    with pytest.raises(ValueError, match="held_out"):
        d.PretrainConfig(name="x", held_out=(11,))
    with pytest.raises(ValueError, match="at least one class"):
        d.PretrainConfig(name="x", held_out=tuple(range(10)))


def test_load_mnist_splits_are_resized_scaled_and_labelled():
    x, y = d.load_mnist("test", 16)
    assert x.shape == (10_000, 1, 16, 16) and y.shape == (10_000,)
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert set(y.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="split"):
        d.load_mnist("validation")


def test_denoising_loss_matches_diffusers_add_noise_and_an_explicit_mse():
    torch.manual_seed(0)
    config = d.PRETRAIN_CONFIGS[TINY]
    model = d.DenoisingLoss(d.make_unet(config)).eval()
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    noise = torch.randn_like(x)
    t = torch.tensor([0, 10, 250, 600, 999])
    reference_noisy = d.make_scheduler().add_noise(x, noise, t)
    torch.testing.assert_close(model.noisy(x, noise, t), reference_noisy)
    hidden = torch.randn(5, 6, 384)
    mask = torch.ones(5, 6, dtype=torch.long)
    weights = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    out = model(x, noise, t, hidden, mask, weights)
    pred = model.unet(reference_noisy, t, encoder_hidden_states=hidden, encoder_attention_mask=mask)
    mse = (pred.sample - noise).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.per_example, mse.detach())
    torch.testing.assert_close(out.loss, (mse * weights).sum())
    torch.testing.assert_close(model(x, noise, t, hidden, mask).loss, mse.mean())


def test_samples_png_is_a_png_of_the_grid_size():
    from PIL import Image

    rows = [torch.zeros(4, 1, 16, 16), torch.ones(2, 1, 16, 16)]
    png = d.samples_png(rows, scale=2)
    assert png.startswith(PNG_SIGNATURE)
    image = Image.open(io.BytesIO(png))
    assert image.size == ((17 * 4 + 1) * 2, (17 * 2 + 1) * 2)


@pytest.mark.slow
def test_pretrained_cache_holds_model_classifier_prior_and_scores(tiny):
    config = tiny.config
    assert (tiny.path / "meta.json").is_file() and (tiny.path / "unet").is_dir()
    meta = json.loads((tiny.path / "meta.json").read_text())
    for key in ("classifier_test_accuracy", "known_class_accuracy", "pretrain_s"):
        assert math.isfinite(meta[key])
    assert len(tiny.prior_images) == config.prior_per_class * len(config.known)
    assert set(tiny.prior_labels.tolist()) == set(config.known)  # prior: known classes only
    # loading again gives the same weights (cached, not rebuilt)
    again = d.pretrained(TINY, progress=False)
    for (n, p), (_, q) in zip(tiny.unet.named_parameters(), again.unet.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.slow
def test_dreambooth_batches_are_seeded_weighted_and_eval_is_unseen(tiny):
    data = d.DreamBoothData(tiny, num_images=5, prior_weight=0.5)
    a = list(data.train_batches(steps=3, batch_size=4, seed=1))
    b = list(data.train_batches(steps=3, batch_size=4, seed=1))
    c = next(data.train_batches(steps=1, batch_size=4, seed=2))
    for x, y in zip(a, b):
        for k in x:
            assert torch.equal(x[k], y[k])
    assert not torch.equal(a[0]["noise"], c["noise"])
    batch = a[0]
    assert batch["pixel_values"].shape == (8, 1, 16, 16)  # 4 subject + 4 prior
    torch.testing.assert_close(batch["weights"][:4].sum(), torch.tensor(1.0))
    torch.testing.assert_close(batch["weights"][4:].sum(), torch.tensor(0.5))
    subject_hidden, _ = tiny.bank.get([d.SUBJECT_PROMPT])
    assert torch.equal(batch["encoder_hidden_states"][0], subject_hidden[0])
    # every subject training image is one of the 5 chosen training images
    flat = data.images.flatten(1)
    for img in batch["pixel_values"][:4]:
        assert (flat == img.flatten()).all(1).any()
    no_prior = next(d.DreamBoothData(tiny, 5, prior_weight=0.0).train_batches(1, 4, 0))
    assert len(no_prior["pixel_values"]) == 4
    # eval: test-split images of the held-out class, none of them a training image
    evals = data.eval_batches(10, batch_size=4)
    assert [len(e["pixel_values"]) for e in evals] == [4, 4, 2]
    for e in evals:
        torch.testing.assert_close(e["weights"].sum(), torch.tensor(1.0))
        for img in e["pixel_values"]:
            assert not (flat == img.flatten()).all(1).any()
    assert torch.equal(data.eval_batches(10, 4)[0]["noise"], evals[0]["noise"])  # fixed
    # every test image of the class is usable; one more is an error, not a smaller evaluation
    from riemannlora.bench.diffusion.model import load_mnist
    from riemannlora.bench.workloads import WORKLOADS

    _, labels = load_mnist("test", tiny.config.image_size)
    available = int((labels == tiny.config.subject).sum())
    assert sum(len(e["pixel_values"]) for e in data.eval_batches(available, 512)) == available
    with pytest.raises(ValueError, match="--eval-size between 1 and"):
        data.eval_batches(available + 1)
    assert WORKLOADS["diffusion"].settings("gpu")["eval_size"] <= int(labels.bincount().min())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adamw", "scaled-adamw", "riemannion", "riemannion-loi"])
def test_lora_on_the_attention_projections_trains_with_every_main_method(tiny, method):
    from riemannlora.bench.methods import MethodContext, get_method
    from riemannlora.bench.workloads import WORKLOADS, lora_config

    torch.manual_seed(0)
    base = d.pretrained(TINY, progress=False)  # fresh weights: the fixture's stay untouched
    data = d.DreamBoothData(base, num_images=4)
    model = d.DenoisingLoss(base.unet)
    batches = list(data.train_batches(steps=3, batch_size=2, seed=0))
    ctx = MethodContext(compute_loss=lambda m: m(**batches[0]).loss, adamw_lr=1e-3, seed=0)
    m = get_method(method)
    config = lora_config(WORKLOADS["diffusion"], model, rank=2)
    peft_model = m.initialize(model, config, ctx)
    adapted = {
        n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_A" in n
    }
    assert adapted and all(n.endswith(d.LORA_TARGETS) for n in adapted)
    assert {n.rsplit(".", 1)[-1] for n in adapted} >= {"to_q", "to_k", "to_v", "0"}
    frozen = {
        n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad
    }
    trainable = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    opt = m.build(peft_model, 1e-3, ctx)
    for batch in batches:
        loss = peft_model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for n, p in peft_model.named_parameters():
        assert torch.isfinite(p).all(), n
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{method} changed frozen {n}"
    assert any(
        not torch.equal(p, trainable[n]) for n, p in peft_model.named_parameters() if n in trainable
    )
    metrics = data.final_metrics(peft_model, n=4)
    assert 0.0 <= metrics["subject_accuracy"] <= 1.0
    assert 0.0 <= metrics["retained_accuracy"] <= 1.0
    assert base64.b64decode(metrics["grid_png"]).startswith(PNG_SIGNATURE)


@pytest.mark.slow
def test_bench_diffusion_quick_writes_finite_results_and_sample_grids(tiny, tmp_path, capsys):
    from riemannlora import cli

    out = tmp_path / "bench"
    rc = cli.main(
        ["bench", "--task", "diffusion", "--quick", "--methods", "adamw,riemannion-loi",
         "--lrs", "1e-3,1e-1", "--steps", "2", "--eval-every", "1", "--out", str(out),
         "--threads", "2", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    # the banner names the layers that really get LoRA, not the LLM tasks' default
    assert "LoRA on to_q,to_k,to_v,to_out.0," in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "diffusion" and results["model"] == TINY
    assert results["lora_targets"] == "to_q,to_k,to_v,to_out.0"
    assert results["metrics"] == ["subject_accuracy", "retained_accuracy"]
    assert len(results["runs"]) == 4 and not results["failures"]
    for run in results["runs"]:
        assert [s for s, _ in run["eval_loss"]] == [0, 1, 2]
        assert all(math.isfinite(v) for _, v in run["eval_loss"])
        final = run["final"]
        assert "grid_png" not in final  # written out, not carried in results.json
        assert (out / final["samples_png"]).read_bytes().startswith(PNG_SIGNATURE)
        assert 0.0 <= final["subject_accuracy"] <= 1.0
    for method in ("adamw", "riemannion-loi"):
        by_lr = results["summary"][method]["metrics_by_lr"]
        assert set(by_lr) == {"0.001", "0.1"}
    assert (out / "samples.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "subject acc." in (out / "results.md").read_text()


def unet_trained_with_loi():
    """A tiny UNet with LoRA through diffusers' ``add_adapter``, LOI on a DreamBooth batch and
    3 Riemannion steps; returns the UNet and its batches."""
    from peft import LoraConfig

    import riemannlora

    torch.manual_seed(0)
    base = d.pretrained(TINY, progress=False)
    unet = base.unet
    unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=list(d.LORA_TARGETS)))
    model = d.DenoisingLoss(unet)
    data = d.DreamBoothData(base, num_images=4)
    batches = list(data.train_batches(steps=3, batch_size=2, seed=0))
    riemannlora.init_loi(model, lambda: model(**batches[0]).loss)
    opt = riemannlora.Riemannion(unet, lr=1e-2)
    for batch in batches:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return unet, batches


def unet_inputs(batch):
    """The UNet's positional and keyword inputs of a DreamBooth batch."""
    kw = dict(
        encoder_hidden_states=batch["encoder_hidden_states"],
        encoder_attention_mask=batch["encoder_attention_mask"],
    )
    return (batch["pixel_values"], batch["timesteps"]), kw


@pytest.mark.slow
def test_diffusers_add_adapter_route_trains_exports_and_reloads_in_vanilla_peft(tmp_path):
    """LoRA through diffusers' own adapter API (``unet.add_adapter``), Riemannion + LOI on the
    bare UNet, then ``export_adapter``: vanilla PEFT on a fresh UNet reproduces the output."""
    from peft import PeftModel

    import riemannlora

    unet, batches = unet_trained_with_loi()
    out = riemannlora.export_adapter(unet, tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file()

    fresh = d.pretrained(TINY, progress=False).unet
    reloaded = PeftModel.from_pretrained(fresh, str(out)).eval()
    args, kw = unet_inputs(batches[0])
    with torch.no_grad():
        expected = unet.eval()(*args, **kw).sample
        got = reloaded(*args, **kw).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="without adapters"):
        riemannlora.export_adapter(d.pretrained(TINY, progress=False).unet, tmp_path / "x")


@pytest.mark.slow
def test_diffusers_saving_methods_of_a_converted_unet_round_trip(tmp_path):
    """After Riemannion + LOI on a UNet with ``add_adapter`` LoRA: ``save_pretrained`` writes the
    full model with the delta merged (``variant`` too) that ``from_pretrained`` loads;
    ``save_lora_adapter`` writes the standard adapter that ``load_lora_adapter`` reads into a
    fresh UNet; ``torch.save``/``torch.load`` and ``copy.deepcopy`` keep both redirections."""
    import copy

    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    unet, batches = unet_trained_with_loi()
    args, kw = unet_inputs(batches[0])
    unet.eval()
    with torch.no_grad():
        expected = unet(*args, **kw).sample
        untrained = d.pretrained(TINY, progress=False).unet.eval()(*args, **kw).sample
    assert (expected - untrained).abs().max() > 1e-4  # training moved the model

    def output(net):
        with torch.no_grad():
            return net.eval()(*args, **kw).sample

    # full model, delta merged: the plain class loads it (no unused or missing weights)
    unet.save_pretrained(tmp_path / "full")
    full = UNet2DConditionModel.from_pretrained(tmp_path / "full")
    assert not hasattr(full, "peft_config")
    torch.testing.assert_close(output(full), expected, rtol=1e-4, atol=1e-5)
    unet.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    variant = UNet2DConditionModel.from_pretrained(tmp_path / "fp16", variant="fp16")
    torch.testing.assert_close(output(variant), expected, rtol=1e-4, atol=1e-5)
    assert any("lora" in name for name, _ in unet.named_parameters())  # the model is unchanged

    # the adapter alone, in diffusers' format, into a fresh UNet
    unet.save_lora_adapter(tmp_path / "lora")
    with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert all(s[0] == 4 for k, s in shapes.items() if "lora_A" in k)  # rank 2r (LOI offset)
    fresh = d.pretrained(TINY, progress=False).unet
    fresh.load_lora_adapter(
        tmp_path / "lora", prefix=None, weight_name="pytorch_lora_weights.safetensors"
    )
    torch.testing.assert_close(output(fresh), expected, rtol=1e-4, atol=1e-5)

    # the redirections pickle and deep-copy with the model
    torch.save(unet, tmp_path / "unet.pt")
    for other in (torch.load(tmp_path / "unet.pt", weights_only=False), copy.deepcopy(unet)):
        assert other.save_pretrained.__self__ is other
        other.save_pretrained(tmp_path / "again")
        again = UNet2DConditionModel.from_pretrained(tmp_path / "again")
        torch.testing.assert_close(output(again), expected, rtol=1e-4, atol=1e-5)
