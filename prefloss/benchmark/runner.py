"""Runs the selected cases over the shapes, each in a fresh process, and derives the ratios."""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
from dataclasses import dataclass

from prefloss.benchmark.cases import Case
from prefloss.benchmark.inputs import Shape, counted_tokens
from prefloss.benchmark.spawn import spawn_worker


@dataclass
class Config:
    cases: list[Case]
    shapes: list[Shape]
    repeats: int
    seed: int
    device: str
    mem_limit_gib: float | None
    timeout_s: float
    threads: int | None = None  # torch threads in every worker process (None: torch's default)
    floor_parts: bool = False  # prefloss cases: also split the step against its floor (--floor-parts)


def shape_grid(batches, seq_lens, hiddens, vocabs, dtype) -> list[Shape]:
    return [
        Shape(batch=b, seq_len=t, hidden=h, vocab=v, dtype=dtype)
        for b, v, h, t in itertools.product(batches, vocabs, hiddens, seq_lens)
    ]


def _row(case: Case, shape: Shape) -> dict:
    return {
        "shape": shape.to_dict(),
        "counted_tokens": counted_tokens(shape),
        "case": case.name,
        "method": case.method,
        "loss": case.loss,
        "note": case.note,
        "floor_case": case.floor if case.loss is not None else None,
    }


def _run_here(spec: dict, scratch: str, timeout_s: float, on_result) -> list[dict]:
    """`spawn_worker` without the process: every shape of ``spec`` in this one (no memory cap, no timeout).

    The objects alive now are frozen out of the garbage collector meanwhile (`gc.freeze`): the
    worker's full collections between steps would otherwise traverse everything this process has
    imported (about a second each in a test process)."""
    import gc

    from prefloss.benchmark.worker import run_shape

    results = []
    gc.freeze()
    try:
        for i, shape in enumerate(spec["shapes"]):
            results.append(run_shape(spec, i, shape))
            on_result()
    finally:
        gc.unfreeze()
    return results


def run(config: Config, progress: bool = True, *, in_process: bool = False) -> list[dict]:
    """Float64 reference over all shapes (one process), then one fresh process per case.

    ``in_process=True`` runs the reference and every case in this process instead, one after
    another, with the same records and ratios: a quick check that every case passes the gate and
    yields well-formed rows (the tests'), not a measurement (a case's peak and time then depend on
    what ran before it in the process, and ``mem_limit_gib`` and ``timeout_s`` are not applied)."""
    from tqdm import tqdm

    spawn = _run_here if in_process else spawn_worker

    has_gpu = config.device.startswith("cuda")
    runnable = [c for c in config.cases if has_gpu or not c.needs_gpu]
    losses = sorted({c.loss for c in runnable if c.loss})
    shapes = [s.to_dict() for s in config.shapes]
    n_shapes = len(shapes)
    bar = tqdm(
        total=n_shapes * (len(runnable) + (1 if losses else 0)),
        disable=not progress,
        unit="job",
        dynamic_ncols=True,
        file=sys.stderr,
    )
    common = {
        "shapes": shapes,
        "seed": config.seed,
        "device": config.device,
        "mem_limit_gib": config.mem_limit_gib,
        "threads": config.threads,
        "floor_parts": config.floor_parts,
    }
    by_case: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="prefloss-bench-") as scratch:
        expected: list[str | None] = [None] * n_shapes
        ref_results: list[dict] = []
        if losses:
            bar.set_description("float64 reference")
            paths = [os.path.join(scratch, f"expected-{i}.pt") for i in range(n_shapes)]
            spec = {**common, "mode": "reference", "losses": losses, "paths": paths}
            ref_results = spawn(spec, scratch, config.timeout_s, lambda: bar.update(1))
            expected = [r.get("path") if r["status"] == "ok" else None for r in ref_results]
        for case in config.cases:
            if case.needs_gpu and not has_gpu:
                by_case[case.name] = [
                    {"status": "skipped", "error": "no GPU: Triton cases run only on CUDA"}
                ] * n_shapes
                continue
            bar.set_description(case.name)
            spec = {
                **common,
                "mode": "case",
                "case": case.name,
                "repeats": config.repeats,
                "expected": expected,
            }
            if case.loss and all(e is None for e in expected):
                why = ref_results[0].get("error") if ref_results else "?"
                by_case[case.name] = [{"status": "error", "error": f"no float64 reference: {why}"}] * n_shapes
                bar.update(n_shapes)
                continue
            by_case[case.name] = spawn(spec, scratch, config.timeout_s, lambda: bar.update(1))
    bar.close()
    results = []
    for i, shape in enumerate(config.shapes):
        for case in config.cases:
            res = dict(by_case[case.name][i])
            if case.loss and res.get("status") == "error" and expected[i] is None and ref_results:
                res["error"] = f"no float64 reference: {ref_results[i].get('error')}"
            results.append({**_row(case, shape), **res})
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
        floors = {r["case"]: r for r in ok if r["method"] == "floor"}
        for r in ok:
            floor = floors.get(r.get("floor_case") or "floor")
            r["peak_beyond_grads_mib"] = r["peak_mib"]["max"] - r.get("grads_mib", 0.0)
            ratios = {}
            t = r["time_s"]["median"]
            if r.get("interleaved_floor"):
                # timed alternately with the floor in the case's own process (see worker)
                ratios["time_to_floor"] = r["interleaved_floor"]["ratio_median"]
                ratios["time_to_floor_method"] = "interleaved"
                if floor is not None:
                    ratios["time_to_floor_separate"] = t / floor["time_s"]["median"]
            elif floor is not None and r["method"] != "floor":
                ratios["time_to_floor"] = t / floor["time_s"]["median"]
                ratios["time_to_floor_method"] = "separate"
            if floor is not None and r["method"] != "floor":
                # fastest repeat over fastest repeat: the least disturbed by other processes
                ratios["min_time_to_floor"] = r["time_s"]["min"] / floor["time_s"]["min"]
                if r.get("cpu_time_s") and floor.get("cpu_time_s"):
                    ratios["cpu_time_to_floor"] = r["cpu_time_s"]["median"] / floor["cpu_time_s"]["median"]
            others = [
                o
                for o in ok
                if o["loss"] == r["loss"]
                and o["loss"]
                and o["method"] != r["method"]
                and o["method"] != "selftest"
            ]
            if others and r["method"] != "selftest":
                best_t = min(others, key=lambda o: o["time_s"]["median"])
                best_m = min(others, key=lambda o: o["peak_mib"]["max"])
                ratios["time_to_best_other"] = t / best_t["time_s"]["median"]
                ratios["best_other_time"] = best_t["case"]
                best_peak = best_m["peak_mib"]["max"]
                ratios["memory_to_best_other"] = r["peak_mib"]["max"] / best_peak if best_peak > 0 else None
                ratios["best_other_memory"] = best_m["case"]
            r["ratios"] = ratios
