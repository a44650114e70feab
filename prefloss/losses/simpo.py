"""SimPO (Meng et al., 2024, https://arxiv.org/abs/2405.14734): reference-free, length-normalised.

``ℓ_i = −log σ(β·(π̄_w − π̄_l) − β·r)`` with π̄ the policy's mean log-prob over the response's
counted tokens and ``r = gamma_beta_ratio`` (the margin γ = β·r). α-DPO with α = 0 is this loss.
"""

from __future__ import annotations

import torch

from prefloss.losses.base import PairLoss, PairValues
from prefloss.losses.common import PairLosses, check_beta, check_gamma_beta_ratio, sigmoid_loss


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


class SimPOLoss(PairLoss):
    """SimPO from hidden states: ``loss_fn(hidden, weight, labels)`` (`PairLoss.forward`); no
    reference model, so every reference argument (``ref_hidden``, ``ref_weight``, ``ref_bias``,
    ``ref_logps``) is refused with a ``ValueError``.

    Args:
        beta: β > 0 (default 2.0, the SimPO config default).
        gamma_beta_ratio: r = γ/β (default 0.25).
        options: ``label_smoothing``, ``chunk_size``, ``backend``, as `PairLoss` takes them.
    """

    name = "simpo"
    hyperparameters = ("beta", "gamma_beta_ratio")
    needs_reference = False
    takes_ref_logps = False
    length_normalised = True

    def __init__(self, beta: float = 2.0, gamma_beta_ratio: float = 0.25, **options):
        super().__init__(**options)
        self.beta = check_beta(beta)
        self.gamma_beta_ratio = check_gamma_beta_ratio(gamma_beta_ratio)

    def pair_losses(self, p: PairValues) -> tuple[PairLosses, dict[str, torch.Tensor]]:
        out = simpo_loss(
            p.policy_chosen,
            p.policy_rejected,
            beta=self.beta,
            gamma_beta_ratio=self.gamma_beta_ratio,
            label_smoothing=self.label_smoothing,
        )
        return out, {}
