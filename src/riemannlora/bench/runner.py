"""One training loop for every method and task, a JSON cache of finished runs, and the sweep.

A run (:class:`RunConfig`) loads the pretrained model, applies the method's LoRA
initialization, builds its optimizer and trains for ``steps`` steps on the task's batches
(:func:`riemannlora.bench.workloads.train_batches`, identical for every method at one seed),
with the learning rate decayed linearly to 0 (no warmup) and no gradient clipping.
It records (see :func:`train`):

* ``eval_loss``: ``[step, loss]`` at step 0, every ``eval_every`` steps and the last step, on
  the fixed validation subset (first ``eval_size`` validation examples); ``train_loss``: every
  step's loss;
* ``final``: the task's final metrics on its test split plus ``eval_loss`` (the last
  validation point, which the sweep selects learning rates by);
* ``time_per_step_s`` / ``opt_step_s``: median seconds of a whole training step (forward,
  backward, optimizer step, zero_grad) and of ``optimizer.step()`` alone (CUDA synchronized);
  ``init_s``: building the PEFT model (with the method's initialization) and the optimizer;
* ``peak_mem_mb``: peak memory above the baseline taken after the base model and the data are
  loaded, over initialization and training (evaluations included; see
  :class:`riemannlora.bench.measure.PeakMemory`), ``memory_kind`` says what was measured;
* ``wall_s``: the whole run, evaluation included; ``diverged``: a non-finite loss stopped it;
* ``diagnostics``: ``[step, summary]`` at step 1 and every eval point, the summary of
  :func:`riemannlora.diagnostics.diagnostics` (gradient norm, per-layer step size, delta norm,
  stable rank of the delta, the scaled optimizers' Gram condition numbers, skipped steps), its
  own time left out of the step timings.

Finished runs are stored as ``OUT/runs/<key>.json`` (:class:`RunCache`); the key hashes every
field of the config and :data:`BENCH_VERSION`, so an interrupted sweep resumes where it stopped
and changing any setting trains anew.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import pathlib
import platform
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from riemannlora.bench.assets import AssetNotFoundError
from riemannlora.bench.measure import PeakMemory, clock, environment
from riemannlora.bench.methods import (
    METHODS,
    MethodContext,
    build_optimizer,
    get_method,
    refined_lrs,
)
from riemannlora.bench.workloads import (
    SCORINGS,
    WORKLOADS,
    eval_batches,
    eval_loss,
    final_metrics,
    get_workload,
    load_base,
    lora_config,
    train_batches,
)
from riemannlora.diagnostics import diagnostics, snapshot

__all__ = [
    "BENCH_VERSION",
    "RunCache",
    "RunConfig",
    "quiet_libraries",
    "run_sweep",
    "train",
]

#: Bump when a change makes cached runs incomparable with new ones.
BENCH_VERSION = 2  # 2: the embedded real-data tasks (BIG-bench is gone)


#: Training dtypes of the model's base weights (``bfloat16``: the GPU preset).
DTYPES = ("float32", "bfloat16")
#: Fields added to :class:`RunConfig` after version 2's runs were cached, with their defaults.
LATER_FIELDS: dict[str, Any] = {"columns": "", "dtype": "float32", "targets": "all-linear"}


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one training run (all of it goes into the cache key).

    The number of CPU threads is not part of it: it changes timings, not results, so a cached
    run is reused whatever ``--threads`` was (each record keeps its own in ``env``).
    ``task="custom"`` runs on a user's data set: ``data`` is its source (``--data``) and
    ``data_hash`` a fingerprint of its rows, so a changed file is trained anew. ``scoring``:
    how commonsense answers are scored (``"likelihood"`` or ``"generate"``). ``columns``:
    renames of the user's columns (``"label=intent,text=utterance"``). ``dtype``: of the base
    model's weights (``"bfloat16"``: PEFT keeps the LoRA factors in float32). ``head_lr``: the
    parameters outside the LoRA pairs (a new classifier head) are trained by ``AdamW(head_lr)``
    for every method (:func:`riemannlora.bench.methods.build_optimizer`); ``None``: by each
    method as it comes (most at the swept lr). ``targets``: which Linear layers get LoRA
    (:func:`riemannlora.bench.workloads.lora_target_modules`: ``"all-linear"``,
    ``"attention"`` or comma-separated leaf names).
    """

    task: str
    model: str
    method: str
    lr: float
    seed: int
    steps: int
    rank: int
    batch_size: int
    eval_every: int
    eval_size: int
    final_eval_size: int
    max_length: int
    max_new_tokens: int
    device: str = "cpu"
    data: str = ""
    data_hash: str = ""
    scoring: str = "likelihood"
    head_lr: float | None = None
    columns: str = ""
    dtype: str = "float32"
    targets: str = "all-linear"

    def __post_init__(self) -> None:
        if self.task == "custom":
            if not self.data:
                raise ValueError("task 'custom' needs data (the --data source)")
        elif self.task not in WORKLOADS:
            raise ValueError(f"unknown task {self.task!r}; choose from {', '.join(WORKLOADS)}")
        elif self.data:
            raise ValueError(f"data is only for task 'custom', not {self.task!r}")
        if self.head_lr is not None and not (
            isinstance(self.head_lr, int | float)
            and math.isfinite(self.head_lr)
            and self.head_lr > 0
        ):
            raise ValueError(f"head_lr must be a finite number > 0 or None, got {self.head_lr!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.dtype != "float32" and self.task == "diffusion":
            raise ValueError("the diffusion task trains in float32 only")
        if not isinstance(self.targets, str) or not self.targets.strip():
            raise ValueError(f"targets must be a non-empty string, got {self.targets!r}")
        if self.targets != "all-linear" and self.task == "diffusion":
            raise ValueError(
                "the diffusion task puts LoRA on the UNet's attention projections only; "
                "leave targets at 'all-linear'"
            )
        if self.columns and self.task != "custom":
            raise ValueError(f"columns are only for task 'custom', not {self.task!r}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        for name in ("steps", "rank", "batch_size", "eval_every", "eval_size", "final_eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def identity(self) -> dict[str, Any]:
        """The fields that identify the run: all of them, except those added after the runs of
        this :data:`BENCH_VERSION` were first cached while they hold their default
        (:data:`LATER_FIELDS`), so that those runs stay valid."""
        fields = dataclasses.asdict(self)
        for name, default in LATER_FIELDS.items():
            if fields.get(name) == default:
                fields.pop(name)
        return fields

    def key(self) -> str:
        """File-name-safe cache key: readable prefix + hash of the identity and the version."""
        fields = {**self.identity(), "version": BENCH_VERSION}
        digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.task}_{self.method}_lr{self.lr:.3g}_s{self.seed}_{digest}"


def quiet_libraries() -> None:
    """Silence the load reports, weight-loading bars and known harmless warnings of the
    libraries, so the benchmark's own progress bars and table stay readable."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


# --------------------------------------------------------------------------------------------
# the training loop
# --------------------------------------------------------------------------------------------


@dataclass
class _Trace:
    """What the training loop observed."""

    eval_loss: list[list[float | None]] = field(default_factory=list)
    train_loss: list[float | None] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    opt_s: list[float] = field(default_factory=list)
    diverged: bool = False
    #: ``[step, summary]`` of :func:`riemannlora.diagnostics.diagnostics` at step 1 and at
    #: every eval point (per-layer values left out)
    diagnostics: list[list[Any]] = field(default_factory=list)


def _train_loop(
    model: torch.nn.Module,
    optimizer: Any,
    batches: Iterator[dict[str, torch.Tensor]],
    held_out: list[dict[str, torch.Tensor]],
    cfg: RunConfig,
    progress: bool,
) -> _Trace:
    """The one training loop of the benchmark: ``cfg.steps`` steps with the learning rate of
    every param group decayed linearly from its initial value to 0 (step t uses
    ``lr (1 - (t - 1) / steps)``), eval-loss points at step 0, every ``cfg.eval_every`` steps
    and the last step; stops at the first non-finite loss."""
    from tqdm.auto import tqdm

    device = torch.device(cfg.device)
    trace = _Trace(eval_loss=[[0, _finite(eval_loss(model, held_out))]])
    groups = optimizer.param_groups
    peak_lrs = [group["lr"] for group in groups]
    model.train()
    bar = tqdm(
        range(1, cfg.steps + 1),
        desc=f"{cfg.method} lr={cfg.lr:.3g} seed={cfg.seed}",
        leave=False,
        disable=not progress,
        dynamic_ncols=True,
    )
    for step in bar:
        batch = {k: v.to(device) for k, v in next(batches).items()}
        for group, peak in zip(groups, peak_lrs):  # linear decay to 0, every group alike
            group["lr"] = peak * (1 - (step - 1) / cfg.steps)
        observe = step == 1 or step % cfg.eval_every == 0 or step == cfg.steps
        t_start = clock(device)
        loss = model(**batch).loss
        loss.backward()
        t_diag = clock(device)  # the diagnostics' own time is left out of the step's
        before = snapshot(optimizer, model) if observe else None
        t_opt = clock(device)
        optimizer.step()
        t_end = clock(device)
        if before is not None:
            record = diagnostics(optimizer, before, model)
            record.pop("layers")
            trace.diagnostics.append([step, record])
        t_after = clock(device)
        optimizer.zero_grad(set_to_none=True)
        trace.step_s.append(clock(device) - t_start - (t_opt - t_diag) - (t_after - t_end))
        trace.opt_s.append(t_end - t_opt)
        trace.train_loss.append(_finite(float(loss.detach())))
        if trace.train_loss[-1] is None:
            trace.diverged = True
            break
        if step % cfg.eval_every == 0 or step == cfg.steps:
            value = _finite(eval_loss(model, held_out))
            trace.eval_loss.append([step, value])
            bar.set_postfix(eval_loss="nan" if value is None else f"{value:.4f}")
            if value is None:
                trace.diverged = True
                break
    bar.close()
    return trace


def train(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Run ``cfg`` and return its record (JSON-ready; non-finite numbers become ``None``)."""
    start = time.perf_counter()
    env = environment(cfg.device)  # before training: the digest of the code this process runs
    workload, method = get_workload(cfg.task, cfg.data, cfg.columns), get_method(cfg.method)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)  # the new classifier head and PEFT's lora_A init
    base, tokenizer = load_base(workload, cfg.model, cfg.device, getattr(torch, cfg.dtype))
    batches = train_batches(
        workload,
        tokenizer,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        seed=cfg.seed,
    )
    first = {k: v.to(device) for k, v in next(batches).items()}
    held_out = eval_batches(workload, tokenizer, n=cfg.eval_size, max_length=cfg.max_length)
    ctx = MethodContext(
        compute_loss=lambda m: m(**first).loss,
        adamw_lr=METHODS["adamw"].lr_for(workload.kind),
        seed=cfg.seed,
        head_lr=cfg.head_lr,
    )
    with PeakMemory(device) as memory:
        t0 = time.perf_counter()
        config = lora_config(workload, base, cfg.rank, targets=cfg.targets)
        model = method.initialize(base, config, ctx)
        optimizer = build_optimizer(method, model, cfg.lr, ctx)
        init_s = time.perf_counter() - t0
        trace = _train_loop(
            model, optimizer, itertools.chain([first], batches), held_out, cfg, progress
        )
        peak_mb = memory.peak_mb()

    final: dict[str, Any] = {"eval_loss": None if trace.diverged else trace.eval_loss[-1][1]}
    if not trace.diverged:
        final.update(
            final_metrics(
                workload,
                model,
                tokenizer,
                final_eval_size=cfg.final_eval_size,
                max_length=cfg.max_length,
                max_new_tokens=cfg.max_new_tokens,
                eval_size=cfg.eval_size,
                scoring=cfg.scoring,
                progress=progress,
            )
        )
    return {
        "key": cfg.key(),
        "version": BENCH_VERSION,
        "config": dataclasses.asdict(cfg),
        "final": final,
        "eval_loss": trace.eval_loss,
        "train_loss": trace.train_loss,
        "diverged": trace.diverged,
        "diagnostics": trace.diagnostics,
        "steps_done": len(trace.step_s),
        "time_per_step_s": statistics.median(trace.step_s) if trace.step_s else None,
        "opt_step_s": statistics.median(trace.opt_s) if trace.opt_s else None,
        "init_s": init_s,
        "peak_mem_mb": peak_mb,
        "memory_kind": memory.kind,
        "wall_s": time.perf_counter() - start,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "env": env,
    }


# --------------------------------------------------------------------------------------------
# cache and sweep
# --------------------------------------------------------------------------------------------


class RunCache:
    """Finished runs as ``<root>/runs/<key>.json``; counts hits and trained runs."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.dir = pathlib.Path(root) / "runs"
        self.hits = 0
        self.trained = 0

    def path(self, cfg: RunConfig) -> pathlib.Path:
        return self.dir / f"{cfg.key()}.json"

    def get(self, cfg: RunConfig) -> dict[str, Any] | None:
        """The stored record of ``cfg`` (``None`` if missing or unreadable)."""
        path = self.path(cfg)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        stored = record.get("config")
        if not isinstance(stored, dict):
            return None
        stored = {
            k: v for k, v in stored.items() if not (k in LATER_FIELDS and v == LATER_FIELDS[k])
        }
        if stored != cfg.identity():
            return None
        return record

    def put(self, cfg: RunConfig, record: dict[str, Any]) -> None:
        """Store a record atomically (write to a temporary file, then rename)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".run.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, allow_nan=False)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, self.path(cfg))

    def lock_path(self, cfg: RunConfig) -> pathlib.Path:
        return self.dir / f"{cfg.key()}.lock"

    def claim(self, cfg: RunConfig) -> bool:
        """Take the run of ``cfg`` for this process (an exclusive lock file holding its pid and
        host). False while another live process holds it; the lock of a process that died on
        this machine is taken over. A lock from another host is respected until removed."""
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = self.lock_path(cfg)
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if _lock_owner_alive(lock):
                    return False
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": platform.node()}, f)
            return True
        return False

    def release(self, cfg: RunConfig) -> None:
        self.lock_path(cfg).unlink(missing_ok=True)

    def run(self, cfg: RunConfig, progress: bool = True) -> dict[str, Any] | None:
        """The cached record of ``cfg``, or train it and cache the result; None when another
        process is training it right now (see :meth:`claim`)."""
        record = self.get(cfg)
        if record is not None:
            self.hits += 1
            return record
        if not self.claim(cfg):
            return None
        try:
            record = self.get(cfg)  # finished by another process just before the claim
            if record is not None:
                self.hits += 1
                return record
            record = train(cfg, progress=progress)
            self.trained += 1
            self.put(cfg, record)
            return record
        finally:
            self.release(cfg)


def _lock_owner_alive(lock: pathlib.Path) -> bool:
    """Whether the process named in a lock file may still be running."""
    try:
        owner = json.loads(lock.read_text())
        pid, host = int(owner["pid"]), str(owner["host"])
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError):
        return True  # being written right now
    if host != platform.node():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _final_loss(record: dict[str, Any]) -> float:
    loss = record["final"].get("eval_loss")
    return math.inf if loss is None else float(loss)


def run_sweep(
    base: RunConfig,
    lrs: dict[str, list[float]],
    seeds: list[int],
    cache: RunCache,
    progress: bool = True,
    log: Callable[[str], None] = print,
    missing: list[dict[str, Any]] | None = None,
    poll_s: float = 20.0,
    refine: bool = False,
    matched: str | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run every method of ``lrs`` (method -> learning rates) in stages.

    Stage 1 runs each learning rate with ``seeds[0]``; with ``refine``, the quarter-decade
    neighbours of the best one (:func:`~riemannlora.bench.methods.refined_lrs`) follow at ``seeds[0]``; stage 2 runs
    ``seeds[1:]`` at each method's best learning rate (lowest final validation loss among the
    stage-1 and refinement runs). With ``matched`` (a method of ``lrs``, e.g. ``"adamw"``),
    every method also runs every seed at that method's best learning rate (the matched-lr
    comparison). ``base`` gives every other setting. Returns ``(records, failures)``: a failing
    run is logged and reported as ``{"config", "error", "traceback"}`` instead of stopping the
    sweep, except for a missing model or data set
    (:class:`~riemannlora.bench.assets.AssetNotFoundError`), which is raised.

    Several processes may run the same sweep on the same output directory at once: each run
    is trained by the first process that claims it (:meth:`RunCache.claim`); the others go on
    with other runs and pick its result up from the cache when it is done (polling every
    ``poll_s`` seconds once nothing else is left), so a later stage of a method waits for all
    of its earlier runs wherever they were trained.

    ``missing``: a list, to train nothing: only cached runs are returned and the configs of
    the others are appended to it (later stages then use the best lr among the cached runs).
    """
    from tqdm.auto import tqdm

    if not seeds:
        raise ValueError("at least one seed is needed")
    if matched is not None and matched not in lrs:
        raise ValueError(f"matched method {matched!r} is not among the methods {list(lrs)}")
    total = sum(len(v) for v in lrs.values()) + len(lrs) * (len(seeds) - 1)
    total += 2 * len(lrs) if refine else 0  # at most: neighbours on the grid are not rerun
    total += len(lrs) * len(seeds) if matched else 0  # at most: runs at the same lr are shared
    bar = tqdm(total=total, desc="runs", unit="run", disable=not progress, dynamic_ncols=True)
    records: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    settled: dict[str, dict[str, Any] | None] = {}  # key -> record (None: failed or missing)
    waiting = False

    def attempt(cfg: RunConfig) -> None:
        """Settle ``cfg`` unless another process is training it (``waiting`` then)."""
        nonlocal waiting
        key = cfg.key()
        if key in settled:
            return
        bar.set_postfix_str(f"{cfg.method} lr={cfg.lr:.3g} seed={cfg.seed}")
        if missing is not None:  # report only
            record = cache.get(cfg)
            if record is None:
                missing.append(dataclasses.asdict(cfg))
            else:
                cache.hits += 1
        else:
            try:
                record = cache.run(cfg, progress=progress)
            except AssetNotFoundError:
                raise  # no run can work without the model or the data
            except Exception as exc:  # keep the sweep going; the failure is reported
                log(f"run {cfg.key()} failed: {type(exc).__name__}: {exc}")
                failures.append(
                    {
                        "config": dataclasses.asdict(cfg),
                        "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc(limit=6),
                    }
                )
                settled[key] = None
                bar.update(1)
                return
            if record is None:  # another process trains it
                waiting = True
                return
        settled[key] = record
        if record is not None:
            records.append(record)
        bar.update(1)

    def skip(cfg: RunConfig) -> None:
        if cfg.key() not in settled:
            settled[cfg.key()] = None
            bar.update(1)

    def stage(method: str, method_lrs: list[float]) -> list[dict[str, Any]] | None:
        """Run ``method_lrs`` at the first seed; their records once all are settled."""
        cfgs = [dataclasses.replace(base, method=method, lr=lr, seed=seeds[0]) for lr in method_lrs]
        for cfg in cfgs:
            attempt(cfg)
        if any(cfg.key() not in settled for cfg in cfgs):
            return None
        return [r for r in (settled[cfg.key()] for cfg in cfgs) if r is not None]

    def best_lr(method: str, method_lrs: list[float]) -> float | None:
        """The method's selected lr once its first-seed runs are settled (None: not yet, or
        nothing to select from; the runs it could not use are counted as skipped)."""
        done = stage(method, method_lrs)
        if done is None:
            return None
        if refine:
            extra = (
                refined_lrs(min(done, key=_final_loss)["config"]["lr"], method_lrs) if done else []
            )
            more = stage(method, extra)
            if more is None:
                return None
            done += more
        if not done:
            for seed in seeds[1:]:  # nothing to pick the lr from: count them as skipped
                skip(dataclasses.replace(base, method=method, lr=method_lrs[0], seed=seed))
            return None
        return min(done, key=_final_loss)["config"]["lr"]

    while True:
        waiting = False
        chosen: dict[str, float | None] = {}
        for method, method_lrs in lrs.items():
            best = chosen[method] = best_lr(method, method_lrs)
            if best is None:
                continue
            for seed in seeds[1:]:
                attempt(dataclasses.replace(base, method=method, lr=best, seed=seed))
        if matched is not None and chosen.get(matched) is not None:
            for method in lrs:
                for seed in seeds:
                    attempt(dataclasses.replace(base, method=method, lr=chosen[matched], seed=seed))
        if not waiting:
            break
        time.sleep(poll_s)
    bar.close()
    return records, failures
