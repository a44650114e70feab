"""Entry point of the benchmark's fresh processes (one per case and shape, one per reference).

The parent passes a JSON spec as ``argv[1]``; the result is printed as one JSON line prefixed with
`RESULT_MARK`. Run as ``python -c "from prefloss.benchmark.worker import main; main()" SPEC`` from
a scratch directory, so the repository's top-level ``kernels/`` folder never lands on ``sys.path``.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import time
import traceback

RESULT_MARK = "@@PREFLOSS-BENCH-RESULT@@ "


def _limit_memory(gib: float | None) -> None:
    """Cap the process's private memory (RLIMIT_DATA) so an oversized case fails alone, cleanly."""
    if not gib:
        return
    from prefloss.benchmark.measure import _proc_status_kib

    now = _proc_status_kib("VmData") * 1024
    limit = now + int(gib * 1024**3)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "can't allocate memory" in str(exc) or "out of memory" in str(exc)


def _reference(spec: dict) -> dict:
    import torch

    from prefloss.benchmark.cases import HYPERPARAMS
    from prefloss.benchmark.inputs import Shape, make_inputs
    from prefloss.benchmark.oracle import expected_values

    shape = Shape(**spec["shape"])
    x = make_inputs(shape, seed=spec["seed"], device=spec["device"])
    t0 = time.perf_counter()
    exp = expected_values(
        {n: HYPERPARAMS[n] for n in spec["losses"]},
        x.hidden,
        x.weight,
        x.labels,
        ref_hidden=x.ref_hidden,
        ref_weight=x.ref_weight,
    )
    torch.save({n: tuple(t.cpu() for t in e) for n, e in exp.items()}, spec["path"])
    return {"status": "ok", "seconds": time.perf_counter() - t0}


def _check(case, step, x, spec) -> dict:
    import torch

    from prefloss.testing import compare

    value = step()
    if case.loss is None or not spec.get("expected"):
        return {"passed": True, "skipped": "no loss" if case.loss is None else "no reference"}
    loss, grad_h, grad_w = torch.load(spec["expected"], weights_only=True)[case.loss]
    dtype = x.hidden.dtype
    parts = {
        "loss": compare(value.detach().reshape(()), loss, dtype=dtype),
        "grad_hidden": compare(
            _grad(x.hidden), grad_h, dtype=dtype, scale=max(1.0, float(grad_h.abs().max()))
        ),
        "grad_weight": compare(
            _grad(x.weight), grad_w, dtype=dtype, scale=max(1.0, float(grad_w.abs().max()))
        ),
    }
    return {
        "passed": all(c.passed for c in parts.values()),
        "criterion": "err <= TOLERANCES[dtype]*scale (prefloss.testing.compare, no baseline)",
        **{
            k: {"max_abs_err": c.max_abs_err, "bound": c.bound, "rms_ratio": c.rms_ratio, "passed": c.passed}
            for k, c in parts.items()
        },
        "detail": "; ".join(c.describe(k) for k, c in parts.items() if not c.passed),
    }


def _grad(t):
    import torch

    return t.grad if t.grad is not None else torch.zeros_like(t)


def _case(spec: dict) -> dict:
    import torch

    from prefloss.benchmark.cases import CASES
    from prefloss.benchmark.inputs import Shape, make_inputs
    from prefloss.benchmark.measure import MIB, run_measured, summarise

    case = CASES[spec["case"]]
    shape = Shape(**spec["shape"])
    device = torch.device(spec["device"])
    x = make_inputs(shape, seed=spec["seed"], device=device)
    step = case.build(x)

    def zero_grads():
        x.hidden.grad = None
        x.weight.grad = None

    zero_grads()
    t0 = time.perf_counter()
    check = _check(case, step, x, spec)  # the warm-up step doubles as the correctness check
    first = time.perf_counter() - t0
    if not check["passed"]:
        return {"status": "wrong", "check": check}
    gc.collect()
    times, peaks = [], []
    for _ in range(spec["repeats"]):
        seconds, peak = run_measured(step, device, zero_grads)
        times.append(seconds)
        peaks.append(peak / MIB)
    grads_mib = (x.hidden.numel() + x.weight.numel()) * x.hidden.element_size() / MIB
    return {
        "status": "ok",
        "check": check,
        "first_step_s": first,
        "time_s": summarise(times),
        "peak_mib": summarise(peaks),
        "grads_mib": grads_mib if case.loss is not None else 0.0,
    }


def main() -> None:
    spec = json.loads(sys.argv[1])
    try:
        _limit_memory(spec.get("mem_limit_gib"))
        result = _reference(spec) if spec["mode"] == "reference" else _case(spec)
    except Exception as exc:  # reported to the parent, which keeps going with the other cases
        status = "oom" if _is_oom(exc) else "error"
        result = {"status": status, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        if status == "error":
            result["traceback"] = traceback.format_exc()[-4000:]
    print(RESULT_MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
