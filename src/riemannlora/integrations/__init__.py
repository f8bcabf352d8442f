"""Integrations with training frameworks (imported lazily: ``transformers`` is optional).

* :mod:`riemannlora.integrations.trainer`: :class:`RiemannTrainer`, a ``transformers.Trainer``
  that builds a riemannlora optimizer from the (unwrapped) model.

Distributed training needs no integration code: DDP works as is, and FSDP2-sharded factors are
handled inside the optimizers (:mod:`riemannlora.distributed`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["RiemannTrainer", "default_optimizer"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from riemannlora.integrations import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
