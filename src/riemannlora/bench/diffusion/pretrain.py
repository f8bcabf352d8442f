"""Pretraining the digits diffusion model once per machine and loading it from the cache (see
:mod:`riemannlora.bench.diffusion`)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from riemannlora.bench.assets import cache_dir
from riemannlora.bench.diffusion.model import (
    PRETRAIN_CONFIGS,
    SUBJECT_PROMPT,
    DenoisingLoss,
    DigitClassifier,
    PretrainConfig,
    PromptBank,
    caption,
    classify,
    load_mnist,
    make_unet,
    sample,
)

__all__ = [
    "Pretrained",
    "pretrained",
    "pretrained_dir",
]

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
