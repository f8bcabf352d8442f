"""The benchmark harness: method registry, summaries, report, sweep logic, CLI, real runs."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import pathlib
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import riemannlora
from riemannlora import cli
from riemannlora.bench.assets import canonical_model_id
from riemannlora.bench.measure import source_digest
from riemannlora.bench.methods import (
    MAIN_METHODS,
    METHODS,
    MethodContext,
    available_methods,
    get_method,
    lr_grid,
)
from riemannlora.bench.report import PLOTS, format_table, write_report
from riemannlora.bench.runner import RunConfig, run_sweep
from riemannlora.bench.summary import lr_band_decades, steps_to_reach, summarize
from riemannlora.bench.tasks import COMMONSENSE_TEST_SETS
from riemannlora.bench.workloads import WORKLOADS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# method registry on a tiny PEFT model
# --------------------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 24)
        self.head = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("name", available_methods())
def test_every_method_builds_and_steps(name):
    from peft import LoraConfig

    torch.manual_seed(0)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    ctx = MethodContext(
        compute_loss=lambda m: F.cross_entropy(m(x), y),
        adamw_lr=1e-3,
        seed=0,
    )
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], modules_to_save=["head"])
    method = get_method(name)
    model = method.initialize(Tiny(), config, ctx)
    optimizer = method.build(model, method.lr_for("classification"), ctx)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    for _ in range(2):
        loss = ctx.compute_loss(model)
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = dict(model.named_parameters())
    changed = [n for n, p in trainable.items() if not torch.equal(p, after[n].detach())]
    assert any("lora" in n for n in changed), changed
    assert any("head" in n for n in changed), changed
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_registry_lists_required_methods():
    required = {
        "sgd", "adamw", "loraplus", "peft-riemannian", "muon", "scaled-sgd", "scaled-adamw",
        "riemannian-sgd", "riemannian-sgd-loi", "riemannion", "riemannion-loi", "pissa",
        "lora-ga",
    }  # fmt: skip
    assert required == {n for n, m in METHODS.items() if not m.ablation}
    assert set(available_methods(ablations=False)) <= required
    assert set(MAIN_METHODS) <= set(METHODS)
    for m in METHODS.values():
        assert m.summary
        for kind in ("classification", "causal"):
            grid = lr_grid(m.lr_for(kind))
            assert len(grid) == 7 and grid == sorted(grid)
            assert math.log10(grid[-1] / grid[0]) >= 3 - 1e-9


def test_ablations_change_only_what_they_name():
    from peft import LoraConfig

    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    ctx = MethodContext(compute_loss=lambda m: F.cross_entropy(m(x), y), adamw_lr=1e-3, seed=0)

    def build(name: str, lr: float):
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"],
                            modules_to_save=["head"])  # fmt: skip
        method = get_method(name)
        return method.build(method.initialize(Tiny(), config, ctx), lr, ctx)

    adamw = build("adamw-fixhead", 0.5)
    lrs = sorted(g["lr"] for g in adamw.param_groups)
    assert lrs == [1e-3, 0.5] and sum(len(g["params"]) for g in adamw.param_groups) == 4 + 2
    assert {g["lr"] for g in build("adamw", 0.5).param_groups} == {0.5}
    plain_sgd, heavy_ball = build("sgd", 0.5), build("sgd-momentum", 0.5)
    assert {g["momentum"] for g in plain_sgd.param_groups} == {0}
    assert {g["momentum"] for g in heavy_ball.param_groups} == {0.9}
    assert sum(len(g["params"]) for g in heavy_ball.param_groups) == 4 + 2
    if "riemannian-sgd" in available_methods():  # the control has the manifold step's momentum
        rsgd = build("riemannian-sgd", 0.5)
        assert {g["momentum"] for g in rsgd.param_groups if "momentum" in g} == {0.9}
    if "riemannion" in available_methods():
        plain, fixed = build("riemannion", 0.5), build("riemannion-fixhead", 0.5)
        assert {g["lr"] for g in plain.param_groups} == {0.5}
        assert {g["lr"] for g in fixed.param_groups} == {1e-3, 0.5}
        assert not any(g.get("store_orthogonalized") for g in plain.param_groups)
        ortho = build("riemannion-storeortho", 0.5)
        assert any(g.get("store_orthogonalized") for g in ortho.param_groups)
        manifold = [g for g in plain.param_groups if "scale_lr" in g]
        assert manifold and {g["scale_lr"] for g in manifold} == {"match_adamw"}
        unscaled = build("riemannion-unscaled", 0.5)
        assert {g["scale_lr"] for g in unscaled.param_groups if "scale_lr" in g} == {None}
        assert {g["lr"] for g in unscaled.param_groups} == {0.5}


class Blocks(nn.Module):
    """Llama-like names: attention projections, an MLP, an output head."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict() for _ in range(2))
        for layer in self.layers:
            layer["self_attn"] = nn.ModuleDict(
                {k: nn.Linear(8, 8) for k in ("q_proj", "k_proj", "v_proj", "o_proj")}
            )
            layer["mlp"] = nn.ModuleDict(
                {"up_proj": nn.Linear(8, 16), "down_proj": nn.Linear(16, 8)}
            )
        self.score = nn.Linear(8, 3)


def test_lora_target_modules():
    from riemannlora.bench.workloads import lora_target_modules

    model = Blocks()
    assert lora_target_modules(model) == [
        "down_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj",
    ]  # fmt: skip
    attention = lora_target_modules(model, "attention")
    expected = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "attn" in n]
    assert attention == sorted(expected) and len(attention) == 8
    assert lora_target_modules(model, " q_proj, v_proj,q_proj ") == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="unknown: query"):
        lora_target_modules(model, "q_proj,query")
    with pytest.raises(ValueError, match="comma-separated names"):
        lora_target_modules(model, ",")
    with pytest.raises(ValueError, match="score"):  # the head is never a target
        lora_target_modules(model, "score")
    plain = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"no nn\.Linear of this model sits inside"):
        lora_target_modules(plain, "attention")


def test_get_method_errors():
    with pytest.raises(ValueError, match=r"unknown method 'nope'.*adamw"):
        get_method("nope")
    with pytest.raises(ValueError, match="> 0"):
        lr_grid(0.0)


# --------------------------------------------------------------------------------------------
# summaries and report on synthetic records
# --------------------------------------------------------------------------------------------


def _record(method: str, lr: float, seed: int, final: float | None, acc: float = 0.5) -> dict:
    cfg = RunConfig(
        task="clinc150", model="m", method=method, lr=lr, seed=seed, steps=100, rank=8,
        batch_size=4, eval_every=50, eval_size=8, final_eval_size=8, max_length=16,
        max_new_tokens=0,
    )  # fmt: skip
    curve = [[0, 1.4], [50, None if final is None else (1.4 + final) / 2], [100, final]]
    return {
        "key": cfg.key(),
        "config": dataclasses.asdict(cfg),
        "final": {"eval_loss": final, "accuracy": None if final is None else acc},
        "eval_loss": curve,
        "train_loss": [1.0],
        "diverged": final is None,
        "time_per_step_s": 0.2,
        "opt_step_s": 0.01,
        "init_s": 0.1,
        "peak_mem_mb": 10.0,
        "wall_s": 5.0,
    }


def test_lr_band_and_steps_to_reach():
    # best 1.0 at 1e-3; 1e-5 (1.01), 1e-4 (1.04) and 1e-2 (1.05) are within 5 %, 1e-1 is not
    band = lr_band_decades({1e-4: 1.04, 1e-3: 1.0, 1e-2: 1.05, 1e-1: 1.2, 1e-5: 1.01})
    assert band == pytest.approx(3.0)
    assert lr_band_decades({1e-3: 1.0}) is None
    assert lr_band_decades({1e-3: math.inf, 1e-2: math.inf}) is None
    assert lr_band_decades({1e-3: 1.0, 1e-2: math.inf}) == 0.0
    curve = [[0, 2.0], [10, None], [20, 1.0], [30, 0.5]]
    assert steps_to_reach(curve, 1.0) == 20
    assert steps_to_reach(curve, 0.1) is None


def test_lr_band_is_contiguous():
    assert lr_band_decades({1e-4: 1.0, 1e-3: 2.0, 1e-2: 1.01}) == 0.0


def test_summarize():
    records = [
        _record("adamw", 1e-3, 0, 1.0, 0.6),
        _record("adamw", 1e-2, 0, 1.2),
        _record("adamw", 1e-3, 1, 1.1, 0.7),
        _record("riemannion", 1e-3, 0, 0.9, 0.8),
        _record("riemannion", 1e-1, 0, None),
    ]
    s = summarize(records, ["accuracy"])
    assert list(s) == ["adamw", "riemannion"]
    a, r = s["adamw"], s["riemannion"]
    assert a["best_lr"] == 1e-3 and a["seeds"] == [0, 1]
    assert a["eval_loss_mean"] == pytest.approx(1.05)
    assert a["eval_loss_std"] == pytest.approx(math.sqrt(0.005))
    assert a["accuracy_mean"] == pytest.approx(0.65)
    assert r["eval_loss_std"] is None and r["diverged_runs"] == 1
    assert r["final_eval_loss_by_lr"] == {"0.001": 0.9, "0.1": None}
    # target 1.05: riemannion's curve (1.4, 1.15, 0.9) reaches it at step 100; of adamw's two
    # seeds one never does, so the median (mean of 100 and "never") is "never"
    assert r["steps_to_reference"] == 100 and a["steps_to_reference"] is None
    table = format_table(s, ["accuracy"], steps=100)
    assert "| riemannion | 0.001 | 0.9000 | 0.8000 | 100 |" in table
    json.dumps(s, allow_nan=False)


def test_write_report(tmp_path):
    records = [_record("adamw", lr, 0, 1.0 + abs(math.log10(lr) + 3) / 10) for lr in (1e-4, 1e-3)]
    summary = summarize(records, ["accuracy"])
    results = {
        "summary": summary,
        "runs": records,
        "metrics": ["accuracy"],
        "settings": {"steps": 100},
    }
    table = write_report(tmp_path, results, "test")
    assert "adamw" in table
    assert (
        json.loads((tmp_path / "results.json").read_text())["summary"]["adamw"]["best_lr"] == 1e-3
    )
    assert table in (tmp_path / "results.md").read_text()
    _check_pngs(tmp_path)


def test_report_against_another_reference(tmp_path):
    """--reference sgd: the paired differences and steps-to-target are against sgd, and the
    report says so; adamw is then an ordinary method."""
    records = [
        _record(m, 1e-3, seed, final, acc)
        for seed in (0, 1, 2)
        for m, final, acc in (("sgd", 1.2 + seed / 100, 0.4), ("adamw", 1.0, 0.5))
    ]
    summary = summarize(records, ["accuracy"], reference="sgd")
    assert summary["sgd"]["paired"]["eval_loss"]["mean"] == 0  # itself
    paired = summary["adamw"]["paired"]["accuracy"]
    assert paired["diffs"] == pytest.approx([0.1] * 3) and paired["verdict"] == "win"
    results = {
        "summary": summary,
        "runs": records,
        "metrics": ["accuracy"],
        "settings": {"steps": 100},
        "reference": "sgd",
    }
    table = write_report(tmp_path, results, "test")
    assert "steps to sgd loss" in table
    text = (tmp_path / "results.md").read_text()
    assert "minus sgd at its own" in text and "| adamw | 3 |" in text


def test_lr_sweep_plot_clips_runaway_losses():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from riemannlora.bench.report import _loss_cap, _plot_sweep

    records = [_record("sgd", lr, 0, loss) for lr, loss in ((0.1, 0.9), (1.0, 30.0), (10.0, None))]
    cap = _loss_cap(records)
    assert cap == pytest.approx(1.5 * 1.4)
    assert _loss_cap([{**records[0], "eval_loss": []}]) is None
    fig, ax = plt.subplots()
    _plot_sweep(ax, summarize(records, ["accuracy"]), cap)
    line, marker = ax.get_lines()
    assert list(line.get_ydata()) == [0.9, cap]  # the 30.0 drawn at the cap, the diverged left out
    assert list(marker.get_ydata()) == [cap] and "above the axis" in ax.get_title()
    plt.close(fig)


def _check_pngs(out: pathlib.Path) -> None:
    import matplotlib.image

    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE, name
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


# --------------------------------------------------------------------------------------------
# sweep logic with a stand-in cache
# --------------------------------------------------------------------------------------------


class FakeCache:
    def __init__(self) -> None:
        self.calls: list[RunConfig] = []

    def run(self, cfg: RunConfig, progress: bool = True) -> dict:
        self.calls.append(cfg)
        if cfg.method == "sgd":
            raise RuntimeError("boom")
        loss = 1.0 + (math.log10(cfg.lr) + 3) ** 2 + 0.01 * cfg.seed
        return _record(cfg.method, cfg.lr, cfg.seed, loss)


def test_run_sweep_two_stages_and_failures():
    base = RunConfig(**_record("adamw", 1.0, 0, 1.0)["config"])
    cache = FakeCache()
    logs: list[str] = []
    records, failures = run_sweep(
        base,
        {"adamw": [1e-4, 1e-3, 1e-2], "sgd": [0.1]},
        [0, 1, 2],
        cache,  # type: ignore[arg-type]
        progress=False,
        log=logs.append,
    )
    runs = [(c.method, c.lr, c.seed) for c in cache.calls]
    assert runs == [
        ("adamw", 1e-4, 0), ("adamw", 1e-3, 0), ("adamw", 1e-2, 0),
        ("adamw", 1e-3, 1), ("adamw", 1e-3, 2), ("sgd", 0.1, 0),
    ]  # fmt: skip
    assert len(records) == 5
    assert len(failures) == 1 and "boom" in failures[0]["error"]
    assert logs and "boom" in logs[0]


class BusyElsewhereCache(FakeCache):
    """Stand-in for a run another process is training: ``cache.run`` answers None for the
    first ``busy`` calls of ``busy_cfg`` (lr), then the finished record."""

    def __init__(self, busy_lr: float, busy: int) -> None:
        super().__init__()
        self.busy_lr, self.busy = busy_lr, busy

    def run(self, cfg: RunConfig, progress: bool = True) -> dict | None:
        if cfg.lr == self.busy_lr and cfg.seed == 0 and self.busy:
            self.busy -= 1
            return None
        return super().run(cfg, progress)


def test_run_sweep_waits_for_runs_trained_elsewhere():
    """A stage-1 run held by another process: the sweep goes on with the other methods,
    polls, and runs the method's stage 2 only once that result is in."""
    base = RunConfig(**_record("adamw", 1.0, 0, 1.0)["config"])
    cache = BusyElsewhereCache(busy_lr=1e-3, busy=2)
    records, failures = run_sweep(
        base,
        {"adamw": [1e-4, 1e-3, 1e-2], "scaled-adamw": [1e-3 * 3]},
        [0, 1],
        cache,  # type: ignore[arg-type]
        progress=False,
        poll_s=0.0,
    )
    runs = [(c.method, c.lr, c.seed) for c in cache.calls]
    assert runs == [
        ("adamw", 1e-4, 0), ("adamw", 1e-2, 0), ("scaled-adamw", 3e-3, 0),
        ("scaled-adamw", 3e-3, 1), ("adamw", 1e-3, 0), ("adamw", 1e-3, 1),
    ]  # fmt: skip
    assert len(records) == 6 and not failures


def test_run_cache_claims_are_exclusive_and_stale_ones_taken_over(tmp_path):
    import platform
    import subprocess
    import sys

    from riemannlora.bench.runner import RunCache

    cache = RunCache(tmp_path)
    cfg = RunConfig(**_record("adamw", 1e-3, 0, 1.0)["config"])
    assert cache.claim(cfg)
    assert not RunCache(tmp_path).claim(cfg)  # held by this (live) process
    cache.release(cfg)
    # a lock left by a process that has exited is taken over
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    lock = cache.lock_path(cfg)
    lock.write_text(json.dumps({"pid": int(child.stdout), "host": platform.node()}))
    assert cache.claim(cfg)
    cache.release(cfg)
    # a lock being written (unreadable yet) or from another host is respected
    lock.write_text("")
    assert not cache.claim(cfg)
    lock.write_text(json.dumps({"pid": 1, "host": "another-machine"}))
    assert not cache.claim(cfg)
    lock.unlink()
    # a finished run comes from the cache without any claim
    cache.put(cfg, _record("adamw", 1e-3, 0, 1.0))
    assert cache.run(cfg)["config"]["lr"] == 1e-3 and cache.hits == 1
    assert not lock.exists()


def test_run_config_validation_and_key():
    cfg = RunConfig(**_record("adamw", 1e-3, 0, 1.0)["config"])
    assert cfg.key() == RunConfig(**dataclasses.asdict(cfg)).key()
    assert cfg.key() != dataclasses.replace(cfg, steps=101).key()
    assert cfg.key().startswith("clinc150_adamw_lr0.001_s0_")
    with pytest.raises(ValueError, match="lr must be"):
        dataclasses.replace(cfg, lr=0.0)
    with pytest.raises(ValueError, match="unknown method"):
        dataclasses.replace(cfg, method="nope")
    with pytest.raises(ValueError, match="unknown task"):
        dataclasses.replace(cfg, task="nope")
    # a field added later leaves the keys of the runs cached before it unchanged at its default
    assert "targets" not in cfg.identity()
    assert dataclasses.replace(cfg, targets="attention").key() != cfg.key()
    with pytest.raises(ValueError, match="targets must be"):
        dataclasses.replace(cfg, targets=" ")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "adamw,nope"], "unknown method 'nope'"),
        (["--lrs", "0"], "> 0"),
        (["--lrs=-1e-3"], "> 0"),
        (["--lrs", "abc"], "not a number"),
        (["--methods", "adamw", "--lrs-for", "sgd=1e-1"], "not one of the methods run"),
        (["--methods", "sgd", "--lrs-for", "sgd"], "expected METHOD=LR"),
        (["--methods", "sgd", "--lrs-for", "sgd=0"], "--lrs-for sgd: learning rates must be"),
        (["--methods", "sgd", "--lrs-for", "sgd=1", "--lrs-for", "SGD=2"], "given twice"),
        (["--task", "nope"], "invalid choice"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--seeds", "0,x"], "--seeds"),
        (["--quick", "--preset", "full"], "conflicts"),
        (["--methods", "adamw,adamw"], "twice"),
        (["--scoring", "generate"], "--scoring is for --task commonsense"),
        (["--task", "commonsense", "--scoring", "nope"], "invalid choice"),
        (["--task", "diffusion", "--targets", "attention"], "leave targets at 'all-linear'"),
        (["--targets", "q_proj"], "unknown: q_proj"),
        (
            ["--methods", "adamw", "--reference", "sgd"],
            "--reference: 'sgd' is not one of",
        ),  # MiniLM's are query, key, value, dense
    ],
)
def test_cli_rejects_bad_flags(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--out", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def _plan(*argv: str):
    parser = cli.build_parser()
    args = parser.parse_args(["bench", *argv])
    return cli._plan(args.parser, args)


def test_cli_reference():
    assert _plan().reference == "adamw"
    assert _plan("--methods", "sgd,riemannian-sgd", "--reference", "SGD").reference == "sgd"


def test_cli_targets_have_one_spelling():
    assert _plan("--targets", " value, query,value ").base.targets == "query,value"
    assert _plan("--targets", "attention").base.targets == "attention"
    assert _plan().base.targets == "all-linear"


def test_cli_presets_plan_the_runs():
    default = _plan()
    assert list(default.lrs) == [m for m in MAIN_METHODS if m in available_methods()]
    assert all(len(v) == 1 for v in default.lrs.values()) and default.seeds == [0]
    assert cli.DEFAULT_TASK == "clinc150"
    assert default.base.task == "clinc150" and default.base.steps == 300
    assert default.base.data == "" and default.base.data_hash == ""
    assert default.base.model == "sentence-transformers/all-MiniLM-L6-v2"

    full = _plan("--preset", "full")
    assert list(full.lrs) == available_methods(ablations=False) and full.seeds == [0, 1, 2]
    assert len(full.lrs) == 13 and not any(METHODS[n].ablation for n in full.lrs)
    for name, lrs in full.lrs.items():
        assert lrs == lr_grid(METHODS[name].lr_for("classification"))

    quick = _plan("--quick", "--task", "e2e", "--steps", "7", "--lrs", "1e-4,1e-3")
    assert quick.preset == "quick" and quick.base.steps == 7 and quick.base.task == "e2e"
    assert quick.base.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert all(v == [1e-4, 1e-3] for v in quick.lrs.values())
    grid = lr_grid(METHODS["adamw"].lr_for("classification"))
    assert _plan("--lrs", "grid", "--methods", "adamw").lrs == {"adamw": grid}


def test_cli_lrs_for_gives_a_method_its_own_grid():
    plan = _plan(
        "--methods", "adamw,sgd,riemannian-sgd,riemannion",
        "--lrs", "1e-4,1e-3",
        "--lrs-for", "SGD=1e-2,1",
        "--lrs-for", "riemannian-sgd=grid",
    )  # fmt: skip
    assert plan.lrs == {
        "adamw": [1e-4, 1e-3],
        "sgd": [1e-2, 1.0],
        "riemannian-sgd": lr_grid(METHODS["riemannian-sgd"].lr_for("classification")),
        "riemannion": [1e-4, 1e-3],
    }
    # without --lrs, the other methods keep the preset's choice (default lr; full: the grid)
    plan = _plan("--methods", "adamw,sgd", "--lrs-for", "sgd=default")
    assert plan.lrs == {
        "adamw": [METHODS["adamw"].lr_for("classification")],
        "sgd": [METHODS["sgd"].lr_for("classification")],
    }
    full = _plan("--preset", "full", "--methods", "adamw,sgd", "--lrs-for", "sgd=0.5")
    assert full.lrs == {"adamw": lr_grid(METHODS["adamw"].lr_for("classification")), "sgd": [0.5]}


def _split_rows(task: str, split: str) -> list[dict]:
    return WORKLOADS[task].task().split(split)


def _test_images_of_digit(digit: int) -> int:
    import gzip
    import pickle

    from riemannlora.bench.assets import mnist_file
    from riemannlora.bench.diffusion.model import PRETRAIN_CONFIGS

    assert PRETRAIN_CONFIGS["riemannlora/mnist-digits-unet"].subject == digit
    with gzip.open(mnist_file(), "rb") as f:
        labels = pickle.load(f, encoding="latin1")[2][1]  # (train, valid, test) of (x, y)
    return int((labels == digit).sum())


@pytest.mark.parametrize(
    ("task", "flag", "limit"),
    [
        ("clinc150", "--eval-size", lambda: len(_split_rows("clinc150", "validation"))),
        ("clinc150", "--final-eval-size", lambda: len(_split_rows("clinc150", "test"))),
        ("e2e", "--final-eval-size", lambda: len({r["mr"] for r in _split_rows("e2e", "test")})),
        (
            "commonsense",
            "--final-eval-size",
            lambda: max(
                sum(r["set"] == name for r in _split_rows("commonsense", "test"))
                for name in COMMONSENSE_TEST_SETS
            ),
        ),
        ("gsm8k", "--eval-size", lambda: len(_split_rows("gsm8k", "validation"))),
        ("diffusion", "--eval-size", lambda: _test_images_of_digit(7)),
    ],
)
def test_cli_eval_sizes_beyond_the_data_are_refused(task, flag, limit, capsys, tmp_path):
    """An eval size larger than the data would read fewer rows than the run records."""
    n = limit()
    setting = flag[2:].replace("-", "_")
    assert getattr(_plan("--task", task, flag, str(n)).base, setting) == n  # the limit itself runs
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--out", str(tmp_path), "--task", task, flag, str(n + 1)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag} {n + 1}: {task} has no more" in err and f"use at most {n}" in err
    assert not (tmp_path / "runs").exists()


def test_a_workload_is_scored_and_bounded_by_its_scorer_not_its_name():
    """final_metrics and size_limits ask the workload's scorer: another scorer on the e2e data
    is called with the run's sizes (a model the e2e scorer could not decode with is never
    touched) and bounds final_eval_size by its own count."""
    from riemannlora.bench.scoring import E2E, FinalEval, Scorer
    from riemannlora.bench.workloads import final_metrics

    seen: list[FinalEval] = []

    def score(final: FinalEval) -> dict:
        seen.append(final)
        return {"bleu": 1.0}

    scorer = Scorer(score, lambda test: (len(test) // 2, "half of its test rows"), True)
    workload = dataclasses.replace(WORKLOADS["e2e"], scorer=scorer)
    out = final_metrics(
        workload, None, None, final_eval_size=3, max_length=16, max_new_tokens=2, eval_size=5
    )
    assert out == {"bleu": 1.0}
    (final,) = seen
    assert (final.final_eval_size, final.eval_size, final.max_new_tokens) == (3, 5, 2)
    assert final.task.test == _split_rows("e2e", "test")
    n_test = len(_split_rows("e2e", "test"))
    assert workload.size_limits()["final_eval_size"] == (n_test // 2, "half of its test rows")
    assert WORKLOADS["e2e"].scorer is E2E
    distinct = len({r["mr"] for r in _split_rows("e2e", "test")})
    assert WORKLOADS["e2e"].size_limits()["final_eval_size"][0] == distinct
    with pytest.raises(ValueError, match="no scorer"):
        dataclasses.replace(WORKLOADS["e2e"], scorer=None).size_limits()


def test_source_digest_tells_builds_apart(tmp_path):
    """A run records the digest of the code and data it ran: any edit, rename or move of bytes
    between files changes it; __pycache__ and a rewrite to the same bytes do not; a folder
    without files (a zipped install) has none."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    assert source_digest(pkg) is None
    a, b, data = pkg / "a.py", pkg / "sub" / "b.py", pkg / "sub" / "rows.json.xz"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    data.write_bytes(b"\xfd7zXZ rows")
    d0 = source_digest(pkg)
    assert re.fullmatch("[0-9a-f]{64}", d0) and source_digest(pkg) == d0
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"compiled")
    a.write_text("x = 1\n")
    assert source_digest(pkg) == d0
    for path, changed in ((a, "x = 2\n"), (data, "other rows")):
        before = path.read_bytes()
        path.write_text(changed)
        assert source_digest(pkg) != d0
        path.write_bytes(before)
        assert source_digest(pkg) == d0
    a.write_text("x = 1\ny")  # the same bytes in all, moved from one file to the other
    b.write_text(" = 2\n")
    assert source_digest(pkg) != d0
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    b.rename(pkg / "sub" / "c.py")
    assert source_digest(pkg) != d0
    assert source_digest() == source_digest(pathlib.Path(riemannlora.__file__).parent)


def test_cli_preset_sizes_beyond_the_data_read_all_of_it():
    """The gpu preset asks clinc150 for more test queries than it has: the run records what
    it reads (all of them), not the preset's number."""
    n_test = len(_split_rows("clinc150", "test"))
    assert WORKLOADS["clinc150"].settings("gpu")["final_eval_size"] > n_test
    assert _plan("--preset", "gpu").base.final_eval_size == n_test


def test_cli_help_lists_methods(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for name in METHODS:
        assert name in text
    for flag in ("--task", "--lrs", "--preset", "--quick", "--threads", "--device", "--out"):
        assert flag in text
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert cli.main(["methods"]) == 0


# --------------------------------------------------------------------------------------------
# real models, real data
# --------------------------------------------------------------------------------------------


def _finite_numbers(obj: object) -> None:
    if isinstance(obj, float):
        assert math.isfinite(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _finite_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            _finite_numbers(v)


@pytest.mark.slow
def test_bench_clinc150_end_to_end_and_cache(tmp_path, capsys):
    torch.set_num_threads(1)
    second = "riemannion" if "riemannion" in available_methods() else "scaled-adamw"
    argv = [
        "bench", "--task", "clinc150", "--model", "minilm", "--methods", f"adamw,{second}",
        "--steps", "3", "--eval-every", "2", "--eval-size", "16", "--final-eval-size", "32",
        "--batch-size", "8", "--out", str(tmp_path), "--no-progress", "--threads", "1",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| adamw |" in out and f"| {second} |" in out

    results = json.loads((tmp_path / "results.json").read_text())
    for key in ("task", "model", "preset", "settings", "summary", "runs", "failures", "cache"):
        assert key in results
    assert results["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert results["task"] == "clinc150" and results["metrics"] == ["accuracy", "test_loss"]
    assert results["cache"] == {"hits": 0, "trained": 2}
    assert results["failures"] == []
    assert set(results["summary"]) == {"adamw", second}
    for s in results["summary"].values():
        for key in ("best_lr", "eval_loss_mean", "accuracy_mean", "time_per_step_s",
                    "opt_step_s", "peak_mem_mb", "lr_band_decades", "steps_to_reference"):  # fmt: skip
            assert key in s
        assert 0.0 <= s["accuracy_mean"] <= 1.0
        # 150 intents and 3 steps: the test loss is still near ln 150 = 5.01
        assert 4.0 < s["test_loss_mean"] < 6.0
        assert s["time_per_step_s"] > 0 and s["peak_mem_mb"] >= 0
    for run in results["runs"]:
        assert [p[0] for p in run["eval_loss"]] == [0, 2, 3]
        assert len(run["train_loss"]) == 3 and run["steps_done"] == 3
        assert run["final"]["eval_loss"] == run["eval_loss"][-1][1]
        assert (tmp_path / "runs" / f"{run['key']}.json").is_file()
        # diagnostics at step 1 and at every eval point, for the baseline too
        assert [p[0] for p in run["diagnostics"]] == [1, 2, 3]
        for _, d in run["diagnostics"]:
            assert d["grad_norm"] > 0 and d["step_size_max"] > 0 and d["skipped_steps"] == 0
            assert 1.0 <= d["stable_rank_min"] <= d["stable_rank_max"] <= 8.0 + 1e-6
    _finite_numbers(results)
    _check_pngs(tmp_path)
    assert "| adamw |" in (tmp_path / "results.md").read_text()

    # second invocation: every run comes from the cache, nothing is trained again
    assert cli.main(argv) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["cache"] == {"hits": 2, "trained": 0}
    assert again["summary"] == results["summary"]

    # --report-only with a larger plan: trains nothing, reports the cached runs and lists
    # the runs not done yet
    assert cli.main([*argv, "--seeds", "0,1", "--report-only"]) == 0
    partial = json.loads((tmp_path / "results.json").read_text())
    assert partial["cache"] == {"hits": 2, "trained": 0}
    assert sorted((m["method"], m["seed"]) for m in partial["missing"]) == [
        ("adamw", 1),
        (second, 1),
    ]
    assert partial["summary"] == results["summary"]
    assert "2 planned run(s) not run yet" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_two_processes_share_one_sweep(tmp_path):
    """Two `riemannlora bench` processes on the same --out: every run is trained exactly once
    and both write the complete report."""
    import os
    import subprocess
    import sys

    argv = [
        sys.executable, "-m", "riemannlora.cli", "bench", "--task", "clinc150", "--model",
        "minilm", "--methods", "adamw,scaled-adamw", "--lrs", "1e-3,3e-3", "--steps", "2",
        "--eval-every", "2", "--eval-size", "8", "--final-eval-size", "8", "--batch-size", "4",
        "--threads", "1", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = [tmp_path / "shared", tmp_path / "shared"]
    procs = [
        subprocess.Popen(
            [*argv, "--out", str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for out in outs
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    runs = sorted((tmp_path / "shared" / "runs").glob("*.json"))
    assert len(runs) == 4 and not list((tmp_path / "shared" / "runs").glob("*.lock"))
    trained = [int(n) for log in logs for n in re.findall(r"\((\d+) trained, ", log)]
    assert len(trained) == 2, logs
    assert sum(trained) == 4, logs  # nothing trained twice
    results = json.loads((tmp_path / "shared" / "results.json").read_text())
    assert len(results["runs"]) == 4


#: Final metrics that are fractions in [0, 1] (the others: bleu 0-100, nist >= 0, losses > 0).
_FRACTIONS = {"accuracy", "oos_recall", "exact_match", "rouge_l", *COMMONSENSE_TEST_SETS}
_QUICK = [
    "--quick", "--methods", "adamw", "--steps", "2", "--eval-every", "1", "--eval-size", "4",
    "--final-eval-size", "2", "--batch-size", "2", "--max-new-tokens", "8", "--threads", "1",
    "--no-progress",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "extra"),
    [
        # 8 test queries: clinc150-oos's first 8 hold both in-scope and out-of-scope ones, so
        # accuracy and oos_recall are both defined
        pytest.param("clinc150", ["--final-eval-size", "8"], id="clinc150"),
        pytest.param("clinc150-oos", ["--final-eval-size", "8"], id="clinc150-oos"),
        pytest.param("e2e", [], id="e2e"),
        pytest.param("e2e", ["--targets", "attention"], id="e2e-attention"),
        pytest.param("commonsense", ["--scoring", "likelihood"], id="commonsense-likelihood"),
        pytest.param("commonsense", ["--scoring", "generate"], id="commonsense-generate"),
        pytest.param("gsm8k", [], id="gsm8k"),
    ],
)
def test_bench_quick_every_task(task, extra, tmp_path, capsys):
    """`bench --quick` end to end on each built-in task: every metric of the task's table is
    in results.json, per run and in the summary, as a finite number in its range."""
    torch.set_num_threads(1)
    assert cli.main(["bench", "--task", task, *_QUICK, *extra, "--out", str(tmp_path)]) == 0
    assert "| adamw |" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    workload = WORKLOADS[task]
    assert results["task"] == task and results["preset"] == "quick"
    assert results["model"] == canonical_model_id(workload.model_for("quick"))
    assert results["metrics"] == workload.table_metrics() and results["failures"] == []
    (run,) = results["runs"]
    assert [p[0] for p in run["eval_loss"]] == [0, 1, 2] and run["steps_done"] == 2
    final, summary = run["final"], results["summary"]["adamw"]
    for name in workload.table_metrics():
        value = final[name]
        assert isinstance(value, float | int) and math.isfinite(value), (name, value)
        assert summary[f"{name}_mean"] == value
        if name in _FRACTIONS:
            assert 0.0 <= value <= 1.0, (name, value)
        elif name == "bleu":
            assert 0.0 <= value <= 100.0
        elif name == "nist":
            assert value >= 0.0
        else:
            assert name.endswith("_loss") and value > 0.0, (name, value)
    if task == "commonsense":
        scoring = extra[1]
        assert results["settings"]["scoring"] == scoring and final["scoring"] == scoring
        assert f"answers scored by {scoring}" in (tmp_path / "results.md").read_text()
        # the average of the seven test sets
        mean = sum(final[s] for s in COMMONSENSE_TEST_SETS) / len(COMMONSENSE_TEST_SETS)
        assert final["accuracy"] == pytest.approx(mean)
    if "--targets" in extra:
        # SmolLM2-135M: 30 layers; q/o 576 -> 576, k/v 576 -> 192 (3 KV heads of 64); r = 8
        assert results["settings"]["targets"] == results["lora_targets"] == "attention"
        assert run["trainable_params"] == 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192))
    env = run["env"]
    assert env["riemannlora"] == riemannlora.__version__ and env["source"] == source_digest()
    assert env["peft"] == importlib.metadata.version("peft") and env["threads"] == 1
    if task == "e2e":
        assert len(final["samples"]) == 2
        assert all(isinstance(s["output"], str) for s in final["samples"])
    _finite_numbers(results)
    _check_pngs(tmp_path)
