"""Runs the selected cases over the shapes, each in a fresh process, and derives the ratios."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from prefloss.benchmark.cases import Case
from prefloss.benchmark.inputs import Shape, counted_tokens
from prefloss.benchmark.measure import MALLOC_ENV
from prefloss.benchmark.worker import RESULT_MARK

WORKER = "from prefloss.benchmark.worker import main; main()"


@dataclass
class Config:
    cases: list[Case]
    shapes: list[Shape]
    repeats: int
    seed: int
    device: str
    mem_limit_gib: float | None
    timeout_s: float


def shape_grid(batches, seq_lens, hiddens, vocabs, dtype) -> list[Shape]:
    return [
        Shape(batch=b, seq_len=t, hidden=h, vocab=v, dtype=dtype)
        for b, v, h, t in itertools.product(batches, vocabs, hiddens, seq_lens)
    ]


def _spawn(spec: dict, scratch: str, timeout_s: float) -> dict:
    env = dict(os.environ, **MALLOC_ENV)
    env.pop("TRITON_INTERPRET", None)  # Triton cases run only on real GPUs
    cmd = [sys.executable, "-c", WORKER, json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    why = "killed (out of memory?)" if proc.returncode < 0 else f"exit code {proc.returncode}"
    return {"status": "error", "error": f"worker {why}: {proc.stderr.strip()[-1500:]}"}


def _skipped(case: Case, shape: Shape, why: str) -> dict:
    return {**_row(case, shape), "status": "skipped", "error": why}


def _row(case: Case, shape: Shape) -> dict:
    return {
        "shape": shape.to_dict(),
        "counted_tokens": counted_tokens(shape),
        "case": case.name,
        "method": case.method,
        "loss": case.loss,
        "note": case.note,
    }


def run(config: Config, progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    has_gpu = config.device.startswith("cuda")
    runnable = [c for c in config.cases if has_gpu or not c.needs_gpu]
    losses = sorted({c.loss for c in runnable if c.loss})
    n_jobs = len(config.shapes) * (len(runnable) + (1 if losses else 0))
    results: list[dict] = []
    bar = tqdm(total=n_jobs, disable=not progress, unit="job", dynamic_ncols=True, file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="prefloss-bench-") as scratch:
        for i, shape in enumerate(config.shapes):
            common = {"shape": shape.to_dict(), "seed": config.seed, "device": config.device}
            common["mem_limit_gib"] = config.mem_limit_gib
            expected = None
            ref_info = None
            if losses:
                bar.set_description(f"{shape.label()} | float64 reference")
                path = os.path.join(scratch, f"expected-{i}.pt")
                ref_info = _spawn(
                    {**common, "mode": "reference", "losses": losses, "path": path}, scratch, config.timeout_s
                )
                expected = path if ref_info.get("status") == "ok" else None
                bar.update(1)
            for case in config.cases:
                if case.needs_gpu and not has_gpu:
                    results.append(_skipped(case, shape, "no GPU: Triton cases run only on CUDA devices"))
                    continue
                bar.set_description(f"{shape.label()} | {case.name}")
                row = _row(case, shape)
                if case.loss and expected is None:
                    res = {"status": "error", "error": f"no float64 reference: {ref_info.get('error')}"}
                else:
                    spec = {**common, "mode": "case", "case": case.name, "repeats": config.repeats}
                    spec["expected"] = expected
                    res = _spawn(spec, scratch, config.timeout_s)
                results.append({**row, **res})
                bar.update(1)
            if expected:
                os.remove(expected)
    bar.close()
    add_ratios(results)
    return results


def _key(shape: dict) -> tuple:
    return tuple(sorted(shape.items()))


def add_ratios(results: list[dict]) -> None:
    """Time relative to the floor; time and memory relative to the best other method for that loss."""
    by_shape: dict[tuple, list[dict]] = {}
    for r in results:
        by_shape.setdefault(_key(r["shape"]), []).append(r)
    for rows in by_shape.values():
        ok = [r for r in rows if r["status"] == "ok"]
        floor = next((r for r in ok if r["method"] == "floor"), None)
        for r in ok:
            ratios = {}
            t = r["time_s"]["median"]
            if floor is not None and r is not floor:
                ratios["time_to_floor"] = t / floor["time_s"]["median"]
            others = [
                o
                for o in ok
                if o["loss"] == r["loss"] and o["loss"] and o["method"] != r["method"] and o["method"] != "selftest"
            ]
            if others and r["method"] != "selftest":
                best_t = min(others, key=lambda o: o["time_s"]["median"])
                best_m = min(others, key=lambda o: o["peak_mib"]["max"])
                ratios["time_to_best_other"] = t / best_t["time_s"]["median"]
                ratios["best_other_time"] = best_t["case"]
                if best_m["peak_mib"]["max"] > 0:
                    ratios["memory_to_best_other"] = r["peak_mib"]["max"] / best_m["peak_mib"]["max"]
                ratios["best_other_memory"] = best_m["case"]
            r["ratios"] = ratios


