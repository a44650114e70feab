"""What the four losses share: the pair layout, the sigmoid loss, reward metrics, the output types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from prefloss.fused.op import check_backend, check_chunk_size, check_number
from prefloss.fused.segments import check_cu_seqlens, segment_ids, segment_sum


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


class PairLosses(NamedTuple):
    """Per-pair outputs of the functional losses, each ``[B]``."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor  # detached
    rejected_rewards: torch.Tensor  # detached


def sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``−(1−ls)·log σ(x) − ls·log σ(−x)`` elementwise (the DPO family's loss on a logit ``x``)."""
    if label_smoothing == 0.0:
        return -F.logsigmoid(logits)
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def check_beta(beta) -> float:
    return check_number("beta", beta, gt=0, tensors=True)


def check_gamma_beta_ratio(gamma_beta_ratio) -> float:
    return check_number("gamma_beta_ratio", gamma_beta_ratio, tensors=True)


def check_label_smoothing(label_smoothing) -> float:
    return check_number("label_smoothing", label_smoothing, ge=0, lt=0.5, tensors=True)


def check_options(chunk_size, backend) -> tuple[int | None, str]:
    """A loss constructor's op options, checked when the loss is built (as `prefloss.fused_logprobs`)."""
    return check_chunk_size(chunk_size), check_backend(backend)


def check_responses(loss: str, hidden, labels, ignore_index: int, cu_seqlens=None) -> None:
    """Refuse a pair whose chosen or rejected response has no counted token.

    Such a row's log-prob sum (and mean) is 0, the best score there is: the pair would count as
    perfectly learned (SimPO: reward 0, accuracy 1) and move batch statistics, so it is an error.
    This also refuses a batch whose labels are all ``ignore_index`` (the loss's state unchanged).
    One host synchronisation on ``[2B]`` flags, next to the op's own (skipped on ``meta`` tensors).
    Malformed ``labels`` are left to `prefloss.fused_logprobs`' checks. With ``cu_seqlens`` (a packed
    ``labels [1, L]``, already checked by `check_packed_pairs`) the responses are its ``2B`` sequences.
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
    if cu_seqlens is None:
        counted = (labels != ignore_index).reshape(labels.shape[0], -1).any(-1)
        where = "rows [0, B) of `labels` are the chosen responses, [B, 2B) the rejected"
        unit = "row"
    else:
        if labels.dim() != 2 or labels.shape[1] != hidden.shape[1]:
            return
        cu = cu_seqlens.to(labels.device)
        ids = segment_ids(cu, labels.shape[1], check=False)  # checked by `check_packed_pairs`
        counted = segment_sum(labels[0] != ignore_index, cu, ids=ids) > 0
        where = "sequences [0, B) of `cu_seqlens` are the chosen responses, [B, 2B) the rejected"
        unit = "sequence"
    if bool(counted.all()):
        return
    responses = counted.shape[0]
    half = responses // 2
    empty = (~counted).nonzero().squeeze(1).tolist()
    named = [f"pair {r % half} {'chosen' if r < half else 'rejected'} ({unit} {r})" for r in empty[:8]]
    more = f" and {len(empty) - 8} more" if len(empty) > 8 else ""
    raise ValueError(
        f"{loss}: {len(empty)} of {responses} responses {'has' if len(empty) == 1 else 'have'} "
        "no counted token (every label is "
        f"`ignore_index` = {ignore_index}): {', '.join(named)}{more}. An empty response would get "
        f"log-prob 0, the best possible score; drop those pairs or fix their labels ({where})."
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


def check_packed_pairs(hidden, cu_seqlens) -> int:
    """A packed pair batch: ``hidden [1, L, H]`` and ``cu_seqlens [2B+1]`` (an even, non-zero number
    of sequences, chosen then rejected, checked by `prefloss.fused.segments.check_cu_seqlens`).
    Returns ``2B``."""
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"`hidden` must be a torch.Tensor, got {type(hidden).__name__}.")
    if hidden.dim() != 3 or hidden.shape[0] != 1:
        raise ValueError(
            "`hidden` must be [1, L, H] with `cu_seqlens` (a packed batch: one row of L tokens), "
            f"got shape {tuple(hidden.shape)}."
        )
    check_cu_seqlens(cu_seqlens, hidden.shape[1])
    sequences = cu_seqlens.shape[0] - 1
    if sequences % 2 != 0:
        raise ValueError(
            "`cu_seqlens` must hold an even number of sequences for a pair loss (B chosen, then B "
            f"rejected), got {sequences} (shape {tuple(cu_seqlens.shape)})."
        )
    return sequences


def check_ref_logps(ref_logps: torch.Tensor, rows: int) -> torch.Tensor:
    if not isinstance(ref_logps, torch.Tensor) or not ref_logps.is_floating_point():
        raise TypeError(
            f"`ref_logps` must be a floating tensor of per-row sums [2B], got {type(ref_logps).__name__}."
        )
    if tuple(ref_logps.shape) != (rows,):
        raise ValueError(f"`ref_logps` must have shape [2B] = [{rows}], got {tuple(ref_logps.shape)}.")
    # bf16/fp16 sums are upcast to fp32; float64 ones stay float64 (no rounding of the oracle path)
    return ref_logps.detach().to(torch.promote_types(ref_logps.dtype, torch.float32))


REFERENCE_ARGUMENTS = ("ref_hidden", "ref_weight", "ref_bias", "ref_logps")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def check_reference(
    loss: str, *, needs_reference: bool, takes_ref_logps: bool, ref_hidden, ref_weight, ref_bias, ref_logps
) -> None:
    """How a pair loss takes its reference model (``loss``: its class name, for the messages).

    ``needs_reference=True`` (DPO, α-DPO, ε-DPO): ``ref_hidden`` and ``ref_weight`` are needed or,
    where ``takes_ref_logps`` (DPO, α-DPO), precomputed per-row sums ``ref_logps [2B]`` instead (the
    reference model's arguments are then not used); ε-DPO refuses ``ref_logps``.
    ``needs_reference=False`` (SimPO): every reference argument is refused.
    Only one of ``ref_hidden``/``ref_weight`` is left to `prefloss.sequence_logprobs`, which names
    the missing one.
    """
    if not needs_reference:
        given = (ref_hidden, ref_weight, ref_bias, ref_logps)
        for arg, value in zip(REFERENCE_ARGUMENTS, given, strict=True):
            if value is not None:
                raise ValueError(
                    f"{loss}: {loss.removesuffix('Loss')} is reference-free (it uses no reference model): "
                    f"expected `{arg}` = None, got {_describe(value)}."
                )
    elif ref_logps is not None and not takes_ref_logps:
        raise ValueError(
            f"{loss} cannot use precomputed `ref_logps`: it mixes policy and reference logits "
            "token by token, so it needs `ref_hidden` and `ref_weight`."
        )
    elif ref_logps is None and not takes_ref_logps and (ref_hidden is None or ref_weight is None):
        raise ValueError(f"{loss} needs the reference hidden states: pass `ref_hidden` and `ref_weight`.")
    elif ref_logps is None and ref_hidden is None and ref_weight is None:
        raise ValueError(f"{loss} needs the reference: pass `ref_hidden` and `ref_weight`, or `ref_logps`.")


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """``rewards/{chosen,rejected,accuracies,margins}`` as means over pairs (detached, fp32)."""
    c, r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": c.mean(),
        "rewards/rejected": r.mean(),
        "rewards/accuracies": (c > r).float().mean(),
        "rewards/margins": (c - r).mean(),
    }
