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
from typing import NamedTuple

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


def resident_mib() -> tuple[float, float]:
    """This process's resident set now and its high-water mark since the last reset (``VmRSS``,
    ``VmHWM`` of ``/proc/self/status``), in MiB; Linux only. For a mark inside a measured step."""
    return _proc_status_kib("VmRSS") / 1024, _proc_status_kib("VmHWM") / 1024


class Measurement(NamedTuple):
    seconds: float  # wall clock (CUDA events on a GPU)
    peak_bytes: float  # peak extra memory of the step
    cpu_seconds: float | None  # process CPU time (all threads) on CPU: less sensitive to other load


def run_measured(step: Callable[[], object], device: torch.device, before: Callable[[], None]) -> Measurement:
    """One step, timed and with its peak extra memory."""
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
        peak = float(torch.cuda.max_memory_allocated(device) - base)
        return Measurement(start.elapsed_time(end) / 1e3, peak, None)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss = _proc_status_kib("VmRSS")
    c0, t0 = time.process_time(), time.perf_counter()
    step()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    hwm = _proc_status_kib("VmHWM")
    return Measurement(seconds, float(max(0, hwm - rss) * 1024), cpu)


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_")
PARTS = ("gemm", "tile_arithmetic", "other")


def self_cpu_parts(fn: Callable[[], object]) -> dict[str, float]:
    """Self CPU seconds of one call of ``fn`` under ``torch.profiler``, in the three `PARTS`: ``gemm``
    (the ops of `GEMM_OPS`), ``tile_arithmetic`` (compiled graphs: prefloss-torch's fused tile
    arithmetic when ``torch.compile`` runs it; eager tile arithmetic lands in ``other``) and ``other``.
    The profiler adds its own overhead: read the parts as shares of the same run."""
    with torch.profiler.profile() as prof:
        fn()
    out = dict.fromkeys(PARTS, 0.0)
    for e in prof.key_averages():
        kind = "gemm" if e.key in GEMM_OPS else "tile_arithmetic" if "CompiledFxGraph" in e.key else "other"
        out[kind] += e.self_cpu_time_total / 1e6
    return out


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
    "VmHWM - VmRSS of a fresh process per case "
    "(clear_refs reset before the step; glibc mmap threshold 64 KiB)"
)
MEMORY_METHOD_GPU = "torch.cuda.max_memory_allocated - memory_allocated before the step"
