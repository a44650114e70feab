"""Preference data: loading, tokenization, truncation, collation and bad input (`prefloss.hf.data`).

The tokenizer is prefloss's byte-level one (one token per byte, BOS/EOS/PAD added, a tiny chat
template), so expected token counts are byte counts and can be written down by hand.
"""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from prefloss.hf.collator import PreferenceCollator
from prefloss.hf.data import load_preferences, tokenize_preference_row, tokenize_preferences
from prefloss.hf.tiny import byte_level_tokenizer

TOK = byte_level_tokenizer()
BOS, EOS, PAD = TOK.bos_token_id, TOK.eos_token_id, TOK.pad_token_id


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


def test_plain_text_row() -> None:
    row = {"prompt": "2+2=", "chosen": "4", "rejected": "five"}
    out = tokenize_preference_row(row, TOK, max_length=32)
    assert out["prompt_input_ids"] == [BOS, *ids("2+2=")]
    assert out["chosen_input_ids"] == [*ids("4"), EOS]
    assert out["rejected_input_ids"] == [*ids("five"), EOS]


def test_conversational_row_uses_chat_template() -> None:
    row = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
    }
    out = tokenize_preference_row(row, TOK, max_length=64)
    # The template renders "<|bos|><|user|>hi\n<|assistant|>" and closes the assistant turn with EOS.
    assert out["prompt_input_ids"] == [BOS, *ids("<|user|>hi\n<|assistant|>")]
    assert out["chosen_input_ids"] == [*ids("hello"), EOS]
    assert out["rejected_input_ids"] == [*ids("go away"), EOS]


def test_truncation_keeps_the_prompt_end_and_bos() -> None:
    row = {"prompt": "abcdefghij", "chosen": "xyz", "rejected": "stuvwxyz"}
    # prompt 11 tokens (BOS + 10), longest response 9 (8 + EOS): 20 > 12.
    out = tokenize_preference_row(row, TOK, max_length=12, max_prompt_length=5)
    assert out["prompt_input_ids"] == [BOS, *ids("ghij")]
    assert out["chosen_input_ids"] == [*ids("xyz"), EOS]
    assert out["rejected_input_ids"] == ids("stuvwxy")  # 12 - 5 = 7 tokens: EOS cut
    assert len(out["prompt_input_ids"]) + len(out["rejected_input_ids"]) == 12


def test_responses_are_cut_when_the_prompt_fits() -> None:
    row = {"prompt": "ab", "chosen": "0123456789", "rejected": "x"}
    out = tokenize_preference_row(row, TOK, max_length=8)
    assert out["prompt_input_ids"] == [BOS, *ids("ab")]
    assert out["chosen_input_ids"] == ids("01234")


@pytest.mark.parametrize(
    "row, error, match",
    [
        ({"prompt": "p", "chosen": "", "rejected": "r"}, ValueError, "row 0: 'chosen' is an empty response"),
        ({"prompt": "p", "chosen": "c", "rejected": "   "}, ValueError, "'rejected' is an empty response"),
        (
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "assistant", "content": ""}],
                "rejected": [{"role": "assistant", "content": "r"}],
            },
            ValueError,
            "'chosen' is an empty response",
        ),
        (
            {"prompt": "p", "chosen": ["c"], "rejected": "r"},
            TypeError,
            "all strings.*or all lists of messages",
        ),
        (
            {"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "c"}], "rejected": []},
            TypeError,
            "'role' and 'content'",
        ),
        (
            {"prompt": "x" * 40, "chosen": "c", "rejected": "r"},
            ValueError,
            "prompt has 41 tokens.*max_length=16",
        ),
    ],
    ids=[
        "empty-chosen",
        "blank-rejected",
        "empty-chat-chosen",
        "mixed-types",
        "bad-message",
        "prompt-too-long",
    ],
)
def test_bad_rows_are_errors(row: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        tokenize_preference_row(row, TOK, max_length=16)


def test_conversational_without_chat_template_is_an_error() -> None:
    tok = byte_level_tokenizer(chat_template=False)
    row = {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "c"}],
        "rejected": [{"role": "assistant", "content": "r"}],
    }
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_preference_row(row, tok, max_length=64)


def test_missing_column_is_an_error() -> None:
    data = datasets.Dataset.from_list([{"prompt": "p", "chosen": "c", "response": "r"}])
    with pytest.raises(
        ValueError, match=r"missing column\(s\) \['rejected'\].*got \['chosen', 'prompt', 'response'\]"
    ):
        load_preferences(data)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_length=1), "max_length must be at least 2"),
        (dict(max_length=8, max_prompt_length=8), "max_prompt_length"),
    ],
    ids=["max-length", "max-prompt-length"],
)
def test_bad_lengths_are_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tokenize_preferences([{"prompt": "p", "chosen": "c", "rejected": "r"}], TOK, **kwargs)


def test_bad_source_type_and_missing_file(tmp_path) -> None:
    with pytest.raises(
        TypeError, match="datasets.Dataset, a path to a JSONL file or a list of dicts, got int"
    ):
        load_preferences(3)
    with pytest.raises(ValueError, match="does not exist"):
        load_preferences(str(tmp_path / "nope.jsonl"))


def test_jsonl_dataset_keeps_reference_columns(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    path = tmp_path / "prefs.jsonl"
    rows = [
        {
            "prompt": "a",
            "chosen": "b",
            "rejected": "cc",
            "ref_chosen_logps": -1.0,
            "ref_rejected_logps": -2.0,
        },
        {
            "prompt": "dd",
            "chosen": "e",
            "rejected": "f",
            "ref_chosen_logps": -3.0,
            "ref_rejected_logps": -4.0,
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = tokenize_preferences(str(path), TOK, max_length=16)
    assert sorted(data.column_names) == sorted(
        [
            "prompt_input_ids",
            "chosen_input_ids",
            "rejected_input_ids",
            "ref_chosen_logps",
            "ref_rejected_logps",
        ]
    )
    batch = PreferenceCollator(pad_token_id=PAD)([data[0], data[1]])
    torch.testing.assert_close(batch["ref_logps"], torch.tensor([-1.0, -3.0, -2.0, -4.0]))


def test_collator_layout() -> None:
    """Chosen rows first, right padding, labels shifted: position t scores token t+1 of the response."""
    rows = [
        {"prompt": "ab", "chosen": "c", "rejected": "dde"},
        {"prompt": "f", "chosen": "gh", "rejected": "i"},
    ]
    data = tokenize_preferences(rows, TOK, max_length=16)
    batch = PreferenceCollator(pad_token_id=PAD)([data[0], data[1]])
    a, b, c, d, e, f, g, h, i = (ids(x)[0] for x in "abcdefghi")
    x = -100
    expected_ids = [
        [BOS, a, b, c, EOS, PAD, PAD],  # pair 0, chosen
        [BOS, f, g, h, EOS, PAD, PAD],  # pair 1, chosen
        [BOS, a, b, d, d, e, EOS],  # pair 0, rejected
        [BOS, f, i, EOS, PAD, PAD, PAD],  # pair 1, rejected
    ]
    expected_labels = [
        [x, x, c, EOS, x, x, x],
        [x, g, h, EOS, x, x, x],
        [x, x, d, d, e, EOS, x],
        [x, i, EOS, x, x, x, x],
    ]
    assert batch["input_ids"].tolist() == expected_ids
    assert batch["shift_labels"].tolist() == expected_labels
    assert batch["attention_mask"].tolist() == [[int(t != PAD) for t in row] for row in expected_ids]
    assert "ref_logps" not in batch


def test_collator_pad_to_multiple_and_bad_features() -> None:
    data = tokenize_preferences([{"prompt": "ab", "chosen": "c", "rejected": "d"}], TOK, max_length=16)
    batch = PreferenceCollator(pad_token_id=PAD, pad_to_multiple_of=8)([data[0]])
    assert batch["input_ids"].shape == (2, 8)
    with pytest.raises(ValueError, match="missing.*tokenize_preferences"):
        PreferenceCollator(pad_token_id=PAD)([{"prompt": "ab", "chosen": "c", "rejected": "d"}])


def test_shipped_synthetic_data_loads() -> None:
    from prefloss.data import synthetic_preferences_path

    train = load_preferences(str(synthetic_preferences_path("train")))
    held = load_preferences(str(synthetic_preferences_path("eval")))
    assert len(train) >= 1000 and len(held) >= 100
    train_words = {w.lower() for r in train for w in r["chosen"].split()}
    held_words = {w.lower() for r in held for w in r["chosen"].split()}
    assert not train_words & held_words, "held-out words must not occur in training"
    with pytest.raises(ValueError, match="unknown split"):
        synthetic_preferences_path("test")
