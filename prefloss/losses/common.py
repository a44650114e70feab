"""What the four losses share: the pair layout, the sigmoid loss, reward metrics, the output type."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from prefloss.ops import (
    SequenceLogProbs,
    check_backend,
    check_chunk_size,
    check_ignore_index,
    check_number,
    sequence_logprobs,
)


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


def check_beta(beta) -> float:
    return check_number("beta", beta, gt=0, tensors=True)


def check_label_smoothing(label_smoothing) -> float:
    return check_number("label_smoothing", label_smoothing, ge=0, lt=0.5, tensors=True)


def check_options(chunk_size, backend) -> tuple[int | None, str]:
    """A loss constructor's op options, checked when the loss is built (as `prefloss.fused_logprobs`)."""
    return check_chunk_size(chunk_size), check_backend(backend)


def check_responses(loss: str, hidden, labels, ignore_index: int) -> None:
    """Refuse a pair whose chosen or rejected response has no counted token.

    Such a row's log-prob sum (and mean) is 0, the best score there is: the pair would count as
    perfectly learned (SimPO: reward 0, accuracy 1) and move batch statistics, so it is an error.
    This also refuses a batch whose labels are all ``ignore_index`` (the loss's state unchanged).
    One host synchronisation on ``[2B]`` flags, next to the op's own (skipped on ``meta`` tensors).
    Malformed ``labels`` are left to `prefloss.fused_logprobs`' checks.
    """
    if (
        not isinstance(labels, torch.Tensor)
        or labels.device.type == "meta"
        or labels.dim() < 1
        or labels.dtype.is_floating_point
        or labels.dtype.is_complex
        or labels.dtype == torch.bool
        or labels.shape[0] != hidden.shape[0]
    ):
        return
    counted = (labels != ignore_index).reshape(labels.shape[0], -1).any(-1)
    if bool(counted.all()):
        return
    half = labels.shape[0] // 2
    empty = (~counted).nonzero().squeeze(1).tolist()
    named = [f"pair {r % half} {'chosen' if r < half else 'rejected'} (row {r})" for r in empty[:8]]
    more = f" and {len(empty) - 8} more" if len(empty) > 8 else ""
    raise ValueError(
        f"{loss}: {len(empty)} of {labels.shape[0]} responses {'has' if len(empty) == 1 else 'have'} "
        "no counted token (every label is "
        f"`ignore_index` = {ignore_index}): {', '.join(named)}{more}. An empty response would get "
        "log-prob 0, the best possible score; drop those pairs or fix their labels (rows [0, B) of "
        "`labels` are the chosen responses, [B, 2B) the rejected)."
    )


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

    Raises:
        ValueError: a pair whose chosen or rejected response has no counted token (`check_responses`),
            before any log-prob is computed; under torch.distributed only the rank holding that
            pair raises (launchers such as ``torchrun`` then stop the others).
    """
    check_pair_rows(hidden)
    ignore_index = check_ignore_index(ignore_index)
    check_responses(loss, hidden, labels, ignore_index)
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
