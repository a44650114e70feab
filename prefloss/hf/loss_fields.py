"""`LossFields`: the loss settings that `PreferenceConfig` and `prefloss.trl.DPOConfig` share."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LossFields", "loss_field"]


def loss_field(help: str) -> Any:
    """A loss setting: ``None`` by default, ``help`` shown by ``HfArgumentParser``."""
    return field(default=None, metadata={"help": help})


@dataclass
class LossFields:
    """Loss hyperparameters (``None``: the loss module's default) and the loss module's other keywords.

    A config lists it before its ``TrainingArguments`` base, so these fields replace the base's (TRL's
    ``beta``); it may declare a field again to give it its own help text, and calls
    `parse_loss_kwargs` in its ``__post_init__``.
    """

    beta: float | None = loss_field("β (all losses); None: the loss default.")
    gamma_beta_ratio: float | None = loss_field(
        "γ/β target margin (alpha_dpo, simpo); None: the loss default."
    )
    alpha: float | None = loss_field("α, weight of the adaptive margin (alpha_dpo); None: default.")
    epsilon: float | None = loss_field("ε, the KL-control step (epsilon_dpo); None: the loss default.")
    loss_kwargs: dict[str, Any] | str | None = loss_field(
        "Extra keyword arguments of the loss module (a dict or a JSON string)."
    )

    def parse_loss_kwargs(self) -> None:
        """Turn ``loss_kwargs`` given as a JSON string (e.g. on the command line) into its dict."""
        if isinstance(self.loss_kwargs, str):
            self.loss_kwargs = json.loads(self.loss_kwargs)
