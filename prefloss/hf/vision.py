"""Image preference data for vision-language models: TRL's format, processed as TRL 1.16 does.

A row holds ``images`` (a list of ``PIL.Image``; or ``image``, one image), ``prompt``, ``chosen`` and
``rejected``, either plain strings (the prompt carries the processor's image placeholder, e.g. LLaVA's
``"<image>"``) or conversational messages (the images go in front of the first user message's text, as
``{"type": "image"}`` parts the processor's chat template renders). As in TRL's ``DPOTrainer``, images
are processed on the fly, batch by batch (`VisionPreferenceCollator`), never stored as pixels.

A batch of B pairs is the `PreferenceCollator` layout (2B right-padded rows ``[prompt | response |
pad]``, rows ``[0, B)`` chosen, ``[B, 2B)`` rejected, the same pair order; ``input_ids``,
``attention_mask``, ``shift_labels``) plus the processor's vision inputs for those 2B rows in row order,
each pair's images twice (its chosen row's, then, B rows later, its rejected row's): ``pixel_values``
and whatever else the processor returns (``image_grid_thw``, ``pixel_attention_mask``,
``image_sizes``, ...). Per-token inputs (Gemma 3's ``token_type_ids``, Qwen-VL's ``mm_token_type_ids``)
follow the rows: the prompt's values, 0 on the response and on padding. `PreferenceTrainer` passes
every key other than ``input_ids``, ``attention_mask`` and ``shift_labels`` to the policy's and the
reference's forward. The tokens are TRL's: the processor tokenizes the prompts (with the images) and
the responses without adding special tokens; no EOS is appended to plain-text responses (TRL's vision
collator does not either); conversational responses are what the chat template adds after the prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from prefloss.hf.collator import pad_rows
from prefloss.hf.data import REQUIRED_COLUMNS, PreferenceDataError

__all__ = [
    "IMAGE_COLUMNS",
    "TOKEN_TYPE_KEYS",
    "VisionPreferenceCollator",
    "check_image_training",
    "is_image_data",
    "load_image_preferences",
]

IMAGE_COLUMNS = ("images", "image")  # TRL's: a list of images, or one image
# Per-token inputs a processor returns beside input_ids: laid out along the rows like them.
TOKEN_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")


def _columns(data: Any) -> set[str]:
    names = getattr(data, "column_names", None)
    if names is not None:
        return set(names)
    if isinstance(data, Sequence) and data and isinstance(data[0], Mapping):
        return set(data[0])
    return set()


def is_image_data(data: Any) -> bool:
    """Whether ``data`` (a ``datasets.Dataset`` or a list of row dicts) is image preference data: it
    has an ``images`` or ``image`` column, as TRL decides."""
    return bool(_columns(data) & set(IMAGE_COLUMNS))


def load_image_preferences(source: Any) -> Any:
    """A ``datasets.Dataset`` of image preference rows (module docstring), checked.

    Args:
        source: a ``datasets.Dataset`` or a list of row dicts.

    Raises:
        PreferenceDataError (a ValueError): a required column is missing, or a row's images are not a
            list (``images``) of images.
        TypeError: ``source`` is neither.
    """
    import datasets

    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        source = datasets.Dataset.from_list([dict(row) for row in source])
    if not isinstance(source, datasets.Dataset):
        raise TypeError(
            "image preference data must be a datasets.Dataset or a list of dicts, got "
            f"{type(source).__name__}"
        )
    columns = set(source.column_names)
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise PreferenceDataError(
            f"image preference data is missing column(s) {missing}: expected columns "
            f"{['images', *REQUIRED_COLUMNS]}, got {sorted(columns)}"
        )
    if len(source) == 0:
        raise PreferenceDataError("image preference data has no rows")
    if "images" in columns:
        for index, images in enumerate(source["images"]):
            if not isinstance(images, list):
                raise PreferenceDataError(
                    f"row {index}: 'images' must be a list of images, got {type(images).__name__}"
                )
    return source


def _multimodal_messages(messages: list[dict[str, Any]], images: int) -> list[dict[str, Any]]:
    """Messages whose string contents become ``[{"type": "text", ...}]``, with ``images``
    ``{"type": "image"}`` parts in front of the first user message's text (TRL's layout)."""
    out, placed = [], False
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
            if message["role"] == "user" and not placed:
                parts = [{"type": "image"} for _ in range(images)] + parts
                placed = True
            message = {**message, "content": parts}
        out.append(message)
    return out


def _texts(row: Mapping[str, Any], processor: Any, images: int) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) texts of one row: as given, or rendered by the chat template."""
    prompt, chosen, rejected = (row[c] for c in REQUIRED_COLUMNS)
    if isinstance(prompt, str):
        return prompt, chosen, rejected
    prompt = _multimodal_messages(prompt, images)
    chosen, rejected = _multimodal_messages(chosen, 0), _multimodal_messages(rejected, 0)
    last = prompt[-1]["role"]
    head = processor.apply_chat_template(
        prompt,
        tokenize=False,
        add_generation_prompt=last != "assistant",
        continue_final_message=last == "assistant",
    )
    full = [processor.apply_chat_template(prompt + r, tokenize=False) for r in (chosen, rejected)]
    shared = 0  # the prompt is the common prefix of all three (a template may alter the last turn)
    for a, b, c in zip(head, *full, strict=False):
        if not a == b == c:
            break
        shared += 1
    return head[:shared], full[0][shared:], full[1][shared:]


@dataclass
class VisionPreferenceCollator:
    """Process and collate image preference rows (module docstring for the batch layout).

    Args:
        processor: the model's processor (``AutoProcessor``), with a tokenizer and a chat template for
            conversational rows.
        max_length: keep each row's first ``max_length`` tokens (``None``: all); a prompt must fit whole
            (its image tokens must not be cut), with room for a response token.
        ignore_index: label of positions that are not scored.
    """

    processor: Any
    max_length: int | None = None
    ignore_index: int = -100

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None:
            raise TypeError(
                "processor must be a Hugging Face processor with a tokenizer, got "
                f"{type(self.processor).__name__}"
            )
        images = [list(f["images"]) if "images" in f else [f["image"]] for f in features]
        texts = [_texts(f, self.processor, len(i)) for f, i in zip(features, images, strict=True)]
        prompts = [t[0] for t in texts] * 2  # chosen rows, then rejected rows
        processed = self.processor(
            images=images * 2 if any(images) else None,
            text=prompts,
            padding=True,
            padding_side="right",
            add_special_tokens=False,
            return_tensors="pt",
        )
        responses = tokenizer([t[1] for t in texts] + [t[2] for t in texts], add_special_tokens=False)[
            "input_ids"
        ]
        prompt_mask = processed["attention_mask"].bool()
        per_token = [k for k in TOKEN_TYPE_KEYS if k in processed]
        rows, types, prompt_lengths = [], {k: [] for k in per_token}, []
        for i, response in enumerate(responses):
            prompt = processed["input_ids"][i][prompt_mask[i]].tolist()
            if not response:
                side = "chosen" if i < len(features) else "rejected"
                raise PreferenceDataError(f"row {i % len(features)}: {side!r} tokenizes to no tokens")
            if self.max_length is not None and len(prompt) >= self.max_length:
                raise PreferenceDataError(
                    f"row {i % len(features)}: the prompt has {len(prompt)} tokens (with its image tokens), "
                    f"which leaves no room for a response within max_length={self.max_length}; raise "
                    "max_length (a vision prompt is never cut: its image tokens must stay whole)"
                )
            row = (prompt + list(response))[: self.max_length]
            rows.append(row)
            prompt_lengths.append(len(prompt))
            for key in per_token:
                values = processed[key][i][prompt_mask[i]].tolist()
                types[key].append((values + [0] * len(response))[: len(row)])
        length = max(len(r) for r in rows)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        n = len(rows)
        batch = dict(processed)
        batch.update(pad_rows(rows, prompt_lengths, length, pad_id, self.ignore_index))
        for key in per_token:
            values = torch.zeros((n, length), dtype=processed[key].dtype)
            for i, row in enumerate(types[key]):
                values[i, : len(row)] = torch.tensor(row, dtype=values.dtype)
            batch[key] = values
        return batch


def check_image_training(
    processing_class: Any, *, precompute_ref_log_probs: bool, padding_free: bool
) -> None:
    """Refuse what `PreferenceTrainer` cannot do with image preference data (as TRL refuses it).

    Raises:
        ValueError: ``processing_class`` is not a processor with a tokenizer, or
            ``precompute_ref_log_probs`` or ``padding_free`` is set; each names the setting.
    """
    if getattr(processing_class, "tokenizer", None) is None:
        raise ValueError(
            "image preference data needs the model's processor as processing_class (AutoProcessor: it "
            f"turns images into pixel values and image tokens), got {type(processing_class).__name__}"
        )
    if precompute_ref_log_probs:
        raise ValueError(
            "precompute_ref_log_probs=True is not supported with image preference data (images are "
            "processed batch by batch, as TRL does, which refuses it too); expected False"
        )
    if padding_free:
        raise ValueError(
            "padding_free=True is not supported with image preference data: a batch's vision inputs "
            "(pixel_values, token_type_ids, ...) belong to its rows, which packing would not follow; "
            "expected False"
        )
