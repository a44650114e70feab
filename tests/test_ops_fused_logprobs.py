"""`prefloss.fused_logprobs` (torch backend) against the float64 reference.

Criterion (`prefloss.testing`): err(fused) <= err(plain PyTorch at the same dtype) + tol[dtype],
forward and backward with a random upstream gradient. The main test runs the torch backend's tile
arithmetic both ways (`prefloss.fused.tile_math`): eagerly and compiled by torch.compile.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import prefloss
from prefloss import reference
from prefloss.testing import assert_close_to_reference, plain_token_logprobs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# Several vocabulary tiles on these small V, the last one partial (conftest.py).
pytestmark = pytest.mark.usefixtures("small_vocab_tiles")


@dataclass(frozen=True)
class Case:
    rows: int = 3
    T: int = 17
    H: int = 24
    V: int = 101  # not a power of two
    chunk_size: int | None = 8
    ignore_frac: float = 0.2
    empty_row: bool = False
    peaked: bool = False
    bias: bool = False
    softcap: float | None = None
    logit_scale: float | None = None
    frozen_head: bool = False
    ref: bool = False
    epsilon: float | None = None
    extra: dict = field(default_factory=dict)


CASES = {
    "odd-N-V101-chunks": Case(rows=3, T=17),
    "V-below-one-tile": Case(V=13, chunk_size=64),
    "single-chunk-default": Case(chunk_size=None),
    "heavy-masking": Case(ignore_frac=0.9),
    "fully-masked-row": Case(empty_row=True),
    "peaked-logits": Case(peaked=True),
    "softcap": Case(softcap=2.0),
    "logit-scale": Case(logit_scale=0.37),
    "bias": Case(bias=True),
    "frozen-head": Case(frozen_head=True),
    "ref-epsilon-softcap-bias": Case(ref=True, epsilon=0.3, softcap=3.0, bias=True),
    "ref-only": Case(ref=True),
}


def _grads(out, inputs, upstream):
    needed = [x for x in inputs if x is not None and x.requires_grad]
    return torch.autograd.grad((out.float() * upstream).sum(), needed)


@pytest.fixture(params=["eager", "compiled"])
def tile_arithmetic(request, monkeypatch):
    """Runs the test with the tile arithmetic eager (``never``) and compiled (``always``)."""
    from prefloss.fused import tile_math

    monkeypatch.setenv("PREFLOSS_COMPILE", {"eager": "never", "compiled": "always"}[request.param])
    yield request.param
    # A compile failure falls back to eager with a warning; here it must not pass as a compiled run.
    assert tile_math._Fused.failed is None, f"torch.compile failed: {tile_math._Fused.failed}"


@pytest.mark.parametrize("dtype_name", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case_name", list(CASES), ids=list(CASES))
def test_forward_backward_against_float64(case_name, dtype_name, tile_arithmetic, make_logprob_inputs):
    case, dtype = CASES[case_name], DTYPES[dtype_name]
    hidden, weight, labels, bias, ref_hidden, ref_weight = make_logprob_inputs(case, dtype)
    leaves = [hidden, weight, bias]
    hidden.requires_grad_(True)
    weight.requires_grad_(not case.frozen_head)
    if bias is not None:
        bias.requires_grad_(True)
    opts = dict(bias=bias, logit_scale=case.logit_scale, softcap=case.softcap)

    out = prefloss.fused_logprobs(
        hidden,
        weight,
        labels,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        epsilon=case.epsilon,
        chunk_size=case.chunk_size,
        backend="torch",
        **opts,
    )
    leaves64 = [
        x.detach().double().requires_grad_(x.requires_grad) if x is not None else None for x in leaves
    ]
    ref64 = reference.token_logprobs(
        leaves64[0],
        leaves64[1],
        labels,
        bias=leaves64[2],
        ref_hidden=None if ref_hidden is None else ref_hidden.double(),
        ref_weight=None if ref_weight is None else ref_weight.double(),
        epsilon=case.epsilon,
        logit_scale=case.logit_scale,
        softcap=case.softcap,
    )
    plain = plain_token_logprobs(hidden, weight, labels, **opts)

    assert out.policy.dtype == torch.float32 and out.policy.shape == labels.shape
    assert torch.equal(out.mask, labels != -100)
    assert (out.policy[labels == -100] == 0).all()
    assert_close_to_reference(out.policy, ref64.policy, dtype=dtype, baseline=plain, name="policy")
    if case.ref:
        plain_ref = plain_token_logprobs(
            ref_hidden, ref_weight, labels, logit_scale=case.logit_scale, softcap=case.softcap
        )
        assert_close_to_reference(out.ref, ref64.ref, dtype=dtype, baseline=plain_ref, name="ref")
        assert not out.ref.requires_grad
    if case.epsilon is not None:
        # Mixture rows of the plain computation at this dtype: its error bounds the fused op's.
        for name, sign in (("minus", 1.0), ("plus", -1.0)):
            zr = ref_hidden @ ref_weight.T  # the reference has no bias in this case
            z = hidden @ weight.T + bias
            mix = (1 + sign * case.epsilon) * (
                case.softcap * torch.tanh(z / case.softcap)
            ).float() - sign * case.epsilon * (case.softcap * torch.tanh(zr / case.softcap)).float()
            lp = torch.log_softmax(mix, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
            lp = torch.where(labels != -100, lp, torch.zeros_like(lp))
            got = getattr(out, name)
            assert not got.requires_grad
            assert_close_to_reference(got, getattr(ref64, name), dtype=dtype, baseline=lp.detach(), name=name)
    else:
        assert out.minus is None and out.plus is None

    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1))
    got = _grads(out.policy, leaves, upstream)
    want = _grads(ref64.policy, leaves64, upstream.double())
    base = _grads(plain, leaves, upstream)
    names = [
        n
        for n, x in zip(("hidden", "weight", "bias"), leaves, strict=True)
        if x is not None and x.requires_grad
    ]
    for name, a, e, b in zip(names, got, want, base, strict=True):
        assert a.dtype == dtype, f"grad {name} dtype {a.dtype}"
        scale = max(1.0, float(e.abs().max()))
        assert_close_to_reference(a, e, dtype=dtype, baseline=b, scale=scale, name=f"grad {name}")
    if case.frozen_head:
        assert weight.grad is None


def test_gradcheck_float64_all_options(tile_arithmetic):
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, :2] = -100

    def fn(h, w, b):
        out = prefloss.fused_logprobs(
            h, w, labels, bias=b, softcap=2.0, logit_scale=0.7, chunk_size=3, backend="torch"
        )
        return out.policy

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_chunk_size_does_not_change_results(tile_arithmetic, make_logprob_inputs):
    hidden, weight, labels, *_ = make_logprob_inputs(Case(rows=4, T=11, V=53), torch.float64)
    outs = [
        prefloss.fused_logprobs(hidden, weight, labels, chunk_size=c, backend="torch").policy
        for c in (1, 3, 7, 1000)
    ]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=0, atol=1e-12)


def test_sequence_logprobs_sums_lengths_and_empty_rows(make_logprob_inputs):
    case = Case(rows=3, T=9, V=29, empty_row=True, ref=True, epsilon=0.2)
    hidden, weight, labels, _, rh, rw = make_logprob_inputs(case, torch.float64)
    seq = prefloss.sequence_logprobs(hidden, weight, labels, ref_hidden=rh, ref_weight=rw, epsilon=0.2)
    ref = reference.token_logprobs(hidden, weight, labels, ref_hidden=rh, ref_weight=rw, epsilon=0.2)
    lengths = (labels != -100).sum(-1)
    assert torch.equal(seq.length, lengths) and int(seq.length[1]) == 0
    for got, tok in zip((seq.policy, seq.ref, seq.minus, seq.plus), ref[:4], strict=True):
        torch.testing.assert_close(got, tok.sum(-1), rtol=0, atol=1e-10)
    mean = seq.mean()
    assert float(mean.policy[1]) == 0.0 and torch.isfinite(mean.policy).all()
    torch.testing.assert_close(mean.policy[0], ref.policy[0].sum() / lengths[0], rtol=0, atol=1e-10)


def test_every_token_ignored_gives_zeros_and_zero_grads():
    hidden = torch.randn(2, 4, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    labels = torch.full((2, 4), -100)
    out = prefloss.fused_logprobs(hidden, weight, labels, backend="torch")
    assert torch.equal(out.policy, torch.zeros(2, 4))
    out.policy.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert weight.grad is None or torch.equal(weight.grad, torch.zeros_like(weight))


def test_non_finite_hidden_propagates_only_from_counted_rows(make_logprob_inputs):
    """Documented behaviour: no check on the hot path; NaN in a counted row gives NaN there."""
    hidden, weight, labels, *_ = make_logprob_inputs(Case(rows=2, T=6, V=19, ignore_frac=0.0), torch.float32)
    labels[0, 0] = -100
    hidden[0, 0] = float("nan")  # ignored row: no effect
    clean = prefloss.fused_logprobs(hidden, weight, labels, backend="torch").policy
    assert torch.isfinite(clean).all()
    hidden[1, 2] = float("inf")  # counted row: NaN at that token, finite elsewhere
    out = prefloss.fused_logprobs(hidden, weight, labels, backend="torch").policy
    assert torch.isnan(out[1, 2])
    finite = torch.ones_like(out, dtype=torch.bool)
    finite[1, 2] = False
    assert torch.isfinite(out[finite]).all()


def test_int32_labels_and_leading_dims_are_flattened(make_logprob_inputs):
    hidden, weight, labels, *_ = make_logprob_inputs(Case(rows=4, T=5, V=23), torch.float64)
    out = prefloss.fused_logprobs(
        hidden.reshape(2, 2, 5, -1), weight, labels.reshape(2, 2, 5).int(), backend="torch"
    )
    ref = reference.token_logprobs(hidden, weight, labels)
    torch.testing.assert_close(out.policy.reshape(4, 5), ref.policy, rtol=0, atol=1e-12)


def test_auto_backend_uses_torch_on_cpu(monkeypatch, make_logprob_inputs):
    import prefloss.fused.op as ops

    monkeypatch.setattr(ops.triton_backend, "_kernels", lambda: pytest.fail("Triton backend used on CPU"))
    hidden, weight, labels, *_ = make_logprob_inputs(Case(rows=2, T=3, V=7), torch.float32)
    out = prefloss.fused_logprobs(hidden, weight, labels)
    torch.testing.assert_close(out.policy, plain_token_logprobs(hidden, weight, labels))
