"""DPO (Rafailov et al., 2023, https://arxiv.org/abs/2305.18290) on fused sequence log-probs.

``ℓ_i = −log σ(β·[(π_w − ρ_w) − (π_l − ρ_l)])`` with π, ρ the policy / reference sequence sums.
ε-DPO with ε = 0 is exactly this loss.
"""

from __future__ import annotations

import torch

from prefloss.losses.base import PairLoss, PairValues
from prefloss.losses.common import PairLosses, check_beta, sigmoid_loss


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


class DPOLoss(PairLoss):
    """DPO from hidden states: ``loss_fn(hidden, weight, labels, ref_hidden=..., ref_weight=...)``
    (`PairLoss.forward`), the reference also as precomputed sums ``ref_logps [2B]``.

    Args:
        beta: β > 0 (default 0.1, TRL's default).
        options: ``label_smoothing`` (see `dpo_loss`), ``chunk_size``, ``backend``, as `PairLoss`
            takes them.
    """

    name = "dpo"
    hyperparameters = ("beta",)

    def __init__(self, beta: float = 0.1, **options):
        super().__init__(**options)
        self.beta = check_beta(beta)

    def pair_losses(self, p: PairValues) -> tuple[PairLosses, dict[str, torch.Tensor]]:
        out = dpo_loss(
            p.policy_chosen,
            p.policy_rejected,
            p.ref_chosen,
            p.ref_rejected,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
        )
        return out, {}
