"""The functional losses (`prefloss.losses`) on tiny sequence values, against hand-derived numbers.

Every expected value is derived in the test's docstring and computed in float64 from that
derivation (``softplus(x) = log(1 + e^x) = −log σ(−x)``), never from the code under test. The loss
of a pair with logit ``x`` is ``softplus(−x)`` and ``∂ softplus(−x)/∂x = −σ(−x)``.
"""

from __future__ import annotations

import math

import pytest
import torch

from prefloss import reference
from prefloss.losses import alpha_dpo_loss, dpo_loss, epsilon_dpo_loss, epsilon_steps, simpo_loss

DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
# Hand-derived values are exact in binary up to the final log/exp: fp32 results are good to a few
# ulps, float64 to ~1e-15.
RTOL = {torch.float32: 2e-6, torch.float64: 1e-13}
ATOL = {torch.float32: 1e-6, torch.float64: 1e-14}
COMPARE_DTYPES = {"exact": None, "bf16": torch.bfloat16}


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def smoothed(x: float, ls: float) -> float:
    """``−(1−ls)·log σ(x) − ls·log σ(−x)``."""
    return (1 - ls) * softplus(-x) + ls * softplus(x)


def smoothed_grad(x: float, ls: float) -> float:
    """``∂/∂x`` of `smoothed`: ``−(1−ls)·σ(−x) + ls·σ(x)``."""
    return -(1 - ls) * sigmoid(-x) + ls * sigmoid(x)


def check(actual: torch.Tensor, expected, dtype):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.detach().double(), expected, rtol=RTOL[dtype], atol=ATOL[dtype])


def check_bitwise_equal(a, b, a_inputs: list, b_inputs: list, upstream: torch.Tensor) -> None:
    """Losses, rewards and the gradients of ``Σ losses·upstream`` (``a``'s w.r.t. ``a_inputs``, ``b``'s
    w.r.t. ``b_inputs``) equal to the bit."""
    assert torch.equal(a.losses, b.losses)
    assert torch.equal(a.chosen_rewards, b.chosen_rewards)
    assert torch.equal(a.rejected_rewards, b.rejected_rewards)
    ga = torch.autograd.grad((a.losses * upstream).sum(), a_inputs)
    gb = torch.autograd.grad((b.losses * upstream).sum(), b_inputs)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb, strict=True))


# --- DPO ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ls", [0.0, 0.1], ids=["ls0", "ls0.1"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_dpo_loss_hand_derived(dtype, ls):
    """β = 0.5, two pairs, h = (π_w − ρ_w) − (π_l − ρ_l):

    pair 0: π = (−1, −3), ρ = (−2, −2): h = 1 − (−1) = 2, βh = 1  → ℓ = log(1+e^{−1}) at ls = 0;
            rewards β(π−ρ) = (0.5, −0.5).
    pair 1: π = (−4, −4), ρ = (−3, −5): h = −1 − 1 = −2, βh = −1 → ℓ = log(1+e^{1});
            rewards (−0.5, 0.5).
    With smoothing: ℓ = (1−ls)·log(1+e^{−βh}) + ls·log(1+e^{βh}).
    Gradient of Σℓ: ∂/∂π_w = β·g(βh), ∂/∂π_l = −β·g(βh), g(x) = −(1−ls)σ(−x) + ls·σ(x);
    the reference gets none (it is a constant).
    """
    beta = 0.5
    pc = torch.tensor([-1.0, -4.0], dtype=dtype, requires_grad=True)
    pr = torch.tensor([-3.0, -4.0], dtype=dtype, requires_grad=True)
    rc = torch.tensor([-2.0, -3.0], dtype=dtype, requires_grad=True)
    rr = torch.tensor([-2.0, -5.0], dtype=dtype, requires_grad=True)
    out = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=ls)
    check(out.losses, [smoothed(1.0, ls), smoothed(-1.0, ls)], dtype)
    check(out.chosen_rewards, [0.5, -0.5], dtype)
    check(out.rejected_rewards, [-0.5, 0.5], dtype)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    out.losses.sum().backward()
    g = [beta * smoothed_grad(1.0, ls), beta * smoothed_grad(-1.0, ls)]
    check(pc.grad, g, dtype)
    check(pr.grad, [-x for x in g], dtype)
    assert rc.grad is None and rr.grad is None


def test_dpo_label_smoothing_is_conservative_dpo():
    """ls = 0.25, βh = 2: ℓ = 0.75·log(1+e^{−2}) + 0.25·log(1+e^{2}) (Mitchell's cDPO), which is
    larger than the unsmoothed log(1+e^{−2}) and is minimised at σ(βh) = 1 − ls, i.e. βh = log 3."""
    one = torch.tensor([0.0], dtype=torch.float64)
    h = torch.tensor([4.0], dtype=torch.float64, requires_grad=True)
    out = dpo_loss(h, one, one, one, beta=0.5, label_smoothing=0.25)
    check(out.losses, [0.75 * softplus(-2.0) + 0.25 * softplus(2.0)], torch.float64)
    at_min = torch.tensor([2 * math.log(3.0)], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(
        dpo_loss(at_min, one, one, one, beta=0.5, label_smoothing=0.25).losses.sum(), at_min
    )
    assert abs(float(grad)) < 1e-15


# --- SimPO ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ls", [0.0, 0.2], ids=["ls0", "ls0.2"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_simpo_loss_hand_derived(dtype, ls):
    """β = 2, r = γ/β = 0.25, x = β(π̄_w − π̄_l − r):

    pair 0: π̄ = (−1, −1.5): x = 2(0.5 − 0.25) = 0.5    → ℓ = log(1+e^{−0.5}) at ls = 0.
    pair 1: π̄ = (−2, −1):   x = 2(−1 − 0.25) = −2.5   → ℓ = log(1+e^{2.5}).
    Rewards β·π̄: chosen (−2, −4), rejected (−3, −2). ∂Σℓ/∂π̄_w = β·g(x) = −∂Σℓ/∂π̄_l.
    """
    pc = torch.tensor([-1.0, -2.0], dtype=dtype, requires_grad=True)
    pr = torch.tensor([-1.5, -1.0], dtype=dtype, requires_grad=True)
    out = simpo_loss(pc, pr, beta=2.0, gamma_beta_ratio=0.25, label_smoothing=ls)
    check(out.losses, [smoothed(0.5, ls), smoothed(-2.5, ls)], dtype)
    check(out.chosen_rewards, [-2.0, -4.0], dtype)
    check(out.rejected_rewards, [-3.0, -2.0], dtype)
    out.losses.sum().backward()
    g = [2.0 * smoothed_grad(0.5, ls), 2.0 * smoothed_grad(-2.5, ls)]
    check(pc.grad, g, dtype)
    check(pr.grad, [-x for x in g], dtype)


# --- α-DPO ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("stats_as", ["float", "tensor"], ids=["stats-float", "stats-tensor"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_alpha_dpo_loss_hand_derived(dtype, stats_as):
    """β = 2, r = 0.25, α = 0.5, μ = 0.5, σ = 0.25; Δθ = π̄_w − π̄_l, M = Δθ − (ρ̄_w − ρ̄_l),
    z = (M − μ)/σ, margin m = r + α·z, x = β(Δθ − m):

    pair 0: π̄ = (−1, −2), ρ̄ = (−1.5, −1.5): Δθ = 1, M = 1, z = 2, m = 1.25, x = −0.5
            → ℓ = log(1+e^{0.5}); rewards β((1−α)π̄ + αρ̄) = 2(−0.5 − 0.75) = −2.5 and
            2(−1 − 0.75) = −3.5.
    pair 1: π̄ = (−0.5, −1), ρ̄ = (−1, −0.25): Δθ = 0.5, M = 1.25, z = 3, m = 1.75, x = −2.5
            → ℓ = log(1+e^{2.5}); rewards 2(−0.25 − 0.5) = −1.5 and 2(−0.5 − 0.125) = −1.25.
    The margin is detached, so ∂Σℓ/∂π̄_w = −β·σ(−x) = −∂Σℓ/∂π̄_l (with a live margin,
    ∂z/∂π̄_w = 1/σ = 4 would change it) and the reference gets no gradient.
    """
    pc = torch.tensor([-1.0, -0.5], dtype=dtype, requires_grad=True)
    pr = torch.tensor([-2.0, -1.0], dtype=dtype, requires_grad=True)
    rc = torch.tensor([-1.5, -1.0], dtype=dtype, requires_grad=True)
    rr = torch.tensor([-1.5, -0.25], dtype=dtype, requires_grad=True)
    mean, std = (0.5, 0.25) if stats_as == "float" else (torch.tensor(0.5), torch.tensor(0.25))
    out = alpha_dpo_loss(pc, pr, rc, rr, beta=2.0, gamma_beta_ratio=0.25, alpha=0.5, mean=mean, std=std)
    check(out.losses, [softplus(0.5), softplus(2.5)], dtype)
    check(out.margin, [1.25, 1.75], dtype)
    check(out.chosen_rewards, [-2.5, -1.5], dtype)
    check(out.rejected_rewards, [-3.5, -1.25], dtype)
    assert not out.margin.requires_grad
    out.losses.sum().backward()
    g = [-2.0 * sigmoid(0.5), -2.0 * sigmoid(2.5)]
    check(pc.grad, g, dtype)
    check(pr.grad, [-x for x in g], dtype)
    assert rc.grad is None and rr.grad is None


DEGENERATE_STD = {"zero": 0.0, "nan": float("nan"), "inf": float("inf"), "negative": -1.0}


@pytest.mark.parametrize("std", list(DEGENERATE_STD.values()), ids=list(DEGENERATE_STD))
def test_alpha_dpo_z_is_zero_when_std_is_degenerate(std):
    """σ ∈ {0, NaN, ∞, < 0} has no z-score: z = 0, so the margin is r and the loss is SimPO's.
    With the data of the hand-derived test and α = 0.5: pair 0 x = 2(1 − 0.25) = 1.5,
    pair 1 x = 2(0.5 − 0.25) = 0.5; no NaN in losses, margins or gradients."""
    pc = torch.tensor([-1.0, -0.5], requires_grad=True)
    pr = torch.tensor([-2.0, -1.0], requires_grad=True)
    rc, rr = torch.tensor([-1.5, -1.0]), torch.tensor([-1.5, -0.25])
    for s in (std, torch.tensor(std)):
        out = alpha_dpo_loss(pc, pr, rc, rr, beta=2.0, gamma_beta_ratio=0.25, alpha=0.5, mean=0.5, std=s)
        check(out.margin, [0.25, 0.25], torch.float32)
        check(out.losses, [softplus(-1.5), softplus(-0.5)], torch.float32)
        (gc,) = torch.autograd.grad(out.losses.sum(), pc)
        assert torch.isfinite(gc).all()
        check(gc, [-2.0 * sigmoid(-1.5), -2.0 * sigmoid(-0.5)], torch.float32)


@pytest.mark.parametrize("ls", [0.0, 0.1], ids=["ls0", "ls0.1"])
@pytest.mark.parametrize("std", [0.7, 0.0], ids=["std0.7", "std0"])
def test_alpha_zero_is_simpo_exactly(std, ls):
    """α = 0: margin r + 0·z = r, rewards β·((1−0)π̄ + 0·ρ̄) = β·π̄ — bitwise SimPO (docs/losses.md)."""
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (torch.randn(33, generator=g) for _ in range(4))
    pc1, pr1 = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    pc2, pr2 = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    a = alpha_dpo_loss(
        pc1, pr1, rc, rr, beta=2.5, gamma_beta_ratio=0.6, alpha=0.0, mean=0.3, std=std, label_smoothing=ls
    )
    s = simpo_loss(pc2, pr2, beta=2.5, gamma_beta_ratio=0.6, label_smoothing=ls)
    check_bitwise_equal(a, s, [pc1, pr1], [pc2, pr2], upstream=torch.randn(33, generator=g))


# --- ε-DPO steps ----------------------------------------------------------------------------------

# (ℓ⁻, ℓ, ℓ⁺) → s; ℓ⁻ under (1+ε)f − εf_ref (β⁻ = β/(1+ε)), ℓ⁺ under (1−ε)f + εf_ref.
STEP_CASES = {
    "decreasing": ((3.0, 2.0, 1.0), 1),
    "increasing": ((1.0, 2.0, 3.0), -1),
    "tie-minus-policy": ((2.0, 2.0, 1.0), 0),
    "tie-policy-plus": ((3.0, 2.0, 2.0), 0),
    "tie-all": ((2.0, 2.0, 2.0), 0),
    "peak": ((1.0, 2.0, 1.0), 0),
    "valley": ((3.0, 2.0, 3.0), 0),
}


@pytest.mark.parametrize("compare_dtype", list(COMPARE_DTYPES.values()), ids=list(COMPARE_DTYPES))
def test_epsilon_steps_rules(compare_dtype):
    """s = +1 iff ℓ⁻ > ℓ > ℓ⁺, −1 iff ℓ⁺ > ℓ > ℓ⁻ (strict), else 0. Each ℓ is a chosen sum minus a
    rejected sum of −5 (small dyadic values: bf16 rounding changes nothing here). int64, no grad."""
    lm, lp_, lpl = (torch.tensor([c[0][i] for c in STEP_CASES.values()]) for i in range(3))
    expected = torch.tensor([c[1] for c in STEP_CASES.values()])
    rej = torch.full_like(lm, -5.0)
    pc = (lp_ - 5.0).requires_grad_()
    steps = epsilon_steps(pc, rej, lm - 5.0, rej, lpl - 5.0, rej, compare_dtype=compare_dtype)
    assert steps.dtype == torch.int64 and not steps.requires_grad
    assert steps.tolist() == expected.tolist(), dict(zip(STEP_CASES, steps.tolist(), strict=True))


def test_epsilon_steps_bf16_rounding_makes_ties():
    """bf16 keeps 8 significant bits: on [256, 512) its spacing is 2, and comparisons run on the
    rounded sums AND the rounded differences (the authors' bf16 runs, docs/losses.md).

    pair 0 (sums round): π = (−300, −310), minus = (−299.6, −310), plus = (−300.4, −310):
        exact ℓ⁻ = 10.4 > ℓ = 10 > ℓ⁺ = 9.6 → +1; bf16(−299.6) = bf16(−300.4) = −300 → tie → 0.
    pair 1: the same with minus and plus swapped: exact −1, bf16 0.
    pair 2 (differences round): rejected −300 for all, chosen (−0.5, −1, −1.5) for (minus, policy,
        plus): exact 299.5 > 299 > 298.5 → +1; bf16(299.5) = 300, bf16(299) = 300 (half to even),
        bf16(298.5) = 298 → ℓ⁻ = ℓ → 0.
    pair 3 (gaps above the quantum): π = (−300, −310), minus −296, plus −304 → +1 both ways.
    """
    pc = torch.tensor([-300.0, -300.0, -1.0, -300.0])
    pr = torch.tensor([-310.0, -310.0, -300.0, -310.0])
    mc = torch.tensor([-299.6, -300.4, -0.5, -296.0])
    plc = torch.tensor([-300.4, -299.6, -1.5, -304.0])
    exact = epsilon_steps(pc, pr, mc, pr, plc, pr, compare_dtype=None)
    rounded = epsilon_steps(pc, pr, mc, pr, plc, pr, compare_dtype=torch.bfloat16)
    oracle = reference.epsilon_steps(
        pc.double(), pr.double(), mc.double(), pr.double(), plc.double(), pr.double()
    )
    assert exact.tolist() == [1, -1, 1, 1] == oracle.long().tolist()
    assert rounded.tolist() == [0, 0, 0, 1]


# --- ε-DPO loss -----------------------------------------------------------------------------------


@pytest.mark.parametrize("compare_dtype", list(COMPARE_DTYPES.values()), ids=list(COMPARE_DTYPES))
@pytest.mark.parametrize("ls", [0.0, 0.1], ids=["ls0", "ls0.1"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_epsilon_dpo_loss_per_pair_beta(dtype, ls, compare_dtype):
    """β = 0.5, ε = 0.25, β_i = β/(1 + ε·s_i) ∈ {0.4, 2/3, 0.5}. Every pair has π = (−10, −12),
    ρ = (−11, −11), so ℓ = 2 and h = 1 − (−1) = 2; the rejected sums under both mixtures are −12:

    pair 0: minus_w = −9 (ℓ⁻ = 3), plus_w = −11 (ℓ⁺ = 1): s = +1, β_0 = 0.4, x = 0.8.
    pair 1: minus_w = −11, plus_w = −9: s = −1, β_1 = 2/3, x = 4/3.
    pair 2: minus_w = plus_w = −9 (not monotone): s = 0, β_2 = 0.5, x = 1.
    ℓ_i = (1−ls)·log(1+e^{−x}) + ls·log(1+e^{x}) (label smoothing as cDPO, not the authors'
    sign bug); rewards β_i·(π − ρ) = (β_i, −β_i); ∂Σℓ/∂π_w = β_i·g(x_i) = −∂Σℓ/∂π_l; the
    reference and the mixtures get no gradient.
    """
    pc = torch.full((3,), -10.0, dtype=dtype, requires_grad=True)
    pr = torch.full((3,), -12.0, dtype=dtype, requires_grad=True)
    rc = torch.full((3,), -11.0, dtype=dtype, requires_grad=True)
    rr = torch.full((3,), -11.0, dtype=dtype, requires_grad=True)
    mc = torch.tensor([-9.0, -11.0, -9.0], dtype=dtype, requires_grad=True)
    plc = torch.tensor([-11.0, -9.0, -9.0], dtype=dtype, requires_grad=True)
    rej = torch.full((3,), -12.0, dtype=dtype, requires_grad=True)
    out = epsilon_dpo_loss(
        pc,
        pr,
        rc,
        rr,
        mc,
        rej,
        plc,
        rej,
        beta=0.5,
        epsilon=0.25,
        compare_dtype=compare_dtype,
        label_smoothing=ls,
    )
    betas = [0.4, 2.0 / 3.0, 0.5]
    assert out.steps.tolist() == [1, -1, 0]
    check(out.betas, betas, dtype)
    check(out.losses, [smoothed(2 * b, ls) for b in betas], dtype)
    check(out.chosen_rewards, betas, dtype)
    check(out.rejected_rewards, [-b for b in betas], dtype)
    out.losses.sum().backward()
    g = [b * smoothed_grad(2 * b, ls) for b in betas]
    check(pc.grad, g, dtype)
    check(pr.grad, [-x for x in g], dtype)
    assert all(t.grad is None for t in (rc, rr, mc, plc, rej))


def test_epsilon_dpo_loss_accepts_tensor_beta():
    """β as the module's 0-dim fp32 buffer: 0.75/(1 ± 0.5) = 0.5 / 1.5 (exact), h = 2 as above."""
    pc, pr = torch.full((2,), -10.0), torch.full((2,), -12.0)
    ref = torch.full((2,), -11.0)
    rej = torch.full((2,), -12.0)
    mc, plc = torch.tensor([-9.0, -11.0]), torch.tensor([-11.0, -9.0])
    out = epsilon_dpo_loss(pc, pr, ref, ref, mc, rej, plc, rej, beta=torch.tensor(0.75), epsilon=0.5)
    check(out.betas, [0.5, 1.5], torch.float32)
    check(out.losses, [softplus(-1.0), softplus(-3.0)], torch.float32)


@pytest.mark.parametrize("mixtures", ["policy", "random"], ids=["mix-equal-policy", "mix-random"])
@pytest.mark.parametrize("compare_dtype", list(COMPARE_DTYPES.values()), ids=list(COMPARE_DTYPES))
def test_epsilon_zero_is_dpo_exactly(compare_dtype, mixtures):
    """ε = 0: both mixtures are the policy itself, every s = 0 (docs/losses.md) and β_i = β/(1 + 0) = β,
    so losses, rewards and gradients are DPO's bitwise; even with arbitrary mixture sums the
    factor 1 + 0·s keeps β_i = β."""
    g = torch.Generator().manual_seed(5)
    pc, pr, rc, rr = (torch.randn(17, generator=g) * 10 for _ in range(4))
    if mixtures == "policy":
        mc, mr, plc, plr = pc, pr, pc, pr
    else:
        mc, mr, plc, plr = (torch.randn(17, generator=g) * 10 for _ in range(4))
    pc1, pr1 = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    pc2, pr2 = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    e = epsilon_dpo_loss(
        pc1, pr1, rc, rr, mc, mr, plc, plr, beta=0.1, epsilon=0.0, compare_dtype=compare_dtype
    )
    d = dpo_loss(pc2, pr2, rc, rr, beta=0.1)
    if mixtures == "policy":
        assert e.steps.eq(0).all()
    check_bitwise_equal(e, d, [pc1, pr1], [pc2, pr2], upstream=torch.randn(17, generator=g))
