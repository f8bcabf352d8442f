"""Export a model in manifold form as a standard PEFT LoRA adapter.

Each converted layer (see :mod:`riemannlora.manifold`) becomes a plain LoRA pair with scaling 1:

    lora_B = U,         lora_A = V^T                 rank r          (no offset)
    lora_B = [U | U0],  lora_A = [V | -V0]^T          rank 2r         (frozen LOI offset)

so ``lora_B @ lora_A = X - X0``, exactly the delta the trained model adds (the weights are
copied, not recomputed). The directory holds ``adapter_config.json`` (the model's own
``LoraConfig`` with ``rank_pattern``/``alpha_pattern`` giving every layer its rank and
``alpha = scaling * rank``, ``use_rslora=False``), ``adapter_model.safetensors`` (PEFT's key
names, from ``peft.utils.get_peft_model_state_dict``, including ``modules_to_save``) and
``riemannlora.json`` (which layers carry an offset, and why their rank is 2r). Vanilla
``PeftModel.from_pretrained(original_base_model, path)`` reproduces the trained model.
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
from typing import Any

from torch import nn

from riemannlora.manifold import MANIFOLD_ATTR

__all__ = ["EXPORT_INFO_NAME", "export_adapter"]

#: Side file written next to the adapter with per-layer manifold metadata.
EXPORT_INFO_NAME = "riemannlora.json"
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
) -> pathlib.Path:
    """Write adapter ``adapter_name`` of ``model`` as a standard PEFT adapter directory.

    Works for models in manifold form (and, trivially, for plain ones). The files are written
    to a temporary directory next to ``path`` and renamed into place; when ``path`` already
    exists, each file is replaced atomically (other files there are kept).

    Args:
        model: the ``peft.PeftModel``.
        path: output directory.
        adapter_name: adapter to export (default: the only one, else the active one).
        save_embedding_layers: as ``PeftModel.save_pretrained``.

    Returns:
        The output directory.
    """
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file
    except ImportError as exc:  # pragma: no cover
        raise ImportError("export_adapter needs peft and safetensors") from exc

    if not isinstance(model, PeftModel):
        raise TypeError(
            f"export_adapter expects the peft.PeftModel (as returned by get_peft_model), got "
            f"{type(model).__name__}"
        )
    if adapter_name is None:
        names = list(model.peft_config)
        adapter_name = names[0] if len(names) == 1 else model.active_adapter
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

    base = model.get_base_model()
    prefix = {id(mod): name for name, mod in model.named_modules()}
    state = get_peft_model_state_dict(
        model,
        state_dict=model.state_dict(),
        adapter_name=adapter_name,
        save_embedding_layers=save_embedding_layers,
    )
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, int | float] = {}
    layers_info: dict[str, dict[str, Any]] = {}
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
        a = module.lora_A[adapter_name].weight.detach()
        b = module.lora_B[adapter_name].weight.detach()
        state[keys[0]] = a[r:].clone()  # [V | -V0]^T
        state[keys[1]] = b[:, r:].clone()  # [U | U0]
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

    info = {
        "format": "riemannlora manifold export",
        "adapter_name": adapter_name,
        "note": (
            "Each layer is a plain LoRA pair with scaling 1 (lora_alpha = rank per layer). "
            "Layers with offset=true were initialized with riemannlora.init_loi: their "
            "adapter has rank 2r, lora_B = [U | U0], lora_A = [V | -V0]^T, so that "
            "lora_B @ lora_A = X - X0 (the trained point minus the frozen initial offset)."
        ),
        "layers": layers_info,
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}

    def write(tmp: pathlib.Path) -> None:
        new_config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / _WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / EXPORT_INFO_NAME).write_text(json.dumps(info, indent=2, sort_keys=True))

    _write_atomic(pathlib.Path(path), write)
    return pathlib.Path(path)


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
        order = {_WEIGHTS_NAME: 0, EXPORT_INFO_NAME: 1, _CONFIG_NAME: 2}
        for f in sorted(tmp.iterdir(), key=lambda p: order.get(p.name, -1)):
            os.replace(f, path / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
