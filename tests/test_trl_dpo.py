"""`prefloss.trl.DPOTrainer` against TRL 1.16's own ``DPOTrainer`` (independent code) and float64.

Both trainers are built the same way (same tiny random Llama policy and reference, same rows, same
seed), so they tokenize and batch identically; on one batch, each computes its loss and backward:
TRL with its chunked LM head, prefloss with its fused op. Checked: the loss, every metric both log,
and every parameter gradient -- with a live reference, with precomputed reference log-probs, and with
a LoRA policy (reference = adapters disabled); then a 3-step ``train()`` (also with
``sync_ref_model``) logs the same losses. ε-DPO and α-DPO have no TRL counterpart: their first step
is checked against `prefloss.reference` in float64, and a 3-step run against prefloss's own
`PreferenceTrainer`.

Tolerances. A correct fp32 loss may be off the float64 truth by `prefloss.testing.loss_error_bounds`
(each per-row sum moved by its fp32 error scale, propagated through the float64 loss); two correct fp32
computations (TRL's, prefloss's) may differ by twice that. The same per-row error scales bound the
metrics (rewards are ``β·(π − ρ)``, logps the sums). Gradients: the two backward passes form the same
sums in different orders (TRL chunks 32768 rows, prefloss 2048 rows × 2048 vocabulary tiles); at
fp32 their relative difference is a few units of ``√K·u`` for reductions of K ≤ 10³ terms
(u = 6e-8): `GRAD_RTOL` = 1e-5 leaves an order of magnitude over the ≤ 1e-6 measured.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

trl = pytest.importorskip("trl")

import datasets  # noqa: E402

import prefloss.trl as ptrl  # noqa: E402
from prefloss import reference  # noqa: E402
from prefloss.data import synthetic_preferences_path  # noqa: E402
from prefloss.hf import PreferenceConfig, PreferenceTrainer  # noqa: E402
from prefloss.hf.tiny import byte_level_tokenizer, tiny_llama  # noqa: E402
from prefloss.testing import ERROR_MARGIN, loss_error_bounds, plain_logprobs, sequence_error_scale  # noqa: E402

GRAD_RTOL = 1e-5
PAIRS = 4  # per batch
U32 = torch.finfo(torch.float32).eps / 2


pytestmark = pytest.mark.usefixtures("quiet_hf")


def _with_origin(rows: list[dict], origin: str) -> list[dict]:
    # `origin` only changes the dataset's fingerprint, so that TRL's precompute cache (keyed by it)
    # is never shared between the two trainers of a test.
    return [dict(r, origin=origin) for r in rows]


@pytest.fixture
def make_trainer(preference_rows, tiny_training_args):
    """``make_trainer(cls, config_cls, root, ...)``: a DPO trainer on the tiny Llama policy (seed 0) and
    reference (seed 1, ``ref=True``), 12 synthetic pairs and conftest's tiny training arguments."""

    def make(
        cls,
        config_cls,
        root,
        *,
        ref=True,
        rows=None,
        peft_config=None,
        peft_model=None,
        eval_rows=None,
        **config,
    ):
        tok = byte_level_tokenizer()
        policy = tiny_llama(tok, hidden_size=32, seed=0)
        if peft_model is not None:  # a PeftModel with a trained adapter, given as the model
            import peft

            torch.manual_seed(0)
            policy = peft.get_peft_model(policy, peft_model)
        ref_model = tiny_llama(tok, hidden_size=32, seed=1) if ref else None
        defaults = tiny_training_args(root / cls.__module__.split(".")[0], pairs=PAIRS)
        args = config_cls(**{**defaults, **config})
        return cls(
            model=policy,
            ref_model=ref_model,
            args=args,
            train_dataset=datasets.Dataset.from_list(
                rows if rows is not None else _with_origin(preference_rows(), "")
            ),
            processing_class=tok,
            peft_config=peft_config,
            eval_dataset=None if eval_rows is None else datasets.Dataset.from_list(eval_rows),
        )

    return make


@pytest.fixture
def make_pair(make_trainer, preference_rows):
    """``make_pair(root, **kwargs)``: (stock TRL trainer, prefloss.trl trainer) on the same models and
    rows."""

    def make(root, **kwargs):
        rows = preference_rows()
        stock = make_trainer(trl.DPOTrainer, trl.DPOConfig, root, rows=_with_origin(rows, "trl"), **kwargs)
        ours = make_trainer(
            ptrl.DPOTrainer, ptrl.DPOConfig, root, rows=_with_origin(rows, "prefloss"), **kwargs
        )
        return stock, ours

    return make


def _batch(trainer) -> dict[str, torch.Tensor]:
    return trainer.data_collator([trainer.train_dataset[i] for i in range(PAIRS)])


def _step(trainer, batch) -> tuple[float, dict[str, float], dict[str, torch.Tensor]]:
    """One micro-batch's loss, logged metrics and parameter gradients."""
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(model, trainer._prepare_inputs(dict(batch)))
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), metrics, grads


def _hidden(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]


def _truth(name: str, model, ref_model, batch, **hp):
    """Float64 loss and per-row bounds of one batch, from full logits of the HF models' hidden states.

    Labels are built here from TRL's unshifted completion mask: token t counts when
    ``completion_mask[t] = 1`` and is predicted from position ``t - 1``.
    """
    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    labels = ids[:, 1:].masked_fill(completion[:, 1:] == 0, -100)
    hidden = _hidden(model, ids, mask)[:, :-1]
    weight = model.get_output_embeddings().weight.detach()
    epsilon = hp.get("epsilon")
    kw = {}
    if ref_model is not None:
        kw = dict(
            ref_hidden=_hidden(ref_model, ids, mask)[:, :-1],
            ref_weight=ref_model.get_output_embeddings().weight,
        )
    exact = reference.token_logprobs(hidden, weight, labels, epsilon=epsilon, **kw)
    plain = plain_logprobs(hidden, weight, labels, epsilon=epsilon, **kw)
    kinds = [k for k in ("policy", "ref", "minus", "plus") if getattr(exact, k) is not None]
    sums = {k: getattr(exact, k).sum(-1) for k in kinds}
    scales = {k: sequence_error_scale(getattr(plain, k), getattr(exact, k)) for k in kinds}
    length = (labels != -100).sum(-1)
    bounds = loss_error_bounds(name, sums, length, scales, dtype=torch.float32, **hp)
    # per-row bound of a correct fp32 sum (what loss_error_bounds moves each input by)
    row_bound = {k: ERROR_MARGIN * scales[k] + 4 * U32 * sums[k].abs() for k in kinds}
    return bounds, sums, row_bound


def _shared_metric_bounds(sums, row_bound, beta: float) -> dict[str, tuple[float, float]]:
    """metric -> (float64 value, bound of a correct fp32 value), for DPO's shared metrics."""
    pc, pr = sums["policy"].chunk(2)
    rc, rr = sums["ref"].chunk(2)
    bpc, bpr = row_bound["policy"].chunk(2)
    brc, brr = row_bound["ref"].chunk(2)
    reward_c, reward_r = beta * (pc - rc), beta * (pr - rr)
    bound_c, bound_r = beta * (bpc + brc), beta * (bpr + brr)
    return {
        "rewards/chosen": (reward_c.mean().item(), bound_c.mean().item()),
        "rewards/rejected": (reward_r.mean().item(), bound_r.mean().item()),
        "rewards/margins": ((reward_c - reward_r).mean().item(), (bound_c + bound_r).mean().item()),
        "logps/chosen": (pc.mean().item(), bpc.mean().item()),
        "logps/rejected": (pr.mean().item(), bpr.mean().item()),
        "rewards/accuracies": ((reward_c > reward_r).double().mean().item(), 0.0),
        "_min_abs_margin": ((reward_c - reward_r).abs().min().item(), (bound_c + bound_r).max().item()),
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _assert_same_step(stock, ours, truth_models, beta=0.1):
    batch = _batch(stock)
    for key in ("input_ids", "completion_mask"):  # the two pipelines produced the same batch
        assert torch.equal(batch[key], _batch(ours)[key])
    loss_t, metrics_t, grads_t = _step(stock, batch)
    loss_p, metrics_p, grads_p = _step(ours, batch)
    bounds, sums, row_bound = _truth("dpo", *truth_models, batch, beta=beta)
    truth = bounds.loss.item()
    assert abs(loss_t - truth) <= bounds.loss_bound, (
        loss_t,
        truth,
        bounds.loss_bound,
    )  # TRL: the bound holds
    assert abs(loss_p - truth) <= bounds.loss_bound, (loss_p, truth, bounds.loss_bound)
    assert abs(loss_p - loss_t) <= 2 * bounds.loss_bound

    expected = _shared_metric_bounds(sums, row_bound, beta)
    margin, margin_bound = expected.pop("_min_abs_margin")
    assert margin > 2 * margin_bound, (
        "a pair's margin is within rounding of 0: accuracies would be a coin toss"
    )
    shared = sorted(set(metrics_t) & set(metrics_p))
    assert set(expected) | {"num_tokens"} <= set(shared), shared
    for name in shared:
        if name in expected:
            value, bound = expected[name]
            assert abs(metrics_p[name] - value) <= bound + 4 * U32 * abs(value), (
                name,
                metrics_p[name],
                value,
            )
            assert abs(metrics_p[name] - metrics_t[name]) <= 2 * bound + 8 * U32 * abs(value), name
        else:
            assert metrics_p[name] == metrics_t[name], name

    assert grads_p.keys() == grads_t.keys() and grads_p
    worst = max((_rel(grads_p[n], grads_t[n]), n) for n in grads_t)
    assert worst[0] <= GRAD_RTOL, worst
    return abs(loss_p - loss_t), worst


def test_dpo_matches_trl_live_reference(tmp_path, make_pair):
    stock, ours = make_pair(tmp_path)
    _assert_same_step(stock, ours, (stock.model, stock.ref_model))


def test_dpo_matches_trl_precomputed_reference(tmp_path, make_pair):
    stock, ours = make_pair(tmp_path, precompute_ref_log_probs=True)
    assert ours.ref_model is not None  # TRL keeps a given ref_model; the loss must not use it
    # prefloss computed the reference sums itself (the caches are not shared: different fingerprints)
    truth_ref = tiny_llama(byte_level_tokenizer(), hidden_size=32, seed=1)
    batch = _batch(stock)
    _, sums, row_bound = _truth("dpo", truth_ref, truth_ref, batch, beta=0.1)
    got = torch.tensor([ours.train_dataset[i]["ref_chosen_logps"] for i in range(PAIRS)])
    got = torch.cat([got, torch.tensor([ours.train_dataset[i]["ref_rejected_logps"] for i in range(PAIRS)])])
    assert ((got.double() - sums["policy"]).abs() <= row_bound["policy"]).all()
    # the loss reads the precomputed column: a reference that moved would not change it
    with torch.no_grad():
        for p in ours.ref_model.parameters():
            p.add_(1.0)
    _assert_same_step(stock, ours, (stock.model, truth_ref))


def test_dpo_matches_trl_lora_policy(tmp_path, make_pair):
    peft = pytest.importorskip("peft")
    # init_lora_weights=False: random B, so the policy differs from its reference (adapters off)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    stock, ours = make_pair(tmp_path, ref=False, peft_config=config)
    assert stock.ref_model is None and ours.ref_model is None

    class Disabled(torch.nn.Module):  # the float64 truth's reference: the PEFT model, adapters off
        def __init__(self, m):
            super().__init__()
            self.m = m

        def get_output_embeddings(self):
            return self.m.get_output_embeddings()

        def forward(self, **kw):
            with self.m.disable_adapter():
                return self.m(**kw)

    _assert_same_step(stock, ours, (stock.model, Disabled(stock.model)))
    grads = {n for n, p in ours.model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)  # only the adapters train; the head is frozen


def test_dpo_matches_trl_peft_model_ref_adapter(tmp_path, make_pair):
    """A PeftModel given without ref_model: TRL copies its adapter into one named "ref" (with its own
    saved lm_head when lm_head is in modules_to_save) and runs the reference with that adapter."""
    peft = pytest.importorskip("peft")
    from trl.trainer.utils import use_adapter

    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["lm_head"],
        init_lora_weights=False,
    )
    stock, ours = make_pair(tmp_path, ref=False, peft_model=config)
    for trainer in (stock, ours):
        assert "ref" in trainer.model.peft_config
        gen = torch.Generator().manual_seed(1)  # the same step away from the "ref" copy in both
        with torch.no_grad():
            for name, param in trainer.model.named_parameters():
                if ".default." in name:
                    param.add_(0.05 * torch.randn(param.shape, generator=gen))

    class RefAdapter(torch.nn.Module):  # the float64 truth's reference: adapter "ref" and its head
        def __init__(self, m):
            super().__init__()
            self.m = m

        def get_output_embeddings(self):
            return self.m.get_output_embeddings().modules_to_save["ref"]

        def forward(self, **kw):
            with use_adapter(self.m, "ref"):
                return self.m(**kw)

    _assert_same_step(stock, ours, (stock.model, RefAdapter(stock.model)))


def _train_logs(trainer) -> list[dict[str, float]]:
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("sync", [False, True], ids=["fixed-ref", "sync-ref"])
def test_dpo_three_steps_match_trl(tmp_path, sync, make_pair, make_trainer):
    kwargs = dict(sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5) if sync else {}
    stock, ours = make_pair(tmp_path, **kwargs)
    logs_t, logs_p = _train_logs(stock), _train_logs(ours)
    assert len(logs_t) == len(logs_p) == 3
    # Each step's inputs (weights) differ only by the previous steps' fp32 rounding; Adam's update is
    # invariant to the gradient's scale, so the relative differences (≤ 1e-6 per step) carry over
    # without amplification: 1e-5 relative on the loss is an order of magnitude above that.
    for t, p in zip(logs_t, logs_p, strict=True):
        assert math.isclose(p["loss"], t["loss"], rel_tol=1e-5, abs_tol=1e-6), (t["loss"], p["loss"])
        for name in (
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ):
            assert math.isclose(p[name], t[name], rel_tol=1e-4, abs_tol=1e-5), (name, t[name], p[name])
        assert p["rewards/accuracies"] == t["rewards/accuracies"]
    if sync:  # the reference moved: the run differs from one with a fixed reference
        fixed = _train_logs(make_trainer(ptrl.DPOTrainer, ptrl.DPOConfig, tmp_path / "fixed"))
        assert fixed[-1]["rewards/chosen"] != pytest.approx(logs_p[-1]["rewards/chosen"], rel=1e-3)


# --- α-DPO and ε-DPO: no TRL counterpart --------------------------------------------------------------

PREFLOSS_LOSSES = [
    ("alpha_dpo", dict(beta=2.5, gamma_beta_ratio=0.6, alpha=0.2)),
    ("epsilon_dpo", dict(beta=0.01, epsilon=0.01)),
]


@pytest.mark.parametrize(("loss_type", "hp"), PREFLOSS_LOSSES, ids=[n for n, _ in PREFLOSS_LOSSES])
def test_prefloss_losses_first_step_float64(tmp_path, loss_type, hp, make_trainer):
    # compare_dtype=None: the float64 reference decides ε-DPO's steps by an exact comparison
    extra = {"loss_kwargs": {"compare_dtype": None}} if loss_type == "epsilon_dpo" else {}
    ours = make_trainer(ptrl.DPOTrainer, ptrl.DPOConfig, tmp_path, loss_type=loss_type, **hp, **extra)
    batch = _batch(ours)
    loss, metrics, _ = _step(ours, batch)
    bounds, _, _ = _truth(loss_type, ours.model, ours.ref_model, batch, **hp)
    assert abs(loss - bounds.loss.item()) <= bounds.loss_bound, (loss, bounds.loss.item(), bounds.loss_bound)
    assert {"rewards/chosen", "rewards/accuracies", "logps/chosen", "num_tokens"} <= set(metrics)
    authors = {"alpha_dpo": "RATIO/ref_logratios", "epsilon_dpo": "kl/p_epsilon_steps"}[loss_type]
    assert authors in metrics


@pytest.mark.parametrize(("loss_type", "hp"), PREFLOSS_LOSSES, ids=[n for n, _ in PREFLOSS_LOSSES])
def test_prefloss_losses_three_steps_match_preference_trainer(
    tmp_path, loss_type, hp, make_trainer, preference_rows
):
    ours = make_trainer(ptrl.DPOTrainer, ptrl.DPOConfig, tmp_path, loss_type=loss_type, **hp)
    tok = byte_level_tokenizer()
    theirs = PreferenceTrainer(
        model=tiny_llama(tok, hidden_size=32, seed=0),
        ref_model=tiny_llama(tok, hidden_size=32, seed=1),
        args=PreferenceConfig(
            output_dir=str(tmp_path / "pt"),
            report_to=[],
            use_cpu=True,
            per_device_train_batch_size=PAIRS,
            max_steps=3,
            logging_steps=1,
            save_strategy="no",
            learning_rate=1e-3,
            seed=0,
            loss=loss_type,
            max_length=1024,  # TRL's default, so both keep every token
            **hp,
        ),
        train_dataset=_with_origin(preference_rows(), ""),
        processing_class=tok,
    )
    logs_p, logs_h = _train_logs(ours), _train_logs(theirs)
    assert len(logs_p) == len(logs_h) == 3
    names = ["loss", "rewards/chosen", "rewards/margins", "logps/chosen"]
    names += ["alpha/running_mean", "RATIO/ref_logratios"] if loss_type == "alpha_dpo" else ["kl/beta"]
    for p, h in zip(logs_p, logs_h, strict=True):
        for name in names:  # same code on the same tokens and weights: equal up to the run's rounding
            assert math.isclose(p[name], h[name], rel_tol=1e-5, abs_tol=1e-6), (name, p[name], h[name])
    if loss_type == "epsilon_dpo":
        assert torch.equal(ours.loss_fn.beta, theirs.loss_fn.beta)  # β updated once per step by both


def test_compare_dtype_by_name(tmp_path, make_trainer):
    """``loss_kwargs={"compare_dtype": "bfloat16"}`` (JSON) builds ε-DPO with ``torch.bfloat16``; an
    unknown name is refused by the config, naming ``loss_kwargs['compare_dtype']`` (`loss_module_kwargs`,
    shared with `PreferenceConfig`)."""
    kw = dict(loss_type="epsilon_dpo", max_steps=1)
    ours = make_trainer(
        ptrl.DPOTrainer, ptrl.DPOConfig, tmp_path, loss_kwargs='{"compare_dtype": "bfloat16"}', **kw
    )
    assert ours.loss_fn.compare_dtype is torch.bfloat16
    assert ours.args.loss_kwargs == {"compare_dtype": "bfloat16"}
    with pytest.raises(ValueError, match=r"loss_kwargs\['compare_dtype'\] must be .* got 'bf16'"):
        ptrl.DPOConfig(
            output_dir=str(tmp_path), use_cpu=True, bf16=False, loss_kwargs={"compare_dtype": "bf16"}, **kw
        )


def test_loss_state_checkpointed_and_resumed(tmp_path, make_trainer):
    """ε-DPO's β lives in the loss module: every checkpoint holds it and resuming restores it, so a
    resumed run ends where the uninterrupted one ended."""
    kw = dict(loss_type="epsilon_dpo", epsilon=0.1, loss_kwargs={"compare_dtype": None}, max_steps=2)
    full = make_trainer(
        ptrl.DPOTrainer, ptrl.DPOConfig, tmp_path / "a", save_strategy="steps", save_steps=1, **kw
    )
    initial = full.loss_fn.beta.clone()
    full.train()
    assert not torch.equal(full.loss_fn.beta, initial)  # β moved (exact step comparison, ε = 0.1)
    checkpoint = tmp_path / "a" / "prefloss" / "checkpoint-1"
    saved = torch.load(checkpoint / "prefloss_loss_state.pt", weights_only=True)
    assert not torch.equal(saved["beta"], initial)
    resumed = make_trainer(ptrl.DPOTrainer, ptrl.DPOConfig, tmp_path / "b", **kw)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert torch.equal(resumed.loss_fn.beta, full.loss_fn.beta)


def test_dpo_with_trl_defaults_bf16_autocast_and_checkpointing(tmp_path, make_pair):
    """A TRL user's defaults: ``bf16=True`` (autocast, fp32 weights) and gradient checkpointing.

    Both trainers run the same autocast forward; their heads then round differently (TRL's tiles in
    bf16, prefloss's GEMMs as autocast gives them), so they agree to bf16 precision, not fp32:
    ``u_bf16·|loss|`` on the loss and ``4·u_bf16`` relative on gradients (measured: 2e-5 and 2e-4).
    """
    stock, ours = make_pair(tmp_path, bf16=True, gradient_checkpointing=True)
    assert ours.args.bf16 and ours.args.gradient_checkpointing
    batch = _batch(stock)
    with stock.compute_loss_context_manager():
        loss_t, _, grads_t = _step(stock, batch)
    with ours.compute_loss_context_manager():
        loss_p, _, grads_p = _step(ours, batch)
    u_bf16 = torch.finfo(torch.bfloat16).eps / 2
    assert abs(loss_p - loss_t) <= u_bf16 * abs(loss_t), (loss_p, loss_t)
    worst = max((_rel(grads_p[n], grads_t[n]), n) for n in grads_t)
    assert worst[0] <= 4 * u_bf16, worst


def test_dpo_accumulation_and_evaluation_match_trl(tmp_path, make_pair):
    """Gradient accumulation (2 micro-batches of 2 pairs per step) and ``evaluate()`` (the eval
    metrics, prefixed ``eval_``; prefloss's prediction step forms no logits) as stock TRL."""
    kwargs = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, per_device_eval_batch_size=4)
    held_out = [json.loads(line) for line in open(synthetic_preferences_path("eval"))][:8]
    stock, ours = make_pair(tmp_path, eval_rows=held_out, **kwargs)
    logs_t, logs_p = _train_logs(stock), _train_logs(ours)
    for t, p in zip(logs_t, logs_p, strict=True):  # tolerance: as in test_dpo_three_steps_match_trl
        assert math.isclose(p["loss"], t["loss"], rel_tol=1e-5, abs_tol=1e-6), (t["loss"], p["loss"])
    eval_t, eval_p = stock.evaluate(), ours.evaluate()
    shared = {k for k in eval_t if k.startswith("eval_") and k in eval_p} - {"eval_runtime"}
    shared = {k for k in shared if not k.endswith(("_per_second", "num_tokens"))}
    assert {"eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen"} <= shared
    for name in shared:
        assert math.isclose(eval_p[name], eval_t[name], rel_tol=1e-4, abs_tol=1e-5), (
            name,
            eval_t[name],
            eval_p[name],
        )


def test_vocab_metrics_match_trl(tmp_path, make_trainer):
    """``log_vocab_metrics=True`` adds TRL's entropy, logits/chosen, logits/rejected and
    mean_token_accuracy, equal to stock TRL's on the same batch (token means of fp32 values computed
    in other orders: a few u relative; 1e-5 relative, 1e-6 absolute). Without it they are absent."""
    stock = make_trainer(trl.DPOTrainer, trl.DPOConfig, tmp_path)
    ours = make_trainer(ptrl.DPOTrainer, ptrl.DPOConfig, tmp_path, log_vocab_metrics=True)
    for trainer in (stock, ours):  # head ≈ embedding: the argmax is often the current token, so
        with torch.no_grad():  # doubled letters make mean_token_accuracy non-zero
            trainer.model.lm_head.weight.copy_(4 * trainer.model.model.embed_tokens.weight)
    batch = _batch(stock)
    _, metrics_t, _ = _step(stock, batch)
    _, metrics_p, _ = _step(ours, batch)
    names = ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")
    assert metrics_t["mean_token_accuracy"] > 0
    for name in names:
        assert math.isclose(metrics_p[name], metrics_t[name], rel_tol=1e-5, abs_tol=1e-6), (
            name,
            metrics_p[name],
            metrics_t[name],
        )
    plain = make_trainer(ptrl.DPOTrainer, ptrl.DPOConfig, tmp_path / "plain")
    _, metrics, _ = _step(plain, batch)
    assert not set(names) & set(metrics)
