"""`DPOTrainer` / `DPOConfig`: TRL's DPOTrainer with the loss computed by prefloss's fused op.

Only the loss step changes (`DPOTrainer._compute_loss`, and `compute_ref_log_probs` for precomputed
reference log-probs): the policy's and the reference's last hidden states and output heads go to a
prefloss loss module (`prefloss.hf.preference_loss`), so no ``[2B, T, V]`` logits -- nor TRL's own
chunked LM head -- run in training. Tokenization, collation, PEFT wrapping, reference preparation,
``sync_ref_model``, evaluation and logging are TRL's.

``loss_type`` (one value) picks the loss:

================  ==========================================  =================================
``loss_type``     loss (prefloss module)                       hyperparameters (``None``: default)
================  ==========================================  =================================
``"sigmoid"``     DPO, as TRL's ``"sigmoid"`` (`DPOLoss`)       ``beta`` (0.1)
``"alpha_dpo"``   α-DPO (`AlphaDPOLoss`)                        ``beta`` (2.5), ``gamma_beta_ratio``
                                                               (0.6), ``alpha`` (0.2)
``"epsilon_dpo"`` ε-DPO (`EpsilonDPOLoss`)                      ``beta`` (0.01, the initial β),
                                                               ``epsilon`` (0.01)
================  ==========================================  =================================

SimPO is reference-free; TRL trains it with ``CPOTrainer``: use `prefloss.trl.CPOTrainer`.
``label_smoothing`` applies to α-DPO and ε-DPO (conservative form); ``loss_kwargs`` passes the loss
module's other keywords (α-DPO ``momentum``, ``normalization``; ε-DPO ``compare_dtype`` as
``"bfloat16"``/``"float32"``/``None``; ``chunk_size``, ``backend``). Every other TRL option that would
change the loss is refused with a ``ValueError`` naming it (`check_dpo_args`).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import trl
from torch import nn

from prefloss.fused.op import sequence_logprobs
from prefloss.hf.adapters import is_peft_model
from prefloss.hf.core import (
    LOSSES,
    LossCheckpoint,
    LossOnlyPrediction,
    LossStateCheckpoints,
    OutputHeadCheck,
    attach_loss,
    build_loss,
    check_peft_policy,
    peft_reference,
)
from prefloss.hf.engines import gathered_heads
from prefloss.hf.loss_fields import LossFields, config_field, loss_field, loss_module_kwargs
from prefloss.hf.model import decoder_hidden_states, unwrap_model
from prefloss.hf.moe import router_logits_kwargs
from prefloss.hf.packing import check_packing, unpack_rows
from prefloss.hf.step import preference_loss
from prefloss.trl._common import refuse, reward_metrics, shift_completion_labels, vocab_statistics

__all__ = ["DPOConfig", "DPOTrainer", "LOSS_TYPES", "check_dpo_args"]

# TRL loss_type -> prefloss loss name (`prefloss.hf.LOSSES`)
LOSS_TYPES = {"sigmoid": "dpo", "alpha_dpo": "alpha_dpo", "epsilon_dpo": "epsilon_dpo"}
_HYPERPARAMETERS = ("gamma_beta_ratio", "alpha", "epsilon")
_TRL_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(trl.DPOConfig) if f.default is not dataclasses.MISSING
}
# The keys of TRL's text collator's batches; anything else is an extra model input (vision, ...).
_BATCH_KEYS = {"input_ids", "attention_mask", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
# Forward inputs prefloss's hidden-state path sets itself: a batch that carries them is refused.
_RESERVED_KEYS = {
    "labels",
    "shift_labels",
    "logits_to_keep",
    "use_cache",
    "output_hidden_states",
    "return_dict",
    "inputs_embeds",
    "past_key_values",
}


def check_dpo_args(args: Any) -> str:
    """Refuse every option of a ``trl.DPOConfig`` that prefloss's DPO trainer does not implement.

    Args:
        args: a `DPOConfig` or a plain ``trl.DPOConfig``.

    Returns:
        The prefloss loss name (``"dpo"``, ``"alpha_dpo"``, ``"epsilon_dpo"``).

    Raises:
        ValueError: naming the option, its value, why, and what to do instead.
    """
    loss_type = args.loss_type if isinstance(args.loss_type, list) else [args.loss_type]
    if len(loss_type) != 1:
        refuse(
            "loss_type",
            loss_type,
            "it combines one loss per step, not several (TRL's multi-loss mixtures)",
            f"Pass one of {sorted(LOSS_TYPES)}",
        )
    (name,) = loss_type
    if name == "simpo":
        refuse(
            "loss_type",
            name,
            "SimPO is reference-free and TRL trains it with CPOTrainer",
            "Use prefloss.trl.CPOTrainer with CPOConfig(loss_type='simpo', cpo_alpha=0.0)",
        )
    if name not in LOSS_TYPES:
        refuse(
            "loss_type",
            name,
            "prefloss implements DPO ('sigmoid'), α-DPO and ε-DPO",
            f"Pass one of {sorted(LOSS_TYPES)}, or use trl.DPOTrainer for {name!r}",
        )
    kind = LOSS_TYPES[name]
    if args.loss_weights is not None and len(args.loss_weights) != 1:
        refuse("loss_weights", args.loss_weights, "one loss takes one weight", "Pass one weight or None")
    if args.ld_alpha is not None:
        refuse(
            "ld_alpha", args.ld_alpha, "LD-DPO's length-desensitised sums are not computed", "Leave it None"
        )
    if args.f_divergence_type != _TRL_DEFAULTS["f_divergence_type"]:
        refuse(
            "f_divergence_type",
            args.f_divergence_type,
            "only the reverse KL (standard DPO) is implemented",
            "Leave it 'reverse_kl'",
        )
    if args.f_alpha_divergence_coef != _TRL_DEFAULTS["f_alpha_divergence_coef"]:
        refuse(
            "f_alpha_divergence_coef",
            args.f_alpha_divergence_coef,
            "it shapes f_divergence_type='alpha_divergence', which is not implemented",
            f"Leave it at {_TRL_DEFAULTS['f_alpha_divergence_coef']}",
        )
    if args.discopop_tau != _TRL_DEFAULTS["discopop_tau"]:
        refuse(
            "discopop_tau",
            args.discopop_tau,
            "it shapes loss_type='discopop', which is not implemented",
            f"Leave it at {_TRL_DEFAULTS['discopop_tau']}",
        )
    if args.use_weighting:
        refuse(
            "use_weighting",
            True,
            "WPO weights need per-token Σp² that the fused op does not compute",
            "Set use_weighting=False",
        )
    if kind == "dpo" and args.label_smoothing != 0.0:
        refuse(
            "label_smoothing",
            args.label_smoothing,
            "TRL's 'sigmoid' loss does not use it (only 'robust', 'exo_pair' and 'aot' do), and prefloss "
            "would apply it (conservative DPO), which would change the loss TRL computes",
            "Set label_smoothing=0.0, or use loss_type 'alpha_dpo'/'epsilon_dpo', which apply it",
        )
    if args.activation_offloading:
        refuse(
            "activation_offloading",
            True,
            "it is untested with prefloss's fused op",
            "Set activation_offloading=False",
        )
    if args.precompute_ref_log_probs and kind == "epsilon_dpo":
        refuse(
            "precompute_ref_log_probs",
            True,
            "ε-DPO mixes the reference's per-token logits into the policy's at every step, so it needs the "
            "live reference model",
            "Set precompute_ref_log_probs=False",
        )
    takes = LOSSES[kind].takes
    for hyper in _HYPERPARAMETERS:
        value = getattr(args, hyper, None)
        if value is not None and hyper not in takes:
            refuse(
                hyper, value, f"loss_type={name!r} does not take it (it takes {list(takes)})", "Leave it None"
            )
    return kind


@dataclass
class DPOConfig(LossFields, trl.DPOConfig):
    """``trl.DPOConfig`` plus prefloss's losses (module docstring of `prefloss.trl.dpo`).

    The loss settings are `LossFields`' (they replace TRL's ``beta``); their help texts here name
    ``loss_type``'s values and give each default. ``beta=None`` takes the loss's default (0.1 for
    ``"sigmoid"``, as TRL; α-DPO 2.5; ε-DPO 0.01) and is set to that value after construction.
    Options prefloss does not implement are refused here (`check_dpo_args`), before any model is
    loaded.
    """

    # As TRL's dict fields: a JSON object string is parsed by TrainingArguments first, which also turns
    # its string values such as "0.9" or "true" into numbers and booleans (PreferenceConfig does not).
    _VALID_DICT_FIELDS = trl.DPOConfig._VALID_DICT_FIELDS + ["loss_kwargs"]

    beta: float | None = loss_field(
        "β of the loss; None: its default (sigmoid 0.1, alpha_dpo 2.5, epsilon_dpo 0.01)."
    )
    gamma_beta_ratio: float | None = loss_field("γ/β target margin (alpha_dpo); None: 0.6.")
    alpha: float | None = loss_field("α, weight of α-DPO's adaptive margin (alpha_dpo); None: 0.2.")
    epsilon: float | None = loss_field("ε, ε-DPO's KL-control step (epsilon_dpo); None: 0.01.")
    loss_kwargs: dict[str, Any] | str | None = loss_field(
        "Other keyword arguments of the prefloss loss module (a dict or a JSON string)."
    )
    log_vocab_metrics: bool = config_field(
        False,
        "Also log TRL's entropy, logits/chosen, logits/rejected and mean_token_accuracy: one extra "
        "no-grad N·H·V GEMM per step over the response tokens, in chunks of 256 rows.",
    )
    padding_free: bool = config_field(
        False,
        "Pack each micro-batch's sequences into one row without padding (position ids restarting at each "
        "sequence, no attention mask) for both forwards and the loss: the padded loss and gradients. "
        "Implemented by prefloss (stock TRL 1.16 turns it off); the time gain needs variable-length "
        "attention (flash_attention_2/3, flex_attention): sdpa and eager build a dense mask.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.parse_loss_kwargs()
        kind = check_dpo_args(self)
        if self.beta is None:
            self.beta = float(build_loss(kind).beta)


class DPOTrainer(LossStateCheckpoints, LossOnlyPrediction, trl.DPOTrainer):
    """``trl.DPOTrainer`` whose loss is a prefloss loss on hidden states (no ``[2B, T, V]`` logits).

    Same arguments as ``trl.DPOTrainer`` (TRL 1.16); ``args`` is a `DPOConfig` (or a plain
    ``trl.DPOConfig``, which gives DPO with TRL's ``beta``). The reference is TRL's: ``ref_model``, a
    copy TRL loads, the same PEFT model with adapters disabled (or TRL's ``"ref"`` adapter active), or
    log-probs precomputed once (``precompute_ref_log_probs``, computed with the fused op too);
    ``sync_ref_model`` mixes the policy into it as in TRL.

    Logged metrics (TRL's names and aggregation): ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``num_tokens``,
    plus the loss's own (α-DPO: ``logps/ref_*``, ``RATIO/*``, ``alpha/running_*``; ε-DPO: ``kl/beta``,
    ``kl/p_epsilon_steps``, ``kl/n_epsilon_steps``, ``kl/avg_steps``). ``logps/*`` are what the loss
    uses: sums for DPO and ε-DPO, per-token means for α-DPO. TRL's ``entropy``, ``logits/chosen``,
    ``logits/rejected`` and ``mean_token_accuracy`` need vocabulary-wide reductions the fused op does
    not compute: logged only with ``log_vocab_metrics=True`` (one extra no-grad ``N·H·V`` GEMM).

    Mixture-of-experts models as in TRL: when TRL enables the auxiliary loss (a MoE config and a
    ``router_aux_loss_coef``, the ``DPOConfig``'s or else the model config's, that is not 0), the
    policy's forward returns its routers' load-balancing loss, the loss is
    ``loss_weight · loss + router_aux_loss_coef · aux_loss`` and ``aux_loss`` is logged
    (`prefloss.hf.moe`); the reference forms no router logits.

    Vision-language models as in TRL: with a processor and an image dataset, TRL's vision collator
    builds the batches and every key beyond the text collator's (``pixel_values``, ``image_grid_thw``,
    ``token_type_ids``, ...) goes unchanged to the policy's and the reference's forward; keys prefloss
    sets itself (``labels``, ``use_cache``, ...) are refused by name.

    Checkpoints also hold the loss state (``prefloss_loss_state.pt``: α-DPO's running statistics,
    ε-DPO's β), restored by ``train(resume_from_checkpoint=...)``.
    """

    loss_checkpoint = LossCheckpoint("prefloss.trl", records_loss=False)

    def __init__(
        self, model: Any, ref_model: nn.Module | None = None, args: Any = None, *pargs: Any, **kwargs: Any
    ):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = DPOConfig(output_dir=f"{str(name).split('/')[-1]}-DPO")
        if not isinstance(args, trl.DPOConfig):
            raise TypeError(
                f"args must be a prefloss.trl.DPOConfig or trl.DPOConfig, got {type(args).__name__}"
            )
        self._loss_kind = check_dpo_args(args)
        self.loss_fn = build_loss(
            self._loss_kind,
            beta=args.beta,
            **{h: getattr(args, h, None) for h in _HYPERPARAMETERS if h in LOSSES[self._loss_kind].takes},
            **({"label_smoothing": args.label_smoothing} if self._loss_kind != "dpo" else {}),
            **loss_module_kwargs(getattr(args, "loss_kwargs", None)),
        )
        self._loss_weight = float(args.loss_weights[0]) if args.loss_weights else 1.0
        self._peft_reference: nn.Module | None = None
        self._output_head_check = OutputHeadCheck()
        # TRL 1.16 warns that padding_free is disabled and falls back to padding; prefloss packs itself
        padding_free, args.padding_free = bool(args.padding_free), False
        try:
            super().__init__(model, ref_model, args, *pargs, **kwargs)
        finally:
            args.padding_free = padding_free
        self.padding_free = padding_free
        if (self._is_vlm or self._is_vision_dataset) and getattr(args, "padding_free", False):
            refuse(
                "padding_free",
                True,
                "a vision-language batch's images belong to its rows (pixel_values, image_grid_thw, "
                "token_type_ids, ...), which packing them into one row would not follow",
                "Set padding_free=False for vision-language models",
            )
        check_peft_policy(self.model)
        attach_loss(self, self._record_beta_update)

    # ----------------------------------------------------------------------------------------------
    # Reference

    def _reference_view(self) -> nn.Module:
        """The PEFT reference as TRL runs it: adapters disabled, or TRL's ``"ref"`` adapter active."""
        if self._peft_reference is None:
            inner = unwrap_model(self.accelerator.unwrap_model(self.model))
            self._peft_reference = peft_reference(inner, "ref" if "ref" in inner.peft_config else None)
        return self._peft_reference

    def _live_reference(self) -> nn.Module:
        if self.ref_model is not None:
            return self.ref_model
        if is_peft_model(self.model):
            return self._reference_view()
        raise RuntimeError("no reference model: expected ref_model, a PEFT policy or precomputed log-probs")

    def compute_ref_log_probs(
        self, model: nn.Module, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        """Reference log-prob sums ``([B], [B])`` of one padded batch, with the fused op (precompute)."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        labels = shift_completion_labels(ids, inputs["completion_mask"])
        scorer = self._reference_view() if self.ref_model is None and is_peft_model(self.model) else model
        with torch.no_grad(), self.accelerator.autocast():
            hidden = decoder_hidden_states(scorer, ids, mask, **router_logits_kwargs(scorer, False))
            with gathered_heads(scorer) as heads:
                seq = sequence_logprobs(hidden, heads.policy.weight, labels, **heads.policy.fused_kwargs())
        return seq.policy.chunk(2, dim=0)

    # ----------------------------------------------------------------------------------------------
    # Loss

    def _compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool) -> Any:
        mode = "train" if self.model.training else "eval"
        # As TRL: every other key of the batch (a vision-language model's pixel_values, image_grid_thw,
        # token_type_ids, ...) goes to the policy's and the reference's forward unchanged.
        model_inputs = {k: v for k, v in inputs.items() if k not in _BATCH_KEYS}
        reserved = sorted(set(model_inputs) & _RESERVED_KEYS)
        if reserved:
            refuse(
                "data_collator",
                reserved,
                "prefloss sets these forward inputs itself (it reads the last hidden states with "
                "use_cache=False and labels shifted from completion_mask)",
                "Drop them from the collator's batches",
            )
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        labels = shift_completion_labels(ids, inputs["completion_mask"])
        ref_model = ref_logps = None
        if self.precompute_ref_logps:
            ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).to(ids.device)
        else:
            ref_model = self._live_reference()
        # TRL's default bf16=True: accelerate runs the forwards, and so the logits, under autocast
        self._output_head_check(
            ids,
            model,
            ref_model,
            mixed_precision=bool(self.accelerator.native_amp),
            attention_mask=mask,
            model_inputs=model_inputs,
        )
        if self.padding_free:  # before the metrics hook below, which must see only the loss's forwards
            check_packing(ids, mask, model, ref_model, model_inputs=model_inputs)
        self.loss_fn.train(self.model.training)
        captured: list[torch.Tensor] = []
        handle = None
        if getattr(self.args, "log_vocab_metrics", False):  # the policy's hidden states, for the metrics
            decoder = unwrap_model(model).get_decoder()
            handle = decoder.register_forward_hook(
                lambda _m, _a, o: captured.append(
                    o.last_hidden_state if hasattr(o, "last_hidden_state") else o[0]
                )
            )
        # MoE: TRL's rule (set in trl.DPOTrainer.__init__), loss_weight·loss + coef·aux_loss
        aux_coef = self.router_aux_loss_coef if self.aux_loss_enabled else 0.0
        try:
            out = preference_loss(
                self.loss_fn,
                model,
                ids,
                mask,
                labels,
                ref_model=ref_model,
                ref_logps=ref_logps,
                model_inputs=model_inputs,
                router_aux_loss_coef=aux_coef,
                loss_weight=self._loss_weight,
                padding_free=self.padding_free,
            )
        finally:
            if handle is not None:
                handle.remove()
        if captured:  # the first decoder call is the policy's (the reference runs after it)
            with torch.no_grad(), gathered_heads(model) as heads:
                hidden = unpack_rows(captured[0], mask) if self.padding_free else captured[0]
                self._record_vocab_metrics(mode, vocab_statistics(hidden, heads.policy, labels))
        loss = out.loss
        self._record_metrics(mode, out, mask)  # with a MoE's aux_loss, as TRL logs it
        if return_outputs:
            warnings.warn(
                "return_outputs=True runs a second forward that forms the full [2B, T, V] logits (as TRL "
                "1.16 does, deprecated there); pass no compute_metrics to keep evaluation memory-flat",
                stacklevel=2,
            )
            with torch.no_grad():
                outputs = model(input_ids=ids, attention_mask=mask, use_cache=False, **model_inputs)
            return loss, outputs
        return loss

    def _record_metrics(self, mode: str, out: Any, attention_mask: torch.Tensor) -> None:
        store = self._metrics[mode]
        chosen = self.accelerator.gather(out.chosen_rewards.detach().float())
        rejected = self.accelerator.gather(out.rejected_rewards.detach().float())
        for name, value in reward_metrics(chosen, rejected).items():
            store[name].append(value)
        for name, value in out.metrics.items():
            if not name.startswith("rewards/"):
                value = value.detach().float().reshape(1)
                store[name].append(self.accelerator.gather_for_metrics(value).mean().item())
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(attention_mask.sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        store["num_tokens"] = [self._total_train_tokens]

    def _record_vocab_metrics(self, mode: str, stats: dict[str, torch.Tensor]) -> None:
        """TRL's token-level metrics, aggregated as TRL does (token-weighted over all ranks)."""
        store = self._metrics[mode]

        def ratio(num: torch.Tensor, den: torch.Tensor) -> float:
            num = self.accelerator.gather_for_metrics(num.reshape(1)).sum()
            den = self.accelerator.gather_for_metrics(den.reshape(1)).sum()
            return (num / den).item() if den > 0 else 0.0

        chosen = {k: v.chunk(2)[0].sum() for k, v in stats.items()}
        rejected = {k: v.chunk(2)[1].sum() for k, v in stats.items()}
        store["entropy"].append(ratio(stats["entropy"].sum(), stats["count"].sum()))
        store["logits/chosen"].append(ratio(chosen["mean_logit"], chosen["count"]))
        store["logits/rejected"].append(ratio(rejected["mean_logit"], rejected["count"]))
        store["mean_token_accuracy"].append(ratio(chosen["top1"], chosen["count"]))

    def _predicts_loss_only(self) -> bool:
        return self.compute_metrics is None  # else TRL's path: logits from a second, full-logit forward

    def _evaluation_loss(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        return self.compute_loss(model, inputs)

    def _record_beta_update(self, metrics: dict[str, torch.Tensor]) -> None:
        self._metrics["train"]["kl/avg_steps"].append(float(metrics["kl/avg_steps"]))

    # ----------------------------------------------------------------------------------------------
    # Checkpoints (saved by `LossStateCheckpoints.save_model`)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        resume_from_checkpoint = self._resume_loss_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
