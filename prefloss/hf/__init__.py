"""Hugging Face integration: data, collation, hidden-state extraction and a ``transformers.Trainer``.

Needs the ``hf`` extra (transformers, datasets, accelerate). Typical use::

    from prefloss.hf import PreferenceConfig, PreferenceTrainer

    args = PreferenceConfig(output_dir="out", loss="alpha_dpo", beta=2.5, max_length=1024)
    trainer = PreferenceTrainer(model, args=args, train_dataset=ds, processing_class=tokenizer)
    trainer.train()
"""

from prefloss.hf.collator import PreferenceCollator
from prefloss.hf.data import load_preferences, tokenize_preference_row, tokenize_preferences
from prefloss.hf.model import (
    LOGIT_TRANSFORMS,
    OutputHead,
    check_output_head,
    decoder_hidden_states,
    output_head,
    unwrap_model,
)
from prefloss.hf.trainer import (
    LOSSES,
    PreferenceConfig,
    PreferenceTrainer,
    build_loss,
    loss_name,
    score_pairs,
)

__all__ = [
    "LOGIT_TRANSFORMS",
    "LOSSES",
    "OutputHead",
    "PreferenceCollator",
    "PreferenceConfig",
    "PreferenceTrainer",
    "build_loss",
    "check_output_head",
    "decoder_hidden_states",
    "load_preferences",
    "loss_name",
    "output_head",
    "score_pairs",
    "tokenize_preference_row",
    "tokenize_preferences",
    "unwrap_model",
]
