"""Hidden-state extraction and output heads of Hugging Face causal LMs (`prefloss.hf.model`).

Ground truth is the model's own ``log_softmax(model(ids).logits)`` gathered at the next tokens, in
float64 (the tiny models are converted with ``.double()``), so any missing logit transform shows far
above the tolerance: Gemma-2 with a soft-cap of 2.0 (at 30 a missing cap would hide), Cohere with a
logit scale of 0.5, Granite with ``logits_scaling`` 4.0, GPT-2 with tied embeddings, Phi with an LM
head bias. Models are random, built from configs (no downloads).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import prefloss
from prefloss.hf.model import (
    LOGIT_TRANSFORMS,
    check_output_head,
    decoder_hidden_states,
    output_head,
)

VOCAB = 97  # not a power of two
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

FAMILIES = {
    "llama": dict(COMMON),
    "mistral": dict(COMMON),
    "qwen2": dict(COMMON),
    "gemma2": dict(COMMON, final_logit_softcapping=2.0, head_dim=8),
    "cohere": dict(COMMON, logit_scale=0.5),
    "granite": dict(COMMON, logits_scaling=4.0),
    "gpt2": dict(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
    ),
    "phi": dict(COMMON, num_key_value_heads=4),
}
EXPECTED_TRANSFORM = {
    "gemma2": (None, 2.0),
    "cohere": (0.5, None),
    "granite": (0.25, None),
}


def tiny(model_type: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **FAMILIES[model_type])
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    mask[2, 4:] = 0
    return ids, mask


def expected_logprobs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return logp.masked_fill(mask[:, 1:] == 0, 0.0)


@pytest.mark.parametrize("model_type", list(FAMILIES), ids=list(FAMILIES))
def test_fused_logprobs_match_model_logits(model_type: str) -> None:
    model = tiny(model_type)
    ids, mask = batch()
    head = output_head(model)
    assert (head.logit_scale, head.softcap) == EXPECTED_TRANSFORM.get(model_type, (None, None))
    hidden = decoder_hidden_states(model, ids, mask)
    assert hidden.shape == (*ids.shape, model.config.get_text_config().hidden_size)
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    got = prefloss.fused_logprobs(hidden[:, :-1], head.weight, labels, **head.fused_kwargs())
    want = expected_logprobs(model, ids, mask)
    err = (got.policy.double() - want).abs().max().item()
    assert err < 1e-9, f"{model_type}: max abs err {err:.3e}"
    assert check_output_head(model, ids, mask) < 1e-9


@pytest.mark.parametrize("model_type", ["gemma2", "cohere", "gpt2"], ids=["gemma2", "cohere", "gpt2"])
def test_gradients_match_model_logits(model_type: str) -> None:
    """Parameter gradients through hidden states + head equal those through the model's logits."""
    ids, mask = batch()
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    weights = torch.randn(labels.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    model = tiny(model_type)
    head = output_head(model)
    hidden = decoder_hidden_states(model, ids, mask)
    got = prefloss.fused_logprobs(hidden[:, :-1], head.weight, labels, **head.fused_kwargs()).policy
    (got.double() * weights).sum().backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    (expected_logprobs(model, ids, mask) * weights).sum().backward()
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        err = (fused_grads[name] - p.grad).abs().max().item()
        assert err < 1e-9, f"{model_type} {name}: max abs grad err {err:.3e}"


def test_float32_model_within_tolerance() -> None:
    model = tiny("gemma2", dtype=torch.float32)
    ids, mask = batch()
    assert check_output_head(model, ids, mask) < 1e-4


def test_model_without_output_embedding_is_an_error() -> None:
    config = AutoConfig.for_model("llama", **COMMON)
    base = AutoModel.from_config(config)
    with pytest.raises(ValueError, match="no output embedding.*AutoModelForCausalLM"):
        output_head(base)
    with pytest.raises(ValueError, match="get_decoder"):
        decoder_hidden_states(base, *batch())


def test_unknown_logit_transform_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """A family whose transform prefloss does not know fails the head check with a clear message."""
    monkeypatch.delitem(LOGIT_TRANSFORMS, "cohere")
    model = tiny("cohere")
    with pytest.raises(ValueError, match="logit transform.*LOGIT_TRANSFORMS"):
        check_output_head(model, *batch())


def test_not_a_transformers_model_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="get_decoder"):
        decoder_hidden_states(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long))


@pytest.mark.parametrize("model_type", ["llama", "gpt2"], ids=["llama", "gpt2"])
def test_no_full_logits_are_formed(model_type: str) -> None:
    """The model's own forward runs with ``logits_to_keep=1``: its LM head sees one position per row."""
    model = tiny(model_type)
    shapes = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, args, out: shapes.append(out.shape))
    try:
        ids, mask = batch()
        decoder_hidden_states(model, ids, mask)
    finally:
        handle.remove()
    assert shapes == [(ids.shape[0], 1, VOCAB)]
