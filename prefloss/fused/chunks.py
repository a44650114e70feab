"""Counted rows, chunk by chunk: the row bookkeeping both backends' loops share.

The fused op only computes rows whose label counts. Instead of copying those rows out of
``hidden`` up front (an ``[n, H]`` copy per model that grows with the sequence length), each chunk
gathers its own rows and the backward writes each chunk's ``∂hidden`` rows straight into the
``[N, H]`` gradient, so the extra memory stays one chunk's worth.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CountedRows:
    """Which rows of a flattened ``[N, H]`` input have a counted label.

    Attributes:
        index: ``[n]`` int64 positions in ``[0, N)``, ascending; ``None`` when every row counts
            (then chunks are plain slices, no copies).
        count: ``n``, the number of counted rows.
    """

    index: torch.Tensor | None
    count: int

    def chunks(self, size: int) -> Iterator[tuple[int, int]]:
        """``(r0, r1)`` bounds of consecutive chunks of at most ``size`` counted rows."""
        for r0 in range(0, self.count, size):
            yield r0, min(r0 + size, self.count)

    def take(self, x: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Counted rows ``r0:r1`` of the ``[N, ...]`` tensor ``x`` (a view when nothing is ignored)."""
        return x[r0:r1] if self.index is None else x.index_select(0, self.index[r0:r1])

    def put_(self, out: torch.Tensor, r0: int, r1: int, values: torch.Tensor) -> None:
        """Write ``values`` (``[r1 − r0, ...]``) into counted rows ``r0:r1`` of the ``[N, ...]`` ``out``."""
        if self.index is None:
            out[r0:r1] = values
        else:
            out.index_copy_(0, self.index[r0:r1], values.to(out.dtype))

    def new_grad(self, like: torch.Tensor) -> torch.Tensor:
        """The ``[N, ...]`` gradient buffer: zeros where rows are ignored, filled by `put_`."""
        return torch.empty_like(like) if self.index is None else torch.zeros_like(like)


def new_grads(hidden, weight, rows: CountedRows, need, acc_dtype):
    """The backward's outputs, ``(∂hidden [N, H], ∂weight [V, H], ∂bias [V])``, ``None`` where
    ``need`` (three booleans) says so; ∂weight and ∂bias in ``acc_dtype`` (they accumulate)."""
    need_h, need_w, need_b = need
    grad_h = rows.new_grad(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if need_b else None
    return grad_h, grad_w, grad_b


@dataclass(frozen=True)
class HeadInputs:
    """What both backends' ``forward`` and ``backward`` take: the policy's head and, optionally,
    the reference's.

    Attributes:
        hidden: ``[N, H]`` policy hidden states (every row, counted or not).
        weight: ``[V, H]`` policy LM-head weight; ``bias``: ``[V]`` or ``None``.
        labels: ``[n]`` the counted rows' labels, in the order of ``rows``.
        rows: which rows of ``hidden`` count (`CountedRows`).
        ref_hidden, ref_weight, ref_bias: the reference's ``[N, H]``, ``[V, H]``, ``[V]``; ``None``
            without a reference (and always ``None`` in ``backward``: the reference has no gradient).
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    labels: torch.Tensor
    rows: CountedRows
    ref_hidden: torch.Tensor | None = None
    ref_weight: torch.Tensor | None = None
    ref_bias: torch.Tensor | None = None
