"""Outputs of a benchmark: ``results.json``, a markdown table and PNG plots (matplotlib, Agg).

Files written by :func:`write_report` into the output directory:

* ``results.json`` -- settings, per-method summaries (:mod:`riemannlora.bench.summary`), every
  run record with its curves, failures and cache statistics;
* ``results.md`` -- the summary table (also printed);
* ``eval_loss_curves.png`` -- eval loss vs step per method at its best learning rate (mean over
  seeds, band: min-max over seeds);
* ``lr_sweep.png`` -- final eval loss vs learning rate per method (log x; diverged runs left out,
  losses above 1.5x the untrained model's drawn as ▲ at the top of the axis);
* ``time_per_step.png`` -- median seconds per training step per method, optimizer step shaded;
* for runs that generate images (``diffusion``): ``samples/<run key>.png``, each run's sample
  grid, and ``samples.png``, the grids of the first seed side by side (rows: methods, columns:
  learning rates). ``results.json`` then names each run's grid file (``final.samples_png``)
  instead of carrying the image.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import math
import os
import pathlib
import tempfile
from collections import defaultdict
from typing import Any

__all__ = ["PLOTS", "format_paired", "format_table", "write_report"]

#: File names of the plots.
PLOTS = ("eval_loss_curves.png", "lr_sweep.png", "time_per_step.png", "diagnostics.png")

_METRIC_LABELS = {
    "accuracy": "accuracy",
    "bleu": "BLEU",
    "rouge_l": "ROUGE-L",
    "subject_accuracy": "subject acc.",
    "retained_accuracy": "retained acc.",
    "nist": "NIST",
    "test_loss": "test loss",
    "oos_recall": "OOS recall",
    "exact_match": "exact match",
    "answer_loss": "answer loss",
}


def _pm(mean: float | None, std: float | None, digits: int) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_table(
    summary: dict[str, dict[str, Any]], metrics: list[str], steps: int, reference: str = "adamw"
) -> str:
    """The summary as a markdown table (one row per method)."""
    header = [
        "method",
        "best lr",
        "final eval loss",
        *(_METRIC_LABELS.get(m, m) for m in metrics),
        f"steps to {reference} loss",
        "LR band (decades)",
        "s/step",
        "opt step (ms)",
        "peak mem (MiB)",
    ]
    rows = [header, ["---"] * len(header)]
    for method, s in summary.items():
        reach = s.get("steps_to_reference")
        if s.get("reference_eval_loss") is None:
            reach_text = "—"
        else:
            reach_text = f"> {steps}" if reach is None else f"{reach:g}"
        band = s.get("lr_band_decades")
        digits = {"bleu": 2, "nist": 3}
        row = [
            method,
            f"{s['best_lr']:.3g}",
            _pm(s["eval_loss_mean"], s["eval_loss_std"], 4),
            *(_pm(s.get(f"{m}_mean"), s.get(f"{m}_std"), digits.get(m, 4)) for m in metrics),
            reach_text,
            "—" if band is None else f"{band:.1f}",
            "—" if s["time_per_step_s"] is None else f"{s['time_per_step_s']:.3f}",
            "—" if s["opt_step_s"] is None else f"{1e3 * s['opt_step_s']:.1f}",
            "—" if s["peak_mem_mb"] is None else f"{s['peak_mem_mb']:.0f}",
        ]
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def _ci_cell(p: dict[str, Any] | None, digits: int) -> str:
    if not p:
        return "—"
    lo, hi = p["ci95"]
    mark = {"win": " **win**", "loss": " **loss**", "too few seeds": " (too few seeds)"}.get(
        p["verdict"], ""
    )
    return f"{p['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{mark}"


def format_paired(
    summary: dict[str, dict[str, Any]],
    metrics: list[str],
    reference: str = "adamw",
    matched: str | None = None,
) -> str:
    """Markdown tables of the paired per-seed differences against ``reference``: at each
    method's own selected lr, and (when the sweep ran it) at ``matched``'s selected lr for all
    (``matched`` defaults to ``reference``); ``""`` when there is nothing to compare."""
    names = ["eval_loss", *metrics]
    digits = {"bleu": 2, "nist": 3}
    matched = matched or reference
    matched_lr = next((s["matched"]["lr"] for s in summary.values() if s.get("matched")), None)
    at = f"{matched}'s selected lr" + (f" ({matched_lr:.3g})" if matched_lr is not None else "")
    parts = []
    for title, key in (
        (f"each method at its own selected lr, minus {reference} at its own", "paired"),
        (f"every method at {at} (matched lr), minus {reference} at that lr", "matched"),
    ):
        rows = []
        for method, s in summary.items():
            block = s.get(key)
            if key == "matched" and block:
                block = block.get("paired")
            if method == reference or not block or not any(block.values()):
                continue
            seeds = next(p["seeds"] for p in block.values() if p)
            rows.append(
                [method, str(len(seeds))]
                + [_ci_cell(block.get(n), digits.get(n, 4)) for n in names]
            )
        if not rows:
            continue
        header = ["method", "seeds", *(_METRIC_LABELS.get(n, n) for n in names)]
        lines = [f"## Paired differences: {title}", ""]
        lines += ["| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows]]
        parts.append("\n".join(lines))
    if not parts:
        return ""
    note = (
        "Mean per-seed difference [bootstrap 95 % interval]; a **win** or **loss** only when "
        "the interval excludes 0 (losses: lower is better; other metrics: higher), and only "
        "with at least 3 paired seeds. With 3 seeds the interval excludes 0 exactly when all "
        "three differences share a sign: a weak test; a tie means the data cannot tell."
    )
    return "\n\n".join(parts) + "\n\n" + note + "\n"


def _color(method: str) -> Any:
    """A fixed colour per method (its position in the registry), the same in every plot."""
    import matplotlib

    from riemannlora.bench.methods import METHODS

    names = list(METHODS)
    i = (names.index(method) if method in names else len(names)) % 20
    # the ten dark tab20 colours first, then their light partners
    return matplotlib.colormaps["tab20"](2 * i if i < 10 else 2 * (i - 10) + 1)


def _format_sweep(summary: dict[str, dict[str, Any]]) -> str:
    """Markdown list of each method's final eval loss per learning rate (reference seed), or
    ``""`` when no method ran more than one learning rate."""
    if all(len(s["final_eval_loss_by_lr"]) < 2 for s in summary.values()):
        return ""
    lines = ["", "## Final eval loss (and metrics) by learning rate (first seed)", ""]
    for method, s in summary.items():
        cells = []
        for lr, v in s["final_eval_loss_by_lr"].items():
            text = f"{float(lr):.3g}: " + ("diverged" if v is None else f"{v:.4f}")
            metrics = s.get("metrics_by_lr", {}).get(lr, {})
            extra = [
                f"{_METRIC_LABELS.get(k, k)} {m:.3g}"
                for k, m in metrics.items()
                if isinstance(m, int | float)
            ]
            cells.append(text + (f" ({', '.join(extra)})" if extra else ""))
        lines.append(f"- **{method}**: " + "; ".join(cells))
    return "\n".join(lines) + "\n"


def _plot_curves(ax: Any, records: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    for method, s in summary.items():
        runs = [
            r
            for r in records
            if r["config"]["method"] == method and r["config"]["lr"] == s["best_lr"]
        ]
        by_step: dict[float, list[float]] = defaultdict(list)
        for r in runs:
            for step, loss in r["eval_loss"]:
                if loss is not None:
                    by_step[step].append(loss)
        steps = sorted(by_step)
        if not steps:
            continue
        mean = [sum(by_step[t]) / len(by_step[t]) for t in steps]
        color = _color(method)
        ax.plot(steps, mean, marker=".", color=color, label=f"{method} (lr {s['best_lr']:.3g})")
        if len(runs) > 1:
            lo = [min(by_step[t]) for t in steps]
            hi = [max(by_step[t]) for t in steps]
            ax.fill_between(steps, lo, hi, color=color, alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss")
    ax.set_title("Eval loss at each method's best learning rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _loss_cap(records: list[dict[str, Any]]) -> float | None:
    """Top of the y axis of the lr-sweep plot: 1.5x the largest eval loss at step 0 (the
    untrained model), so that one runaway run does not flatten every other curve."""
    starts = [
        loss
        for r in records
        for step, loss in r.get("eval_loss", [])[:1]
        if step == 0 and loss is not None
    ]
    return 1.5 * max(starts) if starts else None


def _plot_sweep(ax: Any, summary: dict[str, Any], cap: float | None = None) -> None:
    clipped = False
    for method, s in summary.items():
        points = [(float(lr), v) for lr, v in s["final_eval_loss_by_lr"].items() if v is not None]
        if not points:
            continue
        color = _color(method)
        shown = [(lr, v if cap is None else min(v, cap)) for lr, v in points]
        ax.plot(*zip(*shown), marker="o", color=color, label=method)
        above = [(lr, cap) for lr, v in points if cap is not None and v > cap]
        if above:
            clipped = True
            ax.plot(*zip(*above), linestyle="none", marker="^", markersize=9, color=color)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final eval loss")
    title = "Final eval loss vs learning rate (diverged runs omitted"
    ax.set_title(title + ("; ▲: above the axis)" if clipped else ")"))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)


def _plot_times(ax: Any, summary: dict[str, Any]) -> None:
    names = [m for m, s in summary.items() if s["time_per_step_s"] is not None]
    total = [summary[m]["time_per_step_s"] for m in names]
    opt = [summary[m]["opt_step_s"] or 0.0 for m in names]
    ax.bar(names, total, color=[_color(m) for m in names], label="whole step")
    ax.bar(names, opt, color="black", alpha=0.45, label="optimizer.step()")
    ax.set_ylabel("median seconds per step")
    ax.set_title("Time per training step")
    ax.tick_params(axis="x", rotation=45)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)


#: the panels of diagnostics.png: (summary key, axis label, log scale)
_DIAGNOSTICS = (
    ("grad_norm", "gradient norm (Riemannian for the manifold methods)", True),
    ("step_size_mean", "mean step size ||dW_t - dW_t-1||_F", True),
    ("stable_rank_mean", "mean stable rank of dW", False),
    ("gram_cond_b_max", "largest Gram condition number (scaled)", True),
)


def _plot_diagnostics(axes: Any, records: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Each method at its selected lr: the diagnostics against the step, mean over seeds."""
    for ax, (key, label, log) in zip(axes, _DIAGNOSTICS):
        for method, s in summary.items():
            by_step: dict[int, list[float]] = defaultdict(list)
            for r in records:
                if r["config"]["method"] != method or r["config"]["lr"] != s["best_lr"]:
                    continue
                for step, values in r.get("diagnostics", []):
                    v = values.get(key)
                    if v is not None and math.isfinite(v):
                        by_step[step].append(v)
            steps = sorted(by_step)
            if steps:
                mean = [sum(by_step[t]) / len(by_step[t]) for t in steps]
                ax.plot(steps, mean, marker=".", color=_color(method), label=method)
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=9)
        if log and ax.lines:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if axes[0].lines:
        axes[0].legend(fontsize=7)


def write_plots(out: pathlib.Path, records: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Write the PNGs of :data:`PLOTS` into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=110)
    _plot_diagnostics(axes.ravel(), records, summary)
    fig.suptitle("What the optimizer does (each method at its selected lr)")
    fig.tight_layout()
    fig.savefig(out / PLOTS[3])
    plt.close(fig)
    for name, draw in zip(
        PLOTS[:3],
        (
            lambda ax: _plot_curves(ax, records, summary),
            lambda ax: _plot_sweep(ax, summary, _loss_cap(records)),
            lambda ax: _plot_times(ax, summary),
        ),
    ):
        fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
        draw(ax)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)


def write_samples(out: pathlib.Path, results: dict[str, Any]) -> dict[str, Any]:
    """Write the sample grids of the runs (see the module docstring); return ``results`` with
    each ``final.grid_png`` replaced by ``final.samples_png`` (a path relative to ``out``)."""
    runs = [r for r in results["runs"] if isinstance(r.get("final", {}).get("grid_png"), str)]
    if not runs:
        return results
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    results = copy.deepcopy(results)
    (out / "samples").mkdir(exist_ok=True)
    images: dict[tuple[str, float], Any] = {}
    seed0 = min(r["config"]["seed"] for r in runs)
    for record in results["runs"]:
        final = record.get("final", {})
        data = final.pop("grid_png", None)
        if not isinstance(data, str):
            continue
        png = base64.b64decode(data)
        rel = f"samples/{record['key']}.png"
        with open(out / rel, "wb") as f:
            f.write(png)
        final["samples_png"] = rel
        if record["config"]["seed"] == seed0:
            key = (record["config"]["method"], float(record["config"]["lr"]))
            images[key] = Image.open(io.BytesIO(png)).convert("L")
    methods = list(dict.fromkeys(m for m, _ in images))
    lrs = sorted({lr for _, lr in images})
    fig, axes = plt.subplots(
        len(methods),
        len(lrs),
        figsize=(1.9 * len(lrs) + 0.6, 1.0 * len(methods) + 0.6),
        dpi=120,
        squeeze=False,
    )
    for i, method in enumerate(methods):
        for j, lr in enumerate(lrs):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if (method, lr) in images:
                ax.imshow(images[(method, lr)], cmap="gray", vmin=0, vmax=255)
            else:
                ax.set_facecolor("0.9")
            if i == 0:
                ax.set_title(f"lr {lr:.3g}", fontsize=8)
            if j == 0:
                ax.set_ylabel(method, fontsize=8)
    fig.suptitle("top rows: subject prompt; last row: known classes", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "samples.png")
    plt.close(fig)
    return results


def _write_text(path: pathlib.Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    os.replace(tmp, path)


def write_report(
    out: str | os.PathLike[str],
    results: dict[str, Any],
    title: str,
) -> str:
    """Write ``results.json``, ``results.md`` and the plots into ``out``; return the table.

    ``results`` must hold ``summary``, ``runs``, ``metrics`` and ``settings`` (with ``steps``).
    """
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reference = results.get("reference", "adamw")
    table = format_table(
        results["summary"], results["metrics"], results["settings"]["steps"], reference
    )
    results = write_samples(out, results)
    _write_text(out / "results.json", json.dumps(results, indent=1, allow_nan=False))
    notes = (
        "Final eval loss and metrics: mean ± std over seeds at each method's best learning "
        "rate. Steps to reference: first eval step reaching the reference method's best mean "
        "final eval loss (median over seeds; min-max in results.json). LR band: width of the "
        "learning-rate range within 5 % of the best final eval loss (20 %: results.json). "
        "Times and memory: medians over runs "
        f"({results.get('memory_kind', 'peak memory')} above the loaded base model)."
    )
    sweep = _format_sweep(results["summary"])
    paired = format_paired(
        results["summary"], results["metrics"], reference, results.get("matched")
    )
    paired = f"\n{paired}" if paired else ""
    _write_text(out / "results.md", f"# {title}\n\n{table}\n\n{notes}\n{paired}{sweep}")
    if results["summary"]:
        write_plots(out, results["runs"], results["summary"])
    return table
