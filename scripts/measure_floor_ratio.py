"""Bench cases timed against their GEMM floor, alternately in one process, by CPU time and wall time.

`prefloss bench` takes the same ratio from wall time with torch's threads. On a shared VM (CPU
steal, other jobs) wall time drifts by tens of percent within a minute; the process's CPU time with
one thread, pinned to one core (``taskset -c 0``), is the steadier figure. Each case is built by the
bench (`prefloss.benchmark.cases.CASES`) and timed against its own floor (``floor``: 4 GEMMs of
``N_counted·H·V``; ``floor-frozen``: 3), step and floor alternating, after one warm-up of each
(which also compiles the tile arithmetic).

Prints the machine, then one JSON line per (case, T) with the medians and the median of the
per-pair ratios (and the ratio of the two minima: steal and other jobs only ever add time), then a
Markdown table. Usage (outside the repository root, see CONTRIBUTING)::

    taskset -c 0 python scripts/measure_floor_ratio.py --threads 1 --seq-len 512,1024,2048,4096 \\
        --cases prefloss-torch/epsilon_dpo,prefloss-torch-frozen/epsilon_dpo,prefloss-torch-frozen/dpo

With ``--parts`` each call runs under torch.profiler instead, and the table splits the step into its
GEMMs, its compiled tile arithmetic and the rest, each over the floor's time in the same pair: where
the distance to the floor comes from.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from prefloss.benchmark.cases import CASES
from prefloss.benchmark.inputs import Shape, make_inputs
from prefloss.benchmark.machine import describe, one_line


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_")


def parts(fn) -> dict[str, float]:
    """Self CPU seconds of one call of ``fn`` under torch.profiler, in three parts: ``gemm`` (the
    ops of `GEMM_OPS`), ``tile_arithmetic`` (compiled graphs: the fused tile arithmetic) and
    ``other``. The profiler adds its own overhead; read the parts as shares of the same run."""
    with torch.profiler.profile() as prof:
        fn()
    out = dict.fromkeys(("gemm", "tile_arithmetic", "other"), 0.0)
    for e in prof.key_averages():
        kind = "gemm" if e.key in GEMM_OPS else "tile_arithmetic" if "CompiledFxGraph" in e.key else "other"
        out[kind] += e.self_cpu_time_total / 1e6
    return out


def warmed_up(case, shape: Shape, seed: int):
    """``(step, floor)`` callables of ``case`` on fresh inputs, each run once (which also compiles the
    tile arithmetic); the step clears the gradients first."""
    x = make_inputs(shape, seed=seed)
    step, floor = case.build(x), CASES[case.floor].build(x)

    def one_step():
        x.hidden.grad = None
        x.weight.grad = None
        step()

    one_step(), floor()
    return one_step, floor


def measure_parts(case_name: str, shape: Shape, repeats: int, seed: int) -> dict:
    """Where a step's time goes, in units of its floor: step and floor alternately under the
    profiler ``repeats`` times; per pair, each part of the step over the floor's total; medians."""
    case = CASES[case_name]
    one_step, floor = warmed_up(case, shape, seed)
    shares = []
    for _ in range(repeats):
        s, f = parts(one_step), parts(floor)
        total = sum(f.values())
        shares.append({k: v / total for k, v in s.items()})
    med = {k: round(statistics.median(p[k] for p in shares), 3) for k in shares[0]}
    return {
        "case": case_name,
        "floor": case.floor,
        "shape": shape.label(),
        "threads": torch.get_num_threads(),
        "parts_to_floor": med,
        "step_to_floor": round(statistics.median(sum(p.values()) for p in shares), 3),
        "all": [{k: round(v, 3) for k, v in p.items()} for p in shares],
        "load": [round(v, 2) for v in os.getloadavg()],
    }


def measure(case_name: str, shape: Shape, repeats: int, seed: int) -> dict:
    """Step and floor of one case at one shape, alternately ``repeats`` times."""
    case = CASES[case_name]
    one_step, floor = warmed_up(case, shape, seed)
    steps, floors = [], []
    for _ in range(repeats):
        steps.append(timed(one_step))
        floors.append(timed(floor))
    wall = [s[0] / f[0] for s, f in zip(steps, floors, strict=True)]
    cpu = [s[1] / f[1] for s, f in zip(steps, floors, strict=True)]
    return {
        "case": case_name,
        "floor": case.floor,
        "shape": shape.label(),
        "threads": torch.get_num_threads(),
        "step_cpu_s": round(statistics.median(s[1] for s in steps), 3),
        "floor_cpu_s": round(statistics.median(f[1] for f in floors), 3),
        "cpu_ratio": round(statistics.median(cpu), 3),
        "cpu_min_ratio": round(min(s[1] for s in steps) / min(f[1] for f in floors), 3),
        "step_cpu_all": [round(s[1], 3) for s in steps],
        "floor_cpu_all": [round(f[1], 3) for f in floors],
        "cpu_ratios": [round(r, 3) for r in cpu],
        "wall_ratio": round(statistics.median(wall), 3),
        "wall_ratios": [round(r, 3) for r in wall],
        "load": [round(v, 2) for v in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="prefloss-torch/epsilon_dpo,prefloss-torch-frozen/epsilon_dpo")
    parser.add_argument("--seq-len", default="1024", help="comma-separated T")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--parts",
        action="store_true",
        help="profile instead: the step's GEMMs, tile arithmetic and the rest, each over the floor",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES or CASES[c].loss is None]
    if unknown:
        parser.error(
            f"--cases: {unknown} are not loss cases; valid: {[n for n, c in CASES.items() if c.loss]}"
        )
    info = describe("cpu")
    print(json.dumps({"machine": one_line(info)}), flush=True)
    rows = []
    for t in (int(v) for v in args.seq_len.split(",")):
        for name in cases:
            shape = Shape(args.batch, t, args.hidden, args.vocab)
            rows.append((measure_parts if args.parts else measure)(name, shape, args.repeats, args.seed))
            print(json.dumps(rows[-1]), flush=True)
    if args.parts:
        print("\n| case | shape | floor | step × floor | GEMMs | tile arithmetic | other |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            p = r["parts_to_floor"]
            print(
                f"| {r['case']} | {r['shape']} | {r['floor']} | {r['step_to_floor']} | {p['gemm']} "
                f"| {p['tile_arithmetic']} | {p['other']} |"
            )
        return
    print("\n| case | shape | floor | CPU s (step / floor) | × floor, CPU time | min / min | × floor, wall |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['shape']} | {r['floor']} | {r['step_cpu_s']} / {r['floor_cpu_s']} "
            f"| {r['cpu_ratio']} | {r['cpu_min_ratio']} | {r['wall_ratio']} |"
        )


if __name__ == "__main__":
    main()
