"""Hugging Face integration: data, collation, hidden-state extraction and a ``transformers.Trainer``.

Needs the ``hf`` extra (transformers, datasets, accelerate). Typical use::

    from prefloss.hf import PreferenceConfig, PreferenceTrainer

    args = PreferenceConfig(output_dir="out", loss="alpha_dpo", beta=2.5, max_length=1024)
    trainer = PreferenceTrainer(model, args=args, train_dataset=ds, processing_class=tokenizer)
    trainer.train()

Under DDP, FSDP2 and DeepSpeed ZeRO-3 alike (`prefloss.hf.engines`); in a custom loop, one
micro-batch's loss is `preference_loss(loss_fn, model, input_ids, attention_mask, labels,
ref_model=prepare_reference(ref, model))`.
"""

from prefloss.hf.adapters import AdaptersDisabled
from prefloss.hf.collator import PreferenceCollator
from prefloss.hf.core import LOSSES, build_loss, loss_name
from prefloss.hf.data import load_preferences, tokenize_preference_row, tokenize_preferences
from prefloss.hf.engines import engine_name, gathered_heads, head_access, prepare_reference
from prefloss.hf.heads import LOGIT_TRANSFORMS, OutputHead, output_head, unwrap_model
from prefloss.hf.model import check_output_head, decoder_hidden_states
from prefloss.hf.step import preference_loss
from prefloss.hf.trainer import PreferenceConfig, PreferenceTrainer, score_pairs
from prefloss.hf.vision import VisionPreferenceCollator, load_image_preferences

__all__ = [
    "AdaptersDisabled",
    "LOGIT_TRANSFORMS",
    "LOSSES",
    "OutputHead",
    "PreferenceCollator",
    "PreferenceConfig",
    "PreferenceTrainer",
    "VisionPreferenceCollator",
    "build_loss",
    "check_output_head",
    "decoder_hidden_states",
    "engine_name",
    "gathered_heads",
    "head_access",
    "load_image_preferences",
    "load_preferences",
    "loss_name",
    "output_head",
    "preference_loss",
    "prepare_reference",
    "score_pairs",
    "tokenize_preference_row",
    "tokenize_preferences",
    "unwrap_model",
]
