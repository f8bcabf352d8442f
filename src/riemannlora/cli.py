"""Command line: ``riemannlora bench`` (the benchmark), ``riemannlora methods`` and
``riemannlora pretrain-diffusion`` (builds the small diffusion model of ``--task diffusion``).

Run ``riemannlora bench --help`` for the flags, presets and method settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["build_parser", "main"]

PRESETS = ("default", "quick", "full", "gpu")
#: The task of a plain ``riemannlora bench`` (chosen by measurement: README).
DEFAULT_TASK = "clinc150"

_BENCH_DESCRIPTION = """\
Fine-tune a pretrained model with PEFT LoRA on a task with several optimizers (same
data order, same seeds, one training loop, lr decayed linearly to 0, weight decay 0), then
write OUT/results.json, OUT/results.md and PNG plots, and print the results table. Finished
runs are cached in OUT/runs/ and reused, so an interrupted sweep resumes. Several processes
may run the same command on the same OUT at once (one per core or GPU): each run is
trained by one of them and the others pick it up.

Presets (explicit flags override them):
  default  the main methods (adamw, scaled-adamw, riemannion, riemannion-loi where available),
           each at its tuned default lr, seed 0. clinc150 (the default task): 300 steps of
           batch 16 with MiniLM, about 8 minutes on 2 CPU cores (README); e2e / commonsense /
           gsm8k: 150 steps of batch 8 with SmolLM2, several seconds a step on 2 cores, so
           10-25 minutes per method; diffusion: 150 steps of DreamBooth-style subject
           learning on the small digit diffusion model (built once, about 20 minutes; see
           `riemannlora pretrain-diffusion`)
  quick    the same methods, a few steps, small evals (a smoke run of 1-3 minutes)
  full     the evidence protocol: every available method but the ablations over its lr grid
           (7 lrs, 3 decades) at seed 0, refined with the quarter-decade neighbours of its
           best lr; seeds 1 and 2 at the selected lr; and every method at adamw's selected lr
           for all seeds (matched lr). The report gives paired per-seed differences against
           adamw with bootstrap 95% intervals (hours on a CPU, or use --device cuda)

  gpu      the default methods with larger runs for a GPU (--device cuda): more steps,
           bigger batches and evaluations, the base model in bfloat16 (diffusion: float32,
           600 steps of 16, all 892 test images of the subject class, 256 samples)

Data: the built-in tasks read real data sets embedded in the package (nothing is
downloaded). --data PATH_OR_HUB_ID compares the optimizers on your data instead: a .jsonl /
.csv / .parquet file or a folder of them (train.*, validation.*, test.*), or a hub id. Columns
text,label give a classification task (default model MiniLM); prompt,completion or messages a
causal-LM task (TRL's conventions; default model SmolLM2). Without validation/test files, 10%
of the rows (seeded, at least 2, at most 2,000) are held out, half for validation and half for
test. The data are checked before anything is written to --out.

Sweep rule: each method runs all its lrs with the first seed (and, with --refine, the two
quarter-decade neighbours of the best one); the other seeds run at the lr with the lowest
final validation loss. Final metrics are measured on the test split, never used to select.
"""


def _bench_epilog() -> str:
    from riemannlora.bench.methods import METHODS
    from riemannlora.bench.workloads import WORKLOADS

    lines = [
        "methods (default lr: classification / causal LM / diffusion; weight decay 0 everywhere):"
    ]
    width = max(len(name) for name in METHODS) + 2
    for m in METHODS.values():
        lr = m.default_lr
        extra = "" if m.available() else "  [unavailable in this installation]"
        text = (
            f"{m.summary} (lr {lr['classification']:g} / {lr['causal']:g} / "
            f"{lr['diffusion']:g}){extra}"
        )
        lines.append(
            textwrap.fill(
                text,
                96,
                initial_indent=f"  {m.name:<{width}}",
                subsequent_indent=" " * (width + 2),
            )
        )
    lines.append("")
    lines.append("tasks (default model; metric):")
    for w in WORKLOADS.values():
        lines.append(f"  {w.name:<9} {w.default_model}; eval loss + {', '.join(w.table_metrics())}")
    lines.append("")
    lines.append(
        "LoRA: every nn.Linear but the output head (diffusion: to_q, to_k, to_v, to_out.0),\n"
        "alpha = 2 r, no dropout. Full method settings: the docstring of\n"
        "riemannlora.bench.methods."
    )
    lines.append("")
    lines.append("examples:")
    lines.append("  riemannlora bench                                  # the default run")
    lines.append("  riemannlora bench --quick --out /tmp/smoke")
    lines.append("  riemannlora bench --preset full --out bench_full")
    lines.append("  riemannlora bench --task e2e --methods adamw,riemannion --steps 100")
    lines.append("  riemannlora bench --methods adamw --lrs 1e-4,1e-3,1e-2 --seeds 0,1,2")
    lines.append("  riemannlora bench --task diffusion --lrs grid --out bench_diffusion")
    lines.append("  riemannlora bench --task commonsense --scoring generate --quick")
    lines.append("  riemannlora bench --data my_intents.jsonl        # text,label rows")
    lines.append("  riemannlora bench --data sft_folder/ --model smollm2  # prompt,completion")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``riemannlora``."""
    from riemannlora.bench.workloads import WORKLOADS

    parser = argparse.ArgumentParser(
        prog="riemannlora",
        description="Riemannian optimizers for LoRA: benchmark harness.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    bench = sub.add_parser(
        "bench",
        help="fine-tune with several optimizers and compare them",
        description=_BENCH_DESCRIPTION,
        epilog=_bench_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument(
        "--task", choices=list(WORKLOADS), help=f"built-in task (default {DEFAULT_TASK})"
    )
    bench.add_argument(
        "--data",
        help="your data instead of a built-in task: a .jsonl/.csv/.parquet file, a folder of "
        "them, or a hub id (see above)",
    )
    bench.add_argument(
        "--columns",
        metavar="NEW=OLD,...",
        help="--data: rename your columns to text/label/prompt/completion/messages, e.g. "
        "label=intent",
    )
    bench.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="dtype of the base model's weights (LoRA factors stay float32; default float32, "
        "bfloat16 for --preset gpu)",
    )
    bench.add_argument(
        "--scoring",
        choices=["likelihood", "generate"],
        default="likelihood",
        help="commonsense: pick the likeliest answer (default) or extract it from greedy "
        "decoding, as the suite does",
    )
    bench.add_argument(
        "--model",
        help="hub id, local path or alias (minilm, smollm2); default: the task's model",
    )
    bench.add_argument("--methods", help="comma-separated methods (see below)")
    bench.add_argument(
        "--lrs",
        help="comma-separated learning rates for every method, or 'grid' (each method's "
        "7-point grid) or 'default' (each method's default lr)",
    )
    bench.add_argument(
        "--lrs-for",
        action="append",
        metavar="METHOD=LRS",
        help="the lrs of one method (as --lrs: numbers, 'grid' or 'default'), in place of "
        "--lrs; repeat for several methods, e.g. --lrs-for sgd=1e-2,1e-1,1,10 (so that "
        "methods of different lr scales share one sweep and one report)",
    )
    bench.add_argument("--seeds", help="comma-separated integer seeds (default: 0; full: 0,1,2)")
    bench.add_argument(
        "--refine",
        action=argparse.BooleanOptionalAction,
        help="after the grid, also run the quarter-decade neighbours of each method's best lr "
        "(first seed) and select among all of them (default: on for --preset full)",
    )
    bench.add_argument(
        "--matched",
        metavar="METHOD",
        help="also run every method, every seed, at METHOD's selected lr (the matched-lr "
        "comparison; default: adamw for --preset full when it runs, 'none' to turn it off)",
    )
    bench.add_argument(
        "--reference",
        metavar="METHOD",
        help="the method every other one is compared with: paired per-seed differences and "
        "steps to its final loss (default adamw; e.g. sgd to compare the SGD-type methods "
        "with plain SGD). It changes the report only, never which runs are trained",
    )
    bench.add_argument("--steps", type=int, help="training steps per run")
    bench.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    bench.add_argument(
        "--head-lr",
        type=float,
        help="train the parameters outside the LoRA pairs (a new classifier head) with "
        "AdamW at this fixed lr for every method, so that the sweep moves only the LoRA "
        "optimizer (default: each method trains the head as it comes, mostly at the swept lr)",
    )
    bench.add_argument(
        "--targets",
        default="all-linear",
        help="which Linear layers get LoRA: 'all-linear' (every one but the head; default), "
        "'attention' (those inside the attention blocks), or comma-separated leaf names such "
        "as q_proj,v_proj",
    )
    bench.add_argument("--batch-size", type=int, help="training batch size")
    bench.add_argument("--eval-every", type=int, help="steps between eval-loss points")
    bench.add_argument(
        "--eval-size",
        type=int,
        help="eval examples of the eval-loss curve (the first N validation rows; at most as "
        "many as the task has, which is what a preset's larger size reads)",
    )
    bench.add_argument(
        "--final-eval-size",
        type=int,
        help="test examples of the final metrics (commonsense: per test set; e2e: meaning "
        "representations decoded; gsm8k: problems decoded); at most as many as the task has",
    )
    bench.add_argument(
        "--max-new-tokens", type=int, help="e2e / gsm8k / commonsense: greedy-decoding length"
    )
    bench.add_argument("--out", default="bench_out", help="output directory (./bench_out)")
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device")
    bench.add_argument("--preset", choices=PRESETS, help="default, quick or full (see above)")
    bench.add_argument("--quick", action="store_true", help="same as --preset quick")
    bench.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: the cores not busy at start, i.e. cpu count minus "
        "the 1-minute load average, at least 1)",
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the report from the runs already cached in OUT "
        "(e.g. while a sweep is still running); the runs not done yet are listed",
    )
    bench.set_defaults(func=_bench, parser=bench)

    methods = sub.add_parser(
        "methods",
        help="list the benchmark methods",
        description="List the benchmark methods, their availability and default lrs.",
    )
    methods.set_defaults(func=_methods, parser=methods)

    from riemannlora.bench.diffusion import PRETRAIN_CONFIGS

    pretrain = sub.add_parser(
        "pretrain-diffusion",
        help="build (once) the small text-to-image diffusion model of --task diffusion",
        description=(
            "Pretrain the small MNIST-digit text-to-image diffusion model (diffusers "
            "UNet2DConditionModel, MiniLM captions, one class held out) and its digit "
            "classifier, and cache them; `riemannlora bench --task diffusion` does this on "
            "first use. See riemannlora.bench.diffusion."
        ),
    )
    pretrain.add_argument(
        "--model",
        choices=list(PRETRAIN_CONFIGS),
        default=next(iter(PRETRAIN_CONFIGS)),
        help="which configuration (default: the benchmark model)",
    )
    pretrain.add_argument("--force", action="store_true", help="rebuild even if cached")
    pretrain.add_argument("--threads", type=int, help="torch CPU threads")
    pretrain.set_defaults(func=_pretrain_diffusion, parser=pretrain)
    return parser


# --------------------------------------------------------------------------------------------
# argument parsing helpers
# --------------------------------------------------------------------------------------------


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _parse_lrs(parser: argparse.ArgumentParser, text: str, flag: str = "--lrs") -> list[float]:
    values = []
    for item in _split(text):
        try:
            lr = float(item)
        except ValueError:
            parser.error(f"{flag}: {item!r} is not a number")
        if not math.isfinite(lr) or lr <= 0:
            parser.error(f"{flag}: learning rates must be finite and > 0, got {item}")
        values.append(lr)
    if not values:
        parser.error(f"{flag}: no learning rate given")
    return values


def _lrs_of(
    parser: argparse.ArgumentParser, mode: str, method: str, kind: str, flag: str
) -> list[float]:
    """The lrs of ``method`` for a ``--lrs`` value: 'grid' (its 7-point grid), 'default' (its
    default lr) or comma-separated numbers."""
    from riemannlora.bench.methods import METHODS, lr_grid

    mode = mode.strip().lower()
    if mode == "grid":
        return lr_grid(METHODS[method].lr_for(kind))
    if mode == "default":
        return [METHODS[method].lr_for(kind)]
    return _parse_lrs(parser, mode, flag)


def _lrs_for(
    parser: argparse.ArgumentParser, items: list[str], methods: list[str]
) -> dict[str, str]:
    """``--lrs-for METHOD=LRS`` flags -> {method: LRS}; each method once, and one of the run."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep or not name or not value.strip():
            parser.error(f"--lrs-for: expected METHOD=LR,LR,... (or =grid, =default), got {item!r}")
        if name not in methods:
            parser.error(
                f"--lrs-for: {name!r} is not one of the methods run ({', '.join(methods)})"
            )
        if name in out:
            parser.error(f"--lrs-for: {name!r} is given twice")
        out[name] = value
    return out


def _parse_seeds(parser: argparse.ArgumentParser, text: str) -> list[int]:
    try:
        seeds = [int(x) for x in _split(text)]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {text!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds needs distinct integers, got {text!r}")
    return seeds


def _check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("steps", "rank", "batch_size", "eval_every", "eval_size", "final_eval_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.head_lr is not None and not (math.isfinite(args.head_lr) and args.head_lr > 0):
        parser.error(f"--head-lr must be finite and > 0, got {args.head_lr}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")


def _free_cores() -> int:
    """CPU cores not busy at start: ``os.cpu_count()`` minus the 1-minute load average, at
    least 1 and at most torch's default. More threads than free cores make every OpenMP step
    wait for preempted threads (several times slower on a shared machine)."""
    import torch

    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    free = round((os.cpu_count() or 1) - busy)
    return max(1, min(torch.get_num_threads(), free))


def _resolve_preset(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    if args.quick and args.preset not in (None, "quick"):
        parser.error(f"--quick conflicts with --preset {args.preset}")
    return "quick" if args.quick else (args.preset or "default")


def _resolve_methods(
    parser: argparse.ArgumentParser, args: argparse.Namespace, preset: str
) -> tuple[list[str], dict[str, str]]:
    """(methods to run, skipped method -> reason)."""
    from riemannlora.bench.methods import MAIN_METHODS, METHODS, get_method

    if args.methods:
        names = [n.lower() for n in _split(args.methods)]
        if not names:
            parser.error("--methods: no method given")
        for name in names:
            try:
                get_method(name)
            except ValueError as exc:
                parser.error(f"--methods: {exc}")
        if len(set(names)) != len(names):
            parser.error(f"--methods lists a method twice: {args.methods!r}")
        return names, {}
    if preset == "full":
        wanted = [n for n, m in METHODS.items() if not m.ablation]
    else:
        wanted = list(MAIN_METHODS)
    skipped = {
        n: "needs riemannlora." + ", riemannlora.".join(METHODS[n].requires)
        for n in wanted
        if not METHODS[n].available()
    }
    return [n for n in wanted if n not in skipped], skipped


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Plan:
    """A resolved ``bench`` invocation."""

    preset: str
    base: Any  # RunConfig: every setting but method, lr and seed
    lrs: dict[str, list[float]]
    seeds: list[int]
    skipped: dict[str, str]
    refine: bool = False
    matched: str | None = None
    reference: str = "adamw"


def _canonical_targets(text: str) -> str:
    """``--targets`` in one spelling per meaning (the runs' cache key depends on it): a choice
    as is, a list of names sorted, deduplicated and without spaces."""
    text = text.strip()
    if "," not in text:
        return text
    return ",".join(sorted({part.strip() for part in text.split(",") if part.strip()}))


def _check_targets(parser: argparse.ArgumentParser, workload: Any, base: Any) -> None:
    """``--targets`` against the model's own layers (the model is loaded once for this), so
    that a wrong name fails here and not in every run."""
    from riemannlora.bench.workloads import load_base, lora_target_modules

    model, _ = load_base(workload, base.model, "cpu")
    try:
        lora_target_modules(model, base.targets)
    except ValueError as exc:
        parser.error(f"--targets: {exc}")
    finally:
        del model


def _plan(parser: argparse.ArgumentParser, args: argparse.Namespace) -> _Plan:
    """Turn flags and preset into runs; every bad flag ends here with ``parser.error``."""
    import torch

    from riemannlora.bench.assets import AssetNotFoundError, canonical_model_id
    from riemannlora.bench.data import DataError
    from riemannlora.bench.runner import RunConfig
    from riemannlora.bench.userdata import data_fingerprint
    from riemannlora.bench.workloads import WORKLOADS, get_workload

    _check_positive(parser, args)
    preset = _resolve_preset(parser, args)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available in this torch build / machine")
    if args.columns and not args.data:
        parser.error("--columns renames the columns of --data; give --data too")
    if args.data and args.task:
        parser.error("--data and --task exclude each other: --data replaces the built-in task")
    try:
        workload = get_workload(args.task or DEFAULT_TASK, args.data or "", args.columns or "")
        data_hash = data_fingerprint(workload.task()) if args.data else ""
    except DataError as exc:
        parser.error(f"--data: {exc}")
    if args.scoring != "likelihood" and not (workload.scorer and workload.scorer.scorings):
        choosers = [n for n, w in WORKLOADS.items() if w.scorer and w.scorer.scorings]
        parser.error(f"--scoring is for --task {' or '.join(choosers)}")
    methods, skipped = _resolve_methods(parser, args, preset)
    if args.seeds:
        seeds = _parse_seeds(parser, args.seeds)
    else:
        seeds = [0, 1, 2] if preset == "full" else [0]
    lr_mode = args.lrs or ("grid" if preset == "full" else "default")
    lrs = {m: _lrs_of(parser, lr_mode, m, workload.kind, "--lrs") for m in methods}
    for m, mode in _lrs_for(parser, args.lrs_for or [], methods).items():
        lrs[m] = _lrs_of(parser, mode, m, workload.kind, f"--lrs-for {m}")

    sizes = workload.settings(preset)
    for name in (*sizes, "rank"):
        if getattr(args, name, None) is not None:
            sizes[name] = getattr(args, name)
    model = canonical_model_id(args.model or workload.model_for(preset))
    try:
        limits = workload.size_limits(model)
    except AssetNotFoundError as exc:
        parser.error(str(exc))
    for name, (limit, why) in limits.items():
        if sizes[name] <= limit:
            continue
        if getattr(args, name, None) is not None:
            parser.error(
                f"--{name.replace('_', '-')} {sizes[name]}: "
                f"{'--data' if workload.data else workload.name} has no more "
                f"({why}); use at most {limit}"
            )
        sizes[name] = limit  # a preset's size beyond the data (a small --data): all of it
    try:
        base = RunConfig(
            task=workload.name,
            model=model,
            method=methods[0],
            lr=lrs[methods[0]][0],
            seed=seeds[0],
            device=args.device,
            data=args.data or "",
            data_hash=data_hash,
            scoring=args.scoring,
            head_lr=args.head_lr,
            columns=args.columns or "",
            targets=_canonical_targets(args.targets),
            dtype=args.dtype
            or ("bfloat16" if preset == "gpu" and workload.kind != "diffusion" else "float32"),
            **sizes,
        )
    except ValueError as exc:
        parser.error(str(exc))
    if base.targets != "all-linear":
        _check_targets(parser, workload, base)

    refine = args.refine if args.refine is not None else preset == "full"
    if args.matched is None:
        matched = "adamw" if preset == "full" and "adamw" in methods else None
    elif args.matched.strip().lower() == "none":
        matched = None
    else:
        matched = args.matched.strip().lower()
        if matched not in methods:
            parser.error(
                f"--matched: {args.matched!r} is not one of the methods run ({', '.join(methods)})"
            )
    reference = (args.reference or "adamw").strip().lower()
    if args.reference is not None and reference not in methods:
        parser.error(
            f"--reference: {args.reference!r} is not one of the methods run ({', '.join(methods)})"
        )
    return _Plan(preset, base, lrs, seeds, skipped, refine, matched, reference)


def _bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import torch

    from riemannlora.bench.assets import AssetNotFoundError
    from riemannlora.bench.report import write_report
    from riemannlora.bench.runner import BENCH_VERSION, RunCache, quiet_libraries, run_sweep
    from riemannlora.bench.summary import summarize
    from riemannlora.bench.workloads import fixed_lora_targets, get_workload

    start = time.perf_counter()
    plan = _plan(parser, args)
    base = plan.base
    threads = args.threads or (_free_cores() if base.device == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(threads)
    quiet_libraries()
    fixed = fixed_lora_targets(get_workload(base.task, base.data, base.columns))
    targets = ",".join(fixed) if fixed is not None else base.targets
    print(
        f"riemannlora bench: task {base.task}, model {base.model}, preset {plan.preset}, "
        f"LoRA on {targets}, methods {', '.join(plan.lrs)}, seeds {plan.seeds}, "
        f"{base.steps} steps, "
        f"{torch.get_num_threads()} thread(s), out {args.out}",
        flush=True,
    )
    for name, reason in plan.skipped.items():
        print(f"  skipping {name}: {reason}", flush=True)

    cache = RunCache(args.out)
    missing: list[dict[str, Any]] | None = [] if args.report_only else None
    try:
        records, failures = run_sweep(
            base,
            plan.lrs,
            plan.seeds,
            cache,
            progress=not args.no_progress,
            log=lambda s: print(s, file=sys.stderr),
            missing=missing,
            refine=plan.refine,
            matched=plan.matched,
        )
    except AssetNotFoundError as exc:
        print(f"riemannlora bench: error: {exc}", file=sys.stderr)
        return 2
    workload = get_workload(base.task, base.data, base.columns)
    metrics = workload.table_metrics()
    results = {
        "bench_version": BENCH_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "task": base.task,
        "model": base.model,
        "preset": plan.preset,
        "settings": {
            k: v for k, v in dataclasses.asdict(base).items() if k not in ("method", "lr", "seed")
        },
        # what LoRA was put on: settings["targets"] as asked, or the task's fixed targets
        "lora_targets": targets,
        "methods": list(plan.lrs),
        "lrs": plan.lrs,
        "seeds": plan.seeds,
        "metrics": metrics,
        "reference": plan.reference,
        "memory_kind": records[0]["memory_kind"] if records else None,
        "refine": plan.refine,
        "matched": plan.matched,
        "summary": summarize(records, metrics, plan.reference, plan.lrs, plan.refine, plan.matched),
        "runs": records,
        "failures": failures,
        "missing": missing or [],
        "skipped_methods": plan.skipped,
        "cache": {"hits": cache.hits, "trained": cache.trained},
        "threads": torch.get_num_threads(),
        "wall_s": time.perf_counter() - start,
    }
    task_name = f"{base.task} ({base.data})" if base.data else base.task
    title = f"riemannlora bench: {task_name} / {base.model} ({plan.preset})"
    if workload.scorer and workload.scorer.scorings:
        title += f", answers scored by {base.scoring}"
    if missing:
        title += f" -- partial: {len(missing)} planned run(s) not run yet"
    table = write_report(args.out, results, title)
    print(f"\n{table}\n")
    print(
        f"{len(records)} run(s) ({cache.trained} trained, {cache.hits} from cache), "
        f"{len(failures)} failed, {len(missing or [])} not run yet, "
        f"{results['wall_s']:.0f} s. Results: "
        f"{os.path.join(args.out, 'results.json')}, results.md and PNG plots."
    )
    return 0 if records and not failures else 1


def _methods(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    print(_bench_epilog())
    return 0


def _pretrain_diffusion(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import shutil

    import torch

    from riemannlora.bench.diffusion import pretrained, pretrained_dir
    from riemannlora.bench.runner import quiet_libraries

    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    else:
        torch.set_num_threads(_free_cores())
    quiet_libraries()
    path = pretrained_dir(args.model)
    if args.force and path.exists():
        shutil.rmtree(path)
    base = pretrained(args.model)
    meta = base.meta
    print(f"{args.model}: {base.path}")
    print(
        f"  built in {meta['total_s']:.0f} s ({meta['threads']} threads); classifier test "
        f"accuracy {meta['classifier_test_accuracy']:.3f}; known-class sample accuracy "
        f"{meta['known_class_accuracy']:.3f}; held-out class {base.config.subject}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``riemannlora`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args.parser, args))


if __name__ == "__main__":
    sys.exit(main())
