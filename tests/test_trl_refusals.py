"""Every TRL option prefloss.trl does not implement is refused with an error naming it and its value.

The DPOConfig fields are decided one by one in `prefloss.trl.dpo.check_dpo_args` (config-level,
before any model is loaded) and in ``DPOTrainer.__init__`` / ``_compute_loss`` (what depends on the
model or the batch: extra model inputs; a MoE model's auxiliary loss is implemented,
tests/test_trl_moe.py). Options that are honoured (``loss_weights`` of one loss, ``label_smoothing``
of α-DPO) are checked to change the loss as stated.
"""

from __future__ import annotations

import os

import pytest

trl = pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import datasets  # noqa: E402

import prefloss.trl as ptrl  # noqa: E402
from prefloss.hf.tiny import byte_level_tokenizer, tiny_llama  # noqa: E402

COMMON = dict(report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False, save_strategy="no")

pytestmark = pytest.mark.usefixtures("quiet_hf")


@pytest.fixture
def dataset(preference_rows):
    """``dataset()``: a new `datasets.Dataset` of the first 4 synthetic preference pairs at each call."""
    return lambda: datasets.Dataset.from_list(preference_rows(4))


def _message_names(err: pytest.ExceptionInfo, option: str, value) -> None:
    text = str(err.value)
    assert f"{option}={value!r}" in text, text
    assert "prefloss.trl does not implement" in text


DPO_REFUSED = [
    ("loss_type", ["sigmoid", "sft"], {}),  # TRL's multi-loss mixtures (MPO)
    ("loss_type", "ipo", {}),
    ("loss_type", "simpo", {}),  # points to prefloss.trl.CPOTrainer
    ("ld_alpha", 0.5, {}),
    ("f_divergence_type", "forward_kl", {}),
    ("f_alpha_divergence_coef", 0.3, {}),
    ("discopop_tau", 0.1, {}),
    ("use_weighting", True, {}),
    ("label_smoothing", 0.1, {}),  # TRL's 'sigmoid' ignores it; prefloss would apply it
    ("activation_offloading", True, {}),
    ("precompute_ref_log_probs", True, {"loss_type": "epsilon_dpo"}),
    ("gamma_beta_ratio", 0.5, {}),  # not a hyperparameter of loss_type 'sigmoid'
    ("epsilon", 0.1, {"loss_type": "alpha_dpo"}),
    ("alpha", 0.1, {"loss_type": "epsilon_dpo"}),
]


@pytest.mark.parametrize(
    ("option", "value", "extra"), DPO_REFUSED, ids=[f"{o}={v}" for o, v, _ in DPO_REFUSED]
)
def test_dpo_config_refuses(tmp_path, option, value, extra):
    with pytest.raises(ValueError) as err:
        ptrl.DPOConfig(output_dir=str(tmp_path), **COMMON, **{option: value, **extra})
    _message_names(err, option, value)
    if value == "simpo":
        assert "prefloss.trl.CPOTrainer" in str(err.value)


def test_dpo_trainer_refuses_a_plain_trl_config(tmp_path, dataset):
    tok = byte_level_tokenizer()
    args = trl.DPOConfig(output_dir=str(tmp_path), **COMMON, loss_type="hinge")
    with pytest.raises(ValueError) as err:
        ptrl.DPOTrainer(
            model=tiny_llama(tok, hidden_size=32), args=args, train_dataset=dataset(), processing_class=tok
        )
    _message_names(err, "loss_type", "hinge")


@pytest.fixture
def dpo_trainer(tmp_path, dataset):
    """``dpo_trainer(**config)``: a `prefloss.trl.DPOTrainer` on tiny Llamas (policy seed 0, reference
    seed 1), 2 pairs a batch, ``config`` added to its `prefloss.trl.DPOConfig`."""

    def make(**config):
        tok = byte_level_tokenizer()
        args = ptrl.DPOConfig(str(tmp_path), **COMMON, per_device_train_batch_size=2, **config)
        return ptrl.DPOTrainer(
            model=tiny_llama(tok, hidden_size=32, seed=0),
            ref_model=tiny_llama(tok, hidden_size=32, seed=1),
            args=args,
            train_dataset=dataset(),
            processing_class=tok,
        )

    return make


def test_dpo_trainer_refuses_reserved_model_inputs(dpo_trainer):
    """Extra batch keys go to the models' forwards (vision inputs: tests/test_trl_vision.py), except
    the inputs prefloss sets itself, refused by name."""
    trainer = dpo_trainer()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    batch["labels"] = batch["input_ids"].clone()
    with pytest.raises(ValueError) as err:
        trainer.compute_loss(trainer.model, batch)
    _message_names(err, "data_collator", ["labels"])


def _loss(trainer) -> float:
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    trainer.model.train()
    return trainer.compute_loss(trainer.model, batch).item()


def test_honoured_options_change_the_loss(tmp_path, dpo_trainer):
    base = _loss(dpo_trainer())
    assert _loss(dpo_trainer(loss_weights=[0.5])) == pytest.approx(0.5 * base, rel=1e-6)
    alpha = _loss(dpo_trainer(loss_type="alpha_dpo"))
    smoothed = _loss(dpo_trainer(loss_type="alpha_dpo", label_smoothing=0.2))
    assert smoothed != pytest.approx(alpha, rel=1e-3)
    # beta=None takes the loss's default (α-DPO: 2.5), written back into the config
    assert ptrl.DPOConfig(str(tmp_path), **COMMON, loss_type="alpha_dpo").beta == 2.5
    assert ptrl.DPOConfig(str(tmp_path), **COMMON).beta == trl.DPOConfig(str(tmp_path), **COMMON).beta


CPO_REFUSED = [
    ("loss_type", "sigmoid", {}),
    ("cpo_alpha", 1.0, {}),  # CPO's default: the NLL term
    ("alpha", 0.1, {}),  # AlphaPO
]


@pytest.mark.parametrize(
    ("option", "value", "extra"), CPO_REFUSED, ids=[f"{o}={v}" for o, v, _ in CPO_REFUSED]
)
def test_cpo_trainer_refuses(tmp_path, option, value, extra, dataset):
    tok = byte_level_tokenizer()
    config = {"loss_type": "simpo", "cpo_alpha": 0.0, option: value, **extra}
    args = ptrl.CPOConfig(output_dir=str(tmp_path), **COMMON, **config)
    with pytest.raises(ValueError) as err:
        ptrl.CPOTrainer(
            model=tiny_llama(tok, hidden_size=32), args=args, train_dataset=dataset(), processing_class=tok
        )
    _message_names(err, option, value)


def test_cpo_trainer_refuses_compute_metrics(tmp_path, dataset):
    tok = byte_level_tokenizer()
    args = ptrl.CPOConfig(output_dir=str(tmp_path), **COMMON, loss_type="simpo", cpo_alpha=0.0)
    with pytest.raises(ValueError) as err:
        ptrl.CPOTrainer(
            model=tiny_llama(tok, hidden_size=32),
            args=args,
            train_dataset=dataset(),
            processing_class=tok,
            compute_metrics=len,
        )
    assert "compute_metrics=" in str(err.value)


def test_importing_prefloss_does_not_import_trl():
    import subprocess
    import sys

    code = "import sys, prefloss, prefloss.hf; print('trl' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "False"
