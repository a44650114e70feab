"""Mixture-of-experts models: the routers' load-balancing (auxiliary) loss, added as transformers and
TRL add it.

A transformers MoE causal LM (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ...) declares
``output_router_logits`` and ``router_aux_loss_coef`` in its (text) config. Called with
``output_router_logits=True``, its forward records every MoE layer's router logits and returns their
load-balancing loss as ``output.aux_loss`` (Switch Transformer, eqs. 4-6; ``load_balancing_loss_func``
in e.g. ``transformers/models/mixtral/modeling_mixtral.py``). Over the ``L`` MoE layers and the
``N`` tokens of the batch whose ``attention_mask`` is 1 (all ``N = 2B·T`` tokens without a mask),
with ``E`` experts, ``k`` of them per token and ``p_{l,n} = softmax(router_logits_{l,n})``:

    f_e = Σ_{l,n} [e ∈ top_k(p_{l,n})] / (L·N)     (share of token-expert assignments, Σ_e f_e = k)
    P_e = Σ_{l,n} p_{l,n,e} / (L·N)                (mean router probability)
    aux_loss = E · Σ_e f_e · P_e

prefloss reads ``aux_loss`` from the policy's own forward (the same one that gives the hidden states,
`prefloss.hf.model.decoder_outputs`), so it is the model's number, whatever its family computes, and
its gradient reaches the routers through the engine's own hooks (DDP, FSDP2, DeepSpeed ZeRO-3). The
step's loss is ``preference_loss + router_aux_loss_coef · aux_loss`` (TRL's ``DPOTrainer``; a
transformers model's own ``loss`` with ``labels`` adds it likewise) and ``aux_loss`` is logged under
that name. The reference never computes router logits (its forward is called with
``output_router_logits=False``): its log-probs do not depend on them.

Where the coefficient comes from:

* ``prefloss.trl.DPOTrainer``: TRL's rule (``trl.DPOTrainer.__init__``): ``router_aux_loss_coef`` of
  the ``DPOConfig``, or when it is ``None`` the model config's (0.0 if it declares none); the loss is
  added when the model is a MoE (its config declares ``output_router_logits``, whatever its value) and
  the coefficient is not 0.
* `prefloss.hf.PreferenceTrainer`: `trainer_aux_loss_coef`, transformers' rule by default -- the
  config's ``router_aux_loss_coef`` when the config sets ``output_router_logits=True`` (what the model's
  own training loss would add), else none -- or the ``PreferenceConfig``'s ``router_aux_loss_coef``
  when it is set (then, as TRL, added whenever it is not 0).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prefloss.hf.heads import unwrap_model

__all__ = [
    "AUX_LOSS_METRIC",
    "add_router_aux_loss",
    "check_router_aux_loss_coef",
    "is_moe",
    "router_aux_loss",
    "router_logits_kwargs",
    "trainer_aux_loss_coef",
]

AUX_LOSS_METRIC = "aux_loss"  # TRL's metric name


def _text_config(model: nn.Module) -> Any:
    inner = unwrap_model(model)
    base = inner.get_base_model() if callable(getattr(inner, "get_base_model", None)) else inner  # PEFT
    config = getattr(base, "config", None)
    if config is None:
        return None
    return config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config


def is_moe(model: nn.Module) -> bool:
    """Whether ``model`` (possibly wrapped: DDP, DeepSpeed, PEFT, an `prefloss.hf.AdaptersDisabled`
    view) is a transformers mixture-of-experts model: its (text) config declares
    ``output_router_logits`` (TRL's test)."""
    config = _text_config(model)
    return config is not None and hasattr(config, "output_router_logits")


def router_logits_kwargs(model: nn.Module, wanted: bool) -> dict[str, bool]:
    """The forward keyword that asks a MoE ``model`` for its router logits (``wanted=True``: it then
    returns ``aux_loss``) or tells it not to form them (``False``, whatever its config says);
    ``{}`` for a model that is not a MoE (its forward may not take the keyword)."""
    return {"output_router_logits": wanted} if is_moe(model) else {}


def check_router_aux_loss_coef(coef: Any) -> None:
    """Raise ``ValueError`` unless ``coef`` is ``None`` or a finite number ≥ 0 (a config's
    ``router_aux_loss_coef``, checked before any model is loaded)."""
    if coef is None:
        return
    if isinstance(coef, bool) or not isinstance(coef, int | float) or not 0.0 <= coef < float("inf"):
        raise ValueError(f"router_aux_loss_coef must be a finite number >= 0 or None, got {coef!r}")


def trainer_aux_loss_coef(model: nn.Module, coef: float | None = None) -> float:
    """`PreferenceTrainer`'s coefficient of the load-balancing loss (0.0: not added).

    Args:
        model: the policy (possibly wrapped).
        coef: ``PreferenceConfig.router_aux_loss_coef``. ``None``: transformers' rule, the config's
            ``router_aux_loss_coef`` when the config sets ``output_router_logits=True``, else 0.0. A
            number: that coefficient for a MoE model (0.0 turns the loss off).

    Raises:
        ValueError: ``coef`` is not a finite number ≥ 0, or not 0 for a model that is not a MoE.
    """
    if coef is None:
        config = _text_config(model)
        if not is_moe(model) or not getattr(config, "output_router_logits", False):
            return 0.0
        return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    check_router_aux_loss_coef(coef)
    if coef and not is_moe(model):
        raise ValueError(
            f"router_aux_loss_coef={coef} but {type(unwrap_model(model)).__name__} is not a "
            "mixture-of-experts model (its config declares no output_router_logits), so it has no "
            "load-balancing loss; expected router_aux_loss_coef=None or 0.0"
        )
    return float(coef)


def router_aux_loss(aux_loss: Any, model: nn.Module) -> torch.Tensor:
    """The 0-dim ``aux_loss`` a MoE forward asked for router logits returned, checked.

    Raises:
        RuntimeError: the forward returned none (a model that ignores ``output_router_logits``).
    """
    if not isinstance(aux_loss, torch.Tensor):
        raise RuntimeError(
            f"model {type(unwrap_model(model)).__name__}: its forward was called with "
            f"output_router_logits=True but returned aux_loss={aux_loss!r}; expected the routers' "
            "load-balancing loss (a tensor). Set router_aux_loss_coef=0.0 to train this model without it"
        )
    return aux_loss.reshape(())


def add_router_aux_loss(out: Any, aux_loss: torch.Tensor, coef: float) -> Any:
    """``out.loss ← out.loss + coef · aux_loss`` and ``out.metrics["aux_loss"] = aux_loss`` (detached).

    Args:
        out: a `prefloss.losses.common.LossOutput` (changed in place and returned).
        aux_loss: 0-dim, from the policy's forward (`router_aux_loss`), differentiable.
        coef: the coefficient (TRL's ``router_aux_loss_coef``).
    """
    out.loss = out.loss + coef * aux_loss.to(out.loss.device)
    out.metrics[AUX_LOSS_METRIC] = aux_loss.detach().float()
    return out
