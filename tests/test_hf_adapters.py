"""PEFT (LoRA) policies in `PreferenceTrainer`: the reference is the policy with adapters disabled.

* Same training as with an explicit frozen copy of the base model as reference (α-DPO, ε-DPO, DPO,
  SimPO; LoRA on attention, and with ``lm_head`` in ``modules_to_save``): equal losses step by step and
  equal adapter weights at the end -- the view is exactly the base model.
* No second copy: the parameters the reference's forward reads are all the policy's (tracked at the
  op level), where an explicit copy reads a full second set of base weights.
* The frozen head gets no gradient; LoRA on the head itself is refused with a clear error.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

peft = pytest.importorskip("peft")

from prefloss.hf import PreferenceConfig, PreferenceTrainer  # noqa: E402
from prefloss.hf.adapters import AdaptersDisabled  # noqa: E402
from prefloss.hf.tiny import byte_level_tokenizer, tiny_llama  # noqa: E402

LOSS_SETTINGS = {
    "alpha_dpo": {},
    "epsilon_dpo": {"beta": 0.5, "epsilon": 0.3, "loss_kwargs": {"compare_dtype": None}},
    "dpo": {"beta": 0.5},
    "simpo": {},
}


def _lora(modules_to_save=None):
    return peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=modules_to_save,
    )


def _train(
    tmp_path, preference_rows, loss: str, *, explicit_reference: bool, modules_to_save=None
) -> PreferenceTrainer:
    tok = byte_level_tokenizer()
    base = tiny_llama(tok, hidden_size=32, intermediate_size=64, num_heads=2, seed=0)
    ref = copy.deepcopy(base) if explicit_reference and loss != "simpo" else None
    args = PreferenceConfig(
        output_dir=str(tmp_path / loss),
        loss=loss,
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=0.05,
        optim="sgd",
        report_to=[],
        use_cpu=True,
        max_length=48,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        seed=0,
        **LOSS_SETTINGS[loss],
    )
    torch.manual_seed(0)  # LoRA's A matrices
    trainer = PreferenceTrainer(
        base,
        ref_model=ref,
        args=args,
        train_dataset=preference_rows(16),
        processing_class=tok,
        peft_config=_lora(modules_to_save),
    )
    trainer.train()
    return trainer


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and "step" in h]


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]], ids=["lora", "lora+saved-head"])
@pytest.mark.parametrize("loss", list(LOSS_SETTINGS), ids=list(LOSS_SETTINGS))
def test_adapters_disabled_reference_equals_a_frozen_copy(
    tmp_path, loss, modules_to_save, preference_rows
) -> None:
    view = _train(
        tmp_path / "view", preference_rows, loss, explicit_reference=False, modules_to_save=modules_to_save
    )
    copied = _train(
        tmp_path / "copy", preference_rows, loss, explicit_reference=True, modules_to_save=modules_to_save
    )
    if loss != "simpo":
        assert isinstance(view.ref_model, AdaptersDisabled)
        assert not isinstance(copied.ref_model, AdaptersDisabled)
    assert _losses(view) == pytest.approx(_losses(copied), rel=1e-6, abs=1e-7)
    assert len(set(_losses(view))) > 1, "the policy never moved: the comparison proves nothing"
    trained = {n: p for n, p in view.model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trained)
    for name, p in copied.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(trained[name], p, rtol=1e-6, atol=1e-7, msg=name)
    head = view.model.get_output_embeddings()
    if modules_to_save:  # the saved copy trains, the original (the reference's head) does not
        assert head.modules_to_save["default"].weight.requires_grad
        assert not torch.equal(head.modules_to_save["default"].weight, head.original_module.weight)
    else:
        assert not head.weight.requires_grad and head.weight.grad is None, "a frozen head got a gradient"


class _ParameterReads(TorchDispatchMode):
    """Records the storages of the given parameters that any op reads while active."""

    def __init__(self, params) -> None:
        super().__init__()
        self.by_ptr = {p.untyped_storage().data_ptr(): p for p in params}
        self.read: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for x in torch.utils._pytree.tree_leaves((args, kwargs or {})):
            if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() in self.by_ptr:
                self.read[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("explicit", [False, True], ids=["adapters-disabled", "frozen-copy"])
def test_reference_holds_no_second_copy_of_the_weights(tmp_path, explicit, preference_rows) -> None:
    trainer = _train(tmp_path, preference_rows, "dpo", explicit_reference=explicit)
    policy_bytes = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    ref = trainer.ref_model
    others = [p for p in ref.parameters() if p.untyped_storage().data_ptr() not in policy_bytes]
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad(), _ParameterReads([*trainer.model.parameters(), *others]) as reads:
        ref(input_ids=ids)
    extra = sum(n for ptr, n in reads.read.items() if ptr not in policy_bytes)
    base_bytes = sum(p.numel() * p.element_size() for p in trainer.model.get_base_model().parameters())
    if explicit:
        assert extra >= 0.9 * base_bytes, (extra, base_bytes)  # a whole second model
    else:
        assert extra == 0 and len(reads.read) > 0, (extra, len(reads.read))
        assert sum(p.numel() for p in ref.parameters()) == 0  # the view registers nothing


def test_lora_on_the_head_is_refused(tmp_path, preference_rows) -> None:
    tok = byte_level_tokenizer()
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"])
    args = PreferenceConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_length=48)
    with pytest.raises(ValueError, match=r"lm_head in target_modules.*modules_to_save"):
        PreferenceTrainer(
            tiny_llama(tok, hidden_size=32),
            args=args,
            train_dataset=preference_rows(2),
            processing_class=tok,
            peft_config=config,
        )


@pytest.mark.slow
def test_prefloss_train_lora_learns_with_adapters_only(tmp_path) -> None:
    import argparse

    from prefloss.commands import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    argv = ["--lora", "--lora-r", "4", "--learning-rate", "5e-3", "--max-steps", "30", "--eval-steps", "30"]
    args = parser.parse_args(
        [*argv, "--save-steps", "30", "--quiet", "--no-plot", "--output-dir", str(tmp_path)]
    )
    assert train.run(args) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    model = metrics["model"]
    assert model["lora"] == {"r": 4, "alpha": 16.0}
    assert 0 < model["trainable_parameters"] < model["parameters"] / 10, model
    before, after = metrics["heldout"]["before"], metrics["heldout"]["after"]
    assert after["preference_accuracy"] >= before["preference_accuracy"] + 0.1, (before, after)
    assert after["implicit_reward_accuracy"] > 0.6, after
