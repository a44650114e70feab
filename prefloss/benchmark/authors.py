"""The authors-style unfused losses: full ``[2B, T, V]`` logits of policy and reference.

Written from docs/losses.md (what the published α-DPO / ε-DPO code does), in plain PyTorch, as the
baseline a user would otherwise run: one GEMM over every position (prompt and padding included),
``log_softmax`` over the whole vocabulary, ``gather`` at the labels, masked sums. ε-DPO also builds
the two perturbed logit tensors ``(1+ε)·f − ε·f_ref`` and ``(1−ε)·f + ε·f_ref``.

Differences from the published code, all in the baseline's favour or neutral for cost:
the reference forward and the perturbed logits run under ``no_grad`` (the published ε-DPO code
builds the perturbed logits with autograd on, which only adds memory); log-softmax is taken in
fp32 (transformers 4.42 upcasts logits; 4.48 does not); the ε-DPO step compares fp32 sums exactly
(prefloss's ``compare_dtype=None``, the float64 reference's convention); α-DPO's first-step
statistics use ``σ = 0 → z = 0`` instead of producing NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _full_logps(logits: torch.Tensor, safe_labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    lp = F.log_softmax(logits, dim=-1).gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return lp * mask


def _split(values: torch.Tensor, mask: torch.Tensor, normalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    s = values.sum(-1)
    if normalise:
        s = s / mask.sum(-1).clamp(min=1)
    b = values.shape[0] // 2
    return s[:b], s[b:]


def authors_loss(
    name: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    ignore_index: int = -100,
    **hp: float,
) -> torch.Tensor:
    """Mean loss of the first training step, from full logits. ``name`` as in `prefloss.reference`."""
    mask = labels != ignore_index
    safe = labels.masked_fill(~mask, 0)
    maskf = mask.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    logits = hidden @ weight.T  # [2B, T, V]
    policy = _full_logps(logits, safe, maskf)
    if name == "simpo":
        return loss_from_token_logps(name, policy, None, maskf, **hp)
    with torch.no_grad():
        ref_logits = ref_hidden @ ref_weight.T
        ref = _full_logps(ref_logits, safe, maskf)
    if name in ("dpo", "alpha_dpo"):
        return loss_from_token_logps(name, policy, ref, maskf, **hp)
    if name == "epsilon_dpo":
        eps = hp["epsilon"]
        with torch.no_grad():
            f = logits.detach()
            minus = _full_logps((1 + eps) * f - eps * ref_logits, safe, maskf)
            plus = _full_logps((1 - eps) * f + eps * ref_logits, safe, maskf)
            pc, pr = _split(policy.detach(), maskf, False)
            mc, mr = _split(minus, maskf, False)
            qc, qr = _split(plus, maskf, False)
            ell, ell_m, ell_p = pc - pr, mc - mr, qc - qr
            up, down = (ell_m > ell) & (ell > ell_p), (ell_p > ell) & (ell > ell_m)
            steps = up.to(ell.dtype) - down.to(ell.dtype)
            beta_i = hp["beta"] / (1 + eps * steps)
        pc, pr = _split(policy, maskf, False)
        rc, rr = _split(ref, maskf, False)
        return -F.logsigmoid(beta_i * ((pc - rc) - (pr - rr))).mean()
    raise ValueError(f"unknown loss {name!r}")


def loss_from_token_logps(
    name: str, policy: torch.Tensor, ref: torch.Tensor | None, maskf: torch.Tensor, **hp: float
) -> torch.Tensor:
    """Mean first-step DPO, SimPO or α-DPO loss from masked per-token log-probs, in plain PyTorch.

    Args:
        name: ``"dpo"``, ``"simpo"`` or ``"alpha_dpo"``.
        policy: ``[2B, T]`` per-token log-probs of the policy (0 at ignored tokens), differentiable;
            rows ``[0, B)`` chosen, ``[B, 2B)`` rejected.
        ref: ``[2B, T]`` the reference's (no grad); ``None`` for SimPO.
        maskf: ``[2B, T]`` 1 at counted tokens, 0 elsewhere.
        hp: the loss's hyperparameters (`prefloss.benchmark.cases.HYPERPARAMS`).

    DPO: ``−log σ(β((π_w − ρ_w) − (π_l − ρ_l)))`` on sums; SimPO: ``−log σ(β(π̄_w − π̄_l) − β·r)`` on
    per-token means; α-DPO: ``−log σ(β((π̄_w − π̄_l) − sg[r + α·z]))``, ``z = (M − μ)/σ`` with
    ``M = (π̄_w − π̄_l) − (ρ̄_w − ρ̄_l)`` and the first update of a zero-started EMA of momentum 0.9
    (``μ = 0.1·mean M``, ``σ = 0.1·std M``, ``z = 0`` where ``σ = 0``): docs/losses.md.
    """
    if name == "simpo":
        pc, pr = _split(policy, maskf, True)
        u = hp["beta"] * (pc - pr) - hp["beta"] * hp["gamma_beta_ratio"]
        return -F.logsigmoid(u).mean()
    if name == "dpo":
        pc, pr = _split(policy, maskf, False)
        rc, rr = _split(ref, maskf, False)
        return -F.logsigmoid(hp["beta"] * ((pc - rc) - (pr - rr))).mean()
    if name == "alpha_dpo":
        pc, pr = _split(policy, maskf, True)
        rc, rr = _split(ref, maskf, True)
        with torch.no_grad():
            gap = (pc - pr) - (rc - rr)
            # First update of an EMA that starts at zero (momentum 0.9): μ = 0.1·mean, σ = 0.1·std.
            mu = 0.1 * gap.mean()
            sigma = 0.1 * gap.std() if gap.numel() > 1 else torch.zeros_like(mu)
            z = torch.where(sigma > 0, (gap - mu) / sigma, torch.zeros_like(gap))
            margin = hp["gamma_beta_ratio"] + hp["alpha"] * z
        return -F.logsigmoid(hp["beta"] * ((pc - pr) - margin)).mean()
    raise ValueError(f"`name` must be 'dpo', 'simpo' or 'alpha_dpo', got {name!r}.")
