"""Shared correctness criterion for tests, `prefloss check` and the benchmark.

One tolerance table and one comparison: a result computed at some dtype is judged by its error
against the float64 reference (`prefloss.reference`), relative to the error the plain PyTorch
computation makes at the same dtype:

    err(candidate) <= err(baseline at the same dtype) + TOLERANCES[dtype]

where err is the max absolute difference to the float64 reference. For float32 the baseline error
is ~1e-6, so the bound is essentially the absolute tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Absolute slack on top of the baseline's own error, per input dtype.
TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 5e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 2e-3,
}


@dataclass(frozen=True)
class Comparison:
    """How far ``actual`` is from ``expected`` (the float64 reference)."""

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


def compare(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    dtype: torch.dtype,
    baseline: torch.Tensor | None = None,
    scale: float = 1.0,
) -> Comparison:
    """Judge ``actual`` against the float64 ``expected``.

    Args:
        actual: result under test, any shape.
        expected: float64 reference of the same shape.
        dtype: input dtype the result was computed at; selects ``TOLERANCES[dtype]``.
        baseline: the plain PyTorch result at the same dtype; its error is added to the bound.
        scale: multiplies the tolerance (for quantities whose magnitude grows with the problem,
            e.g. gradients summed over many tokens); pass the quantity's natural scale.
    """
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}")
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    err = max_abs_err(a, e)
    base = max_abs_err(baseline, e) if baseline is not None else 0.0
    bound = base + TOLERANCES[dtype] * scale
    diff = torch.nan_to_num((a - e).abs(), nan=float("inf"))
    worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)) if diff.numel() else ()
    rms_e = float(e.pow(2).mean().sqrt()) if e.numel() else 0.0
    rms_d = float((a - e).pow(2).mean().sqrt()) if e.numel() else 0.0
    return Comparison(err, bound, rms_d / rms_e if rms_e > 0 else 0.0, worst, err <= bound)


def assert_close_to_reference(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    dtype: torch.dtype,
    baseline: torch.Tensor | None = None,
    scale: float = 1.0,
    name: str = "value",
) -> Comparison:
    """`compare`, raising AssertionError with max abs error, RMS ratio and worst index on failure."""
    result = compare(actual, expected, dtype=dtype, baseline=baseline, scale=scale)
    if not result.passed:
        raise AssertionError(result.describe(name))
    return result


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
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, lp, torch.zeros_like(lp))
