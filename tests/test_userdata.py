"""A user's data set as a benchmark task (``riemannlora bench --data``): file formats, the
columns -> task rule, the split rule, label mapping, the fingerprint, end-to-end runs and the
errors of bad data (each a clear message before anything is written)."""

from __future__ import annotations

import collections
import csv
import gzip
import json
import math
import pathlib

import pytest

from riemannlora import cli
from riemannlora.bench.data import DataError
from riemannlora.bench.userdata import HOLDOUT_FRACTION, data_fingerprint, user_task


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """``datasets`` caches what it reads: keep that cache inside the test's tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_csv(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


_INTENTS = ("book_flight", "cancel_order", "weather")


def _intents(n: int, start: int = 0) -> list[dict]:
    """``n`` classification rows with distinct texts (commas and quotes included, for CSV)."""
    return [
        {
            "text": f'query {i}: "{_INTENTS[i % 3].replace("_", " ")}", please',
            "label": _INTENTS[i % 3],
        }
        for i in range(start, start + n)
    ]


def _pairs(n: int) -> list[dict]:
    return [{"prompt": f"Q: what is {i} + 1?\nA:", "completion": f" {i + 1}"} for i in range(n)]


def _chats(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "system", "content": "You add one."},
                {"role": "user", "content": f"{i}?"},
                {"role": "assistant", "content": f"{i + 1}"},
            ]
        }
        for i in range(n)
    ]


def _all_rows(task) -> list:
    return [*task.train, *task.validation, *task.test]


def _multiset(rows: list[dict]) -> collections.Counter:
    return collections.Counter(json.dumps(r, sort_keys=True) for r in rows)


# --------------------------------------------------------------------------------------------
# formats, columns and labels
# --------------------------------------------------------------------------------------------


def test_jsonl_text_label_with_string_labels(tmp_path):
    rows = _intents(60)
    task = user_task(str(_write_jsonl(tmp_path / "intents.jsonl", rows)))
    assert task.name == "custom" and task.kind == "classification"
    assert task.info["format"] == "classification"
    # the label set: the sorted training labels; every row's index maps back to its label
    assert task.labels == ("book_flight", "cancel_order", "weather")
    original = {r["text"]: r["label"] for r in rows}
    for row in _all_rows(task):
        assert set(row) == {"text", "label"} and isinstance(row["label"], int)
        assert task.labels[row["label"]] == original[row["text"]]
    # a single file: 10 % held out (6 rows), half validation, half test; nothing lost or doubled
    assert (len(task.train), len(task.validation), len(task.test)) == (54, 3, 3)
    assert sorted(r["text"] for r in _all_rows(task)) == sorted(original)
    assert task.info["sizes"] == {"train": 54, "validation": 3, "test": 3}


def test_csv_text_label_with_integer_labels(tmp_path):
    # integer labels sort as numbers (2 < 7 < 10), not as strings
    rows = [{"text": r["text"], "label": (2, 10, 7)[i % 3]} for i, r in enumerate(_intents(40))]
    task = user_task(str(_write_csv(tmp_path / "intents.csv", rows)))
    assert task.kind == "classification" and task.labels == ("2", "7", "10")
    original = {r["text"]: r["label"] for r in rows}  # the commas and quotes survive CSV
    for row in _all_rows(task):
        assert task.labels[row["label"]] == str(original[row["text"]])
    assert sorted(r["text"] for r in _all_rows(task)) == sorted(original)
    assert (len(task.validation), len(task.test)) == (2, 2)


def test_jsonl_prompt_completion(tmp_path):
    rows = _pairs(30)
    task = user_task(str(_write_jsonl(tmp_path / "sft.jsonl", rows)))
    assert task.kind == "causal" and task.info["format"] == "causal" and task.labels == ()
    assert _multiset(_all_rows(task)) == _multiset(rows)
    assert (len(task.train), len(task.validation), len(task.test)) == (27, 1, 2)


def test_jsonl_messages_is_a_causal_chat_task(tmp_path):
    rows = _chats(20)
    task = user_task(str(_write_jsonl(tmp_path / "chat.jsonl", rows)))
    assert task.kind == "causal" and task.info["format"] == "chat"
    for row in _all_rows(task):
        assert set(row) == {"messages"} and row["messages"][-1]["role"] == "assistant"
    assert _multiset(_all_rows(task)) == _multiset(rows)


def test_chat_rows_need_a_chat_template():
    from riemannlora.bench.tasks import tokenize_rows

    class NoTemplate:
        chat_template = None
        eos_token_id = 0

    with pytest.raises(DataError, match="no chat template"):
        tokenize_rows("causal", NoTemplate(), _chats(1), 32)


def test_folder_with_train_validation_test(tmp_path):
    folder = tmp_path / "data"
    train, validation, test = _intents(30), _intents(6, start=100), _intents(9, start=200)
    _write_jsonl(folder / "train.jsonl", train)
    _write_jsonl(folder / "validation.jsonl", validation)
    _write_jsonl(folder / "test.jsonl", test)
    (folder / "README.md").write_text("not data")  # other files are ignored
    task = user_task(str(folder))
    # given splits are used as they are: nothing held out of train
    assert (len(task.train), len(task.validation), len(task.test)) == (30, 6, 9)
    for split, rows in (("train", train), ("validation", validation), ("test", test)):
        got = task.split(split)
        assert sorted(r["text"] for r in got) == sorted(r["text"] for r in rows)
        by_text = {r["text"]: r["label"] for r in rows}
        assert all(task.labels[r["label"]] == by_text[r["text"]] for r in got)


def test_folder_with_only_a_dev_file_uses_it_for_validation_and_test(tmp_path):
    folder = tmp_path / "data"
    _write_jsonl(folder / "train.jsonl", _pairs(10))
    _write_jsonl(folder / "dev.jsonl", _pairs(3))
    task = user_task(str(folder))
    assert len(task.train) == 10 and len(task.validation) == 3
    assert task.test == task.validation


def test_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _intents(50)
    path = tmp_path / "intents.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    task = user_task(str(path))
    assert task.kind == "classification" and task.labels == _INTENTS
    assert sorted(r["text"] for r in _all_rows(task)) == sorted(r["text"] for r in rows)
    assert (len(task.validation), len(task.test)) == (2, 3)


def test_gzipped_jsonl(tmp_path):
    rows = _pairs(20)
    path = tmp_path / "sft.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    task = user_task(str(path))
    assert _multiset(_all_rows(task)) == _multiset(rows)


# --------------------------------------------------------------------------------------------
# the split rule and the fingerprint
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "held"),
    [
        (3, 2),  # at least 2 held out, one left to train on
        (20, 2),
        (57, 6),  # 10 % = 5.7 -> 6
        (73, 7),  # an odd number: validation gets the smaller half
        (1000, 100),
        (25_000, 2000),  # at most 2,000
    ],
)
def test_split_rule(tmp_path, n, held):
    assert HOLDOUT_FRACTION == 0.1
    rows = _pairs(n)
    rows.append(dict(rows[0]))  # a duplicated row stays two rows
    path = _write_jsonl(tmp_path / "sft.jsonl", rows)
    task = user_task(str(path))
    n += 1
    assert held == max(2, min(2000, round(0.1 * n)))
    assert len(task.validation) == held // 2
    assert len(task.test) == held - held // 2
    assert len(task.train) == n - held
    # nothing lost, nothing duplicated across the splits
    assert _multiset(_all_rows(task)) == _multiset(rows)
    # seeded: the same split every time; shuffled: not simply the file's last rows
    again = user_task(str(path))
    assert (again.train, again.validation, again.test) == (task.train, task.validation, task.test)
    if n > 100:
        assert task.validation + task.test != rows[-held:]


def test_fingerprint_follows_the_rows(tmp_path):
    rows = _intents(40)
    a = data_fingerprint(user_task(str(_write_jsonl(tmp_path / "a.jsonl", rows))))
    same = data_fingerprint(user_task(str(_write_jsonl(tmp_path / "b.jsonl", rows))))
    assert a == same and len(a) == 16
    text = [dict(r) for r in rows]
    text[7]["text"] += "!"
    label = [dict(r) for r in rows]
    label[7]["label"] = "weather" if label[7]["label"] != "weather" else "book_flight"
    changed = {
        data_fingerprint(user_task(str(_write_jsonl(tmp_path / f"{name}.jsonl", r))))
        for name, r in (("text", text), ("label", label))
    }
    assert len(changed) == 2 and a not in changed


def test_a_changed_file_is_read_again_in_the_same_process(tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", _intents(30))
    parser = cli.build_parser()

    def data_hash() -> str:
        args = parser.parse_args(["bench", "--data", str(data), "--quick"])
        return cli._plan(args.parser, args).base.data_hash

    before = data_hash()
    rows = _intents(30)
    rows[3]["text"] = "changed"
    _write_jsonl(data, rows)
    assert data_hash() != before


# --------------------------------------------------------------------------------------------
# bad data through the command line: exit 2, a message naming the problem, nothing written
# --------------------------------------------------------------------------------------------


def _folder(tmp_path: pathlib.Path, files: dict[str, list[dict]]) -> pathlib.Path:
    folder = tmp_path / "data"
    for name, rows in files.items():
        _write_jsonl(folder / name, rows)
    return folder


def _mixed_labels(tmp_path):
    rows = _intents(30)
    rows[5]["label"] = 3  # one integer among string labels
    return _write_jsonl(tmp_path / "d.jsonl", rows)


def _bytes(name: str, data: bytes):
    def make(tmp_path):
        path = tmp_path / name
        path.write_bytes(data)
        return path

    return make


def _jsonl(name: str, rows: list[dict]):
    return lambda tmp_path: _write_jsonl(tmp_path / name, rows)


_UNKNOWN_LABEL = {
    "train.jsonl": _intents(12),
    "validation.jsonl": [*_intents(3, start=50), {"text": "play a song", "label": "music"}],
}
_BAD_CHAT = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "bye"}]},
    *_chats(20),
]

BAD_DATA = {
    "missing-label-column": (
        _jsonl("d.jsonl", [{"text": f"query {i}"} for i in range(20)]),
        "missing column label",
    ),
    "missing-completion-column": (
        _jsonl("d.jsonl", [{"prompt": f"q {i}"} for i in range(20)]),
        "missing column completion",
    ),
    "wrong-csv-columns": (
        lambda tmp_path: _write_csv(
            tmp_path / "d.csv", [{"sentence": r["text"], "label": r["label"]} for r in _intents(20)]
        ),
        "missing column text",
    ),
    "empty-file": (_bytes("d.jsonl", b""), "the file is empty"),
    "unknown-label-in-validation": (
        lambda tmp_path: _folder(tmp_path, _UNKNOWN_LABEL),
        "label 'music' does not occur in the training data",
    ),
    "not-utf8": (
        _bytes("d.jsonl", '{"text": "caf\u00e9 au lait", "label": "a"}\n'.encode("latin-1")),
        "not valid UTF-8",
    ),
    "unknown-extension": (_bytes("d.txt", b"text,label\nhello,a\nbye,b\n"), "unknown file type"),
    "no-such-file": (lambda tmp_path: tmp_path / "missing.jsonl", "no such file or folder"),
    "malformed-json-line": (
        _bytes("d.jsonl", b'{"text": "a", "label": "x"}\n{"text": "b", "label": \n'),
        "could not be read as json",
    ),
    "not-parquet": (_bytes("d.parquet", b"this is not a parquet file"), "could not be read"),
    "null-label": (
        _jsonl("d.jsonl", [*_intents(10), {"text": "x", "label": None}, *_intents(10, 20)]),
        "'label' must be a string or an integer, got None",
    ),
    "float-label": (
        _jsonl("d.jsonl", [{"text": f"q{i}", "label": i % 2 + 0.5} for i in range(20)]),
        "'label' must be a string or an integer, got 0.5",
    ),
    "mixed-label-types": (_mixed_labels, "mix strings and integers"),
    "empty-text": (
        _jsonl("d.jsonl", [*_intents(5), {"text": "  ", "label": "weather"}, *_intents(10, 9)]),
        "column 'text' must be a non-empty string",
    ),
    "one-label-only": (
        _jsonl("d.jsonl", [{"text": f"q{i}", "label": "same"} for i in range(20)]),
        "needs at least two distinct labels",
    ),
    "last-turn-not-assistant": (_jsonl("d.jsonl", _BAD_CHAT), "must be the assistant's"),
    "messages-not-a-list": (
        _jsonl("d.jsonl", [{"messages": f"hello {i}"} for i in range(20)]),
        "'messages' must be a list",
    ),
    "too-few-rows": (_jsonl("d.jsonl", _pairs(2)), "too few to hold out"),
    "folder-without-train": (
        lambda tmp_path: _folder(
            tmp_path, {"validation.jsonl": _pairs(5), "test.jsonl": _pairs(5)}
        ),
        "no training file",
    ),
    "empty-folder": (lambda tmp_path: (tmp_path / "data").mkdir() or tmp_path / "data", "has no"),
    "folder-mixing-file-types": (
        lambda tmp_path: (
            _write_csv(
                _folder(tmp_path, {"train.jsonl": _intents(10)}) / "test.csv", _intents(4)
            ).parent
        ),
        "mixes file types",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_a_clear_cli_error(case, tmp_path, capsys):
    make, message = BAD_DATA[case]
    bad = make(tmp_path)
    out = tmp_path / "out"
    argv = ["bench", "--data", str(bad), "--out", str(out), "--methods", "adamw",
            "--threads", "1", "--no-progress"]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--data: " in err and message in err, err
    assert not out.exists()


def test_unknown_hub_id_offline_is_a_clear_cli_error(tmp_path, capsys, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # the libraries read these variables when imported (earlier tests imported them)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--data", "nobody/no-such-dataset-xyz", "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "nobody/no-such-dataset-xyz" in err and "the hub is offline" in err, err
    assert "pass a local .jsonl" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--task", "clinc150"], "--data and --task exclude each other"),
        (["--scoring", "generate"], "--scoring is for --task commonsense"),
    ],
)
def test_data_flag_conflicts(flags, message, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "d.jsonl", _intents(30))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--data", str(data), *flags, "--out", str(out)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_plan_of_user_data(tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", _intents(30))
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "--data", str(data), "--quick"])
    plan = cli._plan(args.parser, args)
    assert plan.base.task == "custom" and plan.base.data == str(data)
    assert plan.base.data_hash == data_fingerprint(user_task(str(data)))
    assert plan.base.model == "sentence-transformers/all-MiniLM-L6-v2"
    args = parser.parse_args(
        ["bench", "--data", str(_write_jsonl(tmp_path / "p.jsonl", _pairs(30)))]
    )
    assert cli._plan(args.parser, args).base.model == "HuggingFaceTB/SmolLM2-135M-Instruct"


# --------------------------------------------------------------------------------------------
# end to end: `riemannlora bench --data FILE --quick`
# --------------------------------------------------------------------------------------------

_QUICK = [
    "--quick",
    "--methods",
    "adamw",
    "--steps",
    "2",
    "--eval-every",
    "1",
    "--eval-size",
    "2",
    "--final-eval-size",
    "2",
    "--batch-size",
    "2",
    "--threads",
    "1",
    "--no-progress",
]  # fmt: skip  (eval sizes: the 2 validation / test rows that 40 rows hold out)


def _results(out: pathlib.Path, data: pathlib.Path, metrics: list[str]) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "custom" and results["metrics"] == metrics
    assert results["settings"]["data"] == str(data)
    assert results["settings"]["data_hash"] == data_fingerprint(user_task(str(data)))
    assert results["failures"] == []
    assert (results["settings"]["eval_size"], results["settings"]["final_eval_size"]) == (2, 2)
    (run,) = results["runs"]
    assert [p[0] for p in run["eval_loss"]] == [0, 1, 2]
    for name in metrics:
        value = run["final"][name]
        assert isinstance(value, float) and math.isfinite(value), (name, value)
        assert results["summary"]["adamw"][f"{name}_mean"] == value
    return results


@pytest.mark.slow
def test_bench_user_classification_jsonl_end_to_end(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "intents.jsonl", _intents(60))
    out = tmp_path / "out"
    assert cli.main(["bench", "--data", str(data), *_QUICK, "--out", str(out)]) == 0
    assert "| adamw |" in capsys.readouterr().out
    results = _results(out, data, ["accuracy", "test_loss"])
    assert results["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    final = results["runs"][0]["final"]
    assert 0.0 <= final["accuracy"] <= 1.0 and final["test_loss"] > 0
    assert f"custom ({data})" in (out / "results.md").read_text()
    # the same data again: from the cache
    assert cli.main(["bench", "--data", str(data), *_QUICK, "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["cache"] == {"hits": 1, "trained": 0}
    # one row changed: read again and trained anew
    rows = _intents(60)
    rows[0]["text"] += " today"
    _write_jsonl(data, rows)
    assert cli.main(["bench", "--data", str(data), *_QUICK, "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["cache"] == {"hits": 0, "trained": 1}
    assert len(list((out / "runs").glob("*.json"))) == 2


@pytest.mark.slow
@pytest.mark.parametrize("rows", [_pairs(40), _chats(40)], ids=["prompt-completion", "messages"])
def test_bench_user_causal_jsonl_end_to_end(rows, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "sft.jsonl", rows)
    out = tmp_path / "out"
    assert cli.main(["bench", "--data", str(data), *_QUICK, "--out", str(out)]) == 0
    assert "| adamw |" in capsys.readouterr().out
    results = _results(out, data, ["test_loss"])
    assert results["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert results["runs"][0]["final"]["test_loss"] > 0


# --------------------------------------------------------------------------------------------
# other column names (--columns), as hub data sets have them
# --------------------------------------------------------------------------------------------


def test_columns_rename_a_hub_style_schema(tmp_path):
    from riemannlora.bench.userdata import parse_columns

    rows = [{"utterance": r["text"], "intent": r["label"], "extra": 1} for r in _intents(40)]
    path = _write_jsonl(tmp_path / "hub_style.jsonl", rows)
    with pytest.raises(DataError, match="--columns"):
        user_task(str(path))
    task = user_task(str(path), "label=intent, text=utterance")
    plain = user_task(str(_write_jsonl(tmp_path / "plain.jsonl", _intents(40))))
    assert task.labels == plain.labels
    assert [r["text"] for r in task.train] == [r["text"] for r in plain.train]
    assert parse_columns("label=intent") == {"intent": "label"}
    for bad, match in (
        ("label", "NEW=OLD"),
        ("labels=intent", "not one of"),
        ("label=intent,text=intent", "twice"),
    ):
        with pytest.raises(DataError, match=match):
            parse_columns(bad)
    with pytest.raises(DataError, match="no column 'topic'"):
        user_task(str(path), "label=topic")
    clash = _write_jsonl(tmp_path / "clash.jsonl", [{**r, "label": "x"} for r in rows])
    with pytest.raises(DataError, match="overwrite"):
        user_task(str(clash), "label=intent")


def test_columns_flag_through_the_cli(tmp_path, capsys):
    rows = [{"utterance": r["text"], "intent": r["label"]} for r in _intents(40)]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    parser = cli.build_parser()
    args = parser.parse_args(
        ["bench", "--data", str(path), "--columns", "label=intent,text=utterance"]
    )
    plan = cli._plan(args.parser, args)
    assert plan.base.columns == "label=intent,text=utterance" and plan.base.task == "custom"
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--data", str(path), "--columns", "label=nope", "--out", str(out)])
    assert exc.value.code == 2 and "no column 'nope'" in capsys.readouterr().err
    assert not out.exists()


def test_eval_sizes_of_a_small_data_set(tmp_path, capsys):
    """The presets' eval sizes are larger than a small file's held-out rows: the run reads
    (and records) all of them; an explicit larger size is refused before anything runs."""
    data = _write_jsonl(tmp_path / "d.jsonl", _intents(60))
    task = user_task(str(data))
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "--data", str(data), "--quick"])
    base = cli._plan(args.parser, args).base
    assert (base.eval_size, base.final_eval_size) == (len(task.validation), len(task.test))
    out = tmp_path / "out"
    too_many = str(len(task.validation) + 1)
    with pytest.raises(SystemExit) as exc:
        cli.main(
            ["bench", "--data", str(data), "--quick", "--eval-size", too_many, "--out", str(out)]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--eval-size {too_many}: --data has no more" in err
    assert f"use at most {len(task.validation)}" in err
    assert not out.exists()
