"""Row kernels of the fused log-prob op: log-softmax at the label, and its gradient, in one pass over V.

Each chunk of ``n`` token rows arrives here as raw GEMM output ``raw = h @ W.T`` (``[n, V]``, fp32, bf16
or fp16; produced by `prefloss.fused.op`). The kernels apply the model's logit transform

    z = softcap * tanh(((raw + bias) * logit_scale) / softcap)      (each step only when given)

and reduce every row with an fp32 online log-sum-exp, so that no ``[n, V]`` fp32 copy is ever made.
They compute exactly what `prefloss.fused.rows.logprobs_fwd` / `logprobs_bwd` compute in PyTorch:

    logp  = z[y] - logsumexp(z)                          lse = logsumexp(z)   (saved for backward)
    ref   = z_ref[y] - logsumexp(z_ref)
    minus = g[y] - logsumexp(g),  g = (1 + eps) * z - eps * z_ref
    plus  = g[y] - logsumexp(g),  g = (1 - eps) * z + eps * z_ref
    d raw = grad * (onehot(y) - softmax(z)) * logit_scale * (1 - (z / softcap) ** 2)

Cost per training step of the chunk loop around these kernels, in units of one ``N·H·V`` GEMM: policy
forward 1, reference 1, recompute in backward 1, backward 2; with a frozen head, forward 1 + 1 + 1
(``J = ∂logp/∂h`` from the same chunk) and no backward GEMM (`prefloss.fused.op`). The row
kernels themselves read each logit once (forward: policy and reference rows; backward: policy rows,
overwritten in place) and add no memory beyond their ``[n]`` fp32 outputs; the peak extra memory of
the op is the chunk's ``[C, V]`` logit buffers, O(C·V), independent of batch size and sequence length.

The file reads top to bottom: the jit kernels, then their autotuned wrappers, then the launchers.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from prefloss.fused.rows import RowStats, check_bwd_args, check_fwd_args

__all__ = [
    "BWD_CONFIGS",
    "FWD_CONFIGS",
    "INTERPRET",
    "logprobs_bwd",
    "logprobs_bwd_kernel",
    "logprobs_fwd",
    "logprobs_fwd_kernel",
]

# The interpreter decides at decoration time (see docs/environment.md); so does the config list below.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Triton's interpreter converts fp32 -> bf16 by truncation where GPUs round to nearest even; the
# truncation biases every stored gradient toward zero and the bias accumulates in the backward GEMMs.
# Under the interpreter the backward kernel rounds by hand first (compiled code never sees this).
_ROUND_BF16_BY_HAND = tl.constexpr(INTERPRET)


@triton.jit
def _tanh(b_u):
    """tanh(u) = sign(u)·(1 − e)/(1 + e), e = exp(−2|u|): no overflow, same code on every target."""
    b_e = tl.exp(-2.0 * tl.abs(b_u))
    b_t = (1.0 - b_e) / (1.0 + b_e)
    return tl.where(b_u < 0, -b_t, b_t)


@triton.jit
def logprobs_fwd_kernel(
    logits_ptr,
    ref_ptr,
    labels_ptr,
    bias_ptr,
    ref_bias_ptr,
    logp_ptr,
    lse_ptr,
    ref_out_ptr,
    minus_ptr,
    plus_ptr,
    stride_n,
    stride_ref_n,
    V,
    epsilon,
    logit_scale,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_REF_BIAS: tl.constexpr,
    HAS_EPS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row: fp32 online log-sum-exp of up to four logit streams over V tiles.

    The streams share one load of the policy (and reference) tile: ``z``, ``z_ref`` and the two
    ε-mixtures. The label's logit is loaded once, outside the loop.
    """
    # int64 before multiplying by the row stride: n * V can exceed 2**31.
    i_n = tl.program_id(0).to(tl.int64)
    o_row = i_n * stride_n
    o_ref_row = i_n * stride_ref_n
    b_y = tl.load(labels_ptr + i_n)

    # The label's transformed logit, for each stream.
    b_zy = tl.load(logits_ptr + o_row + b_y).to(tl.float32)
    if HAS_BIAS:
        b_zy += tl.load(bias_ptr + b_y).to(tl.float32)
    if HAS_SCALE:
        b_zy *= logit_scale
    if HAS_SOFTCAP:
        b_zy = softcap * _tanh(b_zy / softcap)
    b_zry = 0.0
    if HAS_REF:
        b_zry = tl.load(ref_ptr + o_ref_row + b_y).to(tl.float32)
        if HAS_REF_BIAS:
            b_zry += tl.load(ref_bias_ptr + b_y).to(tl.float32)
        if HAS_SCALE:
            b_zry *= logit_scale
        if HAS_SOFTCAP:
            b_zry = softcap * _tanh(b_zry / softcap)

    # Running max and rescaled sum of exponentials, one pair per stream.
    b_m = float("-inf")
    b_s = 0.0
    b_mr = float("-inf")
    b_sr = 0.0
    b_mm = float("-inf")
    b_sm = 0.0
    b_mp = float("-inf")
    b_sp = 0.0
    o_v = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        o_col = v0 + o_v
        m_col = o_col < V
        b_z = tl.load(logits_ptr + o_row + o_col, mask=m_col, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b_z += tl.load(bias_ptr + o_col, mask=m_col, other=0.0).to(tl.float32)
        if HAS_SCALE:
            b_z *= logit_scale
        if HAS_SOFTCAP:
            b_z = softcap * _tanh(b_z / softcap)
        # Masked lanes become -inf only after any arithmetic that mixes streams (inf - inf = nan).
        b_zm = tl.where(m_col, b_z, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_zm, axis=0))
        b_s = b_s * tl.exp(b_m - b_m_new) + tl.sum(tl.exp(b_zm - b_m_new), axis=0)
        b_m = b_m_new
        if HAS_REF:
            b_zr = tl.load(ref_ptr + o_ref_row + o_col, mask=m_col, other=0.0).to(tl.float32)
            if HAS_REF_BIAS:
                b_zr += tl.load(ref_bias_ptr + o_col, mask=m_col, other=0.0).to(tl.float32)
            if HAS_SCALE:
                b_zr *= logit_scale
            if HAS_SOFTCAP:
                b_zr = softcap * _tanh(b_zr / softcap)
            b_zrm = tl.where(m_col, b_zr, float("-inf"))
            b_m_new = tl.maximum(b_mr, tl.max(b_zrm, axis=0))
            b_sr = b_sr * tl.exp(b_mr - b_m_new) + tl.sum(tl.exp(b_zrm - b_m_new), axis=0)
            b_mr = b_m_new
            if HAS_EPS:
                b_g = tl.where(m_col, (1.0 + epsilon) * b_z - epsilon * b_zr, float("-inf"))
                b_m_new = tl.maximum(b_mm, tl.max(b_g, axis=0))
                b_sm = b_sm * tl.exp(b_mm - b_m_new) + tl.sum(tl.exp(b_g - b_m_new), axis=0)
                b_mm = b_m_new
                b_g = tl.where(m_col, (1.0 - epsilon) * b_z + epsilon * b_zr, float("-inf"))
                b_m_new = tl.maximum(b_mp, tl.max(b_g, axis=0))
                b_sp = b_sp * tl.exp(b_mp - b_m_new) + tl.sum(tl.exp(b_g - b_m_new), axis=0)
                b_mp = b_m_new

    b_lse = b_m + tl.log(b_s)
    tl.store(lse_ptr + i_n, b_lse)
    tl.store(logp_ptr + i_n, b_zy - b_lse)
    if HAS_REF:
        tl.store(ref_out_ptr + i_n, b_zry - (b_mr + tl.log(b_sr)))
        if HAS_EPS:
            b_gy = (1.0 + epsilon) * b_zy - epsilon * b_zry
            tl.store(minus_ptr + i_n, b_gy - (b_mm + tl.log(b_sm)))
            b_gy = (1.0 - epsilon) * b_zy + epsilon * b_zry
            tl.store(plus_ptr + i_n, b_gy - (b_mp + tl.log(b_sp)))


@triton.jit
def logprobs_bwd_kernel(
    logits_ptr,
    labels_ptr,
    lse_ptr,
    grad_ptr,
    bias_ptr,
    stride_n,
    V,
    logit_scale,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row: overwrite the raw row with ``grad * (onehot(y) - softmax(z)) * dz/draw``."""
    i_n = tl.program_id(0).to(tl.int64)
    o_row = i_n * stride_n
    b_y = tl.load(labels_ptr + i_n)
    b_lse = tl.load(lse_ptr + i_n)
    b_grad = tl.load(grad_ptr + i_n)
    o_v = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        o_col = v0 + o_v
        m_col = o_col < V
        b_raw = tl.load(logits_ptr + o_row + o_col, mask=m_col, other=0.0)
        b_z = b_raw.to(tl.float32)
        if HAS_BIAS:
            b_z += tl.load(bias_ptr + o_col, mask=m_col, other=0.0).to(tl.float32)
        if HAS_SCALE:
            b_z *= logit_scale
        if HAS_SOFTCAP:
            b_t = _tanh(b_z / softcap)
            b_z = softcap * b_t
        b_p = tl.exp(b_z - b_lse)
        b_d = b_grad * (tl.where(o_col == b_y, 1.0, 0.0) - b_p)
        if HAS_SOFTCAP:
            # d/du softcap * tanh(u / softcap) = 1 - tanh(u / softcap)**2
            b_d *= 1.0 - b_t * b_t
        if HAS_SCALE:
            b_d *= logit_scale
        if _ROUND_BF16_BY_HAND:
            if b_raw.dtype == tl.bfloat16:
                # Round to nearest even on the bits: the truncating conversion below is then exact.
                b_bits = b_d.to(tl.uint32, bitcast=True)
                b_bits += 0x7FFF + ((b_bits >> 16) & 1)
                b_d = ((b_bits >> 16) << 16).to(tl.float32, bitcast=True)
        tl.store(logits_ptr + o_row + o_col, b_d.to(b_raw.dtype), mask=m_col)


# Tile sizes a GPU may choose among (each compiled for sm_80 / sm_90 without spills by
# `prefloss.commands.compile_report`). Under the interpreter there is no benchmarker and the cost
# is set by the number of programs and loop trips, so a single wide tile is used.
if INTERPRET:
    FWD_CONFIGS = [triton.Config({"BLOCK_V": 16384}, num_warps=4)]
    BWD_CONFIGS = [triton.Config({"BLOCK_V": 16384}, num_warps=4)]
else:
    FWD_CONFIGS = [
        triton.Config({"BLOCK_V": 1024}, num_warps=4),
        triton.Config({"BLOCK_V": 2048}, num_warps=8),
        triton.Config({"BLOCK_V": 4096}, num_warps=8),
        triton.Config({"BLOCK_V": 4096}, num_warps=16),
    ]
    BWD_CONFIGS = [
        triton.Config({"BLOCK_V": 1024}, num_warps=4),
        triton.Config({"BLOCK_V": 2048}, num_warps=8),
        triton.Config({"BLOCK_V": 4096}, num_warps=8),
    ]


def _prune_wide_tiles(configs, named_args, **kwargs):
    """Drop tiles wider than the vocabulary rounded up (they only add masked lanes); keep at least one."""
    width = triton.next_power_of_2(named_args["V"])
    kept = [c for c in configs if c.kwargs["BLOCK_V"] <= width]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_V"])]


_logprobs_fwd_tuned = triton.autotune(
    configs=FWD_CONFIGS,
    key=["V", "HAS_REF", "HAS_EPS", "HAS_SOFTCAP"],
    prune_configs_by={"early_config_prune": _prune_wide_tiles},
)(logprobs_fwd_kernel)

# The backward kernel writes in place: benchmarking several configs must restore the rows (the
# autotuner then copies the buffer once, at the first call per key; never on later calls).
_logprobs_bwd_tuned = triton.autotune(
    configs=BWD_CONFIGS,
    key=["V", "HAS_SOFTCAP"],
    prune_configs_by={"early_config_prune": _prune_wide_tiles},
    restore_value=["logits_ptr"],
)(logprobs_bwd_kernel)


def _launch_meta(block_v: int | None, num_warps: int | None) -> dict:
    """Explicit tile (no autotuning); ``num_warps`` defaults to one warp per 256 lanes, in [1, 16]."""
    if block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"`block_v` must be a power of 2 >= 16, got {block_v}.")
    warps = num_warps if num_warps is not None else min(16, max(1, block_v // 256))
    return {"BLOCK_V": block_v, "num_warps": warps}


def logprobs_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    epsilon: float | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> RowStats:
    """Log-probabilities of ``labels`` under the policy, reference and the two ε-mixtures (Triton).

    Same contract as `prefloss.fused.rows.logprobs_fwd`; equivalent to, in fp32,
    ``z = transform(logits); logp = z.gather(1, y[:, None]) - z.logsumexp(1)`` (and likewise for
    ``z_ref`` and the mixtures ``(1+ε) z − ε z_ref`` / ``(1−ε) z + ε z_ref``) without materialising
    ``z``: one program per row, one pass over V. Matmuls: none (the caller's GEMMs produce the rows).
    Extra memory: the ``[n]`` fp32 outputs only. The inputs are not modified.

    Args:
        logits: ``[n, V]`` raw policy rows ``h @ W.T``, fp32/bf16/fp16, unit stride along V.
        labels: ``[n]`` int64, every entry in ``[0, V)`` (not checked: no host sync).
        bias: ``[V]`` policy LM-head bias or ``None``.
        ref_logits: ``[n, V]`` raw reference rows or ``None``.
        ref_bias: ``[V]`` reference bias or ``None``.
        epsilon: ε to also return ``minus`` and ``plus``; needs ``ref_logits``. Runtime argument: a
            new value does not recompile.
        logit_scale: multiplies ``raw + bias`` (Cohere-style), or ``None``.
        softcap: ``c`` in ``c·tanh(z / c)`` (Gemma-2-style), or ``None``.
        block_v: tile width along V (power of 2); ``None`` lets the autotuner choose (on a GPU it
            benchmarks its configs once per vocabulary size and flag set, at the first call).
        num_warps: warps per program with an explicit ``block_v``; default ``block_v // 256``.

    Returns:
        `RowStats` of ``[n]`` float32 tensors (``ref``/``minus``/``plus`` ``None`` when not asked for).
    """
    check_fwd_args(logits, labels, ref_logits, epsilon)
    n, V = logits.shape
    has_ref = ref_logits is not None
    has_eps = epsilon is not None
    labels = labels.contiguous()
    f32 = {"dtype": torch.float32, "device": logits.device}
    logp = torch.empty(n, **f32)
    lse = torch.empty(n, **f32)
    ref = torch.empty(n, **f32) if has_ref else None
    minus = torch.empty(n, **f32) if has_eps else None
    plus = torch.empty(n, **f32) if has_eps else None
    if n == 0:
        return RowStats(logp, lse, ref, minus, plus)
    # Absent tensors still need a pointer argument; the HAS_* flags keep the kernel from touching it.
    args = (
        logits,
        ref_logits if has_ref else logits,
        labels,
        bias.contiguous() if bias is not None else logits,
        ref_bias.contiguous() if has_ref and ref_bias is not None else logits,
        logp,
        lse,
        ref if has_ref else lse,
        minus if has_eps else lse,
        plus if has_eps else lse,
        logits.stride(0),
        ref_logits.stride(0) if has_ref else 0,
        V,
        float(epsilon) if has_eps else 0.0,
        float(logit_scale) if logit_scale is not None else 1.0,
        float(softcap) if softcap is not None else 1.0,
    )
    flags = {
        "HAS_BIAS": bias is not None,
        "HAS_REF": has_ref,
        "HAS_REF_BIAS": has_ref and ref_bias is not None,
        "HAS_EPS": has_eps,
        "HAS_SCALE": logit_scale is not None,
        "HAS_SOFTCAP": softcap is not None,
    }
    if block_v is None:
        _logprobs_fwd_tuned[(n,)](*args, **flags)
    else:
        logprobs_fwd_kernel[(n,)](*args, **flags, **_launch_meta(block_v, num_warps))
    return RowStats(logp, lse, ref, minus, plus)


def logprobs_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Gradient of ``Σ_t grad[t] · logp[t]`` w.r.t. the raw rows, written in place into ``logits`` (Triton).

    Same contract as `prefloss.fused.rows.logprobs_bwd`:
    ``d raw[t] = grad[t] · (onehot(y_t) − softmax(z_t)) · logit_scale · (1 − (z_t / softcap)²)``
    (each factor only when its transform is used), ``softmax(z_t) = exp(z_t − lse[t])`` from the saved
    ``lse``. One program per row, one pass over V; the result is rounded once, to ``logits.dtype``.
    Matmuls: none (the caller recomputes the rows, 1 GEMM, and applies ``∂h = d·W`` and
    ``∂W += dᵀ·h``, 2 GEMMs; a frozen head calls it in the forward, with unit ``grad``, to form
    ``J = d·W``). Extra memory: none.

    Args:
        logits: ``[n, V]`` raw policy rows (recomputed), unit stride along V; overwritten.
        labels: ``[n]`` int64; a label outside ``[0, V)`` adds no one-hot term, so ``logits`` may be
            a tile of columns ``[v0, v0 + V)`` of the full rows with ``labels − v0`` (the triton
            backend's backward does this; the kernel never loads at the label).
        lse: ``[n]`` float32 from `logprobs_fwd`.
        grad: ``[n]`` float32 upstream gradient of each row's log-prob.
        bias, logit_scale, softcap: as in `logprobs_fwd`.
        block_v, num_warps: as in `logprobs_fwd`.

    Returns:
        ``logits``, now holding ``∂/∂raw`` (the bias gradient is its column sum).
    """
    check_bwd_args(logits, labels, lse, grad)
    n, V = logits.shape
    if n == 0:
        return logits
    args = (
        logits,
        labels.contiguous(),
        lse.float().contiguous(),
        grad.float().contiguous(),
        bias.contiguous() if bias is not None else logits,
        logits.stride(0),
        V,
        float(logit_scale) if logit_scale is not None else 1.0,
        float(softcap) if softcap is not None else 1.0,
    )
    flags = {
        "HAS_BIAS": bias is not None,
        "HAS_SCALE": logit_scale is not None,
        "HAS_SOFTCAP": softcap is not None,
    }
    if block_v is None:
        _logprobs_bwd_tuned[(n,)](*args, **flags)
    else:
        logprobs_bwd_kernel[(n,)](*args, **flags, **_launch_meta(block_v, num_warps))
    return logits
