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

Bad data is a `PreferenceDataError` (a ``ValueError``; ``prefloss train`` prints it as one line) whose
message starts with where the row came from: ``data.jsonl:6`` (the file and its 1-based line) for data
read from a file by `load_preferences` -- also after shuffling or splitting, and also for errors found
when tokenizing -- else ``row i`` (its 0-based index in the list or dataset given).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from prefloss.commands.cli_args import InputError

__all__ = [
    "BOS_MODES",
    "OVERLONG_MODES",
    "REQUIRED_COLUMNS",
    "SOURCE_COLUMN",
    "PreferenceDataError",
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
# Where each row read from a file came from, ``path:line`` (1-based), for error messages.
SOURCE_COLUMN = "_source"
_WHERE, _CUT_SAME = "_prefloss_where", "_prefloss_cut_same"  # tokenize_preferences' scratch columns


class PreferenceDataError(InputError):
    """Bad preference data; the message starts with where: ``path:line`` (1-based) or ``row i``."""


class PreferenceDataTypeError(PreferenceDataError, TypeError):
    """Bad preference data of the wrong type (a `PreferenceDataError` and a ``TypeError``)."""


def _source_label(path: str, line: int) -> str:
    return f"{path}:{line}"


def _where(row: Mapping[str, Any], index: int) -> str:
    """Where a row came from: ``path:line`` when it was read from a file, else ``row index`` (0-based)."""
    source = row.get(SOURCE_COLUMN) if isinstance(row, Mapping) else None
    return source if source else f"row {index}"


def _check_row(row: Any, where: str) -> None:
    """One preference row's keys and types, before ``datasets`` sees it (it would name no line)."""
    if not isinstance(row, Mapping):
        raise PreferenceDataTypeError(
            f"{where}: expected a JSON object with keys {', '.join(REQUIRED_COLUMNS)}, "
            f"got {type(row).__name__}"
        )
    for column in REQUIRED_COLUMNS:
        if column not in row:
            raise PreferenceDataError(
                f"{where}: {column!r} is missing (expected keys {', '.join(REQUIRED_COLUMNS)}; "
                f"got {', '.join(map(str, row)) or 'none'})"
            )
    if isinstance(row["prompt"], (str, list)):
        kind = type(row["prompt"])
        expected = (
            "a string, as 'prompt' is (plain text)"
            if kind is str
            else "a list of messages, as 'prompt' is (conversational)"
        )
        bad = [c for c in REQUIRED_COLUMNS if not isinstance(row[c], kind)]
    else:
        expected, bad = "a string (plain text) or a list of messages (conversational)", ["prompt"]
    if bad:
        value = row[bad[0]]
        raise PreferenceDataTypeError(
            f"{where}: {bad[0]!r} must be {expected}, got {type(value).__name__} {value!r:.80}"
        )
    for column in REFERENCE_COLUMNS:
        if column in row:
            value = row[column]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise PreferenceDataError(f"{where}: {column!r} must be a finite number, got {value!r:.80}")


def _read_json_file(path: str) -> list[tuple[int, Any]]:
    """``(line, value)`` for each record of a JSON Lines file, or of a file holding one JSON array.

    Blank lines are skipped. Every error names the file and the 1-based line.
    """
    with open(path, "rb") as f:
        raw_lines = f.read().split(b"\n")
    lines: list[str] = []
    for number, raw in enumerate(raw_lines, start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise PreferenceDataError(
                f"{_source_label(path, number)}: not UTF-8 text (byte {raw[exc.start : exc.start + 1]!r} "
                f"at column {exc.start + 1}); expected UTF-8 JSON Lines"
            ) from None
    text = "\n".join(lines)
    if text.lstrip().startswith("["):
        return _read_json_array(path, text)
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise PreferenceDataError(
                f"{_source_label(path, number)}: invalid JSON ({exc.msg} at column {exc.colno}); expected "
                f"one JSON object per line, got {line.strip()!r:.80}"
            ) from None
    return records


def _read_json_array(path: str, text: str) -> list[tuple[int, Any]]:
    """The items of a file holding one JSON array, each with the line it starts on."""
    decoder = json.JSONDecoder()

    def fail(pos: int, what: str) -> PreferenceDataError:
        line = text.count("\n", 0, pos) + 1
        return PreferenceDataError(f"{_source_label(path, line)}: invalid JSON ({what})")

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    records: list[tuple[int, Any]] = []
    pos = skip(skip(0) + 1)  # past "["
    if pos < len(text) and text[pos] == "]":
        pos += 1
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise fail(exc.pos, exc.msg) from None
            records.append((text.count("\n", 0, pos) + 1, value))
            pos = skip(end)
            if pos < len(text) and text[pos] == ",":
                pos = skip(pos + 1)
                continue
            if pos < len(text) and text[pos] == "]":
                pos += 1
                break
            raise fail(pos, "expected ',' or ']' in the array")
    if skip(pos) != len(text):
        raise fail(skip(pos), "extra data after the array")
    return records


def _load_file(path: str) -> Any:
    import datasets

    records = _read_json_file(path)
    if not records:
        raise PreferenceDataError(
            f"{path}: no preference rows (the file is empty); expected one JSON object per line with keys "
            f"{', '.join(REQUIRED_COLUMNS)}"
        )
    rows = []
    first: dict[str, tuple[str, str]] = {}  # per format-deciding fact: (its value, the line it came from)
    for number, row in records:
        where = _source_label(path, number)
        _check_row(row, where)
        if SOURCE_COLUMN in row:
            raise PreferenceDataError(f"{where}: the key {SOURCE_COLUMN!r} is reserved for prefloss")
        facts = {
            "format": "conversational" if isinstance(row["prompt"], list) else "plain text",
            **{c: "present" if c in row else "absent" for c in REFERENCE_COLUMNS},
        }
        for fact, value in facts.items():
            seen = first.setdefault(fact, (value, where))
            if seen[0] != value:
                what = "row format" if fact == "format" else f"{fact!r}"
                raise PreferenceDataError(
                    f"{where}: {what} is {value}, but {seen[0]} at {seen[1]}; every row must agree"
                )
        rows.append({**row, SOURCE_COLUMN: where})
    try:
        return datasets.Dataset.from_list(rows)
    except Exception as exc:  # e.g. an extra key with a different type on different lines
        raise PreferenceDataError(
            f"{path}: the rows do not form one table ({type(exc).__name__}: {exc}); every line must "
            "have the same keys with the same types"
        ) from exc


def _first_few(places: list[str], n: int = 5) -> str:
    return ", ".join(places[:n]) + (", ..." if len(places) > n else "")


def _warn_identical_pairs(dataset: Any, name: str) -> None:
    """Warn about pairs whose chosen and rejected responses are the same: they carry no preference."""
    sources = dataset[SOURCE_COLUMN] if SOURCE_COLUMN in dataset.column_names else None
    same = [
        sources[i] if sources is not None else f"row {i}"
        for i, (c, r) in enumerate(zip(dataset["chosen"], dataset["rejected"], strict=True))
        if c == r
    ]
    if same:
        warnings.warn(
            f"{name}: {len(same)} of {len(dataset)} preference pairs have chosen == rejected "
            f"({_first_few(same)}); "
            "such a pair gives every loss zero gradient (no preference signal)",
            stacklevel=3,
        )


def load_preferences(source: Any, *, cache_dir: str | None = None) -> Any:
    """A ``datasets.Dataset`` with ``prompt``, ``chosen`` and ``rejected`` columns.

    A file is read and checked here, line by line: every error names the file and its 1-based line
    (``data.jsonl:6: 'rejected' is missing ...``), and each row keeps that location in the
    `SOURCE_COLUMN` column, so that later errors (tokenization, over-long prompts) name it too, also
    after the data is shuffled or split. `tokenize_preferences` drops the column. Blank lines are
    skipped; a file holding one JSON array (``[{...}, {...}]``) is read too. Pairs whose chosen and
    rejected responses are equal are counted in a warning (they train nothing).

    Args:
        source: a ``datasets.Dataset``, a path to a ``.jsonl``/``.json`` file, or a list of row dicts.
            Already tokenized datasets (`TOKENIZED_COLUMNS`) are returned unchanged.
        cache_dir: unused (files are read into memory); kept so that existing calls keep working.

    Raises:
        PreferenceDataError (a ValueError): the file does not exist or is not UTF-8 JSON, a row lacks
            a required key or has the wrong types, or there are no rows.
        TypeError: ``source`` is none of the accepted kinds.
    """
    import datasets

    del cache_dir
    if isinstance(source, datasets.Dataset):
        # A dataset read by this function from a file (it has SOURCE_COLUMN) was checked then.
        dataset, name = source, None if SOURCE_COLUMN in source.column_names else "preference data"
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise PreferenceDataError(f"preference data file {path!r} does not exist; expected a JSONL file")
        dataset, name = _load_file(path), path
    elif isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        if not all(isinstance(row, Mapping) for row in source):
            raise TypeError("a list of preference rows must hold dicts with prompt/chosen/rejected keys")
        for index, row in enumerate(source):
            _check_row(row, _where(row, index))
        dataset, name = datasets.Dataset.from_list([dict(row) for row in source]), "preference data"
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
        raise PreferenceDataError(
            f"preference data is missing column(s) {missing}: expected columns {list(REQUIRED_COLUMNS)} "
            f"(TRL's explicit-prompt format), got {sorted(columns)}"
        )
    if len(dataset) == 0:
        raise PreferenceDataError("preference data has no rows")
    if name is not None:
        _warn_identical_pairs(dataset, name)
    return dataset


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list)


def _check_messages(value: Any, column: str, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise PreferenceDataError(
            f"{where}: {column!r} must be a non-empty list of messages, got {value!r:.80}"
        )
    for message in value:
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise PreferenceDataTypeError(
                f"{where}: every message in {column!r} must be a dict with 'role' and 'content', "
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


def _tokenize_pair_texts(row: Mapping[str, Any], tokenizer: Any, where: str) -> tuple[list[int], ...]:
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
                raise PreferenceDataError(f"{where}: {column!r} is an empty response ({text!r})")
            texts.append(text if text.endswith(eos_text) else text + eos_text)
        prompt = row["prompt"]
        return (
            _ids(tokenizer(prompt)),
            _ids(tokenizer(prompt + texts[0])),
            _ids(tokenizer(prompt + texts[1])),
        )
    if all(_is_conversation(row[c]) for c in REQUIRED_COLUMNS):
        if not getattr(tokenizer, "chat_template", None):
            raise PreferenceDataError(
                f"{where}: the row is conversational (lists of messages) but the tokenizer "
                f"{type(tokenizer).__name__} has no chat template; set tokenizer.chat_template or use "
                "plain-text prompt/chosen/rejected strings"
            )
        prompt = _check_messages(row["prompt"], "prompt", where)

        def render(messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
            return _ids(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs))

        full = []
        for column in ("chosen", "rejected"):
            messages = _check_messages(row[column], column, where)
            if not any(str(m["content"]).strip() for m in messages):
                raise PreferenceDataError(f"{where}: {column!r} is an empty response (no message content)")
            full.append(render(prompt + messages))
        return (render(prompt, add_generation_prompt=True), *full)
    kinds = {c: type(row[c]).__name__ for c in REQUIRED_COLUMNS}
    raise PreferenceDataTypeError(
        f"{where}: prompt, chosen and rejected must be all strings (plain text) or all lists of "
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
        index: the row's 0-based number, for error messages (``row index``) when ``row`` has no
            `SOURCE_COLUMN` (``path:line``, set by `load_preferences` for rows read from a file).

    Raises:
        ValueError: empty response, prompt too long for ``max_length`` (``overlong="error"``), wrong
            message structure, bad ``bos`` / ``overlong``.
        TypeError: a column has the wrong type.
    """
    if bos not in BOS_MODES:
        raise ValueError(f"bos must be one of {BOS_MODES}, got {bos!r}")
    if overlong not in OVERLONG_MODES:
        raise ValueError(f"overlong must be one of {OVERLONG_MODES}, got {overlong!r}")
    where = _where(row, index)
    prompt_ids, chosen_full, rejected_full = _tokenize_pair_texts(row, tokenizer, where)
    split = min(_common_prefix(prompt_ids, chosen_full), _common_prefix(prompt_ids, rejected_full))
    prompt, chosen, rejected = prompt_ids[:split], chosen_full[split:], rejected_full[split:]
    for column, ids in (("chosen", chosen), ("rejected", rejected)):
        if not ids:
            raise PreferenceDataError(f"{where}: {column!r} tokenizes to no tokens after the prompt")

    bos_id = tokenizer.bos_token_id
    if bos == "always":
        if bos_id is None:
            raise ValueError(f"bos='always' but tokenizer {type(tokenizer).__name__} has no BOS token")
        if not prompt or prompt[0] != bos_id:
            prompt = [bos_id, *prompt]
    elif bos == "never" and prompt and bos_id is not None and prompt[0] == bos_id:
        prompt = prompt[1:]
    if not prompt:
        raise PreferenceDataError(
            f"{where}: the prompt has no tokens (and no BOS), so the first response token cannot be "
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
            raise PreferenceDataError(
                f"{where}: the prompt has {len(prompt)} tokens, which leaves no room for a response "
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

    def fn(row: dict[str, Any], index: int) -> dict[str, Any]:
        out = tokenize_preference_row(
            row,
            tokenizer,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            bos=bos,
            overlong=overlong,
            index=index,
        )
        if out is None:  # dropped below
            return {**dict.fromkeys(TOKENIZED_COLUMNS, []), _WHERE: _where(row, index), _CUT_SAME: False}
        # Responses that differ only beyond max_length are the same pair of token sequences.
        cut_same = out["chosen_input_ids"] == out["rejected_input_ids"] and row["chosen"] != row["rejected"]
        return {**out, _WHERE: _where(row, index), _CUT_SAME: cut_same}

    total = len(dataset)
    dataset = dataset.map(
        fn, with_indices=True, remove_columns=remove, num_proc=num_proc, desc="tokenizing preferences"
    )
    where, cut_same = dataset[_WHERE], dataset[_CUT_SAME]
    dataset = dataset.remove_columns([_WHERE, _CUT_SAME])
    same = [w for w, flag in zip(where, cut_same, strict=True) if flag]
    if same:
        warnings.warn(
            f"{len(same)} of {total} preference pairs have chosen and rejected responses that are the same "
            f"tokens once cut to max_length={max_length} ({_first_few(same)}); such a pair gives every "
            "loss zero gradient (no preference signal)",
            stacklevel=2,
        )
    if overlong == "drop":
        dropped_at = [w for w, n in zip(where, dataset["prompt_input_ids"], strict=True) if not n]
        dataset = dataset.filter(lambda row: len(row["prompt_input_ids"]) > 0, num_proc=num_proc)
        dropped = total - len(dataset)
        if dropped:
            warnings.warn(
                f"dropped {dropped} of {total} preference rows whose prompt leaves no room for a response "
                f"within max_length={max_length} (overlong='drop'): {_first_few(dropped_at)}",
                stacklevel=2,
            )
        if len(dataset) == 0:
            raise ValueError(
                f"every one of the {total} rows was dropped as too long for max_length={max_length}"
            )
    return dataset
