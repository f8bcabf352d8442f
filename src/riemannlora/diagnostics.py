"""What an optimizer does to the LoRA layers, in numbers a user can log and plot.

:func:`snapshot` before ``optimizer.step()`` (gradients present), :func:`diagnostics` after it:

* ``grad_norm``: the norm of the gradient the optimizer uses -- the Riemannian gradient for
  Riemannion / RiemannianSGD (plus the other trainable parameters' gradients,
  :func:`riemannlora.clip_grad_norm_`), the LoRA factors' and other parameters' Euclidean
  gradient for the scaled optimizers;
* per LoRA layer: ``step_size`` ``||dW_after - dW_before||_F``, the change of the weight delta
  the layer adds; ``delta_norm`` ``||dW||_F``; ``stable_rank`` ``||dW||_F^2 / ||dW||_2^2`` of
  that delta (how many directions the adapter really uses, between 1 and its rank);
* for the scaled optimizers, per layer the condition numbers of the preconditioner's Grams
  ``cond(s^2 B^T B + reg I)`` and ``cond(A A^T + reg I)`` (``gram_cond_b``, ``gram_cond_a``):
  where they blow up the preconditioner amplifies noise;
* ``skipped_steps`` (non-finite gradients).

Everything is computed in float64 from r x r (or 2r x 2r) matrices, never the m x n delta: a
few tall-skinny products per layer, meant for every N steps, not every step. FSDP2 factors are
gathered (``full_tensor``). The summary keys (``*_mean``, ``*_max``, ``*_min``) are flat
scalars for loggers; ``layers`` holds the per-layer values.

:class:`DiagnosticsCallback` does this inside ``transformers.Trainer`` / TRL every
``every`` steps. ``riemannlora bench`` records the same numbers per run and plots them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from riemannlora.clip import clip_grad_norm_, unwrap_optimizer
from riemannlora.distributed import is_dtensor

__all__ = ["DiagnosticsCallback", "Snapshot", "diagnostics", "snapshot"]

_F64 = torch.float64


def _full(t: Tensor) -> Tensor:
    t = t.detach()
    return (t.full_tensor() if is_dtensor(t) else t).to(_F64, copy=True)  # never a view


@dataclass
class _Factors:
    """A layer's weight delta as ``L R^T`` (float64; ``L`` ``(m, k)``, ``R`` ``(n, k)``)."""

    name: str
    L: Tensor
    R: Tensor


@dataclass
class Snapshot:
    """The LoRA deltas and the gradient norm before a step (see :func:`snapshot`)."""

    factors: dict[str, _Factors] = field(default_factory=dict)
    grad_norm: float | None = None


def _manifold_factors(opt: Any) -> list[_Factors]:
    out = []
    for layer in opt._layers:
        L, R = _full(layer.U()), _full(layer.V())
        if layer.offset:  # dW = X - X0 = [U | U0] [V | -V0]^T
            L = torch.cat([L, _full(layer.U0())], dim=1)
            R = torch.cat([R, -_full(layer.V0())], dim=1)
        out.append(_Factors(layer.name, L, R))
    return out


def _pair_factors(opt: Any) -> list[tuple[_Factors, Tensor, Tensor]]:
    """(delta factors, Gram of B as preconditioned, Gram of A) of every LoRA pair of a scaled
    optimizer (``reg`` added; ``c = s^2`` with ``scale_aware``)."""
    out = []
    for group in opt.param_groups:
        if not group.get("lora"):
            continue
        names = group.get("pair_names") or [f"pair{k}" for k in range(len(group["scalings"]))]
        reg = float(group.get("reg", opt.defaults.get("reg", 0.0)))
        aware = bool(group.get("scale_aware", opt.defaults.get("scale_aware", True)))
        for k, s in enumerate(group["scalings"]):
            a, b = _full(group["params"][2 * k]), _full(group["params"][2 * k + 1])
            a2 = a.reshape(a.shape[0], -1)  # (r, n): convolutions as matrices
            b2 = b.reshape(b.shape[0], b.shape[1])  # (m, r)
            eye = torch.eye(a2.shape[0], dtype=_F64, device=a2.device)
            c = s * s if aware else 1.0
            grams = (c * (b2.mT @ b2) + reg * eye, a2 @ a2.mT + reg * eye)
            out.append((_Factors(names[k], s * b2, a2.mT), *grams))
    return out


def _model_factors(model: Any) -> list[_Factors]:
    """The LoRA deltas of a model trained by an optimizer that knows no pairs (torch's AdamW)."""
    from riemannlora.pairs import find_lora_pairs

    out = []
    for pair in find_lora_pairs(model):
        a, b = _full(pair.a), _full(pair.b)
        a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], b.shape[1])
        out.append(_Factors(pair.name, pair.scaling * b2, a2.mT))
    return out


def _layers(opt: Any, model: Any = None) -> tuple[bool, list[_Factors]]:
    opt = unwrap_optimizer(opt)
    if hasattr(opt, "_layers"):
        return True, _manifold_factors(opt)
    if any(group.get("lora") for group in opt.param_groups) or model is None:
        return False, [f for f, *_ in _pair_factors(opt)]
    return False, _model_factors(model)


def _grad_norm(opt: Any, manifold: bool) -> float | None:
    inner = unwrap_optimizer(opt)
    if manifold:
        return float(clip_grad_norm_(inner, float("inf")))
    grads = [p.grad for g in inner.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([_full(g).norm() for g in grads])))


def snapshot(optimizer: Any, model: Any = None) -> Snapshot:
    """The LoRA deltas (as small factors) and the gradient norm, before ``optimizer.step()``.
    Call it after ``backward()``. ``model``: where to find the LoRA pairs when the optimizer is
    not riemannlora's (e.g. ``torch.optim.AdamW``)."""
    manifold, factors = _layers(optimizer, model)
    return Snapshot({f.name: f for f in factors}, _grad_norm(optimizer, manifold))


def _sq_norm(L: Tensor, R: Tensor) -> float:
    """``||L R^T||_F^2 = tr((L^T L)(R^T R))``."""
    return float(((L.mT @ L) * (R.mT @ R)).sum().clamp_min(0.0))


def _top_singular_sq(L: Tensor, R: Tensor) -> float:
    """``||L R^T||_2^2`` from the QR factors of ``L`` and ``R``."""
    core = torch.linalg.qr(L, mode="r")[1] @ torch.linalg.qr(R, mode="r")[1].mT
    return float(torch.linalg.matrix_norm(core, ord=2) ** 2)


def _cond(gram: Tensor) -> float:
    w = torch.linalg.eigvalsh(gram)
    return float(w[-1] / w[0]) if float(w[0]) > 0 else math.inf


def diagnostics(
    optimizer: Any, before: Snapshot | None = None, model: Any = None
) -> dict[str, Any]:
    """The numbers of the module docstring after a step; ``before``: the :func:`snapshot`
    taken before it (without it there are no step sizes and no gradient norm); ``model`` as
    for :func:`snapshot`."""
    inner = unwrap_optimizer(optimizer)
    manifold, factors = _layers(inner, model)
    layers: dict[str, dict[str, float]] = {}
    for f in factors:
        sq = _sq_norm(f.L, f.R)
        entry = {
            "delta_norm": math.sqrt(sq),
            "stable_rank": sq / _top_singular_sq(f.L, f.R) if sq > 0 else 0.0,
        }
        old = None if before is None else before.factors.get(f.name)
        if old is not None:
            step_sq = _sq_norm(torch.cat([f.L, old.L], 1), torch.cat([f.R, -old.R], 1))
            entry["step_size"] = math.sqrt(step_sq)
        layers[f.name] = entry
    if not manifold and any(group.get("lora") for group in inner.param_groups):
        for f, gram_b, gram_a in _pair_factors(inner):
            layers[f.name]["gram_cond_b"] = _cond(gram_b)
            layers[f.name]["gram_cond_a"] = _cond(gram_a)
    out: dict[str, Any] = {"skipped_steps": int(getattr(inner, "skipped_steps", 0))}
    if before is not None and before.grad_norm is not None:
        out["grad_norm"] = before.grad_norm
    for key in ("step_size", "delta_norm", "stable_rank", "gram_cond_a", "gram_cond_b"):
        values = [v[key] for v in layers.values() if key in v]
        if values:
            out[f"{key}_mean"] = sum(values) / len(values)
            out[f"{key}_max"] = max(values)
            out[f"{key}_min"] = min(values)
    out["layers"] = layers
    return out


try:  # the callback needs transformers; the functions above do not
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is an optional dependency
    TrainerCallback = object  # type: ignore[assignment,misc]


class DiagnosticsCallback(TrainerCallback):  # type: ignore[misc,valid-type]
    """``transformers.Trainer`` / TRL callback: :func:`diagnostics` every ``every`` optimizer
    steps, merged into the next log as ``riemannlora/<key>`` scalars (``RiemannTrainer`` and
    ``RiemannSFTTrainer`` pass them to every logger; with a plain Trainer they reach
    ``state.log_history`` and the loggers that run after this callback). ``path``: also append
    each record, per-layer values included, as one JSON line to this file (main process)."""

    def __init__(self, every: int = 10, path: str | os.PathLike[str] | None = None) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        self.every = every
        self.path = path
        self._before: Snapshot | None = None
        self.pending: dict[str, float] = {}  # the scalars of the last record, until logged
        self.history: list[dict[str, Any]] = []

    def _due(self, state: Any) -> bool:
        return (state.global_step + 1) % self.every == 0 or state.global_step == 0

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer = kwargs.get("optimizer")
        self._before = snapshot(optimizer) if optimizer is not None and self._due(state) else None

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer = kwargs.get("optimizer")
        if self._before is None or optimizer is None:
            return
        record = diagnostics(optimizer, self._before)
        self._before = None
        record["step"] = state.global_step + 1
        self.history.append(record)
        self.pending = {
            f"riemannlora/{k}": float(v) for k, v in record.items() if k not in ("layers", "step")
        }
        if self.path is not None and state.is_world_process_zero:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if self.pending and logs is not None:
            logs.update(self.pending)
            if state.log_history and state.log_history[-1] is not logs:
                state.log_history[-1].update(self.pending)
            self.pending = {}

    def take_pending(self) -> dict[str, float]:
        """The scalars not logged yet (cleared); used by riemannlora's trainers."""
        out, self.pending = self.pending, {}
        return out
