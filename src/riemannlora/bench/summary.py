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
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

__all__ = ["BAND_TOLERANCE", "lr_band_decades", "steps_to_reach", "summarize"]

#: Relative tolerance of the learning-rate band.
BAND_TOLERANCE = 0.05


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


def summarize(
    records: list[dict[str, Any]], metrics: list[str], reference: str = "adamw"
) -> dict[str, dict[str, Any]]:
    """One summary per method (keys in the module docstring), in the order methods first
    appear in ``records``. ``metrics`` names the final metrics to aggregate."""
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_method[record["config"]["method"]].append(record)

    out: dict[str, dict[str, Any]] = {}
    for method, runs in by_method.items():
        ref_seed = min(r["config"]["seed"] for r in runs)
        ref_runs = [r for r in runs if r["config"]["seed"] == ref_seed]
        loss_by_lr = {r["config"]["lr"]: _loss(r) for r in ref_runs}
        best_lr = min(loss_by_lr, key=loss_by_lr.__getitem__)
        at_best = [r for r in runs if r["config"]["lr"] == best_lr]
        mean, std = _mean_std([_loss(r) for r in at_best])
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
            "seeds": sorted(r["config"]["seed"] for r in at_best),
            "eval_loss_mean": mean,
            "eval_loss_std": std,
            "diverged_runs": sum(bool(r.get("diverged")) for r in runs),
            "lr_band_decades": lr_band_decades(loss_by_lr),
        }
        for name in metrics:
            values = [r["final"].get(name) for r in at_best]
            summary[f"{name}_mean"], summary[f"{name}_std"] = _mean_std(
                [v for v in values if isinstance(v, int | float)]
            )
        for name in ("time_per_step_s", "opt_step_s", "init_s", "peak_mem_mb", "wall_s"):
            summary[name] = _median([r.get(name) for r in runs])
        out[method] = summary

    target = out.get(reference, {}).get("eval_loss_mean")
    for method, summary in out.items():
        steps = None
        if target is not None:
            at_best = [r for r in by_method[method] if r["config"]["lr"] == summary["best_lr"]]
            reached = [steps_to_reach(r["eval_loss"], target) for r in at_best]
            med = statistics.median(math.inf if s is None else s for s in reached)
            steps = None if math.isinf(med) else med
        summary["steps_to_reference"] = steps
        summary["reference_eval_loss"] = target
    return out
