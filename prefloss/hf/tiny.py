"""A byte-level tokenizer and tiny random models, built offline (no downloads).

`byte_level_tokenizer` and `tiny_llama` are what ``prefloss train`` uses when no ``--model`` is given;
`tiny_vision_processor` and `tiny_vision_model` build a vision-language model of a few ten thousand
parameters with its processor (`VISION_FAMILIES`: LLaVA, Gemma 3), for the vision tests.
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


def byte_level_tokenizer(
    *, chat_template: bool = True, add_bos: bool = True, extra_special_tokens: dict[str, str] | None = None
) -> Any:
    """A ``PreTrainedTokenizerFast`` over the 256 bytes plus BOS, EOS and PAD (vocabulary 259).

    No merges: every byte is one token, so any text round-trips and nothing is downloaded.

    Args:
        chat_template: attach `CHAT_TEMPLATE` (conversational data needs a chat template).
        add_bos: the tokenizer prepends BOS to encoded text (with ``add_special_tokens=True``, the
            default), as Llama's tokenizers do; ``False`` makes it GPT-2-like (no special tokens added).
        extra_special_tokens: named special tokens appended to the vocabulary after PAD, in order
            (``{"image_token": "<image>"}`` gives ``tokenizer.image_token`` and ``image_token_id``, as a
            vision-language processor reads them).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    extra = dict(extra_special_tokens or {})
    for special in (BOS, EOS, PAD, *extra.values()):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        **({"extra_special_tokens": extra} if extra else {}),
    )
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
    return _causal_lm(
        "llama",
        tokenizer,
        seed,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
    )


def _causal_lm(model_type: str, tokenizer: Any, seed: int, **settings: Any) -> Any:
    """A randomly initialised fp32 ``AutoModelForCausalLM`` of ``model_type`` built offline from its
    config (``settings``), with ``tokenizer``'s vocabulary size and bos/eos/pad ids; the same ``seed``
    gives the same weights, and the global RNG is left as it was."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **settings,
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
    if family not in MOE_FAMILIES:
        raise ValueError(f"family must be one of {sorted(MOE_FAMILIES)}, got {family!r}")
    sizes = {"E": num_experts, "I": intermediate_size}
    experts = {k: sizes.get(v, v) if isinstance(v, str) else v for k, v in MOE_FAMILIES[family].items()}
    return _causal_lm(
        family,
        tokenizer,
        seed,
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
        tie_word_embeddings=False,
        **experts,
    )


# --------------------------------------------------------------------------------------------------
# Tiny vision-language models

# family -> the placeholder its processor expands into image tokens, and the named special tokens
VISION_FAMILIES: dict[str, tuple[str, dict[str, str]]] = {
    "llava": ("<image>", {"image_token": "<image>"}),
    "gemma3": (
        "<start_of_image>",
        {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    ),
    "qwen2_vl": (
        "<|vision_start|><|image_pad|><|vision_end|>",
        {
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
        },
    ),
}


def vision_chat_template(image_placeholder: str) -> str:
    """`CHAT_TEMPLATE` for messages whose content is a string or a list of parts
    (``{"type": "text", "text": ...}``, ``{"type": "image"}`` rendered as ``image_placeholder``), the
    structured form TRL gives multimodal messages."""
    content = (
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
        "{% if part['type'] == 'image' %}" + image_placeholder + "{% else %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
    )
    return CHAT_TEMPLATE.replace("{{ m['content'] }}", content)


def _check_family(family: str) -> None:
    if family not in VISION_FAMILIES:
        raise ValueError(f"family must be one of {sorted(VISION_FAMILIES)}, got {family!r}")


IMAGE_SIZE = 16  # side of the square image a tiny vision model sees
IMAGE_TOKENS = 4  # image tokens each image becomes in the text


def tiny_vision_processor(family: str) -> Any:
    """The processor of a tiny vision-language model, built in code (no downloads).

    The byte-level tokenizer with the family's image tokens and a multimodal chat template
    (`vision_chat_template`), and the family's image processor, which resizes every image to
    `IMAGE_SIZE` squared (Qwen2-VL's: to about that many pixels, keeping the aspect ratio); each
    image becomes `IMAGE_TOKENS` image tokens in the text (Qwen2-VL: a grid of about that many).

    Args:
        family: ``"llava"`` (CLIP image processor; batches carry ``pixel_values``), ``"gemma3"``
            (Gemma 3's image processor; ``pixel_values`` and ``token_type_ids``) or ``"qwen2_vl"``
            (Qwen2-VL's: ``pixel_values`` as ``[patches, 3·2·4·4]``, the patches of all images in turn,
            ``image_grid_thw`` and ``mm_token_type_ids``; its processor without the video processor,
            which needs torchvision).
    """
    _check_family(family)
    placeholder, specials = VISION_FAMILIES[family]
    tokenizer = byte_level_tokenizer(extra_special_tokens=specials)
    tokenizer.chat_template = template = vision_chat_template(placeholder)
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    if family == "llava":
        from transformers import LlavaProcessor

        return LlavaProcessor(  # (16 / 8)² patch features, CLIP's class token dropped ("default")
            image_processor=_pil_image_processor("clip", "CLIP")(
                size={"shortest_edge": IMAGE_SIZE}, crop_size=size
            ),
            tokenizer=tokenizer,
            patch_size=IMAGE_SIZE // 2,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=template,
        )
    if family == "qwen2_vl":
        pixels = IMAGE_SIZE * IMAGE_SIZE
        return _qwen2_vl_image_processor_class()(  # 4 × 4 patches of 4 pixels, merged 2 × 2
            image_processor=_pil_image_processor("qwen2_vl", "Qwen2VL")(
                patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=pixels, max_pixels=pixels
            ),
            tokenizer=tokenizer,
            chat_template=template,
        )
    from transformers import Gemma3Processor

    return Gemma3Processor(  # (16 / 4)² patches pooled to 2 × 2 tokens
        image_processor=_pil_image_processor("gemma3", "Gemma3")(size=size),
        tokenizer=tokenizer,
        image_seq_length=IMAGE_TOKENS,
        chat_template=template,
    )


def _pil_image_processor(model: str, prefix: str) -> type:
    """The PIL/NumPy image processor class of ``model`` (no torchvision needed): newer transformers'
    ``<Prefix>ImageProcessorPil`` (5.25), or the plain ``<Prefix>ImageProcessor`` of older ones (5.3)."""
    import importlib

    try:
        module = importlib.import_module(f"transformers.models.{model}.image_processing_pil_{model}")
        return getattr(module, f"{prefix}ImageProcessorPil")
    except ModuleNotFoundError:
        module = importlib.import_module(f"transformers.models.{model}.image_processing_{model}")
        return getattr(module, f"{prefix}ImageProcessor")


def _qwen2_vl_image_processor_class() -> type:
    """``Qwen2VLProcessor`` without its video processor (whose classes need torchvision)."""
    from transformers import Qwen2VLProcessor

    class Qwen2VLImageProcessor(Qwen2VLProcessor):
        @classmethod
        def get_attributes(cls) -> list[str]:
            return ["image_processor", "tokenizer"]

        def __init__(self, image_processor: Any = None, tokenizer: Any = None, **kwargs: Any) -> None:
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, **kwargs)

    return Qwen2VLImageProcessor


def tiny_vision_model(family: str, processor: Any, *, hidden_size: int = 32, seed: int = 0) -> Any:
    """A randomly initialised vision-language model for `tiny_vision_processor`'s processor.

    A one-layer vision tower of width 16 over 16×16 images, the family's projector, and a two-layer
    language model of width ``hidden_size`` (LLaVA: Llama; Gemma 3, Qwen2-VL: their own text models)
    with an untied output head: ``LlavaForConditionalGeneration``, ``Gemma3ForConditionalGeneration``,
    ``Qwen2VLForConditionalGeneration``.

    Args:
        family: as `tiny_vision_processor`'s.
        processor: its processor (vocabulary size and the image token ids).
        seed: initialisation seed (the same seed gives the same weights).
    """
    import torch
    from transformers import AutoConfig

    _check_family(family)
    tokenizer = processor.tokenizer
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=IMAGE_SIZE // 2 if family == "llava" else IMAGE_SIZE // 4,
    )
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if family == "llava":
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        cls = LlavaForConditionalGeneration
        config = LlavaConfig(
            vision_config=AutoConfig.for_model("clip_vision_model", **vision),
            text_config=AutoConfig.for_model("llama", **text),
            image_token_id=tokenizer.image_token_id,
            vision_feature_layer=-1,
            tie_word_embeddings=False,
        )
    elif family == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        cls = Qwen2VLForConditionalGeneration
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # head_dim / 2
        config = Qwen2VLConfig(
            vision_config=dict(
                depth=1,
                embed_dim=16,
                hidden_size=hidden_size,
                num_heads=2,
                mlp_ratio=2,
                patch_size=4,
                spatial_merge_size=2,
                temporal_patch_size=2,
            ),
            text_config=dict(text, rope_parameters=rope),
            image_token_id=tokenizer.image_token_id,
            video_token_id=tokenizer.video_token_id,
            vision_start_token_id=tokenizer.vision_start_token_id,
            vision_end_token_id=tokenizer.vision_end_token_id,
            tie_word_embeddings=False,
        )
    else:
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration

        cls = Gemma3ForConditionalGeneration
        config = Gemma3Config(
            vision_config=AutoConfig.for_model("siglip_vision_model", **vision),
            text_config=AutoConfig.for_model("gemma3_text", head_dim=hidden_size // 2, **text),
            image_token_index=tokenizer.image_token_id,
            boi_token_index=tokenizer.boi_token_id,
            eoi_token_index=tokenizer.eoi_token_id,
            mm_tokens_per_image=IMAGE_TOKENS,
            tie_word_embeddings=False,
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).to(torch.float32)
        if family == "gemma3":  # initialised to zeros, which would leave the vision tower untrained
            with torch.no_grad():
                model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.25)
    return model


def tiny_image_preferences(
    n: int = 8, *, placeholder: str | None = None, seed: int = 0
) -> list[dict[str, Any]]:
    """``n`` image preference rows in TRL's format: ``images`` (one small random RGB ``PIL.Image`` each,
    of varying size), ``prompt``, ``chosen``, ``rejected`` (responses of varying length).

    Args:
        placeholder: ``None``: conversational rows (messages; the processor's chat template places the
            image); else plain strings, the prompt starting with this image placeholder (the first
            entry of `VISION_FAMILIES`' value: ``"<image>"`` for LLaVA).
        seed: the images' random seed.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = ["red", "green", "blue", "white"]
    rows = []
    for i in range(n):
        size = (8 + 4 * (i % 3), 12 + 2 * (i % 4))  # (height, width)
        image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        question = f"What colour is picture {i}?"
        chosen = f"It is mostly {colours[i % 4]}" + "." * (i % 3)
        rejected = "No idea" if i % 2 else f"It is {colours[(i + 1) % 4]}, I think"
        if placeholder is None:
            rows.append(
                {
                    "images": [image],
                    "prompt": [{"role": "user", "content": question}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
        else:
            rows.append(
                {
                    "images": [image],
                    "prompt": f"{placeholder}{question} ",
                    "chosen": chosen,
                    "rejected": rejected,
                }
            )
    return rows
