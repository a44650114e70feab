"""The Triton launchers as custom ops (`prefloss.fused.custom_ops`) and the vocabulary-tiled backward.

- The ops pass ``torch.library.opcheck`` (schema, fake kernel, mutation of ``logits``), and their
  fake outputs have the real outputs' shapes and dtypes (the real ones run the kernels under
  Triton's interpreter on CPU).
- The whole triton-backend step (`fused_logprobs` and every loss, forward and backward) runs on
  ``meta`` tensors, and inside ``torch.compile`` with gradients equal to eager.
- The backward's GEMMs take the inputs' dtype (16-bit operands, fp32 accumulation emulated on CPU
  by upcasting, as `prefloss.fused.triton_backend` documents): its gradients are judged against float64
  with the torch backend as the same-dtype baseline, with one and with several row blocks.
"""

from __future__ import annotations

import pytest
import torch

import prefloss
from prefloss import reference
from prefloss.fused import custom_ops as kernel_ops
from prefloss.fused import rows as torch_rows
from prefloss.fused import triton_backend
from prefloss.kernels import logprobs as kernel_launchers
from prefloss.testing import assert_close_to_reference

# CUDA when there is one (scripts/gpu_check.sh runs this file there), else CPU under the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def _rows(n, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = (torch.randn(n, V, generator=g) * 3).to(dtype)
    ref = (torch.randn(n, V, generator=g) * 3).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    labels = torch.randint(0, V, (n,), generator=g)
    return raw.to(DEVICE), ref.to(DEVICE), bias.to(DEVICE), labels.to(DEVICE)


FWD_VARIANTS = {
    "policy": {},
    "bias-scale-softcap": {"bias": True, "logit_scale": 0.7, "softcap": 5.0},
    "ref": {"ref": True},
    "ref-eps": {"ref": True, "epsilon": 0.2, "bias": True},
}


def _fwd_args(raw, ref, bias, labels, variant):
    opts = FWD_VARIANTS[variant]
    return (
        raw,
        labels,
        bias if opts.get("bias") else None,
        ref if opts.get("ref") else None,
        None,
        opts.get("epsilon"),
        opts.get("logit_scale"),
        opts.get("softcap"),
        None,
        None,
    )


@pytest.mark.parametrize("variant", list(FWD_VARIANTS), ids=list(FWD_VARIANTS))
def test_fwd_op_passes_opcheck_and_fake_matches_real(variant):
    raw, ref, bias, labels = _rows(5, 300, torch.bfloat16)
    args = _fwd_args(raw, ref, bias, labels, variant)
    torch.library.opcheck(kernel_ops._logprobs_fwd_op, args)
    real = kernel_ops._logprobs_fwd_op(*args)
    to_meta = lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x
    fake = kernel_ops._logprobs_fwd_op(*map(to_meta, args))
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]
    wrapped = kernel_ops.logprobs_fwd(
        raw,
        labels,
        bias=args[2],
        ref_logits=args[3],
        epsilon=args[5],
        logit_scale=args[6],
        softcap=args[7],
    )
    direct = kernel_launchers.logprobs_fwd(
        raw, labels, bias=args[2], ref_logits=args[3], epsilon=args[5], logit_scale=args[6], softcap=args[7]
    )
    for got, want in zip(wrapped, direct, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bwd_op_passes_opcheck_and_writes_in_place(dtype):
    raw, _, bias, labels = _rows(4, 200, dtype, seed=1)
    lse = raw.float().logsumexp(1)
    grad = torch.randn(4, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    args = (raw.clone(), labels, lse, grad, bias, 1.3, None, None, None)
    torch.library.opcheck(kernel_ops._logprobs_bwd_op, args)
    out = raw.clone()
    assert kernel_ops.logprobs_bwd(out, labels, lse, grad, bias=bias, logit_scale=1.3) is out
    want = kernel_launchers.logprobs_bwd(raw.clone(), labels, lse, grad, bias=bias, logit_scale=1.3)
    assert torch.equal(out, want)
    meta = raw.to("meta")
    assert kernel_ops.logprobs_bwd(meta, labels.to("meta"), lse.to("meta"), grad.to("meta")) is meta


def test_wrappers_check_arguments_as_the_launchers_on_meta_tensors():
    """The fake kernels never reach the launchers: the wrappers run the launchers' checks themselves."""
    raw, labels = torch.empty(4, 64, device="meta"), torch.empty(4, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="`epsilon` needs `ref_logits`"):
        kernel_ops.logprobs_fwd(raw, labels, epsilon=0.1)
    with pytest.raises(ValueError, match="unit stride"):
        kernel_ops.logprobs_fwd(raw.T.contiguous().T, labels)
    with pytest.raises(ValueError, match="`labels` must have shape"):
        kernel_ops.logprobs_fwd(raw, labels[:3])
    with pytest.raises(ValueError, match="`ref_logits` must have the shape"):
        kernel_ops.logprobs_fwd(raw, labels, ref_logits=raw[:, :32])
    lse = torch.empty(4, device="meta")
    with pytest.raises(ValueError, match="`lse` and `grad` must have shape"):
        kernel_ops.logprobs_bwd(raw, labels, lse[:3], lse)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bwd_on_a_column_tile_with_shifted_labels_equals_the_full_rows(dtype):
    """The vocabulary-tiled backward hands the kernel ``[n, V_t]`` tiles and ``labels − v0``."""
    raw, _, bias, labels = _rows(6, 300, dtype, seed=2)
    labels[:3] = torch.tensor([100, 149, 150], device=DEVICE)  # at the tile's edges
    lse = raw.float().logsumexp(1)
    grad = torch.randn(6, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    for bwd in (kernel_launchers.logprobs_bwd, torch_rows.logprobs_bwd):
        full = bwd(raw.clone(), labels, lse, grad, bias=bias)
        tile = bwd(raw[:, 100:150].contiguous(), labels - 100, lse, grad, bias=bias[100:150])
        assert torch.equal(tile, full[:, 100:150]), bwd.__module__


def _inputs(dtype, B=2, T=9, H=16, V=700, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.6).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    if ignore:
        labels[:, :2] = -100
        labels[1, -3:] = -100
    ref_hidden = (hidden.float() + 0.3 * torch.randn(B, T, H, generator=g)).to(dtype)
    ref_weight = (weight.float() + 0.1 * torch.randn(V, H, generator=g)).to(dtype)
    return tuple(x.to(DEVICE) for x in (hidden, weight, bias, labels, ref_hidden, ref_weight))


def _step(backend, dtype, *, chunk_size=None, double=False, compiled=False, **input_kw):
    hidden, weight, bias, labels, ref_hidden, ref_weight = _inputs(dtype, **input_kw)
    leaves = [hidden, weight, bias]
    if double:
        leaves = [x.double() for x in leaves]
        ref_hidden, ref_weight = ref_hidden.double(), ref_weight.double()
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    grad_out = torch.randn(labels.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)

    def run(h, w, b):
        kw = {"bias": b, "ref_hidden": ref_hidden, "ref_weight": ref_weight, "epsilon": 0.2}
        if backend == "reference":
            return reference.token_logprobs(h, w, labels, **kw)
        return prefloss.fused_logprobs(h, w, labels, **kw, chunk_size=chunk_size, backend=backend)

    fn = torch.compile(run) if compiled else run
    out = fn(*leaves)
    (out.policy * grad_out.to(out.policy.dtype)).sum().backward()
    return out, dict(zip(("hidden", "weight", "bias"), (x.grad for x in leaves), strict=True))


@pytest.mark.parametrize("blocks", ["one-block", "row-blocks"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_tiled_backward_against_float64(monkeypatch, dtype, blocks):
    """``∂W``: one full-depth GEMM per vocabulary tile (fp32 accumulation, one rounding), or one
    rounding per row block when the rows are split; judged like every gradient: against float64,
    with the torch backend at the same dtype (fp32 accumulator) as the baseline."""
    if blocks == "row-blocks":
        monkeypatch.setattr(triton_backend, "BWD_BLOCK_ELEMENTS", 5 * 16)  # 5 rows of H = 16
    expected, expected_grads = _step("reference", dtype, double=True)
    got, got_grads = _step("triton", dtype, chunk_size=4)
    base, base_grads = _step("torch", dtype, chunk_size=4)
    assert_close_to_reference(got.policy, expected.policy, dtype=dtype, baseline=base.policy, name="policy")
    for name, want in expected_grads.items():
        assert got_grads[name].dtype == dtype
        assert_close_to_reference(
            got_grads[name], want, dtype=dtype, baseline=base_grads[name], name=f"d {name}"
        )


def test_whole_triton_step_traces_on_meta():
    hidden, weight, bias, labels, ref_hidden, ref_weight = (
        x.to("meta") for x in _inputs(torch.bfloat16, ignore=False)
    )
    hidden.requires_grad_()
    weight.requires_grad_()
    out = prefloss.fused_logprobs(
        hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, epsilon=0.1, backend="triton"
    )
    assert out.policy.shape == labels.shape and out.minus.device.type == "meta"
    out.policy.sum().backward()
    assert hidden.grad.shape == hidden.shape and hidden.grad.dtype == torch.bfloat16
    assert weight.grad.shape == weight.shape and weight.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_step_equals_eager(dtype):
    """Default mode: `fused_logprobs` counts rows with a data-dependent ``nonzero`` (a graph break);
    the custom ops are nodes of the graphs around it. Same outputs and gradients as eager, bit for
    bit, except ∂bias = Σ_t ∂raw[t]: Inductor may sum the rows in another order. That sum's
    reordering error is at most (n−1)·u·Σ_t|∂raw[t, v]| ≤ (n−1)·u·Σ_t|g_t| (|∂raw[t, v]| ≤ |g_t|)."""
    eager, eager_grads = _step("triton", dtype, chunk_size=4)
    torch._dynamo.reset()
    compiled, compiled_grads = _step("triton", dtype, chunk_size=4, compiled=True)
    for name in ("policy", "ref", "minus", "plus"):
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), rtol=0, atol=0)
    for name in ("hidden", "weight"):
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=0, atol=0, msg=name)
    mask = eager.mask
    # _step's upstream gradient, at the counted tokens
    g = torch.randn(mask.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)[mask]
    n, u = g.numel(), torch.finfo(torch.float32).eps / 2
    bound = (n - 1) * u * g.abs().sum()
    if dtype != torch.float32:  # ∂bias is returned rounded to the input dtype: half an ulp either way
        bound = bound + torch.finfo(dtype).eps * eager_grads["bias"].abs().float()
    diff = (compiled_grads["bias"].float() - eager_grads["bias"].float()).abs()
    assert bool((diff <= bound).all()), (diff.max(), bound)


def test_custom_ops_compile_fullgraph():
    """No data-dependent row count here: GEMM, forward kernel, backward kernel, ∂h in one graph."""
    raw_h, weight, _, labels, _, _ = _inputs(torch.float32, ignore=False)
    h, y = raw_h.reshape(-1, raw_h.shape[-1]), labels.reshape(-1)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)

    def step(h, w, y, grad):
        logits = h @ w.T
        stats = kernel_ops.logprobs_fwd(logits, y, softcap=6.0)
        d = kernel_ops.logprobs_bwd(h @ w.T, y, stats.lse, grad, softcap=6.0)
        return stats.logp, d @ w

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    for got, want in zip(compiled(h, weight, y, grad), step(h, weight, y, grad), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_op_compiles_fullgraph_when_every_row_counts(dtype):
    """The autograd Function itself (forward, backward, reference and ε-mixtures) in one graph each
    way: without ignored labels there is no data-dependent row count. Equal to eager, bit for bit."""
    from prefloss.fused.chunks import CountedRows
    from prefloss.fused.op import _FusedLogProbs, _Options

    hidden, weight, _, labels, ref_hidden, ref_weight = _inputs(dtype, ignore=False)
    h2d, ref2d, y = (
        hidden.reshape(-1, hidden.shape[-1]),
        ref_hidden.reshape(-1, hidden.shape[-1]),
        labels.reshape(-1),
    )
    n = y.numel()
    rows = CountedRows(None, n)
    opts = _Options(epsilon=0.2, logit_scale=None, softcap=3.0, chunk_size=5, backend="triton")
    scale = torch.linspace(-1.0, 1.0, n, device=DEVICE)

    def step(h, w):
        return _FusedLogProbs.apply(h, w, None, y, rows, ref2d, ref_weight, None, opts)

    def run(fn):
        h, w = h2d.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        outputs = fn(h, w)
        (outputs[0] * scale).sum().backward()  # outside the graph: only the op's backward is compiled
        return [*outputs, h.grad, w.grad]

    eager = run(step)
    torch._dynamo.reset()
    compiled = run(torch.compile(step, fullgraph=True))
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
