r"""Scaled (Riemannian-preconditioned) SGD and AdamW for LoRA.

Zhang & Pilanci, "Riemannian Preconditioned LoRA for Fine-Tuning Foundation Models", ICML 2024.
Each LoRA factor's gradient is multiplied by the inverse r x r Gram matrix of the other factor
(:func:`riemannlora.preconditioner.precondition_pairs`); the result then goes through the
unchanged update rule of ``torch.optim.SGD`` / ``torch.optim.AdamW`` (the same functional
kernels), so every parameter that is not a LoRA factor is updated bitwise as torch does it, and
the optimizer state is exactly torch's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam
from torch.optim.sgd import sgd

from riemannlora.pairs import LoraParams, as_lora_params
from riemannlora.preconditioner import precondition_pairs

__all__ = ["DEFAULT_REG", "DEFAULT_SCALE_AWARE", "ScaledAdamW", "ScaledSGD"]

#: Default damping of the Gram matrices (see README, "Choosing the defaults").
DEFAULT_REG = 1e-6
#: Default convention: precondition with the effective factor ``s * B``.
DEFAULT_SCALE_AWARE = True


def _check_number(name: str, value: Any, *, low: float | None = None, strict: bool = False) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if strict else value < low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value}")


def _lora_groups(params: LoraParams, extra: dict[str, Any]) -> list[dict[str, Any]]:
    if not params.pairs:
        raise ValueError(
            "no trainable LoRA pairs found: the model has no LoRA layer with trainable "
            "lora_A/lora_B (apply peft.get_peft_model(model, LoraConfig(...)) first, check that "
            "the adapter is active and trainable, or declare pairs with riemannlora.LoraPair)"
        )
    lora = {
        "params": [p for pair in params.pairs for p in (pair.a, pair.b)],
        "lora": True,
        "scalings": [pair.scaling for pair in params.pairs],
        "pair_names": [pair.name for pair in params.pairs],
        **extra,
    }
    for p in lora["params"]:
        if not p.requires_grad:
            raise ValueError("a LoRA factor does not require grad; unfreeze it or drop its pair")
    groups = [lora]
    if params.others:
        groups.append({"params": list(params.others), "lora": False, **extra})
    return groups


class _ScaledMixin:
    """Shared plumbing: pairing metadata in param groups, preconditioning, safe state loading."""

    param_groups: list[dict[str, Any]]
    state: dict

    def _extra_defaults(self, reg: float, scale_aware: bool, gram_dtype) -> dict[str, Any]:
        _check_number("reg", reg, low=0.0)
        if not isinstance(scale_aware, bool):
            raise TypeError(f"scale_aware must be a bool, got {type(scale_aware).__name__}")
        if gram_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(
                f"gram_dtype must be None, torch.float32 or torch.float64, got {gram_dtype}"
            )
        return {"reg": float(reg), "scale_aware": scale_aware, "gram_dtype": gram_dtype}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group. Plain parameters get the plain rule; LoRA groups need ``lora=True``,
        params ``[A0, B0, A1, B1, ...]`` and one ``scalings`` entry per pair."""
        param_group.setdefault("lora", False)
        if param_group["lora"]:
            params = list(param_group["params"])
            scalings = param_group.get("scalings")
            if scalings is None or len(params) != 2 * len(scalings):
                raise ValueError(
                    "a LoRA param group needs params [A0, B0, A1, B1, ...] and one 'scalings' "
                    "entry per pair; build it from riemannlora.find_lora_pairs(model)"
                )
            # validates shapes (raises on mismatched pairs)
            from riemannlora.pairs import LoraPair

            for k in range(len(scalings)):
                LoraPair(params[2 * k], params[2 * k + 1], scalings[k], f"pair {k}")
        super().add_param_group(param_group)  # type: ignore[misc]

    @staticmethod
    def _preconditioned_grads(
        group: dict[str, Any], params_with_grad: list[Tensor]
    ) -> list[Tensor]:
        params = group["params"]
        a, b = params[0::2], params[1::2]
        ga = [p.grad for p in a]
        gb = [p.grad for p in b]
        da, db = precondition_pairs(
            a, b, ga, gb, group["scalings"], group["reg"], group["scale_aware"], group["gram_dtype"]
        )
        by_id = {id(p): d for p, d in zip(a, da)}
        by_id.update({id(p): d for p, d in zip(b, db)})
        return [by_id[id(p)] for p in params_with_grad]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, after checking it belongs to the same LoRA layout."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError(
                f"optimizer state dict has {len(groups) if isinstance(groups, list) else 'no'} "
                f"param groups, this optimizer has {len(self.param_groups)}: it was saved for "
                "another model or configuration"
            )
        for mine, saved in zip(self.param_groups, groups):
            if bool(saved.get("lora", False)) != bool(mine["lora"]) or len(saved["params"]) != len(
                mine["params"]
            ):
                raise ValueError(
                    "optimizer state dict does not match this optimizer's LoRA pairs (different "
                    "number of pairs or parameters): it was saved for another model"
                )
            for idx, p in zip(saved["params"], mine["params"]):
                st = state_dict["state"].get(idx, {})
                for k, v in st.items():
                    if isinstance(v, Tensor) and v.dim() > 0 and v.shape != p.shape:
                        raise ValueError(
                            f"optimizer state '{k}' has shape {tuple(v.shape)} but the parameter "
                            f"is {tuple(p.shape)}: the state dict is from another model or rank"
                        )
        super().load_state_dict(state_dict)  # type: ignore[misc]


class ScaledAdamW(_ScaledMixin, torch.optim.AdamW):
    r"""AdamW on Riemannian-preconditioned LoRA gradients ("scaled AdamW").

    For each LoRA pair the preconditioned gradients ``D_A = (c B^T B + reg I)^{-1} G_A`` and
    ``D_B = G_B (A A^T + reg I)^{-1} / c`` (``c = s^2`` when ``scale_aware``, else 1) replace the
    raw gradients *before* the Adam moments::

        p <- p (1 - lr wd);  m <- b1 m + (1 - b1) D;  v <- b2 v + (1 - b2) D^2
        p <- p - lr m_hat / (sqrt(v_hat) + eps)

    Every other trainable parameter follows ``torch.optim.AdamW`` bitwise. State is AdamW's.
    ``.grad`` is never modified.

    Args:
        model: the model (e.g. a ``peft.PeftModel``), ``find_lora_pairs(model)`` or a list of
            :class:`~riemannlora.LoraPair`.
        lr, betas, eps, weight_decay, amsgrad, maximize, foreach: as ``torch.optim.AdamW``
            (``weight_decay`` defaults to 0, the usual LoRA setting).
        reg: damping of the Gram matrices (``>= 0``).
        scale_aware: precondition with the effective factor ``s B`` (True) or ``B`` as in the
            paper (False).
        bias_correction: Adam bias correction (on, as torch; off reproduces some reference runs).
        gram_dtype: ``torch.float64`` to run the r x r algebra in double precision.
    """

    def __init__(
        self,
        model: Any,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        reg: float = DEFAULT_REG,
        scale_aware: bool = DEFAULT_SCALE_AWARE,
        *,
        bias_correction: bool = True,
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        gram_dtype: torch.dtype | None = None,
    ) -> None:
        _check_number("lr", lr, low=0.0, strict=True)
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for k, beta in enumerate(betas):
            _check_number(f"betas[{k}]", beta)
            if not 0.0 <= float(beta) < 1.0:
                raise ValueError(f"betas[{k}] must be in [0, 1), got {beta}")
        _check_number("eps", eps, low=0.0)
        _check_number("weight_decay", weight_decay, low=0.0)
        if not bias_correction and (amsgrad or maximize):
            raise ValueError("bias_correction=False supports neither amsgrad nor maximize")
        extra = self._extra_defaults(reg, scale_aware, gram_dtype)
        extra["bias_correction"] = bool(bias_correction)
        groups = _lora_groups(as_lora_params(model), extra)
        super().__init__(
            groups,
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
        )
        self.defaults.update(extra)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step (``closure`` re-evaluates the model, as in torch)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
            has_complex = self._init_group(
                group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps
            )
            if not params:
                continue
            if group["lora"]:
                grads = self._preconditioned_grads(group, params)
            beta1, beta2 = group["betas"]
            if group.get("bias_correction", True):
                adam(
                    params,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    max_exp_avg_sqs,
                    steps,
                    amsgrad=group["amsgrad"],
                    has_complex=has_complex,
                    beta1=beta1,
                    beta2=beta2,
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    maximize=group["maximize"],
                    foreach=group["foreach"],
                    capturable=group["capturable"],
                    differentiable=group["differentiable"],
                    fused=group["fused"],
                    decoupled_weight_decay=True,
                )
            else:
                _adam_without_bias_correction(
                    params, grads, exp_avgs, exp_avg_sqs, steps, beta1, beta2, group
                )
        return loss


def _adam_without_bias_correction(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    beta1: float,
    beta2: float,
    group: dict[str, Any],
) -> None:
    """``p <- p (1 - lr wd) - lr m / (sqrt(v) + eps)`` without the ``1 - beta^t`` factors."""
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    torch._foreach_add_(steps, 1)
    if wd:
        torch._foreach_mul_(params, 1 - lr * wd)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr)


class ScaledSGD(_ScaledMixin, torch.optim.SGD):
    r"""SGD on Riemannian-preconditioned LoRA gradients ("scaled GD").

    ``p <- p (1 - lr wd)`` (decoupled, applied after ``D`` is computed), then
    ``A <- A - lr D_A``, ``B <- B - lr D_B`` with ``D`` as in :class:`ScaledAdamW`. Optional heavy-ball
    ``momentum`` (an extension; the paper has none) is torch's SGD momentum applied to ``D``.
    Other parameters follow ``torch.optim.SGD`` (with the same decoupled weight decay).

    Args:
        model: the model, ``find_lora_pairs(model)`` or a list of :class:`~riemannlora.LoraPair`.
        lr: learning rate (> 0).
        weight_decay: decoupled weight decay (``>= 0``).
        reg, scale_aware, gram_dtype: as :class:`ScaledAdamW`.
        momentum, dampening, nesterov, maximize, foreach: as ``torch.optim.SGD``.
    """

    def __init__(
        self,
        model: Any,
        lr: float,
        weight_decay: float = 0.0,
        reg: float = DEFAULT_REG,
        scale_aware: bool = DEFAULT_SCALE_AWARE,
        *,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        gram_dtype: torch.dtype | None = None,
    ) -> None:
        _check_number("lr", lr, low=0.0, strict=True)
        _check_number("weight_decay", weight_decay, low=0.0)
        _check_number("momentum", momentum, low=0.0)
        _check_number("dampening", dampening)
        extra = self._extra_defaults(reg, scale_aware, gram_dtype)
        groups = _lora_groups(as_lora_params(model), extra)
        super().__init__(
            groups,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
        )
        self.defaults.update(extra)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step (``closure`` re-evaluates the model, as in torch)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            momentum_buffers: list[Tensor | None] = []
            has_sparse = self._init_group(group, params, grads, momentum_buffers)
            if not params:
                continue
            if group["lora"]:
                grads = self._preconditioned_grads(group, params)
            wd = group["weight_decay"]  # decoupled: applied here, not added to the gradient
            if wd:
                torch._foreach_mul_(params, 1 - group["lr"] * wd)
            sgd(
                params,
                grads,
                momentum_buffers,
                weight_decay=0.0,
                momentum=group["momentum"],
                lr=group["lr"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
                has_sparse_grad=has_sparse,
                foreach=group["foreach"],
                fused=group["fused"],
            )
            if group["momentum"] != 0:
                for p, buf in zip(params, momentum_buffers):
                    self.state[p]["momentum_buffer"] = buf
        return loss
