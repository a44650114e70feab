"""`PreferenceTrainer` / `PreferenceConfig`: losses, reference handling, metrics, β timing, checkpoints.

A tiny Llama (hidden 32) on the first pairs of the shipped synthetic data, a few steps each.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from transformers import AutoModel, TrainerCallback

from prefloss import reference
from prefloss.data import synthetic_preferences_path
from prefloss.hf.model import unwrap_model
from prefloss.hf.tiny import byte_level_tokenizer, tiny_llama
from prefloss.hf.trainer import (
    LOSS_NAME_FILE,
    LOSS_STATE_NAME,
    NonFiniteLossError,
    PreferenceConfig,
    PreferenceTrainer,
)
from prefloss.testing import loss_error_bounds, plain_logprobs, sequence_error_scale

with open(synthetic_preferences_path("train")) as _f:
    ROWS = [json.loads(next(_f)) for _ in range(32)]


def config(tmp_path, **kwargs) -> PreferenceConfig:
    defaults = dict(
        output_dir=str(tmp_path),
        loss="alpha_dpo",
        max_steps=2,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        max_length=48,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    defaults.update(kwargs)
    return PreferenceConfig(**defaults)


def make_trainer(tmp_path, *, model=None, **kwargs) -> PreferenceTrainer:
    tok = byte_level_tokenizer()
    if model is None:
        model = tiny_llama(tok, hidden_size=32, intermediate_size=64, num_heads=2, seed=0)
    ref_model = kwargs.pop("ref_model", None)
    return PreferenceTrainer(
        model,
        ref_model=ref_model,
        args=config(tmp_path, **kwargs),
        train_dataset=ROWS,
        eval_dataset=ROWS[:4],
        processing_class=tok,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(loss="ipo"),
            r"unknown loss 'ipo': expected one of \['alpha_dpo', 'dpo', 'epsilon_dpo', 'simpo'\]",
        ),
        (
            dict(loss="epsilon_dpo", precompute_ref_log_probs=True),
            "precompute_ref_log_probs=True.*epsilon_dpo",
        ),
        (dict(loss="dpo", alpha=0.2), r"alpha=0.2 does not apply to loss 'dpo', which takes \['beta'\]"),
        (dict(loss="simpo", epsilon=0.1), "epsilon=0.1 does not apply to loss 'simpo'"),
        (dict(remove_unused_columns=True), "remove_unused_columns"),
        (dict(max_length=16, max_prompt_length=16), "max_prompt_length"),
        (
            dict(loss="epsilon_dpo", loss_kwargs='{"compare_dtype": "bf16"}'),
            r"loss_kwargs\['compare_dtype'\] must be 'bfloat16', 'float16', 'float32' or None, got 'bf16'",
        ),
        (dict(max_nonfinite_steps=0), r"max_nonfinite_steps must be an integer >= 1 or None, got 0"),
    ],
    ids=[
        "unknown-loss",
        "epsilon-precompute",
        "alpha-for-dpo",
        "epsilon-for-simpo",
        "remove-columns",
        "prompt-length",
        "compare-dtype-name",
        "nonfinite-steps-0",
    ],
)
def test_bad_config_is_an_error(tmp_path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **kwargs)


COMPARE_DTYPES = {
    "bfloat16": ("bfloat16", torch.bfloat16),
    "float32": ("float32", None),
    "null": (None, None),
}


@pytest.mark.parametrize("name", list(COMPARE_DTYPES), ids=list(COMPARE_DTYPES))
def test_compare_dtype_by_name_from_the_command_line(tmp_path, name: str) -> None:
    """``--loss_kwargs '{"compare_dtype": "bfloat16"}'`` builds ε-DPO with ``torch.bfloat16`` (the name
    is turned into the dtype as `prefloss.trl.DPOConfig` does: `loss_module_kwargs`); the config keeps
    the name, so it still serializes to JSON."""
    from transformers import HfArgumentParser

    value, dtype = COMPARE_DTYPES[name]
    argv = ["--output_dir", str(tmp_path), "--loss", "epsilon_dpo", "--use_cpu", "--report_to", "none"]
    argv += ["--loss_kwargs", json.dumps({"compare_dtype": value})]
    (args,) = HfArgumentParser(PreferenceConfig).parse_args_into_dataclasses(argv)
    assert args.loss_kwargs == {"compare_dtype": value}
    tok = byte_level_tokenizer()
    model = tiny_llama(tok, hidden_size=32, intermediate_size=64, num_heads=2, seed=0)
    trainer = PreferenceTrainer(model, args=args, train_dataset=ROWS[:4], processing_class=tok)
    assert trainer.loss_fn.compare_dtype is dtype
    assert json.loads(args.to_json_string())["loss_kwargs"] == {"compare_dtype": value}


def test_simpo_with_reference_model_is_an_error(tmp_path) -> None:
    tok = byte_level_tokenizer()
    ref = tiny_llama(tok, hidden_size=32, intermediate_size=64, num_heads=2)
    with pytest.raises(ValueError, match="'simpo' does not use a reference model"):
        make_trainer(tmp_path, loss="simpo", ref_model=ref)


def test_given_loss_module_decides_reference_and_beta_updates(tmp_path) -> None:
    import prefloss
    from prefloss.hf.trainer import _BetaUpdate

    tok = byte_level_tokenizer()
    model = tiny_llama(tok, hidden_size=32, intermediate_size=64, num_heads=2)
    eps = prefloss.EpsilonDPOLoss(beta=0.1, epsilon=0.1)
    args = config(tmp_path)
    trainer = PreferenceTrainer(model, args=args, train_dataset=ROWS, processing_class=tok, loss_fn=eps)
    assert trainer.loss_fn is eps and trainer.ref_model is not None
    assert any(isinstance(cb, _BetaUpdate) for cb in trainer.callback_handler.callbacks)
    with pytest.raises(ValueError, match="precompute_ref_log_probs=True does not work with an ε-DPO loss"):
        PreferenceTrainer(
            model,
            args=config(tmp_path, precompute_ref_log_probs=True),
            train_dataset=ROWS,
            processing_class=tok,
            loss_fn=eps,
        )
    with pytest.raises(TypeError, match="loss_fn must be one of prefloss's"):
        PreferenceTrainer(
            model, args=config(tmp_path), train_dataset=ROWS, processing_class=tok, loss_fn=torch.nn.MSELoss()
        )


def test_model_without_output_embedding_is_an_error(tmp_path) -> None:
    tok = byte_level_tokenizer()
    base = AutoModel.from_config(tiny_llama(tok, hidden_size=32, intermediate_size=64, num_heads=2).config)
    with pytest.raises(ValueError, match="no output embedding"):
        make_trainer(tmp_path, model=base)


def test_bad_training_data_is_an_error(tmp_path) -> None:
    tok = byte_level_tokenizer()
    model = tiny_llama(tok, hidden_size=32, intermediate_size=64, num_heads=2)
    rows = [dict(r) for r in ROWS[:4]]
    rows[2]["rejected"] = ""
    with pytest.raises(ValueError, match="row 2: 'rejected' is an empty response"):
        PreferenceTrainer(model, args=config(tmp_path), train_dataset=rows, processing_class=tok)


@pytest.mark.parametrize(
    "loss", ["alpha_dpo", "epsilon_dpo", "dpo", "simpo"], ids=["alpha", "epsilon", "dpo", "simpo"]
)
def test_trains_and_logs_spec_metrics(tmp_path, loss: str) -> None:
    trainer = make_trainer(tmp_path, loss=loss)
    assert (trainer.ref_model is None) == (loss == "simpo")
    if trainer.ref_model is not None:
        assert not any(p.requires_grad for p in trainer.ref_model.parameters())
        assert not trainer.ref_model.training
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for name in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "logps/chosen"):
        assert name in logs[0], f"{name} not logged; got {sorted(logs[0])}"
    if loss == "epsilon_dpo":
        assert "kl/beta" in logs[0] and "kl/avg_steps" in logs[0]
    metrics = trainer.evaluate()
    assert "eval_rewards/accuracies" in metrics and "eval_loss" in metrics


def test_epsilon_beta_updates_once_per_optimizer_step(tmp_path) -> None:
    """With 3 micro-batches per step, β is updated after the 3rd, 6th, ... forward, never in between."""
    trainer = make_trainer(
        tmp_path, loss="epsilon_dpo", max_steps=3, gradient_accumulation_steps=3, epsilon=0.2
    )
    loss_fn = trainer.loss_fn
    events: list[str] = []
    forward, update = loss_fn.forward, loss_fn.update_beta

    def counting_forward(*args, **kwargs):
        events.append("f")
        return forward(*args, **kwargs)

    def counting_update():
        events.append("u")
        return update()

    loss_fn.forward, loss_fn.update_beta = counting_forward, counting_update
    betas = []
    trainer.train()
    assert "".join(events) == "fffu" * 3
    betas = [h["kl/beta"] for h in trainer.state.log_history if "kl/beta" in h]
    steps = [h["kl/avg_steps"] for h in trainer.state.log_history if "kl/avg_steps" in h]
    expected = 0.01
    for beta, s in zip(betas, steps, strict=True):
        assert beta == pytest.approx(expected, rel=1e-6)
        expected = expected / (1 + 0.2 * s)
    assert float(loss_fn.beta) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("loss", ["alpha_dpo", "dpo", "simpo"], ids=["alpha", "dpo", "simpo"])
def test_precomputed_reference_matches_live_reference(tmp_path, loss: str) -> None:
    live = make_trainer(tmp_path / "live", loss=loss, max_steps=3)
    live.train()
    pre = make_trainer(tmp_path / "pre", loss=loss, max_steps=3, precompute_ref_log_probs=True)
    assert pre.ref_model is None
    if loss != "simpo":
        assert "ref_chosen_logps" in pre.train_dataset.column_names
    pre.train()
    a = [h["loss"] for h in live.state.log_history if "loss" in h]
    b = [h["loss"] for h in pre.state.log_history if "loss" in h]
    assert a == pytest.approx(b, abs=1e-5)


def test_loss_state_saved_and_restored_on_resume(tmp_path) -> None:
    """ε-DPO's β and the weights after resuming from step 2 equal those of an uninterrupted 4-step run."""
    kwargs = dict(loss="epsilon_dpo", epsilon=0.3, max_steps=4, save_strategy="steps", save_steps=2)
    full = make_trainer(tmp_path / "full", **kwargs)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    state = torch.load(checkpoint / LOSS_STATE_NAME, weights_only=True)
    assert "beta" in state
    beta_at_2 = [h["kl/beta"] for h in full.state.log_history if "kl/beta" in h][2]
    assert float(state["beta"]) == pytest.approx(beta_at_2, rel=1e-6)

    resumed = make_trainer(tmp_path / "resumed", **kwargs)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert float(resumed.loss_fn.beta) == pytest.approx(float(full.loss_fn.beta), rel=1e-6)
    for (name, a), b in zip(
        unwrap_model(full.model).named_parameters(), unwrap_model(resumed.model).parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_resume_from_checkpoint_without_loss_state_is_an_error(tmp_path) -> None:
    trainer = make_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    trainer.train()
    os.remove(tmp_path / "checkpoint-1" / LOSS_STATE_NAME)
    again = make_trainer(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match=f"has no {LOSS_STATE_NAME}"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_gemma2_softcap_model_with_conversational_data(tmp_path) -> None:
    """Another family (soft-capped logits, tied embeddings) and chat-formatted rows, through the Trainer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = byte_level_tokenizer()
    cfg = AutoConfig.for_model(
        "gemma2",
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=2.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    rows = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in ROWS[:8]
    ]
    args = config(tmp_path, loss="dpo", max_length=96)
    trainer = PreferenceTrainer(model, args=args, train_dataset=rows, processing_class=tok)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


# --- bf16=True on fp32 weights: accelerate runs the forwards under CPU bf16 autocast ---------------------

U32 = torch.finfo(torch.float32).eps / 2
U_BF16 = torch.finfo(torch.bfloat16).eps / 2


def tiny(seed: int, head_scale: float = 1.0):
    """The tiny Llama; ``head_scale`` multiplies its LM head (20: logits of std ≈ 2, a trained LM's size,
    instead of 0.1)."""
    model = tiny_llama(byte_level_tokenizer(), hidden_size=32, intermediate_size=64, num_heads=2, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model


class _Gradients(TrainerCallback):
    """Keeps the parameter gradients of the step (before the optimizer moves the weights)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in unwrap_model(model).named_parameters()}


def bf16_dpo_step_config(tmp_path, pairs: int, **kwargs) -> PreferenceConfig:
    """`config` for one DPO step (β 0.1) with ``bf16=True`` on batches of ``pairs`` pairs."""
    return config(
        tmp_path, loss="dpo", beta=0.1, max_steps=1, bf16=True, per_device_train_batch_size=pairs, **kwargs
    )


def test_bf16_autocast_on_fp32_weights_matches_autocast_pytorch(tmp_path) -> None:
    """One DPO step with ``bf16=True`` on fp32 weights equals plain PyTorch under the same autocast.

    Expected: policy (seed 0) and reference (seed 1), heads scaled to a trained LM's logits, run under
    ``torch.autocast("cpu", bfloat16)``; their last hidden states (fp32: the residual stream is fp32)
    go through the float64 head and loss of `prefloss.reference`, backward included. The trainer's
    loss may be off that float64 loss by `loss_error_bounds` (its fused op computes the head in fp32
    from the same hidden states; measured 8e-9 against a bound of 2e-5). Gradients: the head's and
    the final norm's are formed in fp32 outside autocast, so they agree to ``grad_rtol`` (measured
    3e-7); every other one flows back through the same bf16 autocast GEMMs, whose bf16-rounded
    outputs turn the fp32-level difference of the upstream gradient into rounding flips:
    ``4·u_bf16`` relative, as in test_trl_dpo (measured 5.5e-4 = 0.14·u_bf16).

    Before the fix the first step raised: the output-head check compared the model's bf16-autocast
    logits with the fused op's fp32 log-probs at the fp32 tolerance ("differ ... by 0.0174 (allowed
    0.001)").
    """
    grad_rtol = 1e-5
    pairs = 2
    recorder = _Gradients()
    args = bf16_dpo_step_config(tmp_path, pairs, max_grad_norm=0.0)
    trainer = PreferenceTrainer(
        tiny(0, head_scale=20.0),
        ref_model=tiny(1, head_scale=20.0),
        args=args,
        train_dataset=ROWS[:pairs],  # one batch: both pairs
        processing_class=byte_level_tokenizer(),
        callbacks=[recorder],
    )
    assert trainer.args.bf16 and trainer.accelerator.native_amp
    trainer.train()
    loss = trainer.state.log_history[0]["loss"]

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(pairs)])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["shift_labels"]
    policy, ref = tiny(0, head_scale=20.0), tiny(1, head_scale=20.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = policy(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        with torch.no_grad():
            ref_hidden = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    weight, ref_weight = policy.lm_head.weight, ref.lm_head.weight.detach()
    truth = reference.preference_loss(
        "dpo", hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, beta=0.1
    )
    truth.backward()

    kw = dict(ref_hidden=ref_hidden, ref_weight=ref_weight)
    exact = reference.token_logprobs(hidden.detach(), weight.detach(), labels, **kw)
    plain = plain_logprobs(hidden.detach(), weight.detach(), labels, **kw)
    kinds = ("policy", "ref")
    bounds = loss_error_bounds(
        "dpo",
        {k: getattr(exact, k).sum(-1) for k in kinds},
        (labels != -100).sum(-1),
        {k: sequence_error_scale(getattr(plain, k), getattr(exact, k)) for k in kinds},
        dtype=torch.float32,
        beta=0.1,
    )
    assert abs(loss - truth.item()) <= bounds.loss_bound, (loss, truth.item(), bounds.loss_bound)

    for name, p in policy.named_parameters():
        got, expected = recorder.grads[name], p.grad
        rel = float((got - expected).norm() / expected.norm().clamp(min=1e-30))
        tol = grad_rtol if name in ("lm_head.weight", "model.norm.weight") else 4 * U_BF16
        assert rel <= tol, (name, rel, tol)


@pytest.mark.parametrize("precompute", [False, True], ids=["live", "precomputed"])
def test_bf16_reference_copy_computes_like_the_policy(tmp_path, precompute: bool) -> None:
    """With ``bf16=True`` the reference (a copy of the initial policy) runs under the policy's autocast.

    At the first step policy and reference are the same weights on the same batch, so DPO's rewards
    ``β·(π − ρ)`` are 0 up to the fp32 roundings of the sums: ``|reward| <= β·4·u32·|logps|``
    (2.3e-6 here; measured: exactly 0). Before the fix the reference ran in fp32 while the policy ran
    under bf16 autocast: rewards/chosen was 3.4e-5 (live and precomputed alike).
    """
    pairs = 2
    args = bf16_dpo_step_config(
        tmp_path, pairs, precompute_ref_log_probs=precompute, per_device_eval_batch_size=pairs
    )
    trainer = PreferenceTrainer(
        tiny(0), args=args, train_dataset=ROWS[:pairs], processing_class=byte_level_tokenizer()
    )
    trainer.train()
    logs = trainer.state.log_history[0]
    for side in ("chosen", "rejected"):
        bound = 0.1 * 4 * U32 * abs(logs[f"logps/{side}"])
        assert abs(logs[f"rewards/{side}"]) <= bound, (side, logs[f"rewards/{side}"], bound)


def _inject_nonfinite_losses(trainer: PreferenceTrainer, calls: set[int], *, poison_gradients: bool) -> None:
    """Make the loss of the given forward calls (1-based) NaN. ``poison_gradients``: NaN gradients too
    (``loss * nan``); otherwise the value only (``loss + nan - loss.detach()``: the gradients stay finite,
    so later steps can be finite again)."""
    forward = trainer.loss_fn.forward
    count = [0]

    def nan_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        count[0] += 1
        if count[0] in calls and trainer.model.training:
            nan = torch.tensor(float("nan"))
            out.loss = out.loss * nan if poison_gradients else out.loss + nan - out.loss.detach()
        return out

    trainer.loss_fn.forward = nan_forward


@pytest.mark.parametrize("what", ["loss", "gradient"], ids=["nan-loss", "nan-gradient"])
def test_nonfinite_step_stops_before_the_update_and_is_logged(tmp_path, what: str) -> None:
    """A NaN loss (so NaN gradients), or a finite loss with a NaN gradient, at step 3: logged as NaN
    (not transformers' filtered 0.0), training stops with NonFiniteLossError before step 3's update,
    the weights stay step 2's (finite), and no checkpoint is written after step 2."""
    from safetensors.torch import load_file

    trainer = make_trainer(tmp_path, loss="dpo", max_steps=6, save_strategy="steps", save_steps=1)
    if what == "loss":
        _inject_nonfinite_losses(trainer, {3}, poison_gradients=True)
        match = r"stopped at step 3: the loss was nan, non-finite for 1 consecutive .*max_nonfinite_steps=1"
    else:
        weight = unwrap_model(trainer.model).model.layers[0].mlp.down_proj.weight
        weight.register_hook(lambda g: g * float("nan") if trainer.state.global_step == 2 else g)
        match = r"stopped at step 3: the loss was [0-9.]+ and the gradient norm nan, non-finite for 1"
    with pytest.raises(NonFiniteLossError, match=match):
        trainer.train()
    logs = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert sorted(logs) == [1, 2, 3]
    assert all(math.isfinite(logs[s]["loss"]) and math.isfinite(logs[s]["grad_norm"]) for s in (1, 2))
    assert math.isnan(logs[3]["loss" if what == "loss" else "grad_norm"])
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    saved = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    for name, param in unwrap_model(trainer.model).named_parameters():
        assert torch.isfinite(param).all(), name
        if name in saved:
            torch.testing.assert_close(param.detach(), saved[name], rtol=0, atol=0, msg=name)


def test_nonfinite_steps_limit_counts_consecutive_steps(tmp_path) -> None:
    """max_nonfinite_steps=2: a lone NaN step (2) is logged as NaN and training goes on; a finite step
    resets the count; the 2nd consecutive one (steps 4, 5) stops training at step 5."""
    trainer = make_trainer(tmp_path, loss="simpo", max_steps=6, max_nonfinite_steps=2)
    _inject_nonfinite_losses(trainer, {2, 4, 5}, poison_gradients=False)
    with pytest.raises(NonFiniteLossError, match=r"stopped at step 5: .* for 2 consecutive"):
        trainer.train()
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    assert sorted(losses) == [1, 2, 3, 4, 5]
    assert [math.isnan(losses[s]) for s in range(1, 6)] == [False, True, False, True, True]
    assert trainer.state.global_step == 4


def test_resume_with_another_loss_names_both_losses(tmp_path) -> None:
    trainer = make_trainer(tmp_path, loss="epsilon_dpo", max_steps=1, save_strategy="steps", save_steps=1)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-1"
    assert json.loads((checkpoint / LOSS_NAME_FILE).read_text()) == {"loss": "epsilon_dpo"}
    again = make_trainer(tmp_path, loss="dpo", max_steps=2)
    with pytest.raises(ValueError, match="loss 'epsilon_dpo', but this trainer's loss is 'dpo'"):
        again.train(resume_from_checkpoint=str(checkpoint))
    os.remove(checkpoint / LOSS_NAME_FILE)  # a checkpoint from before the file existed: the keys tell
    with pytest.raises(ValueError, match="does not fit this trainer's loss 'dpo'.*another loss"):
        again.train(resume_from_checkpoint=str(checkpoint))


def test_resume_of_a_finished_run_trains_nothing(tmp_path) -> None:
    """transformers would train a 3rd step (and write checkpoint-3) when resuming step 2 of 2."""
    trainer = make_trainer(tmp_path, loss="alpha_dpo", max_steps=2, save_strategy="steps", save_steps=1)
    trainer.train()
    again = make_trainer(tmp_path, loss="alpha_dpo", max_steps=2, save_strategy="steps", save_steps=1)
    forwards = []
    forward = again.loss_fn.forward
    again.loss_fn.forward = lambda *a, **k: forwards.append(1) or forward(*a, **k)
    with pytest.warns(UserWarning, match="already reached max_steps=2: nothing to train"):
        out = again.train(resume_from_checkpoint=True)
    assert forwards == [] and out.global_step == again.state.global_step == 2
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    for (name, a), b in zip(
        unwrap_model(trainer.model).named_parameters(), unwrap_model(again.model).parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    state = trainer.loss_fn.state_dict()
    for key, value in again.loss_fn.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
