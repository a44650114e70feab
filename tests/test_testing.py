"""`prefloss.testing`: the shared criterion, on hand-made numbers and on the op it judges."""

from __future__ import annotations

import math

import pytest
import torch

import prefloss
from prefloss import reference
from prefloss.testing import (
    COMPOSITION_ROUNDINGS,
    ERROR_MARGIN,
    TOLERANCES,
    compare,
    error_scale,
    loss_error_bounds,
    plain_token_logprobs,
    sequence_error_scale,
    unit_roundoff,
)

F64 = torch.float64


def test_compare_bounds():
    """Explicit bound (number or elementwise), plain baseline, or the tolerance table."""
    expected = torch.tensor([1.0, -2.0, 4.0], dtype=F64)
    actual = expected + torch.tensor([1e-6, -3e-6, 0.0], dtype=F64)
    c = compare(actual, expected, bound=torch.tensor([2e-6, 2e-6, 0.0], dtype=F64))
    assert not c.passed and c.worst_index == (1,) and c.bound == 2e-6
    assert compare(actual, expected, bound=3e-6).passed

    # baseline: ERROR_MARGIN · max(err(baseline), u·max|expected|), u of the baseline's dtype
    baseline = expected + torch.tensor([0.0, 2.0**-21, 0.0], dtype=F64)  # exact in fp32
    c = compare(actual, expected, dtype=torch.float32, baseline=baseline.float())
    floor = unit_roundoff(torch.float32) * 4.0  # 2.4e-7, below the baseline's error of 4.8e-7
    assert c.bound == ERROR_MARGIN * 2.0**-21 and not c.passed  # 3e-6 > 1.9e-6
    close = expected + torch.tensor([1e-6, -1.5e-6, 0.0], dtype=F64)
    assert compare(close, expected, dtype=torch.float32, baseline=baseline.float()).passed
    exact = compare(expected.float(), expected, dtype=torch.float32, baseline=expected.float())
    assert exact.passed and exact.bound == pytest.approx(ERROR_MARGIN * floor)

    assert compare(actual, expected, dtype=torch.float32).bound == TOLERANCES[torch.float32]
    assert not compare(actual * float("nan"), expected, bound=1.0).passed


def test_sequence_error_scale_by_hand():
    """Row 0: plain's sum is off by 3e-6 (realised). Row 1: errors ±4e-6 cancel, the quadrature
    √(2·16e-12) = 5.66e-6 stands in. Row 2: exact tokens, the summation scale eps·Σ|v| remains."""
    expected = torch.tensor([[-1.0, -2.0], [-3.0, -5.0], [-10.0, -20.0]], dtype=F64)
    err = torch.tensor([[1e-6, 2e-6], [4e-6, -4e-6], [0.0, 0.0]], dtype=F64)
    s = sequence_error_scale(expected + err, expected)
    eps = torch.finfo(F64).eps
    torch.testing.assert_close(s, torch.tensor([3e-6, math.sqrt(32e-12), 30 * eps], dtype=F64))


def _dpo_sums(gap: float):
    """Two pairs; the policy's chosen sums differ by ``gap``."""
    sums = {
        "policy": torch.tensor([-50.0, -50.0 - gap, -60.0, -61.0], dtype=F64),
        "ref": torch.tensor([-52.0, -52.0, -59.0, -60.0], dtype=F64),
    }
    return sums, torch.tensor([10, 10, 12, 12])


def test_dpo_bound_is_first_order_sensitivity():
    """DPO, ``L = mean_p softplus(−β·u_p)`` with ``u_p = (π_w − ρ_w) − (π_l − ρ_l)``: each of the
    four sums of a pair moves ``u_p`` one-for-one, so to first order
    ``bound = Σ_p β·σ(−β·u_p)/B · Σ_{i∈p} δ_i + 4u·L``, ``δ_i = 4·s_i + 4u·|x_i|``."""
    sums, length = _dpo_sums(0.0)
    scales = {k: torch.full((4,), 1e-5, dtype=F64) for k in sums}
    got = loss_error_bounds("dpo", sums, length, scales, dtype=torch.float32, beta=0.1)
    u = unit_roundoff(torch.float32)
    delta = {k: ERROR_MARGIN * scales[k] + COMPOSITION_ROUNDINGS * u * sums[k].abs() for k in sums}
    margin = (sums["policy"] - sums["ref"])[:2] - (sums["policy"] - sums["ref"])[2:]
    weight = 0.1 * torch.sigmoid(-0.1 * margin) / 2
    per_pair = sum(delta[k][:2] + delta[k][2:] for k in sums)
    expected = float((weight * per_pair).sum()) + COMPOSITION_ROUNDINGS * u * float(got.loss)
    assert got.loss_bound == pytest.approx(expected, rel=1e-4)
    # the upstream gradient g_r = ∓β·σ(−β·u_p)/B moves through σ' only: far below |g|
    assert (got.upstream_bound < 1e-3 * got.upstream.abs()).all()


def test_alpha_dpo_bound_follows_conditioning():
    """α-DPO's first step standardises the two pairs' margins by 0.1·std of two numbers: when the
    margins are close, rounding-sized errors move the loss a thousandfold more than in DPO. The
    bound covers every perturbation within the box (sampled), and DPO's does not need to grow."""
    hp = dict(beta=2.5, gamma_beta_ratio=0.6, alpha=0.2)
    sums, length = _dpo_sums(1e-3)
    scales = {k: torch.full((4,), 1e-5, dtype=F64) for k in sums}
    alpha = loss_error_bounds("alpha_dpo", sums, length, scales, dtype=torch.float32, **hp)
    dpo = loss_error_bounds("dpo", sums, length, scales, dtype=torch.float32, beta=0.1)
    assert alpha.loss_bound > 100 * dpo.loss_bound
    u = unit_roundoff(torch.float32)
    delta = {k: ERROR_MARGIN * scales[k] + COMPOSITION_ROUNDINGS * u * sums[k].abs() for k in sums}
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(200):
        moved = {k: sums[k] + delta[k] * (2 * torch.rand(4, generator=g, dtype=F64) - 1) for k in sums}
        loss = reference.sequence_loss("alpha_dpo", moved["policy"], length, ref=moved["ref"], **hp)
        worst = max(worst, abs(float(loss - alpha.loss)))
    assert 0.1 * alpha.loss_bound < worst <= alpha.loss_bound


def test_epsilon_dpo_step_too_close_to_call():
    """A pair whose ``ℓ⁻ − ℓ`` is smaller than the sums' error bounds may take either step: the
    bound includes the loss's jump between steps, which is far above the smooth part.

    Pair 0: ``ℓ = −50 + 55 = 5``, ``ℓ⁻ = 5 + 1e-6``, ``ℓ⁺ = 4``: step +1, too close to call.
    Pair 1: ``ℓ = −2``, ``ℓ⁻ = −1.5``, ``ℓ⁺ = −2.5``: step +1, by a wide margin.
    """
    hp = dict(beta=0.5, epsilon=0.3)
    policy = torch.tensor([-50.0, -60.0, -55.0, -58.0], dtype=F64)
    sums = {
        "policy": policy,
        "ref": torch.tensor([-53.0, -59.0, -56.0, -57.0], dtype=F64),
        "minus": torch.tensor([-40.0 + 1e-6, -50.0, -45.0, -48.5], dtype=F64),
        "plus": torch.tensor([-41.0, -50.5, -45.0, -48.0], dtype=F64),
    }
    length = torch.tensor([10, 10, 10, 10])
    scales = {k: torch.full((4,), 1e-6, dtype=F64) for k in sums}
    got = loss_error_bounds("epsilon_dpo", sums, length, scales, dtype=torch.float32, **hp)
    pairs = lambda x: (x[:2], x[2:])
    steps = reference.epsilon_steps(*pairs(policy), *pairs(sums["minus"]), *pairs(sums["plus"]))
    assert steps.tolist() == [1.0, 1.0]
    other = torch.tensor([0.0, 1.0], dtype=F64)
    flipped = reference.sequence_loss("epsilon_dpo", policy, length, ref=sums["ref"], steps=other, **hp)
    assert got.loss_bound >= abs(float(flipped - got.loss)) > 1e-3
    far = {**sums, "minus": sums["minus"] + torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64)}
    smooth = loss_error_bounds("epsilon_dpo", far, length, scales, dtype=torch.float32, **hp)
    assert smooth.loss_bound < 1e-4


def test_one_token_off_by_ten_fp32_errors_fails():
    """The op's tokens pass against plain PyTorch's error; the same output with one token moved by
    10× the fp32 error (``10·error_scale``) fails, at that token. With ERROR_MARGIN < 5 this holds
    whatever the sign: ``10·s − |own error| >= (10 − ERROR_MARGIN)·s > ERROR_MARGIN·s``."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 17, 24, generator=g)
    weight = torch.randn(101, 24, generator=g) / 24**0.5 * 2
    labels = torch.randint(0, 101, (3, 17), generator=g)
    labels[:, :3] = -100
    out = prefloss.fused_logprobs(hidden, weight, labels, chunk_size=8, backend="torch").policy
    expected = reference.token_logprobs(hidden.double(), weight.double(), labels).policy
    plain = plain_token_logprobs(hidden, weight, labels)
    assert compare(out, expected, dtype=torch.float32, baseline=plain).passed
    assert compare(
        out.sum(-1), expected.sum(-1), bound=ERROR_MARGIN * sequence_error_scale(plain, expected)
    ).passed
    fp32_error = error_scale(plain, expected)
    for sign in (1.0, -1.0):
        bad = out.clone()
        bad[1, 9] += sign * 10 * fp32_error
        c = compare(bad, expected, dtype=torch.float32, baseline=plain)
        assert not c.passed and c.worst_index == (1, 9), c
