"""Timing and peak-memory measurement of one step, on CPU or a CUDA GPU.

CPU peak memory: Linux's per-process high-water mark. Before a step, ``/proc/self/clear_refs`` is
written with ``5`` (resets ``VmHWM`` to the current RSS) and ``VmRSS`` is read; after it, ``VmHWM``.
``VmHWM − VmRSS`` is the step's own peak above what was resident before it. The worker process runs
with glibc's mmap threshold fixed at 64 KiB, so freed tensors go back to the OS and a later step
cannot hide its peak in memory an earlier step left in malloc's free lists.

GPU: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
``memory_allocated()`` before the step; time from CUDA events.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

MIB = 1024 * 1024
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def cpu_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kib("VmHWM")
        return True
    except OSError:
        return False


def run_measured(step: Callable[[], object], device: torch.device, before: Callable[[], None]) -> tuple[float, float]:
    """One step: returns (seconds, peak extra bytes)."""
    before()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3, float(torch.cuda.max_memory_allocated(device) - base)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss = _proc_status_kib("VmRSS")
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    hwm = _proc_status_kib("VmHWM")
    return seconds, float(max(0, hwm - rss) * 1024)


def summarise(samples: list[float]) -> dict:
    """Median, quartiles and p10/p90 (linear interpolation), min and max of the samples."""
    xs = sorted(samples)

    def q(p: float) -> float:
        if len(xs) == 1:
            return xs[0]
        pos = p * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {
        "median": statistics.median(xs),
        "q25": q(0.25),
        "q75": q(0.75),
        "p10": q(0.10),
        "p90": q(0.90),
        "min": xs[0],
        "max": xs[-1],
        "n": len(xs),
        "samples": samples,
    }


MEMORY_METHOD_CPU = (
    "VmHWM - VmRSS of a fresh process per case (clear_refs reset before the step; glibc mmap threshold 64 KiB)"
)
MEMORY_METHOD_GPU = "torch.cuda.max_memory_allocated - memory_allocated before the step"
