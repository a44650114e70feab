"""Preference data the way TRL users have it: ``prompt`` / ``chosen`` / ``rejected`` columns.

Two row formats, as in TRL:

* plain text: three strings, ``{"prompt": "2+2=", "chosen": "4", "rejected": "5"}``;
* conversational: lists of ``{"role", "content"}`` messages, ``{"prompt": [{"role": "user", ...}],
  "chosen": [{"role": "assistant", ...}], "rejected": [...]}``; the tokenizer's chat template turns
  them into text (the prompt with the generation prompt, each response as the text the template adds
  after it). Conversational data needs a tokenizer with a chat template.

Tokenization (`tokenize_preferences`), as TRL's ``DPOTrainer`` (1.16) does it, so that both give the
same tokens:

* plain text: EOS (as text) is appended to each response that does not end with it; ``prompt`` and
  ``prompt + response`` are tokenized with the tokenizer's own special-token handling (so BOS is
  there exactly when the tokenizer adds it); the response is what follows the longest common prefix
  of the tokenized prompt and the tokenized prompt + response;
* conversational: the same with the chat template (prompt with the generation prompt, prompt +
  response); no EOS is added -- the template closes the turn (adding one to a template that ends a
  turn with EOS + newline would score a second EOS the model never sees);
* ``bos="always"`` / ``"never"`` force or remove a leading BOS of the prompt (``"tokenizer"``: leave it);
* when prompt + the longer response exceed ``max_length``: the prompt keeps its last
  ``max_prompt_length`` tokens (its BOS kept) if that is set, then both responses are cut to what is
  left. A prompt that leaves no room for any response token is an error, or, with
  ``overlong="drop"``, the row is dropped (counted in a warning, as TRL drops it); an empty response
  is an error.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "BOS_MODES",
    "OVERLONG_MODES",
    "REQUIRED_COLUMNS",
    "TOKENIZED_COLUMNS",
    "load_preferences",
    "tokenize_preference_row",
    "tokenize_preferences",
]

REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")
TOKENIZED_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
BOS_MODES = ("tokenizer", "always", "never")
OVERLONG_MODES = ("error", "drop")
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


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _ids(encoded: Any) -> list[int]:
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) or hasattr(encoded, "keys") else encoded
    return list(ids)


def _tokenize_pair_texts(row: Mapping[str, Any], tokenizer: Any, index: int) -> tuple[list[int], ...]:
    """(prompt, prompt + chosen, prompt + rejected) token ids, TRL's way (see the module docstring)."""
    if all(isinstance(row[c], str) for c in REQUIRED_COLUMNS):
        eos_text = tokenizer.eos_token
        if eos_text is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no EOS token; plain-text responses must end "
                "with one"
            )
        texts = []
        for column in ("chosen", "rejected"):
            text = row[column]
            if not text.strip():
                raise ValueError(f"row {index}: {column!r} is an empty response ({text!r})")
            texts.append(text if text.endswith(eos_text) else text + eos_text)
        prompt = row["prompt"]
        return (
            _ids(tokenizer(prompt)),
            _ids(tokenizer(prompt + texts[0])),
            _ids(tokenizer(prompt + texts[1])),
        )
    if all(_is_conversation(row[c]) for c in REQUIRED_COLUMNS):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"row {index} is conversational (lists of messages) but the tokenizer "
                f"{type(tokenizer).__name__} has no chat template; set tokenizer.chat_template or use "
                "plain-text prompt/chosen/rejected strings"
            )
        prompt = _check_messages(row["prompt"], "prompt", index)

        def render(messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
            return _ids(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs))

        full = []
        for column in ("chosen", "rejected"):
            messages = _check_messages(row[column], column, index)
            if not any(str(m["content"]).strip() for m in messages):
                raise ValueError(f"row {index}: {column!r} is an empty response (no message content)")
            full.append(render(prompt + messages))
        return (render(prompt, add_generation_prompt=True), *full)
    kinds = {c: type(row[c]).__name__ for c in REQUIRED_COLUMNS}
    raise TypeError(
        f"row {index}: prompt, chosen and rejected must be all strings (plain text) or all lists of "
        f"messages (conversational), got {kinds}"
    )


def tokenize_preference_row(
    row: Mapping[str, Any],
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    bos: str = "tokenizer",
    overlong: str = "error",
    index: int = 0,
) -> dict[str, list[int]] | None:
    """Token ids of one preference row: ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids``.

    Args:
        row: ``prompt``, ``chosen``, ``rejected`` (all strings or all message lists).
        tokenizer: a Hugging Face tokenizer.
        max_length: the most tokens of prompt + response.
        max_prompt_length: keep only the prompt's last tokens when the pair is too long (``None``: never
            cut the prompt).
        bos: ``"tokenizer"`` (default: BOS as the tokenizer or chat template puts it), ``"always"``
            (prepend it when missing), ``"never"`` (remove a leading one).
        overlong: ``"error"`` (default) or ``"drop"`` (return ``None``) for a prompt that leaves no room
            for a response token within ``max_length``.
        index: row number, for error messages.

    Raises:
        ValueError: empty response, prompt too long for ``max_length`` (``overlong="error"``), wrong
            message structure, bad ``bos`` / ``overlong``.
        TypeError: a column has the wrong type.
    """
    if bos not in BOS_MODES:
        raise ValueError(f"bos must be one of {BOS_MODES}, got {bos!r}")
    if overlong not in OVERLONG_MODES:
        raise ValueError(f"overlong must be one of {OVERLONG_MODES}, got {overlong!r}")
    prompt_ids, chosen_full, rejected_full = _tokenize_pair_texts(row, tokenizer, index)
    split = min(_common_prefix(prompt_ids, chosen_full), _common_prefix(prompt_ids, rejected_full))
    prompt, chosen, rejected = prompt_ids[:split], chosen_full[split:], rejected_full[split:]
    for column, ids in (("chosen", chosen), ("rejected", rejected)):
        if not ids:
            raise ValueError(f"row {index}: {column!r} tokenizes to no tokens after the prompt")

    bos_id = tokenizer.bos_token_id
    if bos == "always":
        if bos_id is None:
            raise ValueError(f"bos='always' but tokenizer {type(tokenizer).__name__} has no BOS token")
        if not prompt or prompt[0] != bos_id:
            prompt = [bos_id, *prompt]
    elif bos == "never" and prompt and bos_id is not None and prompt[0] == bos_id:
        prompt = prompt[1:]
    if not prompt:
        raise ValueError(
            f"row {index}: the prompt has no tokens (and no BOS), so the first response token cannot be "
            "scored; use bos='always' with a tokenizer that has a BOS token"
        )

    if len(prompt) + max(len(chosen), len(rejected)) > max_length:
        if max_prompt_length is not None and len(prompt) > max_prompt_length:
            keep_bos = bos_id is not None and prompt[0] == bos_id
            tail = max_prompt_length - 1 if keep_bos else max_prompt_length
            prompt = ([bos_id] if keep_bos else []) + prompt[len(prompt) - tail :]
        if len(prompt) >= max_length:
            if overlong == "drop":
                return None
            hint = (
                "set max_prompt_length below max_length to keep only the prompt's end"
                if max_prompt_length is None
                else f"max_prompt_length={max_prompt_length} must be below max_length"
            )
            raise ValueError(
                f"row {index}: the prompt has {len(prompt)} tokens, which leaves no room for a response "
                f"within max_length={max_length}; {hint}, or drop such rows with overlong='drop'"
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
    bos: str = "tokenizer",
    overlong: str = "error",
    num_proc: int | None = None,
) -> Any:
    """Tokenize a preference dataset (see the module docstring); keeps precomputed reference columns.

    Args:
        dataset: anything `load_preferences` accepts.
        tokenizer: a Hugging Face tokenizer with an EOS token.
        max_length: the most tokens of prompt + response.
        max_prompt_length: prompt tokens kept (its end) when a pair is too long; ``None`` never cuts.
        bos: ``"tokenizer"``, ``"always"`` or ``"never"`` (`tokenize_preference_row`).
        overlong: ``"error"`` or ``"drop"``: rows whose prompt leaves no room for a response are an
            error, or are dropped with a warning that counts them.
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

    if overlong not in OVERLONG_MODES:
        raise ValueError(f"overlong must be one of {OVERLONG_MODES}, got {overlong!r}")

    def fn(row: dict[str, Any], index: int) -> dict[str, list[int]]:
        out = tokenize_preference_row(
            row,
            tokenizer,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            bos=bos,
            overlong=overlong,
            index=index,
        )
        return out if out is not None else dict.fromkeys(TOKENIZED_COLUMNS, [])  # dropped below

    total = len(dataset)
    dataset = dataset.map(
        fn, with_indices=True, remove_columns=remove, num_proc=num_proc, desc="tokenizing preferences"
    )
    if overlong == "drop":
        dataset = dataset.filter(lambda row: len(row["prompt_input_ids"]) > 0, num_proc=num_proc)
        dropped = total - len(dataset)
        if dropped:
            warnings.warn(
                f"dropped {dropped} of {total} preference rows whose prompt leaves no room for a response "
                f"within max_length={max_length} (overlong='drop')",
                stacklevel=2,
            )
        if len(dataset) == 0:
            raise ValueError(
                f"every one of the {total} rows was dropped as too long for max_length={max_length}"
            )
    return dataset
