"""Shared correctness criterion for tests, `prefloss check` and the benchmark.

Every result computed at some dtype is judged by its error against float64 ground truth
(`prefloss.reference`), and the bound follows what is judged:

1. **Outputs of the op**: per-token log-probs, and gradients for a given upstream gradient
   (`compare` with a ``baseline``)::

       err(candidate) <= ERROR_MARGIN · max(err(plain PyTorch at the same dtype), u · max|expected|)

   err is the max absolute difference to float64, u the unit roundoff (``eps/2``) of the result's
   dtype. The floor ``u·max|expected|`` is the rounding of the largest value: it keeps a baseline
   that is exact by luck (a handful of tokens) from making the bound vanish.
2. **Per-row sums** ``Σ_t log p_t`` (`sequence_error_scale`): row ``r`` may be off by
   ``ERROR_MARGIN · s_r``, with ``s_r`` the plain computation's error on that row's sum, or the
   size of its token errors added up in quadrature when they cancel by luck, or the scale of the
   fp32 summation's own rounding, whichever is largest.
3. **Losses and their gradients** (`loss_error_bounds`): the float64 loss of the per-row sums
   (`prefloss.reference.sequence_loss`) is moved by each of its inputs ``x_i`` in turn by
   ``±δ_i``, ``δ_i = ERROR_MARGIN·s_i + COMPOSITION_ROUNDINGS·u32·|x_i|`` (the sum's error bound
   plus the fp32 roundings between the sum and the loss), and the moves are added up::

       bound(L) = Σ_i max_± |L(x ± δ_i e_i) − L(x)|   (+ ε-DPO pairs whose step is too close to call)

   so the bound follows the loss's conditioning: α-DPO at its first step divides the margin by
   0.1·std of the batch's M and amplifies rounding by orders of magnitude; DPO does not. The
   upstream gradient ``g_r = ∂L/∂(policy sum of row r)`` gets a bound ``Δg_r`` the same way, and a
   gradient ``G = Σ_r g_r·J_r`` (``J_r`` the Jacobian of row r's sum) may be off by
   ``ERROR_MARGIN · (plain's error at the exact g) + Σ_r Δg_r·|J_r|`` elementwise
   (`gradient_bound`).

``ERROR_MARGIN`` covers the spread of max errors from one realisation of rounding to the next (the
spread measured over seeds: docs/performance.md). With ``ERROR_MARGIN < 5`` a single token
off by 10× the fp32 error (``10·error_scale``) always fails: ``10·s − ERROR_MARGIN·s > ERROR_MARGIN·s``.

`TOLERANCES` remain for comparisons that have no plain-PyTorch counterpart (float64 identities,
end-to-end losses of small modules): ``err <= TOLERANCES[dtype]·scale``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from prefloss import reference
from prefloss.fused.op import TokenLogProbs

# Margin on plain PyTorch's error (or an error bound derived from it); see the module docstring.
ERROR_MARGIN = 4.0
# fp32 roundings between a row's sum and the first well-conditioned step of any loss, each at
# most u relative to an input: the normalisation by length, the two differences of
# ``(π_w − π_l) − (ρ_w − ρ_l)`` and the multiplication by β.
COMPOSITION_ROUNDINGS = 4.0

# Absolute tolerance where there is no baseline, per input dtype.
TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 5e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 2e-3,
}


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u = eps/2``: the largest relative error of rounding a real number to ``dtype``."""
    return torch.finfo(dtype).eps / 2


@dataclass(frozen=True)
class Comparison:
    """How far ``actual`` is from ``expected`` (the float64 reference).

    With an elementwise bound, ``max_abs_err`` and ``bound`` are taken at ``worst_index``, the
    element with the largest error relative to its bound; with one bound for the whole tensor
    they are the max absolute error and that bound.
    """

    max_abs_err: float
    bound: float
    rms_ratio: float  # rms(actual - expected) / rms(expected); 0 when expected is all zeros
    worst_index: tuple[int, ...]
    passed: bool

    def describe(self, name: str = "value") -> str:
        return (
            f"{name}: max abs err {self.max_abs_err:.3e} (bound {self.bound:.3e}) at index "
            f"{self.worst_index}, rms ratio {self.rms_ratio:.3e}"
        )


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max |actual - expected| in float64; NaN anywhere in ``actual`` counts as infinite error."""
    diff = (actual.detach().double().cpu() - expected.detach().double().cpu()).abs()
    if diff.numel() == 0:
        return 0.0
    diff = torch.nan_to_num(diff, nan=float("inf"))
    return float(diff.max())


def error_scale(baseline: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> float:
    """The plain computation's error scale ``max(err(baseline), u·max|expected|)``.

    Args:
        baseline: plain PyTorch's result, any shape.
        expected: float64 reference of the same shape.
        dtype: the dtype the result is rounded to (``u = unit_roundoff(dtype)``); default
            ``baseline.dtype``. The floor is the rounding of the largest value.
    """
    u = unit_roundoff(baseline.dtype if dtype is None else dtype)
    floor = u * float(expected.detach().abs().max()) if expected.numel() else 0.0
    return max(max_abs_err(baseline, expected), floor)


def compare(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    baseline: torch.Tensor | None = None,
    scale: float = 1.0,
    bound: float | torch.Tensor | None = None,
) -> Comparison:
    """Judge ``actual`` against the float64 ``expected``; passes when ``|actual − expected| <= bound``.

    The bound, in order of precedence:
    - ``bound`` given: as is (a number, or a tensor broadcastable to ``expected``: elementwise);
    - ``baseline`` given: ``ERROR_MARGIN · error_scale(baseline, expected)``;
    - otherwise ``TOLERANCES[dtype] · scale``.

    Args:
        actual: result under test, any shape.
        expected: float64 reference of the same shape.
        dtype: the input dtype; selects ``TOLERANCES[dtype]`` when there is neither a bound nor a
            baseline.
        baseline: the plain PyTorch result at the same dtype.
        scale: multiplies the tolerance when there is no baseline (for quantities whose magnitude
            grows with the problem, e.g. gradients summed over many tokens).
        bound: an explicit bound, e.g. from `loss_error_bounds` / `gradient_bound`.
    """
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}")
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if bound is None and baseline is not None:
        bound = ERROR_MARGIN * error_scale(baseline, e)
    elif bound is None:
        if dtype not in TOLERANCES:
            raise ValueError(
                f"`dtype` must be one of {list(TOLERANCES)} without a bound or baseline, got {dtype}."
            )
        bound = TOLERANCES[dtype] * scale
    diff = torch.nan_to_num((a - e).abs(), nan=float("inf"))
    limit = torch.as_tensor(bound, dtype=torch.float64).cpu().expand_as(diff)
    if diff.numel() == 0:
        return Comparison(0.0, 0.0, 0.0, (), True)
    # the element closest to failing (or failing worst): the largest err/bound; 0/0 counts as 0
    ratio = torch.nan_to_num(diff / limit, nan=0.0)
    worst = tuple(int(i) for i in torch.unravel_index(ratio.argmax(), diff.shape))
    rms_e = float(e.pow(2).mean().sqrt())
    rms_d = float((a - e).pow(2).mean().sqrt())
    return Comparison(
        float(diff[worst]),
        float(limit[worst]),
        rms_d / rms_e if rms_e > 0 else 0.0,
        worst,
        bool((diff <= limit).all()),
    )


def assert_close_to_reference(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    baseline: torch.Tensor | None = None,
    scale: float = 1.0,
    bound: float | torch.Tensor | None = None,
    name: str = "value",
) -> Comparison:
    """`compare`, raising AssertionError with max abs error, RMS ratio and worst index on failure."""
    result = compare(actual, expected, dtype=dtype, baseline=baseline, scale=scale, bound=bound)
    if not result.passed:
        raise AssertionError(result.describe(name))
    return result


# --- per-row sums ----------------------------------------------------------------------------------


def sequence_error_scale(plain: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Per-row error scale of the plain computation's sums ``Σ_t log p_t``.

    ``s = max(|Σ_t plain_t − Σ_t expected_t|, √(Σ_t e_t²), eps·Σ_t |expected_t|)`` with
    ``e = plain − expected`` and ``eps`` the machine epsilon of ``plain``'s dtype, in which it is
    summed (as the op sums its tokens). The quadrature term stands in for a realisation whose token
    errors cancel by luck. The last is the scale of the summation's own rounding, which at T = 512
    and |log p| ≈ 10 exceeds the tokens' errors tenfold: over 2000 random rows of 21 to 3584 terms,
    torch's fp32 sum was off by at most 1.7·eps·Σ|v| (mean 0.35). A candidate's sums may be off by
    ``ERROR_MARGIN · s``.

    Args:
        plain: ``[..., T]`` plain PyTorch's per-token values (0 at ignored tokens).
        expected: ``[..., T]`` float64 per-token values.

    Returns:
        ``[...]`` float64.
    """
    e = expected.detach().double()
    err = plain.detach().double() - e
    realised = (plain.detach().sum(-1).double() - e.sum(-1)).abs()
    quadrature = err.pow(2).sum(-1).sqrt()
    summation = torch.finfo(plain.dtype).eps * e.abs().sum(-1)
    return torch.maximum(torch.maximum(realised, quadrature), summation)


# --- losses and gradients --------------------------------------------------------------------------


class LossBounds(NamedTuple):
    """The float64 loss at the exact sums, its upstream gradient, and how far each may move."""

    loss: torch.Tensor  # 0-dim float64
    loss_bound: float
    upstream: torch.Tensor  # [2B] float64: ∂loss/∂(policy sum of each row)
    upstream_bound: torch.Tensor  # [2B] float64


def _needed_kinds(name: str) -> tuple[str, ...]:
    return {"simpo": ("policy",), "epsilon_dpo": ("policy", "ref", "minus", "plus")}.get(
        name, ("policy", "ref")
    )


def loss_error_bounds(
    name: str,
    sums: dict[str, torch.Tensor],
    length: torch.Tensor,
    scales: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype,
    momentum: float = 0.9,
    **hp: float,
) -> LossBounds:
    """How far a correct loss (and its upstream gradient) computed at ``dtype`` may be from float64.

    The loss's inputs are the per-row sums ``x`` (``sums[kind]``). Each may be off by
    ``δ = ERROR_MARGIN·scales[kind] + COMPOSITION_ROUNDINGS·u·|x|`` (``u`` of the dtype the loss is
    composed in: fp32, or float64 for float64 inputs). The float64 loss
    `prefloss.reference.sequence_loss` is evaluated with one input at a time moved by ``±δ``
    (finite differences at the size of the error, so α-DPO's batch statistics move with it)::

        loss_bound     = Σ_i max_± |L(x ± δ_i e_i) − L(x)|        + COMPOSITION_ROUNDINGS·u·|L|
        upstream_bound = Σ_i max_± |g(x ± δ_i e_i) − g(x)|        + COMPOSITION_ROUNDINGS·u·|g|

    with ``g = ∂L/∂x_policy`` (the loss's own gradient, ε-DPO's steps and α-DPO's margin detached).
    ε-DPO's step of a pair is held at its float64 value in these moves; when one of its strict
    comparisons (``ℓ⁻`` vs ``ℓ``, ``ℓ`` vs ``ℓ⁺``, ``ℓ = chosen − rejected``) is closer than the
    two sides' ``δ`` added up, the largest change over the three steps is added.

    Args:
        name: ``"alpha_dpo" | "epsilon_dpo" | "dpo" | "simpo"``.
        sums: kind (``"policy"``, ``"ref"``, ``"minus"``, ``"plus"``) → ``[2B]`` float64 exact sums;
            the kinds the loss reads must be present.
        length: ``[2B]`` counted tokens per row.
        scales: kind → ``[2B]`` error scale of the sums (`sequence_error_scale`).
        dtype: the input dtype.
        momentum, hp: the loss's hyperparameters, as `prefloss.reference.sequence_loss`.

    Returns:
        `LossBounds`.
    """
    kinds = _needed_kinds(name)
    missing = [k for k in kinds if k not in sums or k not in scales]
    if missing:
        raise ValueError(f"{name} needs the sums and scales of {kinds}, missing {missing}.")
    u = unit_roundoff(torch.promote_types(dtype, torch.float32))
    x = {k: sums[k].detach().double() for k in kinds}
    delta = {k: ERROR_MARGIN * scales[k].double() + COMPOSITION_ROUNDINGS * u * x[k].abs() for k in kinds}

    def evaluate(values, steps=None):
        leaf = values["policy"].clone().requires_grad_()
        loss = reference.sequence_loss(
            name,
            leaf,
            length,
            ref=values.get("ref"),
            minus=values.get("minus"),
            plus=values.get("plus"),
            momentum=momentum,
            steps=steps,
            **hp,
        )
        (grad,) = torch.autograd.grad(loss, leaf)
        return loss.detach(), grad

    steps = None
    if name == "epsilon_dpo":
        b = x["policy"].shape[0] // 2
        ell = {k: x[k][:b] - x[k][b:] for k in ("policy", "minus", "plus")}
        steps = reference.epsilon_steps(*_pairs(x["policy"]), *_pairs(x["minus"]), *_pairs(x["plus"]))
    loss, grad = evaluate(x, steps)
    loss_bound = 0.0
    grad_bound = torch.zeros_like(grad)
    for kind in kinds:
        for i in range(x[kind].shape[0]):
            moves = []
            for sign in (1.0, -1.0):
                moved = dict(x)
                moved[kind] = x[kind].clone()
                moved[kind][i] += sign * delta[kind][i]
                moves.append(evaluate(moved, steps))
            loss_bound += max(abs(float(m[0] - loss)) for m in moves)
            grad_bound += torch.maximum(*((m[1] - grad).abs() for m in moves))
    if name == "epsilon_dpo":
        spread = {k: delta[k][:b] + delta[k][b:] for k in ("policy", "minus", "plus")}
        close = ((ell["minus"] - ell["policy"]).abs() <= spread["minus"] + spread["policy"]) | (
            (ell["policy"] - ell["plus"]).abs() <= spread["policy"] + spread["plus"]
        )
        for pair in close.nonzero().flatten().tolist():
            jumps = []
            for step in (-1.0, 0.0, 1.0):
                other = steps.clone()
                other[pair] = step
                jumps.append(evaluate(x, other))
            loss_bound += max(abs(float(j[0] - loss)) for j in jumps)
            grad_bound += torch.stack([(j[1] - grad).abs() for j in jumps]).amax(0)
    loss_bound += COMPOSITION_ROUNDINGS * u * abs(float(loss))
    grad_bound += COMPOSITION_ROUNDINGS * u * grad.abs()
    return LossBounds(loss, loss_bound, grad, grad_bound)


def _pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = x.shape[0] // 2
    return x[:b], x[b:]


def gradient_bound(plain_error_scale: float, propagated: torch.Tensor) -> torch.Tensor:
    """Elementwise bound of a loss's gradient: ``ERROR_MARGIN · plain_error_scale + propagated``.

    Args:
        plain_error_scale: `error_scale` of plain PyTorch's gradient at the exact upstream gradient
            (the op's own backward error).
        propagated: ``Σ_r Δg_r·|J_r|`` elementwise, any shape: the upstream bound of
            `loss_error_bounds` times the absolute Jacobian of each row's sum w.r.t. the parameter
            (for ``∂hidden``, token ``t`` of row ``r`` gets ``Δg_r·|∂ log p_t/∂h_t|``; for ``∂weight``
            the rows' ``Δg_r·|Σ_{t∈r} ∂ log p_t/∂W|`` add up).
    """
    return ERROR_MARGIN * plain_error_scale + propagated


# --- the plain computation -------------------------------------------------------------------------


def _plain_logits(hidden, weight, bias, logit_scale, softcap) -> torch.Tensor:
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def _gather(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, lp, torch.zeros_like(lp))


def plain_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The plain PyTorch computation at the input dtype (the baseline of the error criterion).

    What a Hugging Face model does: logits ``hidden @ weight.T (+ bias)`` in the input dtype, the
    transform, upcast to fp32, ``log_softmax``, gather; 0 at ignored tokens. ``[..., T]`` float32,
    differentiable. Materialises ``[..., T, V]``: small shapes only.
    """
    return _gather(_plain_logits(hidden, weight, bias, logit_scale, softcap), labels, ignore_index)


def plain_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    epsilon: float | None = None,
    ignore_index: int = -100,
) -> TokenLogProbs:
    """Every output of `prefloss.fused_logprobs`, computed the plain way (`plain_token_logprobs`).

    The mixtures are ``(1+ε)·f − ε·f_ref`` and ``(1−ε)·f + ε·f_ref`` of the fp32-upcast logits.
    Shapes: hidden ``[..., H]``, weight ``[V, H]``, labels ``[...]`` → ``[...]`` float32 each.
    """
    logits = _plain_logits(hidden, weight, None, None, None)
    policy = _gather(logits, labels, ignore_index)
    ref = minus = plus = None
    if ref_hidden is not None:
        ref_logits = _plain_logits(ref_hidden, ref_weight, None, None, None)
        ref = _gather(ref_logits, labels, ignore_index)
        if epsilon is not None:
            f, fr = logits.float(), ref_logits.float()
            minus = _gather((1 + epsilon) * f - epsilon * fr, labels, ignore_index)
            plus = _gather((1 - epsilon) * f + epsilon * fr, labels, ignore_index)
    return TokenLogProbs(policy, ref, minus, plus, labels != ignore_index)
