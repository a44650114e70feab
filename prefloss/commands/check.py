"""``prefloss check``: the kernel-correctness harness.

Runs `prefloss.fused_logprobs(..., backend="triton")` over a matrix of shapes and options, forward and
backward (random upstream gradient), and judges every output, every per-row sum of an output and
every gradient with the shared criterion of `prefloss.testing`:
``err(triton) <= ERROR_MARGIN · max(err(torch backend at the same dtype), u·max|expected|)``, and per
row ``|Σ_t err| <= ERROR_MARGIN · sequence_error_scale(torch backend)``, errors measured against the
float64 oracle `prefloss.reference.token_logprobs`. Then compiles every kernel at every autotune
config for NVIDIA sm_80 / sm_90 and AMD gfx942 / gfx90a (`prefloss.commands.compile_report`) and
fails on compile errors or register spills.

On CUDA the compiled kernels run on GPU-sized shapes; without CUDA the kernels run under Triton's
interpreter (``TRITON_INTERPRET=1``, set here before `prefloss.kernels` is imported) on small shapes.
Exit status: 0 when everything passes, 1 on any failure, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefloss.commands.cli_args import nonnegative_float, random_seed

KINDS = ("policy", "ref", "minus", "plus")
QUANTITIES = (*KINDS, *(f"{k} sums" for k in KINDS), "d hidden", "d weight", "d bias")
DTYPE_NAMES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Case:
    """One shape/option combination. Shapes are ``(batch, T, H, V)``; ``chunk`` is the chunk size."""

    name: str
    cpu: tuple[int, int, int, int]
    cuda: tuple[int, int, int, int]
    chunk_cpu: int | None = None
    chunk_cuda: int | None = None
    opts: dict = field(default_factory=dict)


CASES = (
    Case("odd-V", (2, 9, 32, 1000), (4, 257, 512, 32003), 5, 300),
    Case("V-below-block", (2, 7, 16, 100), (4, 129, 256, 500), 4, 64),
    Case("multi-tile", (1, 6, 16, 20000), (2, 100, 256, 128256), 4, 64),
    Case("heavy-mask", (3, 12, 16, 500), (8, 256, 256, 32000), 8, 256, {"ignore_frac": 0.85}),
    Case("masked-row", (3, 7, 16, 300), (4, 128, 256, 32000), None, None, {"masked_row": True}),
    Case("peaked", (2, 8, 16, 700), (4, 128, 256, 32000), 6, 128, {"peaked": True}),
    Case("bias", (2, 8, 16, 333), (4, 128, 256, 32001), 6, 128, {"bias": True}),
    Case("logit-scale", (2, 8, 16, 333), (4, 128, 256, 32000), 6, 128, {"logit_scale": 0.0625}),
    Case("softcap", (2, 8, 16, 333), (4, 128, 256, 256000), 6, 128, {"softcap": 3.0}),
    Case("frozen-head", (2, 8, 16, 400), (4, 128, 256, 32000), 7, 128, {"frozen": True}),
    Case("ref-eps", (2, 8, 16, 600), (4, 128, 256, 32000), 5, 128, {"ref": True, "epsilon": 0.3}),
    Case(
        "all",
        (2, 9, 16, 999),
        (4, 129, 256, 151936),
        5,
        100,
        {
            "ref": True,
            "epsilon": 0.1,
            "bias": True,
            "logit_scale": 1.5,
            "softcap": 10.0,
            "ignore_frac": 0.3,
            "masked_row": True,
        },
    ),
)
QUICK_CASES = ("odd-V", "heavy-mask", "softcap", "ref-eps")
QUICK_DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class CheckResult:
    """One judged quantity of one case: its max abs error vs float64 and the bound it must meet."""

    case: str
    dtype: str
    quantity: str
    max_abs_err: float
    bound: float
    passed: bool
    worst_index: tuple[int, ...] = ()


DEFAULT_TARGETS = "80,90,gfx942,gfx90a"


def compile_targets(text: str) -> list[int | str]:
    """``--targets``: CUDA compute capabilities (integers >= 50) and/or AMD targets (gfx942, gfx90a)."""
    from prefloss.commands.compile_report import AMD_TARGETS

    expected = (
        "a comma-separated list of integers >= 50 like 80,90 and/or AMD targets among "
        f"{','.join(AMD_TARGETS)}"
    )
    targets: list[int | str] = []
    for item in text.split(","):
        item = item.strip()
        if item in AMD_TARGETS:
            targets.append(item)
        elif item.isdigit() and int(item) >= 50:
            targets.append(int(item))
        else:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return targets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_CASES)} in fp32/bf16")
    parser.add_argument("--json", metavar="PATH", type=Path, default=None, help="write all results as JSON")
    parser.add_argument(
        "--cases",
        default=None,
        help=f"comma-separated case names (default: all): {', '.join(c.name for c in CASES)}",
    )
    parser.add_argument("--dtypes", default=None, help="comma-separated among fp32,bf16,fp16 (default: all)")
    parser.add_argument(
        "--targets",
        type=compile_targets,
        default=DEFAULT_TARGETS,
        help="CUDA compute capabilities and/or AMD targets to compile for, comma-separated "
        f"(default {DEFAULT_TARGETS})",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the compile report")
    parser.add_argument("--seed", type=random_seed, default=0, help="input seed (default 0)")
    parser.add_argument(
        "--inject-error",
        type=nonnegative_float,
        default=0.0,
        metavar="X",
        help="self-test of the harness: add X to every Triton output and gradient before judging "
        "(the check must fail)",
    )


def _parse_list(
    parser_error, value: str | None, allowed: tuple[str, ...], default: tuple[str, ...], what: str
):
    if value is None:
        return default
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [v for v in items if v not in allowed]
    if not items or unknown:
        parser_error(f"--{what} must be a comma-separated subset of {','.join(allowed)}, got {value!r}")
    return items


def _validate(args) -> tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...]] | str:
    """Selected cases, dtypes and targets, or an error message for a bad argument."""
    errors = []
    names = tuple(c.name for c in CASES)
    cases = _parse_list(errors.append, args.cases, names, QUICK_CASES if args.quick else names, "cases")
    dtypes = _parse_list(
        errors.append, args.dtypes, DTYPE_NAMES, QUICK_DTYPES if args.quick else DTYPE_NAMES, "dtypes"
    )
    targets = tuple(dict.fromkeys(args.targets))  # checked by the parser (`add_arguments`)
    if args.json is not None and not args.json.parent.is_dir():
        errors.append(f"--json: directory {str(args.json.parent)!r} does not exist")
    return "; ".join(errors) if errors else (cases, dtypes, targets)


def _inputs(case: Case, dtype, device: str, seed: int):
    import torch

    B, T, H, V = case.cpu if device == "cpu" else case.cuda
    o = case.opts
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (2.0 / H**0.5)
    labels = torch.randint(0, V, (B, T), generator=g)
    if o.get("peaked"):
        # Confident rows: the label's logit ~30 above the rest, and every third row's ~30 below.
        weight *= 0.1
        flat = hidden.reshape(-1, H)
        labels = (torch.arange(B * T) * 7 % V).reshape(B, T)
        sign = torch.where(torch.arange(B * T) % 3 == 0, -1.0, 1.0)[:, None]
        weight[labels.reshape(-1)] = sign * 30.0 * flat / flat.pow(2).sum(-1, keepdim=True)
    if o.get("ignore_frac"):
        labels[torch.rand(B, T, generator=g) < o["ignore_frac"]] = -100
    if o.get("masked_row"):
        labels[B - 1] = -100
    bias = torch.randn(V, generator=g) if o.get("bias") else None
    ref_hidden = ref_weight = None
    if o.get("ref"):
        ref_hidden = hidden + 0.3 * torch.randn(B, T, H, generator=g)
        ref_weight = weight + 0.2 * torch.randn(V, H, generator=g) / H**0.5
    grad = torch.randn(B, T, generator=g)
    cast = lambda x: None if x is None else x.to(device=device, dtype=dtype)
    return {
        "hidden": cast(hidden),
        "weight": cast(weight),
        "bias": cast(bias),
        "labels": labels.to(device),
        "ref_hidden": cast(ref_hidden),
        "ref_weight": cast(ref_weight),
        "grad": grad.to(device),
    }


def _run(inputs: dict, case: Case, device: str, backend: str):
    """Forward + backward with the given backend (or the float64 ``"reference"``): outputs and grads."""
    import prefloss
    from prefloss import reference

    frozen = case.opts.get("frozen", False)
    leaves = {k: inputs[k].detach().clone() for k in ("hidden", "weight", "bias") if inputs[k] is not None}
    if backend == "reference":
        leaves = {k: v.double() for k, v in leaves.items()}
    for name, t in leaves.items():
        t.requires_grad_(not (frozen and name != "hidden"))
    kw = {
        "bias": leaves.get("bias"),
        "ref_hidden": inputs["ref_hidden"],
        "ref_weight": inputs["ref_weight"],
        "epsilon": case.opts.get("epsilon"),
        "logit_scale": case.opts.get("logit_scale"),
        "softcap": case.opts.get("softcap"),
    }
    if backend == "reference":
        out = reference.token_logprobs(leaves["hidden"], leaves["weight"], inputs["labels"], **kw)
    else:
        chunk = case.chunk_cpu if device == "cpu" else case.chunk_cuda
        out = prefloss.fused_logprobs(
            leaves["hidden"], leaves["weight"], inputs["labels"], **kw, chunk_size=chunk, backend=backend
        )
    (out.policy * inputs["grad"].to(out.policy.dtype)).sum().backward()
    values = {q: getattr(out, q) for q in ("policy", "ref", "minus", "plus") if getattr(out, q) is not None}
    values.update({f"d {k}": v.grad for k, v in leaves.items() if v.grad is not None})
    return {k: v.detach() for k, v in values.items()}


def check_case(case: Case, dtype_name: str, device: str, *, seed: int = 0, inject_error: float = 0.0):
    """Judge every output and gradient of one case at one dtype; returns a list of `CheckResult`."""
    import torch

    from prefloss.testing import ERROR_MARGIN, compare, sequence_error_scale

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    inputs = _inputs(case, dtype, device, seed)
    expected = _run(inputs, case, device, "reference")
    baseline = _run(inputs, case, device, "torch")
    actual = {q: v.double() + inject_error for q, v in _run(inputs, case, device, "triton").items()}
    bounds = {}
    for kind in KINDS:
        if kind in expected:
            expected[f"{kind} sums"] = expected[kind].sum(-1)
            bounds[f"{kind} sums"] = ERROR_MARGIN * sequence_error_scale(baseline[kind], expected[kind])
        if (
            kind in actual and kind in baseline
        ):  # summed in the op's dtype, as `prefloss.sequence_logprobs` does
            actual[f"{kind} sums"] = actual[kind].to(baseline[kind].dtype).sum(-1)
    results = []
    for quantity in QUANTITIES:
        if quantity not in expected:
            continue
        if quantity not in actual:
            results.append(CheckResult(case.name, dtype_name, quantity, float("inf"), 0.0, False))
            continue
        c = compare(
            actual[quantity],
            expected[quantity],
            dtype=dtype,
            baseline=baseline.get(quantity),
            bound=bounds.get(quantity),
        )
        results.append(
            CheckResult(case.name, dtype_name, quantity, c.max_abs_err, c.bound, c.passed, c.worst_index)
        )
    return results


def format_results(results: list[CheckResult]) -> str:
    header = ("case", "dtype", "quantity", "max abs err", "bound", "result")
    rows = [
        (
            r.case,
            r.dtype,
            r.quantity,
            f"{r.max_abs_err:.3e}",
            f"{r.bound:.3e}",
            "pass" if r.passed else "FAIL",
        )
        for r in results
    ]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def _finite(obj):
    """JSON has no inf/nan: write them as strings (``"inf"``, ``"nan"``)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def run(args) -> int:
    selected = _validate(args)
    if isinstance(selected, str):
        print(f"prefloss check: error: {selected}", file=sys.stderr)
        return 2
    case_names, dtype_names, targets = selected

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if "prefloss.kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print(
                "prefloss check: error: prefloss.kernels was imported before TRITON_INTERPRET=1 could be "
                "set; run `prefloss check` in a fresh process.",
                file=sys.stderr,
            )
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before prefloss.kernels is imported (jit decides then)

    import triton
    from tqdm import tqdm

    from prefloss.commands.compile_report import compile_report, format_table, target_name

    jobs = [(c, d) for c in CASES if c.name in case_names for d in dtype_names]
    results: list[CheckResult] = []
    errors: list[str] = []
    for case, dtype_name in tqdm(jobs, desc=f"prefloss check ({device})", unit="case", file=sys.stderr):
        try:
            results += check_case(case, dtype_name, device, seed=args.seed, inject_error=args.inject_error)
        except Exception as exc:  # one crashing case is a failure to report, not a reason to stop
            errors.append(f"{case.name} {dtype_name}: {type(exc).__name__}: {exc}")
            results.append(CheckResult(case.name, dtype_name, "error", float("inf"), 0.0, False))

    print(f"correctness on {device} ({'compiled kernels' if device == 'cuda' else 'Triton interpreter'}):")
    print(format_results(results))
    for line in errors:
        print(f"  error: {line}")

    compiled = []
    if not args.no_compile:
        print(f"\ncompile report ({', '.join(map(target_name, targets))}; no GPU needed):")
        try:
            compiled = compile_report(targets)
            print(format_table(compiled))
        except Exception as exc:
            errors.append(f"compile report: {type(exc).__name__}: {exc}")
            print(f"  error: {errors[-1]}")

    passed = not errors and all(r.passed for r in results) and all(r.ok for r in compiled)
    n_fail = sum(not r.passed for r in results) + sum(not r.ok for r in compiled)
    print(f"\n{'PASS' if passed else 'FAIL'}: {len(results)} checks, {len(compiled)} builds, {n_fail} failed")
    if args.json is not None:
        payload = {
            "passed": passed,
            "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "interpreter": device == "cpu",
            "torch": torch.__version__,
            "triton": triton.__version__,
            "quick": bool(args.quick),
            "inject_error": args.inject_error,
            "correctness": [asdict(r) for r in results],
            "compile": [{**asdict(r), "ok": r.ok} for r in compiled],
            "errors": errors,
        }
        args.json.write_text(json.dumps(_finite(payload), indent=2, allow_nan=False) + "\n")
    return 0 if passed else 1
