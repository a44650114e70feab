"""`prefloss.fused.segments`: the packed (padding-free) layout's helpers.

Expected values are written out by hand or built with plain Python loops over the rows, never with
the functions under test.
"""

from __future__ import annotations

import pytest
import torch

from prefloss.fused.segments import (
    check_cu_seqlens,
    cu_seqlens_from_mask,
    cu_seqlens_from_position_ids,
    pack_rows,
    segment_ids,
    segment_sum,
)

# Right padding, left padding and a hole: each row's real tokens keep their order.
MASK = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 0], [1, 0, 1, 1, 1], [0, 0, 0, 0, 1]])


def test_cu_seqlens_from_mask_by_hand():
    """Row counts 3, 2, 4, 1 → cumulative [0, 3, 5, 9, 10], int64; a bool mask gives the same."""
    cu = cu_seqlens_from_mask(MASK)
    assert cu.dtype == torch.int64
    assert cu.tolist() == [0, 3, 5, 9, 10]
    assert torch.equal(cu_seqlens_from_mask(MASK.bool()), cu)
    assert check_cu_seqlens(cu, 10) is cu


def test_pack_rows_keeps_row_order_and_trailing_dims():
    """``pack_rows`` = the real tokens of each row in increasing position, row after row (a Python
    loop here), with trailing dimensions kept; its gradient is 1 at real tokens and 0 at padding."""
    x = torch.arange(4 * 5 * 2, dtype=torch.float64).reshape(4, 5, 2).requires_grad_()
    expected = torch.stack([x[r, t] for r in range(4) for t in range(5) if MASK[r, t] == 1]).unsqueeze(0)
    packed = pack_rows(x, MASK)
    assert packed.shape == (1, 10, 2)
    assert torch.equal(packed, expected)
    packed.sum().backward()
    assert torch.equal(x.grad, MASK[..., None].double().expand(4, 5, 2))
    ids = torch.arange(20).reshape(4, 5)
    assert pack_rows(ids, MASK).tolist() == [[0, 1, 2, 7, 8, 10, 12, 13, 14, 19]]


def test_segment_ids_and_sum_by_hand():
    """cu = [0, 3, 5, 9, 10]: ids 0,0,0,1,1,2,2,2,2,3; sums of 1..10 per segment = 6, 9, 30, 10;
    bool values are counted (int64); the backward hands each position its segment's gradient."""
    cu = torch.tensor([0, 3, 5, 9, 10])
    assert segment_ids(cu, 10).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
    values = torch.arange(1.0, 11.0, dtype=torch.float64).requires_grad_()
    sums = segment_sum(values[None], cu)
    assert sums.tolist() == [6.0, 9.0, 30.0, 10.0]
    sums.backward(torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64))
    assert values.grad.tolist() == [1.0, 1.0, 1.0, -2.0, -2.0, 0.5, 0.5, 0.5, 0.5, 3.0]
    flags = torch.tensor([True, False, True, True, True, False, False, False, True, True])
    counts = segment_sum(flags, cu)
    assert counts.dtype == torch.int64 and counts.tolist() == [2, 2, 1, 1]


BAD_CU_SEQLENS = {
    # name: (cu_seqlens, total, error type, message fragment)
    "list": ([0, 3, 5], 5, TypeError, "`cu_seqlens` must be a torch.Tensor"),
    "int32": (
        torch.tensor([0, 3, 5], dtype=torch.int32),
        5,
        TypeError,
        "int64 tensor .* got dtype torch.int32",
    ),
    "float": (torch.tensor([0.0, 3.0, 5.0]), 5, TypeError, "got dtype torch.float32"),
    "2-d": (torch.tensor([[0, 3, 5]]), 5, ValueError, r"1-D of shape \[S\+1\].*got shape \(1, 3\)"),
    "no-sequence": (torch.tensor([0]), 0, ValueError, r"S >= 1 sequences, got shape \(1,\)"),
    "not-from-0": (torch.tensor([1, 3, 5]), 5, ValueError, r"start at 0, got cu_seqlens\[0\] = 1"),
    "empty-sequence": (
        torch.tensor([0, 3, 3, 5]),
        5,
        ValueError,
        r"strictly increasing .* cu_seqlens\[1\] = 3 and cu_seqlens\[2\] = 3 \(sequence 1 has length 0\)",
    ),
    "decreasing": (torch.tensor([0, 4, 2, 5]), 5, ValueError, r"sequence 1 has length -2"),
    "short-total": (torch.tensor([0, 3, 4]), 5, ValueError, r"L = 5, got cu_seqlens\[-1\] = 4"),
    "long-total": (torch.tensor([0, 3, 6]), 5, ValueError, r"L = 5, got cu_seqlens\[-1\] = 6"),
}


@pytest.mark.parametrize("case", list(BAD_CU_SEQLENS), ids=list(BAD_CU_SEQLENS))
def test_bad_cu_seqlens(case):
    """Each malformed ``cu_seqlens`` is refused by name, with what was expected and what came, by
    `check_cu_seqlens` and by `segment_sum` (which checks it the same way)."""
    cu, total, error, match = BAD_CU_SEQLENS[case]
    with pytest.raises(error, match=match):
        check_cu_seqlens(cu, total)
    with pytest.raises(error, match=match):
        segment_sum(torch.zeros(total), cu)


BAD_MASKS = {
    "float": (torch.ones(2, 3), TypeError, "integer or bool 0/1 tensor"),
    "1-d": (torch.ones(3, dtype=torch.int64), ValueError, r"2-D \[N, T\], got shape \(3,\)"),
    "not-0-1": (torch.tensor([[1, 2, 0]]), ValueError, "only 0 and 1"),
    "empty-row": (torch.tensor([[1, 1, 0], [0, 0, 0]]), ValueError, "row 1 has no real token"),
}


@pytest.mark.parametrize("case", list(BAD_MASKS), ids=list(BAD_MASKS))
def test_bad_mask(case):
    mask, error, match = BAD_MASKS[case]
    with pytest.raises(error, match=match):
        cu_seqlens_from_mask(mask)


def test_cu_seqlens_from_position_ids_by_hand():
    """Positions 0,1,2 | 0,1 | 0 | 0,1,2,3 → starts 0, 3, 5, 6 and L = 10; ``[L]`` and ``[1, L]``
    alike; a row not starting at 0 is refused by name."""
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]])
    assert cu_seqlens_from_position_ids(pos).tolist() == [0, 3, 5, 6, 10]
    assert cu_seqlens_from_position_ids(pos[0]).tolist() == [0, 3, 5, 6, 10]
    with pytest.raises(ValueError, match="`position_ids` must start at 0"):
        cu_seqlens_from_position_ids(pos[:, 1:])
    with pytest.raises(TypeError, match="`position_ids` must be an integer tensor"):
        cu_seqlens_from_position_ids(pos.float())


def test_pack_rows_and_segment_sum_shape_errors():
    with pytest.raises(ValueError, match=r"`x`.shape\[:2\] must equal `mask`.shape = \(4, 5\)"):
        pack_rows(torch.zeros(4, 6), MASK)
    with pytest.raises(ValueError, match=r"`values` must be \[L\] or \[1, L\], got shape \(2, 5\)"):
        segment_sum(torch.zeros(2, 5), torch.tensor([0, 5]))
