"""prefloss's fused losses inside TRL's trainers: switch one import.

Tested with TRL 1.16.0 (and peft 0.21.2, transformers 5.24). Needs the ``trl`` extra
(``pip install "prefloss[trl]"``); ``import prefloss`` never imports TRL.

::

    # from trl import DPOConfig, DPOTrainer
    from prefloss.trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir="out", loss_type="epsilon_dpo", beta=0.01, epsilon=0.01)
    trainer = DPOTrainer(model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()

- `DPOTrainer` / `DPOConfig`: ``trl.DPOTrainer`` with ``loss_type`` ``"sigmoid"`` (DPO),
  ``"alpha_dpo"`` or ``"epsilon_dpo"``, computed from hidden states by prefloss's fused op.
- `CPOTrainer` (with TRL's `CPOConfig`): SimPO as ``trl.experimental.cpo.CPOTrainer(loss_type="simpo",
  cpo_alpha=0.0)`` computes it.

TRL's data pipeline, reference handling (``ref_model``, PEFT adapters disabled or TRL's ``"ref"``
adapter, ``precompute_ref_log_probs``, ``sync_ref_model``), metric names and logging are kept. Every
TRL option that would change the loss and is not implemented raises a ``ValueError`` naming it
(`check_dpo_args`, `check_cpo_args`).
"""

from typing import Any

from prefloss.trl.dpo import LOSS_TYPES, DPOConfig, DPOTrainer, check_dpo_args

TESTED_TRL_VERSION = "1.16.0"
_CPO = ("CPOConfig", "CPOTrainer", "check_cpo_args")


def __getattr__(name: str) -> Any:
    # CPO lives in trl.experimental, which warns on import: load it only when asked for.
    if name in _CPO:
        from prefloss.trl import cpo

        return getattr(cpo, name)
    raise AttributeError(f"module 'prefloss.trl' has no attribute {name!r}")


__all__ = [
    "LOSS_TYPES",
    "TESTED_TRL_VERSION",
    "CPOConfig",
    "CPOTrainer",
    "DPOConfig",
    "DPOTrainer",
    "check_cpo_args",
    "check_dpo_args",
]
