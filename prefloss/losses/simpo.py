"""SimPO (Meng et al., 2024, https://arxiv.org/abs/2405.14734): reference-free, length-normalised.

``ℓ_i = −log σ(β·(π̄_w − π̄_l) − β·r)`` with π̄ the policy's mean log-prob over the response's
counted tokens and ``r = gamma_beta_ratio`` (the margin γ = β·r). α-DPO with α = 0 is this loss.
"""

from __future__ import annotations

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
from prefloss.losses.dpo import PairLosses
from prefloss.ops import check_number


def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    *,
    beta: float,
    gamma_beta_ratio: float,
    label_smoothing: float = 0.0,
) -> PairLosses:
    """Per-pair SimPO loss on length-normalised policy log-probs ``[B]``.

    Returns:
        `PairLosses`: ``losses [B]``; rewards ``β·π̄`` for chosen and rejected.
    """
    # β·(Δ − r), associated as the SimPO authors' code and α-DPO: α = 0 then gives bitwise SimPO
    losses = sigmoid_loss(beta * ((policy_chosen - policy_rejected) - gamma_beta_ratio), label_smoothing)
    return PairLosses(losses, (beta * policy_chosen).detach(), (beta * policy_rejected).detach())


class SimPOLoss(nn.Module):
    """SimPO from hidden states (no reference model).

    Args:
        beta: β > 0 (default 2.0, the SimPO config default).
        gamma_beta_ratio: r = γ/β (default 0.25).
        label_smoothing, chunk_size, backend: as in `prefloss.DPOLoss`.
    A pair whose chosen or rejected response has no counted token (all labels ``ignore_index``) is
    refused with a ``ValueError`` naming it (its log-prob would be 0, the best score there is).
    """

    def __init__(
        self,
        beta: float = 2.0,
        gamma_beta_ratio: float = 0.25,
        *,
        label_smoothing: float = 0.0,
        chunk_size=None,
        backend="auto",
    ):
        super().__init__()
        self.beta = check_beta(beta)
        self.gamma_beta_ratio = check_number("gamma_beta_ratio", gamma_beta_ratio, tensors=True)
        self.label_smoothing = check_label_smoothing(label_smoothing)
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
        """hidden ``[2B, T, H]``, weight ``[V, H]``, labels ``[2B, T]``; reference arguments are ignored."""
        seq = pair_sequences(
            "SimPOLoss",
            hidden,
            weight,
            labels,
            reference="none",
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
        ).mean()
        pc, pr = split_pairs(seq.policy)
        out = simpo_loss(
            pc,
            pr,
            beta=self.beta,
            gamma_beta_ratio=self.gamma_beta_ratio,
            label_smoothing=self.label_smoothing,
        )
        metrics = reward_metrics(out.chosen_rewards, out.rejected_rewards)
        metrics.update({"logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean()})
        return LossOutput(out.losses.mean(), metrics, out.chosen_rewards, out.rejected_rewards)
