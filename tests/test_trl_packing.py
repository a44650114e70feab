"""`prefloss.trl.DPOTrainer(padding_free=True)` against stock TRL 1.16 with padding, on the same tokens.

TRL 1.16 disables ``padding_free`` (it warns and pads), so stock TRL with padding is the independent
computation: the same tiny random Llama policy (seed 0) and reference (seed 1), the same rows and seed,
so both tokenize and batch identically. prefloss packs each micro-batch into one row (position ids
restarting at each sequence, no attention mask) for both forwards and the loss.

Tolerances, as in tests/test_trl_dpo.py: two correct fp32 computations of the same step differ by a few
``√K·u`` relative (u = 6e-8, reductions of K ≤ 10³ terms); packing adds one more change of summation
order (sdpa over a block-causal mask instead of a padded one: measured ≤ 2.4e-7 on the hidden
states). Loss and metrics: 1e-5 relative; gradients: `GRAD_RTOL` = 1e-5 relative (measured ≤ 1e-6).
A leaked token or label moves the loss by 1e-3 or more.
"""

from __future__ import annotations

import math

import pytest
import torch

trl = pytest.importorskip("trl")

import datasets  # noqa: E402

import prefloss.trl as ptrl  # noqa: E402
from prefloss.hf.tiny import byte_level_tokenizer, tiny_llama  # noqa: E402

PAIRS = 4
GRAD_RTOL = 1e-5
pytestmark = pytest.mark.usefixtures("quiet_hf")


@pytest.fixture
def make_pair(preference_rows, tiny_training_args):
    """``make_pair(root, **config)``: (stock TRL trainer with padding, prefloss.trl trainer with
    ``padding_free=True``) on the same models, rows and arguments."""

    def make(root, **config):
        tok = byte_level_tokenizer()
        trainers = []
        for cls, config_cls, extra in (
            (trl.DPOTrainer, trl.DPOConfig, {}),
            (ptrl.DPOTrainer, ptrl.DPOConfig, {"padding_free": True}),
        ):
            rows = [dict(r, origin=cls.__module__) for r in preference_rows()]  # own dataset fingerprint
            args = config_cls(**{**tiny_training_args(root / cls.__module__, pairs=PAIRS), **config, **extra})
            trainers.append(
                cls(
                    model=tiny_llama(tok, hidden_size=32, seed=0),
                    ref_model=tiny_llama(tok, hidden_size=32, seed=1),
                    args=args,
                    train_dataset=datasets.Dataset.from_list(rows),
                    processing_class=tok,
                )
            )
        return trainers

    return make


def _step(trainer, batch) -> tuple[float, dict[str, float], dict[str, torch.Tensor]]:
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(model, trainer._prepare_inputs(dict(batch)))
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), metrics, grads


def test_padding_free_step_matches_trl_with_padding(tmp_path, make_pair) -> None:
    """One micro-batch: loss, every metric both log (with ``log_vocab_metrics``: TRL's entropy,
    logits and token accuracy from the unpacked hidden states) and every gradient."""
    stock, ours = make_pair(tmp_path)
    ours.args.log_vocab_metrics = True
    assert ours.padding_free and ours.args.padding_free and not stock.padding_free
    batch = stock.data_collator([stock.train_dataset[i] for i in range(PAIRS)])
    mask = batch["attention_mask"]
    assert (mask == 0).float().mean() > 0.1, "the batch must hold padding, else packing changes nothing"
    loss_t, metrics_t, grads_t = _step(stock, batch)
    loss_p, metrics_p, grads_p = _step(ours, batch)
    assert math.isclose(loss_p, loss_t, rel_tol=1e-5), (loss_p, loss_t)
    shared = set(metrics_t) & set(metrics_p)
    assert {"rewards/margins", "logps/chosen", "entropy", "mean_token_accuracy", "num_tokens"} <= shared
    for name in shared:
        assert math.isclose(metrics_p[name], metrics_t[name], rel_tol=1e-5, abs_tol=1e-6), (
            name,
            metrics_p[name],
            metrics_t[name],
        )
    assert grads_p.keys() == grads_t.keys() and grads_p
    worst = max((float((grads_p[n] - grads_t[n]).norm() / grads_t[n].norm()), n) for n in grads_t)
    assert worst[0] <= GRAD_RTOL, worst


def test_padding_free_training_matches_trl(tmp_path, make_pair) -> None:
    """``train()``: 2 steps of 2 micro-batches of 2 pairs log TRL's losses and rewards."""
    stock, ours = make_pair(
        tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2
    )
    logs = []
    for trainer in (stock, ours):
        trainer.train()
        logs.append([h for h in trainer.state.log_history if "loss" in h])
    assert len(logs[0]) == len(logs[1]) == 2
    for t, p in zip(*logs, strict=True):
        for name in ("loss", "rewards/chosen", "rewards/margins", "logps/rejected"):
            assert math.isclose(p[name], t[name], rel_tol=1e-4, abs_tol=1e-5), (name, t[name], p[name])
        assert p["rewards/accuracies"] == t["rewards/accuracies"]


def test_padding_free_with_a_vision_language_model_is_refused(tmp_path, tiny_training_args) -> None:
    """Image rows' vision inputs belong to their rows: a VLM with ``padding_free`` is refused by name."""
    from prefloss.hf.tiny import tiny_image_preferences, tiny_vision_model, tiny_vision_processor

    processor = tiny_vision_processor("llava")
    args = ptrl.DPOConfig(**tiny_training_args(tmp_path, pairs=2), padding_free=True)
    with pytest.raises(ValueError, match=r"prefloss.trl does not implement padding_free=True: .*vision"):
        ptrl.DPOTrainer(
            model=tiny_vision_model("llava", processor, seed=0),
            ref_model=tiny_vision_model("llava", processor, seed=1),
            args=args,
            train_dataset=datasets.Dataset.from_list(tiny_image_preferences(2)),
            processing_class=processor,
        )
