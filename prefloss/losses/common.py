"""What the four losses share: the pair layout, the sigmoid loss, reward metrics, the output type."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from prefloss.ops import SequenceLogProbs, sequence_logprobs


@dataclass
class LossOutput:
    """What a loss module returns.

    Attributes:
        loss: 0-dim mean loss over the pairs of this (micro-)batch, differentiable.
        metrics: name → 0-dim detached tensor; names follow the authors' trainers (docs/losses.md).
        chosen_rewards, rejected_rewards: ``[B]`` detached per-pair rewards, as in the metrics.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    chosen_rewards: torch.Tensor | None = None
    rejected_rewards: torch.Tensor | None = None


def sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``−(1−ls)·log σ(x) − ls·log σ(−x)`` elementwise (the DPO family's loss on a logit ``x``)."""
    if label_smoothing == 0.0:
        return -F.logsigmoid(logits)
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def check_beta(beta) -> None:
    value = float(beta)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"`beta` must be a finite number > 0, got {beta!r}.")


def check_label_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= float(label_smoothing) < 0.5:
        raise ValueError(f"`label_smoothing` must be in [0, 0.5), got {label_smoothing!r}.")


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[2B]`` → (chosen ``[B]``, rejected ``[B]``): rows ``[0, B)`` chosen, ``[B, 2B)`` rejected."""
    half = x.shape[0] // 2
    return x[:half], x[half:]


def check_pair_rows(hidden: torch.Tensor) -> None:
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"`hidden` must be a torch.Tensor, got {type(hidden).__name__}.")
    if hidden.dim() < 3:
        raise ValueError(f"`hidden` must be [2B, T, H] for a pair loss, got shape {tuple(hidden.shape)}.")
    if hidden.shape[0] % 2 != 0 or hidden.shape[0] == 0:
        raise ValueError(
            "`hidden` must have an even, non-zero number of rows (chosen then rejected), "
            f"got {hidden.shape[0]}."
        )


def check_ref_logps(ref_logps: torch.Tensor, rows: int) -> torch.Tensor:
    if not isinstance(ref_logps, torch.Tensor) or not ref_logps.is_floating_point():
        raise TypeError(
            f"`ref_logps` must be a floating tensor of per-row sums [2B], got {type(ref_logps).__name__}."
        )
    if tuple(ref_logps.shape) != (rows,):
        raise ValueError(f"`ref_logps` must have shape [2B] = [{rows}], got {tuple(ref_logps.shape)}.")
    # bf16/fp16 sums are upcast to fp32; float64 ones stay float64 (no rounding of the oracle path)
    return ref_logps.detach().to(torch.promote_types(ref_logps.dtype, torch.float32))


REFERENCE_MODES = ("live_or_precomputed", "live", "none")


def pair_sequences(
    loss: str,
    hidden,
    weight,
    labels,
    *,
    reference: str,
    bias=None,
    ref_hidden=None,
    ref_weight=None,
    ref_bias=None,
    ref_logps=None,
    epsilon=None,
    logit_scale=None,
    softcap=None,
    ignore_index=-100,
    chunk_size=None,
    backend="auto",
) -> SequenceLogProbs:
    """`prefloss.sequence_logprobs` for a pair loss, after checking the ``[2B, T, H]`` layout and
    how the loss takes its reference model.

    Args:
        loss: the loss's class name, for error messages.
        reference: ``"live_or_precomputed"`` (DPO, α-DPO: ``ref_hidden``/``ref_weight`` or
            precomputed per-row sums ``ref_logps [2B]``, which then replace ``.ref``), ``"live"``
            (ε-DPO: hidden states only) or ``"none"`` (SimPO: reference arguments are ignored).
        The rest: as `prefloss.fused_logprobs`.
    """
    check_pair_rows(hidden)
    given_live = ref_hidden is not None or ref_weight is not None
    if reference == "none":
        ref_hidden = ref_weight = ref_bias = ref_logps = None
    elif reference == "live":
        if ref_logps is not None:
            raise ValueError(
                f"{loss} cannot use precomputed `ref_logps`: it mixes policy and reference logits "
                "token by token, so it needs `ref_hidden` and `ref_weight`."
            )
        if ref_hidden is None or ref_weight is None:
            raise ValueError(f"{loss} needs the reference hidden states: pass `ref_hidden` and `ref_weight`.")
    elif reference == "live_or_precomputed":
        if ref_logps is None and not given_live:
            raise ValueError(
                f"{loss} needs the reference: pass `ref_hidden` and `ref_weight`, or `ref_logps`."
            )
        if ref_logps is not None:
            ref_hidden = ref_weight = ref_bias = None
    else:
        raise ValueError(f"`reference` must be one of {REFERENCE_MODES}, got {reference!r}.")
    seq = sequence_logprobs(
        hidden,
        weight,
        labels,
        bias=bias,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        ref_bias=ref_bias,
        epsilon=epsilon,
        logit_scale=logit_scale,
        softcap=softcap,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        backend=backend,
    )
    if ref_logps is not None:
        seq = seq._replace(ref=check_ref_logps(ref_logps, hidden.shape[0]))
    return seq


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """``rewards/{chosen,rejected,accuracies,margins}`` as means over pairs (detached, fp32)."""
    c, r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": c.mean(),
        "rewards/rejected": r.mean(),
        "rewards/accuracies": (c > r).float().mean(),
        "rewards/margins": (c - r).mean(),
    }
