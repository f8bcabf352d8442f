"""Measuring a run: peak memory, synchronized wall-clock time and the environment it ran in.

:class:`PeakMemory` reports the peak memory growth over a block, in MiB:

* CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` at the start (the
  peak counter is reset at the start): tensors only, not the caching allocator's reserve.
* CPU (Linux): the process's resident set size. At the start, after ``gc.collect()`` and
  glibc's ``malloc_trim(0)`` (freed heap memory goes back to the system), the kernel's peak
  counter ``VmHWM`` is reset by writing ``5`` to ``/proc/self/clear_refs``; at the end the
  peak is ``VmHWM`` minus the RSS at the start. RSS counts everything the process touches
  (allocator retention and fragmentation, library pages), so differences between methods of a
  few tens of MiB are noise. Elsewhere (no ``/proc``): ``ru_maxrss`` minus the starting RSS,
  which only shows growth past the process's earlier peak.

``tracemalloc`` would be exact for Python objects but does not see torch's allocations and
slows training down several times, so it is not used.

:func:`environment` is what a run's record keeps of where and with what it ran: the versions of
torch, PEFT and transformers, riemannlora's version and :func:`source_digest` of its source
and data (two builds with the same version number but different code differ there), threads,
device and machine. The digest is taken once per process, at its first call: the harness
calls :func:`environment` before a run trains, so it reads the files the process imported.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import resource
import sys
import time

import torch

__all__ = ["PeakMemory", "clock", "environment", "source_digest"]


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory growth in MiB over a block (see the module docstring for what is counted)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.kind = "cuda_max_allocated" if self.cuda else "cpu_peak_rss"
        self.base = 0
        self.hwm_reset = False

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:  # give freed heap memory back, so the baseline is what is really in use
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.base = (_proc_status_kb("VmRSS") or 0) * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.hwm_reset = _proc_status_kb("VmHWM") is not None
        except OSError:
            self.hwm_reset = False
        if not self.hwm_reset:
            self.kind = "cpu_ru_maxrss"
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def peak_mb(self) -> float:
        """Peak memory above the baseline so far, in MiB."""
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.hwm_reset:
            peak = (_proc_status_kb("VmHWM") or 0) * 1024
        else:
            scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB else
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        return max(0.0, (peak - self.base) / 2**20)


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's pending work (CUDA synchronized)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def source_digest(root: str | os.PathLike | None = None) -> str | None:
    """SHA-256 over the files under ``root`` (default: the installed riemannlora package, its
    embedded data included; ``__pycache__`` left out): each file's path relative to ``root``
    and its bytes, in path order. It changes with any edit, addition, removal or rename of a
    file. ``None`` where ``root`` holds no file (a zipped install)."""
    if root is None:
        return _package_digest()
    base = pathlib.Path(root)
    files = sorted(
        path
        for path in base.rglob("*")
        if path.is_file() and "__pycache__" not in path.relative_to(base).parts
    )
    if not files:
        return None
    h = hashlib.sha256()
    for path in files:
        rel = path.relative_to(base).as_posix().encode()
        data = path.read_bytes()
        h.update(len(rel).to_bytes(8, "little") + rel + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _package_digest() -> str | None:
    import riemannlora

    return source_digest(pathlib.Path(riemannlora.__file__).resolve().parent)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict[str, object]:
    """Where and with what a run ran (see the module docstring)."""
    import riemannlora

    return {
        "torch": torch.__version__,
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "riemannlora": riemannlora.__version__,
        "source": source_digest(),
        "threads": torch.get_num_threads(),
        "device": device,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
