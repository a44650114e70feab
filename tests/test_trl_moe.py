"""`prefloss.trl.DPOTrainer` on mixture-of-experts models against TRL 1.16's own ``DPOTrainer``.

Tiny random Mixtral and Qwen2-MoE (`prefloss.hf.tiny.tiny_moe`: hidden 16, 2 layers of 4 experts,
2 per token, built offline), policy seed 0 and reference seed 1, the same rows: both trainers
tokenize and batch identically. TRL enables the load-balancing loss (``aux_loss_enabled``) for a MoE
config with a coefficient that is not 0 and adds ``router_aux_loss_coef · outputs.aux_loss`` to its
loss, logging ``aux_loss``; prefloss.trl must do the same through its own path
(`prefloss.hf.preference_loss`). The coefficient comes from the model config (Mixtral) or from the
``DPOConfig`` (Qwen2-MoE, overriding its config's), and is 0.5 -- large enough that the router
gradients without it differ from TRL's by far more than the tolerance (checked).

Tolerances as in tests/test_trl_dpo.py: the two trainers form the same fp32 sums in other orders;
the DPO part differs by a few u·√K (measured ≤ 1e-6 relative on gradients); the auxiliary loss is
the same model computation on the same router logits in both, so it agrees to rounding
(``AUX_RTOL``).
"""

from __future__ import annotations

import math

import pytest
import torch

trl = pytest.importorskip("trl")

import datasets  # noqa: E402

import prefloss.trl as ptrl  # noqa: E402
from prefloss.hf.tiny import byte_level_tokenizer, tiny_llama, tiny_moe  # noqa: E402

PAIRS = 2
COEF = 0.5
GRAD_RTOL = 1e-5
AUX_RTOL = 1e-6  # the same fp32 computation on identical router logits: measured 0
# family -> (coefficient in the model config, DPOConfig.router_aux_loss_coef)
FAMILIES = {"mixtral": (COEF, None), "qwen2_moe": (0.02, COEF)}

pytestmark = pytest.mark.usefixtures("quiet_hf")


@pytest.fixture
def make_trainer(preference_rows, tiny_training_args, tmp_path):
    """``make_trainer(cls, config_cls, family, **config)``: a DPO trainer on tiny MoE models."""

    def make(cls, config_cls, family, *, origin="", **config):
        tok = byte_level_tokenizer()
        config_coef, args_coef = FAMILIES[family]
        models = [tiny_moe(tok, family, router_aux_loss_coef=config_coef, seed=s) for s in (0, 1)]
        defaults = tiny_training_args(tmp_path / cls.__module__.split(".")[0], pairs=PAIRS)
        config = {"router_aux_loss_coef": args_coef, "max_length": 64, **config}
        rows = [dict(r, origin=origin) for r in preference_rows(6)]  # distinct precompute caches
        return cls(
            model=models[0],
            ref_model=models[1],
            args=config_cls(**{**defaults, **config}),
            train_dataset=datasets.Dataset.from_list(rows),
            eval_dataset=datasets.Dataset.from_list(rows[:4]),
            processing_class=tok,
        )

    return make


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
    model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()  # train() logs its own steps only
    return loss.item(), metrics, grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("family", list(FAMILIES), ids=list(FAMILIES))
def test_moe_dpo_matches_trl(family, make_trainer) -> None:
    """One step (loss, aux_loss, every gradient), then 3 training steps and an evaluation (logged
    loss, aux_loss, rewards) equal stock TRL's."""
    stock = make_trainer(trl.DPOTrainer, trl.DPOConfig, family, origin="trl")
    ours = make_trainer(ptrl.DPOTrainer, ptrl.DPOConfig, family, origin="prefloss")
    assert stock.aux_loss_enabled and ours.aux_loss_enabled
    assert stock.router_aux_loss_coef == ours.router_aux_loss_coef == COEF
    batch = stock.data_collator([stock.train_dataset[i] for i in range(PAIRS)])
    assert torch.equal(
        batch["input_ids"], ours.data_collator([ours.train_dataset[i] for i in range(PAIRS)])["input_ids"]
    )
    assert batch["attention_mask"].eq(0).any()  # padding: the aux loss must leave it out, as TRL's does

    loss_t, metrics_t, grads_t = _step(stock, batch)
    loss_p, metrics_p, grads_p = _step(ours, batch)
    aux = metrics_t["aux_loss"]
    assert math.isclose(metrics_p["aux_loss"], aux, rel_tol=AUX_RTOL), (metrics_p["aux_loss"], aux)
    assert math.isclose(loss_p, loss_t, rel_tol=2e-6), (loss_p, loss_t)
    assert COEF * aux > 1e3 * abs(loss_p - loss_t)  # the aux term is not lost in the rounding
    assert grads_p.keys() == grads_t.keys()
    worst = max((_rel(grads_p[n], grads_t[n]), n) for n in grads_t)
    assert worst[0] <= GRAD_RTOL, worst

    # Informative: without the aux loss the router gradients are far from TRL's.
    ours.aux_loss_enabled = False
    _, metrics_0, grads_0 = _step(ours, batch)
    ours.aux_loss_enabled = True
    assert "aux_loss" not in metrics_0
    gate = next(n for n in grads_t if n.endswith("gate.weight"))
    assert _rel(grads_0[gate], grads_t[gate]) > 1e3 * GRAD_RTOL, gate

    stock.train()
    ours.train()
    logs_t = [h for h in stock.state.log_history if "loss" in h]
    logs_p = [h for h in ours.state.log_history if "loss" in h]
    assert len(logs_t) == len(logs_p) == 3
    for t, p in zip(logs_t, logs_p, strict=True):  # tolerances: as tests/test_trl_dpo.py's 3 steps
        for name in ("loss", "aux_loss"):
            assert math.isclose(p[name], t[name], rel_tol=1e-5, abs_tol=1e-6), (name, t[name], p[name])
        for name in ("rewards/chosen", "rewards/margins", "logps/chosen"):
            assert math.isclose(p[name], t[name], rel_tol=1e-4, abs_tol=1e-5), (name, t[name], p[name])
    assert logs_p[-1]["aux_loss"] != logs_p[0]["aux_loss"]  # the routers moved
    eval_t, eval_p = stock.evaluate(), ours.evaluate()  # no gradients: the aux loss of the eval forward
    for name in ("eval_loss", "eval_aux_loss"):
        assert math.isclose(eval_p[name], eval_t[name], rel_tol=1e-5, abs_tol=1e-6), (name, eval_t, eval_p)


def test_reference_forms_no_router_logits(make_trainer, monkeypatch) -> None:
    """The policy's training forward is asked for router logits; every other forward (the reference's,
    the output-head check's, precomputing the reference log-probs) is told not to form them."""
    from transformers import MixtralForCausalLM

    seen: list[tuple[int, object]] = []
    forward = MixtralForCausalLM.forward

    def spy(self, *args, **kwargs):
        seen.append((id(self), kwargs.get("output_router_logits")))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(MixtralForCausalLM, "forward", spy)
    pre = make_trainer(
        ptrl.DPOTrainer, ptrl.DPOConfig, "mixtral", origin="pre", precompute_ref_log_probs=True, max_steps=1
    )
    assert "ref_chosen_logps" in pre.train_dataset.column_names and seen
    assert {value for _, value in seen} == {False}, seen  # precomputing (in __init__)
    seen.clear()
    ours = make_trainer(ptrl.DPOTrainer, ptrl.DPOConfig, "mixtral", max_steps=1)
    ours.train()
    policy, ref = id(ours.model), id(ours.ref_model)
    asked = [value for module, value in seen if module == policy]
    assert asked.count(True) == 1 and set(asked) == {True, False}, asked  # one step; the head check
    refs = [value for module, value in seen if module == ref]
    assert len(refs) == 4 and set(refs) == {False}, refs  # the head check's 3 forwards, the step


def test_non_moe_model_with_a_coefficient_is_refused(tmp_path, preference_rows, tiny_training_args) -> None:
    """TRL's own check, inherited: a coefficient for a model that has no router logits."""
    tok = byte_level_tokenizer()
    args = ptrl.DPOConfig(**tiny_training_args(tmp_path, pairs=PAIRS), router_aux_loss_coef=0.1)
    with pytest.raises(ValueError, match="router_aux_loss_coef.* is not a Mixture-of-Experts"):
        ptrl.DPOTrainer(
            model=tiny_llama(tok, hidden_size=16),
            args=args,
            train_dataset=datasets.Dataset.from_list(preference_rows(2)),
            processing_class=tok,
        )
