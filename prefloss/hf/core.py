"""What every prefloss trainer shares: `prefloss.hf.PreferenceTrainer` and `prefloss.trl`'s
``DPOTrainer`` / ``CPOTrainer`` build on this module and never on each other.

* the loss: `LOSSES` (each loss's hyperparameters and whether it needs a reference), `build_loss`
  (a loss module from its name and hyperparameters), `loss_name` (the name of a module);
* the loss state in checkpoints: `LossCheckpoint` (``prefloss_loss_state.pt``, and the loss's name in
  ``prefloss_loss.json`` where the trainer records it), saved and loaded by the trainers' mixin
  `LossStateCheckpoints`;
* ε-DPO's β update, once per optimizer step (`attach_loss` adds the callback);
* the output-head check on the first batch (`OutputHeadCheck`; policy and reference must share the
  logit transform: `prefloss.hf.heads.check_logit_transforms`);
* the reference of a PEFT policy, the same model with adapters disabled or a named adapter active
  (`peft_reference`, a `prefloss.hf.adapters.AdapterView`), and the refusal of adapters on the head
  (`check_peft_policy`);
* evaluation that predicts the loss alone (the mixin `LossOnlyPrediction`: no logits are formed).

Imports no TRL: ``import prefloss.hf`` stays TRL-free.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from prefloss.hf.adapters import AdaptersDisabled, AdapterView, check_peft_head, is_peft_model
from prefloss.hf.heads import check_logit_transforms, unwrap_model
from prefloss.hf.model import check_output_head
from prefloss.losses import LOSSES as LOSS_CLASSES

__all__ = [
    "HYPERPARAMETERS",
    "LOSSES",
    "LOSS_NAME_FILE",
    "LOSS_STATE_NAME",
    "LossCheckpoint",
    "LossOnlyPrediction",
    "LossSpec",
    "LossStateCheckpoints",
    "OutputHeadCheck",
    "attach_loss",
    "build_loss",
    "check_logit_transforms",
    "check_peft_policy",
    "checkpoint_loss_name",
    "checkpoint_to_resume",
    "loss_name",
    "peft_reference",
]

LOSS_STATE_NAME = "prefloss_loss_state.pt"
LOSS_NAME_FILE = "prefloss_loss.json"  # {"loss": "<LOSSES name>"}, beside the loss state


# --------------------------------------------------------------------------------------------------
# The loss


class LossSpec(NamedTuple):
    """What the trainer needs to know of a loss beyond its class (`prefloss.losses.LOSSES`)."""

    takes: tuple[str, ...]  # the hyperparameters it accepts
    needs_reference: bool


# Read from the loss classes' attributes (`prefloss.losses.PairLoss`).
LOSSES: dict[str, LossSpec] = {
    name: LossSpec(cls.hyperparameters, cls.needs_reference) for name, cls in LOSS_CLASSES.items()
}
HYPERPARAMETERS = ("beta", "gamma_beta_ratio", "alpha", "epsilon")


def build_loss(
    name: str,
    *,
    beta: float | None = None,
    gamma_beta_ratio: float | None = None,
    alpha: float | None = None,
    epsilon: float | None = None,
    **kwargs: Any,
) -> nn.Module:
    """The prefloss loss module called ``name`` with the given hyperparameters (``None``: its default).

    Raises:
        ValueError: unknown ``name``, or a hyperparameter that ``name`` does not take.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: expected one of {sorted(LOSSES)}")
    takes = LOSSES[name].takes
    given = {"beta": beta, "gamma_beta_ratio": gamma_beta_ratio, "alpha": alpha, "epsilon": epsilon}
    for key, value in given.items():
        if value is not None and key not in takes:
            raise ValueError(f"{key}={value} does not apply to loss {name!r}, which takes {list(takes)}")
    hyper = {k: v for k, v in given.items() if v is not None}
    return LOSS_CLASSES[name](**hyper, **kwargs)


def loss_name(loss_fn: nn.Module) -> str:
    """The `LOSSES` name of a prefloss loss module (``TypeError`` for anything else)."""
    for name, cls in LOSS_CLASSES.items():
        if isinstance(loss_fn, cls):
            return name
    expected = [cls.__name__ for cls in LOSS_CLASSES.values()]
    raise TypeError(f"loss_fn must be one of prefloss's {expected}, got {type(loss_fn).__name__}")


class _BetaUpdate(TrainerCallback):
    """ε-DPO: ``β ← β/(1 + ε·mean s)``, the global β update, once per optimizer step, after all its
    micro-batches; ``record`` takes the update's metrics (``kl/avg_steps``) in the trainer's way."""

    def __init__(self, trainer: Any, record: Callable[[Mapping[str, torch.Tensor]], None]) -> None:
        self.trainer = trainer
        self.record = record

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.record(self.trainer.loss_fn.update_beta())


def attach_loss(
    trainer: Any, record_beta_update: Callable[[Mapping[str, torch.Tensor]], None] | None = None
) -> None:
    """Once the Trainer is built: move ``trainer.loss_fn`` to the trainer's device and, for a loss with
    a β update (ε-DPO), add the callback that runs it once per optimizer step (its metrics go to
    ``record_beta_update``, required then)."""
    trainer.loss_fn.to(trainer.args.device)
    if hasattr(trainer.loss_fn, "update_beta"):
        if record_beta_update is None:
            raise TypeError(f"{type(trainer.loss_fn).__name__} updates β: pass record_beta_update")
        trainer.add_callback(_BetaUpdate(trainer, record_beta_update))


# --------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_loss_name(checkpoint: str | os.PathLike) -> str | None:
    """The loss a `PreferenceTrainer` checkpoint was written with (its ``prefloss_loss.json``), or
    ``None`` for a checkpoint without that file (written before it existed)."""
    path = os.path.join(checkpoint, LOSS_NAME_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)["loss"]


def checkpoint_to_resume(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | bool | None:
    """``train(resume_from_checkpoint=...)``'s argument with ``True`` replaced by the last checkpoint in
    ``output_dir`` (``ValueError`` when there is none)."""
    if resume_from_checkpoint is True:
        resume_from_checkpoint = get_last_checkpoint(output_dir)
        if resume_from_checkpoint is None:
            raise ValueError(f"no checkpoint to resume from in output_dir {output_dir!r}")
    return resume_from_checkpoint


@dataclass(frozen=True)
class LossCheckpoint:
    """How a trainer keeps its loss module's state (α-DPO's running statistics, ε-DPO's β) in its
    checkpoints: ``prefloss_loss_state.pt`` (`LOSS_STATE_NAME`) beside the model, loaded on resume.

    Attributes:
        written_by: the trainer, as the error for a checkpoint without the state names it.
        records_loss: also record the loss's name (``prefloss_loss.json``, `LOSS_NAME_FILE`) and check it
            on resume: a checkpoint of another loss is an error naming both, and every checkpoint must
            hold the state, a stateless loss's too (`PreferenceTrainer`). ``False`` (`prefloss.trl`):
            only a loss with state needs the file, which is loaded as it is.
    """

    written_by: str
    records_loss: bool

    def save(self, loss_fn: nn.Module, output_dir: str) -> None:
        os.makedirs(output_dir, exist_ok=True)
        torch.save(loss_fn.state_dict(), os.path.join(output_dir, LOSS_STATE_NAME))
        if self.records_loss:
            with open(os.path.join(output_dir, LOSS_NAME_FILE), "w") as f:
                json.dump({"loss": loss_name(loss_fn)}, f)

    def load(self, loss_fn: nn.Module, checkpoint: str | os.PathLike) -> None:
        """Load the state from ``checkpoint`` into ``loss_fn``.

        Raises:
            ValueError: the checkpoint has no state (and needs one), or was written with another loss.
        """
        path = os.path.join(checkpoint, LOSS_STATE_NAME)
        if not os.path.isfile(path):
            if not self.records_loss and not len(loss_fn.state_dict()):
                return
            raise ValueError(
                f"checkpoint {checkpoint!r} has no {LOSS_STATE_NAME}: expected a checkpoint written by "
                f"{self.written_by} (the state of {type(loss_fn).__name__}, e.g. ε-DPO's β, would be lost)"
            )
        if not self.records_loss:
            loss_fn.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return
        kind, saved_kind = loss_name(loss_fn), checkpoint_loss_name(checkpoint)
        if saved_kind is not None and saved_kind != kind:
            raise ValueError(
                f"checkpoint {str(checkpoint)!r} was written by a run with loss {saved_kind!r}, but this "
                f"trainer's loss is {kind!r}: resume with loss {saved_kind!r}, or train {kind!r} from "
                "scratch in another output_dir"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)  # load_state_dict copies
        try:
            loss_fn.load_state_dict(state)
        except RuntimeError as exc:  # a checkpoint without prefloss_loss.json, of another loss
            raise ValueError(
                f"the loss state in checkpoint {str(checkpoint)!r} (keys {sorted(state)}) does not fit this "
                f"trainer's loss {kind!r} (keys {sorted(loss_fn.state_dict())}): was it written with "
                "another loss?"
            ) from exc


class LossStateCheckpoints:
    """A ``transformers.Trainer`` mixin (listed before the Trainer class) that saves ``self.loss_fn``'s
    state with every checkpoint (``save_model``) and loads it on resume (`_resume_loss_state`, called
    by the subclass's ``train``), as its class attribute ``loss_checkpoint`` says."""

    loss_checkpoint: LossCheckpoint

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            self.loss_checkpoint.save(self.loss_fn, output_dir)

    def _resume_loss_state(self, resume_from_checkpoint: str | bool | None) -> str | bool | None:
        """``train``'s ``resume_from_checkpoint`` resolved (`checkpoint_to_resume`), the loss state loaded
        from it when there is one."""
        resume_from_checkpoint = checkpoint_to_resume(resume_from_checkpoint, self.args.output_dir)
        if resume_from_checkpoint:
            self.loss_checkpoint.load(self.loss_fn, resume_from_checkpoint)
        return resume_from_checkpoint


# --------------------------------------------------------------------------------------------------
# Models


class OutputHeadCheck:
    """`check_output_head` of the policy and the reference on the first batch a trainer computes a loss
    on: once the engine holds the models (a ZeRO-3 or FSDP2 model can run its forward only then).

    Args:
        enabled: ``False`` never checks.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.pending = enabled

    def __call__(
        self,
        input_ids: torch.Tensor,
        *models: nn.Module | None,
        mixed_precision: bool,
        attention_mask: torch.Tensor | None = None,
        model_inputs: dict[str, Any] | None = None,
    ) -> None:
        """Check each model (``None``: skipped) on the first 32 tokens of the batch's first row, the first
        time only. ``mixed_precision``: the forwards run under 16-bit autocast (accelerate's
        ``native_amp``), judged as 16-bit weights. With ``model_inputs`` (a vision-language batch's
        ``pixel_values``, ...) the whole batch runs with them and its ``attention_mask``, and the last
        predictions of each row are compared (`check_output_head`)."""
        if not self.pending:
            return
        self.pending = False
        if model_inputs:
            sample, kwargs = input_ids, {"attention_mask": attention_mask, "model_inputs": model_inputs}
        else:
            sample, kwargs = input_ids[:1, :32], {}
        for model in models:
            if model is not None:
                check_output_head(model, sample, mixed_precision=mixed_precision, **kwargs)


def check_peft_policy(model: nn.Module) -> None:
    """For a PEFT policy, refuse adapters on the output head (`prefloss.hf.adapters.check_peft_head`);
    anything else passes."""
    if is_peft_model(model):
        check_peft_head(model)


def peft_reference(policy: nn.Module, adapter_name: str | None = None) -> AdapterView:
    """The reference of a PEFT policy (possibly wrapped): the same model with its adapters disabled
    (`AdaptersDisabled`), or with ``adapter_name`` active instead (TRL's ``"ref"`` adapter)."""
    inner = unwrap_model(policy)
    return AdaptersDisabled(inner) if adapter_name is None else AdapterView(inner, adapter_name)


# --------------------------------------------------------------------------------------------------
# Evaluation


class LossOnlyPrediction:
    """A ``transformers.Trainer`` mixin (listed before the Trainer class) whose ``prediction_step``
    predicts the loss alone (the logits are never formed): ``self._evaluation_loss(model, inputs)`` on
    the prepared inputs, without gradients, inside ``compute_loss_context_manager``. The subclass
    implements ``_evaluation_loss`` (which records the batch's metrics), and may hand a batch to the
    Trainer class's own ``prediction_step`` by returning ``False`` from ``_predicts_loss_only``."""

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> Any:
        if not self._predicts_loss_only():
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self._evaluation_loss(model, inputs)
        return loss.detach(), None, None

    def _predicts_loss_only(self) -> bool:
        return True

    def _evaluation_loss(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError
