"""Entry point of the benchmark's fresh processes (one per case, one for the float64 reference).

The parent passes a JSON spec as ``argv[1]`` (a case, or the float64 reference, and a list of
shapes); each shape's result is printed as one JSON line prefixed with `RESULT_MARK`. One process
per case serves all its shapes: inputs are freed between shapes and, with glibc's mmap threshold
fixed (see `prefloss.benchmark.measure`), their memory goes back to the OS.

The parent runs ``python -c "from prefloss.benchmark.worker import main; main()" SPEC`` from
a scratch directory, so the repository's top-level ``kernels/`` folder never lands on ``sys.path``.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import time
import traceback

from prefloss.benchmark.protocol import RESULT_MARK, is_oom


def _limit_memory(gib: float | None) -> None:
    """Cap the process's private memory (RLIMIT_DATA) so an oversized case fails alone, cleanly."""
    if not gib:
        return
    from prefloss.benchmark.measure import _proc_status_kib

    now = _proc_status_kib("VmData") * 1024
    limit = now + int(gib * 1024**3)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def _reference(spec: dict, shape_dict: dict, path: str) -> dict:
    import torch

    from prefloss.benchmark.cases import HYPERPARAMS
    from prefloss.benchmark.inputs import Shape, make_inputs
    from prefloss.benchmark.oracle import ground_truth

    shape = Shape(**shape_dict)
    x = make_inputs(shape, seed=spec["seed"], device=spec["device"])
    t0 = time.perf_counter()
    truth = ground_truth(
        {n: HYPERPARAMS[n] for n in spec["losses"]},
        x.hidden,
        x.weight,
        x.labels,
        ref_hidden=x.ref_hidden,
        ref_weight=x.ref_weight,
    )
    state = truth.to_state()
    torch.save(_to_cpu(state), path)
    return {"status": "ok", "seconds": time.perf_counter() - t0, "path": path}


def _to_cpu(obj):
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj.cpu()


def check_step(case, step, x, truth) -> dict:
    """Runs the warm-up step and judges it, and the op's tokens where the case has them.

    Judged against `prefloss.benchmark.oracle.GroundTruth` with the bounds of `prefloss.testing`:
    the loss and its gradients within the float64 loss's sensitivity to errors of plain PyTorch's
    size; the op's per-token values and per-row sums within ``ERROR_MARGIN`` times plain PyTorch's
    error at the same dtype. Returns the check's JSON record (``passed``, one entry per quantity,
    ``detail`` naming what failed).
    """
    from prefloss.benchmark.oracle import judge

    value = step()
    if case.loss is None:
        return {"passed": True, "skipped": "no loss"}
    got = {
        "loss": value.detach().reshape(()).float().cpu(),
        "grad_hidden": _grad(x.hidden).cpu(),
    }
    if not case.frozen_head:
        got["grad_weight"] = _grad(x.weight).cpu()
    elif x.weight.grad is not None:
        raise AssertionError(f"{case.name}: the head is frozen but its weight received a gradient")
    if case.tokens is not None:
        tok = case.tokens(x)
        for kind in ("policy", "ref", "minus", "plus"):
            values = getattr(tok, kind)
            if values is not None and kind in truth.tokens:
                got[f"{kind} tokens"] = values.cpu()
                got[f"{kind} sums"] = values.sum(-1).cpu()  # in the op's dtype, as its losses sum
    parts = judge(truth, case.loss, got)
    return {
        "passed": all(c.passed for c in parts.values()),
        **{
            k: {
                "max_abs_err": c.max_abs_err,
                "bound": c.bound,
                "rms_ratio": c.rms_ratio,
                "worst_index": list(c.worst_index),
                "passed": c.passed,
            }
            for k, c in parts.items()
        },
        "detail": "; ".join(c.describe(k) for k, c in parts.items() if not c.passed),
    }


def _check(case, step, x, expected: str | None) -> dict:
    """`check_step` against the truth the reference process saved at ``expected``."""
    import torch

    from prefloss.benchmark.oracle import GroundTruth

    if case.loss is None:
        step()
        return {"passed": True, "skipped": "no loss"}
    truth = GroundTruth.from_state(torch.load(expected, weights_only=True, mmap=True))
    result = check_step(case, step, x, truth)
    del truth
    return result


def _grad(t):
    import torch

    return t.grad if t.grad is not None else torch.zeros_like(t)


def _case(spec: dict, shape_dict: dict, i: int) -> dict:
    import torch

    from prefloss.benchmark.cases import CASES
    from prefloss.benchmark.inputs import Shape, make_inputs
    from prefloss.benchmark.measure import MIB, run_measured, summarise

    case = CASES[spec["case"]]
    shape = Shape(**shape_dict)
    device = torch.device(spec["device"])
    x = make_inputs(shape, seed=spec["seed"], device=device)
    step = case.build(x)

    def zero_grads():
        x.hidden.grad = None
        x.weight.grad = None

    zero_grads()
    t0 = time.perf_counter()
    check = _check(case, step, x, spec["expected"][i])  # the warm-up step doubles as the check
    first = time.perf_counter() - t0
    if not check["passed"]:
        return {"status": "wrong", "check": check}
    gc.collect()
    times, peaks, cpu = [], [], []
    for _ in range(spec["repeats"]):
        m = run_measured(step, device, zero_grads)
        times.append(m.seconds)
        peaks.append(m.peak_bytes / MIB)
        cpu.append(m.cpu_seconds)
    grad_elements = x.hidden.numel() + (0 if case.frozen_head else x.weight.numel())
    grads_mib = grad_elements * x.hidden.element_size() / MIB
    interleaved = _interleaved_floor(case, step, x, device, spec["repeats"], zero_grads)
    result = {
        "status": "ok",
        "interleaved_floor": interleaved,
        "tile_arithmetic": _tile_arithmetic(case),
        "check": check,
        "first_step_s": first,
        "time_s": summarise(times),
        "peak_mib": summarise(peaks),
        "cpu_time_s": summarise(cpu) if None not in cpu else None,
        "grads_mib": grads_mib if case.loss is not None else 0.0,
    }
    if spec.get("floor_parts") and interleaved is not None:
        result["floor_parts"] = _floor_parts(case, step, x, spec["repeats"], zero_grads)
    return result


def _interleaved_floor(case, step, x, device, repeats: int, zero_grads) -> dict | None:
    """For prefloss cases: the step and the floor timed alternately in this process, ``repeats``
    pairs after one floor warm-up; the median of the per-pair ratios is immune to the machine
    speeding up or slowing down between separate processes (docs/bench.md, "Ratios"). ``None`` for
    other cases."""
    import statistics

    from prefloss.benchmark.cases import CASES
    from prefloss.benchmark.measure import run_measured, summarise

    if not case.method.startswith("prefloss"):
        return None
    floor = CASES[case.floor].build(x)
    floor()
    steps, floors = [], []
    for _ in range(repeats):
        steps.append(run_measured(step, device, zero_grads))
        floors.append(run_measured(floor, device, lambda: None))
    del floor
    ratios = [a.seconds / b.seconds for a, b in zip(steps, floors, strict=True)]
    out = {
        "time_s": summarise([m.seconds for m in steps]),
        "floor_s": summarise([m.seconds for m in floors]),
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
    }
    if all(m.cpu_seconds for m in steps + floors):  # on CPU: by the process's CPU time as well
        cpu = [a.cpu_seconds / b.cpu_seconds for a, b in zip(steps, floors, strict=True)]
        out["cpu_ratio_median"] = statistics.median(cpu)
        out["cpu_ratios"] = cpu
        # fastest over fastest: other processes and CPU steal only ever add time
        out["cpu_min_ratio"] = min(m.cpu_seconds for m in steps) / min(m.cpu_seconds for m in floors)
    return out


def _floor_parts(case, step, x, repeats: int, zero_grads) -> dict:
    """``prefloss bench --floor-parts``: where a step's distance to its floor comes from. ``repeats``
    pairs of step and floor, each call under ``torch.profiler``
    (`prefloss.benchmark.measure.self_cpu_parts`); per pair, each part of the step (GEMMs, compiled
    tile arithmetic, the rest) over the floor's total; the medians over the pairs."""
    import statistics

    import torch

    from prefloss.benchmark.cases import CASES
    from prefloss.benchmark.measure import PARTS, self_cpu_parts

    floor = CASES[case.floor].build(x)
    floor()

    def one_step():
        zero_grads()
        step()

    pairs = []
    for _ in range(repeats):
        parts, floor_parts = self_cpu_parts(one_step), self_cpu_parts(floor)
        total = sum(floor_parts.values())
        pairs.append({k: parts[k] / total for k in PARTS})
    del floor
    return {
        "parts_to_floor": {k: statistics.median(p[k] for p in pairs) for k in PARTS},
        "step_to_floor": statistics.median(sum(p.values()) for p in pairs),
        "pairs": pairs,
        "threads": torch.get_num_threads(),
    }


def _tile_arithmetic(case) -> str | None:
    """``"compiled"`` / ``"eager"``: how the torch backend's tile arithmetic ran in this process."""
    if case.method != "prefloss-torch":
        return None
    from prefloss.fused import tile_math

    return "compiled" if tile_math.used_compiled() else "eager"


def _digest() -> str:
    from prefloss.benchmark.machine import source_digest

    return source_digest()


def main() -> None:
    """Runs every shape of the spec in this process, one result line per shape, in order."""
    spec = json.loads(sys.argv[1])
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    try:
        if spec["device"] == "cpu":  # a GPU run's host memory is not what is being measured
            _limit_memory(spec.get("mem_limit_gib"))
    except (OSError, ValueError) as exc:
        print(f"warning: memory cap not set: {exc}", file=sys.stderr)
    for i, shape in enumerate(spec["shapes"]):
        result = run_shape(spec, i, shape)
        print(RESULT_MARK + json.dumps({"index": i, **result}), flush=True)


def run_shape(spec: dict, i: int, shape: dict) -> dict:
    """The spec's ``i``-th shape (``shape``, a `Shape` as a dict) in this process: the float64
    reference, a case's check and timing, or a ``--max-tokens`` search, by ``spec["mode"]``. Returns
    the result record; an exception becomes a record with status ``error`` (``oom`` when out of
    memory), so the next shape still runs."""
    try:
        if spec["mode"] == "reference":
            result = _reference(spec, shape, spec["paths"][i])
        elif spec["mode"] == "max_tokens":
            from prefloss.benchmark.max_tokens import run_case

            result = run_case(spec, shape)
        else:
            result = _case(spec, shape, i)
    except Exception as exc:  # reported to the parent; the next shape still runs
        status = "oom" if is_oom(exc) else "error"
        result = {"status": status, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        if status == "error":
            result["traceback"] = traceback.format_exc()[-4000:]
    gc.collect()
    result["prefloss_source_sha256"] = _digest()
    return result


if __name__ == "__main__":
    main()
