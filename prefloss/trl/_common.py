"""What `prefloss.trl`'s DPO and CPO trainers share beyond `prefloss.hf.core` (the loss, its state in
checkpoints, the output-head check, the PEFT reference view, evaluation), which they share with
`prefloss.hf.PreferenceTrainer`: labels from TRL's masks, TRL's reward and vocabulary metrics, and the
refusal errors."""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "refuse",
    "reward_metrics",
    "shift_completion_labels",
    "shift_labels",
    "vocab_statistics",
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


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """TRL's reward metrics (its names) from the per-pair rewards ``[B]`` gathered over the ranks."""
    return {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
    }


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
    from prefloss.fused.rows import transform_logits

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
