"""Compile every Triton kernel for real GPU targets without a GPU, and report its resource usage.

The interpreter (``TRITON_INTERPRET=1``) forgives what the GPU compiler rejects: loop-carried values
that change type, non-power-of-2 ``tl.arange``, Python helper calls. This module builds each kernel
of `prefloss.kernels` through Triton's own compiler for ``sm_80`` and ``sm_90`` (with the bundled
``ptxas``) at every autotune config, for the flag combinations that change the register footprint,
and reads from the cubin (bundled ``cuobjdump --dump-resource-usage``) the registers per thread,
the local-memory stack (spills: the kernels have no local arrays) and the shared memory.

Compilation must run in a process without ``TRITON_INTERPRET`` (otherwise triton's own library
functions are interpreted and code generation fails), so `compile_report` spawns
``python -m prefloss.commands.compile_report --worker`` with the variable removed, one process per target,
and parses the JSON it prints.

Integer arguments (``V``, row strides) are compiled as divisible by 16, like the JIT specialises them
for real vocabularies (32000, 128256, 151936, 256000 ...): this is the variant that runs in practice.

To cover a new kernel, add a `_KernelSpec` to `_SPECS`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

DEFAULT_TARGETS = (80, 90)
DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class CompileResult:
    """Resource usage of one compiled kernel variant (``error`` set and zeros when it failed)."""

    kernel: str
    variant: str  # name of the HAS_* flag combination
    dtype: str  # logits dtype: "fp32" | "bf16"
    target: int  # compute capability, 80 or 90
    block_v: int
    num_warps: int
    registers: int = 0  # per thread
    spill_bytes: int = 0  # local-memory stack per thread (STACK + LOCAL)
    shared_bytes: int = 0  # dynamic (Triton scratch) + static shared memory per block
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.spill_bytes == 0

    @property
    def config(self) -> str:
        return f"BLOCK_V={self.block_v} warps={self.num_warps}"


@dataclass(frozen=True)
class _KernelSpec:
    kernel: str  # attribute of prefloss.kernels.<module>: the @triton.jit function
    module: str
    configs: str  # attribute holding the autotune config list
    pointer_dtypes: dict[str, str]  # pointer argument -> "logits" (the logits dtype) or a fixed type
    variants: dict[str, dict[str, bool]] = field(default_factory=dict)


_SPECS = (
    _KernelSpec(
        kernel="logprobs_fwd_kernel",
        module="prefloss.kernels.logprobs",
        configs="FWD_CONFIGS",
        pointer_dtypes={
            "logits_ptr": "logits",
            "ref_ptr": "logits",
            "labels_ptr": "*i64",
            "bias_ptr": "logits",
            "ref_bias_ptr": "logits",
        },
        variants={
            "policy": {},
            "ref+eps": {"HAS_REF": True, "HAS_EPS": True},
            "all": {
                "HAS_BIAS": True,
                "HAS_REF": True,
                "HAS_REF_BIAS": True,
                "HAS_EPS": True,
                "HAS_SCALE": True,
                "HAS_SOFTCAP": True,
            },
        },
    ),
    _KernelSpec(
        kernel="logprobs_bwd_kernel",
        module="prefloss.kernels.logprobs",
        configs="BWD_CONFIGS",
        pointer_dtypes={"logits_ptr": "logits", "labels_ptr": "*i64", "bias_ptr": "logits"},
        variants={
            "policy": {},
            "all": {"HAS_BIAS": True, "HAS_SCALE": True, "HAS_SOFTCAP": True},
        },
    ),
)

_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


# --- worker: runs without TRITON_INTERPRET ------------------------------------------------------


def _jit_function(obj):
    """Unwrap ``@autotune`` / ``@heuristics`` wrappers down to the ``JITFunction``."""
    from triton.runtime.jit import JITFunction

    while not isinstance(obj, JITFunction):
        obj = obj.fn
    return obj


def _signature(fn, spec: _KernelSpec, dtype: str, flags: dict[str, bool], block_v: int):
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name.startswith(("HAS_", "BLOCK_")):
            signature[name] = "constexpr"
            constexprs[name] = block_v if name == "BLOCK_V" else bool(flags.get(name, False))
            continue
        if name.endswith("_ptr"):
            kind = spec.pointer_dtypes.get(name, "*fp32")
            signature[name] = f"*{dtype}" if kind == "logits" else kind
        elif name in ("epsilon", "logit_scale", "softcap"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        if name.endswith("_ptr") or name == "V" or name.startswith("stride"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, stack + local bytes, static shared bytes) from the bundled cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        )
    match = _USAGE.search(out.stdout)
    if match is None:
        raise RuntimeError(f"could not parse cuobjdump output:\n{out.stdout}")
    reg, stack, shared, local = (int(g) for g in match.groups())
    return reg, stack + local, shared


def _compile_one(spec: _KernelSpec, variant: str, dtype: str, target: int, config) -> CompileResult:
    import importlib
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(spec.module)
    fn = _jit_function(getattr(module, spec.kernel))
    block_v = config.kwargs["BLOCK_V"]
    base = {
        "kernel": spec.kernel,
        "variant": variant,
        "dtype": dtype,
        "target": target,
        "block_v": block_v,
        "num_warps": config.num_warps,
    }
    start = time.perf_counter()
    try:
        signature, constexprs, attrs = _signature(fn, spec, dtype, spec.variants[variant], block_v)
        compiled = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", target, 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
        )
        registers, spills, static_shared = _resource_usage(compiled.asm["cubin"])
    except Exception as exc:  # reported per variant: one broken kernel must not hide the others
        message = f"{type(exc).__name__}: {exc}"
        return CompileResult(**base, seconds=time.perf_counter() - start, error=message[-2000:])
    return CompileResult(
        **base,
        registers=registers,
        spill_bytes=spills,
        shared_bytes=int(compiled.metadata.shared) + static_shared,
        seconds=time.perf_counter() - start,
    )


def _worker(targets: list[int], kernels: list[str] | None) -> list[CompileResult]:
    import importlib

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the compile worker must run without TRITON_INTERPRET=1")
    # Fusion stays enabled (triton's current default); the warning about the future default is noise here.
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    results = []
    for spec in _SPECS:
        if kernels and spec.kernel not in kernels:
            continue
        configs = getattr(importlib.import_module(spec.module), spec.configs)
        for target in targets:
            for variant in spec.variants:
                for dtype in DTYPES:
                    for config in configs:
                        results.append(_compile_one(spec, variant, dtype, target, config))
    return results


# --- public API: spawns the worker --------------------------------------------------------------


def compile_report(
    targets: tuple[int, ...] = DEFAULT_TARGETS,
    *,
    kernels: tuple[str, ...] | None = None,
    timeout: float = 600.0,
) -> list[CompileResult]:
    """Compile every kernel variant for each target in a clean subprocess; return one result per build.

    Args:
        targets: CUDA compute capabilities, e.g. ``(80, 90)``.
        kernels: restrict to these kernel names (default: all of `prefloss.kernels`).
        timeout: seconds allowed per target's subprocess.

    Returns:
        `CompileResult` per (kernel, variant, dtype, target, config). A failed build has ``error`` set;
        a build that spills has ``spill_bytes > 0``; ``result.ok`` is False for both.

    Raises:
        ValueError: an unknown target or kernel name.
        RuntimeError: the worker process itself failed (its stderr is in the message).
    """
    targets = tuple(targets)
    if not targets or any(not isinstance(t, int) or t < 50 for t in targets):
        raise ValueError(f"`targets` must be CUDA compute capabilities like (80, 90), got {targets!r}.")
    known = {spec.kernel for spec in _SPECS}
    if kernels is not None and not set(kernels) <= known:
        raise ValueError(f"`kernels` must be among {sorted(known)}, got {sorted(set(kernels) - known)}.")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def run_target(target: int) -> list[CompileResult]:
        cmd = [sys.executable, "-m", "prefloss.commands.compile_report", "--worker", "--targets", str(target)]
        if kernels:
            cmd += ["--kernels", ",".join(kernels)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(
                f"compile worker for sm_{target} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
            )
        return [CompileResult(**row) for row in json.loads(proc.stdout)]

    # One process per target: compilation is single-threaded and the targets are independent.
    with ThreadPoolExecutor(max_workers=min(len(targets), os.cpu_count() or 1)) as pool:
        per_target = list(pool.map(run_target, targets))
    return [r for results in per_target for r in results]


def format_table(results: list[CompileResult]) -> str:
    """Plain-text table: kernel, variant, dtype, target, config, registers, spills, shared memory."""
    header = ("kernel", "variant", "dtype", "target", "config", "regs", "spill B", "smem B", "status")
    rows = [
        (
            r.kernel,
            r.variant,
            r.dtype,
            f"sm_{r.target}",
            r.config,
            str(r.registers),
            str(r.spill_bytes),
            str(r.shared_bytes),
            "ok" if r.ok else ("ERROR" if r.error else "SPILL"),
        )
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines += [
        f"{r.kernel} {r.variant} {r.dtype} sm_{r.target} {r.config}: {r.error}" for r in results if r.error
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(map(str, DEFAULT_TARGETS)), help="e.g. 80,90")
    parser.add_argument("--kernels", default=None, help="comma-separated kernel names (default: all)")
    parser.add_argument("--worker", action="store_true", help="compile in this process and print JSON")
    args = parser.parse_args(argv)
    try:
        targets = tuple(int(t) for t in args.targets.split(","))
    except ValueError:
        parser.error(f"--targets must be comma-separated integers like 80,90, got {args.targets!r}")
    kernels = tuple(args.kernels.split(",")) if args.kernels else None
    if args.worker:
        print(json.dumps([asdict(r) for r in _worker(list(targets), list(kernels) if kernels else None)]))
        return 0
    results = compile_report(targets, kernels=kernels)
    print(format_table(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
