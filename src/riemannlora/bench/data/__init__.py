"""Data sources of the benchmark: the embedded copies of the built-in tasks, local files and
Hugging Face hub data sets, all returned as :class:`datasets.DatasetDict`.

Embedded copies
---------------
The built-in tasks read files that ship inside this package (this folder), compressed with xz:
exact copies of public data sets from their authors' repositories, with their licenses and
attributions beside them (``SOURCES.md``; ``SHA256SUMS`` holds the checksums of the original,
uncompressed files, checked on every read). Nothing is downloaded: the package is the data.
:func:`embedded_bytes` returns a file's verified original bytes and :func:`embedded_files`
lists them.

A user's data
-------------
:func:`load_source` accepts what ``datasets.load_dataset`` accepts:

* a local file, ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` (optionally compressed, e.g.
  ``.jsonl.gz``), loaded with the matching ``datasets`` builder as the split ``train``;
* a local folder of such files, split by their names the way ``datasets`` does
  (``train.jsonl``, ``validation.jsonl``, ``test.jsonl``, ...);
* a hub id (``"owner/name"``, optionally ``"owner/name:config"``), when the hub is reachable.
  With ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set, a hub id that is not in the local
  ``datasets`` cache raises :class:`DataError` saying to pass a local file instead.

Every failure to read or parse raises :class:`DataError` with the file and what to do.
"""

from __future__ import annotations

import functools
import hashlib
import lzma
import os
import pathlib
from typing import Any

__all__ = [
    "DATA_DIR",
    "FILE_FORMATS",
    "DataError",
    "embedded_bytes",
    "embedded_files",
    "is_offline",
    "load_source",
    "source_stamp",
]

#: The folder of the embedded data files.
DATA_DIR = pathlib.Path(__file__).resolve().parent

#: File suffix -> ``datasets`` builder name.
FILE_FORMATS: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
_COMPRESSIONS = (".gz", ".xz", ".bz2", ".zst")


class DataError(ValueError):
    """A data set could not be found, read or used; the message says what to do."""


# --------------------------------------------------------------------------------------------
# embedded copies
# --------------------------------------------------------------------------------------------


@functools.cache
def _checksums() -> dict[str, str]:
    sums: dict[str, str] = {}
    for line in (DATA_DIR / "SHA256SUMS").read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip().removeprefix("./")] = digest
    return sums


def embedded_files() -> list[str]:
    """Relative names of the embedded files (as in ``SHA256SUMS``, without ``.xz``)."""
    return sorted(_checksums())


def embedded_bytes(name: str) -> bytes:
    """The original bytes of an embedded file, e.g. ``"e2e/devset.csv"``, checked against
    ``SHA256SUMS``."""
    if name not in _checksums():
        raise DataError(
            f"no embedded data file {name!r}; the embedded files are: {', '.join(embedded_files())}"
        )
    path = DATA_DIR / f"{name}.xz"
    try:
        data = lzma.decompress(path.read_bytes())
    except (OSError, lzma.LZMAError) as exc:
        raise DataError(
            f"the embedded data file {path} is missing or damaged ({exc}); reinstall riemannlora"
        ) from exc
    if hashlib.sha256(data).hexdigest() != _checksums()[name]:
        raise DataError(
            f"the embedded data file {path} does not match its checksum; reinstall riemannlora"
        )
    return data


# --------------------------------------------------------------------------------------------
# files and hub ids
# --------------------------------------------------------------------------------------------


def is_offline() -> bool:
    """Whether the Hugging Face libraries are told not to reach the hub."""
    truthy = {"1", "true", "yes", "on"}
    return any(
        os.environ.get(var, "").strip().lower() in truthy
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _builder(path: pathlib.Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes = suffixes[:-1]
    return FILE_FORMATS.get(suffixes[-1]) if suffixes else None


def _check_file(path: pathlib.Path) -> str:
    builder = _builder(path)
    if builder is None:
        raise DataError(
            f"{path}: unknown file type; use one of {', '.join(FILE_FORMATS)} "
            "(optionally compressed, e.g. .jsonl.gz)"
        )
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if builder in ("json", "csv") and path.suffix.lower() not in _COMPRESSIONS:
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{path}: not valid UTF-8 (byte {exc.start}: {exc.reason}); save the file as UTF-8"
            ) from exc
    return builder


def _detail(exc: BaseException) -> str:
    """The most specific message of an exception chain (libraries wrap the parser's error)."""
    messages = []
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc).strip()
        if text:
            messages.append(text.splitlines()[0])
        exc = exc.__cause__ or exc.__context__
    return messages[-1] if messages else "unknown error"


def source_stamp(spec: str | os.PathLike[str]) -> tuple:
    """What changes when a local source changes (sizes and modification times of its files);
    ``()`` for a hub id."""
    path = pathlib.Path(os.fspath(spec)).expanduser()
    if not path.exists():
        return ()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def _quiet_datasets() -> None:
    import datasets

    datasets.utils.logging.set_verbosity_error()
    datasets.utils.logging.disable_progress_bar()


def _load_files(path: pathlib.Path) -> Any:
    import datasets

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and _builder(p))
        if not files:
            raise DataError(
                f"{path}: the folder has no {'/'.join(FILE_FORMATS)} file; put the data in "
                "train.jsonl (and validation.jsonl / test.jsonl) or pass a file"
            )
        builders = {_check_file(p) for p in files}
        if len(builders) > 1:
            raise DataError(f"{path}: mixes file types ({', '.join(sorted(builders))}); use one")
        data_files: dict[str, list[str]] = {}
        for p in files:
            split = p.name.split(".")[0].lower()
            split = {"dev": "validation", "val": "validation", "valid": "validation"}.get(
                split, split
            )
            data_files.setdefault(split, []).append(str(p))
        if "train" not in data_files:
            raise DataError(
                f"{path}: no training file; name it train.jsonl (or train.csv / train.parquet); "
                f"found {', '.join(p.name for p in files)}"
            )
        builder = builders.pop()
    else:
        builder = _check_file(path)
        data_files = {"train": [str(path)]}
    _quiet_datasets()
    try:
        return datasets.load_dataset(builder, data_files=data_files)
    except DataError:
        raise
    except Exception as exc:  # pyarrow / pandas / json parse errors: name the file
        raise DataError(f"{path}: could not be read as {builder} ({_detail(exc)})") from exc


def _load_hub(spec: str) -> Any:
    import datasets

    name, _, config = spec.partition(":")
    _quiet_datasets()
    if is_offline():  # also when the switch was set after the libraries were imported
        import huggingface_hub.constants

        datasets.config.HF_HUB_OFFLINE = True
        huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(name, config or None)
    except Exception as exc:
        if is_offline():
            raise DataError(
                f"{spec!r} is not a local file or folder, and the hub is offline "
                "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) with no cached copy: pass a local "
                ".jsonl / .csv / .parquet file or folder instead"
            ) from exc
        raise DataError(
            f"{spec!r} is not a local file or folder, and loading it as a hub data set "
            f"failed ({_detail(exc)}); check the id (owner/name, optionally owner/name:config)"
        ) from exc


def load_source(spec: str | os.PathLike[str]) -> Any:
    """A :class:`datasets.DatasetDict` from a local file or folder, or a hub id (see the
    module docstring). Raises :class:`DataError` with what to do when that fails."""
    text = os.fspath(spec)
    if not text.strip():
        raise DataError("no data given: pass a .jsonl / .csv / .parquet file, a folder or a hub id")
    path = pathlib.Path(text).expanduser()
    if path.exists():
        return _load_files(path)
    looks_local = (
        text.startswith((".", "/", "~"))
        or _builder(path) is not None
        or ("/" not in text and ":" not in text and bool(path.suffix))
    )
    if looks_local or text.count("/") > 1:
        raise DataError(
            f"{text}: no such file or folder (a hub id looks like owner/name or owner/name:config)"
        )
    return _load_hub(text)
