"""``prefloss bench``: memory and speed of prefloss against the alternatives, on your shapes.

Every case (prefloss's losses, the authors-style full-logits implementation, Liger-Kernel's
chunked losses, TRL's chunked head, PyTorch's ``F.linear_cross_entropy``, the matmul floor) runs on
identical inputs, each in a fresh process. Before
anything is timed, the case's loss and gradients are checked against the float64 reference
(`prefloss.reference`); a case that disagrees is reported WRONG and not timed. ``--seeds`` runs
that check alone over several input seeds (`prefloss.benchmark.gate`); ``--floor-parts`` splits
each prefloss step against its floor; ``--max-tokens`` finds, per case, the most tokens per step
within a memory budget (`prefloss.benchmark.max_tokens`). See CONTRIBUTING.md ("Benchmarks").
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from prefloss.commands.cli_args import (
    int_list,
    nonnegative_float,
    positive_float,
    positive_int,
    random_seed,
    seed_list,
)

QUICK = {"seq_len": "128,512", "batch": "2", "hidden": "128", "vocab": "4096", "repeats": 2}
DEFAULTS = {"seq_len": "512,1024,2048,4096", "batch": "2", "hidden": "512", "vocab": "32000", "repeats": 3}


def _int_list(name: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(
            f"`--{name}` must be a comma-separated list of positive integers, got {text!r}."
        ) from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"`--{name}` must be a comma-separated list of positive integers, got {text!r}.")
    return values


DTYPE_NAMES = ("float32", "bfloat16", "float16")  # = prefloss.benchmark.inputs.DTYPES (a test checks)


def _device(text: str) -> str:
    if text in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options; every number is checked here, at parse time, before any case runs."""
    p = parser
    sizes = int_list(minimum=1, example="512,1024")
    for flag, what in (
        ("seq-len", "sequence lengths T"),
        ("batch", "pairs per batch B"),
        ("hidden", "hidden sizes H"),
        ("vocab", "vocabulary sizes V"),
    ):
        p.add_argument(
            f"--{flag}",
            type=sizes,
            help=f"{what}, comma-separated (default {DEFAULTS[flag.replace('-', '_')]})",
        )
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="input dtype (default float32)")
    p.add_argument(
        "--cases",
        action="append",
        help="case names or globs, comma-separated or repeated (default: all); see --list",
    )
    p.add_argument(
        "--repeats", type=positive_int, help=f"timed repeats per case (default {DEFAULTS['repeats']})"
    )
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=random_seed, default=0, help="input seed (default 0)")
    seeds.add_argument(
        "--seeds",
        type=seed_list,
        metavar="A-B|A,B,...",
        help="run only the correctness gate (no timing), in this process, on each of these input seeds "
        "(e.g. 0-9): per case and shape, the worst error / bound over the seeds; exit 1 if any fails",
    )
    p.add_argument(
        "--floor-parts",
        action="store_true",
        help="CPU only: also time each prefloss case against its floor by CPU time, and split its step "
        "into GEMMs, compiled tile arithmetic and the rest under torch.profiler (a second table)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        help="torch threads in every case process (default: torch's); e.g. --threads 1 under "
        "taskset -c 0 for steady CPU-time ratios on a shared machine",
    )
    p.add_argument(
        "--device", type=_device, default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N"
    )
    p.add_argument(
        "--mem-limit-gib",
        type=nonnegative_float,
        default=16.0,
        help="private-memory cap per case process on CPU; a case above it is reported OOM; 0: no cap "
        "(default 16)",
    )
    p.add_argument(
        "--timeout", type=positive_float, default=1800.0, help="seconds per case process (default 1800)"
    )
    p.add_argument(
        "--max-tokens",
        action="store_true",
        help="per case, the largest tokens per step (2B·T) whose forward+backward peak fits "
        "--mem-budget-gib, by bisection over T at one shape (--batch, --hidden, --vocab, --dtype; "
        "default B=1 pair, H=64, V=4096, float32), each case in its memory-capped process; "
        "plus prefloss plan's MODEL of the same figure on an H100 (docs/bench.md)",
    )
    p.add_argument(
        "--mem-budget-gib",
        type=positive_float,
        help="--max-tokens: the step's peak memory budget in GiB (default 0.0625)",
    )
    p.add_argument(
        "--no-gpu-model", action="store_true", help="--max-tokens: without prefloss plan's GPU MODEL"
    )
    p.add_argument(
        "--jobs",
        type=positive_int,
        help="--max-tokens: case processes searching at once (default: one per CPU core on CPU, each "
        "with cores/jobs torch threads unless --threads; 1 on a GPU). Each process measures its own "
        "peak, so running several at once changes the time taken, not the figures",
    )
    p.add_argument("--quick", action="store_true", help=f"small shapes, ~3 minutes on 2 CPU cores: {QUICK}")
    p.add_argument("--json", metavar="PATH", help="write the full results as JSON")
    p.add_argument("--plot", metavar="DIR", help="write PNG plots (memory and time vs each swept axis)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"`--device {device}` needs a CUDA GPU; none is available (use cpu or auto).")
        return device
    raise ValueError(f"`--device` must be auto, cpu, cuda or cuda:N, got {device!r}.")


def run(args: argparse.Namespace) -> int:
    from prefloss.benchmark import machine, report, runner
    from prefloss.benchmark.cases import CASES, select_cases
    from prefloss.benchmark.inputs import DTYPES
    from prefloss.benchmark.measure import MEMORY_METHOD_CPU, MEMORY_METHOD_GPU, cpu_peak_supported

    if args.list:
        for case in CASES.values():
            flags = " (GPU only)" if case.needs_gpu else " (only when named)" if case.explicit_only else ""
            print(f"{case.name}{flags}")
        return 0
    try:
        _check_max_tokens_args(args)
        if args.max_tokens:
            from prefloss.benchmark.max_tokens import DEFAULT_CASES

            args.cases = args.cases or [",".join(DEFAULT_CASES)]
        base = QUICK if args.quick else DEFAULTS
        lists = {
            n: getattr(args, n) or _int_list(n.replace("_", "-"), base[n])
            for n in ("seq_len", "batch", "hidden", "vocab")
        }
        repeats = args.repeats if args.repeats is not None else base["repeats"]
        if repeats < 1:
            raise ValueError(f"`--repeats` must be >= 1, got {repeats}.")
        if args.dtype not in DTYPES:
            raise ValueError(f"`--dtype` must be one of {sorted(DTYPES)}, got {args.dtype!r}.")
        patterns = [p.strip() for item in (args.cases or []) for p in item.split(",") if p.strip()]
        cases = select_cases(patterns)
        for floor in dict.fromkeys(c.floor for c in cases if c.loss):
            if CASES[floor] not in cases:
                cases.append(CASES[floor])  # every report has the floors its cases are timed against
        device = _resolve_device(args.device)
        if args.floor_parts and device != "cpu":
            raise ValueError("`--floor-parts` profiles CPU time; use it with `--device cpu`.")
        if args.seeds is not None:
            for flag, given in (("--floor-parts", args.floor_parts), ("--plot", args.plot)):
                if given:
                    raise ValueError(f"`--seeds` runs the correctness gate only, no timing: no `{flag}`.")
    except ValueError as exc:
        print(f"prefloss bench: error: {exc}", file=sys.stderr)
        return 2
    if args.seeds is not None:
        return _run_gate(args, cases, lists, device)
    if args.max_tokens:
        return _run_max_tokens(args, device)
    if device == "cpu" and not cpu_peak_supported():
        print("prefloss bench: error: CPU peak memory needs Linux /proc/self/clear_refs.", file=sys.stderr)
        return 2

    shapes = runner.shape_grid(lists["batch"], lists["seq_len"], lists["hidden"], lists["vocab"], args.dtype)
    config = runner.Config(
        cases,
        shapes,
        repeats,
        args.seed,
        device,
        args.mem_limit_gib,
        args.timeout,
        threads=args.threads,
        floor_parts=args.floor_parts,
    )
    t0 = time.perf_counter()
    results = runner.run(config, progress=not args.no_progress)
    document = {
        "machine": machine.describe(device),
        "config": {
            "shapes": [s.to_dict() for s in shapes],
            "cases": [c.name for c in cases],
            "repeats": repeats,
            "seed": args.seed,
            "quick": bool(args.quick),
            "mem_limit_gib": args.mem_limit_gib,
            **({"threads": args.threads} if args.threads else {}),
            **({"floor_parts": True} if args.floor_parts else {}),
        },
        "memory_method": MEMORY_METHOD_GPU if device.startswith("cuda") else MEMORY_METHOD_CPU,
        "gpu_note": None
        if device.startswith("cuda")
        else "no GPU: Triton cases skipped; CPU timings and memory",
        "results": results,
        "wall_s": time.perf_counter() - t0,
    }
    _print_and_save(report.table(document), document, args.json)
    if args.plot:
        for path in report.write_plots(document, args.plot):
            print(f"plot: {path}")
    failed = [r for r in results if r["status"] in ("wrong", "error")]
    return 1 if failed else 0


def _check_max_tokens_args(args: argparse.Namespace) -> None:
    """``--max-tokens`` searches T at one shape: no list, no option of the timed sweep."""
    if not args.max_tokens:
        given_flags = (
            ("--mem-budget-gib", args.mem_budget_gib),
            ("--no-gpu-model", args.no_gpu_model),
            ("--jobs", args.jobs),
        )
        for flag, given in given_flags:
            if given:
                raise ValueError(f"`{flag}` goes with `--max-tokens`.")
        return
    refused = {
        "--seq-len": args.seq_len,
        "--seeds": args.seeds,
        "--quick": args.quick,
        "--repeats": args.repeats,
        "--floor-parts": args.floor_parts,
    }
    for flag, given in refused.items():
        if given:
            what = "T is what it searches" if flag == "--seq-len" else "it times nothing"
            raise ValueError(f"`--max-tokens` takes no `{flag}` ({what}).")
    for flag in ("batch", "hidden", "vocab"):
        given = getattr(args, flag)
        if given and len(given) != 1:
            raise ValueError(
                f"`--max-tokens` searches at one shape: `--{flag}` takes one value, got {given}."
            )


def _run_max_tokens(args: argparse.Namespace, device: str) -> int:
    """``--max-tokens``: per case the largest tokens per step within the budget, then the GPU MODEL."""
    from prefloss.benchmark import machine, max_tokens
    from prefloss.benchmark.cases import select_cases
    from prefloss.benchmark.inputs import Shape
    from prefloss.benchmark.measure import cpu_peak_supported

    if device == "cpu" and not cpu_peak_supported():
        print("prefloss bench: error: CPU peak memory needs Linux /proc/self/clear_refs.", file=sys.stderr)
        return 2
    patterns = [p.strip() for item in args.cases for p in item.split(",") if p.strip()]
    has_gpu = device.startswith("cuda")
    cases = [c for c in select_cases(patterns) if c.loss and (has_gpu or not c.needs_gpu)]
    if not cases:
        print("prefloss bench: error: `--max-tokens`: the selected cases have no loss step.", file=sys.stderr)
        return 2
    d = max_tokens.DEFAULT_SHAPE
    base = Shape(
        batch=(args.batch or [d["batch"]])[0],
        seq_len=0,
        hidden=(args.hidden or [d["hidden"]])[0],
        vocab=(args.vocab or [d["vocab"]])[0],
        dtype=args.dtype,
    )
    budget = args.mem_budget_gib or max_tokens.DEFAULT_BUDGET_GIB
    jobs, threads = max_tokens.parallel_plan(device, len(cases), args.jobs, args.threads)
    t0 = time.perf_counter()
    results = max_tokens.run(
        cases,
        base,
        budget_gib=budget,
        seed=args.seed,
        device=device,
        mem_limit_gib=args.mem_limit_gib,
        timeout_s=args.timeout,
        threads=threads,
        jobs=jobs,
        start=max_tokens.DEFAULT_START,
        cap=max_tokens.DEFAULT_CAP,
        resolution=max_tokens.DEFAULT_RESOLUTION,
        progress=not args.no_progress,
    )
    searched_s = time.perf_counter() - t0
    shape = base.to_dict()
    del shape["seq_len"]
    document = {
        "machine": machine.describe(device),
        "config": {
            "mode": "max_tokens",
            "shape": shape,
            "budget_gib": budget,
            "cases": [c.name for c in cases],
            "seed": args.seed,
            "resolution": max_tokens.DEFAULT_RESOLUTION,
            "seq_len_quantum": max_tokens.QUANTUM,
            "mem_limit_gib": args.mem_limit_gib,
            "jobs": jobs,
            "threads": threads,
        },
        "memory_method": "the step's own peak as in the timed bench (second of two steps at each T)",
        "results": results,
        "search_s": searched_s,
    }
    if not args.no_gpu_model:
        document["gpu_model"] = max_tokens.gpu_model()
    document["wall_s"] = time.perf_counter() - t0
    _print_and_save(max_tokens.table(document), document, args.json)
    if args.plot:
        print(f"plot: {max_tokens.write_plot(document, os.path.join(args.plot, 'max_tokens.png'))}")
    return 1 if any(r["status"] == "error" for r in results) else 0


def _run_gate(args: argparse.Namespace, cases: list, lists: dict, device: str) -> int:
    """``--seeds``: the correctness gate of every selected loss case (floors have none) over the seeds."""
    import torch

    from prefloss.benchmark import gate, machine, runner

    if args.threads:
        torch.set_num_threads(args.threads)
    has_gpu = device.startswith("cuda")
    cases = [c for c in cases if c.loss and (has_gpu or not c.needs_gpu)]
    if not cases:
        print("prefloss bench: error: `--seeds`: the selected cases have no loss to check.", file=sys.stderr)
        return 2
    shapes = runner.shape_grid(lists["batch"], lists["seq_len"], lists["hidden"], lists["vocab"], args.dtype)
    t0 = time.perf_counter()
    records = gate.run(cases, shapes, args.seeds, device, progress=not args.no_progress)
    document = {
        "machine": machine.describe(device),
        "config": {
            "mode": "gate",
            "shapes": [s.to_dict() for s in shapes],
            "cases": [c.name for c in cases],
            "seeds": args.seeds,
            "quick": bool(args.quick),
            **({"threads": args.threads} if args.threads else {}),
        },
        "summary": gate.summary(records),
        "records": records,
        "wall_s": time.perf_counter() - t0,
    }
    _print_and_save(gate.table(document), document, args.json)
    return 1 if any(r["status"] != "ok" for r in records) else 0


def _print_and_save(table: str, document: dict, json_path: str | None) -> None:
    """Print a run's table and wall time; write its JSON document when asked for."""
    from prefloss.benchmark import report

    print(table)
    print(f"\nwall time {document['wall_s']:.1f} s")
    if json_path:
        report.write_json(document, json_path)
        print(f"JSON: {json_path}")
