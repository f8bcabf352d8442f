"""What the host model's own saving methods do once its adapters are in manifold form.

The manifold layout (width 2r or 3r, scaling 1) is not a layout any loader reads, so the
methods that write adapters or weights are redirected on the converted model itself:

* ``peft.PeftModel`` (and a transformers model with ``add_adapter``): ``save_pretrained``
  writes a standard PEFT adapter (:func:`riemannlora.export_adapter`), as PEFT writes adapters;
  ``load_adapter`` of such an adapter into one of the model's own adapters restores the
  manifold form bit for bit (``transformers.Trainer``'s resume goes through it).
* a diffusers model (``unet.add_adapter(LoraConfig(...))``): ``save_pretrained`` writes the
  full model, as the class does, with every active LoRA delta merged into its base layer
  and the plain class's keys, so ``UNet2DConditionModel.from_pretrained(path)`` (``variant``
  too) loads the trained model; ``save_lora_adapter`` writes the standard adapter in diffusers'
  format, which ``load_lora_adapter`` reads into a fresh model.

The redirections are :class:`HostMethod` objects in the instance's ``__dict__``: unlike bound
methods (which pickle as a lookup by name on the loaded object), they survive ``torch.save`` /
``torch.load``, ``pickle``, multiprocessing and ``copy.deepcopy`` (the copy's methods act on
the copy).
"""

from __future__ import annotations

import inspect
import os
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from riemannlora.manifold.export import (
    export_adapter,
    is_exported_adapter,
    restore_exported_adapter,
    standard_adapter,
)

__all__ = [
    "HostMethod",
    "load_exported_adapter",
    "merged_state_dict",
    "patch_host",
]


class HostMethod:
    """``func`` bound to ``owner``, stored in ``owner.__dict__``, picklable with it.

    Pickles as ``HostMethod(owner, func)`` (``func`` a module-level function, found by name),
    so the loaded or deep-copied model gets the same redirection, bound to itself."""

    __slots__ = ("__func__", "__self__")

    def __init__(self, owner: nn.Module, func: Callable[..., Any]) -> None:
        self.__self__ = owner
        self.__func__ = func

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (HostMethod, (self.__self__, self.__func__))

    @property
    def __signature__(self) -> inspect.Signature:
        sig = inspect.signature(self.__func__)
        return sig.replace(parameters=list(sig.parameters.values())[1:])

    def __repr__(self) -> str:
        return f"<riemannlora redirect {self.__func__.__name__} of {type(self.__self__).__name__}>"


# -------------------------------------------------------------------------- PeftModel hosts
def _peft_save_pretrained(
    self: nn.Module,
    save_directory: str,
    safe_serialization: bool = True,
    selected_adapters: list[str] | None = None,
    save_embedding_layers: str | bool = "auto",
    is_main_process: bool = True,
    path_initial_model_for_weight_conversion: str | None = None,
    **kwargs: Any,
) -> None:
    """``PeftModel.save_pretrained`` of a model in manifold form: writes standard PEFT adapters
    with :func:`riemannlora.export_adapter` (``adapter_model.safetensors``; the default adapter
    in ``save_directory``, others in ``save_directory/<name>`` as PEFT does). An explicit
    ``state_dict`` (keyed as ``model.state_dict()``, e.g. Trainer's gathered FSDP state dict)
    is exported instead of the model's own weights."""
    if path_initial_model_for_weight_conversion:
        raise ValueError(
            "save_pretrained of a model in Riemannian manifold form cannot take "
            "path_initial_model_for_weight_conversion: its LoRA weights have a different "
            "layout. Call riemannlora.export_adapter(model, path) on the full model."
        )
    state_dict = kwargs.pop("state_dict", None)
    if kwargs:
        raise TypeError(
            f"save_pretrained of a model in Riemannian manifold form does not support "
            f"{sorted(kwargs)}; it writes a standard adapter with riemannlora.export_adapter"
        )
    if not is_main_process:
        return
    names = list(selected_adapters) if selected_adapters else list(self.peft_config)
    for name in names:
        out = save_directory if name == "default" else os.path.join(save_directory, name)
        export_adapter(
            self,
            out,
            adapter_name=name,
            save_embedding_layers=save_embedding_layers,
            state_dict=state_dict,
        )


def _peft_load_adapter(
    self: nn.Module, model_id: Any, adapter_name: str, *args: Any, **kwargs: Any
) -> Any:
    """``PeftModel.load_adapter`` of a model in manifold form: an adapter written by
    :func:`riemannlora.export_adapter` (e.g. a ``transformers.Trainer`` checkpoint) loaded into
    one of the model's own adapters goes through :func:`riemannlora.load_exported_adapter`,
    which restores the manifold form bit for bit; everything else goes to PEFT."""
    peft_config = getattr(self, "peft_config", {})
    if adapter_name in peft_config and isinstance(model_id, str | os.PathLike):
        if is_exported_adapter(model_id):
            return restore_exported_adapter(self, model_id, adapter_name)
    return type(self).load_adapter(self, model_id, adapter_name, *args, **kwargs)


# -------------------------------------------------------------------------- diffusers hosts
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every active LoRA delta merged into its base layer and the
    adapters' entries dropped: the keys and layout of the model without adapters (``P.weight``
    for ``P.base_layer.weight``; a ``modules_to_save`` copy as the module itself). Works for
    plain and manifold-form adapters (PEFT's ``get_delta_weight``); the model is not changed.
    Deltas are added in float32 and cast to the base weight's dtype."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    state = model.state_dict()
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(module, LoraLayer):
            weight_key = f"{prefix}base_layer.weight"
            if weight_key not in state:
                raise NotImplementedError(
                    f"cannot merge LoRA layer {path!r} ({type(module).__name__}): its base layer "
                    "has no plain weight (quantized?); save the adapter instead"
                )
            delta = None
            if not module.disable_adapters:
                for adapter in module.active_adapters:
                    if adapter not in module.lora_A or adapter in module.merged_adapters:
                        continue
                    with torch.no_grad():
                        d = module.get_delta_weight(adapter).detach().float()
                    delta = d if delta is None else delta + d
            for key in [k for k in state if k.startswith(prefix)]:
                rest = key[len(prefix) :]
                value = state.pop(key)
                if rest.startswith("base_layer."):
                    new = prefix + rest[len("base_layer.") :]
                    if key == weight_key and delta is not None:
                        value = (value.detach().float() + delta.to(value.device)).to(value.dtype)
                    state[new] = value
        elif isinstance(module, ModulesToSaveWrapper):
            active = module.active_adapter
            active = active[0] if isinstance(active, list | tuple) and active else active
            source = (
                f"{prefix}modules_to_save.{active}."
                if not module.disable_adapters and active in module.modules_to_save
                else f"{prefix}original_module."
            )
            for key in [k for k in state if k.startswith(prefix)]:
                value = state.pop(key)
                if key.startswith(source):
                    state[prefix + key[len(source) :]] = value
    return state


def _diffusers_save_pretrained(
    self: nn.Module, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any
) -> Any:
    """diffusers' ``save_pretrained`` of a model with adapters in manifold form: writes the
    full model (arguments as the class's: ``variant``, ``safe_serialization``, sharding, ...)
    with every active LoRA delta merged into its base layer and the plain class's keys, so
    ``from_pretrained`` loads the trained model without adapters. Save the adapter alone with
    ``save_lora_adapter`` or :func:`riemannlora.export_adapter`."""
    merged = merged_state_dict(self)

    def state_dict(*_: Any, **__: Any) -> dict[str, Tensor]:
        return dict(merged)

    object.__setattr__(self, "state_dict", state_dict)
    try:
        return type(self).save_pretrained(self, save_directory, *args, **kwargs)
    finally:
        del self.__dict__["state_dict"]


def _diffusers_save_lora_adapter(
    self: nn.Module,
    save_directory: str | os.PathLike[str],
    adapter_name: str | None = "default",
    upcast_before_saving: bool = False,
    safe_serialization: bool = True,
    weight_name: str | None = None,
) -> None:
    """diffusers' ``save_lora_adapter`` of a model with adapters in manifold form: the same
    file (``pytorch_lora_weights.safetensors`` with the ``LoraConfig`` in its metadata) holding
    the standard adapter (:func:`riemannlora.manifold.export.standard_adapter`: rank r, or 2r
    with an LOI offset, per layer through ``rank_pattern``), which ``load_lora_adapter`` reads.
    ``upcast_before_saving`` casts the written tensors (not the model) to float32. The file is
    written to a temporary name and renamed into place."""
    import json

    import safetensors.torch
    from diffusers.loaders.lora_base import (
        LORA_ADAPTER_METADATA_KEY,
        LORA_WEIGHT_NAME,
        LORA_WEIGHT_NAME_SAFE,
    )

    names = list(getattr(self, "peft_config", {}))
    if adapter_name is None:
        adapter_name = names[0] if len(names) == 1 else "default"
    if adapter_name not in names:
        raise ValueError(f"Adapter name {adapter_name} not found in the model.")
    std = standard_adapter(self, adapter_name=adapter_name)
    tensors = {
        k: (v.float() if upcast_before_saving and v.is_floating_point() else v)
        for k, v in std.state.items()
    }
    directory = pathlib.Path(save_directory)
    if directory.is_file():
        raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
    directory.mkdir(parents=True, exist_ok=True)
    name = weight_name or (LORA_WEIGHT_NAME_SAFE if safe_serialization else LORA_WEIGHT_NAME)
    target = directory / name
    tmp = directory / f".{name}.tmp"
    try:
        if safe_serialization:
            config = {
                k: (sorted(v) if isinstance(v, set) else v) for k, v in std.config.to_dict().items()
            }
            metadata = {
                "format": "pt",
                LORA_ADAPTER_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True),
            }
            safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        else:
            torch.save(tensors, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _is_diffusers_model(model: nn.Module) -> bool:
    if "diffusers" not in sys.modules:  # a diffusers model means diffusers is imported
        return False
    from diffusers import ModelMixin

    return isinstance(model, ModelMixin)


# -------------------------------------------------------------------------------- patching
def patch_host(model: nn.Module) -> None:
    """Redirect the saving methods of ``model`` (the host of converted adapters: a
    ``PeftModel``, a diffusers model, a transformers model with ``add_adapter``) as the module
    docstring says. Idempotent; models without ``peft_config`` are left alone."""
    if not hasattr(model, "peft_config") or not hasattr(model, "save_pretrained"):
        return
    patches: list[tuple[str, Callable[..., Any]]]
    if _is_diffusers_model(model):
        patches = [
            ("save_pretrained", _diffusers_save_pretrained),
            ("save_lora_adapter", _diffusers_save_lora_adapter),
        ]
    else:
        from peft import PeftModel

        patches = [("save_pretrained", _peft_save_pretrained)]
        if isinstance(model, PeftModel):  # (other hosts' load_adapter have other signatures)
            patches.append(("load_adapter", _peft_load_adapter))
    for name, func in patches:
        current = model.__dict__.get(name)
        if not (isinstance(current, HostMethod) and current.__func__ is func):
            object.__setattr__(model, name, HostMethod(model, func))


def load_exported_adapter(
    model: nn.Module, path: str | os.PathLike[str], adapter_name: str | None = None
) -> Any:
    """Load an adapter written by :func:`export_adapter` back into ``model`` in manifold form.

    The model (a ``peft.PeftModel`` with the same LoRA targets) is converted first when it is
    not yet (:func:`riemannlora.to_manifold`, with offsets when the export has them). ``U``,
    ``V`` and the offset are copied from the adapter, ``Q`` from the row-bases file (recomputed
    as ``qr(V)`` when it is missing), all bit for bit; other saved weights (``modules_to_save``,
    plain LoRA layers) are loaded by PEFT's ``set_peft_model_state_dict``. Returns PEFT's load
    result for those.
    """
    result = restore_exported_adapter(model, path, adapter_name)
    patch_host(model)
    return result
