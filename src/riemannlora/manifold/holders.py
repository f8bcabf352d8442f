"""Who else holds the LoRA factors that a conversion is about to replace.

Converting adapters (:func:`riemannlora.to_manifold`, :func:`riemannlora.init_loi`, creating a
manifold optimizer, :func:`riemannlora.load_exported_adapter` into a plain model) builds new
factor modules. Whatever captured the old ``Parameter`` objects would go on with them, silently:

* a ``DistributedDataParallel`` wrapper all-reduces only the parameters it registered, so the
  new factors' gradients are never synchronised and the ranks drift apart;
* an optimizer created earlier steps tensors the model no longer uses: it trains nothing.

So a conversion first looks for such holders and raises, naming the order that works: convert
(or ``init_loi``), then wrap in DDP, then create the optimizer. riemannlora's own optimizers
register here when they are created (:func:`track`, weakly); DDP wrappers are found among live
objects, and only in an initialized process group of more than one rank (where they matter).
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["check_replaceable", "track"]

_OPTIMIZERS: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()


def track(optimizer: torch.optim.Optimizer) -> None:
    """Record a riemannlora optimizer (weakly), so that a later conversion of the factors it
    holds raises instead of leaving it with stale parameters."""
    _OPTIMIZERS.add(optimizer)


def _optimizers_holding(ids: set[int]) -> list[torch.optim.Optimizer]:
    return [
        opt
        for opt in list(_OPTIMIZERS)
        if any(id(p) in ids for group in opt.param_groups for p in group["params"])
    ]


def _ddp_holding(model: nn.Module, ids: set[int]) -> list[nn.Module]:
    ddp_cls = nn.parallel.DistributedDataParallel
    if isinstance(model, ddp_cls):
        return [model]
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return []
    return [
        obj
        for obj in gc.get_objects()
        if isinstance(obj, ddp_cls) and any(id(p) in ids for p in obj.module.parameters())
    ]


def check_replaceable(model: nn.Module, params: Iterable[torch.Tensor], what: str) -> None:
    """Raise ``RuntimeError`` (before anything changes) when a DDP wrapper or a live riemannlora
    optimizer holds any of ``params``, the factors that ``what`` is about to replace."""
    ids = {id(p) for p in params}
    if not ids:
        return
    if _ddp_holding(model, ids):
        raise RuntimeError(
            f"{what}: the model is wrapped in DistributedDataParallel, which registered the LoRA "
            f"factors before {what} replaced them: it would never all-reduce the new factors' "
            "gradients and the ranks would drift apart. Convert before wrapping: call "
            "riemannlora.to_manifold(model) (or riemannlora.init_loi) first, then "
            "DistributedDataParallel(model), then create the optimizer."
        )
    holders = _optimizers_holding(ids)
    if holders:
        gc.collect()  # optimizers the user dropped but a reference cycle still keeps
        holders = _optimizers_holding(ids)
    if holders:
        names = ", ".join(sorted({type(opt).__name__ for opt in holders}))
        holders.clear()  # the traceback keeps this frame: it must not keep the optimizers
        raise RuntimeError(
            f"{what} replaces the LoRA factor modules, but the {names} created earlier holds "
            "their parameters and would go on stepping tensors the model no longer uses (it "
            f"would train nothing). Call {what} first and create the optimizer afterwards "
            "(drop the old optimizer: del it)."
        )
