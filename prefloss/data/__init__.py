"""Synthetic preference data shipped with prefloss (written by scripts/make_synthetic_preferences.py).

Each row is ``{"prompt", "chosen", "rejected"}`` (plain text). The prompt is an instruction
(``shout`` / ``whisper`` / ``title``) followed by 1-3 words in random letter case; the chosen response
writes the words in the casing the instruction asks for (UPPER / lower / Title), the rejected one in
another casing. The ``eval`` split uses words that never occur in ``train``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SPLITS", "synthetic_preferences_path"]

SPLITS = ("train", "eval")


def synthetic_preferences_path(split: str = "train") -> Path:
    """Path of the shipped JSONL file for ``split`` (``"train"`` or ``"eval"``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {list(SPLITS)}")
    return Path(__file__).resolve().parent / f"synthetic_preferences_{split}.jsonl"
