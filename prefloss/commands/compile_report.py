"""Compile every Triton kernel for real GPU targets without a GPU, and report its resource usage.

The interpreter (``TRITON_INTERPRET=1``) forgives what the GPU compiler rejects: loop-carried values
that change type, non-power-of-2 ``tl.arange``, Python helper calls. This module builds each kernel
of `prefloss.kernels` through Triton's own compiler at every autotune config, for the flag
combinations that change the register footprint, for two kinds of target:

- NVIDIA ``sm_80`` and ``sm_90`` (``GPUTarget("cuda", cc, 32)``, the bundled ``ptxas``): registers
  per thread, the local-memory stack (spills: the kernels have no local arrays) and the shared
  memory, read from the cubin with the bundled ``cuobjdump --dump-resource-usage``;
- AMD ``gfx942`` (MI300X, MI325X) and ``gfx90a`` (MI250X) (``GPUTarget("hip", arch, 64)``, Triton's
  own AMD backend and its bundled LLVM; no ROCm install): VGPRs, AGPRs and SGPRs per wave, VGPR and
  SGPR spill counts, scratch (private segment) bytes per lane, LDS bytes and occupancy, read from the
  ``amdgcn`` assembly (`parse_amdgcn`). A wave there is 64 lanes, so ``num_warps`` waves make
  ``num_warps · 64`` threads: the same ``BLOCK_V`` gives each lane half the elements it has on NVIDIA.

Compilation must run in a process without ``TRITON_INTERPRET`` (otherwise triton's own library
functions are interpreted and code generation fails), so `compile_report` spawns
``python -m prefloss.commands.compile_report --worker`` with the variable removed, one process per CPU
(each compiling its share of the targets), and parses the JSON it prints.

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

NVIDIA_TARGETS = (80, 90)  # CUDA compute capabilities
# AMD Instinct targets: LLVM processor name -> (GPUs, LDS bytes per compute unit). Both have 4 SIMDs
# per CU and at most 8 waves per SIMD (AMD CDNA2 and CDNA3 ISA guides).
AMD_TARGETS = {
    "gfx942": ("MI300X, MI325X (CDNA3)", 65536),
    "gfx90a": ("MI250X, MI210 (CDNA2)", 65536),
}
DEFAULT_TARGETS = (*NVIDIA_TARGETS, *AMD_TARGETS)
AMD_WAVE_SIZE = 64
AMD_MAX_WORKGROUP = 1024  # threads
AMD_MAX_WAVES_PER_SIMD = 8
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
class AmdCompileResult:
    """Resource usage of one kernel variant compiled for an AMD target (``error`` set when it failed).

    Per wave of 64 lanes: ``vgprs`` (architectural VGPRs per lane), ``agprs`` (accumulation VGPRs
    per lane), ``sgprs``; ``vgpr_spills`` / ``sgpr_spills`` are register counts spilled,
    ``scratch_bytes`` the private segment per lane (where spills go; the kernels have no local
    arrays, so any scratch is a spill), ``lds_bytes`` the static LDS (``group_segment_fixed_size``)
    plus Triton's dynamic LDS per workgroup, ``occupancy`` waves per SIMD: the compiler's figure
    (registers, workgroup size) capped by what the LDS allows.
    """

    kernel: str
    variant: str
    dtype: str
    target: str  # "gfx942" | "gfx90a"
    block_v: int
    num_warps: int  # waves per workgroup; threads = num_warps * 64
    vgprs: int = 0
    agprs: int = 0
    sgprs: int = 0
    vgpr_spills: int = 0
    sgpr_spills: int = 0
    scratch_bytes: int = 0
    lds_bytes: int = 0
    occupancy: int = 0
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.vgpr_spills == self.sgpr_spills == self.scratch_bytes == 0

    @property
    def threads(self) -> int:
        return self.num_warps * AMD_WAVE_SIZE

    @property
    def config(self) -> str:
        return f"BLOCK_V={self.block_v} warps={self.num_warps}x{AMD_WAVE_SIZE}"


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


_AMD_METADATA_KEYS = {
    "vgprs": "vgpr_count",
    "agprs": "agpr_count",
    "sgprs": "sgpr_count",
    "vgpr_spills": "vgpr_spill_count",
    "sgpr_spills": "sgpr_spill_count",
    "scratch_bytes": "private_segment_fixed_size",
    "lds_static_bytes": "group_segment_fixed_size",
    "wavefront_size": "wavefront_size",
}


def parse_amdgcn(asm: str) -> dict[str, int]:
    """Resource usage of the one kernel in an ``amdgcn`` assembly listing, as Triton's AMD backend emits it.

    Reads the HSA code-object metadata (the YAML between ``.amdgpu_metadata`` and
    ``.end_amdgpu_metadata``): ``.vgpr_count``, ``.agpr_count``, ``.sgpr_count``,
    ``.vgpr_spill_count``, ``.sgpr_spill_count``, ``.private_segment_fixed_size`` (scratch bytes per
    lane), ``.group_segment_fixed_size`` (static LDS bytes per workgroup), ``.wavefront_size``; and the
    compiler's ``; Occupancy: N`` comment (waves per SIMD allowed by the registers and the workgroup
    size; it does not see Triton's dynamic LDS).

    Returns:
        ``{"vgprs", "agprs", "sgprs", "vgpr_spills", "sgpr_spills", "scratch_bytes",
        "lds_static_bytes", "wavefront_size", "occupancy"}``, all ints.

    Raises:
        ValueError: no metadata block, more than one kernel in it, or a key missing.
    """
    block = re.search(r"^\s*\.amdgpu_metadata\s*$(.*?)^\s*\.end_amdgpu_metadata", asm, re.M | re.S)
    if block is None:
        raise ValueError("`asm` has no .amdgpu_metadata block: not amdgcn assembly of a kernel.")
    text = block.group(1)
    if len(re.findall(r"^\s*\.symbol:", text, re.M)) != 1:
        raise ValueError("`asm` must hold exactly one kernel's metadata (one .symbol entry).")
    usage = {}
    for name, key in _AMD_METADATA_KEYS.items():
        found = re.findall(rf"^\s*(?:-\s+)?\.{key}:\s+(\d+)\s*$", text, re.M)
        if len(found) != 1:
            raise ValueError(f"`asm`: expected one .{key} in the kernel metadata, found {len(found)}.")
        usage[name] = int(found[0])
    occupancy = re.findall(r"^\s*;\s*Occupancy:\s*(\d+)\s*$", asm, re.M)
    if len(occupancy) != 1:
        raise ValueError(f"`asm`: expected one '; Occupancy: N' line, found {len(occupancy)}.")
    usage["occupancy"] = int(occupancy[0])
    return usage


def _lds_occupancy(lds_bytes: int, num_warps: int, lds_per_cu: int) -> int:
    """Waves per SIMD that the LDS allows: workgroups per CU (LDS / workgroup's LDS) · waves / 4 SIMDs."""
    if lds_bytes == 0:
        return AMD_MAX_WAVES_PER_SIMD
    return min(AMD_MAX_WAVES_PER_SIMD, (lds_per_cu // lds_bytes) * num_warps // 4)


def _describe(spec: _KernelSpec, variant: str, dtype: str, target: int | str, config) -> dict:
    """The fields that name one build in a report row."""
    return {
        "kernel": spec.kernel,
        "variant": variant,
        "dtype": dtype,
        "target": target,
        "block_v": config.kwargs["BLOCK_V"],
        "num_warps": config.num_warps,
    }


def _build(spec: _KernelSpec, variant: str, dtype: str, config, gpu_target):
    """``triton.compile`` of one kernel variant at one autotune config for ``gpu_target`` (a Triton
    ``GPUTarget``), without a GPU."""
    import importlib

    import triton
    from triton.compiler import ASTSource

    fn = _jit_function(getattr(importlib.import_module(spec.module), spec.kernel))
    block_v = config.kwargs["BLOCK_V"]
    signature, constexprs, attrs = _signature(fn, spec, dtype, spec.variants[variant], block_v)
    return triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=gpu_target,
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )


def _compile_amd(
    spec: _KernelSpec, variant: str, dtype: str, target: str, config, asm_dir: str | None = None
) -> AmdCompileResult:
    import time

    from triton.backends.compiler import GPUTarget

    base = _describe(spec, variant, dtype, target, config)
    start = time.perf_counter()
    try:
        if config.num_warps * AMD_WAVE_SIZE > AMD_MAX_WORKGROUP:
            raise ValueError(
                f"{config.num_warps} waves of {AMD_WAVE_SIZE} lanes = {config.num_warps * AMD_WAVE_SIZE} "
                f"threads, over the {AMD_MAX_WORKGROUP}-thread workgroup limit of {target}"
            )
        compiled = _build(spec, variant, dtype, config, GPUTarget("hip", target, AMD_WAVE_SIZE))
        if asm_dir is not None:
            block_v, warps = base["block_v"], config.num_warps
            name = f"{spec.kernel}-{variant}-{dtype}-{target}-BLOCK_V{block_v}-w{warps}.amdgcn"
            with open(os.path.join(asm_dir, name), "w") as f:
                f.write(compiled.asm["amdgcn"])
        usage = parse_amdgcn(compiled.asm["amdgcn"])
        if usage["wavefront_size"] != AMD_WAVE_SIZE:
            raise ValueError(
                f"compiled for waves of {usage['wavefront_size']} lanes, expected {AMD_WAVE_SIZE}"
            )
        lds = usage["lds_static_bytes"] + int(compiled.metadata.shared)
        lds_per_cu = AMD_TARGETS[target][1]
        if lds > lds_per_cu:
            raise ValueError(f"needs {lds} B of LDS per workgroup, a {target} CU has {lds_per_cu} B")
    except Exception as exc:  # reported per variant: one broken kernel must not hide the others
        message = f"{type(exc).__name__}: {exc}"
        return AmdCompileResult(**base, seconds=time.perf_counter() - start, error=message[-2000:])
    return AmdCompileResult(
        **base,
        vgprs=usage["vgprs"],
        agprs=usage["agprs"],
        sgprs=usage["sgprs"],
        vgpr_spills=usage["vgpr_spills"],
        sgpr_spills=usage["sgpr_spills"],
        scratch_bytes=usage["scratch_bytes"],
        lds_bytes=lds,
        occupancy=min(usage["occupancy"], _lds_occupancy(lds, config.num_warps, lds_per_cu)),
        seconds=time.perf_counter() - start,
    )


def _compile_one(spec: _KernelSpec, variant: str, dtype: str, target: int, config) -> CompileResult:
    import time

    from triton.backends.compiler import GPUTarget

    base = _describe(spec, variant, dtype, target, config)
    start = time.perf_counter()
    try:
        compiled = _build(spec, variant, dtype, config, GPUTarget("cuda", target, 32))
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


def _worker(
    targets: list[int | str],
    kernels: list[str] | None,
    asm_dir: str | None = None,
) -> list[CompileResult | AmdCompileResult]:
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
            amd = isinstance(target, str)
            for variant in spec.variants:
                for dtype in DTYPES:
                    for config in configs:
                        if amd:
                            results.append(_compile_amd(spec, variant, dtype, target, config, asm_dir))
                        else:
                            results.append(_compile_one(spec, variant, dtype, target, config))
    return results


def target_name(target: int | str) -> str:
    """``"sm_90"`` for a CUDA compute capability, the name itself (``"gfx942"``) for an AMD target."""
    return target if isinstance(target, str) else f"sm_{target}"


def parse_targets(text: str) -> tuple[int | str, ...]:
    """``"80,90,gfx942"`` -> ``(80, 90, "gfx942")``; raises ValueError naming what is accepted."""
    items = [t.strip() for t in text.split(",")]
    targets = tuple(int(t) if t.isdigit() else t for t in items)
    _check_targets(targets)
    return targets


def _check_targets(targets: tuple) -> None:
    def known(t) -> bool:
        return (isinstance(t, int) and t >= 50) or (isinstance(t, str) and t in AMD_TARGETS)

    if not targets or not all(known(t) for t in targets):
        raise ValueError(
            "`targets` must be CUDA compute capabilities like (80, 90) and/or AMD targets among "
            f"{tuple(AMD_TARGETS)}, got {targets!r}."
        )


# --- public API: spawns the worker --------------------------------------------------------------


def compile_report(
    targets: tuple[int | str, ...] = DEFAULT_TARGETS,
    *,
    kernels: tuple[str, ...] | None = None,
    asm_dir: str | os.PathLike | None = None,
    timeout: float = 600.0,
) -> list[CompileResult | AmdCompileResult]:
    """Compile every kernel variant for each target in a clean subprocess; return one result per build.

    Args:
        targets: CUDA compute capabilities (``80``, ``90``) and/or AMD targets (``"gfx942"``,
            ``"gfx90a"``); default all four.
        kernels: restrict to these kernel names (default: all of `prefloss.kernels`).
        asm_dir: an existing directory to write each AMD build's ``amdgcn`` listing into, named
            ``<kernel>-<variant>-<dtype>-<target>-BLOCK_V<b>-w<warps>.amdgcn`` (default: none written).
        timeout: seconds allowed per worker process.

    Returns:
        One result per (kernel, variant, dtype, target, config): `CompileResult` for a CUDA target,
        `AmdCompileResult` for an AMD one. A failed build has ``error`` set; a build that spills
        has ``spill_bytes > 0`` (CUDA) or spill counts / scratch > 0 (AMD); ``result.ok`` is False
        for both.

    Raises:
        ValueError: an unknown target or kernel name, or a missing ``asm_dir``.
        RuntimeError: the worker process itself failed (its stderr is in the message).
    """
    targets = tuple(targets)
    _check_targets(targets)
    known = {spec.kernel for spec in _SPECS}
    if kernels is not None and not set(kernels) <= known:
        raise ValueError(f"`kernels` must be among {sorted(known)}, got {sorted(set(kernels) - known)}.")
    if asm_dir is not None and not os.path.isdir(asm_dir):
        raise ValueError(f"`asm_dir` must be an existing directory, got {str(asm_dir)!r}.")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def run_group(group: tuple[int | str, ...]) -> list[CompileResult | AmdCompileResult]:
        names = ",".join(map(str, group))
        cmd = [sys.executable, "-m", "prefloss.commands.compile_report", "--worker", "--targets", names]
        if kernels:
            cmd += ["--kernels", ",".join(kernels)]
        if asm_dir is not None:
            cmd += ["--asm-dir", os.fspath(asm_dir)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(
                f"compile worker for {', '.join(map(target_name, group))} exited {proc.returncode}:\n"
                f"{proc.stderr[-4000:]}"
            )
        rows = json.loads(proc.stdout)
        return [(AmdCompileResult if isinstance(r["target"], str) else CompileResult)(**r) for r in rows]

    # Compilation is single-threaded and the targets are independent: one worker process per CPU,
    # each compiling every n-th target (starting a process, importing torch and triton, costs about
    # as much CPU as compiling all configs of one AMD target).
    n = min(len(targets), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=n) as pool:
        results = [r for rows in pool.map(run_group, [targets[i::n] for i in range(n)]) for r in rows]
    # in the order of `targets`, each target's builds in the worker's order
    return sorted(results, key=lambda r: targets.index(r.target))


def _columns(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return lines


def format_table(results: list[CompileResult | AmdCompileResult]) -> str:
    """Plain-text tables: CUDA builds (registers, spills, shared memory), then AMD builds if any.

    The AMD table: VGPRs/AGPRs/SGPRs per wave, spilled VGPRs/SGPRs, scratch bytes per lane, LDS bytes
    per workgroup, occupancy in waves per SIMD, threads per workgroup (``num_warps · 64``).
    """
    cuda = [r for r in results if not isinstance(r, AmdCompileResult)]
    amd = [r for r in results if isinstance(r, AmdCompileResult)]
    lines = []
    if cuda or not amd:
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
            for r in cuda
        ]
        lines += _columns(header, rows)
    if amd:
        if lines:
            lines.append("")
        header = (
            "kernel", "variant", "dtype", "target", "config", "VGPR", "AGPR", "SGPR",
            "spill V/S", "scratch B", "LDS B", "occupancy", "status",
        )  # fmt: skip
        rows = [
            (
                r.kernel,
                r.variant,
                r.dtype,
                r.target,
                r.config,
                str(r.vgprs),
                str(r.agprs),
                str(r.sgprs),
                f"{r.vgpr_spills}/{r.sgpr_spills}",
                str(r.scratch_bytes),
                str(r.lds_bytes),
                str(r.occupancy),
                "ok" if r.ok else ("ERROR" if r.error else "SPILL"),
            )
            for r in amd
        ]
        lines += _columns(header, rows)
    lines += [
        f"{r.kernel} {r.variant} {r.dtype} {target_name(r.target)} {r.config}: {r.error}"
        for r in (*cuda, *amd)
        if r.error
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--targets",
        default=",".join(map(str, DEFAULT_TARGETS)),
        help="CUDA compute capabilities and/or AMD targets, e.g. 80,90,gfx942 (default: "
        + ",".join(map(str, DEFAULT_TARGETS))
        + ")",
    )
    parser.add_argument("--kernels", default=None, help="comma-separated kernel names (default: all)")
    parser.add_argument("--asm-dir", default=None, help="write each AMD build's amdgcn listing here")
    parser.add_argument("--worker", action="store_true", help="compile in this process and print JSON")
    args = parser.parse_args(argv)
    try:
        targets = parse_targets(args.targets)
    except ValueError:
        parser.error(
            f"--targets must be comma-separated CUDA compute capabilities like 80,90 and/or AMD targets "
            f"among {','.join(AMD_TARGETS)}, got {args.targets!r}"
        )
    kernels = tuple(args.kernels.split(",")) if args.kernels else None
    if args.worker:
        results = _worker(
            list(targets),
            list(kernels) if kernels else None,
            args.asm_dir,
        )
        print(json.dumps([asdict(r) for r in results]))
        return 0
    results = compile_report(targets, kernels=kernels, asm_dir=args.asm_dir)
    print(format_table(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
