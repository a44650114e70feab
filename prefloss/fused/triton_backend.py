"""The ``"triton"`` backend: ``[C, V]`` row chunks, GEMMs in torch, row reductions in Triton.

For each chunk of ``C`` counted rows, one GEMM per model (cuBLAS on a GPU) writes the chunk's raw
logit rows into a reused ``[C, V]`` buffer, and `prefloss.kernels.logprobs.logprobs_fwd` reduces them in one
pass (policy, reference and the two ε-mixtures from the same loads). Backward recomputes the policy
rows tile by tile over the vocabulary, `prefloss.kernels.logprobs.logprobs_bwd` overwrites them in place
with ``∂/∂raw``, then ``∂h += G @ W[tile]`` (fp32 accumulator) and ``∂W[tile] = Gᵀ @ h`` (one
full-depth GEMM rounded once; see `backward`): with 16-bit inputs every GEMM takes 16-bit operands
and accumulates in fp32, and no fp32 copy of a chunk or of ``W`` exists. Matmul work per step, in units of one
``N·H·V`` GEMM: forward 1 (+1 reference), backward 3. With a frozen head (only ``∂hidden``
wanted) the forward also forms ``J = ∂logp/∂h`` (`forward`: the backward kernel with an upstream
gradient of ones over the rows it already holds, then one GEMM) and the backward is a per-row
scale in `prefloss.fused.op`: 3 GEMMs a step with a reference instead of 4. Peak extra memory: one
``[C, V]`` buffer per model, O(C·V), independent of batch size and sequence length; ``J`` is
``[n, H]`` in ``hidden``'s dtype, the size of ``∂hidden``.
The kernels are imported on first use: ``TRITON_INTERPRET`` must be decided before that import.
"""

from __future__ import annotations

import torch

from prefloss.fused.chunks import HeadInputs


def _kernels():
    # The launchers as torch.library custom ops (same signatures): they trace on meta tensors and
    # inside torch.compile, and still launch the Triton kernels on real tensors.
    from prefloss.fused import custom_ops as kernel_ops

    return kernel_ops


def forward(x: HeadInputs, opts, acc_dtype, jacobian: bool = False):
    """Per-row log-probs ``(logp, lse, ref, minus, plus, jac)``: each ``[n]`` (``None`` when not
    asked for), and with ``jacobian`` the ``[n, H]`` rows ``J_t = ∂logp_t/∂h_t`` in ``hidden``'s
    dtype (else ``None``).

    ``x`` (`HeadInputs`): the policy's and the reference's heads, and which rows count.

    ``J`` (frozen head): once `prefloss.kernels.logprobs.logprobs_fwd` has each row's lse, the chunk's raw
    rows are not needed any more, so `prefloss.kernels.logprobs.logprobs_bwd` with an upstream gradient of
    ones overwrites them with ``∂logp/∂raw`` and ``J = buf @ W`` (one GEMM, ``hidden``'s dtype,
    the same GEMM as the trainable backward's ``∂h``).
    """
    hidden, weight, bias, labels, rows = x.hidden, x.weight, x.bias, x.labels, x.rows
    ref_hidden, ref_weight, ref_bias = x.ref_hidden, x.ref_weight, x.ref_bias
    kernels = _kernels()
    n, vocab = rows.count, weight.shape[0]
    has_ref = ref_hidden is not None
    want_mix = has_ref and opts.epsilon is not None

    def new(wanted=True):
        return torch.empty(n, dtype=acc_dtype, device=hidden.device) if wanted else None

    logp, lse, ref, minus, plus = new(), new(), new(has_ref), new(want_mix), new(want_mix)
    c = max(1, min(opts.chunk_size, n))
    buf = hidden.new_empty((c, vocab))
    ref_buf = ref_hidden.new_empty((c, vocab)) if has_ref else None
    jac = hidden.new_empty((n, hidden.shape[1])) if jacobian else None
    ones = torch.ones(c, dtype=torch.float32, device=hidden.device) if jacobian else None
    for r0, r1 in rows.chunks(c):
        logits = torch.mm(rows.take(hidden, r0, r1), weight.T, out=buf[: r1 - r0])
        ref_logits = None
        if has_ref:
            ref_logits = torch.mm(rows.take(ref_hidden, r0, r1), ref_weight.T, out=ref_buf[: r1 - r0])
        stats = kernels.logprobs_fwd(
            logits,
            labels[r0:r1],
            bias=bias,
            ref_logits=ref_logits,
            ref_bias=ref_bias,
            epsilon=opts.epsilon if want_mix else None,
            logit_scale=opts.logit_scale,
            softcap=opts.softcap,
        )
        for out, value in (
            (logp, stats.logp),
            (lse, stats.lse),
            (ref, stats.ref),
            (minus, stats.minus),
            (plus, stats.plus),
        ):
            if out is not None:
                out[r0:r1] = value
        if jacobian:  # logprobs_fwd leaves its inputs intact: the raw rows are still in buf
            kernels.logprobs_bwd(
                logits,
                labels[r0:r1],
                stats.lse,
                ones[: r1 - r0],
                bias=bias,
                logit_scale=opts.logit_scale,
                softcap=opts.softcap,
            )
            torch.mm(logits, weight, out=jac[r0:r1])
    return logp, lse, ref, minus, plus, jac


# Backward row blocks: the fp32 ∂h accumulator of one block is [R, H] with R·H at most this many
# elements (128 MiB: R = 8192 rows at H = 4096, one block for a Llama-3-8B step of 8192 tokens).
# Module-level so tests can shrink it and exercise several blocks.
BWD_BLOCK_ELEMENTS = 1 << 25


# Whether ``addmm(..., out_dtype=fp32)`` with 16-bit operands runs on this process's GPU; set to False
# the first time a ROCm build refuses it (its CK BLAS backend does; hipBLASLt and rocBLAS do not).
_OUT_DTYPE_GEMM = {"ok": True}


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b``, ``acc`` fp32 (or float64), ``a``/``b`` in the input dtype.

    CUDA (and meta): one GEMM with 16-bit operands accumulating in fp32 (``out_dtype``), no upcast
    copy. CPU (Triton's interpreter; ``out_dtype`` does not exist there), and a ROCm build that
    refuses ``out_dtype``: the same numbers by upcasting the operands, since a product of two
    bf16/fp16 values is exact in fp32 (one fp32 copy of ``a`` and ``b`` more, a slower GEMM).
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.device.type != "cpu" and _OUT_DTYPE_GEMM["ok"]:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except RuntimeError:
            if torch.version.hip is None:  # CUDA supports it: a real error
                raise
            _OUT_DTYPE_GEMM["ok"] = False
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _grad_w_tile_(out: torch.Tensor, d: torch.Tensor, h: torch.Tensor, accumulate: bool) -> None:
    """``out = dᵀ @ h`` (``+ out`` when ``accumulate``) in ``out``'s dtype (the weight's).

    CUDA: one full-depth GEMM over the block's rows, 16-bit operands, fp32 accumulation inside the
    GEMM, rounded once to ``out``'s dtype; with ``accumulate`` cuBLAS adds ``out`` in fp32 before
    that one rounding (``beta = 1``). CPU (interpreter): the same numbers with upcast operands.
    """
    if d.device.type == "cpu" and d.dtype in (torch.bfloat16, torch.float16):
        acc = torch.mm(d.T.float(), h.float())
        out.copy_(acc.add_(out.float()) if accumulate else acc)
    elif accumulate:
        out.addmm_(d.T, h)
    else:
        torch.mm(d.T, h, out=out)


def backward(x: HeadInputs, lse, grad, opts, need, acc_dtype):
    """Gradients of ``Σ_t grad[t]·logp[t]``: ``(∂hidden [N, H], ∂weight, ∂bias)``, ``None`` where
    ``need`` (three booleans) says so; ∂hidden and ∂weight in the inputs' dtype, ∂bias in
    ``acc_dtype``.

    Tiled over the vocabulary, so that every GEMM takes the inputs' dtype (16-bit operands on
    tensor cores, fp32 accumulation) and no ``[V, H]`` fp32 accumulator exists. For each block of
    ``R`` counted rows (all of them unless ``R·H`` exceeds `BWD_BLOCK_ELEMENTS`) and each tile of
    ``V_t`` vocabulary columns (``R·V_t`` about the forward's ``C·V`` buffer):

    1. ``D = h_R @ W[tile]ᵀ`` into one reused ``[R, V_t]`` buffer (the recompute, 16-bit);
    2. `prefloss.kernels.logprobs.logprobs_bwd` overwrites ``D`` with ``∂/∂raw`` (labels shifted by the
       tile's start: a label outside the tile adds no one-hot term), rounded once to 16 bits;
    3. ``∂h_R += D @ W[tile]`` into an ``[R, H]`` fp32 accumulator (16-bit operands, fp32 result);
    4. ``∂W[tile] = Dᵀ @ h_R``: one GEMM over the block's whole depth R, accumulating in fp32 and
       rounded once to the weight's dtype, written straight into the gradient. With several row
       blocks the next block adds in fp32 inside the GEMM and rounds again (one rounding per block).

    GEMM work: 3 units of ``n·H·V`` (recompute, ∂h, ∂W), as before. Memory: ∂W in the weight's
    dtype (``2·V·H`` bytes in bf16, instead of a ``4·V·H`` fp32 accumulator plus its cast), the
    ``[R, V_t]`` tile buffer and the ``[R, H]`` fp32 ∂h accumulator.
    """
    hidden, weight, bias, labels, rows = x.hidden, x.weight, x.bias, x.labels, x.rows
    kernels = _kernels()
    need_h, need_w, need_b = need
    n, vocab, width = rows.count, weight.shape[0], weight.shape[1]
    grad_h = rows.new_grad(hidden) if need_h else None
    grad_w = None
    if need_w:  # every tile is written by the first row block; nothing to write when n == 0
        grad_w = torch.empty_like(weight) if n else torch.zeros_like(weight)
    grad_b = torch.zeros(vocab, dtype=acc_dtype, device=weight.device) if need_b else None
    if n == 0:
        return grad_h, grad_w, grad_b
    c = max(1, min(opts.chunk_size, n))
    block = max(1, min(n, BWD_BLOCK_ELEMENTS // max(width, 1)))
    tile = min(vocab, max(16, (c * vocab // block) // 16 * 16))
    buf = hidden.new_empty(block * tile)
    for r0, r1 in rows.chunks(block):
        h, m = rows.take(hidden, r0, r1), r1 - r0
        y, block_lse, g = labels[r0:r1], lse[r0:r1], grad[r0:r1]
        acc_h = torch.zeros((m, width), dtype=acc_dtype, device=hidden.device) if need_h else None
        for v0 in range(0, vocab, tile):
            v1 = min(v0 + tile, vocab)
            w_tile = weight[v0:v1]
            d = torch.mm(h, w_tile.T, out=buf[: m * (v1 - v0)].view(m, v1 - v0))
            kernels.logprobs_bwd(
                d,
                y - v0,
                block_lse,
                g,
                bias=None if bias is None else bias[v0:v1],
                logit_scale=opts.logit_scale,
                softcap=opts.softcap,
            )
            if need_h:
                _addmm_fp32_(acc_h, d, w_tile)
            if need_w:
                _grad_w_tile_(grad_w[v0:v1], d, h, accumulate=r0 > 0)
            if need_b:
                grad_b[v0:v1] += d.sum(0, dtype=acc_dtype)
        if need_h:
            rows.put_(grad_h, r0, r1, acc_h)
    return grad_h, grad_w, grad_b
