"""riemannlora: Riemannian optimizers for LoRA fine-tuning.

* :class:`ScaledSGD`, :class:`ScaledAdamW` -- the r x r Riemannian preconditioner of
  Zhang & Pilanci (ICML 2024) as drop-in ``torch.optim.Optimizer`` subclasses.
* :func:`find_lora_pairs` -- every trainable LoRA factor pair of a (PEFT) model, by structure.
* :class:`Riemannion`, :class:`RiemannianSGD` -- optimizers on the manifold of rank-r matrices
  (Bogachev et al., 2025), with :func:`to_manifold`, :func:`init_loi` (locally optimal
  initialization) and :func:`export_adapter` (standard PEFT adapter out).
"""

from riemannlora.export import export_adapter
from riemannlora.loi import LoiInfo, init_loi
from riemannlora.manifold import ManifoldLayer, to_manifold
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
    "export_adapter",
    "find_lora_pairs",
    "init_loi",
    "to_manifold",
]
