"""The evidence protocol of the harness: refined lr grid, matched-lr runs, paired differences
with bootstrap intervals, lr bands at 5 % and 20 %, and the fixed-head-lr control."""

from __future__ import annotations

import dataclasses
import math
import random
import statistics

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from riemannlora import cli
from riemannlora.bench.methods import MethodContext, build_optimizer, get_method, refined_lrs
from riemannlora.bench.report import format_paired
from riemannlora.bench.runner import RunConfig, run_sweep
from riemannlora.bench.summary import bootstrap_ci, lr_band_decades, paired_differences, summarize
from test_bench import Tiny


def _record(method: str, lr: float, seed: int, loss: float, acc: float) -> dict:
    cfg = RunConfig(
        task="clinc150", model="m", method=method, lr=lr, seed=seed, steps=100, rank=8,
        batch_size=4, eval_every=50, eval_size=8, final_eval_size=8, max_length=16,
        max_new_tokens=0,
    )  # fmt: skip
    return {
        "key": cfg.key(),
        "config": dataclasses.asdict(cfg),
        "final": {"eval_loss": loss, "accuracy": acc},
        "eval_loss": [[0, 2.0], [50, (2.0 + loss) / 2], [100, loss]],
        "diverged": False,
        "time_per_step_s": 0.2,
        "opt_step_s": 0.01,
        "init_s": 0.1,
        "peak_mem_mb": 10.0,
        "wall_s": 5.0,
    }


# --------------------------------------------------------------------------------------------
# pure statistics
# --------------------------------------------------------------------------------------------


def test_refined_lrs_are_quarter_decade_neighbours_not_on_the_grid():
    grid = [1e-4, 1e-3, 1e-2]
    assert refined_lrs(1e-3, grid) == [pytest.approx(10**-3.25, rel=1e-3), 0.00178]
    assert refined_lrs(1e-3, [*grid, 0.00178]) == [0.000562]  # already there: not rerun


def test_bootstrap_ci_brackets_the_mean_and_is_deterministic():
    values = [0.3, -0.1, 0.2, 0.05]
    lo, hi = bootstrap_ci(values)
    assert lo <= statistics.fmean(values) <= hi
    assert (lo, hi) == bootstrap_ci(values)
    assert min(values) <= lo and hi <= max(values)
    assert bootstrap_ci([0.5]) == (0.5, 0.5)
    with pytest.raises(ValueError):
        bootstrap_ci([])


@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=12), st.floats(-3, 3))
@settings(max_examples=40, deadline=None)
def test_bootstrap_ci_shifts_with_the_data(values, shift):
    """Translation equivariance: the interval of values + c is the interval of values, + c."""
    lo, hi = bootstrap_ci(values, samples=2000)
    lo2, hi2 = bootstrap_ci([v + shift for v in values], samples=2000)
    assert lo2 == pytest.approx(lo + shift, abs=1e-9)
    assert hi2 == pytest.approx(hi + shift, abs=1e-9)


def test_bootstrap_ci_coverage_on_known_distribution():
    """About 95 % of intervals from samples of N(0.1, 1) cover 0.1 (n = 30; the percentile
    bootstrap undercovers a little at this n)."""
    rng = random.Random(1)
    covered = 0
    for trial in range(200):
        sample = [rng.gauss(0.1, 1.0) for _ in range(30)]
        lo, hi = bootstrap_ci(sample, samples=1000, seed=trial)
        covered += lo <= 0.1 <= hi
    assert 0.88 <= covered / 200 <= 0.99


def test_paired_differences_verdicts():
    ref = [_record("adamw", 1e-3, s, 1.0 + 0.1 * s, 0.5 + 0.01 * s) for s in range(3)]
    better = [_record("riemannion", 3e-3, s, 0.9 + 0.1 * s, 0.56 + 0.01 * s) for s in range(3)]
    p = paired_differences(better, ref, "accuracy")
    assert p["seeds"] == [0, 1, 2] and p["diffs"] == pytest.approx([0.06] * 3)
    assert p["verdict"] == "win" and p["ci95"] == pytest.approx([0.06, 0.06])
    assert paired_differences(better, ref, "eval_loss")["verdict"] == "win"  # lower is better
    assert paired_differences(ref, better, "eval_loss")["verdict"] == "loss"
    mixed = [
        _record("muon", 1e-3, s, 1.0 + 0.1 * s + (0.05 if s else -0.05), 0.5) for s in range(3)
    ]
    assert paired_differences(mixed, ref, "eval_loss")["verdict"] == "tie"
    assert paired_differences(better[:1], ref[1:], "accuracy") is None  # no common seed
    one = paired_differences(better[:2], ref, "accuracy")
    assert one["verdict"] == "too few seeds" and one["mean"] == pytest.approx(0.06)


def test_paired_differences_rounding_is_no_difference():
    """Equal accuracies computed in a different order differ by ~1e-17; such a seed is a tie
    of that seed, so the interval touches 0 and the verdict is no win."""
    same = sum([0.1, 0.2, 0.3]) / 3  # 0.2 + 1.85e-17 ...
    again = sum([0.3, 0.2, 0.1]) / 3
    assert same != again  # the premise: the same number in floating point, two values
    ref = [_record("adamw", 1e-3, s, 1.0, acc) for s, acc in enumerate([0.5, again, 0.5])]
    mine = [_record("riemannion", 1e-3, s, 1.0, acc) for s, acc in enumerate([0.52, same, 0.53])]
    p = paired_differences(mine, ref, "accuracy")
    assert p["diffs"][1] == 0.0 and p["ci95"][0] == 0.0
    assert p["verdict"] == "tie"
    tiny = [_record("riemannion", 1e-3, s, 1.0, acc) for s, acc in enumerate([0.52, 0.5001, 0.53])]
    assert (
        paired_differences(
            tiny, [_record("adamw", 1e-3, s, 1.0, 0.5) for s in range(3)], "accuracy"
        )["verdict"]
        == "win"
    )  # fmt: skip  (a real 1e-4 counts)


def test_lr_band_at_20_percent_is_wider():
    losses = {1e-4: 1.15, 3e-4: 1.04, 1e-3: 1.0, 3e-3: 1.1, 1e-2: 2.0}
    assert lr_band_decades(losses) == pytest.approx(math.log10(1e-3 / 3e-4))
    assert lr_band_decades(losses, 0.20) == pytest.approx(math.log10(3e-3 / 1e-4))


def test_summarize_selects_on_the_refined_grid_only_and_reports_matched():
    grid = [1e-4, 1e-3, 1e-2]
    neighbours = refined_lrs(1e-3, grid)
    recs = []
    for lr in [*grid, *neighbours]:  # best of the refined grid: the upper neighbour
        loss = 0.95 if lr == neighbours[1] else 1.0 if lr == 1e-3 else 1.02
        recs.append(_record("riemannion", lr, 0, loss, 0.6))
        recs.append(_record("adamw", lr, 0, 1.1, 0.5))
    # a matched-lr run (adamw's lr 1e-4 below: it has the lowest loss of all but must not
    # select riemannion's lr, which comes from the grid and its refinement only)
    recs.append(_record("riemannion", 5e-5, 0, 0.1, 0.9))
    recs.append(_record("adamw", 5e-5, 0, 1.05, 0.5))
    for s in (1, 2):
        recs.append(_record("riemannion", neighbours[1], s, 0.96, 0.61))
        recs.append(_record("adamw", 5e-5, s, 1.05, 0.5))
    plan = {"adamw": [5e-5, *grid], "riemannion": grid}
    out = summarize(recs, ["accuracy"], "adamw", plan, refine=True, matched="adamw")
    assert out["riemannion"]["best_lr"] == neighbours[1]
    assert out["adamw"]["best_lr"] == 5e-5
    assert out["riemannion"]["seeds"] == [0, 1, 2]
    assert out["riemannion"]["paired"]["accuracy"]["verdict"] == "win"
    assert out["riemannion"]["matched"]["lr"] == 5e-5
    assert out["riemannion"]["matched"]["seeds"] == [0]
    assert out["riemannion"]["lr_band_20_decades"] >= out["riemannion"]["lr_band_decades"]
    assert (
        out["riemannion"]["steps_to_reference_min"] <= out["riemannion"]["steps_to_reference_max"]
    )
    text = format_paired(out, ["accuracy"])
    assert "matched lr" in text and "**win**" in text and "| riemannion | 3 |" in text
    assert "every method at adamw's selected lr (5e-05) (matched lr)" in text
    # another reference: the matched lr is still the matched method's, and the title says so
    other = format_paired(out, ["accuracy"], reference="riemannion", matched="adamw")
    assert "every method at adamw's selected lr (5e-05) (matched lr), minus riemannion" in other


# --------------------------------------------------------------------------------------------
# the sweep's stages with a stand-in cache
# --------------------------------------------------------------------------------------------


class QuadraticCache:
    """Final loss (log10 lr + 2.6)^2 + 1: best near 10^-2.6, between grid points."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, int]] = []

    def run(self, cfg: RunConfig, progress: bool = True) -> dict:
        self.calls.append((cfg.method, cfg.lr, cfg.seed))
        loss = 1.0 + (math.log10(cfg.lr) + 2.6) ** 2 + (0.1 if cfg.method == "riemannion" else 0)
        return _record(cfg.method, cfg.lr, cfg.seed, loss, 0.5)


def test_run_sweep_refines_then_seeds_then_matched():
    base = RunConfig(**_record("adamw", 1.0, 0, 1.0, 0.5)["config"])
    cache = QuadraticCache()
    grid = [1e-4, 1e-3, 1e-2]
    records, failures = run_sweep(
        base,
        {"adamw": grid, "riemannion": [1e-2, 1e-1]},
        [0, 1],
        cache,  # type: ignore[arg-type]
        progress=False,
        refine=True,
        matched="adamw",
    )
    assert not failures
    adamw = [c for c in cache.calls if c[0] == "adamw"]
    up = refined_lrs(1e-3, grid)[1]  # 10^-2.75 is closer to the optimum than 1e-3
    assert adamw[:5] == [
        ("adamw", 1e-4, 0), ("adamw", 1e-3, 0), ("adamw", 1e-2, 0),
        ("adamw", refined_lrs(1e-3, grid)[0], 0), ("adamw", up, 0),
    ]  # fmt: skip
    assert ("adamw", up, 1) in adamw  # the second seed at the refined best
    riem = [c for c in cache.calls if c[0] == "riemannion"]
    assert ("riemannion", up, 0) in riem and ("riemannion", up, 1) in riem  # matched lr
    assert len(set(cache.calls)) == len(cache.calls)  # nothing trained twice
    assert len(records) == len(cache.calls)
    with pytest.raises(ValueError, match="matched"):
        run_sweep(base, {"adamw": grid}, [0], cache, progress=False, matched="muon")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# the fixed head lr
# --------------------------------------------------------------------------------------------


def _peft() -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], modules_to_save=["head"])
    model = get_peft_model(Tiny(), config)
    for name, p in model.named_parameters():  # non-zero B so every factor has a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def _train(name: str, head_lr: float | None, adamw_lr: float = 3e-2, steps: int = 3) -> dict:
    model = _peft()
    x, y = torch.randn(32, 16, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 4
    ctx = MethodContext(
        compute_loss=lambda m: F.cross_entropy(m(x), y), adamw_lr=adamw_lr, seed=0, head_lr=head_lr
    )
    opt = build_optimizer(get_method(name), model, 1e-2, ctx)
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_head_lr_equals_the_fixhead_ablations():
    """AdamW / Riemannion with a fixed head lr train exactly like their -fixhead ablations,
    whose head runs at ctx.adamw_lr."""
    for method, ablation in (("adamw", "adamw-fixhead"), ("riemannion", "riemannion-fixhead")):
        got = _train(method, head_lr=3e-2)
        want = _train(ablation, head_lr=None, adamw_lr=3e-2)
        assert got.keys() == want.keys()
        for k in got:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("name", ["sgd", "scaled-adamw", "muon", "loraplus", "riemannian-sgd"])
def test_head_lr_moves_only_the_head(name):
    """The head lr changes the head's training; the head is still trained (requires_grad
    restored) and the same LoRA lr is used by the method."""
    slow, fast = _train(name, head_lr=1e-4), _train(name, head_lr=1e-1)
    head = [k for k in slow if "head" in k and "modules_to_save" in k]
    assert head and all(not torch.equal(slow[k], fast[k]) for k in head)
    model = _peft()
    start = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    assert all(not torch.equal(start[k], fast[k]) for k in head)


def test_head_lr_flag_is_checked():
    parser = cli.build_parser()
    for bad in ("0", "-1e-3", "nan", "inf"):
        with pytest.raises(SystemExit):
            args = parser.parse_args(["bench", "--quick", "--head-lr", bad])
            cli._plan(args.parser, args)
    args = parser.parse_args(["bench", "--quick", "--head-lr", "3e-3", "--methods", "adamw"])
    assert cli._plan(args.parser, args).base.head_lr == 3e-3
    args = parser.parse_args(["bench", "--quick", "--methods", "adamw", "--matched", "muon"])
    with pytest.raises(SystemExit):
        cli._plan(args.parser, args)
    args = parser.parse_args(["bench", "--preset", "full", "--methods", "adamw,riemannion"])
    plan = cli._plan(args.parser, args)
    assert plan.refine and plan.matched == "adamw"
    args = parser.parse_args(["bench", "--preset", "full", "--no-refine", "--matched", "none"])
    plan = cli._plan(args.parser, args)
    assert not plan.refine and plan.matched is None
    with pytest.raises(ValueError, match="head_lr"):
        RunConfig(**{**_record("adamw", 1e-3, 0, 1.0, 0.5)["config"], "head_lr": -1.0})


def test_fields_added_later_keep_cached_runs_valid(tmp_path):
    """Columns and dtype came after version 2's runs were cached: at their defaults they are
    left out of the key and of the stored config's comparison, so those runs are still hits;
    set, they make another run."""
    from riemannlora.bench.runner import LATER_FIELDS, RunCache

    cfg = RunConfig(**_record("adamw", 1e-3, 0, 1.0, 0.5)["config"])
    old_config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in LATER_FIELDS}
    cache = RunCache(tmp_path)
    record = {**_record("adamw", 1e-3, 0, 1.0, 0.5), "config": old_config}
    cache.put(cfg, record)  # as an older version wrote it
    assert cache.get(cfg) == record
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    assert bf16.key() != cfg.key() and cache.get(bf16) is None
    with pytest.raises(ValueError, match="dtype"):
        dataclasses.replace(cfg, dtype="float16")
    with pytest.raises(ValueError, match="columns"):
        dataclasses.replace(cfg, columns="label=intent")


def test_gpu_preset_is_bigger_and_bfloat16():
    parser = cli.build_parser()
    for task in ("e2e", "commonsense", "gsm8k", "clinc150"):
        args = parser.parse_args(["bench", "--task", task, "--preset", "gpu"])
        gpu = cli._plan(args.parser, args).base
        args = parser.parse_args(["bench", "--task", task])
        default = cli._plan(args.parser, args).base
        assert gpu.dtype == "bfloat16" and default.dtype == "float32"
        assert gpu.steps > default.steps and gpu.batch_size > default.batch_size
        assert gpu.final_eval_size > default.final_eval_size
    args = parser.parse_args(["bench", "--task", "diffusion", "--preset", "gpu"])
    gpu = cli._plan(args.parser, args).base
    args = parser.parse_args(["bench", "--task", "diffusion"])
    default = cli._plan(args.parser, args).base
    assert gpu.dtype == "float32"
    assert gpu.steps > default.steps and gpu.batch_size > default.batch_size
    assert gpu.eval_size > default.eval_size and gpu.final_eval_size > default.final_eval_size
    args = parser.parse_args(["bench", "--task", "diffusion", "--dtype", "bfloat16"])
    with pytest.raises(SystemExit):
        cli._plan(args.parser, args)
