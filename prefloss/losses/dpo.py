"""DPO (Rafailov et al., 2023, https://arxiv.org/abs/2305.18290) on fused sequence log-probs.

``ℓ_i = −log σ(β·[(π_w − ρ_w) − (π_l − ρ_l)])`` with π, ρ the policy / reference sequence sums.
ε-DPO with ε = 0 is exactly this loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from prefloss.losses.common import (
    LossOutput,
    check_beta,
    check_label_smoothing,
    check_options,
    pair_sequences,
    reward_metrics,
    sigmoid_loss,
    split_pairs,
)


class PairLosses(NamedTuple):
    """Per-pair outputs of the functional losses, each ``[B]``."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor  # detached
    rejected_rewards: torch.Tensor  # detached


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float | torch.Tensor,
    label_smoothing: float = 0.0,
) -> PairLosses:
    """Per-pair DPO loss on sequence log-probs.

    Args:
        policy_chosen, policy_rejected: ``[B]`` policy sequence log-prob sums (differentiable).
        ref_chosen, ref_rejected: ``[B]`` reference sums (treated as constants).
        beta: β > 0 (a float, ``[]`` or ``[B]`` tensor — ε-DPO passes per-pair values).
        label_smoothing: conservative-DPO smoothing ``ls``:
            ``−(1−ls)·log σ(βh) − ls·log σ(−βh)``.

    Returns:
        `PairLosses`: ``losses [B]``; rewards ``β·(π − ρ)`` for chosen and rejected.
    """
    h = (policy_chosen - ref_chosen.detach()) - (policy_rejected - ref_rejected.detach())
    losses = sigmoid_loss(beta * h, label_smoothing)
    chosen_rewards = (beta * (policy_chosen - ref_chosen)).detach()
    rejected_rewards = (beta * (policy_rejected - ref_rejected)).detach()
    return PairLosses(losses, chosen_rewards, rejected_rewards)


class DPOLoss(nn.Module):
    """DPO from hidden states: ``loss_fn(hidden, weight, labels, ref_hidden=..., ref_weight=...)``.

    Args:
        beta: β > 0 (default 0.1, TRL's default).
        label_smoothing: see `dpo_loss`.
        chunk_size, backend: passed to `prefloss.fused_logprobs`.

    Every numeric argument must be finite and in range (``ValueError`` naming it otherwise).
    A pair whose chosen or rejected response has no counted token (all labels ``ignore_index``) is
    refused with a ``ValueError`` naming it (its log-prob would be 0, the best score there is).
    """

    def __init__(self, beta: float = 0.1, *, label_smoothing: float = 0.0, chunk_size=None, backend="auto"):
        super().__init__()
        self.beta, self.label_smoothing = check_beta(beta), check_label_smoothing(label_smoothing)
        self.chunk_size, self.backend = check_options(chunk_size, backend)

    def forward(
        self,
        hidden,
        weight,
        labels,
        *,
        bias=None,
        ref_hidden=None,
        ref_weight=None,
        ref_bias=None,
        ref_logps=None,
        logit_scale=None,
        softcap=None,
        ignore_index=-100,
    ) -> LossOutput:
        """Args: hidden ``[2B, T, H]`` (rows ``[0, B)`` chosen), weight ``[V, H]``, labels ``[2B, T]``;
        the reference as ``ref_hidden``/``ref_weight`` or as precomputed sums ``ref_logps [2B]``."""
        seq = pair_sequences(
            "DPOLoss",
            hidden,
            weight,
            labels,
            reference="live_or_precomputed",
            bias=bias,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            ref_bias=ref_bias,
            ref_logps=ref_logps,
            logit_scale=logit_scale,
            softcap=softcap,
            ignore_index=ignore_index,
            chunk_size=self.chunk_size,
            backend=self.backend,
        )
        pc, pr = split_pairs(seq.policy)
        rc, rr = split_pairs(seq.ref)
        out = dpo_loss(pc, pr, rc, rr, beta=self.beta, label_smoothing=self.label_smoothing)
        metrics = reward_metrics(out.chosen_rewards, out.rejected_rewards)
        metrics.update({"logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean()})
        return LossOutput(out.losses.mean(), metrics, out.chosen_rewards, out.rejected_rewards)
