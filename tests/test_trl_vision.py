"""`prefloss.trl.DPOTrainer` on vision-language models, against TRL 1.16's own ``DPOTrainer``.

Tiny random LLaVA, Gemma 3 and Qwen2-VL models with processors built in code (`prefloss.hf.tiny`),
on an image preference dataset (``images``, ``prompt``, ``chosen``, ``rejected``; synthetic 8-16
pixel images): TRL collates it with its vision collator (``pixel_values``; Gemma 3 also
``token_type_ids``, Qwen2-VL ``image_grid_thw`` and ``mm_token_type_ids``), and both trainers pass
those inputs to the policy's and the reference's forward. On one identical batch the loss, every
metric both log and every gradient agree, and the loss is within its fp32 bound of a float64
computation from the model's own hidden states (``model(**batch, output_hidden_states=True)``);
also with a LoRA policy (reference = adapters disabled); 3-step ``train()`` runs log the same values.

Tolerances as `tests/test_trl_dpo.py` (its module docstring): the loss within
`prefloss.testing.loss_error_bounds` of float64, the two fp32 computations within twice that, gradients
within ``GRAD_RTOL`` (relative, per parameter).
"""

from __future__ import annotations

import math

import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("PIL")

import datasets  # noqa: E402

import prefloss.trl as ptrl  # noqa: E402
from prefloss import reference  # noqa: E402
from prefloss.hf.tiny import tiny_image_preferences, tiny_vision_model, tiny_vision_processor  # noqa: E402
from prefloss.testing import loss_error_bounds, plain_logprobs, sequence_error_scale  # noqa: E402

GRAD_RTOL = 1e-5
PAIRS = 2
FAMILIES = ["llava", "gemma3", "qwen2_vl"]

pytestmark = pytest.mark.usefixtures("quiet_hf")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the tiny models' ops are too small to split, and on a loaded 2-core machine
    two threads made these tests 4x slower (their synchronisation, not their arithmetic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trainer(cls, config_cls, root, family, tiny_training_args, *, ref=True, peft_config=None, **config):
    processor = tiny_vision_processor(family)
    args = config_cls(**{**tiny_training_args(root / cls.__module__.split(".")[0], pairs=PAIRS), **config})
    return cls(
        model=tiny_vision_model(family, processor, seed=0),
        ref_model=tiny_vision_model(family, processor, seed=1) if ref else None,
        args=args,
        train_dataset=datasets.Dataset.from_list(tiny_image_preferences(6)),
        processing_class=processor,
        peft_config=peft_config,
    )


def _pair(root, family, tiny_training_args, **kwargs):
    stock = _trainer(trl.DPOTrainer, trl.DPOConfig, root, family, tiny_training_args, **kwargs)
    ours = _trainer(ptrl.DPOTrainer, ptrl.DPOConfig, root, family, tiny_training_args, **kwargs)
    return stock, ours


def _step(trainer, batch):
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


def _truth_loss(model, ref_model, batch):
    """Float64 DPO loss (β = 0.1) and its fp32 bound, from the models' own last hidden states."""
    ids, completion = batch["input_ids"], batch["completion_mask"]
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    labels = ids[:, 1:].masked_fill(completion[:, 1:] == 0, -100)

    def hidden(m):
        with torch.no_grad():
            return m(**inputs, output_hidden_states=True, use_cache=False).hidden_states[-1][:, :-1]

    kw = dict(ref_hidden=hidden(ref_model), ref_weight=ref_model.get_output_embeddings().weight.detach())
    weight = model.get_output_embeddings().weight.detach()
    exact = reference.token_logprobs(hidden(model), weight, labels, **kw)
    plain = plain_logprobs(hidden(model), weight, labels, **kw)
    sums = {k: getattr(exact, k).sum(-1) for k in ("policy", "ref")}
    scales = {k: sequence_error_scale(getattr(plain, k), getattr(exact, k)) for k in ("policy", "ref")}
    bounds = loss_error_bounds("dpo", sums, (labels != -100).sum(-1), scales, dtype=torch.float32, beta=0.1)
    return bounds.loss.item(), bounds.loss_bound


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _assert_same_step(stock, ours, truth_models):
    batch = stock.data_collator([stock.train_dataset[i] for i in range(PAIRS)])
    theirs = ours.data_collator([ours.train_dataset[i] for i in range(PAIRS)])
    assert batch.keys() == theirs.keys() and "pixel_values" in batch
    for key in batch:
        assert torch.equal(batch[key], theirs[key]), key
    loss_t, metrics_t, grads_t = _step(stock, batch)
    loss_p, metrics_p, grads_p = _step(ours, batch)
    truth, bound = _truth_loss(*truth_models, batch)
    assert abs(loss_t - truth) <= bound, (loss_t, truth, bound)
    assert abs(loss_p - truth) <= bound, (loss_p, truth, bound)
    shared = set(metrics_t) & set(metrics_p)
    assert {"rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected", "num_tokens"} <= shared
    # logps/* are sums, equal to 1e-5 relative; a reward β·(π - ρ) is a difference of such sums (policy's
    # and reference's, each of the logps' size), so it is judged against β·2e-5·|logps|
    scale = 0.1 * 2e-5 * (abs(metrics_t["logps/chosen"]) + abs(metrics_t["logps/rejected"]))
    for name in shared:
        tol = dict(abs_tol=scale) if name.startswith("rewards/") else dict(rel_tol=1e-5, abs_tol=1e-6)
        assert math.isclose(metrics_p[name], metrics_t[name], **tol), (name, metrics_p[name], metrics_t[name])
    assert grads_p.keys() == grads_t.keys() and grads_p
    # A key projection's bias gets no gradient (softmax is shift-invariant): both are rounding noise
    # (~1e-11 here), compared with the largest gradient, not relatively.
    zero = 1e-6 * max(g.norm().item() for g in grads_t.values())
    noise = {n for n, g in grads_t.items() if g.norm() <= zero}
    assert all(grads_p[n].norm() <= zero for n in noise) and all("k_proj.bias" in n for n in noise), noise
    worst = max((_rel(grads_p[n], grads_t[n]), n) for n in grads_t if n not in noise)
    assert worst[0] <= GRAD_RTOL, worst
    return batch


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_dpo_matches_trl(tmp_path, family, tiny_training_args):
    stock, ours = _pair(tmp_path, family, tiny_training_args)
    batch = _assert_same_step(stock, ours, (stock.model, stock.ref_model))
    assert ("token_type_ids" in batch) == (family == "gemma3")
    assert ("image_grid_thw" in batch) == ("mm_token_type_ids" in batch) == (family == "qwen2_vl")
    # the vision tower trains: its gradient reached the policy through the image tokens
    _, _, grads = _step(ours, batch)
    tower = "visual" if family == "qwen2_vl" else "vision_tower"
    assert any(tower in n and g.abs().sum() > 0 for n, g in grads.items())


def test_vision_dpo_vocab_metrics_match_trl(tmp_path, tiny_training_args):
    """``log_vocab_metrics=True`` reads the policy's hidden states off its language model's forward:
    TRL's entropy, logits/* and mean_token_accuracy equal stock TRL's on an image batch too."""
    stock = _trainer(trl.DPOTrainer, trl.DPOConfig, tmp_path, "gemma3", tiny_training_args)
    ours = _trainer(
        ptrl.DPOTrainer, ptrl.DPOConfig, tmp_path, "gemma3", tiny_training_args, log_vocab_metrics=True
    )
    batch = stock.data_collator([stock.train_dataset[i] for i in range(PAIRS)])
    _, metrics_t, _ = _step(stock, batch)
    _, metrics_p, _ = _step(ours, batch)
    for name in ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"):
        assert math.isclose(metrics_p[name], metrics_t[name], rel_tol=1e-5, abs_tol=1e-6), name


def test_vision_dpo_matches_trl_lora(tmp_path, tiny_training_args):
    peft = pytest.importorskip("peft")
    # init_lora_weights=False: random B, so the policy differs from its reference (adapters off);
    # q_proj/v_proj are in the vision tower and the language model
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    stock, ours = _pair(tmp_path, "llava", tiny_training_args, ref=False, peft_config=config)
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
    trained = {n for n, p in ours.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert any("vision_tower" in n for n in trained)


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_dpo_three_steps_match_trl(tmp_path, family, tiny_training_args):
    stock, ours = _pair(tmp_path, family, tiny_training_args)
    stock.train()
    ours.train()
    logs_t = [h for h in stock.state.log_history if "loss" in h]
    logs_p = [h for h in ours.state.log_history if "loss" in h]
    assert len(logs_t) == len(logs_p) == 3
    for t, p in zip(logs_t, logs_p, strict=True):
        for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
            assert math.isclose(p[name], t[name], rel_tol=1e-4, abs_tol=1e-5), (name, t[name], p[name])
        assert p["rewards/accuracies"] == t["rewards/accuracies"]
        assert p["num_tokens"] == t["num_tokens"]
