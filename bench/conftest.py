"""pytest-benchmark suite for prefloss's ops (``pytest bench/ --benchmark-only``).

Separate from the default test run (``testpaths = ["tests"]``). Each benchmark checks its result
against the float64 reference (`prefloss.reference`) before timing, and records the step's peak
memory (CPU: ``VmHWM − VmRSS`` in this process; GPU: ``max_memory_allocated``) and the machine in
``extra_info``. Triton cases run only on a GPU (skipped with "no GPU" otherwise). The shape is
``BENCH_TOKENS`` / ``BENCH_HIDDEN`` / ``BENCH_VOCAB`` (defaults 2048 / 256 / 8192).
"""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config):
    # Fresh allocations go back to the OS on free, so the high-water mark sees each step's own peak.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def bench_shape() -> dict:
    return {
        "tokens": int(os.environ.get("BENCH_TOKENS", 2048)),
        "hidden": int(os.environ.get("BENCH_HIDDEN", 256)),
        "vocab": int(os.environ.get("BENCH_VOCAB", 8192)),
    }


@pytest.fixture(scope="session")
def machine(device) -> dict:
    from prefloss.benchmark.machine import describe

    return describe(str(device))
