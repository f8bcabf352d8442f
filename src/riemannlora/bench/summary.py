"""Per-method summaries of finished runs (pure functions of the run records).

For each method (see :func:`summarize`):

* ``best_lr``: the learning rate with the lowest final eval loss at the reference seed (the
  smallest seed the method ran, which every learning rate of the sweep ran with);
* ``eval_loss_mean/std`` and ``<metric>_mean/std``: over all seeds run at ``best_lr``
  (std is the sample standard deviation, ``None`` for one seed);
* ``final_eval_loss_by_lr`` and ``metrics_by_lr``: the final eval loss and the final metrics
  of each learning rate at the reference seed (``None``: diverged);
* ``lr_band_decades``: width, in decades, of the contiguous range of swept learning rates
  around ``best_lr`` whose final eval loss is within 5 % of the best (``None`` with a single
  learning rate);
* ``steps_to_reference``: steps until the eval-loss curve first reaches the reference method's
  (AdamW's) best mean final eval loss, the median over the seeds at ``best_lr`` (``None`` if the
  median seed never reaches it; resolution: ``eval_every``);
* ``time_per_step_s``, ``opt_step_s``, ``init_s``, ``peak_mem_mb``, ``wall_s``: medians over
  all the method's runs.

With the sweep plan (``lrs``: method -> planned grid, ``refine``, ``matched``), as the sweep of
:func:`riemannlora.bench.runner.run_sweep` ran it:

* ``best_lr`` is chosen among the grid and its refinement only (runs at other lrs, such as the
  matched-lr runs, never select it); ``lr_band_decades`` / ``lr_band_20_decades``: the bands at
  5 % and 20 % on that refined grid;
* ``steps_to_reference_min/max``: the spread of steps-to-target over the seeds;
* ``paired``: per metric (``eval_loss`` included), the per-seed differences method - reference
  at each one's best lr over the seeds both ran, their mean, a bootstrap 95 % confidence
  interval of the mean (:func:`bootstrap_ci`) and a ``verdict``: ``"win"`` / ``"loss"`` when
  the interval excludes 0 (losses: lower is better, other metrics: higher), else ``"tie"``;
* ``matched``: the same statistics with every method at the ``matched`` method's best lr.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

from riemannlora.bench.methods import refined_lrs

__all__ = [
    "BAND_TOLERANCE",
    "BOOTSTRAP_SAMPLES",
    "MIN_SEEDS",
    "bootstrap_ci",
    "lr_band_decades",
    "paired_differences",
    "steps_to_reach",
    "summarize",
]

#: Relative tolerance of the learning-rate band.
BAND_TOLERANCE = 0.05
#: Resamples of the bootstrap confidence intervals.
BOOTSTRAP_SAMPLES = 10_000
#: Paired seeds below which no verdict is given (a bootstrap of one or two values cannot
#: speak for the spread).
MIN_SEEDS = 3


def bootstrap_ci(
    values: list[float], level: float = 0.95, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement,
    seeded, so the same values give the same interval)."""
    import random

    if not values:
        raise ValueError("no values")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(samples))
    lo = means[math.floor((1 - level) / 2 * (samples - 1))]
    hi = means[math.ceil((1 + level) / 2 * (samples - 1))]
    return lo, hi


def _lower_is_better(metric: str) -> bool:
    return "loss" in metric


#: Relative size below which a paired difference is rounding, not a result: two equal
#: accuracies summed in another order differ by ~1e-17, and such a difference must not decide
#: the sign of a seed (and with it a verdict).
DIFFERENCE_TOLERANCE = 1e-9


def _difference(mine: float, ref: float) -> float:
    tol = DIFFERENCE_TOLERANCE
    return 0.0 if math.isclose(mine, ref, rel_tol=tol, abs_tol=tol) else mine - ref


def paired_differences(
    runs: list[dict[str, Any]], ref_runs: list[dict[str, Any]], metric: str
) -> dict[str, Any] | None:
    """Per-seed ``metric`` differences of ``runs`` minus ``ref_runs`` (matched by seed), their
    mean, bootstrap 95 % interval and verdict (see the module docstring); ``None`` without a
    common seed with both values finite."""

    def by_seed(rs: list[dict[str, Any]]) -> dict[int, float]:
        out = {}
        for r in rs:
            v = r["final"].get(metric)
            if isinstance(v, int | float) and math.isfinite(v):
                out[r["config"]["seed"]] = float(v)
        return out

    mine, ref = by_seed(runs), by_seed(ref_runs)
    seeds = sorted(set(mine) & set(ref))
    if not seeds:
        return None
    diffs = [_difference(mine[s], ref[s]) for s in seeds]
    lo, hi = bootstrap_ci(diffs)
    better = (lambda x: x < 0) if _lower_is_better(metric) else (lambda x: x > 0)
    if len(seeds) < MIN_SEEDS:
        verdict = "too few seeds"
    elif lo > 0 or hi < 0:
        verdict = "win" if better(lo if lo > 0 else hi) else "loss"
    else:
        verdict = "tie"
    return {
        "seeds": seeds,
        "diffs": diffs,
        "mean": statistics.fmean(diffs),
        "ci95": [lo, hi],
        "verdict": verdict,
    }


def _loss(record: dict[str, Any]) -> float:
    value = record["final"].get("eval_loss")
    return math.inf if value is None else float(value)


def _lr(record: dict[str, Any]) -> float:
    return float(record["config"]["lr"])


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    std = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), std


def _median(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def lr_band_decades(
    loss_by_lr: dict[float, float], tolerance: float = BAND_TOLERANCE
) -> float | None:
    """Width in decades of the contiguous run of learning rates around the best one whose
    loss is at most ``(1 + tolerance) * best`` (``None`` for fewer than two learning rates or
    when every run diverged)."""
    if len(loss_by_lr) < 2:
        return None
    lrs = sorted(loss_by_lr)
    losses = [loss_by_lr[lr] for lr in lrs]
    best = min(range(len(lrs)), key=losses.__getitem__)
    if not math.isfinite(losses[best]):
        return None
    limit = losses[best] + tolerance * abs(losses[best])
    lo = hi = best
    while lo > 0 and losses[lo - 1] <= limit:
        lo -= 1
    while hi < len(lrs) - 1 and losses[hi + 1] <= limit:
        hi += 1
    return math.log10(lrs[hi] / lrs[lo])


def steps_to_reach(curve: list[list[float | None]], target: float) -> int | None:
    """First step whose eval loss is ``<= target`` (``None`` if never)."""
    for step, loss in curve:
        if loss is not None and loss <= target:
            return int(step)
    return None


def _stats(runs: list[dict[str, Any]], metrics: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"seeds": sorted(r["config"]["seed"] for r in runs)}
    out["eval_loss_mean"], out["eval_loss_std"] = _mean_std([_loss(r) for r in runs])
    for name in metrics:
        values = [r["final"].get(name) for r in runs]
        out[f"{name}_mean"], out[f"{name}_std"] = _mean_std(
            [v for v in values if isinstance(v, int | float)]
        )
    return out


def _sweep_lrs(
    method_runs: list[dict[str, Any]], planned: list[float] | None, refine: bool, seed: int
) -> set[float]:
    """The lrs that may select ``best_lr``: the planned grid and its refinement (all first-seed
    lrs without a plan)."""
    first = {r["config"]["lr"]: _loss(r) for r in method_runs if r["config"]["seed"] == seed}
    if planned is None:
        return set(first)
    grid = [lr for lr in planned if lr in first]
    allowed = set(grid)
    if refine and grid:
        allowed |= set(refined_lrs(min(grid, key=first.__getitem__), list(planned)))
    return allowed & set(first)


def summarize(
    records: list[dict[str, Any]],
    metrics: list[str],
    reference: str = "adamw",
    lrs: dict[str, list[float]] | None = None,
    refine: bool = False,
    matched: str | None = None,
) -> dict[str, dict[str, Any]]:
    """One summary per method (keys in the module docstring), in the order methods first
    appear in ``records``. ``metrics`` names the final metrics to aggregate; ``lrs``,
    ``refine`` and ``matched`` describe the sweep that made the records."""
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_method[record["config"]["method"]].append(record)

    out: dict[str, dict[str, Any]] = {}
    for method, runs in by_method.items():
        ref_seed = min(r["config"]["seed"] for r in runs)
        allowed = _sweep_lrs(runs, (lrs or {}).get(method) if lrs else None, refine, ref_seed)
        ref_runs = [
            r for r in runs if r["config"]["seed"] == ref_seed and r["config"]["lr"] in allowed
        ]
        if not ref_runs:
            continue
        loss_by_lr = {r["config"]["lr"]: _loss(r) for r in ref_runs}
        best_lr = min(loss_by_lr, key=loss_by_lr.__getitem__)
        at_best = [r for r in runs if r["config"]["lr"] == best_lr]
        summary: dict[str, Any] = {
            "best_lr": best_lr,
            "lrs": sorted(loss_by_lr),
            "final_eval_loss_by_lr": {
                str(lr): (None if math.isinf(v) else v) for lr, v in sorted(loss_by_lr.items())
            },
            "metrics_by_lr": {
                str(lr): {name: r["final"].get(name) for name in metrics}
                for lr, r in ((r["config"]["lr"], r) for r in sorted(ref_runs, key=_lr))
            },
            **_stats(at_best, metrics),
            "diverged_runs": sum(bool(r.get("diverged")) for r in runs),
            "lr_band_decades": lr_band_decades(loss_by_lr),
            "lr_band_20_decades": lr_band_decades(loss_by_lr, 0.20),
        }
        for name in ("time_per_step_s", "opt_step_s", "init_s", "peak_mem_mb", "wall_s"):
            summary[name] = _median([r.get(name) for r in runs])
        out[method] = summary

    target = out.get(reference, {}).get("eval_loss_mean")
    ref_best = [
        r
        for r in by_method.get(reference, [])
        if r["config"]["lr"] == out.get(reference, {}).get("best_lr")
    ]
    matched_lr = out.get(matched, {}).get("best_lr") if matched else None
    for method, summary in out.items():
        at_best = [r for r in by_method[method] if r["config"]["lr"] == summary["best_lr"]]
        steps = lo = hi = None
        if target is not None:
            reached = [steps_to_reach(r["eval_loss"], target) for r in at_best]
            as_num = [math.inf if s is None else s for s in reached]
            med = statistics.median(as_num)
            steps = None if math.isinf(med) else med
            lo = None if math.isinf(min(as_num)) else min(as_num)
            hi = None if math.isinf(max(as_num)) else max(as_num)
        summary["steps_to_reference"] = steps
        summary["steps_to_reference_min"] = lo
        summary["steps_to_reference_max"] = hi
        summary["reference_eval_loss"] = target
        if ref_best:
            summary["paired"] = {
                name: paired_differences(at_best, ref_best, name)
                for name in ("eval_loss", *metrics)
            }
        if matched_lr is not None:
            mine = [r for r in by_method[method] if r["config"]["lr"] == matched_lr]
            ref_m = [r for r in by_method.get(reference, []) if r["config"]["lr"] == matched_lr]
            if mine:
                summary["matched"] = {
                    "lr": matched_lr,
                    **_stats(mine, metrics),
                    "paired": {
                        name: paired_differences(mine, ref_m, name)
                        for name in ("eval_loss", *metrics)
                    }
                    if ref_m
                    else {},
                }
    return out
