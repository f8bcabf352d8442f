r"""Manifold form of PEFT LoRA layers: the point ``X = U V^T`` stored in PEFT's own modules.

For a PEFT LoRA ``Linear`` layer (including GPT-2 ``Conv1D`` targets, whose LoRA path is still
``lora_B(lora_A(x))``) and an adapter with rank ``r``, effective delta ``X = s B A`` (``s`` the
layer's scaling), :func:`to_manifold` replaces the two factor modules by wider ``nn.Linear``
modules (no new module class) and sets ``scaling = 1``::

    lora_B.weight = [Z1 | U | U0]          (m, w)      Z1 = 0 always
    lora_A.weight = [Q | V | -V0]^T        (w, n)      w = 2r, or 3r with an offset

so PEFT's ordinary forward adds ``Z1 Q^T + U V^T - U0 V0^T = X - X0``. ``U`` ``(m, r)`` has
orthonormal columns, ``V`` ``(n, r)`` is free and ``Q`` ``(n, r)`` is an orthonormal basis of
``V``'s columns (X's row space). The optional frozen offset ``X0 = U0 V0^T`` (put there by
:func:`riemannlora.init_loi`) makes the model's output at the start equal to the pretrained
model's without touching the base weight. A plain ``loss.backward()`` then yields, with
``G = dL/dW`` ``(m, n)`` never formed,

    lora_B.weight.grad[:, :r] = G Q,         lora_A.weight.grad[r:2r].T = G^T U,

the two products the Riemannian gradient needs (:func:`riemannlora.core.geometry.riemannian_gradient`).
The other blocks' gradients are computed by autograd and ignored by the Riemannian optimizers.
The base weights are never modified.

Starting points when converting an existing adapter:

* ``B == 0`` (PEFT's default init, ``X = 0``, formally off the manifold): ``U`` random with
  orthonormal columns (drawn from ``generator``), ``V = 0``, and ``Q`` an orthonormal basis of the
  existing ``lora_A`` rows (``qr(A^T).Q``). The first optimizer step moves X onto the manifold.
* otherwise: ``U R = qr(B)``, ``V = s (R A)^T``, so ``U V^T = s B A`` (the same X).

Bookkeeping lives in a small dict on each converted module,
``module._riemannlora_manifold[adapter] = {"rank", "offset", "orig_scaling", "orig_rank",
"orig_alpha", "orig_use_rslora"}``; PEFT's ``r``/``lora_alpha``/``use_rslora`` entries of the
layer are set to ``w``/``w``/``False`` so that anything recomputing the scaling gets 1.
``PeftModel.save_pretrained`` of a converted model is redirected to
:func:`riemannlora.export_adapter`, which writes a standard PEFT adapter, and
``PeftModel.load_adapter`` of such an adapter into the model's own adapter to
:func:`riemannlora.load_exported_adapter`, which restores the manifold form bit for bit (so
``transformers.Trainer`` checkpoints resume exactly). A diffusers model's ``save_pretrained``
writes the full model with the deltas merged, its ``save_lora_adapter`` the standard adapter
(:mod:`~riemannlora.manifold.hosts`). The redirections pickle and deep-copy with the model.

* :mod:`~riemannlora.manifold.layers` -- the layers: discovery, checks and the conversion;
* :mod:`~riemannlora.manifold.export` -- standard PEFT adapters out and back in;
* :mod:`~riemannlora.manifold.hosts` -- the redirection of the host model's ``save_pretrained``
  / ``load_adapter`` / ``save_lora_adapter``.
"""

from __future__ import annotations

import torch
from torch import nn

from riemannlora.manifold.export import export_adapter, is_exported_adapter
from riemannlora.manifold.hosts import load_exported_adapter, patch_host
from riemannlora.manifold.layers import MANIFOLD_ATTR, ManifoldLayer, convert, manifold_layers

__all__ = [
    "MANIFOLD_ATTR",
    "ManifoldLayer",
    "export_adapter",
    "is_exported_adapter",
    "load_exported_adapter",
    "manifold_layers",
    "to_manifold",
]


def to_manifold(
    model: nn.Module,
    *,
    generator: torch.Generator | None = None,
    with_offset: bool = False,
) -> list[ManifoldLayer]:
    """Convert every trainable PEFT LoRA adapter of ``model`` to manifold form (in place).

    Idempotent: adapters already in manifold form are left as they are. The model's outputs
    are unchanged (up to rounding); base weights are never touched. See the module docstring
    for the layout and the starting point of adapters with ``lora_B == 0``.

    Args:
        model: a ``peft.PeftModel`` (or any module holding PEFT LoRA ``Linear`` layers).
        generator: draws the random orthonormal ``U`` of adapters with ``lora_B == 0``
            (on ``generator.device``; global RNG when None).
        with_offset: also reserve a (zero) frozen offset block, width 3r, in every adapter.
            Needed to load a checkpoint (``model.load_state_dict``) of a model initialized with
            :func:`riemannlora.init_loi` into a fresh PEFT model.

    Returns:
        One :class:`ManifoldLayer` per trainable adapter, in module order.

    Raises:
        ValueError: no trainable LoRA adapter; rank larger than ``min(m, n)``; DoRA, lora_bias,
            LoRA variants or merged adapters.
        TypeError: LoRA on unsupported layer types (embeddings, convolutions, ...).
    """
    layers = convert(model, generator=generator, with_offset=with_offset)
    patch_host(model)
    return layers
