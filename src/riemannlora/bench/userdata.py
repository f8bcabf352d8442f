"""A user's data set as a benchmark task (``riemannlora bench --data PATH_OR_HUB_ID``).

The data come through :func:`riemannlora.bench.data.load_source` (a local ``.jsonl`` /
``.csv`` / ``.parquet`` file or folder, or a hub id). The columns say what the task is:

* ``text`` + ``label`` -- classification (an encoder with a new head). Labels may be strings
  or integers; the label set is the sorted set of the training labels, and an evaluation label
  that never occurs in training is an error.
* ``prompt`` + ``completion`` -- causal LM fine-tuning, TRL's prompt-completion convention:
  the completion is appended to the prompt as is (start it with a space or a newline if the
  two should be separated) and only the completion's tokens are trained and scored.
* ``messages`` -- causal LM on chats, TRL's conversational convention: a list of
  ``{"role", "content"}`` turns ending with an ``assistant`` turn. The earlier turns, rendered
  with the tokenizer's chat template and its generation prompt, are the prompt; the last
  turn's content is the completion.

Other column names: ``columns="label=intent"`` (``--columns``) renames the data's ``intent``
column to ``label`` first, so a hub data set such as ``clinc_oos:plus`` fits as it is.

Split rule: a ``train`` split is required. ``validation`` (for the eval-loss curve and lr
selection) and ``test`` (for the final metrics) are used when present; when only one of them is,
it serves as both. When neither is (a single file), the training rows are shuffled with seed 0
and 10 % of them (at least 2, at most 2,000) are held out: the first half of those is the
validation split, the rest the test split.

Every problem raises :class:`riemannlora.bench.data.DataError` naming the file, split, row or
column and what to do, before anything is trained or written.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from riemannlora.bench.data import DataError, load_source
from riemannlora.bench.tasks import SPLITS, TaskData

__all__ = ["HOLDOUT_FRACTION", "data_fingerprint", "parse_columns", "user_task"]

HOLDOUT_FRACTION = 0.1
_HOLDOUT_MIN, _HOLDOUT_MAX = 2, 2000
_SCHEMAS = "text + label (classification), prompt + completion, or messages (causal LM)"
_EXPECTED = ("text", "label", "prompt", "completion", "messages")


def _kind(columns: list[str], where: str) -> str:
    cols = set(columns)
    if {"prompt", "completion"} <= cols:
        return "causal"
    if "messages" in cols:
        return "chat"
    if {"text", "label"} <= cols:
        return "classification"
    missing = []
    if "text" in cols:
        missing.append("label")
    elif "label" in cols:
        missing.append("text")
    elif "prompt" in cols:
        missing.append("completion")
    elif "completion" in cols:
        missing.append("prompt")
    hint = f"missing column {', '.join(missing)!s}; " if missing else ""
    raise DataError(
        f"{where}: {hint}found columns {sorted(cols)}, expected {_SCHEMAS}; rename them in the "
        "file or with --columns NEW=OLD (e.g. --columns label=intent)"
    )


def _text(value: Any, where: str, column: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise DataError(f"{where}: column {column!r} must be a non-empty string, got {value!r}")
    return value


def _chat_row(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, list) or len(value) < 2:
        raise DataError(
            f"{where}: 'messages' must be a list of at least two {{role, content}} turns "
            f"ending with the assistant's, got {value!r:.120}"
        )
    for turn in value:
        if not isinstance(turn, dict) or not {"role", "content"} <= set(turn):
            raise DataError(f"{where}: each message needs 'role' and 'content', got {turn!r:.120}")
        _text(turn["content"], where, "messages.content", allow_empty=True)
    if value[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: the last message must be the assistant's (the completion to learn), "
            f"got role {value[-1]['role']!r}"
        )
    _text(value[-1]["content"], where, "messages[-1].content")
    return {"messages": [{"role": t["role"], "content": t["content"]} for t in value]}


def _rows(dataset: Any, kind: str, where: str) -> list[dict[str, Any]]:
    rows = []
    for i, row in enumerate(dataset):
        at = f"{where}, row {i + 1}"
        if kind == "classification":
            label = row["label"]
            if label is None or isinstance(label, float | list | dict):
                raise DataError(f"{at}: 'label' must be a string or an integer, got {label!r}")
            rows.append({"text": _text(row["text"], at, "text"), "label": label})
        elif kind == "causal":
            rows.append({
                "prompt": _text(row["prompt"], at, "prompt", allow_empty=True),
                "completion": _text(row["completion"], at, "completion"),
            })  # fmt: skip
        else:
            rows.append(_chat_row(row["messages"], at))
    return rows


def _split_rows(data: Any, spec: str, kind: str) -> dict[str, list[dict[str, Any]]]:
    if "train" not in data:
        raise DataError(f"{spec}: no 'train' split (found {', '.join(data)}); name one 'train'")
    out = {s: _rows(data[s], kind, f"{spec} [{s}]") for s in SPLITS if s in data}
    if not out["train"]:
        raise DataError(f"{spec} [train]: no rows")
    if "validation" not in out and "test" not in out:
        rows = list(out["train"])
        random.Random(0).shuffle(rows)
        held = max(_HOLDOUT_MIN, min(_HOLDOUT_MAX, round(HOLDOUT_FRACTION * len(rows))))
        if len(rows) <= held:
            raise DataError(
                f"{spec}: {len(rows)} row(s) are too few to hold out {held} for evaluation and "
                "still train; give more rows or separate train / validation files"
            )
        half = held // 2
        out = {"validation": rows[:half], "test": rows[half:held], "train": rows[held:]}
    out.setdefault("validation", out.get("test", []))
    out.setdefault("test", out["validation"])
    for split in ("validation", "test"):
        if not out[split]:
            raise DataError(f"{spec} [{split}]: no rows")
    return out


def _labels(splits: dict[str, list[dict[str, Any]]], spec: str) -> tuple[str, ...]:
    names = {r["label"] for r in splits["train"]}
    if len({type(n) for n in names}) > 1:
        raise DataError(f"{spec} [train]: labels mix strings and integers; use one type")
    if len(names) < 2:
        raise DataError(f"{spec} [train]: needs at least two distinct labels, got {sorted(names)}")
    ordered = sorted(names)
    index = {name: i for i, name in enumerate(ordered)}
    for split in ("validation", "test"):
        for i, row in enumerate(splits[split]):
            if row["label"] not in index:
                raise DataError(
                    f"{spec} [{split}], row {i + 1}: label {row['label']!r} does not occur in "
                    f"the training data (labels: {ordered[:10]}{'...' if len(ordered) > 10 else ''})"
                )
    for rows in splits.values():
        for row in rows:
            row["label"] = index[row["label"]]
    return tuple(str(n) for n in ordered)


def parse_columns(text: str) -> dict[str, str]:
    """``"label=intent,text=utterance"`` -> ``{"intent": "label", "utterance": "text"}`` (the
    data's column -> the name this module expects); ``DataError`` on a malformed spec."""
    renames: dict[str, str] = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        new, sep, old = (part.strip() for part in item.partition("="))
        if not sep or not new or not old:
            raise DataError(f"columns: {item!r} is not NEW=OLD (e.g. label=intent)")
        if new not in _EXPECTED:
            raise DataError(f"columns: {new!r} is not one of {', '.join(_EXPECTED)}")
        if old in renames:
            raise DataError(f"columns: {old!r} is renamed twice")
        renames[old] = new
    return renames


def _rename(data: Any, renames: dict[str, str], spec: str) -> Any:
    if not renames:
        return data
    for split, ds in data.items():
        missing = [old for old in renames if old not in ds.column_names]
        if missing:
            raise DataError(
                f"{spec} [{split}]: no column {', '.join(map(repr, missing))} to rename "
                f"(columns: {ds.column_names})"
            )
    clash = set(renames.values()) & (set(next(iter(data.values())).column_names) - set(renames))
    if clash:
        raise DataError(f"{spec}: renaming would overwrite the existing column(s) {sorted(clash)}")
    return data.rename_columns(renames)


def user_task(spec: str, columns: str = "") -> TaskData:
    """The :class:`TaskData` of a user's data set (see the module docstring); ``kind`` is
    ``"classification"`` or ``"causal"`` (chat rows keep a ``messages`` list instead of
    ``prompt`` / ``completion``, rendered by :func:`riemannlora.bench.tasks.tokenize_rows`).
    ``columns`` renames the data's columns first (:func:`parse_columns`), e.g. for a hub data
    set whose label column is called ``intent``."""
    renames = parse_columns(columns)
    data = _rename(load_source(spec), renames, spec)
    columns = (
        data["train"].column_names if "train" in data else next(iter(data.values())).column_names
    )
    kind = _kind(columns, spec)
    splits = _split_rows(data, spec, kind)
    labels = _labels(splits, spec) if kind == "classification" else ()
    return TaskData(
        "custom",
        "classification" if kind == "classification" else "causal",
        labels=labels,
        info={"source": spec, "format": kind, "sizes": {s: len(r) for s, r in splits.items()}},
        **splits,
    )


def data_fingerprint(task: TaskData) -> str:
    """A short hash of every row of every split (part of the benchmark's cache key, so a
    changed file trains anew)."""
    digest = hashlib.sha256()
    for split in SPLITS:
        digest.update(json.dumps(task.split(split), sort_keys=True, default=str).encode())
    digest.update(json.dumps(task.labels).encode())
    return digest.hexdigest()[:16]
