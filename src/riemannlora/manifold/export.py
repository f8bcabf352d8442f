"""Export a model in manifold form as a standard PEFT LoRA adapter.

Each converted layer (see :mod:`riemannlora.manifold`) becomes a plain LoRA pair with scaling 1:

    lora_B = U,         lora_A = V^T                 rank r          (no offset)
    lora_B = [U | U0],  lora_A = [V | -V0]^T          rank 2r         (frozen LOI offset)

so ``lora_B @ lora_A = X - X0``, exactly the delta the trained model adds (the weights are
copied, not recomputed). The directory holds ``adapter_config.json`` (the model's own
``LoraConfig`` with ``rank_pattern``/``alpha_pattern`` giving every layer its rank and
``alpha = scaling * rank``, ``use_rslora=False``), ``adapter_model.safetensors`` (PEFT's key
names, from ``peft.utils.get_peft_model_state_dict``, including ``modules_to_save``) and
``riemannlora.json`` (which layers carry an offset, and why their rank is 2r) and
``riemannlora_row_bases.safetensors`` (each layer's row basis Q, which vanilla PEFT ignores).
Vanilla ``PeftModel.from_pretrained(original_base_model, path)`` reproduces the trained model.

:func:`restore_exported_adapter` (public as :func:`riemannlora.load_exported_adapter`) goes
the other way, into a model in manifold form (converting it first if needed): it restores
``U``, ``V``, ``Q`` and the offset bit for bit, so a training run resumed from an exported checkpoint (``transformers.Trainer``'s ``resume_from_checkpoint``,
through the redirected ``PeftModel.load_adapter``) continues exactly as the uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from riemannlora.core.geometry import orthonormal_basis
from riemannlora.distributed import is_dtensor
from riemannlora.manifold.layers import MANIFOLD_ATTR, ManifoldLayer, convert, lora_targets

__all__ = [
    "EXPORT_INFO_NAME",
    "ROW_BASES_NAME",
    "StandardAdapter",
    "export_adapter",
    "is_exported_adapter",
    "restore_exported_adapter",
    "standard_adapter",
]

#: Side file written next to the adapter with per-layer manifold metadata.
EXPORT_INFO_NAME = "riemannlora.json"
#: Side file with each layer's row basis ``Q^T`` ``(r, n)``, keyed by the layer's path.
ROW_BASES_NAME = "riemannlora_row_bases.safetensors"
_WEIGHTS_NAME = "adapter_model.safetensors"
_CONFIG_NAME = "adapter_config.json"
# inits that rewrite the base weight: an adapter trained on top of them is not relative to the
# original base model
_BASE_MUTATING_INITS = ("pissa", "corda", "olora", "lora_ga", "loftq", "mica")


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def export_adapter(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    adapter_name: str | None = None,
    save_embedding_layers: bool | str = "auto",
    state_dict: dict[str, Any] | None = None,
) -> pathlib.Path:
    """Write adapter ``adapter_name`` of ``model`` as a standard PEFT adapter directory.

    Works for models in manifold form (and, trivially, for plain ones). The files are written
    to a temporary directory next to ``path`` and renamed into place; when ``path`` already
    exists, each file is replaced atomically (other files there are kept).

    Args:
        model: the ``peft.PeftModel``, or a model with adapters injected in place (diffusers'
            ``unet.add_adapter(LoraConfig(...))``, ``peft.inject_adapter_in_model``): it is written
            as ``get_peft_model`` would have saved it (keys under ``base_model.model.``), so
            ``PeftModel.from_pretrained(base, path)`` loads it.
        path: output directory.
        adapter_name: adapter to export (default: the only one, else the active one).
        save_embedding_layers: as ``PeftModel.save_pretrained``.
        state_dict: the weights to export, keyed as ``model.state_dict()`` (default: the model's
            own). Under FSDP2 pass a full state dict, e.g. from
            ``torch.distributed.checkpoint.state_dict.get_model_state_dict(model,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True))`` on every rank,
            then export on rank 0 only.

    Returns:
        The output directory.
    """
    from safetensors.torch import save_file

    std = standard_adapter(
        model,
        adapter_name=adapter_name,
        save_embedding_layers=save_embedding_layers,
        state_dict=state_dict,
    )
    info = {
        "format": "riemannlora manifold export",
        "adapter_name": std.adapter_name,
        "note": (
            "Each layer is a plain LoRA pair with scaling 1 (lora_alpha = rank per layer). "
            "Layers with offset=true were initialized with riemannlora.init_loi: their "
            "adapter has rank 2r, lora_B = [U | U0], lora_A = [V | -V0]^T, so that "
            "lora_B @ lora_A = X - X0 (the trained point minus the frozen initial offset)."
        ),
        "layers": std.layers,
    }
    key_prefix = "base_model.model." if std.injected else ""  # the keys of a saved PeftModel
    tensors = {key_prefix + k: v for k, v in std.state.items()}
    new_config, row_bases = std.config, std.row_bases

    def write(tmp: pathlib.Path) -> None:
        new_config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / _WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / EXPORT_INFO_NAME).write_text(json.dumps(info, indent=2, sort_keys=True))
        if row_bases:
            save_file(row_bases, str(tmp / ROW_BASES_NAME), metadata={"format": "pt"})

    _write_atomic(pathlib.Path(path), write)
    return pathlib.Path(path)


@dataclass
class StandardAdapter:
    """One adapter of a model in the standard PEFT layout (see the module docstring).

    ``state``: PEFT's state dict of the adapter (``get_peft_model_state_dict`` keys, on the
    CPU), the manifold layers rewritten as plain LoRA pairs; ``config``: its ``LoraConfig``
    (``rank_pattern``/``alpha_pattern`` per layer); ``layers``: per converted layer path its
    ``rank``, ``offset`` and ``exported_rank``; ``row_bases``: each converted layer's ``Q^T``;
    ``injected``: the adapter lives in a model other than a ``peft.PeftModel`` (diffusers'
    ``add_adapter``, ``peft.inject_adapter_in_model``)."""

    adapter_name: str
    injected: bool
    state: dict[str, Tensor]
    config: Any
    layers: dict[str, dict[str, Any]]
    row_bases: dict[str, Tensor]


def standard_adapter(
    model: nn.Module,
    *,
    adapter_name: str | None = None,
    save_embedding_layers: bool | str = "auto",
    state_dict: dict[str, Any] | None = None,
) -> StandardAdapter:
    """Adapter ``adapter_name`` of ``model`` in the standard PEFT layout, in memory (what
    :func:`export_adapter` writes; arguments as there). Use its ``state`` where a library asks
    for ``peft.utils.get_peft_model_state_dict(model)``, e.g. diffusers'
    ``save_lora_weights(unet_lora_layers=...)``: PEFT's own function returns the manifold
    layout, which no standard loader reads."""
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
        from peft.utils import get_peft_model_state_dict
    except ImportError as exc:  # pragma: no cover
        raise ImportError("export_adapter needs peft and safetensors") from exc

    from peft.tuners.tuners_utils import BaseTuner

    injected = not isinstance(model, PeftModel)
    if isinstance(model, BaseTuner) or (
        injected
        and not (isinstance(getattr(model, "peft_config", None), dict) and model.peft_config)
    ):
        raise TypeError(
            "export_adapter expects a peft.PeftModel (as returned by get_peft_model) or a model "
            "with LoRA adapters injected in place (diffusers add_adapter, "
            f"peft.inject_adapter_in_model); got {type(model).__name__} without adapters"
        )
    if adapter_name is None:
        names = list(model.peft_config)
        if len(names) == 1:
            adapter_name = names[0]
        elif injected:
            raise ValueError(
                f"the model has several adapters {sorted(names)}: pass adapter_name=..."
            )
        else:
            adapter_name = model.active_adapter
    if adapter_name not in model.peft_config:
        raise ValueError(
            f"adapter {adapter_name!r} not found; the model has {sorted(model.peft_config)}"
        )
    config = model.peft_config[adapter_name]
    if getattr(config, "peft_type", None) is None or str(config.peft_type.value) != "LORA":
        raise ValueError(f"adapter {adapter_name!r} is not a LoRA adapter ({config.peft_type})")
    init = str(config.init_lora_weights).lower()
    if any(init.startswith(p) for p in _BASE_MUTATING_INITS):
        raise ValueError(
            f"adapter {adapter_name!r} was initialized with init_lora_weights="
            f"{config.init_lora_weights!r}, which rewrote the base weights; an exported adapter "
            "would not apply to the original base model. Start from init_lora_weights=True "
            "(and riemannlora.init_loi if you want a data-driven start)."
        )

    base = model if injected else model.get_base_model()
    prefix = {id(mod): name for name, mod in model.named_modules()}
    if state_dict is None:
        state_dict = model.state_dict()
    if any(is_dtensor(v) for v in state_dict.values()):
        raise ValueError(
            "export_adapter needs whole tensors, the state dict holds sharded DTensors: pass a "
            "full state dict (get_model_state_dict(model, options=StateDictOptions("
            "full_state_dict=True, cpu_offload=True)))"
        )
    state = get_peft_model_state_dict(
        model,
        state_dict=state_dict,
        adapter_name=adapter_name,
        save_embedding_layers=save_embedding_layers,
    )
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, int | float] = {}
    layers_info: dict[str, dict[str, Any]] = {}
    row_bases: dict[str, Any] = {}
    for base_path, module in base.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.r:
            continue
        key = re.escape(base_path)
        entry = getattr(module, MANIFOLD_ATTR, {}).get(adapter_name)
        if entry is None:
            rank = int(module.r[adapter_name])
            rank_pattern[key] = rank
            alpha_pattern[key] = _number(module.scaling[adapter_name] * rank)
            continue
        r, offset = int(entry["rank"]), bool(entry["offset"])
        full = prefix[id(module)]
        keys = (f"{full}.lora_A.weight", f"{full}.lora_B.weight")
        if not all(k in state for k in keys):
            raise RuntimeError(
                f"could not find {keys} in the PEFT state dict of adapter {adapter_name!r}"
            )
        a, b = state[keys[0]].detach(), state[keys[1]].detach()  # manifold layout, width w
        state[keys[0]] = a[r:].clone()  # [V | -V0]^T
        state[keys[1]] = b[:, r:].clone()  # [U | U0]
        row_bases[base_path] = a[:r].to("cpu").contiguous()  # Q^T
        rank = 2 * r if offset else r
        rank_pattern[key] = rank
        alpha_pattern[key] = rank
        layers_info[base_path] = {"rank": r, "offset": offset, "exported_rank": rank}

    _check_unambiguous(rank_pattern, alpha_pattern)
    ranks = Counter(rank_pattern.values())
    common = ranks.most_common(1)[0][0] if ranks else config.r
    new_config = copy.deepcopy(config)
    new_config.r = common
    new_config.lora_alpha = common
    new_config.rank_pattern = rank_pattern
    new_config.alpha_pattern = alpha_pattern
    new_config.use_rslora = False
    new_config.init_lora_weights = True
    new_config.inference_mode = True
    if new_config.base_model_name_or_path is None:
        new_config.base_model_name_or_path = getattr(base, "name_or_path", None) or None

    return StandardAdapter(
        adapter_name=adapter_name,
        injected=injected,
        state={k: v.detach().to("cpu").contiguous() for k, v in state.items()},
        config=new_config,
        layers=layers_info,
        row_bases=row_bases,
    )


def _check_unambiguous(rank_pattern: dict[str, int], alpha_pattern: dict[str, Any]) -> None:
    """PEFT matches a pattern key ``k`` against a module path ``p`` when ``p == k`` or ``p`` ends
    with ``"." + k``, taking the first match; refuse exports where that is ambiguous."""
    paths = {re.sub(r"\\(.)", r"\1", k): k for k in rank_pattern}
    for path, key in paths.items():
        parts = path.split(".")
        for i in range(1, len(parts)):
            other = paths.get(".".join(parts[i:]))
            if other is not None and (rank_pattern[other], alpha_pattern[other]) != (
                rank_pattern[key],
                alpha_pattern[key],
            ):
                raise NotImplementedError(
                    f"cannot export: LoRA layer path {'.'.join(parts[i:])!r} is a suffix of "
                    f"{path!r} and the two need different ranks/alphas, which PEFT's "
                    "rank_pattern cannot tell apart"
                )


def _write_atomic(path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> None:
    """Run ``write(tmp_dir)`` and move the result to ``path`` (rename when it does not exist,
    else per-file ``os.replace``; the weights before the config)."""
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        write(tmp)
        for p in (tmp, *tmp.iterdir()):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        if not path.exists():
            try:
                os.replace(tmp, path)
                return
            except OSError:
                if not path.is_dir():
                    raise
        if not path.is_dir():
            raise NotADirectoryError(f"export path {str(path)!r} exists and is not a directory")
        order = {_WEIGHTS_NAME: 0, ROW_BASES_NAME: 1, EXPORT_INFO_NAME: 2, _CONFIG_NAME: 3}
        for f in sorted(tmp.iterdir(), key=lambda p: order.get(p.name, -1)):
            os.replace(f, path / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_exported_adapter(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory written by :func:`export_adapter` (from manifold form)."""
    p = pathlib.Path(path)
    return (p / EXPORT_INFO_NAME).is_file() and (p / _WEIGHTS_NAME).is_file()


def restore_exported_adapter(
    model: nn.Module, path: str | os.PathLike[str], adapter_name: str | None = None
) -> Any:
    """:func:`riemannlora.load_exported_adapter` (see there) without redirecting the host
    model's saving methods (:mod:`riemannlora.manifold.hosts`)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = pathlib.Path(path)
    if not is_exported_adapter(path):
        raise ValueError(
            f"{str(path)!r} is not an adapter exported by riemannlora.export_adapter (no "
            f"{EXPORT_INFO_NAME}); load plain PEFT adapters into a plain PEFT model"
        )
    info = json.loads((path / EXPORT_INFO_NAME).read_text())
    if adapter_name is None:
        adapter_name = info.get("adapter_name") or "default"
    layers_info: dict[str, dict[str, Any]] = info.get("layers", {})
    state = load_file(str(path / _WEIGHTS_NAME))
    bases = load_file(str(path / ROW_BASES_NAME)) if (path / ROW_BASES_NAME).is_file() else {}

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base_paths = {id(mod): name for name, mod in base.named_modules()}
    names = {id(mod): name for name, mod in model.named_modules()}
    with_offset = any(v.get("offset") for v in layers_info.values())
    targets = [t for t in lora_targets(model) if t.adapter == adapter_name]
    # check every layer against the export before anything changes (wrong base, rank, ...)
    plan = []
    for t in targets:
        base_path, full = base_paths[id(t.module)], names[id(t.module)]
        entry = layers_info.get(base_path)
        keys = (f"{full}.lora_A.weight", f"{full}.lora_B.weight")
        if entry is None or not all(k in state for k in keys):
            raise ValueError(
                f"{str(path)!r} holds no manifold weights for LoRA layer {t.name!r}: it "
                "was exported from another model or configuration"
            )
        r, offset = int(entry["rank"]), bool(entry["offset"])
        if r != t.rank:
            raise ValueError(f"LoRA layer {t.name!r} has rank {t.rank}, the export has {r}")
        a_exp, b_exp = state[keys[0]], state[keys[1]]  # [V | -V0]^T, [U | U0]
        width = 2 * r if offset else r
        if tuple(a_exp.shape) != (width, t.n) or tuple(b_exp.shape) != (t.m, width):
            raise ValueError(
                f"LoRA layer {t.name!r}: the export's factors have shapes "
                f"{tuple(a_exp.shape)}, {tuple(b_exp.shape)}, expected "
                f"{(width, t.n)}, {(t.m, width)}: it was exported from another base model"
            )
        plan.append((t.module, t.path, base_path, keys, a_exp, b_exp, r, width))
    if any(
        not t.converted or (with_offset and not ManifoldLayer(t.module, t.adapter, t.path).offset)
        for t in targets
    ):
        convert(model, with_offset=with_offset)
    seen = set()
    with torch.no_grad():
        for module, module_path, base_path, keys, a_exp, b_exp, r, width in plan:
            layer = ManifoldLayer(module, adapter_name, module_path)
            a, b = layer.a, layer.b
            q = bases.get(base_path)
            if q is None:
                q = orthonormal_basis(a_exp[:r].mT.to(torch.float64)).mT
            b[:, :r].zero_()
            b[:, r : r + width].copy_(b_exp)
            b[:, r + width :].zero_()  # an offset the export does not have: zero
            a[:r].copy_(q)
            a[r : r + width].copy_(a_exp)
            a[r + width :].zero_()
            seen.update(keys)
    rest = {k: v for k, v in state.items() if k not in seen}
    return set_peft_model_state_dict(model, rest, adapter_name=adapter_name) if rest else None
