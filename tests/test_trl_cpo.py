"""`prefloss.trl.CPOTrainer` (SimPO) against TRL 1.16's ``CPOTrainer(loss_type="simpo", cpo_alpha=0)``.

Same construction, rows and seed for both, so CPO's own tokenization and collator give both the same
batch; TRL computes SimPO from the full ``[2B, T, V]`` logits, prefloss from hidden states. Checked
against each other and against the float64 truth: loss, every metric both log, every gradient, and the
losses of a 3-step ``train()``. Tolerances as in ``tests/test_trl_dpo.py``: a correct fp32 loss is
within `prefloss.testing.loss_error_bounds` of float64, so two of them within twice that; SimPO's
metrics are per-token means, ``β·Σ/n``, bounded by the per-row sums' bounds over n; gradients: the
same sums in other orders, `GRAD_RTOL` relative.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

trl = pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import datasets  # noqa: E402
from trl.experimental.cpo import CPOConfig  # noqa: E402
from trl.experimental.cpo import CPOTrainer as TRLCPOTrainer  # noqa: E402

from prefloss import reference  # noqa: E402
from prefloss.hf.tiny import byte_level_tokenizer, tiny_llama  # noqa: E402
from prefloss.testing import ERROR_MARGIN, loss_error_bounds, plain_logprobs, sequence_error_scale  # noqa: E402
from prefloss.trl import CPOTrainer  # noqa: E402

GRAD_RTOL = 1e-5
PAIRS = 4
U32 = torch.finfo(torch.float32).eps / 2
BETA, GAMMA = 2.0, 0.5  # SimPO's β and CPO's absolute margin simpo_gamma (prefloss: γ/β = 0.25)


pytestmark = pytest.mark.usefixtures("quiet_hf")


@pytest.fixture
def make_trainer(preference_rows, tiny_training_args):
    """``make_trainer(cls, root, **config)``: SimPO (``cls``: TRL's or prefloss's CPOTrainer) on the tiny
    Llama (seed 0), 12 synthetic pairs and conftest's tiny training arguments."""

    def make(cls, root, **config):
        tok = byte_level_tokenizer()
        rows = preference_rows()
        args = CPOConfig(
            **tiny_training_args(root / cls.__module__.split(".")[0], pairs=PAIRS),
            **{"loss_type": "simpo", "cpo_alpha": 0.0, "beta": BETA, "simpo_gamma": GAMMA, **config},
        )
        return cls(
            model=tiny_llama(tok, hidden_size=32, seed=0),
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tok,
        )

    return make


def _step(trainer, batch):
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    loss, metrics = trainer.get_batch_loss_metrics(model, trainer._prepare_inputs(dict(batch)))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), metrics, grads


def test_simpo_matches_trl_cpo(tmp_path, make_trainer):
    stock, ours = make_trainer(TRLCPOTrainer, tmp_path), make_trainer(CPOTrainer, tmp_path)
    batch = stock.data_collator([stock.train_dataset[i] for i in range(PAIRS)])
    loss_t, metrics_t, grads_t = _step(stock, batch)
    loss_p, metrics_p, grads_p = _step(ours, batch)

    # float64 truth from the model's hidden states; CPO's labels are unshifted (-100 on the prompt)
    cat = stock.concatenated_inputs(batch, padding_value=stock.pad_token_id)
    ids, mask = cat["concatenated_input_ids"], cat["concatenated_attention_mask"]
    labels = cat["concatenated_labels"][:, 1:]
    with torch.no_grad():
        hidden = stock.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    weight = stock.model.lm_head.weight.detach()
    exact = reference.token_logprobs(hidden[:, :-1], weight, labels).policy
    plain = plain_logprobs(hidden[:, :-1], weight, labels).policy
    sums, scale = exact.sum(-1), sequence_error_scale(plain, exact)
    length = (labels != -100).sum(-1)
    bounds = loss_error_bounds(
        "simpo",
        {"policy": sums},
        length,
        {"policy": scale},
        dtype=torch.float32,
        beta=BETA,
        gamma_beta_ratio=GAMMA / BETA,
    )
    truth = bounds.loss.item()
    assert abs(loss_t - truth) <= bounds.loss_bound, (loss_t, truth, bounds.loss_bound)
    assert abs(loss_p - truth) <= bounds.loss_bound, (loss_p, truth, bounds.loss_bound)
    assert abs(loss_p - loss_t) <= 2 * bounds.loss_bound

    mean = sums / length
    mean_bound = (ERROR_MARGIN * scale + 4 * U32 * sums.abs()) / length + 4 * U32 * mean.abs()
    (mc, mr), (bc, br) = mean.chunk(2), mean_bound.chunk(2)
    margins, margin_bounds = BETA * (mc - mr), BETA * (bc + br)
    assert (margins.abs() > 2 * margin_bounds).all(), "a margin within rounding of 0: accuracies undecided"
    expected = {
        "rewards/chosen": (BETA * mc.mean(), BETA * bc.mean()),
        "rewards/rejected": (BETA * mr.mean(), BETA * br.mean()),
        "rewards/margins": (margins.mean(), margin_bounds.mean()),
        "rewards/accuracies": ((margins > 0).double().mean(), 0.0),
        "logps/chosen": (mc.mean(), bc.mean()),
        "logps/rejected": (mr.mean(), br.mean()),
        "nll_loss": (0.0, 0.0),
    }
    assert set(expected) <= set(metrics_t) & set(metrics_p)
    for name, (value, bound) in expected.items():
        value, bound = float(value), float(bound)
        assert abs(metrics_p[name] - value) <= bound, (name, metrics_p[name], value, bound)
        assert abs(metrics_p[name] - metrics_t[name]) <= 2 * bound, (name, metrics_p[name], metrics_t[name])

    assert grads_p.keys() == grads_t.keys() and grads_p
    for name in grads_t:
        rel = ((grads_p[name] - grads_t[name]).norm() / grads_t[name].norm()).item()
        assert rel <= GRAD_RTOL, (name, rel)


def test_simpo_three_steps_match_trl_cpo(tmp_path, make_trainer):
    logs = []
    for cls in (TRLCPOTrainer, CPOTrainer):
        trainer = make_trainer(cls, tmp_path)
        trainer.train()
        logs.append([h for h in trainer.state.log_history if "loss" in h])
    assert len(logs[0]) == len(logs[1]) == 3
    # weights differ only by the previous steps' fp32 rounding (≤ 1e-6 relative per step, carried
    # over by Adam's scale-free update): 1e-5 relative is an order of magnitude above it
    for t, p in zip(*logs, strict=True):
        assert math.isclose(p["loss"], t["loss"], rel_tol=1e-5, abs_tol=1e-6), (t["loss"], p["loss"])
        assert p["rewards/accuracies"] == t["rewards/accuracies"]
