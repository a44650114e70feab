"""What the fused op needs from a Hugging Face causal LM: the last hidden states, and the check that
they and the output head reproduce the model's logits.

For any ``AutoModelForCausalLM``, ``model(...).logits`` is (up to dtype)

    logits = transform(hidden @ W.T + b)

where ``hidden`` is the decoder's ``last_hidden_state`` (after the model's final norm) and ``W``,
``b`` and ``transform`` are the output head's (`prefloss.hf.heads.output_head`, re-exported here with
`OutputHead`, `LOGIT_TRANSFORMS` and `unwrap_model`). `decoder_hidden_states` runs the model and returns
``hidden`` without ever forming the ``[tokens, vocab]`` logits. Nothing is monkey-patched: the hidden
states are captured by a forward hook on ``model.get_decoder()`` while the model's own ``forward`` runs
(through any DDP/accelerate wrapper, so gradient synchronisation still happens) with
``logits_to_keep=1``, i.e. one logit row per sequence instead of ``T``.

Families whose logit transform is not in `LOGIT_TRANSFORMS` are caught by `check_output_head`, which
compares the fused log-probabilities with ``log_softmax(model(...).logits)`` on a few tokens.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch
from torch import nn

from prefloss.hf.engines import gathered_heads
from prefloss.hf.heads import LOGIT_TRANSFORMS, OutputHead, output_head, unwrap_model
from prefloss.hf.moe import router_logits_kwargs

__all__ = [
    "LOGIT_TRANSFORMS",
    "DecoderOutput",
    "OutputHead",
    "check_output_head",
    "decoder_hidden_states",
    "decoder_outputs",
    "output_head",
    "unwrap_model",
]


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


class DecoderOutput(NamedTuple):
    """What `decoder_outputs` reads off one forward of a causal LM."""

    hidden_states: torch.Tensor  # [B, T, H] last hidden states (post final norm)
    aux_loss: torch.Tensor | None  # a MoE's load-balancing loss when asked for (output_router_logits)


def decoder_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **model_inputs: Any,
) -> torch.Tensor:
    """``[B, T, H]`` last hidden states of a causal LM: ``decoder_outputs(...).hidden_states``."""
    return decoder_outputs(model, input_ids, attention_mask, **model_inputs).hidden_states


def decoder_outputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **model_inputs: Any,
) -> DecoderOutput:
    """``[B, T, H]`` last hidden states of a causal LM (post final norm), without full logits, and the
    ``aux_loss`` of the same forward (``None`` unless a mixture-of-experts model is asked for it with
    ``output_router_logits=True`` in ``model_inputs``: `prefloss.hf.moe`).

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
        **model_inputs: further keyword inputs of the model's forward (a vision-language model's
            ``pixel_values``, ``image_grid_thw``, ...; ``position_ids``; a MoE's
            ``output_router_logits``), passed through unchanged.
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

    kwargs: dict[str, Any] = {**model_inputs, "attention_mask": attention_mask, "use_cache": False}
    kwargs.update(_logits_to_keep_kwarg(inner))
    if torch.is_grad_enabled():
        out = model(input_ids=input_ids, output_hidden_states=True, **kwargs)
        states = getattr(out, "hidden_states", None)
        if not states:
            raise RuntimeError(
                f"model {type(inner).__name__}: output_hidden_states=True returned no hidden states; "
                "expected a Hugging Face causal LM"
            )
        return DecoderOutput(states[-1], getattr(out, "aux_loss", None))
    handle = decoder.register_forward_hook(hook)
    try:
        out = model(input_ids=input_ids, **kwargs)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(
            f"model {type(inner).__name__}: expected its decoder {type(decoder).__name__} to run once per "
            f"forward, it ran {len(captured)} times"
        )
    return DecoderOutput(captured[0], getattr(out, "aux_loss", None))


CHECK_POSITIONS = 32  # next-token predictions per row `check_output_head` compares on a whole batch


@torch.no_grad()
def check_output_head(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    atol: float | None = None,
    mixed_precision: bool = False,
    model_inputs: dict[str, Any] | None = None,
) -> float:
    """Check that `decoder_hidden_states` + `output_head` reproduce ``model(...).logits``.

    Compares ``log_softmax`` of the model's own logits with `prefloss.fused_logprobs` at the next
    tokens of ``input_ids`` (keep it short: this forms full logits). Catches model families whose
    logit transform prefloss does not know (see `LOGIT_TRANSFORMS`).

    With ``model_inputs`` (a vision-language batch: its images belong to its rows, so it runs whole)
    only the last `CHECK_POSITIONS` next-token predictions of every row are compared, and the model
    forms only their logits (``logits_to_keep`` as a tensor of positions, when its forward takes it).

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
        model_inputs: further keyword inputs of the model's forward (``pixel_values``, ...), passed to
            every forward of the check.

    Returns:
        The max abs difference.

    Raises:
        ValueError: the difference exceeds ``atol``.
    """
    from prefloss.fused.op import fused_logprobs

    inner = unwrap_model(model)
    was_training = inner.training
    inner.eval()
    try:
        no_router = router_logits_kwargs(inner, False)  # a MoE's router logits play no part here
        extra = {**dict(model_inputs or {}), **no_router}
        length = input_ids.shape[1]
        start = max(0, length - 1 - CHECK_POSITIONS) if model_inputs else 0
        positions = torch.arange(start, length - 1, device=input_ids.device)  # predicting positions + 1
        keep = _logits_to_keep_kwarg(inner) if model_inputs else {}
        keep = {name: positions for name in keep}
        out = inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra, **keep)
        logits = out.logits if keep else out.logits[:, positions]
        hidden = decoder_hidden_states(inner, input_ids, attention_mask, **extra)
        with torch.enable_grad():  # the training path reads the hidden states off the output
            from_output = decoder_hidden_states(inner, input_ids, attention_mask, **extra).detach()
    finally:
        inner.train(was_training)
    same = 1e-5 if hidden.dtype in (torch.float32, torch.float64) else 1e-2  # two runs of one forward
    if not torch.allclose(from_output, hidden, rtol=same, atol=same):
        raise ValueError(
            f"model {type(inner).__name__}: the last entry of output_hidden_states differs from its "
            f"decoder's output (max abs {float((from_output - hidden).abs().max()):.3g}); prefloss reads "
            "the training hidden states from output_hidden_states, so it cannot train this model family"
        )
    labels = input_ids[:, positions + 1]
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask[:, positions + 1] == 0, -100)
    with gathered_heads(inner) as heads:
        head = heads.policy
        got = fused_logprobs(hidden[:, positions], head.weight, labels, **head.fused_kwargs()).policy
        weight_dtype = head.weight.dtype
    if atol is None:
        full = weight_dtype in (torch.float32, torch.float64) and not mixed_precision
        atol = 1e-3 if full else 0.15
    precision = torch.promote_types(logits.dtype, torch.float32)
    expected = torch.log_softmax(logits.to(precision), dim=-1).gather(-1, labels.clamp(min=0)[..., None])
    expected = expected.squeeze(-1).masked_fill(labels == -100, 0.0)
    err = float((got.to(precision) - expected).abs().max()) if labels.numel() else 0.0
    if not err <= atol:
        raise ValueError(
            f"model {type(inner).__name__} (model_type {getattr(inner.config, 'model_type', '?')!r}): "
            f"log-probs from its hidden states and output head differ from log_softmax(model(...).logits) "
            f"by {err:.3g} (allowed {atol:g}); its logit transform is probably not known to prefloss "
            f"(found logit_scale={head.logit_scale}, softcap={head.softcap}). Register it in "
            "prefloss.hf.heads.LOGIT_TRANSFORMS."
        )
    return err
