"""Crash-safe training checkpoints: trainable weights, optimizer, scheduler, RNG, extras.

A checkpoint is one ``torch.save`` file written atomically. It goes to a temporary file in the
same directory, is flushed and ``fsync``-ed, and then ``os.replace``-d over the target, and the
directory is ``fsync``-ed too. A crash at any moment leaves either the previous checkpoint or the
new one, never a torn file. Loading validates everything against the live objects before it
changes any of them, so a checkpoint of another model fails cleanly::

    save_checkpoint("run/last.pt", model=model, optimizer=opt, scheduler=sched, extra={"step": t})
    ...
    extra = load_checkpoint("run/last.pt", model=model, optimizer=opt, scheduler=sched)

With the default ``trainable_only=True`` only parameters with ``requires_grad`` are stored (for
LoRA: the adapters and heads, not the frozen base model, which is rebuilt from its source).
The RNG states (torch CPU and CUDA, Python's ``random``) are stored and restored, so dropout and
data shuffling after a resume match an uninterrupted run. This is for single-process training and
DDP (save on rank 0). FSDP2 (DTensor) state needs ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import random
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import torch
from torch import nn

__all__ = ["atomic_write", "load_checkpoint", "save_checkpoint"]

FORMAT = "riemannlora-checkpoint"
VERSION = 1


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Open a binary file that appears at ``path`` only complete (temp file + fsync + replace)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename durable (not possible on every OS)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _model_state(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    if not trainable_only:
        return model.state_dict()
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    extra: dict[str, Any] | None = None,
    trainable_only: bool = True,
    rng: bool = True,
) -> pathlib.Path:
    """Write a checkpoint atomically to ``path`` and return the path.

    Args:
        model: its trainable parameters (``trainable_only``) or its whole ``state_dict()``.
        optimizer, scheduler: their ``state_dict()``.
        extra: anything ``torch.load(weights_only=True)`` can read back (numbers, strings,
            tensors, lists, dicts), e.g. the step counter.
        rng: store the RNG states (restored by :func:`load_checkpoint`).
    """
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
    payload: dict[str, Any] = {"format": FORMAT, "version": VERSION, "extra": dict(extra or {})}
    if model is not None:
        payload["model"] = _model_state(model, trainable_only)
        payload["trainable_only"] = trainable_only
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        payload["scheduler"] = scheduler.state_dict()
    if rng:
        payload["rng"] = _rng_state()
    path = pathlib.Path(path)
    with atomic_write(path) as f:
        torch.save(payload, f)
    return path


def _check_model_state(model: nn.Module, saved: dict[str, torch.Tensor], trainable_only: bool):
    live = _model_state(model, trainable_only)
    missing = sorted(set(live) - set(saved))
    unexpected = sorted(set(saved) - set(live))
    if missing or unexpected:
        raise ValueError(
            "checkpoint does not match the model (another model or LoRA config?): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, t in saved.items():
        if tuple(t.shape) != tuple(live[name].shape):
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {tuple(t.shape)}, the model's is "
                f"{tuple(live[name].shape)}: another model or LoRA rank"
            )


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into the given objects; return ``extra``.

    Everything is validated first (format, model names and shapes, optimizer layout through
    its own ``load_state_dict`` checks); when an error is raised the model is unchanged.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"cannot read checkpoint {str(path)!r} (truncated or corrupt): {exc}"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a riemannlora checkpoint")
    if payload.get("version", 0) > VERSION:
        raise ValueError(
            f"checkpoint {str(path)!r} has format version {payload['version']}, this riemannlora "
            f"reads up to {VERSION}: upgrade riemannlora"
        )
    for what, obj in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is not None and what not in payload:
            raise ValueError(f"checkpoint {str(path)!r} holds no {what} state")
    if model is not None:
        _check_model_state(model, payload["model"], payload["trainable_only"])
    if optimizer is not None:  # validates before it loads anything (riemannlora optimizers)
        optimizer.load_state_dict(payload["optimizer"])
    if model is not None:
        with torch.no_grad():
            model.load_state_dict(payload["model"], strict=not payload["trainable_only"])
    if scheduler is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if restore_rng and "rng" in payload:
        _set_rng_state(payload["rng"])
    return payload["extra"]
