"""Preference losses on fused sequence log-probs: functional forms and ``nn.Module`` wrappers."""

from prefloss.losses.alpha_dpo import AlphaDPOLoss, AlphaDPOLosses, alpha_dpo_loss
from prefloss.losses.common import LossOutput
from prefloss.losses.dpo import DPOLoss, PairLosses, dpo_loss
from prefloss.losses.epsilon_dpo import EpsilonDPOLoss, EpsilonDPOLosses, epsilon_dpo_loss, epsilon_steps
from prefloss.losses.simpo import SimPOLoss, simpo_loss

LOSSES = {"alpha_dpo": AlphaDPOLoss, "epsilon_dpo": EpsilonDPOLoss, "dpo": DPOLoss, "simpo": SimPOLoss}

__all__ = [
    "LOSSES",
    "AlphaDPOLoss",
    "AlphaDPOLosses",
    "DPOLoss",
    "EpsilonDPOLoss",
    "EpsilonDPOLosses",
    "LossOutput",
    "PairLosses",
    "SimPOLoss",
    "alpha_dpo_loss",
    "dpo_loss",
    "epsilon_dpo_loss",
    "epsilon_steps",
    "simpo_loss",
]
