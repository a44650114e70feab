"""Preference data the way TRL users have it: ``prompt`` / ``chosen`` / ``rejected`` columns.

Two row formats, as in TRL:

* plain text: three strings, ``{"prompt": "2+2=", "chosen": "4", "rejected": "5"}``;
* conversational: lists of ``{"role", "content"}`` messages, ``{"prompt": [{"role": "user", ...}],
  "chosen": [{"role": "assistant", ...}], "rejected": [...]}``; the tokenizer's chat template turns
  them into text (the prompt with the generation prompt, each response as the text the template adds
  after it). Conversational data needs a tokenizer with a chat template.

Tokenization (`tokenize_preferences`), following the authors' code (SPEC.md A1/B1):

* prompt and responses are tokenized separately, without the tokenizer's own special tokens; BOS is
  prepended to the prompt when the tokenizer has one and it is missing; EOS is appended to each
  response when missing;
* when prompt + the longer response exceed ``max_length``: the prompt keeps its last
  ``max_prompt_length`` tokens (after BOS) if that is set, then both responses are cut to what is left;
  a prompt that leaves no room for any response token is an error, as is an empty response.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "REQUIRED_COLUMNS",
    "TOKENIZED_COLUMNS",
    "load_preferences",
    "tokenize_preference_row",
    "tokenize_preferences",
]

REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")
TOKENIZED_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
# Precomputed reference log-probs (per-sequence sums), carried through tokenization and collation.
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def load_preferences(source: Any, *, cache_dir: str | None = None) -> Any:
    """A ``datasets.Dataset`` with ``prompt``, ``chosen`` and ``rejected`` columns.

    Args:
        source: a ``datasets.Dataset``, a path to a ``.jsonl``/``.json`` file, or a list of row dicts.
            Already tokenized datasets (`TOKENIZED_COLUMNS`) are returned unchanged.
        cache_dir: where ``datasets`` caches a loaded JSON file.

    Raises:
        ValueError: a required column is missing, the file does not exist or the data is empty.
        TypeError: ``source`` is none of the accepted kinds.
    """
    import datasets

    if isinstance(source, datasets.Dataset):
        dataset = source
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ValueError(f"preference data file {path!r} does not exist; expected a JSONL file")
        dataset = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache_dir)
    elif isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        if not all(isinstance(row, Mapping) for row in source):
            raise TypeError("a list of preference rows must hold dicts with prompt/chosen/rejected keys")
        dataset = datasets.Dataset.from_list([dict(row) for row in source])
    else:
        raise TypeError(
            "preference data must be a datasets.Dataset, a path to a JSONL file or a list of dicts, "
            f"got {type(source).__name__}"
        )
    columns = set(dataset.column_names)
    if set(TOKENIZED_COLUMNS) <= columns:
        return dataset
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(
            f"preference data is missing column(s) {missing}: expected columns {list(REQUIRED_COLUMNS)} "
            f"(TRL's explicit-prompt format), got {sorted(columns)}"
        )
    if len(dataset) == 0:
        raise ValueError("preference data has no rows")
    return dataset


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list)


def _check_messages(value: Any, column: str, index: int) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"row {index}: {column!r} must be a non-empty list of messages, got {value!r:.80}")
    for message in value:
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise TypeError(
                f"row {index}: every message in {column!r} must be a dict with 'role' and 'content', "
                f"got {message!r:.80}"
            )
    return [dict(m) for m in value]


def _render_conversation(row: Mapping[str, Any], tokenizer: Any, index: int) -> tuple[str, str, str]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"row {index} is conversational (lists of messages) but the tokenizer "
            f"{type(tokenizer).__name__} has no chat template; set tokenizer.chat_template or use "
            "plain-text prompt/chosen/rejected strings"
        )
    prompt = _check_messages(row["prompt"], "prompt", index)
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    responses = []
    for column in ("chosen", "rejected"):
        messages = _check_messages(row[column], column, index)
        if not any(str(m["content"]).strip() for m in messages):
            raise ValueError(f"row {index}: {column!r} is an empty response (no message content)")
        full = tokenizer.apply_chat_template(prompt + messages, tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError(
                f"row {index}: the chat template does not render prompt + {column} as an extension of "
                "the prompt with its generation prompt, so the response cannot be separated"
            )
        responses.append(full[len(prompt_text) :])
    return prompt_text, responses[0], responses[1]


def tokenize_preference_row(
    row: Mapping[str, Any],
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    index: int = 0,
) -> dict[str, list[int]]:
    """Token ids of one preference row: ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids``.

    Args:
        row: ``prompt``, ``chosen``, ``rejected`` (all strings or all message lists).
        tokenizer: a Hugging Face tokenizer.
        max_length: the most tokens of prompt + response.
        max_prompt_length: keep only the prompt's last tokens when the pair is too long (``None``: never
            cut the prompt).
        index: row number, for error messages.

    Raises:
        ValueError: empty response, prompt too long for ``max_length``, wrong message structure.
        TypeError: a column has the wrong type.
    """
    kinds = {c: type(row[c]).__name__ for c in REQUIRED_COLUMNS}
    if all(isinstance(row[c], str) for c in REQUIRED_COLUMNS):
        prompt_text, chosen_text, rejected_text = row["prompt"], row["chosen"], row["rejected"]
        for column, text in (("chosen", chosen_text), ("rejected", rejected_text)):
            if not text.strip():
                raise ValueError(f"row {index}: {column!r} is an empty response ({text!r})")
    elif all(_is_conversation(row[c]) for c in REQUIRED_COLUMNS):
        prompt_text, chosen_text, rejected_text = _render_conversation(row, tokenizer, index)
    else:
        raise TypeError(
            f"row {index}: prompt, chosen and rejected must be all strings (plain text) or all lists of "
            f"messages (conversational), got {kinds}"
        )

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no EOS token; responses must end with one"
        )

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    prompt = encode(prompt_text)
    if bos is not None and (not prompt or prompt[0] != bos):
        prompt = [bos, *prompt]
    if not prompt:
        raise ValueError(
            f"row {index}: the prompt has no tokens and the tokenizer has no BOS token, so the first "
            "response token cannot be scored"
        )
    responses = []
    for column, text in (("chosen", chosen_text), ("rejected", rejected_text)):
        ids = encode(text)
        if not ids:
            raise ValueError(f"row {index}: {column!r} tokenizes to no tokens ({text!r:.80})")
        if ids[-1] != eos:
            ids.append(eos)
        responses.append(ids)
    chosen, rejected = responses

    if len(prompt) + max(len(chosen), len(rejected)) > max_length:
        if max_prompt_length is not None and len(prompt) > max_prompt_length:
            keep_bos = bos is not None and prompt[0] == bos
            tail = max_prompt_length - 1 if keep_bos else max_prompt_length
            prompt = ([bos] if keep_bos else []) + prompt[len(prompt) - tail :]
        if len(prompt) >= max_length:
            hint = (
                "set max_prompt_length below max_length to keep only the prompt's end"
                if max_prompt_length is None
                else f"max_prompt_length={max_prompt_length} must be below max_length"
            )
            raise ValueError(
                f"row {index}: the prompt has {len(prompt)} tokens, which leaves no room for a response "
                f"within max_length={max_length}; {hint}"
            )
        room = max_length - len(prompt)
        chosen, rejected = chosen[:room], rejected[:room]
    return {"prompt_input_ids": prompt, "chosen_input_ids": chosen, "rejected_input_ids": rejected}


def tokenize_preferences(
    dataset: Any,
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    num_proc: int | None = None,
) -> Any:
    """Tokenize a preference dataset (see the module docstring); keeps precomputed reference columns.

    Args:
        dataset: anything `load_preferences` accepts.
        tokenizer: a Hugging Face tokenizer with an EOS token.
        max_length: the most tokens of prompt + response.
        max_prompt_length: prompt tokens kept (its end) when a pair is too long; ``None`` never cuts.
        num_proc: processes for ``datasets.map``.

    Returns:
        A ``datasets.Dataset`` with `TOKENIZED_COLUMNS` (and ``ref_*_logps`` when present).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if max_prompt_length is not None and not 1 <= max_prompt_length < max_length:
        raise ValueError(
            f"max_prompt_length must be in [1, max_length={max_length}), got {max_prompt_length}"
        )
    dataset = load_preferences(dataset)
    if set(TOKENIZED_COLUMNS) <= set(dataset.column_names):
        return dataset
    keep = set(REFERENCE_COLUMNS)
    remove = [c for c in dataset.column_names if c not in keep]

    def fn(row: dict[str, Any], index: int) -> dict[str, list[int]]:
        return tokenize_preference_row(
            row, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length, index=index
        )

    return dataset.map(
        fn, with_indices=True, remove_columns=remove, num_proc=num_proc, desc="tokenizing preferences"
    )
