"""Batches of preference pairs in the layout the losses take: chosen rows first, then rejected.

A batch of B tokenized pairs becomes 2B right-padded rows ``[prompt | response | pad]``:

* ``input_ids``      ``[2B, T]`` int64, padded with ``pad_token_id``; rows ``[0, B)`` are
  prompt+chosen, rows ``[B, 2B)`` prompt+rejected (same pair order);
* ``attention_mask`` ``[2B, T]`` int64, 1 on real tokens;
* ``shift_labels``   ``[2B, T]`` int64, **already shifted**: ``shift_labels[:, t]`` is the token
  predicted from position ``t`` (``input_ids[:, t + 1]``) when that token belongs to the response,
  ``ignore_index`` otherwise (prompt, padding, last column). This is what `prefloss.fused_logprobs`
  and the loss modules take as ``labels`` with the hidden states of ``input_ids``. (Hugging Face's
  ``labels`` are unshifted; the different name keeps ``model(**batch)`` from mis-reading them.)
* ``ref_logps``      ``[2B]`` float32, only when the features carry precomputed reference
  log-probs (``ref_chosen_logps`` / ``ref_rejected_logps``, per-sequence sums).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from prefloss.hf.data import REFERENCE_COLUMNS, TOKENIZED_COLUMNS

__all__ = ["PreferenceCollator", "pad_rows"]


def pad_rows(
    rows: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    length: int,
    pad_token_id: int,
    ignore_index: int,
) -> dict[str, torch.Tensor]:
    """Right-pad ``N`` token rows ``[prompt | response]`` to ``length``: ``input_ids``,
    ``attention_mask`` and ``shift_labels``, each ``[N, length]`` int64 (the layout of the module
    docstring: ``shift_labels[i, t] = rows[i][t + 1]`` for the response tokens, ``ignore_index``
    elsewhere)."""
    n = len(rows)
    input_ids = torch.full((n, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    shift_labels = torch.full((n, length), ignore_index, dtype=torch.long)
    for i, (row, p) in enumerate(zip(rows, prompt_lengths, strict=True)):
        ids = torch.tensor(row, dtype=torch.long)
        input_ids[i, : len(row)] = ids
        attention_mask[i, : len(row)] = 1
        # Position t predicts token t + 1: response tokens row[p:] are predicted from p - 1 ...
        shift_labels[i, p - 1 : len(row) - 1] = ids[p:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "shift_labels": shift_labels}


@dataclass
class PreferenceCollator:
    """Collate tokenized pairs (see the module docstring for the batch layout).

    Args:
        pad_token_id: id written into padding positions (never scored).
        ignore_index: label of positions that are not scored.
        pad_to_multiple_of: round ``T`` up to a multiple of this.
    """

    pad_token_id: int
    ignore_index: int = -100
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        missing = [c for c in TOKENIZED_COLUMNS if c not in features[0]]
        if missing:
            raise ValueError(
                f"features are missing {missing}: expected tokenized pairs with keys "
                f"{list(TOKENIZED_COLUMNS)} (see prefloss.hf.tokenize_preferences), "
                f"got keys {sorted(features[0])}"
            )
        rows: list[list[int]] = []
        prompt_lengths: list[int] = []
        for side in ("chosen_input_ids", "rejected_input_ids"):
            for f in features:
                prompt = list(f["prompt_input_ids"])
                rows.append(prompt + list(f[side]))
                prompt_lengths.append(len(prompt))
        length = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = pad_rows(rows, prompt_lengths, length, self.pad_token_id, self.ignore_index)
        has_ref = [all(c in f and f[c] is not None for c in REFERENCE_COLUMNS) for f in features]
        if any(has_ref):
            if not all(has_ref):
                raise ValueError(
                    "precomputed reference log-probs are present for some pairs of the batch only"
                )
            chosen = [float(f["ref_chosen_logps"]) for f in features]
            rejected = [float(f["ref_rejected_logps"]) for f in features]
            batch["ref_logps"] = torch.tensor(chosen + rejected, dtype=torch.float32)
        return batch
