"""The bench's case processes: one fresh Python process per case (or the float64 reference), run
from a scratch directory so the repository's top-level ``kernels/`` folder is never importable as a
bare ``kernels``, its results read back line by line (`prefloss.benchmark.protocol`). Used by the
timed sweep (`prefloss.benchmark.runner`) and the ``--max-tokens`` search
(`prefloss.benchmark.max_tokens`); it imports neither, nor the worker, which is started by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading

from prefloss.benchmark.measure import MALLOC_ENV
from prefloss.benchmark.protocol import RESULT_MARK

WORKER = "from prefloss.benchmark.worker import main; main()"


def spawn_worker(spec: dict, scratch: str, timeout_s: float, on_result) -> list[dict]:
    """Runs one fresh worker process (`prefloss.benchmark.worker`) over ``spec["shapes"]`` in the
    directory ``scratch`` and returns one result dict per shape, in order; calls ``on_result`` as
    each finishes. The process is killed after ``timeout_s`` per shape; a shape it did not report
    gets ``{"status": "error", "error": why}``."""
    env = dict(os.environ, **MALLOC_ENV)
    env.pop("TRITON_INTERPRET", None)  # Triton cases run only on real GPUs
    n = len(spec["shapes"])
    cmd = [sys.executable, "-c", WORKER, json.dumps(spec)]
    results: list[dict | None] = [None] * n
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(cmd, cwd=scratch, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        timer = threading.Timer(timeout_s * n, proc.kill)
        timer.start()
        try:
            for line in proc.stdout:
                if line.startswith(RESULT_MARK):
                    res = json.loads(line[len(RESULT_MARK) :])
                    results[res.pop("index")] = res
                    on_result()
            proc.wait()
        finally:
            timer.cancel()
        err.seek(0)
        stderr = err.read().strip()[-1500:]
    if any(r is None for r in results):
        if proc.returncode is not None and proc.returncode < 0:
            limit = timeout_s * n
            why = f"worker killed by signal {-proc.returncode} (timeout of {limit:.0f} s, or out of memory)"
        else:
            why = f"worker exit code {proc.returncode}"
        for i, r in enumerate(results):
            if r is None:
                results[i] = {"status": "error", "error": f"{why}: {stderr}"}
                on_result()
    return results
