"""Unfused float64 oracle for every prefloss op and loss.

Everything here materialises full logits and computes in float64 with plain PyTorch, written
independently of the fused code paths (`prefloss.fused.op`, `prefloss.fused.rows`, `prefloss.kernels`,
`prefloss.losses`; only the loss names and their default hyperparameters are read from
`prefloss.losses.LOSSES`). Tests, ``prefloss check`` and ``prefloss bench`` compare against it.
Memory is O(N·V): use it on small shapes only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from prefloss.fused.op import TokenLogProbs
from prefloss.losses import LOSSES


def transform_logits(raw: torch.Tensor, bias, logit_scale, softcap) -> torch.Tensor:
    """Float64 ``softcap·tanh((raw + bias)·logit_scale / softcap)`` (each step only when given)."""
    z = raw.double()
    if bias is not None:
        z = z + bias.double()
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _logits64(hidden, weight, bias, logit_scale, softcap):
    return transform_logits(hidden.double() @ weight.double().T, bias, logit_scale, softcap)


def _gather_logp(z: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    lp = torch.log_softmax(z, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, lp, torch.zeros_like(lp))


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    epsilon: float | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
) -> TokenLogProbs:
    """Float64 per-token log-probs from full logits (same contract as `prefloss.fused_logprobs`).

    ``z = softcap·tanh((h W^T + b)·scale / softcap)``; ``policy[t] = log_softmax(z_t)[y_t]``;
    ``ref`` likewise from the reference; ``minus`` from ``(1+ε) z − ε z_ref``, ``plus`` from
    ``(1−ε) z + ε z_ref``; all 0 where ``labels == ignore_index``. Differentiable (float64) in
    every floating input that requires grad.

    Shapes: hidden ``[..., H]``, weight ``[V, H]``, labels ``[...]`` → outputs ``[...]`` float64.
    """
    mask = labels != ignore_index
    z = _logits64(hidden, weight, bias, logit_scale, softcap)
    policy = _gather_logp(z, labels, mask)
    ref = minus = plus = None
    if ref_hidden is not None:
        zr = _logits64(ref_hidden, ref_weight, ref_bias, logit_scale, softcap)
        ref = _gather_logp(zr, labels, mask)
        if epsilon is not None:
            minus = _gather_logp((1 + epsilon) * z - epsilon * zr, labels, mask)
            plus = _gather_logp((1 - epsilon) * z + epsilon * zr, labels, mask)
    return TokenLogProbs(policy, ref, minus, plus, mask)


# --- losses on per-sequence values, float64, straight from the papers / docs/losses.md -------


def _sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    # -(1-ls)·log σ(x) - ls·log σ(-x) = (1-ls)·softplus(-x) + ls·softplus(x)
    return (1 - label_smoothing) * F.softplus(-logits) + label_smoothing * F.softplus(logits)


def dpo_losses(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO loss ``−log σ(β((pc − rc) − (pr − rr)))`` on sequence sums, ``[B]``."""
    return _sigmoid_loss(beta * ((pc - rc) - (pr - rr)), label_smoothing)


def simpo_losses(pc, pr, *, beta: float, gamma_beta_ratio: float, label_smoothing: float = 0.0):
    """Per-pair SimPO loss ``−log σ(β(pc − pr) − β·r)`` on length-normalised log-probs, ``[B]``."""
    return _sigmoid_loss(beta * (pc - pr) - beta * gamma_beta_ratio, label_smoothing)


def alpha_dpo_losses(
    pc, pr, rc, rr, *, beta, gamma_beta_ratio, alpha, mean, std, label_smoothing: float = 0.0
):
    """Per-pair α-DPO loss on length-normalised log-probs, given the (already updated) statistics.

    ``M = (pc − pr) − (rc − rr)``; ``z = (M − mean)/std`` (0 where std is 0); margin
    ``m = sg[r + α z]``; loss ``−log σ(β((pc − pr) − m))``.
    """
    m_gap = (pc - pr) - (rc - rr)
    if std > 0:
        z = (m_gap.detach() - mean) / std
    else:
        z = torch.zeros_like(m_gap)
    margin = (gamma_beta_ratio + alpha * z).detach()
    return _sigmoid_loss(beta * ((pc - pr) - margin), label_smoothing)


def epsilon_steps(pc, pr, mc, mr, plc, plr) -> torch.Tensor:
    """ε-DPO step per pair: +1 when the policy log-ratio strictly decreases minus → policy → plus.

    ``ℓ = pc − pr`` under the policy, ``ℓ⁻``/``ℓ⁺`` under the (1+ε)/(1−ε) mixtures:
    ``s = +1 if ℓ⁻ > ℓ > ℓ⁺``, ``−1 if ℓ⁺ > ℓ > ℓ⁻``, else 0 (exact float64 comparison).
    """
    ell, ell_m, ell_p = pc - pr, mc - mr, plc - plr
    up = (ell_m > ell) & (ell > ell_p)
    down = (ell_p > ell) & (ell > ell_m)
    return up.double() - down.double()


def epsilon_dpo_losses(pc, pr, rc, rr, steps, *, beta, epsilon, label_smoothing: float = 0.0):
    """Per-pair ε-DPO loss: DPO on sums with ``β_i = β / (1 + ε·s_i)``, ``[B]``."""
    beta_i = beta / (1 + epsilon * steps)
    return _sigmoid_loss(beta_i * ((pc - rc) - (pr - rr)), label_smoothing)


def preference_loss(
    name: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    beta: float | None = None,
    gamma_beta_ratio: float | None = None,
    alpha: float | None = None,
    epsilon: float | None = None,
    momentum: float = 0.9,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Float64 mean loss of the first training step of prefloss's loss modules, from full logits.

    Args:
        name: a `prefloss.losses.LOSSES` name.
        hidden: ``[2B, T, H]`` (rows ``[0, B)`` chosen, ``[B, 2B)`` rejected); weight ``[V, H]``;
            labels ``[2B, T]``.
        beta, gamma_beta_ratio, alpha, epsilon: the loss's hyperparameters; unset ones take the
            modules' defaults.
        momentum: α-DPO's EMA momentum; the statistics start at 0, so after the first update
            ``mean = (1−momentum)·mean(M)``, ``std = (1−momentum)·std(M)`` (unbiased; 0 if B = 1).

    Returns:
        0-dim float64 loss, differentiable w.r.t. float64 copies of the inputs if they require grad.
        ε-DPO steps use an exact float64 comparison (prefloss's ``compare_dtype=None``).
    """
    if name not in LOSSES:
        raise ValueError(f"`name` must be one of {sorted(LOSSES)}, got {name!r}.")
    hp = dict(LOSSES[name].defaults)
    given = dict(beta=beta, gamma_beta_ratio=gamma_beta_ratio, alpha=alpha, epsilon=epsilon)
    hp.update({k: v for k, v in given.items() if v is not None and k in hp})
    tok = token_logprobs(
        hidden,
        weight,
        labels,
        bias=bias,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        ref_bias=ref_bias,
        epsilon=hp.get("epsilon"),
        logit_scale=logit_scale,
        softcap=softcap,
        ignore_index=ignore_index,
    )
    sums = lambda x: None if x is None else x.sum(-1)
    return sequence_loss(
        name,
        sums(tok.policy),
        tok.mask.sum(-1),
        ref=sums(tok.ref),
        minus=sums(tok.minus),
        plus=sums(tok.plus),
        momentum=momentum,
        label_smoothing=label_smoothing,
        **hp,
    )


# The oracle's own statement of which formulas read per-token means (a test checks the modules'
# `length_normalised` against it).
NORMALISED = {"alpha_dpo": True, "simpo": True, "dpo": False, "epsilon_dpo": False}


def sequence_loss(
    name: str,
    policy: torch.Tensor,
    length: torch.Tensor,
    *,
    ref: torch.Tensor | None = None,
    minus: torch.Tensor | None = None,
    plus: torch.Tensor | None = None,
    beta: float,
    gamma_beta_ratio: float | None = None,
    alpha: float | None = None,
    epsilon: float | None = None,
    momentum: float = 0.9,
    label_smoothing: float = 0.0,
    steps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float64 mean loss of the first training step from per-row sums of token log-probs.

    The second half of `preference_loss` (which calls it): SimPO and α-DPO divide each sum by its
    row's counted-token count (``length.clamp(min=1)``), DPO and ε-DPO use the sums, and the
    per-pair functions above give the losses, averaged over the ``B`` pairs.

    Args:
        name: a `prefloss.losses.LOSSES` name.
        policy: ``[2B]`` per-row sums ``Σ_t log p(y_t)`` under the policy, rows ``[0, B)`` chosen and
            ``[B, 2B)`` rejected; differentiable.
        length: ``[2B]`` counted tokens per row.
        ref, minus, plus: ``[2B]`` sums under the reference and ε-DPO's two mixtures (where needed).
        beta, gamma_beta_ratio, alpha, epsilon: the loss's hyperparameters (no defaults here).
        momentum: α-DPO's EMA momentum, as in `preference_loss`.
        steps: ε-DPO's per-pair step ``s [B]``; ``None`` (default) computes it from ``minus`` and
            ``plus`` with `epsilon_steps`. `prefloss.testing` passes other steps to measure how far
            the loss moves when a comparison is too close to call.

    Returns:
        0-dim float64 loss.
    """
    if name not in NORMALISED:
        raise ValueError(f"`name` must be one of {sorted(NORMALISED)}, got {name!r}.")
    b = policy.shape[0] // 2
    count = length.to(policy.dtype).clamp(min=1)

    def split(x):
        s = x / count if NORMALISED[name] else x
        return s[:b], s[b:]

    pc, pr = split(policy)
    if name == "simpo":
        losses = simpo_losses(
            pc, pr, beta=beta, gamma_beta_ratio=gamma_beta_ratio, label_smoothing=label_smoothing
        )
    elif name == "dpo":
        rc, rr = split(ref)
        losses = dpo_losses(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing)
    elif name == "alpha_dpo":
        rc, rr = split(ref)
        gap = ((pc - pr) - (rc - rr)).detach()
        mean = (1 - momentum) * float(gap.mean())
        std = (1 - momentum) * float(gap.std()) if gap.numel() > 1 else 0.0
        if not math.isfinite(std):
            std = 0.0
        losses = alpha_dpo_losses(
            pc,
            pr,
            rc,
            rr,
            beta=beta,
            gamma_beta_ratio=gamma_beta_ratio,
            alpha=alpha,
            mean=mean,
            std=std,
            label_smoothing=label_smoothing,
        )
    else:
        rc, rr = split(ref)
        if steps is None:
            mc, mr = split(minus)
            plc, plr = split(plus)
            steps = epsilon_steps(pc.detach(), pr.detach(), mc, mr, plc, plr)
        losses = epsilon_dpo_losses(
            pc, pr, rc, rr, steps, beta=beta, epsilon=epsilon, label_smoothing=label_smoothing
        )
    return losses.mean()
