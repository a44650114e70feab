"""The ``"torch"`` backend: token chunks × vocabulary tiles with an online log-sum-exp.

For each chunk of ``C`` counted rows and each tile of ``VOCAB_TILE`` vocabulary columns, one GEMM
produces the ``[C, V_t]`` logit tile, which is transformed (bias, ``logit_scale``, softcap); its
row log-sum-exps (policy, reference, the two ε-mixtures: `prefloss.fused.tile_math`) are folded into
running float64 per-row values with ``logaddexp``, and the label's logit is picked from the tile
that holds it (the mixtures' label logits are formed from the two picked ones). Tiles instead of
whole ``[C, V]`` rows keep every GEMM tall (``C`` rows) and its output cache-sized: the weight tile
is packed once per ``C`` rows instead of once per short row chunk, which on CPUs is what makes a
row-chunked loop slow (the tile size's measurements: docs/performance.md).

Backward recomputes each tile and writes ``g·(onehot − softmax)·dz/draw`` over it, then
``∂h[chunk] += G @ W_t`` and ``∂W[tile] += Gᵀ @ h[chunk]`` (fp32 accumulation; upcast operands).
Matmul work per step, in units of one ``N·H·V`` GEMM: forward 1 (+1 reference), backward 3
(recompute, ∂h, ∂W). With a frozen head (only ∂hidden wanted; `prefloss.fused.op` decides) the forward
also forms ``J = ∂logp/∂h`` (`forward`: one more GEMM per tile, ``exp(z − s)·χ @ W_t``, over the
tile it already holds) and there is no backward GEMM: 3 a step with a reference. Peak extra
memory: a few ``[C, V_t]`` fp32 tiles plus ``[C, H]`` accumulators, independent of batch size and
sequence length; with a frozen head also ``J``, ``[n, H]`` in ``hidden``'s dtype (the size of ∂hidden).

The per-tile arithmetic (`prefloss.fused.tile_math`) is compiled by ``torch.compile`` on CPU for large
calls; see there for when and why.
"""

from __future__ import annotations

import torch

from prefloss.fused import tile_math
from prefloss.fused.chunks import HeadInputs, new_grads
from prefloss.fused.rows import transform_logits

VOCAB_TILE = 2048  # columns per tile; module-level so tests can shrink it


class _LabelPicker:
    """Picks each row's label column out of the tile that holds it (no host sync)."""

    def __init__(self, labels: torch.Tensor, start: int, width: int):
        self.inside = (labels >= start) & (labels < start + width)
        self.column = (labels - start).clamp(0, width - 1)[:, None]

    def pick_(self, target: torch.Tensor, tile: torch.Tensor) -> None:
        target.copy_(torch.where(self.inside, tile.gather(1, self.column).squeeze(1), target))


def _tile(h, weight, bias, start, stop, buf, opts) -> torch.Tensor:
    raw = torch.mm(h, weight[start:stop].T, out=tile_math.scratch_view(buf, h.shape[0], stop - start))
    tile_bias = None if bias is None else bias[start:stop]
    return transform_logits(raw, tile_bias, opts.logit_scale, opts.softcap)


def forward(x: HeadInputs, opts, acc_dtype, jacobian: bool = False):
    """Per-row log-probs ``(logp, lse, ref, minus, plus, jac)``: each ``[n]`` (``None`` when not
    asked for), and with ``jacobian`` the ``[n, H]`` rows ``J_t = ∂logp_t/∂h_t`` in ``hidden``'s
    dtype (else ``None``).

    ``x`` (`HeadInputs`): the policy's and the reference's heads, and which rows count.

    ``J_t = σ·(χ_t[y_t]·W[y_t] − Σ_v p_t[v]·χ_t[v]·W_v)`` with ``σ`` the logit scale,
    ``χ = 1 − (z/c)²`` the softcap's chain factor (1 without one) and ``p_t = softmax(z_t)``. The
    sum is accumulated tile by tile against the rows' running maximum ``s`` (online softmax): after
    tile ``k``, ``s_k = max(s_{k−1}, max z_k)`` and
    ``acc ← acc·exp(s_{k−1} − s_k) + (exp(z_k − s_k)·χ_k) @ W_k``, the exponentials being the
    ones the policy's log-sum-exp sums (`prefloss.fused.tile_math.log_sum_exps_and_exp_`); at the end
    ``Σ_v p_v·χ_v·W_v = acc·exp(s − lse)`` with the float64 running lse. Every factor is ≤ 1:
    nothing overflows. One GEMM per tile beside the logits'; an fp32 ``[C, H]`` accumulator per
    chunk.
    """
    hidden, weight, bias, labels, rows = x.hidden, x.weight, x.bias, x.labels, x.rows
    ref_hidden, ref_weight, ref_bias = x.ref_hidden, x.ref_weight, x.ref_bias
    n, vocab = rows.count, weight.shape[0]
    has_ref, eps = ref_hidden is not None, opts.epsilon
    want_mix = has_ref and eps is not None
    names = ["logp"] + (["ref"] if has_ref else []) + (["minus", "plus"] if want_mix else [])
    out = {k: torch.empty(n, dtype=acc_dtype, device=hidden.device) for k in names + ["lse"]}
    c = max(1, min(opts.chunk_size, n))
    width = min(VOCAB_TILE, vocab)
    log_sum_exps = tile_math.log_sum_exps_for(
        n * vocab, (c, width), hidden.dtype, hidden.device, eps if want_mix else None
    )
    buf = hidden.new_empty((c, width))
    ref_buf = ref_hidden.new_empty((c, width)) if has_ref else None
    jac = None
    if jacobian:
        jac = hidden.new_empty((n, hidden.shape[1]))
        log_sum_exps_and_exp_ = tile_math.log_sum_exps_and_exp_for(
            n * vocab, (c, width), hidden.dtype, hidden.device, eps if want_mix else None, opts.softcap
        )
    for r0, r1 in rows.chunks(c):
        h, y = rows.take(hidden, r0, r1), labels[r0:r1]
        ref_h = rows.take(ref_hidden, r0, r1) if has_ref else None
        # Running per-row log-sum-exps, float64: folding a dozen tile results in float32 biases each
        # row's sum (docs/performance.md).
        lse = torch.full((len(names), r1 - r0), float("-inf"), dtype=torch.float64, device=h.device)
        label_logit = torch.zeros((2, r1 - r0), dtype=acc_dtype, device=h.device)
        if jacobian:
            acc = torch.zeros((r1 - r0, hidden.shape[1]), dtype=acc_dtype, device=h.device)
            shift = torch.full((r1 - r0,), float("-inf"), dtype=torch.float64, device=h.device)
        for v0 in range(0, vocab, width):
            v1 = min(v0 + width, vocab)
            picker = _LabelPicker(y, v0, v1 - v0)
            z = _tile(h, weight, bias, v0, v1, buf, opts)
            picker.pick_(label_logit[0], z)
            z_ref = None
            if has_ref:
                z_ref = _tile(ref_h, ref_weight, ref_bias, v0, v1, ref_buf, opts)
                picker.pick_(label_logit[1], z_ref)
            if jacobian:  # z becomes exp(z − shift)·χ; acc follows the new shift
                tile_lses, new_shift = log_sum_exps_and_exp_(z, z_ref, shift)
                acc.mul_(torch.exp(shift - new_shift).to(acc_dtype)[:, None])
                acc.addmm_(z, weight[v0:v1].to(acc_dtype))
                shift = new_shift
            else:
                tile_lses = log_sum_exps(z, z_ref)
            torch.logaddexp(lse, torch.stack(tile_lses), out=lse)
        picked = label_logit.double()
        if want_mix:  # the mixtures' label logits, from the two picked ones
            step = eps * (picked[1] - picked[0])
            picked = torch.cat([picked, (picked[0] - step)[None], (picked[0] + step)[None]])
        for i, k in enumerate(names):
            out[k][r0:r1] = picked[i] - lse[i]
        out["lse"][r0:r1] = lse[0]
        if jacobian:  # Σ_v p_v·χ_v·W_v = acc·exp(shift − lse)
            acc.mul_(torch.exp(shift - lse[0]).to(acc_dtype)[:, None])
            jac[r0:r1] = _jacobian_rows(acc, weight, y, label_logit[0], opts)
    return tuple(out.get(k) for k in ("logp", "lse", "ref", "minus", "plus")) + (jac,)


def _jacobian_rows(acc, weight, labels, label_logit, opts) -> torch.Tensor:
    """``σ·(χ_y·W[y] − acc)``, in place in ``acc`` (``[C, H]``): ``acc = Σ_v p_v·χ_v·W_v``."""
    target = weight.index_select(0, labels).to(acc.dtype)
    if opts.softcap is not None:  # χ at the label, from its transformed logit
        target.mul_(torch.div(label_logit, opts.softcap).square_().neg_().add_(1.0)[:, None])
    jac = torch.sub(target, acc, out=acc)
    return jac.mul_(opts.logit_scale) if opts.logit_scale is not None else jac


def backward(x: HeadInputs, lse, grad, opts, need, acc_dtype):
    """Gradients of ``Σ_t grad[t]·logp[t]``: ``(∂hidden [N, H], ∂weight, ∂bias)``, ``None`` where
    ``need`` (three booleans) says so. ∂weight and ∂bias are accumulated and returned in
    ``acc_dtype``; ∂hidden is in ``hidden``'s dtype, 0 at ignored rows.
    """
    hidden, weight, bias, labels, rows = x.hidden, x.weight, x.bias, x.labels, x.rows
    need_h, need_w, need_b = need
    n, vocab = rows.count, weight.shape[0]
    grad_h, grad_w, grad_b = new_grads(hidden, weight, rows, need, acc_dtype)
    c = max(1, min(opts.chunk_size, n))
    width = min(VOCAB_TILE, vocab)
    neg_softmax_times_ = tile_math.neg_softmax_times_for(n * vocab, hidden.device)
    buf = hidden.new_empty((c, width))
    for r0, r1 in rows.chunks(c):
        h, y, g = rows.take(hidden, r0, r1), labels[r0:r1], grad[r0:r1]
        h_acc = h.to(acc_dtype)
        grad_h_acc = (
            torch.zeros((r1 - r0, hidden.shape[1]), dtype=acc_dtype, device=h.device) if need_h else None
        )
        for v0 in range(0, vocab, width):
            v1 = min(v0 + width, vocab)
            picker = _LabelPicker(y, v0, v1 - v0)
            z = _tile(h, weight, bias, v0, v1, buf, opts)
            chain = None
            if opts.softcap is not None:  # d(c·tanh(u/c))/du = 1 − (z/c)²
                chain = torch.div(z, opts.softcap).square_().neg_().add_(1.0)
            dz = neg_softmax_times_(z, lse[r0:r1], g)
            dz.scatter_add_(1, picker.column, torch.where(picker.inside, g, torch.zeros_like(g))[:, None])
            if chain is not None:
                dz.mul_(chain)
            if opts.logit_scale is not None:
                dz.mul_(opts.logit_scale)
            if hidden.dtype != acc_dtype:
                # Round ∂logits to the input dtype, as the Triton backend's in-place buffer and any
                # bf16/fp16 implementation do: both backends then carry the same rounding.
                dz = dz.to(hidden.dtype).to(acc_dtype)
            if need_h:
                grad_h_acc.addmm_(dz, weight[v0:v1].to(acc_dtype))
            if need_w:
                grad_w[v0:v1].addmm_(dz.T, h_acc)
            if need_b:
                grad_b[v0:v1] += dz.sum(0)
        if need_h:
            rows.put_(grad_h, r0, r1, grad_h_acc)
    return grad_h, grad_w, grad_b
