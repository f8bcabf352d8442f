"""Optimizers: thin ``torch.optim.Optimizer`` subclasses around the math of the package."""

from riemannlora.optim.riemannion import RiemannianSGD, Riemannion
from riemannlora.optim.scaled import DEFAULT_REG, DEFAULT_SCALE_AWARE, ScaledAdamW, ScaledSGD

__all__ = [
    "DEFAULT_REG",
    "DEFAULT_SCALE_AWARE",
    "RiemannianSGD",
    "Riemannion",
    "ScaledAdamW",
    "ScaledSGD",
]
