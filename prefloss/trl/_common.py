"""What `prefloss.trl`'s DPO and CPO trainers share: labels from TRL's masks, the PEFT reference view,
the checkpointed loss state and the refusal errors."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from prefloss.hf.adapters import AdaptersDisabled
from prefloss.hf.trainer import LOSS_STATE_NAME

__all__ = [
    "AdapterReference",
    "LossState",
    "refuse",
    "shift_completion_labels",
    "shift_labels",
]


def refuse(option: str, value: Any, reason: str, fix: str) -> None:
    """Raise the one error type prefloss.trl uses for a TRL option it does not implement."""
    raise ValueError(f"prefloss.trl does not implement {option}={value!r}: {reason}. {fix}")


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``[B, T]`` unshifted labels (Hugging Face's: ``labels[:, t]`` is token t, ``ignore_index`` where it
    does not count) to prefloss's ``[B, T]`` shifted ones: ``out[:, t] = labels[:, t + 1]`` (the token
    predicted from position t), ``ignore_index`` in the last column."""
    out = torch.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    return out


def shift_completion_labels(
    input_ids: torch.Tensor, completion_mask: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """prefloss's shifted ``[2B, T]`` labels from TRL's batch.

    TRL's ``completion_mask`` is unshifted (``completion_mask[:, t] = 1`` when token t is part of the
    response), so token t counts when it is a response token; it is predicted from position ``t - 1``.
    Position 0 is never predicted (TRL's fused head drops it too).
    """
    return shift_labels(input_ids.masked_fill(completion_mask == 0, ignore_index), ignore_index)


def _use_adapter(model: nn.Module, adapter_name: str | None) -> Any:
    from trl.trainer.utils import use_adapter

    return use_adapter(model, adapter_name)


class AdapterReference(AdaptersDisabled):
    """The reference of a PEFT policy as TRL defines it, as a read-only view of the same model.

    TRL's DPOTrainer runs the reference as the policy with its adapters disabled, or -- when the
    PeftModel came with a trained adapter and no ``ref_model`` -- with the adapter copy TRL names
    ``"ref"`` active. ``adapter_name=None`` is the former (`prefloss.hf.AdaptersDisabled`); a name
    is the latter: the forward runs under that adapter and the head is the adapter's own saved copy
    when ``lm_head`` is in ``modules_to_save``.
    """

    def __init__(self, model: nn.Module, adapter_name: str | None) -> None:
        super().__init__(model)
        object.__setattr__(self, "_adapter_name", adapter_name)

    def get_output_embeddings(self) -> nn.Module:
        if self._adapter_name is None:
            return super().get_output_embeddings()
        head = self._peft.get_output_embeddings()
        saved = getattr(head, "modules_to_save", None)
        if saved is not None and self._adapter_name in saved:
            return saved[self._adapter_name]
        return super().get_output_embeddings()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._adapter_name is None:
            return super().forward(*args, **kwargs)
        was_training = self._peft.training
        self._peft.eval()
        try:
            with _use_adapter(self._peft, self._adapter_name):
                return self._peft(*args, **kwargs)
        finally:
            self._peft.train(was_training)

    def extra_repr(self) -> str:
        name = "disabled" if self._adapter_name is None else f"{self._adapter_name!r} active"
        return f"adapters of {type(self._peft.get_base_model()).__name__}: {name}"


class LossState:
    """Saves the loss module's state (α-DPO's statistics, ε-DPO's β) with every checkpoint and loads it
    on resume, as `prefloss.hf.PreferenceTrainer` does (file `prefloss_loss_state.pt`)."""

    @staticmethod
    def save(loss_fn: nn.Module, output_dir: str) -> None:
        os.makedirs(output_dir, exist_ok=True)
        torch.save(loss_fn.state_dict(), os.path.join(output_dir, LOSS_STATE_NAME))

    @staticmethod
    def load(loss_fn: nn.Module, checkpoint: str) -> None:
        """Load the state from ``checkpoint``; a loss with state refuses a checkpoint without it."""
        path = os.path.join(checkpoint, LOSS_STATE_NAME)
        if os.path.isfile(path):
            loss_fn.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        elif len(loss_fn.state_dict()):
            raise ValueError(
                f"resume_from_checkpoint={checkpoint!r} has no {LOSS_STATE_NAME}: expected a checkpoint "
                f"written by prefloss.trl (the state of {type(loss_fn).__name__}, e.g. ε-DPO's β, would be "
                "lost)"
            )


@torch.no_grad()
def vocab_statistics(
    hidden: torch.Tensor, head: Any, labels: torch.Tensor, *, chunk_rows: int = 256, ignore_index: int = -100
) -> dict[str, torch.Tensor]:
    """Per-row sums over counted tokens of what TRL's metrics read from the full vocabulary.

    For each counted token t (``labels[:, t] != ignore_index``, predicted from ``hidden[:, t]``), with
    ``z = transform(hidden[t] @ W.T + b)``: the entropy ``−Σ_v p_v log p_v``, the mean logit
    ``mean_v z_v`` and whether the label is the argmax. One extra ``N·H·V`` GEMM over the counted rows
    in chunks of ``chunk_rows`` (a ``[chunk_rows, V]`` fp32 buffer), no gradient.

    Args:
        hidden: ``[R, T, H]``; head: an `prefloss.hf.OutputHead` (weight whole, as gathered);
        labels: ``[R, T]`` shifted labels.

    Returns:
        ``entropy``, ``mean_logit``, ``top1``, ``count``: ``[R]`` float32 sums (count: tokens).
    """
    from prefloss.rows import transform_logits

    mask = labels != ignore_index
    rows = mask.nonzero()[:, 0]
    h, y = hidden.detach()[mask], labels[mask]
    weight = head.weight.detach()
    out = {
        k: torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device)
        for k in ("entropy", "mean_logit", "top1")
    }
    for start in range(0, h.shape[0], chunk_rows):
        sl = slice(start, start + chunk_rows)
        z = transform_logits(h[sl] @ weight.T.to(h.dtype), head.bias, head.logit_scale, head.softcap).float()
        logp = torch.log_softmax(z, dim=-1)
        out["entropy"].index_add_(0, rows[sl], -(logp.exp() * logp).sum(-1))
        out["mean_logit"].index_add_(0, rows[sl], z.mean(-1))
        out["top1"].index_add_(0, rows[sl], (z.argmax(-1) == y[sl]).float())
    out["count"] = mask.sum(-1).float()
    return out
