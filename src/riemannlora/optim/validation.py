"""Argument and state validation shared by the optimizers: fail early, name the problem, and
leave model and optimizer untouched."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from riemannlora.distributed import local

__all__ = [
    "check_beta",
    "check_betas",
    "check_bool",
    "check_group_hyperparameters",
    "check_lora_pair",
    "check_manifold_state_dict",
    "check_number",
    "check_state_dict",
    "check_state_dict_header",
    "run_closure",
]


def check_bool(name: str, value: Any) -> None:
    """Raise unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def check_beta(name: str, value: Any) -> None:
    """Raise unless ``value`` is a number in ``[0, 1)`` (a momentum or an Adam beta)."""
    check_number(name, value)
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def check_betas(name: str, betas: Any) -> None:
    """Raise unless ``betas`` is a pair of numbers in ``[0, 1)`` (Adam's betas)."""
    if not isinstance(betas, tuple | list) or len(betas) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {betas!r}")
    for k, beta in enumerate(betas):
        check_beta(f"{name}[{k}]", beta)


def check_number(name: str, value: Any, *, low: float | None = None, strict: bool = False) -> None:
    """Raise unless ``value`` is a finite real number (``>= low``, or ``> low`` if ``strict``)."""
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


def run_closure(closure: Callable[[], Any] | None) -> Any:
    """Call ``closure`` with gradients enabled; its result must be a loss or ``None``."""
    if closure is None:
        return None
    if not callable(closure):
        raise TypeError(f"closure must be callable or None, got {type(closure).__name__}")
    with torch.enable_grad():
        loss = closure()
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, Tensor | int | float)):
        raise TypeError(
            f"closure must return the loss (a tensor or a number) or None, got "
            f"{type(loss).__name__}; nothing was updated"
        )
    return loss


#: what to use instead of DeepSpeed ZeRO (which flattens the parameters into partitions)
SHARDED_ROUTE = (
    "DeepSpeed ZeRO does this: it flattens the parameters into partitions, so LoRA pairs "
    "cannot be found and the Riemannian step cannot run. Shard with PyTorch FSDP2 instead "
    "(torch.distributed.fsdp.fully_shard; Accelerate/Trainer: fsdp_version 2), or use DDP."
)


def check_group_hyperparameters(index: int, group: dict[str, Any]) -> None:
    """Non-finite hyper-parameters set after construction (e.g. by a scheduler) fail loudly."""
    values = [(k, group[k]) for k in ("lr", "weight_decay", "eps", "momentum") if k in group]
    values += [(f"betas[{k}]", v) for k, v in enumerate(group.get("betas", ()))]
    for key, value in values:
        if isinstance(value, float | int) and not math.isfinite(value):
            raise ValueError(f"param group {index}: {key} is {value}; nothing was updated")
    lr = group["lr"]
    if isinstance(lr, float | int) and lr < 0:
        raise ValueError(f"param group {index}: lr must be >= 0, got {lr}; nothing was updated")
    pairs = group.get("scalings") if group.get("lora") else group.get("layer_names")
    if (group.get("lora") or group.get("manifold")) and len(group["params"]) != 2 * len(pairs):
        raise RuntimeError(
            f"param group {index} holds {len(group['params'])} tensors for {len(pairs)} LoRA "
            f"pairs: a wrapper replaced the optimizer's parameters. {SHARDED_ROUTE}"
        )


def check_lora_pair(a: Tensor, b: Tensor, name: Callable[[Tensor], str]) -> None:
    """Cheap per-step checks of a pair that may have changed since construction (``name(p)``
    names a parameter; called only to build an error message)."""
    if a.shape[0] != b.shape[1]:
        raise ValueError(
            f"LoRA pair {name(a)!r}: lora_A is {tuple(a.shape)} but lora_B is {tuple(b.shape)} "
            "(the factors were resized after the optimizer was built); build a new optimizer"
        )
    for p in (a, b):
        if p.grad is not None and p.grad.layout != torch.strided:
            raise TypeError(
                f"LoRA factor {name(p)!r}: {p.grad.layout} gradients are not supported (the "
                "preconditioner needs dense gradients); disable sparse gradients for LoRA layers"
            )


def check_state_dict_header(
    opt: torch.optim.Optimizer, state_dict: Any
) -> tuple[list[Any], dict[Any, Any]]:
    """Raise unless ``state_dict`` is an optimizer state dict with as many param groups as
    ``opt``; return its ``(param_groups, state)``."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    groups, state = state_dict.get("param_groups"), state_dict.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict):
        raise ValueError("not an optimizer state dict: 'state' or 'param_groups' missing")
    if len(groups) != len(opt.param_groups):
        raise ValueError(
            f"optimizer state dict has {len(groups)} param groups, this optimizer has "
            f"{len(opt.param_groups)}: it was saved for another model or configuration"
        )
    return groups, state


def check_state_dict(
    opt: torch.optim.Optimizer,
    state_dict: Any,
    state_keys: Callable[[dict[str, Any]], tuple[str, ...]],
    name: Callable[[Tensor], str],
) -> None:
    """Raise if ``state_dict`` was not saved by an optimizer of ``opt``'s type for this LoRA
    layout (groups, pairs, scalings, shapes, the ``state_keys(group)`` of every non-empty
    per-parameter state) or holds NaN/Inf. ``name(p)`` names parameters in messages."""
    groups, state = check_state_dict_header(opt, state_dict)
    for mine, saved in zip(opt.param_groups, groups):
        if not isinstance(saved, dict) or "params" not in saved:
            raise ValueError("optimizer state dict has a malformed param group")
        if bool(saved.get("lora", False)) != bool(mine["lora"]) or len(saved["params"]) != len(
            mine["params"]
        ):
            raise ValueError(
                "optimizer state dict does not match this optimizer's LoRA pairs (different "
                "number of pairs or parameters): it was saved for another model"
            )
        if mine["lora"] and not _same_scalings(saved.get("scalings"), mine["scalings"]):
            raise ValueError(
                f"optimizer state dict was saved for LoRA scalings {saved.get('scalings')} but "
                f"this model has {mine['scalings']}: another model (lora_alpha or rank differ)"
            )
        keys = state_keys(mine)
        for idx, p in zip(saved["params"], mine["params"]):
            st = state.get(idx, {})
            missing = [k for k in keys if k not in st] if st else []
            if missing:
                raise ValueError(
                    f"optimizer state of {name(p)} lacks {missing}: the state dict was "
                    f"saved by another optimizer type than {type(opt).__name__}"
                )
            for k, v in st.items():
                if isinstance(v, Tensor):
                    _check_state_tensor(k, v, () if v.dim() == 0 else tuple(p.shape), p, name)


def _same_scalings(saved: Any, mine: list[float]) -> bool:
    if not isinstance(saved, list | tuple) or len(saved) != len(mine):
        return False
    return all(
        isinstance(s, int | float) and math.isclose(s, m, rel_tol=1e-6) for s, m in zip(saved, mine)
    )


def check_manifold_state_dict(
    opt: torch.optim.Optimizer,
    state_dict: Any,
    class_keys: tuple[str, ...],
    momentum_keys: tuple[str, ...],
    name: Callable[[Tensor], str],
) -> None:
    """Raise unless ``state_dict`` was saved by a manifold optimizer of ``opt``'s class for the
    same manifold layers and parameters, with finite values of the right shapes. ``class_keys``:
    the param-group keys that tell the manifold optimizers apart; ``momentum_keys``: the
    momentum's state entries (see :mod:`riemannlora.optim._momentum`); ``name(p)`` names a
    parameter in messages."""
    groups, state = check_state_dict_header(opt, state_dict)
    cls = type(opt).__name__
    for mine, saved in zip(opt.param_groups, groups):
        if not isinstance(saved, dict) or len(saved.get("params", ())) != len(mine["params"]):
            raise ValueError(
                "optimizer state dict does not match this optimizer's parameters (different "
                "number of parameters in a group): it was saved for another model"
            )
        if bool(saved.get("manifold")) != mine["manifold"]:
            raise ValueError("optimizer state dict was saved by another optimizer class")
        if mine["manifold"]:
            if {k for k in class_keys if k in saved} != {k for k in class_keys if k in mine}:
                raise ValueError(
                    f"optimizer state dict was saved by another manifold optimizer than "
                    f"{cls} (Riemannion and RiemannianSGD keep different momenta)"
                )
            for key in ("layer_names", "ranks", "offsets"):
                if list(saved.get(key, [])) != list(mine[key]):
                    raise ValueError(
                        f"optimizer state dict does not match this model's manifold layers "
                        f"({key} differ: saved {saved.get(key)!r}, model {mine[key]!r}). "
                        "Convert the model the same way first (with_offset=True for a run "
                        "started with init_loi)."
                    )
        for k, (idx, p) in enumerate(zip(saved["params"], mine["params"])):
            st = state.get(idx, {})
            for key, value in st.items() if isinstance(st, dict) else ():
                if not isinstance(value, Tensor):
                    continue
                if mine["manifold"] and key in momentum_keys:
                    r = mine["ranks"][k // 2]
                    expected: tuple[int, ...] = {
                        "momentum_left": (p.shape[0], 2 * r),
                        "momentum_right": (p.shape[1], 2 * r),
                        "momentum_core": (2 * r, 2 * r),
                    }.get(key, (2 * r, r))
                else:
                    expected = () if value.dim() == 0 else tuple(p.shape)
                _check_state_tensor(key, value, expected, p, name)


def _check_state_tensor(
    key: str, value: Tensor, expected: tuple[int, ...], p: Tensor, name: Callable[[Tensor], str]
) -> None:
    """Raise unless the state entry ``key`` of ``p`` has the ``expected`` shape and is finite."""
    if tuple(value.shape) != expected:
        raise ValueError(
            f"optimizer state '{key}' of {name(p)} has shape {tuple(value.shape)}, expected "
            f"{expected}: the state dict is from another model or rank"
        )
    if value.is_floating_point() and not bool(torch.isfinite(local(value)).all()):
        raise ValueError(
            f"optimizer state '{key}' of {name(p)} holds NaN/Inf: the checkpoint is corrupt; "
            "nothing was loaded"
        )
