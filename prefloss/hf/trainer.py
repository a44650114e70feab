"""`PreferenceTrainer`: a ``transformers.Trainer`` that trains with prefloss's fused losses.

One training micro-batch (B pairs, the `PreferenceCollator` layout, chosen rows first):

1. the policy runs through its own ``forward`` (so DDP/accelerate wrappers synchronise gradients) with
   ``logits_to_keep=1``; a forward hook on its decoder captures the ``[2B, T, H]`` last hidden states
   (`prefloss.hf.model.decoder_hidden_states`): no ``[2B, T, V]`` logits are formed;
2. the reference, when the loss needs one, runs the same way under ``no_grad`` -- or its per-sequence
   log-prob sums were precomputed once before training (``precompute_ref_log_probs``);
3. the loss module (`prefloss.AlphaDPOLoss`, ...) takes hidden states, the output head
   (weight, bias, logit scale, soft-cap) and the shifted labels and returns the loss and its metrics.

Steps 1-3 are `prefloss.hf.step.preference_loss`, which gathers the output heads the way the engine
holds them (DDP, FSDP2, DeepSpeed ZeRO-3: `prefloss.hf.engines`). The reference is prepared by the
policy's engine before its first use. With ``padding_free=True`` both forwards and the loss run on
the micro-batch packed into one row (`prefloss.hf.packing`): the same loss, gradients and loss state.

The micro-batch loss is the mean over its pairs; the Trainer divides it by the number of
micro-batches of the optimizer step and DDP averages over ranks, so a step's gradient is the mean over
all its pairs. Loss state (α-DPO's running statistics, ε-DPO's β) lives in the loss module's buffers:
saved as ``prefloss_loss_state.pt`` with every checkpoint and restored on resume. ε-DPO's β is updated
once per optimizer step, after all its micro-batches, by a callback (``on_step_end``).

Non-finite losses are never hidden: the logged ``loss`` is the true value (``logging_nan_inf_filter``
defaults to ``False`` here; transformers' ``True`` logs a NaN step as the mean of the previous ones,
0.0 right after a log), and after ``max_nonfinite_steps`` consecutive optimizer steps with a
non-finite loss or gradient norm (default 1) training stops with `NonFiniteLossError` before that
step's optimizer update, so neither the weights nor a checkpoint take it (under DeepSpeed only the loss
is checked: the gradient norm is known only after DeepSpeed's update). A checkpoint also records
its loss's name (``prefloss_loss.json``): resuming it with another loss is an error naming both.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import TrainOutput

from prefloss.hf.adapters import is_peft_model
from prefloss.hf.collator import PreferenceCollator
from prefloss.hf.core import (  # the loss registry, checkpoint files and β update live in the shared core
    HYPERPARAMETERS,
    LOSS_NAME_FILE,
    LOSS_STATE_NAME,
    LOSSES,
    LossCheckpoint,
    LossOnlyPrediction,
    LossStateCheckpoints,
    OutputHeadCheck,
    _BetaUpdate,  # noqa: F401 (tests look for it among the callbacks)
    attach_loss,
    build_loss,
    check_logit_transforms,
    check_peft_policy,
    checkpoint_loss_name,
    loss_name,
    peft_reference,
)
from prefloss.hf.data import BOS_MODES, OVERLONG_MODES, load_preferences, tokenize_preferences
from prefloss.hf.engines import gathered_heads, prepare_reference
from prefloss.hf.loss_fields import LossFields, loss_module_kwargs
from prefloss.hf.model import decoder_hidden_states, output_head, unwrap_model
from prefloss.hf.moe import check_router_aux_loss_coef, router_logits_kwargs, trainer_aux_loss_coef
from prefloss.hf.step import preference_loss
from prefloss.hf.vision import (
    VisionPreferenceCollator,
    check_image_training,
    is_image_data,
    load_image_preferences,
)
from prefloss.losses import LOSSES as LOSS_CLASSES

__all__ = [
    "LOSSES",
    "LOSS_NAME_FILE",
    "LOSS_STATE_NAME",
    "NonFiniteLossError",
    "PreferenceConfig",
    "PreferenceTrainer",
    "build_loss",
    "checkpoint_loss_name",
    "loss_name",
    "score_pairs",
]


# The keys of PreferenceCollator's batches; any other key is a model input (prefloss.hf.vision).
_TEXT_BATCH_KEYS = {"input_ids", "attention_mask", "shift_labels", "ref_logps"}


class NonFiniteLossError(RuntimeError):
    """Training stopped: the loss or the gradient norm was non-finite (NaN or ±inf) for
    ``max_nonfinite_steps`` consecutive optimizer steps. Raised before the last such step's optimizer
    update."""


@dataclass
class PreferenceConfig(LossFields, TrainingArguments):
    """``TrainingArguments`` plus the preference loss and data settings.

    The loss settings are `LossFields`' (``beta``, ``gamma_beta_ratio``, ``alpha``, ``epsilon``,
    ``loss_kwargs``, with its help texts). Loss hyperparameters left at ``None`` take the loss module's
    defaults (``prefloss.losses.LOSSES[loss].defaults``, the published configs, docs/losses.md).
    """

    loss: str = field(
        default="alpha_dpo", metadata={"help": f"Preference loss: one of {', '.join(LOSS_CLASSES)}."}
    )
    max_length: int = field(default=512, metadata={"help": "Most tokens of prompt + response."})
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Prompt tokens kept (its end) when a pair is too long; None: never cut the prompt."
        },
    )
    prompt_bos: str = field(
        default="tokenizer",
        metadata={
            "help": "BOS before the prompt: 'tokenizer' (as the tokenizer or chat template puts it, like "
            "TRL), 'always' or 'never'."
        },
    )
    overlong_prompts: str = field(
        default="error",
        metadata={
            "help": "A prompt that leaves no room for a response within max_length: 'error', or 'drop' the "
            "row (counted in a warning, as TRL's DPOTrainer drops it)."
        },
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference log-probs once before training and drop the reference model."
        },
    )
    check_output_head: bool = field(
        default=True,
        metadata={"help": "Check once that hidden states + output head reproduce the model's logits."},
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Pack each micro-batch's sequences into one row without padding (position_ids restarting "
            "at each sequence, no attention mask): the same loss and gradients, no padded tokens in the "
            "forwards or the loss. Needs an attention implementation that keeps packed sequences apart "
            "(flash_attention_2/3, flex_attention, sdpa, eager); see prefloss.hf.packing."
        },
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the collator needs the tokenized columns."}
    )
    max_nonfinite_steps: int | None = field(
        default=1,
        metadata={
            "help": "Stop with NonFiniteLossError after this many consecutive optimizer steps whose loss (on "
            "any rank) or gradient norm is NaN or ±inf, before the last one's optimizer update; None: never "
            "stop. Default 1: a non-finite loss gives non-finite gradients, and one AdamW update with them "
            "makes the weights and the moment estimates NaN for good, so no later step can recover; "
            "stopping at once keeps the weights (and every checkpoint) of the last finite step."
        },
    )
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={
            "help": "Mixture-of-experts models: weight of the routers' load-balancing loss added to the "
            "preference loss (logged as aux_loss). None: as transformers, the model config's "
            "router_aux_loss_coef when the config sets output_router_logits=True, else none; a number: "
            "that weight (0.0: none); refused for a model that is not a MoE."
        },
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "transformers' filter, off here: True logs a NaN/inf step loss as the mean of the steps "
            "since the last log (0.0 with logging_steps=1) instead of its value."
        },
    )

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}: expected one of {sorted(LOSSES)}")
        takes = LOSSES[self.loss].takes
        for name in HYPERPARAMETERS:
            if getattr(self, name) is not None and name not in takes:
                raise ValueError(
                    f"{name}={getattr(self, name)} does not apply to loss {self.loss!r}, "
                    f"which takes {list(takes)}"
                )
        self.parse_loss_kwargs()
        check_router_aux_loss_coef(self.router_aux_loss_coef)
        if self.precompute_ref_log_probs and self.loss == "epsilon_dpo":
            raise ValueError(
                "precompute_ref_log_probs=True does not work with loss 'epsilon_dpo': ε-DPO mixes the "
                "reference's per-token logits into the policy's at every step, so it needs the reference "
                "model; expected precompute_ref_log_probs=False"
            )
        if self.max_nonfinite_steps is not None and (
            isinstance(self.max_nonfinite_steps, bool)
            or not isinstance(self.max_nonfinite_steps, int)
            or self.max_nonfinite_steps < 1
        ):
            raise ValueError(
                f"max_nonfinite_steps must be an integer >= 1 or None, got {self.max_nonfinite_steps!r}"
            )
        if self.remove_unused_columns:
            raise ValueError(
                "remove_unused_columns=True would drop the tokenized preference columns the collator needs; "
                "expected False"
            )
        if self.prompt_bos not in BOS_MODES:
            raise ValueError(f"prompt_bos must be one of {BOS_MODES}, got {self.prompt_bos!r}")
        if self.overlong_prompts not in OVERLONG_MODES:
            raise ValueError(
                f"overlong_prompts must be one of {OVERLONG_MODES}, got {self.overlong_prompts!r}"
            )
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            raise ValueError(
                f"max_prompt_length must be in [1, max_length={self.max_length}), "
                f"got {self.max_prompt_length}"
            )
        super().__post_init__()


@torch.no_grad()
def score_pairs(
    model: nn.Module,
    dataset: Any,
    collator: PreferenceCollator,
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-pair log-prob sums and lengths of chosen and rejected responses under ``model``.

    Runs in eval mode, without forming full logits.

    Args:
        autocast: makes the context ``model``'s forward runs in; `PreferenceTrainer` passes its
            accelerator's ``autocast`` so that the scores come from the forward training runs (16-bit
            autocast under ``bf16=True``/``fp16=True``). The fused op runs outside it, as in training.

    Returns:
        ``chosen_logps``, ``rejected_logps`` (float32 sums), ``chosen_length``, ``rejected_length``
        (response tokens), each ``[len(dataset)]`` on the CPU.
    """
    from prefloss.fused.op import sequence_logprobs

    inner = unwrap_model(model)
    device = torch.device(device) if device is not None else inner.device
    was_training = inner.training
    inner.eval()
    parts: dict[str, list[torch.Tensor]] = defaultdict(list)
    try:
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = collator(rows)
            ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            labels = batch["shift_labels"].to(device)
            with autocast() if autocast is not None else contextlib.nullcontext():
                hidden = decoder_hidden_states(model, ids, mask, **router_logits_kwargs(model, False))
            with gathered_heads(model) as heads:
                seq = sequence_logprobs(
                    hidden,
                    heads.policy.weight,
                    labels,
                    ignore_index=collator.ignore_index,
                    **heads.policy.fused_kwargs(),
                )
            b = len(rows)
            parts["chosen_logps"].append(seq.policy[:b].float().cpu())
            parts["rejected_logps"].append(seq.policy[b:].float().cpu())
            parts["chosen_length"].append(seq.length[:b].cpu())
            parts["rejected_length"].append(seq.length[b:].cpu())
    finally:
        inner.train(was_training)
    return {k: torch.cat(v) for k, v in parts.items()}


class PreferenceTrainer(LossStateCheckpoints, LossOnlyPrediction, Trainer):
    """Trains a causal LM with α-DPO, ε-DPO, DPO or SimPO through prefloss's fused losses.

    Args:
        model: an ``AutoModelForCausalLM`` (or a path to one).
        ref_model: the reference model; ``None`` makes a frozen copy of ``model`` when the loss needs
            one (SimPO needs none). Before its first use it is prepared by the policy's engine
            (`prefloss.hf.prepare_reference`: sharded by DeepSpeed ZeRO-3 or FSDP2 like the policy,
            computing in the policy's dtype). With ``precompute_ref_log_probs`` the reference (or
            ``model`` itself, before training) scores the data once and is then dropped.
        args: a `PreferenceConfig`.
        train_dataset, eval_dataset: preference data (``datasets.Dataset``, JSONL path or list of dicts
            with ``prompt``/``chosen``/``rejected``), or data already tokenized by `tokenize_preferences`.
        processing_class: the tokenizer; for image preference data (an ``images`` or ``image``
            column: a vision-language model), the model's processor (`prefloss.hf.vision`: processed
            batch by batch as TRL does, the vision inputs passed to both models' forwards).
        loss_fn: a ready prefloss loss module; ``args.loss`` and the hyperparameters in ``args`` are
            then ignored.
        peft_config: a ``peft`` config (e.g. ``LoraConfig``): ``model`` is wrapped with
            ``get_peft_model``. For a PEFT policy (given or wrapped here) without ``ref_model`` the
            reference is the same model with its adapters disabled (`AdaptersDisabled`), not a copy.
            Adapters on the output head itself are refused (the fused op reads the head weight);
            ``modules_to_save=["lm_head"]`` works.
        Remaining arguments go to ``transformers.Trainer``.

    A mixture-of-experts policy trains with its routers' load-balancing loss as transformers adds it
    (``loss + router_aux_loss_coef · aux_loss``, ``aux_loss`` logged; `prefloss.hf.moe`): by default
    when its config sets ``output_router_logits=True``, with the config's coefficient, or with
    ``args.router_aux_loss_coef`` when that is set. The reference forms no router logits.

    ``train()`` raises `NonFiniteLossError` after ``args.max_nonfinite_steps`` consecutive optimizer steps
    with a NaN/inf loss or gradient norm (logged with its true value first; the optimizer update of the
    last one is not taken). ``train(resume_from_checkpoint=...)`` refuses a checkpoint written with
    another loss, and resuming a checkpoint that already reached ``args.max_steps`` trains nothing (a
    warning; the weights, loss state and trainer state are the checkpoint's).
    """

    loss_checkpoint = LossCheckpoint("PreferenceTrainer", records_loss=True)

    def __init__(
        self,
        model: nn.Module | str,
        ref_model: nn.Module | str | None = None,
        args: PreferenceConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        data_collator: Any = None,
        loss_fn: nn.Module | None = None,
        peft_config: Any = None,
        **kwargs: Any,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if args is None:
            args = PreferenceConfig(output_dir="prefloss-output")
        if not isinstance(args, PreferenceConfig):
            raise TypeError(f"args must be a PreferenceConfig, got {type(args).__name__}")
        if isinstance(model, (str, os.PathLike)):
            if processing_class is None:
                processing_class = AutoTokenizer.from_pretrained(model)
            model = AutoModelForCausalLM.from_pretrained(model)
        if isinstance(ref_model, (str, os.PathLike)):
            ref_model = AutoModelForCausalLM.from_pretrained(ref_model)
        if peft_config is not None:
            if is_peft_model(model):
                raise ValueError(
                    "peft_config was given but model is already a PeftModel: pass one or the other"
                )
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        check_peft_policy(model)
        if processing_class is None:
            raise ValueError("processing_class (the tokenizer) is required")
        output_head(model)  # fails early, with a clear message, on a model without LM head
        self._router_aux_loss_coef = trainer_aux_loss_coef(model, args.router_aux_loss_coef)  # MoE
        if loss_fn is None:
            loss_fn = build_loss(
                args.loss,
                beta=args.beta,
                gamma_beta_ratio=args.gamma_beta_ratio,
                alpha=args.alpha,
                epsilon=args.epsilon,
                **loss_module_kwargs(args.loss_kwargs),
            )
        kind = loss_name(loss_fn)
        needs_reference = LOSSES[kind].needs_reference
        if not needs_reference and ref_model is not None:
            raise ValueError(
                f"loss {kind!r} does not use a reference model, got ref_model={type(ref_model).__name__}"
            )
        if kind == "epsilon_dpo" and args.precompute_ref_log_probs:
            raise ValueError(
                "precompute_ref_log_probs=True does not work with an ε-DPO loss: it needs the reference "
                "model's per-token logits at every step"
            )

        tokenizer = getattr(processing_class, "tokenizer", processing_class)  # a processor's tokenizer
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id
        images = is_image_data(train_dataset)  # image preference data: prefloss.hf.vision
        if images:
            check_image_training(
                processing_class,
                precompute_ref_log_probs=args.precompute_ref_log_probs,
                padding_free=getattr(args, "padding_free", False),
            )
        if data_collator is None:
            data_collator = (
                VisionPreferenceCollator(processing_class, max_length=args.max_length)
                if images
                else PreferenceCollator(pad_token_id=pad_id)
            )
        self._collator = data_collator

        def prepare(data: Any) -> Any:
            if data is None:
                return None
            if isinstance(data, dict):
                return {k: prepare(v) for k, v in data.items()}
            if images:  # processed batch by batch by the collator, as TRL does
                return load_image_preferences(data)
            return tokenize_preferences(
                load_preferences(data),
                processing_class,
                max_length=args.max_length,
                max_prompt_length=args.max_prompt_length,
                bos=args.prompt_bos,
                overlong=args.overlong_prompts,
                num_proc=args.dataset_num_proc if hasattr(args, "dataset_num_proc") else None,
            )

        train_dataset, eval_dataset = prepare(train_dataset), prepare(eval_dataset)

        self.loss_fn = loss_fn

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        # The loss is a per-micro-batch mean: let the Trainer divide it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        attach_loss(self, lambda metrics: self._store_metrics("train", metrics))
        self._step_loss: torch.Tensor | None = None  # sum of the current optimizer step's micro-batch losses
        self._last_step_loss: float | None = None  # the step's loss, until its gradient norm is known
        self._nonfinite_steps = 0  # consecutive optimizer steps with a non-finite loss or gradient norm
        self._metrics: dict[str, dict[str, list[torch.Tensor]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

        self.ref_model: nn.Module | None = None
        self._ref_prepared = False
        if needs_reference:
            if args.precompute_ref_log_probs:
                scorer = ref_model if ref_model is not None else self.model
                if ref_model is None and is_peft_model(self.model):  # the base model, adapters off
                    scorer = peft_reference(self.model)
                self.train_dataset = self._add_reference_logps(self.train_dataset, scorer)
                if isinstance(self.eval_dataset, dict):
                    self.eval_dataset = {
                        k: self._add_reference_logps(v, scorer) for k, v in self.eval_dataset.items()
                    }
                else:
                    self.eval_dataset = self._add_reference_logps(self.eval_dataset, scorer)
            elif ref_model is None and is_peft_model(self.model):
                # LoRA: the reference is the policy with its adapters disabled -- no second copy
                self.ref_model = peft_reference(self.model)
                self._ref_prepared = True  # it is the policy, held by the policy's engine
            else:
                self.ref_model = ref_model if ref_model is not None else self._copy_policy()
                self.ref_model.eval().requires_grad_(False)
        if self.ref_model is not None:
            check_logit_transforms(output_head(self.model), output_head(self.ref_model))
        self._output_head_check = OutputHeadCheck(bool(args.check_output_head))  # at the first loss

    # ----------------------------------------------------------------------------------------------
    # Reference model and log-probs

    def _copy_policy(self) -> nn.Module:
        policy = unwrap_model(self.model)
        if any(hasattr(p, "ds_id") for p in policy.parameters()):
            raise ValueError(
                "DeepSpeed ZeRO-3: the model's parameters are already partitioned (it was created under "
                "deepspeed.zero.Init, e.g. from_pretrained after TrainingArguments(deepspeed=...)), so "
                "PreferenceTrainer cannot copy it into a reference model. Pass ref_model=<the reference "
                "loaded the same way> (it is prepared by DeepSpeed like the policy), or create the policy "
                "before TrainingArguments."
            )
        return copy.deepcopy(policy)

    def _reference(self) -> nn.Module | None:
        """The reference, prepared by the policy's engine on first use (`prepare_reference`)."""
        if self.ref_model is not None and not self._ref_prepared:
            ds_config = None
            if getattr(self, "is_deepspeed_enabled", False):
                ds_config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            self.ref_model = prepare_reference(self.ref_model, self.model_wrapped, deepspeed_config=ds_config)
            if self._policy_autocast():
                # The reference's forward gets the policy's autocast (as TRL prepares its reference), so
                # that a reference equal to the policy gives equal log-probs.
                self.ref_model = self.accelerator.prepare_model(
                    self.ref_model, device_placement=False, evaluation_mode=True
                )
            self._ref_prepared = True
        return self.ref_model

    def _policy_autocast(self) -> bool:
        """Whether accelerate runs the policy's forward under 16-bit autocast (``bf16``/``fp16`` with
        DDP or one process; DeepSpeed and FSDP2 cast the weights instead, and the reference follows
        through `prepare_reference`)."""
        return bool(self.accelerator.native_amp) and not getattr(self, "is_fsdp_enabled", False)

    def _add_reference_logps(self, dataset: Any, scorer: nn.Module) -> Any:
        if dataset is None:
            return None
        if "ref_chosen_logps" in dataset.column_names:
            return dataset
        scores = score_pairs(
            scorer,
            dataset,
            self._collator,
            batch_size=self.args.per_device_eval_batch_size,
            device=self.args.device,
            autocast=self.accelerator.autocast if self._policy_autocast() else None,
        )
        dataset = dataset.add_column("ref_chosen_logps", scores["chosen_logps"].tolist())
        return dataset.add_column("ref_rejected_logps", scores["rejected_logps"].tolist())

    # ----------------------------------------------------------------------------------------------
    # Loss

    def _loss_output(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
        self.loss_fn.train(model.training)
        ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["shift_labels"]
        # a vision-language batch's pixel_values, token_type_ids, ...: to both models' forwards
        model_inputs = {k: v for k, v in inputs.items() if k not in _TEXT_BATCH_KEYS}
        ref_model = self._reference()
        self._output_head_check(
            ids,
            model,
            ref_model,
            mixed_precision=bool(self.accelerator.native_amp),
            attention_mask=mask,
            model_inputs=model_inputs,
        )
        return preference_loss(
            self.loss_fn,
            model,
            ids,
            mask,
            labels,
            ref_model=ref_model,
            ref_logps=inputs.get("ref_logps"),
            ignore_index=getattr(self._collator, "ignore_index", -100),
            model_inputs=model_inputs,
            router_aux_loss_coef=self._router_aux_loss_coef,
            padding_free=self.args.padding_free,
        )

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        out = self._loss_output(model, inputs)
        self._store_metrics("train" if model.training else "eval", out.metrics)
        if model.training:  # from training_step: checked before this micro-batch's backward
            self._add_to_step_loss(out.loss)
        return (out.loss, out.metrics) if return_outputs else out.loss

    def _add_to_step_loss(self, loss: torch.Tensor) -> None:
        """Add a training micro-batch's loss to its optimizer step's (divided by the step's number of
        micro-batches, as the Trainer logs it); at the step's last micro-batch, before its backward (and
        so before the update, which DeepSpeed makes inside the backward), check it (`_check_step`)."""
        accumulation = getattr(
            self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
        )
        part = loss.detach().float() / accumulation
        self._step_loss = part if self._step_loss is None else self._step_loss + part
        if self.accelerator.sync_gradients:
            self._check_step(loss=self._reduced_step_loss(), grad_norm=None)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        # transformers (5.x) calls this after the step's last backward and before the optimizer update:
        # a finite loss can still give overflowing gradients (a learning rate far too high).
        # Not under DeepSpeed: it updates inside the backward, and the norm known here is that update's.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        deepspeed = getattr(self, "is_deepspeed_enabled", False)
        if grad_norm is not None and self._last_step_loss is not None and not deepspeed:
            self._check_step(loss=self._last_step_loss, grad_norm=float(grad_norm))
        return grad_norm

    def _reduced_step_loss(self) -> float:
        """The optimizer step's loss (sum of its micro-batch losses, each divided by their number), the
        mean over ranks: NaN/inf on one rank makes it non-finite on all."""
        step_loss, self._step_loss = self._step_loss, None
        if self.accelerator.num_processes > 1:
            step_loss = self.accelerator.reduce(step_loss.to(self.accelerator.device), reduction="mean")
        return float(step_loss)

    def _check_step(self, *, loss: float, grad_norm: float | None) -> None:
        """Count consecutive optimizer steps with a non-finite loss or gradient norm (the same on every
        rank); at ``max_nonfinite_steps`` log the step's true values and raise `NonFiniteLossError`,
        before the step's optimizer update. Called twice per step: with the loss (``grad_norm=None``),
        then with the loss and the gradient norm; a step counts once."""
        finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
        if grad_norm is None:  # first call of the step
            self._last_step_loss = loss
            self._nonfinite_steps = 0 if finite else self._nonfinite_steps + 1
        else:  # second call: only a non-finite gradient norm with a finite loss is new
            self._last_step_loss = None
            if finite or not math.isfinite(loss):
                return
            self._nonfinite_steps += 1
        limit = self.args.max_nonfinite_steps
        if finite or limit is None or self._nonfinite_steps < limit:
            return
        step = self.state.global_step + 1
        logs = {"loss": loss, "nonfinite_steps": float(self._nonfinite_steps)}
        if grad_norm is not None:
            logs["grad_norm"] = grad_norm
        self.log(logs)
        self.state.log_history[-1]["step"] = step  # the step whose update is not taken
        what = f"the loss was {loss}" + ("" if grad_norm is None else f" and the gradient norm {grad_norm}")
        raise NonFiniteLossError(
            f"training stopped at step {step}: {what}, non-finite for {self._nonfinite_steps} consecutive "
            f"optimizer step(s), max_nonfinite_steps={limit}. Step {step}'s optimizer update was not taken "
            f"and no checkpoint was written after it; the model holds the weights of step {step - 1}. "
            f"Usual causes: a learning rate too high (learning_rate={self.args.learning_rate}), a loss "
            "hyperparameter out of range, or broken data."
        )

    def _evaluation_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self._loss_output(model, inputs)
        self._store_metrics("eval", out.metrics)
        return out.loss

    # ----------------------------------------------------------------------------------------------
    # Metrics

    def _store_metrics(self, mode: str, metrics: dict[str, torch.Tensor]) -> None:
        if not metrics:
            return
        names = sorted(metrics)
        values = torch.stack(
            [torch.as_tensor(metrics[n], dtype=torch.float32).detach().reshape(()) for n in names]
        )
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values.to(self.accelerator.device), reduction="mean")
        for name, value in zip(names, values.cpu(), strict=True):
            self._metrics[mode][name].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if any(k.startswith("eval_") for k in logs):
            mode, prefix = "eval", "eval_"
        elif "loss" in logs:
            mode, prefix = "train", ""
            tr_loss = getattr(self, "_tr_loss", None)
            if tr_loss is not None and not bool(torch.isfinite(tr_loss)):
                # transformers has just reset its running sum by `tr_loss -= tr_loss`, which leaves a
                # NaN/inf in place: every later step would be logged as NaN. Reset it for real.
                tr_loss.zero_()
        else:
            mode = None
        if mode is not None:
            store = self._metrics[mode]
            for name, values in store.items():
                logs[prefix + name] = float(torch.stack(values).mean())
            store.clear()
        super().log(logs, start_time)

    # ----------------------------------------------------------------------------------------------
    # Checkpoints (the loss state is saved by `LossStateCheckpoints.save_model`)

    def _check_engine(self) -> None:
        """Refuse FSDP settings that accelerate did not turn into FSDP2 (never train silently unsharded)."""
        fsdp_asked = bool(getattr(self.args, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP") == "true"
        if fsdp_asked and not getattr(self, "is_fsdp_enabled", False):
            raise ValueError(
                "FSDP was requested (TrainingArguments.fsdp or an accelerate FSDP config) but accelerate "
                f"runs {self.accelerator.distributed_type} instead: accelerate (1.16) ignores FSDP settings "
                "on CPU and would train with DDP, unsharded. Run on GPUs, or use DeepSpeed ZeRO-3 on CPU "
                "(configs/accelerate/zero3.yaml), or drop the FSDP settings to train with DDP knowingly."
            )
        if getattr(self, "is_fsdp_enabled", False) and not getattr(self.accelerator, "is_fsdp2", True):
            raise ValueError(
                "FSDP version 1 is not supported by prefloss (its flat parameters give the LM head no "
                "per-parameter gather): set fsdp_version: 2 in the accelerate config "
                "(fsdp_config={'fsdp_version': 2} in TrainingArguments)"
            )

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        self._check_engine()
        self._step_loss, self._last_step_loss, self._nonfinite_steps = None, None, 0
        resume_from_checkpoint = self._resume_loss_state(resume_from_checkpoint)
        if resume_from_checkpoint:
            finished = self._finished_checkpoint(resume_from_checkpoint)
            if finished is not None:
                return finished
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _finished_checkpoint(self, checkpoint: str) -> TrainOutput | None:
        """A checkpoint at or past ``max_steps``: load it and train nothing (transformers would train
        one more step). ``None`` when there are steps left to train."""
        state_path = os.path.join(checkpoint, "trainer_state.json")
        if self.args.max_steps <= 0 or not os.path.isfile(state_path):
            return None
        state = TrainerState.load_from_json(state_path)
        if state.global_step < self.args.max_steps:
            return None
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            raise ValueError(
                f"checkpoint {checkpoint!r} is at step {state.global_step}, which already reached "
                f"max_steps={self.args.max_steps}: nothing to train; raise max_steps to train further"
            )
        warnings.warn(
            f"checkpoint {checkpoint!r} is at step {state.global_step}, which already reached "
            f"max_steps={self.args.max_steps}: nothing to train (the model, loss state and trainer state "
            "are the checkpoint's); raise max_steps to train further",
            stacklevel=3,
        )
        self._load_from_checkpoint(checkpoint)
        self.state = state
        return TrainOutput(state.global_step, float("nan"), {"train_steps_this_run": 0})
