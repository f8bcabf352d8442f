"""What an optimizer step does with NaN/Inf gradients: skip it, raise, or let it through.

A non-finite gradient that reaches the weights ruins them, and through Adam's second moment it
ruins every later step too. The optimizers of this package check, before they change anything,
the raw gradients (Riemannion and RiemannianSGD: the gradient blocks their step reads) and the
preconditioned directions. ``nonfinite`` picks what happens then:

* ``"skip"`` (default): the whole step is skipped. No parameter, state or step counter changes,
  ``optimizer.skipped_steps`` goes up by one and a warning is logged. This is what AMP's
  ``GradScaler`` does on overflow, so a rare loss spike costs one batch, not the run. LR schedulers
  stepped by the caller still advance.
* ``"raise"``: :class:`NonFiniteError` naming the offending tensors, before anything changes.
* ``"off"``: no check and no host synchronization. NaN flows into the weights, as in torch.

The check costs one fused reduction and one host sync per step: the 2-norm of every tensor
(``torch._foreach_norm``, accumulated in float32 or better, no copies), stacked, one
``isfinite().all()``. A norm that overflows float32 (entries beyond about ``1e19``) counts as
non-finite, which is also where AdamW's second moment ``g^2`` overflows (the infinity norm would
avoid that, at a higher cost). The manifold optimizers pass, per group of equal-shape
layers, the sums of the stacked gradient blocks instead of the gradients themselves (one
reduction per group; NaN or Inf anywhere makes the sum non-finite). With sharded (DTensor) tensors it reads the local shards and
all-reduces the verdict, so that every rank skips the same steps.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from riemannlora import distributed

__all__ = ["NONFINITE_CHOICES", "NonFiniteError", "NonFiniteGuard", "all_finite"]

#: Accepted values of the optimizers' ``nonfinite`` argument.
NONFINITE_CHOICES = ("skip", "raise", "off")

logger = logging.getLogger("riemannlora")


class NonFiniteError(FloatingPointError):
    """A gradient or preconditioned direction holds NaN or Inf (``nonfinite="raise"``)."""


def all_finite(tensors: Sequence[Tensor], sharded_like: Sequence[Tensor] = ()) -> bool:
    """Whether every tensor is free of NaN/Inf (and of float32-overflowing norms): one fused
    reduction per (device, dtype), one host sync.

    DTensors are checked through their local shards and the verdict is all-reduced over their
    meshes, so all ranks return the same answer. Plain tensors that are local pieces of sharded
    ones (e.g. the directions of FSDP2 factors) name those DTensors in ``sharded_like``.
    """
    buckets: dict[tuple, list[Tensor]] = defaultdict(list)
    meshes = []
    for t in sharded_like:
        if distributed.is_dtensor(t) and t.device_mesh not in meshes:
            meshes.append(t.device_mesh)
    for t in tensors:
        if distributed.is_dtensor(t):
            if t.device_mesh not in meshes:
                meshes.append(t.device_mesh)
            t = t.to_local()
        if t.numel():
            buckets[(t.device, t.dtype)].append(t)
    norms = [
        torch.stack(torch._foreach_norm(ts, 2, dtype=torch.promote_types(dtype, torch.float32)))
        for (_, dtype), ts in buckets.items()
    ]
    if not norms and not meshes:
        return True
    device = norms[0].device if norms else torch.device("cpu")
    flag = torch.zeros((), dtype=torch.bool, device=device)
    for n in norms:  # NaN and Inf both fail isfinite; one bucket per (device, dtype)
        flag = flag | ~torch.isfinite(n).all().to(device)
    if meshes:
        flag = distributed.any_across(flag, meshes)
    return not bool(flag)


def _bad_names(tensors: Sequence[Tensor], names: Sequence[str]) -> str:
    """The first non-finite tensor's name and how many more there are, on one line (the slow
    path, only after a failed check)."""
    bad = [
        n
        for t, n in zip(tensors, names, strict=True)
        if not bool(torch.isfinite(distributed.local(t)).all())
    ]
    if not bad:
        return "a tensor on another rank"
    return bad[0] + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")


def _bad_parameters(optimizer: torch.optim.Optimizer) -> list[int]:
    """Indices (in parameter order) of the optimizer's parameters that hold NaN/Inf."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return [i for i, p in enumerate(params) if not bool(torch.isfinite(distributed.local(p)).all())]


class NonFiniteGuard:
    """Mixin for ``torch.optim.Optimizer`` subclasses: the ``nonfinite`` policy of a step.

    Call :meth:`_init_guard` in ``__init__`` and :meth:`_step_allowed` in ``step()`` after the
    directions are computed and before anything is modified.
    """

    nonfinite: str
    skipped_steps: int

    def _init_guard(self, nonfinite: str) -> None:
        if not isinstance(nonfinite, str) or nonfinite not in NONFINITE_CHOICES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_CHOICES}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        #: Steps skipped because of non-finite gradients (not saved in ``state_dict``).
        self.skipped_steps = 0

    def _step_allowed(
        self,
        tensors: Sequence[Tensor],
        names: Callable[[], Sequence[str]],
        sharded_like: Sequence[Tensor] = (),
    ) -> bool:
        """True if the step may go on; False (skip) or :class:`NonFiniteError` (raise) if any of
        ``tensors`` is not finite. ``names()`` names them (aligned), only called on failure;
        ``sharded_like`` as in :func:`all_finite`."""
        if self.nonfinite == "off" or all_finite(tensors, sharded_like):
            return True
        bad_params = _bad_parameters(self)  # type: ignore[arg-type]
        if bad_params:
            # the weights themselves are broken: every gradient through them is non-finite, no
            # later step can run, and blaming the gradients would send the user the wrong way
            params = [p for group in self.param_groups for p in group["params"]]  # type: ignore[attr-defined]
            name = self._param_name(params[bad_params[0]], bad_params[0])
            more = f" (and {len(bad_params) - 1} more)" if len(bad_params) > 1 else ""
            what = (
                f"parameter {name}{more} itself holds NaN/Inf: an earlier update overflowed it "
                "(float16 weights?), so every later step sees non-finite gradients. Reload a "
                "checkpoint and train it in float32/bfloat16 or at a lower lr"
            )
        else:
            what = f"non-finite values (NaN/Inf) in the {_bad_names(tensors, names())}"
        if self.nonfinite == "raise":
            raise NonFiniteError(
                f"{type(self).__name__}: {what}; nothing was updated. Lower the learning rate, "
                "clip gradients, or pass nonfinite='skip'."
            )
        self.skipped_steps += 1
        logger.warning(
            "%s: skipped step (%d so far): %s",
            type(self).__name__,
            self.skipped_steps,
            what,
        )
        return False

    def _param_name(self, p: Tensor, index: int) -> str:
        """A parameter's name for messages (from the optimizer's ``_names`` when it has them)."""
        names = getattr(self, "_names", {})
        return names.get(id(p)) or f"{index} (shape {tuple(p.shape)})"
