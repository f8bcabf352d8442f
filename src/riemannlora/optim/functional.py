"""torch's own AdamW kernel driven by a param group, shared by every optimizer of the package."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim.adam import adam

__all__ = ["adamw_from_group"]


def adamw_from_group(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    has_complex: bool,
) -> None:
    """``torch.optim.adam.adam`` with decoupled weight decay and the group's hyper-parameters,
    exactly as ``torch.optim.AdamW.step`` calls it (so results are bitwise torch's)."""
    beta1, beta2 = group["betas"]
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
