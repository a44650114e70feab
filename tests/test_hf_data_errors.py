"""Bad preference data names the file and its 1-based line (`prefloss.hf.data`).

Every bad line here is line 6 of its file (five good lines come first), and errors found only at
tokenization are raised after the data was shuffled and split, as ``prefloss train`` does, so a
0-based row of the split ("row 30") cannot pass for the line.
"""

from __future__ import annotations

import json
import warnings

import pytest

from prefloss.commands import cli
from prefloss.hf.data import (
    SOURCE_COLUMN,
    PreferenceDataError,
    load_preferences,
    tokenize_preferences,
)
from prefloss.hf.tiny import byte_level_tokenizer

TOK = byte_level_tokenizer()
GOOD = [json.dumps({"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"}) for i in range(40)]


def write(tmp_path, lines: list[str] | bytes, name: str = "data.jsonl") -> str:
    path = tmp_path / name
    path.write_bytes(lines if isinstance(lines, bytes) else ("\n".join(lines) + "\n").encode())
    return str(path)


def bad_line_6(line: str | bytes) -> list[str] | bytes:
    """Five good lines, ``line``, then more good lines."""
    if isinstance(line, bytes):
        return ("\n".join(GOOD[:5]) + "\n").encode() + line + ("\n" + "\n".join(GOOD[5:]) + "\n").encode()
    return [*GOOD[:5], line, *GOOD[5:]]


@pytest.mark.parametrize(
    "line, error, match",
    [
        ('{"prompt": "x", "chosen": ', PreferenceDataError, r"data\.jsonl:6: invalid JSON \(Expecting value"),
        (
            b'{"prompt": "\xff", "chosen": "c", "rejected": "r"}',
            PreferenceDataError,
            r"data\.jsonl:6: not UTF-8",
        ),
        (
            json.dumps({"prompt": "p", "chosen": "c"}),
            PreferenceDataError,
            r"data\.jsonl:6: 'rejected' is missing "
            r"\(expected keys prompt, chosen, rejected; got prompt, chosen\)",
        ),
        (
            json.dumps({"prompt": "p", "chosen": "c", "rejected": 3}),
            TypeError,
            r"data\.jsonl:6: 'rejected' must be a string, as 'prompt' is \(plain text\), got int 3",
        ),
        (
            json.dumps({"prompt": "p", "chosen": None, "rejected": "r"}),
            TypeError,
            r"data\.jsonl:6: 'chosen' must be a string.*got NoneType None",
        ),
        (
            "[1, 2]",
            TypeError,
            r"data\.jsonl:6: expected a JSON object with keys prompt, chosen, rejected, "
            r"got list",
        ),
        (
            json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": "c", "rejected": "r"}),
            TypeError,
            r"data\.jsonl:6: 'chosen' must be a list of messages, as 'prompt' is",
        ),
        (
            json.dumps({"prompt": "p", "chosen": "c", "rejected": "r", "ref_chosen_logps": -1.0}),
            PreferenceDataError,
            r"data\.jsonl:6: 'ref_chosen_logps' is present, but absent at .*data\.jsonl:1",
        ),
    ],
    ids=[
        "malformed-json",
        "invalid-utf8",
        "missing-key",
        "non-string-response",
        "null-response",
        "not-an-object",
        "mixed-formats",
        "reference-column-on-some-lines",
    ],
)
def test_bad_line_is_named(tmp_path, line, error: type, match: str) -> None:
    path = write(tmp_path, bad_line_6(line))
    with pytest.raises(error, match=match) as info:
        load_preferences(path)
    assert isinstance(info.value, PreferenceDataError) and isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"{path}:6: ")


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"], ids=["empty", "blank-lines-only"])
def test_empty_file_is_an_error(tmp_path, content: bytes) -> None:
    path = write(tmp_path, content)
    with pytest.raises(PreferenceDataError, match=r"data\.jsonl: no preference rows \(the file is empty\)"):
        load_preferences(path)


def test_blank_lines_are_skipped_and_lines_still_counted(tmp_path) -> None:
    """Blank lines (also a trailing one, CRLF endings, a UTF-8 BOM) are skipped; line numbers count them."""
    text = "\ufeff" + GOOD[0] + "\r\n\r\n" + GOOD[1] + "\n   \n" + GOOD[2] + "\r\n"
    path = write(tmp_path, text.encode())
    data = load_preferences(path)
    assert data["prompt"] == ["p0", "p1", "p2"]
    assert data[SOURCE_COLUMN] == [f"{path}:1", f"{path}:3", f"{path}:5"]


def test_json_array_file_names_the_line_of_the_bad_item(tmp_path) -> None:
    items = [*GOOD[:2], json.dumps({"prompt": "p", "chosen": "c"})]
    path = write(tmp_path, ["[", ",\n".join(items), "]"], name="data.json")
    with pytest.raises(PreferenceDataError, match=r"data\.json:4: 'rejected' is missing"):
        load_preferences(path)
    path = write(tmp_path, ["[", ",\n".join(GOOD[:3]), "]"], name="good.json")
    assert load_preferences(path)["prompt"] == ["p0", "p1", "p2"]


def split_train(path: str):
    """As ``prefloss train`` does with --data and no --eval-data: shuffled 90/10 split."""
    return load_preferences(path).train_test_split(test_size=0.1, seed=0)["train"]


def test_overlong_prompt_names_the_line_after_a_shuffled_split(tmp_path) -> None:
    path = write(tmp_path, bad_line_6(json.dumps({"prompt": "x" * 40, "chosen": "c", "rejected": "r"})))
    train = split_train(path)
    assert f"{path}:6" in train[SOURCE_COLUMN] and train[SOURCE_COLUMN][5] != f"{path}:6"
    with pytest.raises(PreferenceDataError, match=r"data\.jsonl:6: the prompt has 41 tokens.*max_length=16"):
        tokenize_preferences(train, TOK, max_length=16)
    with pytest.warns(UserWarning, match=r"dropped 1 of 36 .*overlong='drop'\): .*data\.jsonl:6$"):
        out = tokenize_preferences(train, TOK, max_length=16, overlong="drop")
    assert sorted(out.column_names) == ["chosen_input_ids", "prompt_input_ids", "rejected_input_ids"]


def test_tokenization_error_names_the_line(tmp_path) -> None:
    path = write(tmp_path, bad_line_6(json.dumps({"prompt": "p", "chosen": "  ", "rejected": "r"})))
    with pytest.raises(PreferenceDataError, match=r"data\.jsonl:6: 'chosen' is an empty response"):
        tokenize_preferences(split_train(path), TOK, max_length=16)


def test_rows_given_in_memory_are_named_by_their_index() -> None:
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c", "rejected": 1}]
    with pytest.raises(TypeError, match=r"^row 1: 'rejected' must be a string"):
        load_preferences(rows)
    assert SOURCE_COLUMN not in load_preferences(rows[:1]).column_names


def test_identical_pairs_are_counted_in_a_warning(tmp_path) -> None:
    same = [json.dumps({"prompt": f"q{i}", "chosen": "same", "rejected": "same"}) for i in range(7)]
    path = write(tmp_path, [*GOOD[:3], *same])
    with pytest.warns(UserWarning) as record:
        data = load_preferences(path)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1
    assert messages[0] == (
        f"{path}: 7 of 10 preference pairs have chosen == rejected "
        f"({path}:4, {path}:5, {path}:6, {path}:7, {path}:8, ...); "
        "such a pair gives every loss zero gradient (no preference signal)"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already reported when the file was read: not again
        load_preferences(data)
    with pytest.warns(UserWarning, match=r"preference data: 1 of 2 .*chosen == rejected \(row 1\)"):
        load_preferences(
            [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b", "rejected": "b"}]
        )


def test_pairs_identical_after_truncation_are_counted_in_a_warning(tmp_path) -> None:
    long = json.dumps({"prompt": "a", "chosen": "b" * 30 + "x", "rejected": "b" * 30 + "y"})
    path = write(tmp_path, [*GOOD[:5], long])
    with pytest.warns(
        UserWarning, match=r"1 of 6 .*same tokens once cut to max_length=16 \(\S*data\.jsonl:6\)"
    ):
        tokenize_preferences(path, TOK, max_length=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_preferences(path, TOK, max_length=64)


def test_prefloss_train_prints_the_data_error_without_a_traceback(tmp_path, capsys) -> None:
    path = write(tmp_path, bad_line_6(json.dumps({"prompt": "p", "chosen": "c"})))
    argv = ["train", "--data", path, "--output-dir", str(tmp_path / "out"), "--quiet", "--no-plot"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"prefloss train: error: {path}:6: 'rejected' is missing" in err
    assert "Traceback" not in err
