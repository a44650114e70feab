"""prefloss: fused, memory-flat log-probabilities and preference losses (alpha-DPO, epsilon-DPO, DPO, SimPO).

The Triton kernels (`prefloss.kernels`) are imported lazily, on the first call with
``backend="triton"``, so that ``TRITON_INTERPRET`` can still be set after ``import prefloss``.
"""

from prefloss.fused.op import SequenceLogProbs, TokenLogProbs, fused_logprobs, sequence_logprobs
from prefloss.losses import (
    AlphaDPOLoss,
    DPOLoss,
    EpsilonDPOLoss,
    LossOutput,
    SimPOLoss,
    alpha_dpo_loss,
    dpo_loss,
    epsilon_dpo_loss,
    simpo_loss,
)

__version__ = "0.1.0"

__all__ = [
    "AlphaDPOLoss",
    "DPOLoss",
    "EpsilonDPOLoss",
    "LossOutput",
    "SequenceLogProbs",
    "SimPOLoss",
    "TokenLogProbs",
    "alpha_dpo_loss",
    "dpo_loss",
    "epsilon_dpo_loss",
    "fused_logprobs",
    "sequence_logprobs",
    "simpo_loss",
]
