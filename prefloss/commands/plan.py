"""``prefloss plan``: a MODEL of one training step of the CUDA path, from the real code on ``meta`` tensors.

No GPU is needed and none is used. The loss module runs forward and backward with
``backend="triton"`` on ``meta`` tensors (shapes and dtypes, no values, no memory): the row kernels
are ``torch.library`` custom ops with fake implementations (`prefloss.fused.custom_ops`), everything else
is the code a GPU would run. A ``TorchDispatchMode`` records, exactly:

- every GEMM (``mm``/``addmm``/``bmm``...): shape, operand and result dtypes, FLOPs ``2·M·N·K``;
- every row-kernel launch (``prefloss::logprobs_fwd`` / ``logprobs_bwd``): bytes read and written;
- every other op's bytes (copies, casts, reductions; views move nothing);
- the live device memory: each storage the step allocates is counted from the op that creates it
  until its last tensor dies (``weakref.finalize``); the peak of that curve is the step's memory
  beyond its inputs (hidden states, heads, labels), gradients included.

Only the time is modelled, as a roofline per operation: ``max(FLOPs / peak rate, bytes / HBM
bandwidth)`` with the datasheet peaks of `GPUS` (dense, no sparsity; fp32-operand GEMMs at the plain
fp32 rate, PyTorch's default ``allow_tf32=False``), summed with no overlap and no launch overhead.
Real GEMMs typically reach 75–85 % of these peaks (not measured by this project): the
modelled time is a lower bound, the effective TFLOP/s an upper bound. Not modelled: the caching
allocator's rounding, cuBLAS workspaces, autotuning, kernel launch latency.

AMD Instinct GPUs (``mi300x``, ``mi325x``, ``mi250x``) get the same model: PyTorch's ROCm build runs
the same code on ``"cuda"`` devices (HIP), so the recorded step is identical and only the peaks
differ. What the model assumes there and nobody has run is listed in `ROCM_UNVERIFIED` and printed
with the model. ``mi250x`` is one GCD, half the package: each of its two dies is a separate PyTorch
device (and rank), so one GCD is what one step runs on.

The floor is the bench's (`prefloss bench`, case ``floor``): the 4 GEMMs any exact method needs,
``h·Wᵀ``, ``h_ref·W_refᵀ``, ``∂h = G·W``, ``∂W = Gᵀ·h`` over the counted tokens (3 with a frozen
head: no ``∂W``), each ``2·N·H·V`` FLOPs at the 16-bit tensor-core rate.
``effective_tflops = floor FLOPs / modelled step time``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefloss.losses import LOSSES as LOSS_CLASSES

LOSSES = tuple(LOSS_CLASSES)
DTYPES = ("bfloat16", "float16", "float32")
# Llama-3-8B: 8192 counted tokens a step, hidden 4096, vocabulary 128256, bf16.
DEFAULTS = {"tokens": 8192, "hidden": 4096, "vocab": 128256, "dtype": "bfloat16"}
GIB = 1024**3


@dataclass(frozen=True)
class GpuSpec:
    """Published peaks of one GPU (dense: the datasheets' "with sparsity" figures halved)."""

    name: str
    tflops_16bit: float  # bf16 and fp16 tensor cores, dense
    tflops_tf32: float | None  # TF32 tensor cores, dense (not used: PyTorch's default
    # allow_tf32=False); None where the GPU has none (MI250X)
    tflops_fp32: float  # plain fp32 (CUDA cores; AMD: fp32 matrix cores, exact fp32): fp32-operand
    # GEMMs under PyTorch's default
    hbm_tb_s: float  # HBM bandwidth, TB/s (10^12 bytes/s)
    memory_gb: float
    source: str


GPUS = {
    "h100": GpuSpec(
        name="NVIDIA H100 SXM5 80GB",
        tflops_16bit=989.5,
        tflops_tf32=494.5,
        tflops_fp32=67.0,
        hbm_tb_s=3.35,
        memory_gb=80,
        source=(
            "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100), H100 SXM column: "
            "BF16/FP16 Tensor Core 1,979 TFLOPS and TF32 989 TFLOPS with sparsity (dense: half), "
            "FP32 67 TFLOPS, GPU memory 80 GB, bandwidth 3.35 TB/s"
        ),
    ),
    "h200": GpuSpec(
        name="NVIDIA H200 SXM 141GB",
        tflops_16bit=989.5,
        tflops_tf32=494.5,
        tflops_fp32=67.0,
        hbm_tb_s=4.8,
        memory_gb=141,
        source=(
            "NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200), H200 SXM column: "
            "BF16/FP16 Tensor Core 1,979 TFLOPS and TF32 989 TFLOPS with sparsity (dense: half), "
            "FP32 67 TFLOPS, GPU memory 141 GB, bandwidth 4.8 TB/s"
        ),
    ),
    "a100": GpuSpec(
        name="NVIDIA A100 SXM4 80GB",
        tflops_16bit=312.0,
        tflops_tf32=156.0,
        tflops_fp32=19.5,
        hbm_tb_s=2.039,
        memory_gb=80,
        source=(
            "NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100), A100 80GB SXM "
            "column: BF16/FP16 Tensor Core 312 TFLOPS (624 with sparsity), TF32 156 TFLOPS, FP32 19.5 "
            "TFLOPS, GPU memory 80 GB HBM2e, bandwidth 2,039 GB/s"
        ),
    ),
}

# AMD Instinct, dense peaks (AMD quotes sparsity separately). fp32-operand GEMMs run on the matrix
# cores in exact fp32 (rocBLAS/hipBLASLt), so `tflops_fp32` is the "FP32 Matrix" figure.
GPUS |= {
    "mi300x": GpuSpec(
        name="AMD Instinct MI300X (OAM) 192GB",
        tflops_16bit=1307.4,
        tflops_tf32=653.7,
        tflops_fp32=163.4,
        hbm_tb_s=5.3,
        memory_gb=192,
        source=(
            "AMD Instinct MI300X accelerator datasheet and product page "
            "(amd.com/en/products/accelerators/instinct/mi300/mi300x.html): peak FP16/BF16 1307.4 TFLOPS "
            "dense (2614.9 with sparsity), TF32 653.7 TFLOPS, FP32 matrix 163.4 TFLOPS, 192 GB HBM3, "
            "peak memory bandwidth 5.3 TB/s"
        ),
    ),
    "mi325x": GpuSpec(
        name="AMD Instinct MI325X (OAM) 256GB",
        tflops_16bit=1307.4,
        tflops_tf32=653.7,
        tflops_fp32=163.4,
        hbm_tb_s=6.0,
        memory_gb=256,
        source=(
            "AMD Instinct MI325X accelerator datasheet and product page "
            "(amd.com/en/products/accelerators/instinct/mi300/mi325x.html): peak FP16/BF16 1307.4 TFLOPS "
            "dense, TF32 653.7 TFLOPS, FP32 matrix 163.4 TFLOPS (the MI300X's compute), 256 GB HBM3E, "
            "peak memory bandwidth 6 TB/s"
        ),
    ),
    "mi250x": GpuSpec(
        name="AMD Instinct MI250X (OAM), one GCD of two, 64GB",
        tflops_16bit=191.5,
        tflops_tf32=None,
        tflops_fp32=47.85,
        hbm_tb_s=1.6384,
        memory_gb=64,
        source=(
            "AMD Instinct MI250X accelerator datasheet and product page "
            "(amd.com/en/products/accelerators/instinct/mi200/mi250x.html), per package of 2 GCDs: peak "
            "FP16/BF16 383 TFLOPS, FP32 matrix 95.7 TFLOPS, no TF32, 128 GB HBM2e, 3.2768 TB/s; halved "
            "here: one GCD is one PyTorch device"
        ),
    ),
}
AMD_GPUS = ("mi300x", "mi325x", "mi250x")
# Parts of the step the AMD model assumes and nobody has run on ROCm (no AMD GPU was available).
ROCM_UNVERIFIED = (
    "the Triton row kernels: compiled for gfx942/gfx90a without spills (prefloss check), never run "
    "on an AMD GPU, so neither their numerics nor their speed is checked there",
    "the backward's 16-bit GEMMs into fp32 (torch.addmm(..., out_dtype=torch.float32)): PyTorch's "
    "source routes them to hipBLASLt or rocBLAS and refuses them ('not supported for ROCm') only "
    "when the CK BLAS backend is preferred; a refusal was also reported on torch 2.9 / ROCm 7.0. "
    "where it is refused the step falls back to fp32 copies of the operands (same numbers, fp32 "
    "rate); the model assumes one 16-bit GEMM at the 16-bit peak, as on CUDA",
    "fp32-operand GEMMs at the FP32 matrix peak (hipBLASLt/rocBLAS; PyTorch's allow_tf32=False)",
    "the peaks themselves: the fraction of them real GEMMs and row kernels reach on these GPUs",
)

_GEMMS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "addbmm", "addbmm_"}
_KERNELS = {"prefloss::logprobs_fwd": "logprobs_fwd", "prefloss::logprobs_bwd": "logprobs_bwd"}
_ALLOCATION_ONLY = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like"}


@dataclass
class GemmRecord:
    """One GEMM of the step: ``[m, k] @ [k, n]`` (``batch`` of them), its operands and result."""

    role: str
    phase: str  # "forward" | "backward"
    m: int
    n: int
    k: int
    batch: int
    a_dtype: str
    b_dtype: str
    out_dtype: str
    flops: float
    bytes: float
    time_s: float = 0.0
    bound: str = ""  # "compute" | "memory"

    @property
    def operands_32bit(self) -> bool:
        return self.a_dtype in ("float32", "float64") or self.b_dtype in ("float32", "float64")


@dataclass
class KernelRecord:
    """One launch of a row kernel, or one other (non-GEMM) op: bytes it reads and writes."""

    name: str
    phase: str
    rows: int
    cols: int
    bytes_read: float
    bytes_written: float
    time_s: float = 0.0


@dataclass
class StepPlan:
    """The model of one step; see the module docstring. Times in seconds, memory in bytes."""

    loss: str
    tokens: int
    hidden: int
    vocab: int
    dtype: str
    gpu: str
    frozen_head: bool
    gpu_spec: GpuSpec
    gemms: list[GemmRecord] = field(default_factory=list)
    kernels: list[KernelRecord] = field(default_factory=list)
    other: list[KernelRecord] = field(default_factory=list)
    peak_bytes: int = 0  # live memory beyond the inputs, peak over the step (gradients included)
    retained_bytes: int = 0  # still live after the step (the gradients)
    gradient_bytes: int = 0  # ∂hidden + ∂weight in the input dtype

    @property
    def floor_gemms(self) -> int:
        return 3 if self.frozen_head else 4

    @property
    def floor_flops(self) -> float:
        return self.floor_gemms * 2.0 * self.tokens * self.hidden * self.vocab

    @property
    def floor_time_s(self) -> float:
        rate = self.gpu_spec.tflops_16bit if self.dtype != "float32" else self.gpu_spec.tflops_fp32
        return self.floor_flops / (rate * 1e12)

    @property
    def gemm_flops(self) -> float:
        return sum(g.flops for g in self.gemms)

    @property
    def gemm_flops_32bit_operands(self) -> float:
        return sum(g.flops for g in self.gemms if g.operands_32bit)

    @property
    def step_time_s(self) -> float:
        return sum(r.time_s for r in (*self.gemms, *self.kernels, *self.other))

    @property
    def effective_tflops(self) -> float:
        return self.floor_flops / self.step_time_s / 1e12

    def parts(self) -> list[dict]:
        """GEMMs grouped by (phase, role, dtypes) and kernels by (phase, name), in step order."""
        groups: dict[tuple, dict] = {}
        for g in self.gemms:
            _add_to_part(
                groups,
                ("gemm", g.phase, g.role, g.a_dtype, g.b_dtype, g.out_dtype),
                operands=f"{_short(g.a_dtype)}×{_short(g.b_dtype)}→{_short(g.out_dtype)}",
                shape=f"[{g.m}x{g.k}]@[{g.k}x{g.n}]" + (f" x{g.batch}" if g.batch > 1 else ""),
                flops=g.flops,
                nbytes=g.bytes,
                time_s=g.time_s,
            )
        for kind, records in (("kernel", self.kernels), ("other", self.other)):
            for r in records:
                _add_to_part(
                    groups,
                    (kind, r.phase, r.name),
                    shape=f"[{r.rows}x{r.cols}]" if kind == "kernel" else None,
                    nbytes=r.bytes_read + r.bytes_written,
                    time_s=r.time_s,
                )
        out = []
        for row in groups.values():
            row["shapes"] = sorted(row["shapes"])
            out.append(row)
        return out

    def to_json(self) -> dict:
        """Everything, as plain JSON types (AMD GPUs add ``rocm_unverified``)."""
        extra = {"rocm_unverified": list(ROCM_UNVERIFIED)} if self.gpu in AMD_GPUS else {}
        return {
            "model": (
                "MODEL, not a measurement: the real step on meta tensors; GEMM shapes/dtypes/FLOPs, kernel "
                "bytes and live memory are exact, times are a roofline from published peaks"
            ),
            "loss": self.loss,
            "tokens": self.tokens,
            "hidden": self.hidden,
            "vocab": self.vocab,
            "dtype": self.dtype,
            "gpu": self.gpu,
            "frozen_head": self.frozen_head,
            "gpu_spec": asdict(self.gpu_spec),
            "floor_gemms": self.floor_gemms,
            "floor_flops": self.floor_flops,
            "floor_time_s": self.floor_time_s,
            "gemm_flops": self.gemm_flops,
            "gemm_flops_to_floor": self.gemm_flops / self.floor_flops,
            "gemm_flops_32bit_operands": self.gemm_flops_32bit_operands,
            "gemm_flops_32bit_operands_fraction": self.gemm_flops_32bit_operands / self.gemm_flops,
            "step_time_s": self.step_time_s,
            "gemm_time_s": sum(g.time_s for g in self.gemms),
            "kernel_time_s": sum(k.time_s for k in self.kernels),
            "other_time_s": sum(k.time_s for k in self.other),
            "effective_tflops": self.effective_tflops,
            "peak_bytes_beyond_inputs": self.peak_bytes,
            "peak_gib_beyond_inputs": self.peak_bytes / GIB,
            "retained_bytes": self.retained_bytes,
            "gradient_bytes": self.gradient_bytes,
            "parts": self.parts(),
            "gemms": [{**asdict(g), "operands_32bit": g.operands_32bit} for g in self.gemms],
            "kernels": [asdict(k) for k in self.kernels],
            **extra,
        }


def _short(dtype: str) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}.get(dtype, dtype)


def _add_to_part(
    groups: dict[tuple, dict],
    key: tuple,
    *,
    operands: str = "",
    shape: str | None = None,
    flops: float = 0.0,
    nbytes: float = 0.0,
    time_s: float = 0.0,
) -> None:
    """Adds one call to the row of `StepPlan.parts` under ``key`` (``(kind, phase, part, ...)``)."""
    kind, phase, part = key[:3]
    row = groups.setdefault(
        key,
        {
            "kind": kind,
            "phase": phase,
            "part": part,
            "operands": operands,
            "calls": 0,
            "shapes": set(),
            "flops": 0.0,
            "bytes": 0.0,
            "time_s": 0.0,
        },
    )
    row["calls"] += 1
    if shape is not None:
        row["shapes"].add(shape)
    row["flops"] += flops
    row["bytes"] += nbytes
    row["time_s"] += time_s


def _dtype_name(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _total_bytes(tensors) -> int:
    return sum(_nbytes(t) for t in tensors)


class _StepRecorder:
    """Builds the ``TorchDispatchMode`` that records GEMMs, kernels, bytes and live storages."""

    def __init__(self, names: dict[int, str], external: set[int]):
        self.names = names  # storage key -> "h", "W", "h_ref", "W_ref"
        self.external = external  # storages that exist before the step (not counted)
        self.phase = "forward"
        self.gemms: list[GemmRecord] = []
        self.kernels: list[KernelRecord] = []
        self.other: list[KernelRecord] = []
        self.live: dict[int, list] = {}  # storage key -> [bytes, number of live tensors]
        self.live_bytes = 0
        self.peak_bytes = 0

    @staticmethod
    def key(t) -> int:
        return t.untyped_storage()._cdata

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            del self.live[key]
            self.names.pop(key, None)  # a later storage may reuse the address

    def track(self, t) -> None:
        k = self.key(t)
        if k in self.external:
            return
        entry = self.live.get(k)
        if entry is None:
            entry = self.live[k] = [t.untyped_storage().nbytes(), 0]
            self.live_bytes += entry[0]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        entry[1] += 1
        weakref.finalize(t, self._release, k)

    def role(self, a, b) -> str:
        ops = {self.names.get(self.key(a), "G"), self.names.get(self.key(b), "G")}
        if ops == {"h", "W"}:
            return "logits h·Wᵀ" if self.phase == "forward" else "recompute h·Wᵀ"
        if ops == {"h_ref", "W_ref"}:
            return "reference h_ref·W_refᵀ"
        if ops == {"G", "W"}:
            return "∂h = G·W" if self.phase == "backward" else "J = G·W (frozen head)"
        if ops == {"G", "h"}:
            return "∂W = Gᵀ·h"
        return "other GEMM"

    def mode(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        recorder = self

        def tensors(values):
            for v in values:
                if isinstance(v, torch.Tensor):
                    yield v
                elif isinstance(v, (list, tuple)):
                    yield from tensors(v)

        def unmutated(values, mutated):
            return [t for t in tensors(values) if all(t is not m for m in mutated)]

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                outs = list(tensors([out]))
                name = func._schema.name
                base = name.split("::", 1)[-1]
                mutated = [
                    a
                    for a, arg in zip(args, func._schema.arguments, strict=False)
                    if arg.alias_info is not None and arg.alias_info.is_write and isinstance(a, torch.Tensor)
                ]
                if base in _GEMMS and name.startswith("aten::"):
                    recorder.gemm(base, args, outs[0])
                elif name in _KERNELS:
                    # a row kernel reads the buffers it writes in place (mutated) as well
                    read = _total_bytes(unmutated(args, mutated)) + _total_bytes(mutated)
                    written = _total_bytes(outs + mutated)
                    rows, cols = args[0].shape
                    recorder.kernels.append(
                        KernelRecord(_KERNELS[name], recorder.phase, rows, cols, read, written)
                    )
                elif not func.is_view and base not in _ALLOCATION_ONLY and outs + mutated:
                    read = _total_bytes(unmutated((*args, *kwargs.values()), mutated))
                    written = _total_bytes(mutated or outs)
                    if read + written:
                        recorder.other.append(KernelRecord(base, recorder.phase, 0, 0, read, written))
                if base == "_to_copy" and recorder.key(args[0]) in recorder.names:  # a cast keeps its name
                    recorder.names[recorder.key(outs[0])] = recorder.names[recorder.key(args[0])]
                for t in outs:
                    recorder.track(t)
                return out

        return Mode()

    def gemm(self, base: str, args, out) -> None:
        a, b = (args[1], args[2]) if base.startswith(("addmm", "baddbmm", "addbmm")) else (args[0], args[1])
        batch = a.shape[0] if a.dim() == 3 else 1
        m, k = a.shape[-2:]
        n = b.shape[-1]
        flops = 2.0 * batch * m * n * k
        moved = _nbytes(a) + _nbytes(b) + _nbytes(out)
        if base.startswith(("addmm", "baddbmm", "addbmm")):
            moved += _nbytes(out)  # reads C as well
        self.gemms.append(
            GemmRecord(
                self.role(a, b),
                self.phase,
                int(m),
                int(n),
                int(k),
                int(batch),
                _dtype_name(a),
                _dtype_name(b),
                _dtype_name(out),
                flops,
                float(moved),
            )
        )


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return value


def plan_step(
    loss: str = "epsilon_dpo",
    *,
    tokens: int = DEFAULTS["tokens"],
    hidden: int = DEFAULTS["hidden"],
    vocab: int = DEFAULTS["vocab"],
    dtype: str = DEFAULTS["dtype"],
    gpu: str = "h100",
    frozen_head: bool = False,
) -> StepPlan:
    """A MODEL of one training step (loss forward + backward) of the CUDA path, without a GPU.

    Runs ``prefloss.<Loss>(backend="triton")`` forward and ``loss.backward()`` on ``meta`` tensors:
    policy hidden states ``[2, tokens/2, hidden]`` (chosen row, rejected row; every token counted)
    that require grad, the LM head ``[vocab, hidden]`` (trainable unless ``frozen_head``), and, for
    the losses with a reference, the reference model's hidden states and head (no grad). GEMMs,
    kernel bytes and live memory are exact for that code; times are the roofline of `GPUS` (see the
    module docstring).

    Args:
        loss: one of `LOSSES`.
        tokens: counted tokens in the step, even (default 8192).
        hidden: hidden size H (default 4096).
        vocab: vocabulary size V (default 128256).
        dtype: ``"bfloat16"`` (default), ``"float16"`` or ``"float32"``: the hidden states and heads.
        gpu: ``"h100"`` (SXM, default), ``"h200"``, ``"a100"`` (SXM 80GB), or AMD ``"mi300x"``,
            ``"mi325x"``, ``"mi250x"`` (one of its two GCDs; see `ROCM_UNVERIFIED`).
        frozen_head: the head takes no gradient (LoRA, frozen head); floor of 3 GEMMs.

    Returns:
        `StepPlan` (``.to_json()``, `format_plan`).
    """
    if loss not in LOSSES:
        raise ValueError(f"`loss` must be one of {LOSSES}, got {loss!r}.")
    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {DTYPES}, got {dtype!r}.")
    if gpu not in GPUS:
        raise ValueError(f"`gpu` must be one of {tuple(GPUS)}, got {gpu!r}.")
    tokens = _check_positive_int("tokens", tokens)
    hidden = _check_positive_int("hidden", hidden)
    vocab = _check_positive_int("vocab", vocab)
    if tokens % 2:
        raise ValueError(
            f"`tokens` must be even (a chosen and a rejected row of tokens/2 each), got {tokens}."
        )

    import torch

    from prefloss.fused import custom_ops  # noqa: F401  (registers the custom ops and their fake kernels)

    tdtype = getattr(torch, dtype)
    meta = {"device": "meta", "dtype": tdtype}
    module = LOSS_CLASSES[loss](backend="triton").to("meta").train()
    h = torch.empty(2, tokens // 2, hidden, **meta, requires_grad=True)
    w = torch.empty(vocab, hidden, **meta, requires_grad=not frozen_head)
    labels = torch.empty(2, tokens // 2, dtype=torch.long, device="meta")
    ref_h = torch.empty(2, tokens // 2, hidden, **meta)
    ref_w = torch.empty(vocab, hidden, **meta)
    inputs = (h, w, labels, ref_h, ref_w, *module.buffers(), *module.parameters())
    key = _StepRecorder.key
    names = {key(h): "h", key(w): "W", key(ref_h): "h_ref", key(ref_w): "W_ref"}
    recorder = _StepRecorder(names, {key(t) for t in inputs})
    kwargs = {"ref_hidden": ref_h, "ref_weight": ref_w} if module.needs_reference else {}
    with recorder.mode():
        out = module(h, w, labels, **kwargs)
        recorder.phase = "backward"
        out.loss.backward()
        del out
    grads = [t.grad for t in (h, w) if t.grad is not None]
    spec = GPUS[gpu]
    plan = StepPlan(
        loss,
        tokens,
        hidden,
        vocab,
        dtype,
        gpu,
        frozen_head,
        spec,
        recorder.gemms,
        recorder.kernels,
        recorder.other,
        recorder.peak_bytes,
        recorder.live_bytes,
        _total_bytes(grads),
    )
    _roofline(plan)
    return plan


def _roofline(plan: StepPlan) -> None:
    spec = plan.gpu_spec
    bandwidth = spec.hbm_tb_s * 1e12
    for g in plan.gemms:
        rate = spec.tflops_fp32 if g.operands_32bit else spec.tflops_16bit
        compute, memory = g.flops / (rate * 1e12), g.bytes / bandwidth
        g.time_s, g.bound = max(compute, memory), "compute" if compute >= memory else "memory"
    for r in (*plan.kernels, *plan.other):
        r.time_s = (r.bytes_read + r.bytes_written) / bandwidth


def format_plan(plan: StepPlan) -> str:
    """The terminal table: parts of the step with FLOPs, bytes and modelled time, then the totals."""
    spec = plan.gpu_spec
    amd = plan.gpu in AMD_GPUS
    path = "GPU path (triton backend) under ROCm" if amd else "CUDA path (triton backend)"
    lines = [
        f"prefloss plan — a MODEL of one {plan.loss} training step of the {path}, not a measurement",
        f"  shapes: {plan.tokens} tokens, H={plan.hidden}, V={plan.vocab}, {plan.dtype}"
        + (", frozen head" if plan.frozen_head else ""),
        f"  GPU: {spec.name}: {spec.tflops_16bit:g} TFLOP/s bf16/fp16 dense, {spec.tflops_fp32:g} fp32, "
        f"{spec.hbm_tb_s:g} TB/s HBM",
        f"  source: {spec.source}",
        "  GEMM shapes/dtypes/FLOPs, kernel bytes and live memory: the real code on meta tensors;",
        "  times are a roofline (max of FLOPs/peak and bytes/bandwidth, no overlap): a lower bound.",
    ]
    if amd:
        lines.append("  unverified on ROCm (never run on an AMD GPU):")
        lines += [f"    - {item}" for item in ROCM_UNVERIFIED]
    lines.append("")
    header = (
        f"{'phase':<9} {'part':<26} {'operands':<16} {'calls':>5} {'TFLOP':>8} {'GB':>8} {'ms':>8}  shapes"
    )
    lines += [header, "-" * len(header)]
    parts = plan.parts()
    other = [p for p in parts if p["kind"] == "other"]
    for p in parts:
        if p["kind"] == "other":
            continue
        shapes = ", ".join(p["shapes"][:2]) + (" ..." if len(p["shapes"]) > 2 else "")
        lines.append(
            f"{p['phase']:<9} {p['part']:<26} {p['operands']:<16} {p['calls']:>5} "
            f"{p['flops'] / 1e12:>8.2f} {p['bytes'] / 1e9:>8.2f} {p['time_s'] * 1e3:>8.2f}  {shapes}"
        )
    for phase in ("forward", "backward"):
        rows = [p for p in other if p["phase"] == phase]
        if rows:
            lines.append(
                f"{phase:<9} {'other ops (copies, casts)':<26} {'':<16} {sum(p['calls'] for p in rows):>5} "
                f"{0:>8.2f} {sum(p['bytes'] for p in rows) / 1e9:>8.2f} "
                f"{sum(p['time_s'] for p in rows) * 1e3:>8.2f}"
            )
    lines += [
        "-" * len(header),
        f"GEMM FLOPs: {plan.gemm_flops / 1e12:.2f} T = {plan.gemm_flops / plan.floor_flops:.3f} x the "
        f"{plan.floor_gemms}-GEMM floor ({plan.floor_flops / 1e12:.2f} T); with 32-bit operands: "
        f"{plan.gemm_flops_32bit_operands / plan.gemm_flops:.1%}",
        f"modelled step time: {plan.step_time_s * 1e3:.2f} ms (floor {plan.floor_time_s * 1e3:.2f} ms) -> "
        f"effective {plan.effective_tflops:.0f} TFLOP/s (MODEL)",
        f"modelled peak device memory beyond the inputs: {plan.peak_bytes / GIB:.3f} GiB "
        f"(gradients {plan.gradient_bytes / GIB:.3f} GiB of it; "
        f"{plan.retained_bytes / GIB:.3f} GiB live after the step)",
    ]
    return "\n".join(lines)


def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name} must be a positive integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"--{name} must be a positive integer, got {text!r}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loss", choices=LOSSES, default="epsilon_dpo", help="loss (default epsilon_dpo)")
    for name, help_text in (
        ("tokens", "counted tokens (default 8192)"),
        ("hidden", "hidden size H (default 4096)"),
        ("vocab", "vocabulary V (default 128256)"),
    ):
        parser.add_argument(f"--{name}", type=_positive_int(name), default=DEFAULTS[name], help=help_text)
    parser.add_argument(
        "--dtype", choices=DTYPES, default=DEFAULTS["dtype"], help="input dtype (default bfloat16)"
    )
    parser.add_argument(
        "--gpu",
        choices=tuple(GPUS),
        default="h100",
        help="h100 (SXM, default), h200, a100, mi300x, mi325x, mi250x (one GCD)",
    )
    parser.add_argument("--frozen-head", action="store_true", help="the LM head takes no gradient")
    parser.add_argument("--json", metavar="PATH", type=Path, default=None, help="write the model as JSON")


def run(args) -> int:
    if args.tokens % 2:
        print(
            f"prefloss plan: error: --tokens must be even (chosen and rejected rows), got {args.tokens}",
            file=sys.stderr,
        )
        return 2
    plan = plan_step(
        args.loss,
        tokens=args.tokens,
        hidden=args.hidden,
        vocab=args.vocab,
        dtype=args.dtype,
        gpu=args.gpu,
        frozen_head=args.frozen_head,
    )
    print(format_plan(plan))
    if args.json is not None:
        data = plan.to_json()
        if not all(math.isfinite(v) for v in (data["effective_tflops"], data["step_time_s"])):
            raise RuntimeError("the model produced a non-finite time")
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1))
        print(f"wrote {args.json}")
    return 0
