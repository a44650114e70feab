"""Preference losses on fused sequence log-probs: functional forms and ``nn.Module`` wrappers.

`LOSSES` (name → class) is the one registry: the trainers, the CLIs, ``prefloss plan``, the bench and
the float64 oracle read the names, the hyperparameters and their defaults, and whether a loss needs
a reference from the classes' attributes (`PairLoss`).
"""

from prefloss.losses.alpha_dpo import AlphaDPOLoss, AlphaDPOLosses, alpha_dpo_loss
from prefloss.losses.base import PairLoss, PairValues
from prefloss.losses.common import LossOutput, PairLosses
from prefloss.losses.dpo import DPOLoss, dpo_loss
from prefloss.losses.epsilon_dpo import EpsilonDPOLoss, EpsilonDPOLosses, epsilon_dpo_loss, epsilon_steps
from prefloss.losses.simpo import SimPOLoss, simpo_loss

LOSSES: dict[str, type[PairLoss]] = {
    cls.name: cls for cls in (AlphaDPOLoss, EpsilonDPOLoss, DPOLoss, SimPOLoss)
}

__all__ = [
    "LOSSES",
    "AlphaDPOLoss",
    "AlphaDPOLosses",
    "DPOLoss",
    "EpsilonDPOLoss",
    "EpsilonDPOLosses",
    "LossOutput",
    "PairLoss",
    "PairLosses",
    "PairValues",
    "SimPOLoss",
    "alpha_dpo_loss",
    "dpo_loss",
    "epsilon_dpo_loss",
    "epsilon_steps",
    "simpo_loss",
]
