"""The digits diffusion model's parts: its configuration, captions and MNIST data, the
text encoder's prompt bank, the UNet and its denoising loss, the digit classifier, DDIM
sampling (see :mod:`riemannlora.bench.diffusion`)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from riemannlora.bench.assets import MINILM_ID, mnist_file

__all__ = [
    "DIGIT_WORDS",
    "GUIDANCE",
    "LORA_TARGETS",
    "PRETRAIN_CONFIGS",
    "SAMPLING_STEPS",
    "SUBJECT_PROMPT",
    "DenoisingLoss",
    "DenoisingOutput",
    "DigitClassifier",
    "PretrainConfig",
    "PromptBank",
    "caption",
    "classify",
    "encode_prompts",
    "find_unet",
    "load_mnist",
    "make_scheduler",
    "make_unet",
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
