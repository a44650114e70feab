"""`CPOTrainer`: TRL's CPOTrainer for SimPO, with the loss computed by prefloss's fused op.

TRL trains SimPO with ``trl.experimental.cpo.CPOTrainer(args=CPOConfig(loss_type="simpo",
cpo_alpha=0.0, beta=..., simpo_gamma=...))``; this subclass takes the same config and computes the
same loss with `prefloss.SimPOLoss` (``gamma_beta_ratio = simpo_gamma / beta``, ``label_smoothing``
as CPO's) on hidden states: no ``[2B, T, V]`` logits. CPO's tokenization, collator, PEFT wrapping and
logging are TRL's; `CPOTrainer.get_batch_loss_metrics` is the one method replaced.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from trl.experimental.cpo import CPOConfig
from trl.experimental.cpo import CPOTrainer as _TRLCPOTrainer

from prefloss.hf.core import LossOnlyPrediction, OutputHeadCheck, attach_loss, check_peft_policy
from prefloss.hf.step import preference_loss
from prefloss.losses import SimPOLoss
from prefloss.trl._common import refuse, reward_metrics, shift_labels

__all__ = ["CPOConfig", "CPOTrainer", "check_cpo_args"]


def check_cpo_args(args: Any) -> None:
    """Refuse every option of a ``CPOConfig`` that prefloss's CPO trainer does not implement.

    Raises:
        TypeError: ``args`` is not a ``CPOConfig``.
        ValueError: naming the option, its value, why, and what to do instead.
    """
    if not isinstance(args, CPOConfig):
        raise TypeError(f"args must be a trl.experimental.cpo.CPOConfig, got {type(args).__name__}")
    if args.loss_type != "simpo":
        refuse(
            "loss_type",
            args.loss_type,
            "prefloss's CPOTrainer computes SimPO only",
            "Set loss_type='simpo' (DPO, α-DPO, ε-DPO: prefloss.trl.DPOTrainer)",
        )
    if args.cpo_alpha != 0.0:
        refuse(
            "cpo_alpha",
            args.cpo_alpha,
            "CPO's behaviour-cloning NLL term is not computed (SimPO has none)",
            "Set cpo_alpha=0.0",
        )
    if args.alpha != 0.0:
        refuse("alpha", args.alpha, "AlphaPO's reward transform is not implemented", "Set alpha=0.0")
    if args.is_encoder_decoder:
        refuse("is_encoder_decoder", True, "prefloss trains decoder-only causal LMs", "Use a causal LM")


class CPOTrainer(LossOnlyPrediction, _TRLCPOTrainer):
    """``trl.experimental.cpo.CPOTrainer`` for SimPO through `prefloss.SimPOLoss` (same arguments).

    Logged metrics (CPO's names): ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
    ``rewards/margins`` (rewards ``β·`` mean log-prob), ``logps/chosen``, ``logps/rejected`` (per-token
    means), ``nll_loss`` (0: ``cpo_alpha=0``). Not logged: CPO's ``logits/chosen``, ``logits/rejected``
    (means over the full logits, which are never formed). ``compute_metrics`` is refused for the
    same reason.
    """

    def __init__(self, model: Any = None, args: CPOConfig | None = None, *pargs: Any, **kwargs: Any) -> None:
        check_cpo_args(args)
        if kwargs.get("compute_metrics") is not None:
            refuse(
                "compute_metrics",
                kwargs["compute_metrics"],
                "CPO passes it the means of the full logits, which prefloss never forms",
                "Read the logged rewards/* and logps/* metrics instead",
            )
        self.loss_fn = SimPOLoss(
            beta=args.beta,
            gamma_beta_ratio=args.simpo_gamma / args.beta,
            label_smoothing=args.label_smoothing,
        )
        self._output_head_check = OutputHeadCheck()
        super().__init__(model, args, *pargs, **kwargs)
        if self.is_encoder_decoder:
            refuse("model", type(self.model).__name__, "it is an encoder-decoder model", "Use a causal LM")
        if self.aux_loss_enabled and self.aux_loss_coef != 0.0:
            refuse(
                "router_aux_loss_coef",
                self.aux_loss_coef,
                "the model returns router logits (output_router_logits) and prefloss does not add the MoE "
                "load-balancing loss",
                "Set model.config.router_aux_loss_coef=0.0 or output_router_logits=False",
            )
        check_peft_policy(self.model)
        attach_loss(self)

    def get_batch_loss_metrics(
        self, model: nn.Module, batch: dict[str, Any], train_eval: str = "train"
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """SimPO loss and CPO's metrics of one batch, from hidden states (no full logits)."""
        cat = self.concatenated_inputs(
            batch, is_encoder_decoder=False, padding_value=self.pad_token_id, device=self.accelerator.device
        )
        ids, mask = cat["concatenated_input_ids"], cat["concatenated_attention_mask"]
        labels = shift_labels(cat["concatenated_labels"])  # CPO's labels are unshifted, -100 on the prompt
        # once: hidden states + head reproduce the model's logits
        self._output_head_check(ids, model, mixed_precision=bool(self.accelerator.native_amp))
        self.loss_fn.train(model.training)
        out = preference_loss(self.loss_fn, model, ids, mask, labels)
        gather = self.accelerator.gather_for_metrics
        chosen, rejected = gather(out.chosen_rewards.float()), gather(out.rejected_rewards.float())
        prefix = "eval_" if train_eval == "eval" else ""
        metrics = {prefix + name: value for name, value in reward_metrics(chosen, rejected).items()}
        metrics[f"{prefix}nll_loss"] = 0.0
        for name in ("logps/chosen", "logps/rejected"):
            metrics[prefix + name] = gather(out.metrics[name].float().reshape(1)).mean().item()
        return out.loss, metrics

    def _evaluation_loss(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        loss, metrics = self.get_batch_loss_metrics(model, inputs, train_eval="eval")
        self.store_metrics(metrics, train_eval="eval")
        return loss
