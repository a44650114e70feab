"""Run the benchmark's correctness gate (no timing) over seeds and shapes; print how close each case
comes to its bounds.

The gate is the one `prefloss bench` applies before timing a case (`prefloss.benchmark.worker.
check_step` against `prefloss.benchmark.oracle.ground_truth`). Per shape, seed and case the table
gives the largest ``max_abs_err / bound`` over everything judged (loss, gradients, the op's tokens
and per-row sums); a case passes when that is ≤ 1.

    python scripts/gate_over_seeds.py --sweep quick --seeds 0-9
    python scripts/gate_over_seeds.py --sweep default --seeds 0-9 --cases prefloss-torch --json out.json
    python scripts/gate_over_seeds.py --sweep default --seq-len 512 --seeds 0-2

Run it with the working directory outside the repository root (see CONTRIBUTING.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from prefloss.benchmark import DEFAULTS, QUICK
from prefloss.benchmark.cases import CASES, HYPERPARAMS
from prefloss.benchmark.inputs import Shape, make_inputs
from prefloss.benchmark.oracle import ground_truth
from prefloss.benchmark.worker import check_step

SWEEPS = {"quick": QUICK, "default": DEFAULTS}


def _seeds(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def _shapes(sweep: dict) -> list[Shape]:
    ints = lambda key: [int(v) for v in str(sweep[key]).split(",")]
    return [
        Shape(batch=b, seq_len=t, hidden=h, vocab=v)
        for b in ints("batch")
        for t in ints("seq_len")
        for h in ints("hidden")
        for v in ints("vocab")
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", choices=sorted(SWEEPS), default="quick", help="the bench's shape set")
    p.add_argument("--seeds", default="0-9", help="seeds, 'a-b' or comma-separated (default 0-9)")
    p.add_argument(
        "--cases",
        default="prefloss-torch,authors,liger",
        help="comma-separated case-name prefixes (default: prefloss-torch,authors,liger)",
    )
    p.add_argument("--seq-len", help="T values to use instead of the sweep's, comma-separated")
    p.add_argument("--json", help="write every record here")
    args = p.parse_args(argv)
    prefixes = args.cases.split(",")
    cases = [c for c in CASES.values() if c.loss and not c.explicit_only and not c.needs_gpu]
    cases = [c for c in cases if any(c.name.startswith(pre) for pre in prefixes)]
    if not cases:
        p.error(f"--cases {args.cases!r} selects no CPU case; names: {sorted(CASES)}")
    losses = sorted({c.loss for c in cases})
    records, failed = [], 0
    print(f"{'shape':<34} {'seed':>4} {'case':<28} {'worst err/bound':>16}  quantity")
    sweep = dict(SWEEPS[args.sweep], **({"seq_len": args.seq_len} if args.seq_len else {}))
    for shape in _shapes(sweep):
        for seed in _seeds(args.seeds):
            t0 = time.perf_counter()
            x = make_inputs(shape, seed=seed)
            truth = ground_truth(
                {n: HYPERPARAMS[n] for n in losses},
                x.hidden,
                x.weight,
                x.labels,
                ref_hidden=x.ref_hidden,
                ref_weight=x.ref_weight,
            )
            for case in cases:
                x = make_inputs(shape, seed=seed)
                result = check_step(case, case.build(x), x, truth)
                parts = {k: v for k, v in result.items() if isinstance(v, dict) and "bound" in v}
                worst = max(parts, key=lambda k: parts[k]["max_abs_err"] / max(parts[k]["bound"], 1e-300))
                ratio = parts[worst]["max_abs_err"] / max(parts[worst]["bound"], 1e-300)
                failed += not result["passed"]
                mark = "" if result["passed"] else "  FAILED"
                print(
                    f"{shape.label():<34} {seed:>4} {case.name:<28} {ratio:>16.3f}  {worst}{mark}", flush=True
                )
                records.append(
                    {
                        "shape": shape.to_dict(),
                        "seed": seed,
                        "case": case.name,
                        "worst": worst,
                        "ratio": ratio,
                        "passed": result["passed"],
                        "check": result,
                    }
                )
            print(f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    print(f"{len(records) - failed} of {len(records)} passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
