"""riemannlora: Riemannian optimizers for LoRA fine-tuning.

* :class:`ScaledSGD`, :class:`ScaledAdamW` -- the r x r Riemannian preconditioner of
  Zhang & Pilanci (ICML 2024) as drop-in ``torch.optim.Optimizer`` subclasses.
* :func:`find_lora_pairs` -- every trainable LoRA factor pair of a (PEFT) model, by structure.
* :class:`Riemannion`, :class:`RiemannianSGD` -- optimizers on the manifold of rank-r matrices
  (Bogachev et al., 2025), with :func:`to_manifold`, :func:`init_loi` (locally optimal
  initialization), :func:`export_adapter` (standard PEFT adapter out),
  :func:`load_exported_adapter` (and back, bit for bit) and :func:`clip_grad_norm_` (clipping by
  the Riemannian gradient's norm).
"""

from riemannlora.clip import clip_grad_norm_
from riemannlora.loi import LoiInfo, init_loi
from riemannlora.manifold import (
    ManifoldLayer,
    export_adapter,
    load_exported_adapter,
    to_manifold,
)
from riemannlora.optim import RiemannianSGD, Riemannion, ScaledAdamW, ScaledSGD
from riemannlora.pairs import LoraPair, LoraParams, find_lora_pairs

__version__ = "0.1.0"

__all__ = [
    "LoiInfo",
    "LoraPair",
    "LoraParams",
    "ManifoldLayer",
    "RiemannianSGD",
    "Riemannion",
    "ScaledAdamW",
    "ScaledSGD",
    "__version__",
    "clip_grad_norm_",
    "export_adapter",
    "find_lora_pairs",
    "init_loi",
    "load_exported_adapter",
    "to_manifold",
]
