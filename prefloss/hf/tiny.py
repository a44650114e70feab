"""A byte-level tokenizer and a tiny Llama-style model, built offline (no downloads).

Used by ``prefloss train`` when no ``--model`` is given, and by the tests.
"""

from __future__ import annotations

from typing import Any

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"

# A minimal chat template: turns as "<|role|>content\n", an assistant turn closed by EOS instead.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_level_tokenizer(*, chat_template: bool = True, add_bos: bool = True) -> Any:
    """A ``PreTrainedTokenizerFast`` over the 256 bytes plus BOS, EOS and PAD (vocabulary 259).

    No merges: every byte is one token, so any text round-trips and nothing is downloaded.

    Args:
        chat_template: attach `CHAT_TEMPLATE` (conversational data needs a chat template).
        add_bos: the tokenizer prepends BOS to encoded text (with ``add_special_tokens=True``, the
            default), as Llama's tokenizers do; ``False`` makes it GPT-2-like (no special tokens added).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    for special in (BOS, EOS, PAD):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(
    tokenizer: Any,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 256,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` sized for ``tokenizer`` (~0.4 M parameters by default).

    Args:
        tokenizer: gives the vocabulary size and the BOS/EOS/PAD ids.
        tie_word_embeddings: share the input embedding with the LM head.
        seed: initialisation seed (the same seed gives the same weights).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


# family -> its config's expert settings beyond the shared ones (`tiny_moe`)
MOE_FAMILIES: dict[str, dict[str, Any]] = {
    "mixtral": {"num_local_experts": "E"},
    "qwen2_moe": {"num_experts": "E", "moe_intermediate_size": "I", "shared_expert_intermediate_size": "I"},
    "qwen3_moe": {"num_experts": "E", "moe_intermediate_size": "I", "norm_topk_prob": True},
    "olmoe": {"num_experts": "E"},
}


def tiny_moe(
    tokenizer: Any,
    family: str = "mixtral",
    *,
    hidden_size: int = 16,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 32,
    num_experts: int = 4,
    top_k: int = 2,
    output_router_logits: bool = True,
    router_aux_loss_coef: float = 0.02,
    max_position_embeddings: int = 256,
    seed: int = 0,
) -> Any:
    """A randomly initialised mixture-of-experts causal LM of ``family`` (`MOE_FAMILIES`: ``mixtral``,
    ``qwen2_moe``, ``qwen3_moe``, ``olmoe``) sized for ``tokenizer``: every layer a MoE block of
    ``num_experts`` experts, ``top_k`` per token (~23 k parameters by default).

    Args:
        output_router_logits, router_aux_loss_coef: the config's load-balancing settings
            (`prefloss.hf.moe`).
        seed: initialisation seed (the same seed gives the same weights).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if family not in MOE_FAMILIES:
        raise ValueError(f"family must be one of {sorted(MOE_FAMILIES)}, got {family!r}")
    sizes = {"E": num_experts, "I": intermediate_size}
    experts = {k: sizes.get(v, v) if isinstance(v, str) else v for k, v in MOE_FAMILIES[family].items()}
    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        num_experts_per_tok=top_k,
        output_router_logits=output_router_logits,
        router_aux_loss_coef=router_aux_loss_coef,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **experts,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
