"""The output head of a Hugging Face causal LM, as the fused op reads it.

For any ``AutoModelForCausalLM``, ``model(...).logits`` is (up to dtype)

    logits = transform(hidden @ W.T + b)

where ``W``/``b`` are ``model.get_output_embeddings()`` (tied or not) and ``transform`` is a
family-specific scalar map: Gemma-2/3 soft-cap ``c·tanh(z/c)``, Cohere ``z · logit_scale``, Granite
``z / logits_scaling``. `output_head` reads ``W``, ``b`` and the transform (`LOGIT_TRANSFORMS`);
`check_logit_transforms` refuses a policy and a reference whose transforms differ (the fused op
applies one to both). The hidden states and the check against the model's own logits are
`prefloss.hf.model`'s; the engines (`prefloss.hf.engines`) gather ``W`` where it is sharded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "LOGIT_TRANSFORMS",
    "OutputHead",
    "check_logit_transforms",
    "output_head",
    "unwrap_model",
]


@dataclass(frozen=True)
class OutputHead:
    """The output embedding of a causal LM and the logit transform applied after it.

    Attributes:
        weight: ``[V, H]`` output embedding (the input embedding when tied); a live parameter.
        bias: ``[V]`` or ``None``.
        logit_scale: multiplies the logits (Cohere ``logit_scale``, Granite ``1/logits_scaling``).
        softcap: ``c`` in ``c·tanh(z/c)`` (Gemma-2/3 ``final_logit_softcapping``).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float | None
    softcap: float | None

    def fused_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `prefloss.fused_logprobs` / the loss modules (policy side)."""
        return {"bias": self.bias, "logit_scale": self.logit_scale, "softcap": self.softcap}


def _attr(config: Any, name: str) -> float | None:
    value = getattr(config, name, None)
    return None if value is None else float(value)


def _inverse(value: float | None) -> float | None:
    return None if value is None else 1.0 / value


# config.model_type -> (text config -> (logit_scale, softcap)). Families not listed here get the
# generic rule: soft-cap from `final_logit_softcapping` when the config has it, no scale.
LOGIT_TRANSFORMS: dict[str, Callable[[Any], tuple[float | None, float | None]]] = {
    "cohere": lambda c: (_attr(c, "logit_scale"), None),
    "cohere2": lambda c: (_attr(c, "logit_scale"), None),
    "cohere2_moe": lambda c: (_attr(c, "logit_scale"), None),
    "granite": lambda c: (_inverse(_attr(c, "logits_scaling")), None),
    "granitemoe": lambda c: (_inverse(_attr(c, "logits_scaling")), None),
    "granitemoeshared": lambda c: (_inverse(_attr(c, "logits_scaling")), None),
    "granitemoehybrid": lambda c: (_inverse(_attr(c, "logits_scaling")), None),
    "falcon_h1": lambda c: (_attr(c, "lm_head_multiplier"), None),
}


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / ``torch.compile`` / accelerate wrappers (``.module``, ``._orig_mod``)."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def output_head(model: nn.Module) -> OutputHead:
    """The output embedding and logit transform of a causal LM.

    Args:
        model: a ``PreTrainedModel`` with an LM head (``AutoModelForCausalLM``), possibly wrapped.

    Raises:
        ValueError: the model has no output embedding (e.g. ``AutoModel`` without LM head) or its
            output embedding is not a linear map with a ``[V, H]`` weight.
    """
    model = unwrap_model(model)
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    name = type(model).__name__
    if head is None:
        raise ValueError(
            f"model {name} has no output embedding (`get_output_embeddings()` returned None): "
            "expected a causal LM with an LM head, e.g. one loaded with AutoModelForCausalLM, "
            "not a bare AutoModel"
        )
    weight = getattr(head, "weight", None)
    # A ZeRO-3 parameter outside a gather is a [0] placeholder: judge its full shape (`ds_shape`).
    # An FSDP2 shard is a DTensor, whose shape is already the full one.
    shape = tuple(getattr(weight, "ds_shape", getattr(weight, "shape", ())))
    if not isinstance(weight, torch.Tensor) or len(shape) != 2:
        got = "no weight" if weight is None else f"weight of shape {shape}"
        raise ValueError(
            f"model {name}: the output embedding {type(head).__name__} must be a linear map with a "
            f"[vocab, hidden] weight, got {got}"
        )
    bias = getattr(head, "bias", None)
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text_config, "model_type", None) or getattr(config, "model_type", "")
    rule = LOGIT_TRANSFORMS.get(model_type)
    if rule is not None:
        logit_scale, softcap = rule(text_config)
    else:
        logit_scale, softcap = None, _attr(text_config, "final_logit_softcapping")
    return OutputHead(weight=weight, bias=bias, logit_scale=logit_scale, softcap=softcap)


def check_logit_transforms(policy: OutputHead, ref: OutputHead) -> None:
    """Refuse a policy and a reference whose logit transforms differ (the fused op applies the
    policy's to both).

    Raises:
        ValueError: ``logit_scale`` or ``softcap`` differ.
    """
    if (policy.logit_scale, policy.softcap) != (ref.logit_scale, ref.softcap):
        raise ValueError(
            "policy and reference must share the logit transform, got logit_scale/softcap "
            f"{policy.logit_scale}/{policy.softcap} vs {ref.logit_scale}/{ref.softcap}"
        )
