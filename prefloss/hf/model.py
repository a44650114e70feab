"""What the fused op needs from a Hugging Face causal LM: the last hidden states and the output head.

For any ``AutoModelForCausalLM``, ``model(...).logits`` is (up to dtype)

    logits = transform(hidden @ W.T + b)

where ``hidden`` is the decoder's ``last_hidden_state`` (after the model's final norm), ``W``/``b``
are ``model.get_output_embeddings()`` (tied or not) and ``transform`` is a family-specific scalar
map: Gemma-2/3 soft-cap ``c·tanh(z/c)``, Cohere ``z · logit_scale``, Granite ``z / logits_scaling``.
`output_head` reads ``W``, ``b`` and the transform; `decoder_hidden_states` runs the model and returns
``hidden`` without ever forming the ``[tokens, vocab]`` logits. Nothing is monkey-patched: the hidden
states are captured by a forward hook on ``model.get_decoder()`` while the model's own ``forward`` runs
(through any DDP/accelerate wrapper, so gradient synchronisation still happens) with
``logits_to_keep=1``, i.e. one logit row per sequence instead of ``T``.

Families whose logit transform is not in `LOGIT_TRANSFORMS` are caught by `check_output_head`, which
compares the fused log-probabilities with ``log_softmax(model(...).logits)`` on a few tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "LOGIT_TRANSFORMS",
    "OutputHead",
    "check_output_head",
    "decoder_hidden_states",
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


def _logits_to_keep_kwarg(model: nn.Module) -> dict[str, int]:
    """``{"logits_to_keep": 1}`` (or the pre-4.50 name) when the model's forward names it, else ``{}``."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model  # PEFT
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return {}
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}  # full logits are formed (and discarded): correct, only not memory-flat


def decoder_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, T, H]`` last hidden states of a causal LM (post final norm), without full logits.

    Runs ``model(input_ids, attention_mask, logits_to_keep=1)`` through ``model`` itself, so that a
    DDP wrapper synchronises gradients and FSDP2 / DeepSpeed run their hooks.
    ``logits = transform(hidden @ W.T + b)`` with `output_head`'s values.

    With gradients enabled the hidden states are taken from the model's *output*
    (``output_hidden_states=True``, the last entry): an engine registers its pre-backward hooks on
    the outputs of the wrapped forward, so FSDP2 gathers the final norm again before its backward
    (a tensor caught inside the forward would reach a norm whose unsharded weight FSDP already
    freed). The other entries are the layers' inputs, which autograd keeps for the backward anyway.
    Without gradients (reference model, scoring) a forward hook on ``get_decoder()`` catches the
    decoder's output instead, so the per-layer states are never held at once.

    Args:
        model: causal LM, possibly wrapped (DDP, accelerate).
        input_ids: ``[B, T]`` int64.
        attention_mask: ``[B, T]`` or ``None``.
    """
    inner = unwrap_model(model)
    get_decoder = getattr(inner, "get_decoder", None)
    if not callable(get_decoder):
        raise TypeError(
            f"expected a Hugging Face PreTrainedModel with get_decoder(), got {type(inner).__name__}"
        )
    decoder = get_decoder()
    if decoder is inner:
        raise ValueError(
            f"model {type(inner).__name__}: get_decoder() returned the model itself; expected a causal LM "
            "whose decoder is a sub-module (AutoModelForCausalLM)"
        )
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        captured.append(hidden if hidden is not None else output[0])

    kwargs: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": False}
    kwargs.update(_logits_to_keep_kwarg(inner))
    if torch.is_grad_enabled():
        out = model(input_ids=input_ids, output_hidden_states=True, **kwargs)
        states = getattr(out, "hidden_states", None)
        if not states:
            raise RuntimeError(
                f"model {type(inner).__name__}: output_hidden_states=True returned no hidden states; "
                "expected a Hugging Face causal LM"
            )
        return states[-1]
    handle = decoder.register_forward_hook(hook)
    try:
        model(input_ids=input_ids, **kwargs)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(
            f"model {type(inner).__name__}: expected its decoder {type(decoder).__name__} to run once per "
            f"forward, it ran {len(captured)} times"
        )
    return captured[0]


@torch.no_grad()
def check_output_head(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    atol: float | None = None,
    mixed_precision: bool = False,
) -> float:
    """Check that `decoder_hidden_states` + `output_head` reproduce ``model(...).logits``.

    Compares ``log_softmax`` of the model's own logits with `prefloss.fused_logprobs` at the next
    tokens of ``input_ids`` (keep it short: this forms full logits). Catches model families whose
    logit transform prefloss does not know (see `LOGIT_TRANSFORMS`).

    Args:
        model: causal LM (possibly wrapped).
        input_ids: ``[B, T]`` with ``T >= 2``.
        attention_mask: ``[B, T]`` or ``None``.
        atol: allowed max abs difference of log-probs; default 1e-3 for fp32/fp64 weights,
            0.15 for 16-bit ones or under ``mixed_precision``.
        mixed_precision: the model's forward runs under 16-bit autocast (accelerate's
            ``native_amp``: a Trainer's ``bf16=True`` or ``fp16=True`` on fp32 weights), so its output
            head rounds the logits to 16 bits while the fused op computes them in the weight's fp32:
            judge them as for 16-bit weights.

    Returns:
        The max abs difference.

    Raises:
        ValueError: the difference exceeds ``atol``.
    """
    from prefloss.hf.engines import gathered_heads
    from prefloss.ops import fused_logprobs

    inner = unwrap_model(model)
    was_training = inner.training
    inner.eval()
    try:
        logits = inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        hidden = decoder_hidden_states(inner, input_ids, attention_mask)
        with torch.enable_grad():  # the training path reads the hidden states off the output
            from_output = decoder_hidden_states(inner, input_ids, attention_mask).detach()
    finally:
        inner.train(was_training)
    same = 1e-5 if hidden.dtype in (torch.float32, torch.float64) else 1e-2  # two runs of one forward
    if not torch.allclose(from_output, hidden, rtol=same, atol=same):
        raise ValueError(
            f"model {type(inner).__name__}: the last entry of output_hidden_states differs from its "
            f"decoder's output (max abs {float((from_output - hidden).abs().max()):.3g}); prefloss reads "
            "the training hidden states from output_hidden_states, so it cannot train this model family"
        )
    labels = input_ids[:, 1:]
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask[:, 1:] == 0, -100)
    with gathered_heads(inner) as heads:
        head = heads.policy
        got = fused_logprobs(hidden[:, :-1], head.weight, labels, **head.fused_kwargs()).policy
        weight_dtype = head.weight.dtype
    if atol is None:
        full = weight_dtype in (torch.float32, torch.float64) and not mixed_precision
        atol = 1e-3 if full else 0.15
    precision = torch.promote_types(logits.dtype, torch.float32)
    expected = torch.log_softmax(logits[:, :-1].to(precision), dim=-1).gather(
        -1, labels.clamp(min=0)[..., None]
    )
    expected = expected.squeeze(-1).masked_fill(labels == -100, 0.0)
    err = float((got.to(precision) - expected).abs().max()) if labels.numel() else 0.0
    if not err <= atol:
        raise ValueError(
            f"model {type(inner).__name__} (model_type {getattr(inner.config, 'model_type', '?')!r}): "
            f"log-probs from its hidden states and output head differ from log_softmax(model(...).logits) "
            f"by {err:.3g} (allowed {atol:g}); its logit transform is probably not known to prefloss "
            f"(found logit_scale={head.logit_scale}, softcap={head.softcap}). Register it in "
            "prefloss.hf.model.LOGIT_TRANSFORMS."
        )
    return err
