"""Benchmark shapes and the deterministic inputs every case is run on.

Every process (the reference worker and each case's fresh process) rebuilds the same tensors from
the same seed, so the cases are compared on identical inputs without shipping tensors around.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Shape:
    """One benchmark point: ``batch`` pairs (``2·batch`` rows) of ``seq_len`` tokens."""

    batch: int
    seq_len: int
    hidden: int
    vocab: int
    dtype: str = "float32"

    @property
    def rows(self) -> int:
        return 2 * self.batch

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def label(self) -> str:
        return f"B={self.batch} T={self.seq_len} H={self.hidden} V={self.vocab} {self.dtype}"

    def to_dict(self) -> dict:
        return asdict(self)


class Inputs(NamedTuple):
    """``hidden [2B, T, H]`` and ``weight [V, H]`` require grad; the reference model's do not."""

    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor  # [2B, T] int64, -100 on prompt and padding
    ref_hidden: torch.Tensor
    ref_weight: torch.Tensor


def prompt_length(seq_len: int) -> int:
    """The first eighth of every row is prompt (ignored)."""
    return seq_len // 8


def padding_length(row: int, seq_len: int) -> int:
    """Row ``i`` ends with ``(i mod 8)·T/32`` padding positions, so responses differ in length."""
    return (row % 8) * (seq_len // 32)


def make_labels(shape: Shape, generator: torch.Generator, ignore_index: int = -100) -> torch.Tensor:
    labels = torch.randint(0, shape.vocab, (shape.rows, shape.seq_len), generator=generator)
    labels[:, : prompt_length(shape.seq_len)] = ignore_index
    for row in range(shape.rows):
        pad = padding_length(row, shape.seq_len)
        if pad:
            labels[row, shape.seq_len - pad :] = ignore_index
    return labels


def counted_tokens(shape: Shape) -> int:
    """Tokens that count (not prompt, not padding): the rows every exact method must process."""
    keep = shape.seq_len - prompt_length(shape.seq_len)
    return sum(max(0, keep - padding_length(r, shape.seq_len)) for r in range(shape.rows))


def make_inputs(shape: Shape, *, seed: int = 0, device: str | torch.device = "cpu") -> Inputs:
    """Random hidden states and LM heads with logits of std ≈ 2, the reference a perturbed copy.

    The reference differs from the policy (hidden states by 0.3·noise, the head by ~15 %) so that
    α-DPO's margin statistics and ε-DPO's monotonicity test are not degenerate.
    """
    gen = torch.Generator().manual_seed(seed)
    h = shape.hidden
    hidden = torch.randn(shape.rows, shape.seq_len, h, generator=gen)
    weight = torch.randn(shape.vocab, h, generator=gen) * (2.0 / math.sqrt(h))
    ref_hidden = hidden + 0.3 * torch.randn(hidden.shape, generator=gen)
    ref_weight = weight + torch.randn(weight.shape, generator=gen) * (0.3 / math.sqrt(h))
    labels = make_labels(shape, gen)
    dt = shape.torch_dtype
    return Inputs(
        hidden.to(device=device, dtype=dt).requires_grad_(),
        weight.to(device=device, dtype=dt).requires_grad_(),
        labels.to(device),
        ref_hidden.to(device=device, dtype=dt),
        ref_weight.to(device=device, dtype=dt),
    )
