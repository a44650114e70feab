"""`LossFields`: the loss settings that `PreferenceConfig` and `prefloss.trl.DPOConfig` share, and
`loss_module_kwargs`, which turns their ``loss_kwargs`` into the loss module's keyword arguments.

Only its two configs' modules import it, and both import torch already (so does ``import prefloss``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["COMPARE_DTYPES", "LossFields", "config_field", "loss_field", "loss_module_kwargs"]

# ``loss_kwargs["compare_dtype"]`` as JSON writes it -> ε-DPO's ``compare_dtype``. "float32" and
# None (JSON null) are the exact comparison of the fp32 sums (`prefloss.EpsilonDPOLoss`).
COMPARE_DTYPES: dict[str | None, torch.dtype | None] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": None,
    None: None,
}


def config_field(default: Any, help: str) -> Any:
    """A config setting with an immutable ``default``, ``help`` shown by ``HfArgumentParser``."""
    return field(default=default, metadata={"help": help})


def loss_field(help: str) -> Any:
    """A loss setting: ``None`` by default, ``help`` shown by ``HfArgumentParser``."""
    return config_field(None, help)


def loss_module_kwargs(loss_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The loss module's keyword arguments from a config's ``loss_kwargs`` (already parsed from JSON).

    A copy, with ``compare_dtype`` given by name (``"bfloat16"``, ``"float16"``, ``"float32"`` or
    ``None``: `COMPARE_DTYPES`) turned into what `prefloss.EpsilonDPOLoss` takes; a ``torch.dtype``
    passes as it is. The config keeps the names (it stays JSON), the trainers build their loss from
    this.

    Raises:
        TypeError: ``loss_kwargs`` is not a mapping.
        ValueError: ``compare_dtype`` is another name.
    """
    if loss_kwargs is None:
        return {}
    if not isinstance(loss_kwargs, Mapping):
        raise TypeError(f"loss_kwargs must be a dict (or its JSON string), got {loss_kwargs!r}")
    kwargs = dict(loss_kwargs)
    value = kwargs.get("compare_dtype")
    if isinstance(value, torch.dtype):
        return kwargs
    if "compare_dtype" in kwargs:
        if not isinstance(value, str | None) or value not in COMPARE_DTYPES:
            raise ValueError(
                "loss_kwargs['compare_dtype'] must be 'bfloat16', 'float16', 'float32' or None, "
                f"got {value!r}"
            )
        kwargs["compare_dtype"] = COMPARE_DTYPES[value]
    return kwargs


@dataclass
class LossFields:
    """Loss hyperparameters (``None``: the loss module's default) and the loss module's other keywords.

    A config lists it before its ``TrainingArguments`` base, so these fields replace the base's (TRL's
    ``beta``); it may declare a field again to give it its own help text, and calls
    `parse_loss_kwargs` in its ``__post_init__``. The trainer builds its loss with
    ``loss_module_kwargs(args.loss_kwargs)``.
    """

    beta: float | None = loss_field("β (all losses); None: the loss default.")
    gamma_beta_ratio: float | None = loss_field(
        "γ/β target margin (alpha_dpo, simpo); None: the loss default."
    )
    alpha: float | None = loss_field("α, weight of the adaptive margin (alpha_dpo); None: default.")
    epsilon: float | None = loss_field("ε, the KL-control step (epsilon_dpo); None: the loss default.")
    loss_kwargs: dict[str, Any] | str | None = loss_field(
        "Extra keyword arguments of the loss module (a dict or a JSON string); ε-DPO's compare_dtype by "
        'name: "bfloat16", "float16", "float32" or null.'
    )

    def parse_loss_kwargs(self) -> None:
        """Turn ``loss_kwargs`` given as a JSON string (e.g. on the command line) into its dict, and
        check it now (`loss_module_kwargs`), before any model is loaded. It keeps names such as
        ``compare_dtype="bfloat16"``, so the config still serializes to JSON."""
        if isinstance(self.loss_kwargs, str):
            self.loss_kwargs = json.loads(self.loss_kwargs)
        loss_module_kwargs(self.loss_kwargs)
