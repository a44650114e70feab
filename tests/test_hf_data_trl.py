"""Tokenization parity with TRL's ``DPOTrainer`` (the tokens TRL users already train on).

For plain-text and conversational rows and three tokenizers -- prefloss's byte-level one adding BOS
(Llama-like), the same without special tokens (GPT-2-like: TRL leaves BOS to the tokenizer), and a
chat template that ends an assistant turn with EOS + newline (where appending another EOS would score
a token the model never sees at inference) -- `tokenize_preferences` gives exactly the prompt /
chosen / rejected ids of ``DPOTrainer``'s own dataset preparation (TRL 1.16). Also: ``bos="always"`` /
``"never"`` force or remove BOS, and ``overlong="drop"`` drops (and counts) the rows TRL drops.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest

trl = pytest.importorskip("trl")

import datasets  # noqa: E402
import transformers  # noqa: E402

from prefloss.data import synthetic_preferences_path  # noqa: E402
from prefloss.hf.data import tokenize_preference_row, tokenize_preferences  # noqa: E402
from prefloss.hf.tiny import CHAT_TEMPLATE, byte_level_tokenizer, tiny_llama  # noqa: E402

# The tiny template, but an assistant turn ends with EOS and a newline (as many real templates do).
EOS_NEWLINE_TEMPLATE = CHAT_TEMPLATE.replace(
    "{{ eos_token }}{% else %}", "{{ eos_token }}{{ '\\n' }}{% else %}"
)


def _tokenizer(kind: str):
    tok = byte_level_tokenizer(add_bos=kind != "gpt2-like")
    if kind == "eos-newline-template":
        tok.chat_template = EOS_NEWLINE_TEMPLATE
    return tok


def _rows(conversational: bool, n: int = 6) -> list[dict]:
    rows = [json.loads(line) for line in open(synthetic_preferences_path("train"))][:n]
    if not conversational:
        return rows
    return [
        {
            "prompt": [{"role": "user", "content": r["prompt"].strip()}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in rows
    ]


def _trl_tokens(rows: list[dict], tok, max_length: int) -> list[tuple[list[int], ...]]:
    transformers.logging.set_verbosity_error()
    model = tiny_llama(tok, hidden_size=32)
    args = trl.DPOConfig(output_dir="trl-unused", report_to=[], use_cpu=True, max_length=max_length)
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok,
    )
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset]


def _ours(rows: list[dict], tok, max_length: int, **kwargs) -> list[tuple[list[int], ...]]:
    out = tokenize_preferences(rows, tok, max_length=max_length, **kwargs)
    return [(r["prompt_input_ids"], r["chosen_input_ids"], r["rejected_input_ids"]) for r in out]


# (tokenizer, conversational rows); the EOS + newline template only matters for conversations.
CASES = [("llama-like", False), ("llama-like", True), ("gpt2-like", False), ("gpt2-like", True)]
CASES.append(("eos-newline-template", True))


@pytest.mark.parametrize(
    ("kind", "conversational"), CASES, ids=[f"{k}-{'chat' if c else 'plain'}" for k, c in CASES]
)
def test_same_tokens_as_trl_dpo_trainer(kind, conversational, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    tok, rows = _tokenizer(kind), _rows(conversational)
    ours, theirs = _ours(rows, tok, 128), _trl_tokens(rows, tok, 128)
    assert ours == theirs
    eos, bos = tok.eos_token_id, tok.bos_token_id
    for prompt, chosen, rejected in ours:
        assert chosen.count(eos) == 1 and rejected.count(eos) == 1, "exactly one EOS per response"
        assert (prompt[0] == bos) == (kind != "gpt2-like" or conversational)  # the template writes BOS


def test_eos_newline_template_gets_no_second_eos() -> None:
    tok = _tokenizer("eos-newline-template")
    out = tokenize_preference_row(_rows(True, 1)[0], tok, max_length=128)
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert out["chosen_input_ids"][-2:] == [tok.eos_token_id, *newline]


@pytest.mark.parametrize("bos", ["always", "never"], ids=["always", "never"])
def test_bos_can_be_forced_or_removed(bos) -> None:
    row = _rows(False, 1)[0]
    for kind in ("llama-like", "gpt2-like"):
        tok = _tokenizer(kind)
        default = tokenize_preference_row(row, tok, max_length=128)
        out = tokenize_preference_row(row, tok, max_length=128, bos=bos)
        body = [t for t in default["prompt_input_ids"] if t != tok.bos_token_id]
        assert out["prompt_input_ids"] == ([tok.bos_token_id, *body] if bos == "always" else body)
        assert out["chosen_input_ids"] == default["chosen_input_ids"]


def test_overlong_prompts_are_dropped_and_counted_like_trl(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    tok, rows = _tokenizer("llama-like"), _rows(False, 4)
    rows[1] = dict(rows[1], prompt="x" * 40)
    rows[3] = dict(rows[3], prompt="y" * 50)
    with pytest.raises(ValueError, match=r"row 1: the prompt has 41 tokens.*overlong='drop'"):
        _ours(rows, tok, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = _ours(rows, tok, 32, overlong="drop")
    assert any("dropped 2 of 4 preference rows" in str(w.message) for w in caught), [
        str(w.message) for w in caught
    ]
    theirs = _trl_tokens(rows, tok, 32)
    assert [r[0] for r in ours] == [r[0] for r in theirs]  # the same rows kept, same prompts
