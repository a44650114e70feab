"""The float64 ground truth of the benchmark's correctness gate, with its bounds, token-chunked.

`prefloss.reference.preference_loss` materialises float64 logits for all ``2B·T`` positions (and,
for ε-DPO, the two mixtures), which does not fit in memory at the sweep's larger shapes. This module
composes the same float64 pieces of `prefloss.reference` chunk by chunk instead, and measures the
plain PyTorch computation at the input dtype alongside, which sets the bounds (`prefloss.testing`):

1. per-token values from `prefloss.reference.token_logprobs` (float64, full-vocabulary softmax) and
   from `prefloss.testing.plain_logprobs` (the input dtype) on chunks of counted tokens (each
   token's value depends only on its own row of logits): the op's token and per-row sum bounds;
2. the loss `prefloss.reference.sequence_loss` of the float64 sums, its gradient ``g`` w.r.t. the
   policy sums, and how far both may move (`prefloss.testing.loss_error_bounds`);
3. a second pass, row by row, through `token_logprobs` (float64) and `plain_token_logprobs` with
   autograd, unit upstream gradient: each row's Jacobians give the float64 gradients
   ``Σ_r g_r·J_r`` w.r.t. ``hidden`` and ``weight``, plain PyTorch's error on them, and the
   propagated part ``Σ_r Δg_r·|J_r|`` of their bounds (`prefloss.testing.gradient_bound`).

``tests/test_bench_cli.py`` checks that the values equal `preference_loss` and its autograd
gradients, that prefloss passes over seeds 0–9 and that injected errors fail.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from prefloss import reference
from prefloss.testing import (
    ERROR_MARGIN,
    Comparison,
    compare,
    error_scale,
    gradient_bound,
    loss_error_bounds,
    plain_logprobs,
    plain_token_logprobs,
    sequence_error_scale,
    unit_roundoff,
)

KINDS = ("policy", "ref", "minus", "plus")


class Bounded(NamedTuple):
    """A float64 truth and how far a correct result may be from it (a number or elementwise)."""

    value: torch.Tensor
    bound: torch.Tensor  # 0-dim, or the value's shape (float32 for gradients: half the memory)


class GroundTruth(NamedTuple):
    """Everything a case is judged against, for one shape.

    Attributes:
        tokens: kind → `Bounded` ``[2B, T]`` per-token log-probs (0 at ignored tokens).
        sums: kind → `Bounded` ``[2B]`` per-row sums.
        losses: loss name → {``"loss"``: 0-dim, ``"grad_hidden"``: ``[2B, T, H]``,
            ``"grad_weight"``: ``[V, H]``} `Bounded`.
    """

    tokens: dict[str, Bounded]
    sums: dict[str, Bounded]
    losses: dict[str, dict[str, Bounded]]

    def to_state(self) -> dict:
        """Plain nested dicts of tensors, for ``torch.save`` / ``torch.load(weights_only=True)``."""
        plain = lambda d: {k: tuple(v) for k, v in d.items()}
        return {
            "tokens": plain(self.tokens),
            "sums": plain(self.sums),
            "losses": {n: plain(d) for n, d in self.losses.items()},
        }

    @classmethod
    def from_state(cls, state: dict) -> GroundTruth:
        bounded = lambda d: {k: Bounded(*v) for k, v in d.items()}
        return cls(
            bounded(state["tokens"]),
            bounded(state["sums"]),
            {n: bounded(d) for n, d in state["losses"].items()},
        )


def ground_truth(
    losses: dict[str, dict[str, float]],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    ignore_index: int = -100,
    chunk_tokens: int = 512,
) -> GroundTruth:
    """Float64 truth and bounds for each ``{name: hyperparameters}`` in ``losses``.

    Args:
        losses: loss name → its hyperparameters (as `prefloss.reference.sequence_loss` takes them).
        hidden: ``[2B, T, H]`` policy hidden states (rows ``[0, B)`` chosen), the dtype under test.
        weight: ``[V, H]``; labels ``[2B, T]``; ref_hidden, ref_weight: the reference model's.
        chunk_tokens: counted tokens per float64 chunk (memory ``chunk_tokens·V`` float64 values).
    """
    rows, seq_len, h = hidden.shape
    dtype = hidden.dtype
    device = hidden.device
    flat_h = hidden.detach().reshape(-1, h)
    flat_hr = ref_hidden.detach().reshape(-1, h)
    flat_y = labels.reshape(-1)
    idx = (flat_y != ignore_index).nonzero().squeeze(1)
    row_of = idx // seq_len
    length = torch.zeros(rows, dtype=torch.int64, device=device)
    length.index_add_(0, row_of, torch.ones_like(row_of))
    eps = losses["epsilon_dpo"]["epsilon"] if "epsilon_dpo" in losses else None
    f64 = dict(dtype=torch.float64, device=device)

    # Pass 1: per-token float64 values and the plain computation's at the input dtype.
    exact = {k: torch.zeros(rows * seq_len, **f64) for k in KINDS}
    plain = {k: torch.zeros(rows * seq_len, dtype=torch.float32, device=device) for k in KINDS}
    with torch.no_grad():
        for start in range(0, idx.numel(), chunk_tokens):
            sel = idx[start : start + chunk_tokens]
            kw = dict(ref_hidden=flat_hr[sel], ref_weight=ref_weight.detach(), epsilon=eps)
            tok64 = reference.token_logprobs(flat_h[sel], weight.detach(), flat_y[sel], **kw)
            tok = plain_logprobs(flat_h[sel], weight.detach(), flat_y[sel], **kw)
            for k in KINDS:
                if getattr(tok64, k) is not None:
                    exact[k][sel] = getattr(tok64, k)
                    plain[k][sel] = getattr(tok, k)
    kinds = KINDS if eps is not None else KINDS[:2]
    exact = {k: exact[k].reshape(rows, seq_len) for k in kinds}
    plain = {k: plain[k].reshape(rows, seq_len) for k in kinds}
    scales = {k: sequence_error_scale(plain[k], exact[k]) for k in kinds}
    tokens = {k: Bounded(exact[k], _number(ERROR_MARGIN * error_scale(plain[k], exact[k]))) for k in kinds}
    sums = {k: Bounded(exact[k].sum(-1), ERROR_MARGIN * scales[k]) for k in kinds}

    # The losses, their upstream gradients and how far each may move.
    bounds = {
        name: loss_error_bounds(
            name, {k: s.value for k, s in sums.items()}, length, scales, dtype=dtype, **hp
        )
        for name, hp in losses.items()
    }

    # Pass 2, row by row: Jacobians of each row's policy sum, float64 and plain.
    names = list(losses)
    w64 = weight.detach().double().requires_grad_()
    w_plain = weight.detach().clone().requires_grad_()
    grad_h = {n: torch.zeros(rows * seq_len, h, **f64) for n in names}
    prop_h = {n: torch.zeros(rows * seq_len, h, dtype=torch.float32, device=device) for n in names}
    plain_err_h = dict.fromkeys(names, 0.0)
    grad_w = {n: torch.zeros_like(w64) for n in names}
    plain_w = {n: torch.zeros(weight.shape, dtype=torch.float32, device=device) for n in names}
    prop_w = {n: torch.zeros(weight.shape, dtype=torch.float32, device=device) for n in names}
    for r in range(rows):
        row_idx = idx[row_of == r]
        if row_idx.numel() == 0:
            continue
        k64 = torch.zeros_like(w64)
        k_plain = torch.zeros_like(w64)
        for start in range(0, row_idx.numel(), chunk_tokens):
            sel = row_idx[start : start + chunk_tokens]
            h64 = flat_h[sel].double().requires_grad_()
            lp = reference.token_logprobs(h64, w64, flat_y[sel]).policy
            j64, kw64 = torch.autograd.grad(lp.sum(), (h64, w64))
            hp_ = flat_h[sel].clone().requires_grad_()
            lp_plain = plain_token_logprobs(hp_, w_plain, flat_y[sel])
            j_plain, kw_plain = torch.autograd.grad(lp_plain.sum(), (hp_, w_plain))
            k64 += kw64
            k_plain += kw_plain.double()
            for n in names:
                g, dg = bounds[n].upstream[r], bounds[n].upstream_bound[r]
                grad_h[n][sel] = g * j64
                got = (g.to(j_plain.dtype) * j_plain).double()
                plain_err_h[n] = max(plain_err_h[n], float((got - grad_h[n][sel]).abs().max()))
                prop_h[n][sel] = (dg * j64.abs()).float()
        for n in names:
            g, dg = bounds[n].upstream[r], bounds[n].upstream_bound[r]
            grad_w[n] += g * k64
            plain_w[n] += (g * k_plain).float()
            prop_w[n] += (dg * k64.abs()).float()

    truth = {}
    for n in names:
        # `error_scale` of plain's ∂hidden, accumulated row by row above
        scale_h = max(plain_err_h[n], unit_roundoff(dtype) * float(grad_h[n].abs().max()))
        gh = grad_h[n].reshape(rows, seq_len, h)
        truth[n] = {
            "loss": Bounded(bounds[n].loss, _number(bounds[n].loss_bound)),
            "grad_hidden": Bounded(gh, gradient_bound(scale_h, prop_h[n]).reshape(gh.shape)),
            "grad_weight": Bounded(
                grad_w[n], gradient_bound(error_scale(plain_w[n], grad_w[n], dtype), prop_w[n])
            ),
        }
    return GroundTruth(tokens, sums, truth)


def _number(x: float) -> torch.Tensor:
    return torch.tensor(float(x), dtype=torch.float64)


def judge(truth: GroundTruth, loss: str, got: dict[str, torch.Tensor]) -> dict[str, Comparison]:
    """Compare a case's results with the truth; ``got`` maps names to results.

    Names: ``"loss"``, ``"grad_hidden"``, ``"grad_weight"`` (judged against ``truth.losses[loss]``),
    and ``"<kind> tokens"`` / ``"<kind> sums"`` (``[2B, T]`` per-token values / ``[2B]`` per-row
    sums of the op, judged against ``truth.tokens`` / ``truth.sums``).
    """
    out = {}
    for key, value in got.items():
        if key.endswith(" tokens") or key.endswith(" sums"):
            kind, what = key.split(" ")
            expected = (truth.tokens if what == "tokens" else truth.sums)[kind]
        else:
            expected = truth.losses[loss][key]
        out[key] = compare(value, expected.value, bound=expected.bound)
    return out
