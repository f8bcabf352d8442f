"""The DreamBooth-style subject task on the pretrained digits model (see
:mod:`riemannlora.bench.diffusion`)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from riemannlora.bench.diffusion.model import (
    SUBJECT_PROMPT,
    caption,
    classify,
    find_unet,
    load_mnist,
    sample,
    samples_png,
)
from riemannlora.bench.diffusion.pretrain import Pretrained

__all__ = [
    "DreamBoothData",
]

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
        x = x[y == self.base.config.subject]
        if not 1 <= n <= len(x):
            raise ValueError(
                f"eval_size {n}: the subject class has {len(x)} test images; "
                f"use --eval-size between 1 and {len(x)}"
            )
        x = x[:n]
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
