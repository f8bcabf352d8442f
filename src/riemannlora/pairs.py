"""Discovery of LoRA factor pairs in a model, by module structure.

A LoRA layer computes ``y = W0 x + s * B (A x)``. Every optimizer of this package needs, for
each adapted layer, the two factors as matrices ``A`` of shape ``(r, n)`` and ``B`` of shape
``(m, r)`` and the layer's scaling ``s``. :func:`find_lora_pairs` reads them off the modules of a
PEFT model (or of any module that follows PEFT's layout), never from parameter order or names.

Models not built with PEFT declare their pairs explicitly::

    pairs = [LoraPair(a=layer.down.weight, b=layer.up.weight, scaling=2.0, name="layer")]
    opt = ScaledAdamW(LoraParams(pairs, others=[head.weight]), lr=1e-3)
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["LoraPair", "LoraParams", "find_lora_pairs"]


@dataclass(frozen=True, eq=False)
class LoraPair:
    """One LoRA factor pair ``Delta W = scaling * B @ A``.

    ``a`` is stored as PEFT stores ``lora_A``: ``(r, n_in)``, or ``(r, c_in, *kernel)`` for
    convolutions, which is treated as the matrix ``(r, c_in * prod(kernel))``. ``b`` is
    ``(n_out, r)`` or ``(c_out, r, 1, ...)`` for convolutions.
    """

    a: nn.Parameter
    b: nn.Parameter
    scaling: float = 1.0
    name: str = ""

    def __post_init__(self) -> None:
        for what, p in (("a", self.a), ("b", self.b)):
            if not isinstance(p, torch.Tensor):
                raise TypeError(
                    f"LoraPair {self.name!r}: {what} must be a torch.Tensor/nn.Parameter, "
                    f"got {type(p).__name__}"
                )
            if p.dim() < 2:
                raise ValueError(
                    f"LoraPair {self.name!r}: factor {what} must be at least 2-D, got shape "
                    f"{tuple(p.shape)}"
                )
            if not p.is_floating_point():
                raise TypeError(
                    f"LoraPair {self.name!r}: factor {what} must be a real floating-point "
                    f"tensor, got {p.dtype}"
                )
        if self.a.device != self.b.device:
            raise ValueError(
                f"LoraPair {self.name!r}: factors on different devices ({self.a.device} and "
                f"{self.b.device}); move the model to one device first"
            )
        if self.a is self.b:
            raise ValueError(f"LoraPair {self.name!r}: a and b are the same tensor")
        if any(d != 1 for d in self.b.shape[2:]):
            raise ValueError(
                f"LoraPair {self.name!r}: b must be (n_out, r) or (c_out, r, 1, ...) "
                f"(a 1x1 convolution), got shape {tuple(self.b.shape)}"
            )
        if self.a.shape[0] != self.b.shape[1]:
            raise ValueError(
                f"LoraPair {self.name!r}: mismatched pair shapes: a is {tuple(self.a.shape)} "
                f"(rank {self.a.shape[0]}) but b is {tuple(self.b.shape)} (rank "
                f"{self.b.shape[1]}). Pass a=lora_A (r, n_in) and b=lora_B (n_out, r)."
            )
        if isinstance(self.scaling, torch.Tensor) and self.scaling.numel() == 1:
            object.__setattr__(self, "scaling", self.scaling.item())
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, numbers.Real):
            raise TypeError(
                f"LoraPair {self.name!r}: scaling must be a real number, got "
                f"{type(self.scaling).__name__}"
            )
        scaling = float(self.scaling)
        if not (scaling == scaling and abs(scaling) != float("inf")) or scaling == 0.0:
            raise ValueError(f"LoraPair {self.name!r}: scaling must be finite and non-zero")
        object.__setattr__(self, "scaling", scaling)

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)``: the shape of the weight delta as a matrix."""
        return (self.b.shape[0], self.a[0].numel())


@dataclass
class LoraParams:
    """The trainable parameters of a model, split into LoRA pairs and everything else."""

    pairs: list[LoraPair]
    others: list[nn.Parameter] = field(default_factory=list)
    other_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pairs = list(self.pairs)
        self.others = list(self.others)
        seen: dict[int, str] = {}
        for pair in self.pairs:
            if not isinstance(pair, LoraPair):
                raise TypeError(f"LoraParams.pairs must hold LoraPair, got {type(pair).__name__}")
            for p in (pair.a, pair.b):
                if id(p) in seen:
                    raise ValueError(
                        f"parameter of shape {tuple(p.shape)} appears twice (in {seen[id(p)]!r} "
                        f"and {pair.name!r}); each factor may belong to one pair only"
                    )
                seen[id(p)] = pair.name
        for p in self.others:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"LoraParams.others must hold tensors, got {type(p).__name__}")
            if id(p) in seen:
                raise ValueError(
                    f"parameter of shape {tuple(p.shape)} is listed both as a LoRA factor "
                    f"({seen[id(p)]!r}) and as another parameter"
                )
            seen[id(p)] = "others"

    def __iter__(self) -> Iterator[LoraPair]:
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def parameters(self) -> Iterator[nn.Parameter]:
        """All parameters: the factors of each pair (a, b) and then the others."""
        for pair in self.pairs:
            yield pair.a
            yield pair.b
        yield from self.others


def _lora_factor_dicts(module: nn.Module) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Yield ``(adapter, A, B)`` for every adapter of a PEFT-style LoRA layer."""
    lora_a = getattr(module, "lora_A", None)
    lora_b = getattr(module, "lora_B", None)
    if isinstance(lora_a, nn.ModuleDict) and isinstance(lora_b, nn.ModuleDict):
        for adapter, mod_a in lora_a.items():
            if adapter not in lora_b:
                continue
            mod_b = lora_b[adapter]
            w_a, w_b = getattr(mod_a, "weight", None), getattr(mod_b, "weight", None)
            if not isinstance(w_a, torch.Tensor) or not isinstance(w_b, torch.Tensor):
                raise TypeError(
                    f"unsupported LoRA layer {type(module).__name__}: adapter {adapter!r} has "
                    "factors without a .weight; declare its pairs with LoraPair"
                )
            yield adapter, w_a, w_b
    emb_a = getattr(module, "lora_embedding_A", None)
    emb_b = getattr(module, "lora_embedding_B", None)
    if isinstance(emb_a, nn.ParameterDict) and isinstance(emb_b, nn.ParameterDict):
        for adapter, w_a in emb_a.items():
            if adapter in emb_b:
                yield adapter, w_a, emb_b[adapter]


def find_lora_pairs(model: nn.Module) -> LoraParams:
    """Every trainable LoRA factor pair of ``model``, found by module structure.

    Supported: PEFT LoRA on ``nn.Linear``, GPT-2 ``Conv1D`` (``fan_in_fan_out``), ``nn.Conv1d/2d/3d``
    (factors treated as matrices) and ``nn.Embedding`` (``lora_embedding_A/B``), several adapters
    (only those whose factors require grad), per-layer scaling read from the layer
    (``module.scaling[adapter]``, which already accounts for rsLoRA, ``rank_pattern`` and
    ``alpha_pattern``). Every other trainable parameter (biases, heads, ``modules_to_save``, DoRA
    magnitudes, ...) is returned in ``LoraParams.others``. Shared parameters are listed once.

    Raises:
        ValueError: when one factor of a pair is trainable and the other frozen.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"find_lora_pairs expects an nn.Module (e.g. a peft.PeftModel), got "
            f"{type(model).__name__}"
        )
    pairs: list[LoraPair] = []
    in_pairs: set[int] = set()
    for mod_name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        for adapter, w_a, w_b in _lora_factor_dicts(module):
            if not (w_a.requires_grad or w_b.requires_grad):
                continue  # an inactive / frozen adapter
            name = f"{mod_name}.{adapter}" if mod_name else adapter
            if w_a.requires_grad != w_b.requires_grad:
                frozen = "lora_A" if not w_a.requires_grad else "lora_B"
                raise ValueError(
                    f"LoRA layer {name!r}: {frozen} is frozen but its partner is trainable. "
                    "Riemannian preconditioning needs both factors trainable; unfreeze it, or "
                    "freeze the pair and train it with another optimizer."
                )
            if id(w_a) in in_pairs:
                continue  # the same layer reached through two paths
            if not isinstance(scaling, dict) or adapter not in scaling:
                raise TypeError(
                    f"LoRA layer {name!r} ({type(module).__name__}) has no scaling[{adapter!r}]; "
                    "declare its pairs explicitly with LoraPair(a, b, scaling)"
                )
            if type(module).__name__ in ("MultiheadAttention", "ParamWrapper"):
                raise TypeError(
                    f"LoRA layer {name!r}: {type(module).__name__} LoRA is not supported "
                    "(its factors do not form W0 + s*B@A on a single weight)"
                )
            pairs.append(LoraPair(w_a, w_b, scaling[adapter], name))
            in_pairs.update((id(w_a), id(w_b)))
    others: list[nn.Parameter] = []
    other_names: list[str] = []
    for pname, p in model.named_parameters():
        if p.requires_grad and id(p) not in in_pairs:
            others.append(p)
            other_names.append(pname)
            in_pairs.add(id(p))
    return LoraParams(pairs, others, other_names)


def reject_deepspeed(model: object, tensors: Iterable[torch.Tensor], what: str) -> None:
    """Refuse a DeepSpeed engine or ZeRO-3 partitioned parameters (``ds_id``): their factors
    are flattened into partitions and cannot be paired."""
    engine = type(model).__module__.startswith("deepspeed")
    if engine or any(hasattr(t, "ds_id") for t in tensors):
        raise ValueError(
            f"{what}: the model is {'a DeepSpeed engine' if engine else 'partitioned by ZeRO-3'}. "
            "DeepSpeed ZeRO flattens the parameters into partitions, so LoRA pairs cannot be "
            "found and the Riemannian step cannot run. Shard with PyTorch FSDP2 instead "
            "(torch.distributed.fsdp.fully_shard; Accelerate/Trainer: fsdp_version 2), or use DDP."
        )


def reject_meta(tensors: Iterable[torch.Tensor], what: str) -> None:
    """Refuse parameters on the meta device (a model built without its weights)."""
    if any(t.is_meta for t in tensors):
        raise ValueError(
            f"{what}: the model's parameters are on the meta device (built without weights, e.g. "
            "under accelerate's init_empty_weights or with device='meta'). Materialize them "
            "first -- model.to_empty(device=...) and load the weights, or build the model with "
            "from_pretrained -- then create the optimizer."
        )


def as_lora_params(params: object) -> LoraParams:
    """Normalize the first argument of the optimizers: a model, LoraParams or pairs."""
    if isinstance(params, LoraParams):
        found = params
    elif isinstance(params, nn.Module):
        reject_deepspeed(params, params.parameters(), "riemannlora")
        found = find_lora_pairs(params)
    else:
        found = _pairs_from_list(params)
    reject_meta(found.parameters(), "riemannlora")
    return found


def _pairs_from_list(params: object) -> LoraParams:
    if isinstance(params, Iterable) and not isinstance(params, torch.Tensor | dict | str):
        items = list(params)
        if not items:
            raise ValueError(
                "no LoRA pairs given (an empty list): pass the model, or at least one "
                "riemannlora.LoraPair"
            )
        if all(isinstance(x, LoraPair) for x in items):
            return LoraParams(items)
        raise TypeError(
            "riemannlora optimizers need pairing information: pass the model itself (e.g. the "
            "peft.PeftModel), riemannlora.find_lora_pairs(model), or a list of "
            "riemannlora.LoraPair; a plain list of parameters or param groups cannot tell "
            "which lora_A belongs to which lora_B"
        )
    raise TypeError(
        f"expected a model, LoraParams or a list of LoraPair, got {type(params).__name__}"
    )
