"""Benchmarks of `prefloss.fused_logprobs` and the losses against full-logits PyTorch.

Every benchmark first checks its output and gradients against the float64 reference, then times
forward + backward with pytest-benchmark (median and quantiles in its table), and stores the peak
extra memory of one step in ``extra_info["peak_mib"]``.
"""

from __future__ import annotations

import pytest
import torch

from prefloss import fused_logprobs, reference
from prefloss.benchmark.authors import authors_loss
from prefloss.benchmark.cases import HYPERPARAMS, LOSS_NAMES
from prefloss.benchmark.inputs import Shape, make_inputs
from prefloss.benchmark.measure import MIB, run_measured
from prefloss.benchmark.oracle import ground_truth, judge
from prefloss.testing import assert_close_to_reference

BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param(
        "triton",
        id="triton",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: Triton benchmarks need CUDA"),
    ),
]


def _inputs(bench_shape, device):
    t = bench_shape["tokens"]
    shape = Shape(batch=2, seq_len=t // 4, hidden=bench_shape["hidden"], vocab=bench_shape["vocab"])
    return make_inputs(shape, seed=0, device=device)


def _record(benchmark, step, x, device, machine):
    def zero():
        x.hidden.grad = None
        x.weight.grad = None

    m = run_measured(step, device, zero)
    benchmark.extra_info.update({"peak_mib": m.peak_bytes / MIB, "machine": machine})
    benchmark.pedantic(step, setup=zero, rounds=5, warmup_rounds=1)


def _check(actual, expected, x, dtype):
    assert_close_to_reference(actual[0], expected[0], dtype=dtype, name="value")
    for name, got, exp in (("grad_hidden", actual[1], expected[1]), ("grad_weight", actual[2], expected[2])):
        assert_close_to_reference(got, exp, dtype=dtype, scale=max(1.0, float(exp.abs().max())), name=name)


def _reference_logprob_sum(x, epsilon, upstream):
    h = x.hidden.detach().double().requires_grad_()
    w = x.weight.detach().double().requires_grad_()
    tok = reference.token_logprobs(
        h, w, x.labels, ref_hidden=x.ref_hidden, ref_weight=x.ref_weight, epsilon=epsilon
    )
    value = (tok.policy * upstream.double()).sum()
    gh, gw = torch.autograd.grad(value, (h, w))
    return value.detach(), gh, gw


@pytest.mark.parametrize("epsilon", [None, 0.01], ids=["policy+ref", "epsilon"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_logprobs(benchmark, bench_shape, device, machine, backend, epsilon):
    x = _inputs(bench_shape, device)
    upstream = torch.randn(x.labels.shape, generator=torch.Generator().manual_seed(1)).to(device)

    def step():
        tok = fused_logprobs(
            x.hidden,
            x.weight,
            x.labels,
            ref_hidden=x.ref_hidden,
            ref_weight=x.ref_weight,
            epsilon=epsilon,
            backend=backend,
        )
        value = (tok.policy * upstream).sum()
        value.backward()
        return value

    value = step()
    _check(
        (value, x.hidden.grad, x.weight.grad), _reference_logprob_sum(x, epsilon, upstream), x, x.hidden.dtype
    )
    _record(benchmark, step, x, device, machine)


def test_full_logits_logprobs(benchmark, bench_shape, device, machine):
    """The unfused baseline of `test_fused_logprobs[policy+ref]`: full logits, log_softmax, gather."""
    x = _inputs(bench_shape, device)
    upstream = torch.randn(x.labels.shape, generator=torch.Generator().manual_seed(1)).to(device)
    mask = x.labels != -100
    safe = x.labels.masked_fill(~mask, 0)

    def step():
        lp = torch.log_softmax(x.hidden @ x.weight.T, -1).gather(-1, safe[..., None]).squeeze(-1)
        with torch.no_grad():
            torch.log_softmax(x.ref_hidden @ x.ref_weight.T, -1).gather(-1, safe[..., None])
        value = (lp * mask * upstream).sum()
        value.backward()
        return value

    value = step()
    _check(
        (value, x.hidden.grad, x.weight.grad), _reference_logprob_sum(x, None, upstream), x, x.hidden.dtype
    )
    _record(benchmark, step, x, device, machine)


@pytest.mark.parametrize("method", ["prefloss", "authors"])
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_loss(benchmark, bench_shape, device, machine, loss, method):
    from prefloss.losses import LOSSES

    x = _inputs(bench_shape, device)
    hp = HYPERPARAMS[loss]
    if method == "prefloss":
        kwargs = dict(hp, compare_dtype=None) if loss == "epsilon_dpo" else dict(hp)
        make = lambda: LOSSES[loss](**kwargs)  # a fresh module per step: first-training-step semantics
        ref = {"ref_hidden": x.ref_hidden, "ref_weight": x.ref_weight} if LOSSES[loss].needs_reference else {}

        def step():
            out = make()(x.hidden, x.weight, x.labels, **ref)
            out.loss.backward()
            return out.loss
    else:

        def step():
            value = authors_loss(
                loss, x.hidden, x.weight, x.labels, ref_hidden=x.ref_hidden, ref_weight=x.ref_weight, **hp
            )
            value.backward()
            return value

    # The CLI's gate: bounds from plain PyTorch's error at this dtype, propagated through the loss.
    value = step()
    truth = ground_truth(
        {loss: hp}, x.hidden, x.weight, x.labels, ref_hidden=x.ref_hidden, ref_weight=x.ref_weight
    )
    got = {"loss": value.detach(), "grad_hidden": x.hidden.grad, "grad_weight": x.weight.grad}
    for name, result in judge(truth, loss, got).items():
        assert result.passed, result.describe(name)
    _record(benchmark, step, x, device, machine)
