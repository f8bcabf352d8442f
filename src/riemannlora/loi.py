r"""Locally optimal initialization (LOI) of LoRA adapters on the fixed-rank manifold.

Bogachev et al., arXiv 2507.12142. With ``G0 = dL/dW`` at the pretrained weights and its SVD
``G0 = U S V^T``, the starting point

    X0 = alpha U[:, :r] V[:, r:2r]^T        (U_pt = U[:, :r], V_pt = alpha V[:, r:2r])

makes the first Riemannian gradient ``P_{X0}(G0)`` equal to the best rank-2r approximation of
``G0`` (the largest possible first step). X0 is put in place together with the equal frozen
offset ``U0 V0^T = X0`` (see :mod:`riemannlora.manifold`), so the model's outputs are unchanged.

The top 2r singular pairs come from a randomized SVD that only needs products ``G0 Omega`` and
``G0^T Qy`` ("BackPropRSVD"), each one backward pass through temporarily width-k adapters
(``k = 2r + oversampling``, clipped to ``min(m, n)``), all layers at once:

    left factor 0, right factor Omega (n, k)   ->  dL/d(left)      = G0 Omega      (m, k)
    left factor Qy (m, k), right factor 0      ->  dL/d(right^T)^T = G0^T Qy       (n, k)

    Y = G0 Omega; Qy = qr(Y); repeat q times: Qy' = qr(G0^T Qy), Qy = qr(G0 Qy');
    Bsmall = (G0^T Qy)^T (k, n); Ub S V^T = svd(Bsmall); U = Qy Ub

in ``2 (q + 1)`` forward-backward passes of ``compute_loss`` on the same batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from riemannlora.core.geometry import compute_dtype, orthonormal_basis, qr_positive
from riemannlora.manifold.holders import check_replaceable
from riemannlora.manifold.hosts import patch_host
from riemannlora.manifold.layers import (
    group_indices,
    install,
    lora_targets,
    orig_entries,
    reject_sharded,
)

__all__ = ["LoiInfo", "default_loi_alpha", "init_loi"]


def default_loi_alpha(rank: int) -> float:
    """``-0.01 / sqrt(r)``: the paper's scale of X0 for LLMs (``-1/sqrt(r)`` for diffusion)."""
    return -0.01 / math.sqrt(rank)


@dataclass
class LoiInfo:
    """What :func:`init_loi` did.

    ``singular_values[name]``: estimated top-2r singular values of ``G0`` of each layer
    (float32 or better, on the CPU); ``alphas[name]``: the scale used; ``sketch_sizes[name]``:
    k; ``backward_passes``: number of ``compute_loss`` calls (``2 (power_iters + 1)``);
    ``loss``: the loss at the pretrained point.
    """

    singular_values: dict[str, Tensor] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    sketch_sizes: dict[str, int] = field(default_factory=dict)
    backward_passes: int = 0
    loss: float = float("nan")


def _evaluate(compute_loss: Callable[[], Any]) -> Tensor:
    loss = compute_loss()
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"compute_loss must return the loss as a scalar torch.Tensor, got "
            f"{type(loss).__name__} (e.g. return model(**batch).loss)"
        )
    if loss.numel() != 1:
        raise ValueError(
            f"compute_loss must return a scalar loss, got a tensor of shape "
            f"{tuple(loss.shape)}; reduce it (e.g. .mean())"
        )
    if not bool(torch.isfinite(loss.detach()).all()):
        raise ValueError(
            f"compute_loss returned a non-finite loss ({loss.item()}); check the batch and the "
            "model (LOI needs a finite gradient at the pretrained weights)"
        )
    if not loss.requires_grad:
        raise ValueError(
            "the loss returned by compute_loss does not depend on the LoRA layers with "
            "gradients enabled; run the model inside compute_loss and outside torch.no_grad()"
        )
    return loss.reshape(())


def _qr_batched(mats: list[Tensor], buckets: dict[Any, list[int]]) -> list[Tensor]:
    out: list[Tensor] = [mats[0]] * len(mats)
    for idx in buckets.values():
        Q = qr_positive(torch.stack([mats[i] for i in idx]))[0]
        for j, i in enumerate(idx):
            out[i] = Q[j]
    return out


def init_loi(
    model: nn.Module,
    compute_loss: Callable[[], Tensor],
    *,
    oversampling: int = 16,
    power_iters: int = 1,
    alpha: float | None = None,
    generator: torch.Generator | None = None,
) -> LoiInfo:
    """Locally optimal initialization of every trainable LoRA adapter of ``model`` (in place).

    Replaces each adapter (whatever it held) by the manifold form with point ``X0`` and frozen
    offset ``X0`` (width 3r), so the model's outputs equal the pretrained model's. Call it
    before creating the optimizer (:class:`riemannlora.Riemannion`). During the passes the model
    is in eval mode (no dropout, so every pass sees the same function) and every parameter but
    the temporary factors is frozen; modes and ``requires_grad`` flags are restored afterwards
    and no parameter's ``.grad`` is changed.

    Args:
        model: the PEFT model with LoRA on Linear layers (2r <= min(m, n) for every layer).
        compute_loss: zero-argument callable that runs the model on one fixed batch and returns
            the scalar loss (e.g. ``lambda: model(**batch).loss``); called ``2 (q + 1)`` times.
        oversampling: p >= 0, the sketch has ``k = 2r + p`` columns (clipped to ``min(m, n)``).
        power_iters: q >= 0 power iterations (paper: q = 1 for LLMs, 15 for diffusion).
        alpha: scale of ``X0`` (nonzero); default ``-0.01 / sqrt(r)`` per layer.
        generator: draws the Gaussian test matrices (on ``generator.device``).

    Returns:
        :class:`LoiInfo`.
    """
    if not callable(compute_loss):
        raise TypeError(
            f"compute_loss must be a zero-argument callable returning the loss, got "
            f"{type(compute_loss).__name__}"
        )
    for name, value in (("oversampling", oversampling), ("power_iters", power_iters)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, int | float):
            raise TypeError(f"alpha must be a number or None, got {type(alpha).__name__}")
        if not math.isfinite(alpha) or alpha == 0:
            raise ValueError(f"alpha must be finite and nonzero (X0 must have rank r), got {alpha}")

    targets = lora_targets(model)
    if not targets:
        raise ValueError(
            "no trainable LoRA adapter found in the model: apply peft.get_peft_model(model, "
            "LoraConfig(target_modules=[...])) first and check that the adapter is trainable"
        )
    reject_sharded(targets, "init_loi")
    check_replaceable(
        model,
        [
            p
            for t in targets
            for p in (t.module.lora_A[t.adapter].weight, t.module.lora_B[t.adapter].weight)
        ],
        "init_loi",
    )
    for t in targets:
        if 2 * t.rank > min(t.m, t.n):
            raise ValueError(
                f"LoRA layer {t.name!r}: LOI needs 2r <= min(out, in), got r={t.rank} for a "
                f"({t.m}, {t.n}) layer; lower r for this layer or initialize it otherwise"
            )
    ks = [min(2 * t.rank + oversampling, t.m, t.n) for t in targets]
    originals = [(t.module.lora_A[t.adapter], t.module.lora_B[t.adapter]) for t in targets]
    scalings = [t.module.scaling[t.adapter] for t in targets]
    origs = [orig_entries(t.module, t.adapter) for t in targets]
    modes = [(mod, mod.training) for mod in model.modules()]
    dtypes = [compute_dtype(a.weight) for a, _ in originals]
    keys = [
        (t.m, t.n, k, dt, a.weight.device)
        for t, k, dt, (a, _) in zip(targets, ks, dtypes, originals)
    ]
    buckets = group_indices(keys)
    info = LoiInfo()

    temps: list[tuple[nn.Linear, nn.Linear]] = []
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in grad_flags:
            p.requires_grad_(False)
        for t, k, (old_a, _) in zip(targets, ks, originals):
            w = old_a.weight
            tmp_a = nn.utils.skip_init(
                nn.Linear, t.n, k, bias=False, device=w.device, dtype=w.dtype
            )
            tmp_b = nn.utils.skip_init(
                nn.Linear, k, t.m, bias=False, device=w.device, dtype=w.dtype
            )
            t.module.lora_A[t.adapter] = tmp_a
            t.module.lora_B[t.adapter] = tmp_b
            t.module.scaling[t.adapter] = 1.0
            temps.append((tmp_a, tmp_b))

        def product(left: bool, mats: list[Tensor]) -> list[Tensor]:
            """``G mats`` (left, mats (n, k)) or ``G^T mats`` (right, mats (m, k)), all layers."""
            with torch.no_grad():
                for (tmp_a, tmp_b), mat in zip(temps, mats):
                    if left:
                        tmp_b.weight.zero_()
                        tmp_a.weight.copy_(mat.mT)
                    else:
                        tmp_b.weight.copy_(mat)
                        tmp_a.weight.zero_()
            wrt = [tb.weight if left else ta.weight for ta, tb in temps]
            for ta, tb in temps:
                ta.weight.requires_grad_(not left)
                tb.weight.requires_grad_(left)
            with torch.enable_grad():
                loss = _evaluate(compute_loss)
                info.backward_passes += 1
                if info.backward_passes == 1:
                    info.loss = float(loss.detach())
                # .backward(), not autograd.grad: works with reentrant activation checkpointing;
                # every other parameter is frozen, so no other .grad is touched
                loss.backward()
            grads = [w.grad for w in wrt]
            for w in wrt:
                w.grad = None
            out = []
            for t, g, dt in zip(targets, grads, dtypes):
                if g is None:
                    raise RuntimeError(
                        f"LoRA layer {t.name!r} gets no gradient from compute_loss; does the "
                        "loss use this layer's output?"
                    )
                out.append(g.to(dt) if left else g.mT.to(dt))
            return out

        gen_device = generator.device if generator is not None else torch.device("cpu")
        omegas = [
            torch.randn(t.n, k, generator=generator, device=gen_device, dtype=dt).to(
                originals[i][0].weight.device
            )
            for i, (t, k, dt) in enumerate(zip(targets, ks, dtypes))
        ]
        Qy = _qr_batched(product(True, omegas), buckets)
        for _ in range(power_iters):
            Qz = _qr_batched(product(False, Qy), buckets)
            Qy = _qr_batched(product(True, Qz), buckets)
        GtQy = product(False, Qy)  # (n, k) = Bsmall^T
    except BaseException:
        for t, (old_a, old_b), s in zip(targets, originals, scalings):
            t.module.lora_A[t.adapter] = old_a
            t.module.lora_B[t.adapter] = old_b
            t.module.scaling[t.adapter] = s
        raise
    finally:
        for mod, training in modes:
            mod.training = training
        for p, flag in grad_flags:
            p.requires_grad_(flag)

    with torch.no_grad():
        for idx in buckets.values():
            Ub, S, Vh = torch.linalg.svd(
                torch.stack([GtQy[i].mT for i in idx]), full_matrices=False
            )
            U = torch.stack([Qy[i] for i in idx]) @ Ub  # (L, m, k)
            for j, i in enumerate(idx):
                t = targets[i]
                r = t.rank
                a = default_loi_alpha(r) if alpha is None else float(alpha)
                U_pt = U[j, :, :r]
                V_pt = a * Vh[j, r : 2 * r].mT
                Q = orthonormal_basis(V_pt)
                install(
                    t.module, t.adapter, U_pt, V_pt, Q, U_pt, V_pt, orig=origs[i], like=originals[i]
                )
                info.singular_values[t.name] = S[j, : 2 * r].detach().cpu()
                info.alphas[t.name] = a
                info.sketch_sizes[t.name] = ks[i]
    patch_host(model)
    return info
