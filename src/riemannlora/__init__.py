"""riemannlora: Riemannian optimizers for LoRA fine-tuning.

* :class:`ScaledSGD`, :class:`ScaledAdamW` -- the r x r Riemannian preconditioner of
  Zhang & Pilanci (ICML 2024) as drop-in ``torch.optim.Optimizer`` subclasses.
* :func:`find_lora_pairs` -- every trainable LoRA factor pair of a (PEFT) model, by structure.
"""

from riemannlora.optim import ScaledAdamW, ScaledSGD
from riemannlora.pairs import LoraPair, LoraParams, find_lora_pairs

__version__ = "0.1.0"

__all__ = ["LoraPair", "LoraParams", "ScaledAdamW", "ScaledSGD", "__version__", "find_lora_pairs"]
