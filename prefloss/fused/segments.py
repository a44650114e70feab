"""Packed (padding-free) batches: ``S`` sequences laid end to end on one token axis of length ``L``.

A packed batch holds no padding: the tokens of sequence ``i`` are positions
``cu_seqlens[i] : cu_seqlens[i+1]`` of a ``[1, L]`` row (the flash-attention "varlen" layout).
``cu_seqlens`` is the ``[S+1]`` int64 tensor of cumulative sequence lengths, ``cu_seqlens[0] = 0``,
strictly increasing (no empty sequence), ``cu_seqlens[S] = L``.

- `check_cu_seqlens`: validate a ``cu_seqlens`` against the packed length;
- `cu_seqlens_from_mask`: the ``cu_seqlens`` of the real tokens of a padded ``[N, T]`` batch;
- `cu_seqlens_from_position_ids`: the ``cu_seqlens`` of a packed row from ``position_ids``
  restarting at 0 for each sequence;
- `pack_rows`: the real tokens of a padded ``[N, T, ...]`` tensor, row after row, as ``[1, L, ...]``;
- `segment_ids`: the sequence index of every packed position;
- `segment_sum`: per-sequence sums over the packed axis (differentiable, memory O(L)).

`prefloss.fused.op.sequence_logprobs` takes ``cu_seqlens`` and reduces its per-token output with
`segment_sum`; `prefloss.hf.packing` builds packed model inputs with `pack_rows`.
"""

from __future__ import annotations

import numbers

import torch


def check_cu_seqlens(cu_seqlens, total: int) -> torch.Tensor:
    """Validate the cumulative sequence lengths of a packed batch of ``total`` tokens.

    Args:
        cu_seqlens: ``[S+1]`` int64 tensor, ``cu_seqlens[0] = 0``, strictly increasing (every
            sequence has at least one token), ``cu_seqlens[S] = total``; ``S >= 1``.
        total: ``L``, the length of the packed token axis.

    Returns:
        ``cu_seqlens`` itself, unchanged.

    Raises:
        TypeError: not a tensor, or not int64.
        ValueError: not 1-D with at least 2 elements, first element not 0, not strictly increasing,
            or last element not ``total``; the message names `cu_seqlens`, what was expected and
            what came (reading the values is one host synchronisation).
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(
            f"`cu_seqlens` must be a torch.Tensor (int64, [S+1] cumulative sequence lengths), "
            f"got {type(cu_seqlens).__name__}."
        )
    if cu_seqlens.dtype != torch.int64:
        raise TypeError(
            f"`cu_seqlens` must be an int64 tensor ([S+1] cumulative sequence lengths), got dtype "
            f"{cu_seqlens.dtype}."
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"`cu_seqlens` must be 1-D of shape [S+1] with S >= 1 sequences, got shape "
            f"{tuple(cu_seqlens.shape)}."
        )
    if isinstance(total, bool) or not isinstance(total, numbers.Integral):
        raise TypeError(f"`total` must be an int (the packed token count L), got {type(total).__name__}.")
    if cu_seqlens.device.type == "meta":  # shapes without values: nothing more to read
        return cu_seqlens
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"`cu_seqlens` must start at 0, got cu_seqlens[0] = {values[0]}.")
    for i, (a, b) in enumerate(zip(values[:-1], values[1:], strict=True)):
        if b <= a:
            raise ValueError(
                f"`cu_seqlens` must be strictly increasing (every sequence non-empty), got "
                f"cu_seqlens[{i}] = {a} and cu_seqlens[{i + 1}] = {b} (sequence {i} has length {b - a})."
            )
    if values[-1] != total:
        raise ValueError(
            f"`cu_seqlens` must end at the packed token count L = {total}, got cu_seqlens[-1] = {values[-1]}."
        )
    return cu_seqlens


def _check_mask(mask) -> torch.Tensor:
    """``mask`` as a bool ``[N, T]`` tensor, else an error naming `mask`."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"`mask` must be a torch.Tensor ([N, T], 0/1), got {type(mask).__name__}.")
    if mask.dim() != 2:
        raise ValueError(f"`mask` must be 2-D [N, T], got shape {tuple(mask.shape)}.")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(f"`mask` must be an integer or bool 0/1 tensor, got dtype {mask.dtype}.")
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("`mask` must hold only 0 and 1.")
    return mask.bool()


def cu_seqlens_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Cumulative sequence lengths of the real tokens of a padded batch.

    ``cu[0] = 0``, ``cu[i+1] = cu[i] + Σ_t mask[i, t]``: row ``i``'s real tokens (right or left
    padding, or any other placement) become sequence ``i`` of the packed batch that `pack_rows`
    builds.

    Args:
        mask: ``[N, T]`` 0/1 (int or bool) attention mask, every row with at least one real token.

    Returns:
        ``[N+1]`` int64 on ``mask``'s device.

    Raises:
        TypeError, ValueError: ``mask`` not a 2-D 0/1 tensor, or a row with no real token (named).
    """
    m = _check_mask(mask)
    lengths = m.sum(1, dtype=torch.int64)
    if m.device.type != "meta" and bool((lengths == 0).any()):
        row = int((lengths == 0).nonzero()[0, 0])
        raise ValueError(f"`mask` row {row} has no real token: a packed batch cannot hold an empty sequence.")
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative sequence lengths of a packed row from its ``position_ids``, restarting at 0 for
    each sequence (what Hugging Face padding-free collators produce, e.g. TRL's
    ``DataCollatorWithFlattening``): a sequence starts wherever ``position_ids[0, t] == 0``.

    Args:
        position_ids: ``[1, L]`` or ``[L]`` integer tensor, ``position_ids[..., 0] == 0``.

    Returns:
        ``[S+1]`` int64 on ``position_ids``' device: the starts, then ``L``.

    Raises:
        TypeError, ValueError: not an integer ``[L]`` / ``[1, L]`` tensor, empty, or not starting at 0
            (named `position_ids`).
    """
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"`position_ids` must be a torch.Tensor, got {type(position_ids).__name__}.")
    if position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
        raise TypeError(f"`position_ids` must be an integer tensor, got dtype {position_ids.dtype}.")
    flat = position_ids[0] if position_ids.dim() == 2 and position_ids.shape[0] == 1 else position_ids
    if flat.dim() != 1 or flat.numel() == 0:
        raise ValueError(
            f"`position_ids` must be [1, L] or [L] with L >= 1, got shape {tuple(position_ids.shape)}."
        )
    if int(flat[0]) != 0:
        raise ValueError(
            f"`position_ids` must start at 0 (the first sequence's first token), got {int(flat[0])}."
        )
    starts = (flat == 0).nonzero().squeeze(1).to(torch.int64)
    return torch.cat([starts, starts.new_full((1,), flat.numel())])


def pack_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The real tokens of a padded batch, row after row: ``[N, T, ...]`` → ``[1, L, ...]``.

    ``out[0, cu[i] + j]`` is the ``j``-th position ``t`` (in increasing ``t``) of row ``i`` with
    ``mask[i, t] = 1``, with ``cu = cu_seqlens_from_mask(mask)`` and ``L = mask.sum()``.

    Args:
        x: ``[N, T, ...]`` any dtype (token ids, labels, hidden states, position ids).
        mask: ``[N, T]`` 0/1 (int or bool).

    Returns:
        ``[1, L, ...]`` tensor of ``x``'s dtype (a copy; differentiable w.r.t. ``x``).
    """
    m = _check_mask(mask)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`x` must be a torch.Tensor, got {type(x).__name__}.")
    if tuple(x.shape[:2]) != tuple(m.shape):
        raise ValueError(
            f"`x`.shape[:2] must equal `mask`.shape = {tuple(m.shape)}, got `x` shape {tuple(x.shape)}."
        )
    return x[m].unsqueeze(0)


def segment_ids(cu_seqlens: torch.Tensor, total: int, *, check: bool = True) -> torch.Tensor:
    """``[L]`` int64: the sequence index ``i`` of every packed position ``cu[i] <= t < cu[i+1]``.

    ``cu_seqlens`` is checked with `check_cu_seqlens` against ``total = L`` (one host
    synchronisation) unless ``check=False`` (the caller has checked it: no synchronisation).
    """
    if check:
        check_cu_seqlens(cu_seqlens, total)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    seq = torch.arange(lengths.numel(), device=cu_seqlens.device)
    return torch.repeat_interleave(seq, lengths, output_size=total)


def segment_sum(
    values: torch.Tensor, cu_seqlens: torch.Tensor, *, ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sequence sums over a packed token axis: ``out[i] = Σ_{cu[i] <= t < cu[i+1]} values[t]``.

    Differentiable w.r.t. ``values`` (the backward broadcasts ``∂out[i]`` to the positions of
    sequence ``i``); extra memory O(L) (one ``[L]`` index), never ``[S, max_len]``.

    Args:
        values: ``[L]`` or ``[1, L]`` (float, or int/bool counted as int64).
        cu_seqlens: ``[S+1]`` int64 cumulative lengths ending at ``L`` (checked with `check_cu_seqlens`).
        ids: ``segment_ids(cu_seqlens, L)`` when the caller already has it (several sums over one
            layout: one check and one index for all); ``cu_seqlens`` is then not checked again.

    Returns:
        ``[S]`` of ``values``' dtype (int64 for bool or integer ``values``).
    """
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"`values` must be a torch.Tensor ([L] or [1, L]), got {type(values).__name__}.")
    if values.dim() == 2 and values.shape[0] == 1:
        values = values[0]
    if values.dim() != 1:
        raise ValueError(f"`values` must be [L] or [1, L], got shape {tuple(values.shape)}.")
    if ids is None:
        ids = segment_ids(cu_seqlens, values.shape[0])
    elif tuple(ids.shape) != (values.shape[0],):
        raise ValueError(f"`ids` must be [L] = [{values.shape[0]}], got shape {tuple(ids.shape)}.")
    if ids.device != values.device:
        raise ValueError(f"`cu_seqlens` must be on `values`' device {values.device}, got {ids.device}.")
    if not values.is_floating_point():
        values = values.to(torch.int64)
    out = values.new_zeros(cu_seqlens.shape[0] - 1)
    return out.index_add(0, ids, values)
