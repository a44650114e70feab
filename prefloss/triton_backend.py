"""The ``"triton"`` backend: ``[C, V]`` row chunks, GEMMs in torch, row reductions in Triton.

For each chunk of ``C`` counted rows, one GEMM per model (cuBLAS on a GPU) writes the chunk's raw
logit rows into a reused ``[C, V]`` buffer, and `prefloss.kernels.logprobs_fwd` reduces them in one
pass (policy, reference and the two ε-mixtures from the same loads). Backward recomputes the policy
rows, `prefloss.kernels.logprobs_bwd` overwrites them in place with ``∂/∂raw``, then
``∂h = G @ W`` and ``∂W += Gᵀ @ h`` (fp32 accumulation). Matmul work per step, in units of one
``N·H·V`` GEMM: forward 1 (+1 reference), backward 3. With a frozen head (only ``∂hidden``
wanted) the forward also forms ``J = ∂logp/∂h`` (`forward`: the backward kernel with an upstream
gradient of ones over the rows it already holds, then one GEMM) and the backward is a per-row
scale in `prefloss.ops`: 3 GEMMs a step with a reference instead of 4. Peak extra memory: one
``[C, V]`` buffer per model, O(C·V), independent of batch size and sequence length; ``J`` is
``[n, H]`` in ``hidden``'s dtype, the size of ``∂hidden``.
The kernels are imported on first use: ``TRITON_INTERPRET`` must be decided before that import.
"""

from __future__ import annotations

import torch

from prefloss.chunks import CountedRows, new_grads


def _kernels():
    # The launchers as torch.library custom ops (same signatures): they trace on meta tensors and
    # inside torch.compile, and still launch the Triton kernels on real tensors.
    from prefloss import kernel_ops

    return kernel_ops


def forward(
    hidden,
    weight,
    bias,
    labels,
    rows: CountedRows,
    ref_hidden,
    ref_weight,
    ref_bias,
    opts,
    acc_dtype,
    jacobian: bool = False,
):
    """Per-row log-probs ``(logp, lse, ref, minus, plus, jac)``: each ``[n]`` (``None`` when not
    asked for), and with ``jacobian`` the ``[n, H]`` rows ``J_t = ∂logp_t/∂h_t`` in ``hidden``'s
    dtype (else ``None``).

    ``hidden``/``ref_hidden`` are the full ``[N, H]`` inputs; ``labels`` ``[n]`` are the counted
    rows' labels, in the order of ``rows``.

    ``J`` (frozen head): once `prefloss.kernels.logprobs_fwd` has each row's lse, the chunk's raw
    rows are not needed any more, so `prefloss.kernels.logprobs_bwd` with an upstream gradient of
    ones overwrites them with ``∂logp/∂raw`` and ``J = buf @ W`` (one GEMM, ``hidden``'s dtype,
    the same GEMM as the trainable backward's ``∂h``).
    """
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


def backward(hidden, weight, bias, labels, rows: CountedRows, lse, grad, opts, need, acc_dtype):
    """Gradients of ``Σ_t grad[t]·logp[t]``: ``(∂hidden [N, H], ∂weight, ∂bias)``, ``None`` where
    ``need`` (three booleans) says so; ∂weight and ∂bias in ``acc_dtype``."""
    kernels = _kernels()
    need_h, need_w, need_b = need
    n, vocab = rows.count, weight.shape[0]
    grad_h, grad_w, grad_b = new_grads(hidden, weight, rows, need, acc_dtype)
    c = max(1, min(opts.chunk_size, n))
    buf = hidden.new_empty((c, vocab))
    for r0, r1 in rows.chunks(c):
        h = rows.take(hidden, r0, r1)
        dlogits = torch.mm(h, weight.T, out=buf[: r1 - r0])
        kernels.logprobs_bwd(
            dlogits,
            labels[r0:r1],
            lse[r0:r1],
            grad[r0:r1],
            bias=bias,
            logit_scale=opts.logit_scale,
            softcap=opts.softcap,
        )
        if need_h:
            rows.put_(grad_h, r0, r1, dlogits @ weight)
        if need_w:
            grad_w.addmm_(dlogits.T.to(acc_dtype), h.to(acc_dtype))
        if need_b:
            grad_b += dlogits.to(acc_dtype).sum(0)
    return grad_h, grad_w, grad_b
