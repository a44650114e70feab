"""`PairLoss`: what the four loss modules share, so that each loss file holds its formula and state.

A loss module is a `PairLoss` subclass that declares, as class attributes, its registry ``name``,
its ``hyperparameters`` (their defaults are read from its ``__init__``), whether it
``needs_reference``, whether it takes precomputed reference sums (``takes_ref_logps``) and whether
it is ``length_normalised``, and implements `PairLoss.pair_losses`: the per-pair sequence values
in, the per-pair losses and rewards and its own metrics out. `PairLoss.forward` does the rest: the
layout and reference checks, one `prefloss.sequence_logprobs` call, the reward and log-prob metrics.
"""

from __future__ import annotations

import inspect
from types import MappingProxyType
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from prefloss.fused.op import check_ignore_index, sequence_logprobs
from prefloss.losses.common import (
    LossOutput,
    PairLosses,
    check_label_smoothing,
    check_options,
    check_packed_pairs,
    check_pair_rows,
    check_ref_logps,
    check_reference,
    check_responses,
    reward_metrics,
    split_pairs,
)


class PairValues(NamedTuple):
    """One batch's sequence values per pair, each ``[B]``: sums of the counted tokens' log-probs, or
    their means for a ``length_normalised`` loss. ``ref_*`` are the reference's (``None`` for a
    reference-free loss), ``minus_*``/``plus_*`` those under ε-DPO's logit mixtures (``None`` for
    the other losses). Fields in the order of the functional forms' arguments."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    minus_chosen: torch.Tensor | None
    minus_rejected: torch.Tensor | None
    plus_chosen: torch.Tensor | None
    plus_rejected: torch.Tensor | None


def _split(rows: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return (None, None) if rows is None else split_pairs(rows)


class PairLoss(nn.Module):
    """Base of prefloss's preference losses on hidden states (`prefloss.losses.LOSSES`).

    Class attributes of a subclass:
        name: its `prefloss.losses.LOSSES` key (``"dpo"``, ...), also the trainers' ``loss`` value.
        hyperparameters: the formula's hyperparameters (``("beta",)``, ...), which the trainers
            expose; ``defaults`` maps each to its default, read from the subclass's ``__init__``.
        needs_reference: takes the reference model (``False``: reference arguments are refused).
        takes_ref_logps: also accepts the reference as precomputed per-row sums ``ref_logps``.
        length_normalised: its formula reads each response's mean log-prob over its counted tokens
            (sums otherwise).
        epsilon: ε of the logit mixtures `prefloss.sequence_logprobs` computes (ε-DPO's, set per
            instance); ``None``: none.

    Args (keyword-only, the ``**options`` of every subclass):
        label_smoothing: conservative-DPO smoothing ``ls`` in [0, 0.5):
            ``−(1−ls)·log σ(x) − ls·log σ(−x)`` (default 0).
        chunk_size, backend: passed to `prefloss.fused_logprobs`, checked here.

    Every numeric argument must be finite and in range (``ValueError`` naming it otherwise).
    A pair whose chosen or rejected response has no counted token (all labels ``ignore_index``) is
    refused with a ``ValueError`` naming it (its log-prob would be 0, the best score there is).
    """

    name: ClassVar[str]
    hyperparameters: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[MappingProxyType] = MappingProxyType({})
    needs_reference: ClassVar[bool] = True
    takes_ref_logps: ClassVar[bool] = True
    length_normalised: ClassVar[bool] = False
    epsilon: float | None = None

    def __init_subclass__(cls, **kwargs) -> None:
        """Reads ``defaults`` from the class's ``__init__`` (a subclass whose ``__init__`` does not
        list a hyperparameter keeps its parent's default)."""
        super().__init_subclass__(**kwargs)
        empty = inspect.Parameter.empty
        params = inspect.signature(cls.__init__).parameters
        defaults = {h: params[h].default if h in params else empty for h in cls.hyperparameters}
        defaults = {h: cls.defaults.get(h, empty) if v is empty else v for h, v in defaults.items()}
        missing = [h for h, v in defaults.items() if v is empty]
        if missing:
            raise TypeError(
                f"{cls.__name__}.__init__ must take its `hyperparameters` {list(cls.hyperparameters)} "
                f"with defaults, got none for {missing}."
            )
        cls.defaults = MappingProxyType(defaults)

    def __init__(self, *, label_smoothing: float = 0.0, chunk_size=None, backend="auto"):
        super().__init__()
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.chunk_size, self.backend = check_options(chunk_size, backend)

    def pair_losses(self, pairs: PairValues) -> tuple[PairLosses, dict[str, torch.Tensor]]:
        """The loss's formula: per-pair losses and (detached) rewards, each ``[B]``, and the loss's
        own metrics (0-dim detached tensors, after the shared ``rewards/*`` and ``logps/*``)."""
        raise NotImplementedError

    def forward(
        self,
        hidden,
        weight,
        labels,
        *,
        bias=None,
        ref_hidden=None,
        ref_weight=None,
        ref_bias=None,
        ref_logps=None,
        logit_scale=None,
        softcap=None,
        ignore_index=-100,
        cu_seqlens=None,
    ) -> LossOutput:
        """The mean loss of ``B`` pairs from hidden states.

        Args:
            hidden: ``[2B, T, H]`` policy hidden states, rows ``[0, B)`` chosen, ``[B, 2B)`` rejected.
            weight: ``[V, H]`` output head; ``bias``: ``[V]`` or ``None``.
            labels: ``[2B, T]`` target token ids, ``ignore_index`` where a token does not count.
            ref_hidden, ref_weight, ref_bias: the reference model's ``[2B, T, H_ref]``,
                ``[V, H_ref]``, ``[V]`` (losses with ``needs_reference``; refused otherwise).
            ref_logps: ``[2B]`` precomputed reference log-prob sums instead (``takes_ref_logps``;
                a length-normalised loss divides them by each row's counted tokens itself).
            logit_scale, softcap, ignore_index: as `prefloss.fused_logprobs`.
            cu_seqlens: ``[2B+1]`` int64 for a packed (padding-free) batch: ``hidden [1, L, H]``,
                ``labels [1, L]``, ``ref_hidden [1, L, H_ref]``, the ``2B`` sequences end to end,
                ordered as the padded rows (chosen 0..B−1, then rejected 0..B−1), each sequence's
                last label ``ignore_index`` (`prefloss.sequence_logprobs`). ``ref_logps`` stays
                ``[2B]``. Loss, gradients, metrics and loss state equal the padded call's.

        Returns:
            `LossOutput`: the mean loss, ``rewards/{chosen,rejected,accuracies,margins}``,
            ``logps/{chosen,rejected}`` (means of the values the formula reads) and the loss's own
            metrics, the per-pair rewards.

        Raises:
            ValueError: before any log-prob is computed, in this order: ``hidden`` not ``[2B, T, H]``
                with an even, non-zero ``2B`` (packed: not ``[1, L, H]``, or a bad ``cu_seqlens``
                or an odd number of sequences, `common.check_packed_pairs`); a pair whose chosen or
                rejected response has no counted token (`common.check_responses`; under
                torch.distributed only the rank holding that pair raises, and launchers such as
                ``torchrun`` then stop the others);
                a reference argument the loss does not take, or a missing one
                (`common.check_reference`).
        """
        loss = type(self).__name__
        if cu_seqlens is None:
            check_pair_rows(hidden)
            rows = hidden.shape[0]
        else:
            rows = check_packed_pairs(hidden, cu_seqlens)
        ignore_index = check_ignore_index(ignore_index)
        check_responses(loss, hidden, labels, ignore_index, cu_seqlens)
        check_reference(
            loss,
            needs_reference=self.needs_reference,
            takes_ref_logps=self.takes_ref_logps,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            ref_bias=ref_bias,
            ref_logps=ref_logps,
        )
        live = ref_logps is None  # precomputed sums replace the reference model's arguments
        seq = sequence_logprobs(
            hidden,
            weight,
            labels,
            bias=bias,
            ref_hidden=ref_hidden if live else None,
            ref_weight=ref_weight if live else None,
            ref_bias=ref_bias if live else None,
            epsilon=self.epsilon,
            logit_scale=logit_scale,
            softcap=softcap,
            ignore_index=ignore_index,
            chunk_size=self.chunk_size,
            backend=self.backend,
            cu_seqlens=cu_seqlens,
        )
        if not live:
            seq = seq._replace(ref=check_ref_logps(ref_logps, rows))
        if self.length_normalised:
            seq = seq.mean()
        pairs = PairValues(*_split(seq.policy), *_split(seq.ref), *_split(seq.minus), *_split(seq.plus))
        out, extra = self.pair_losses(pairs)
        metrics = reward_metrics(out.chosen_rewards, out.rejected_rewards)
        metrics["logps/chosen"] = pairs.policy_chosen.detach().mean()
        metrics["logps/rejected"] = pairs.policy_rejected.detach().mean()
        metrics.update(extra)
        return LossOutput(out.losses.mean(), metrics, out.chosen_rewards, out.rejected_rewards)
