"""One micro-batch's preference loss from Hugging Face causal LMs, under any engine.

`preference_loss` is what `PreferenceTrainer` (and any custom loop) calls: the policy's and the
reference's last hidden states from their own (engine-wrapped) forwards, the output heads gathered by
`prefloss.hf.engines.gathered_heads` once for the fused forward and once for its backward, and the
prefloss loss module on top. Works unchanged under DDP, FSDP2 and DeepSpeed ZeRO-3.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from prefloss.hf.engines import gathered_heads
from prefloss.hf.heads import check_logit_transforms
from prefloss.hf.model import decoder_hidden_states, decoder_outputs
from prefloss.hf.moe import add_router_aux_loss, router_aux_loss, router_logits_kwargs
from prefloss.hf.packing import check_packing, pack_batch
from prefloss.losses.common import LossOutput

__all__ = ["preference_loss"]


def preference_loss(
    loss_fn: nn.Module,
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    ref_model: nn.Module | None = None,
    ref_logps: torch.Tensor | None = None,
    ignore_index: int = -100,
    model_inputs: Mapping[str, Any] | None = None,
    router_aux_loss_coef: float = 0.0,
    loss_weight: float = 1.0,
    padding_free: bool = False,
) -> LossOutput:
    """The loss of one micro-batch of ``B`` pairs (rows ``[0, B)`` chosen, ``[B, 2B)`` rejected).

    Equivalent to ``loss_fn(h, W, labels, ref_hidden=h_ref, ref_weight=W_ref, ...)`` with ``h`` the
    policy's ``[2B, T, H]`` last hidden states and ``W`` its ``[V, H]`` output head (likewise for
    the reference), where each head is the engine's whole parameter while the fused op uses it.

    Args:
        loss_fn: a prefloss loss module (`prefloss.AlphaDPOLoss`, ...).
        model: the policy (plain, DDP-wrapped, a DeepSpeed engine, or ``fully_shard``-ed).
        input_ids, attention_mask: ``[2B, T]``.
        labels: ``[2B, T]``; ``labels[:, t]`` is predicted from position ``t`` (already shifted),
            ``ignore_index`` for prompt and padding.
        ref_model: the reference model (prepared by the same engine: `prefloss.hf.prepare_reference`),
            run under ``no_grad``; ``None`` with ``ref_logps`` or for SimPO.
        ref_logps: ``[2B]`` precomputed reference log-prob sums (replaces ``ref_model``).
        ignore_index: label of tokens that do not count.
        model_inputs: further keyword inputs of both models' forwards (a vision-language model's
            ``pixel_values``, ...), passed unchanged to the policy's and the reference's.
        router_aux_loss_coef: a mixture-of-experts policy's load-balancing coefficient: when not 0, the
            policy's forward returns its routers' ``aux_loss`` and the loss becomes
            ``loss + router_aux_loss_coef · aux_loss``, ``aux_loss`` in the metrics (`prefloss.hf.moe`).
            A MoE reference (and a MoE policy at 0) is told not to form router logits.
        loss_weight: weight of the preference loss alone (TRL's ``loss_weights``): the loss is
            ``loss_weight · loss + router_aux_loss_coef · aux_loss``.
        padding_free: pack the micro-batch (`prefloss.hf.packing.pack_batch`): both forwards run on
            one ``[1, L]`` row of the ``L`` real tokens, ``position_ids`` restarting at each sequence,
            ``attention_mask=None``, and the loss takes ``cu_seqlens``: the loss, gradients and loss
            state of the padded batch. Models that cannot keep packed sequences apart are refused
            (`prefloss.hf.packing.check_packing_support`), and each model's packed forward is compared
            with separate ones on its first batch (`prefloss.hf.packing.check_packed_forward`).

    Returns:
        The loss module's `LossOutput`; ``loss`` back-propagates through the gathered heads (and, for
        the auxiliary loss, through the routers).
    """
    extra = dict(model_inputs or {})
    loss_kwargs: dict[str, Any] = {}
    if padding_free:
        check_packing(
            input_ids, attention_mask, model, ref_model if ref_logps is None else None, model_inputs=extra
        )
        packed = pack_batch(input_ids, attention_mask, labels, ignore_index)
        input_ids, attention_mask, labels = packed.input_ids, None, packed.labels
        extra["position_ids"] = packed.position_ids
        loss_kwargs["cu_seqlens"] = packed.cu_seqlens
    aux_wanted = bool(router_aux_loss_coef)
    policy = decoder_outputs(
        model, input_ids, attention_mask, **extra, **router_logits_kwargs(model, aux_wanted)
    )
    hidden = policy.hidden_states
    aux_loss = router_aux_loss(policy.aux_loss, model) if aux_wanted else None
    ref_hidden = None
    if ref_logps is None and ref_model is not None:
        with torch.no_grad():
            ref_hidden = decoder_hidden_states(
                ref_model, input_ids, attention_mask, **extra, **router_logits_kwargs(ref_model, False)
            )
    with gathered_heads(model, ref_model if ref_hidden is not None else None) as heads:
        kwargs = {**loss_kwargs, **heads.policy.fused_kwargs()}
        if ref_logps is not None:
            kwargs["ref_logps"] = ref_logps
        elif ref_hidden is not None:
            check_logit_transforms(heads.policy, heads.ref)
            kwargs.update(ref_hidden=ref_hidden, ref_weight=heads.ref.weight, ref_bias=heads.ref.bias)
        out = loss_fn(
            heads.release_after_backward(hidden),
            heads.policy.weight,
            labels,
            ignore_index=ignore_index,
            **kwargs,
        )
        out.loss = heads.gather_before_backward(out.loss)
    if loss_weight != 1.0:
        out.loss = out.loss * loss_weight
    if aux_loss is not None:
        add_router_aux_loss(out, aux_loss, router_aux_loss_coef)
    return out
