"""Mixture-of-experts models in `PreferenceTrainer` (`prefloss.hf.moe`): the routers' load-balancing
loss is added as transformers adds it, and equals an independent float64 computation.

Tiny random Mixtral and Qwen2-MoE (`prefloss.hf.tiny.tiny_moe`: hidden 16, 2 layers of 4 experts, 2
per token), whose configs set ``output_router_logits=True`` and ``router_aux_loss_coef`` = `COEF`, so
`PreferenceTrainer` must train with ``loss = DPO + COEF · aux_loss``. The expected values come from
another forward of the same fp32 model (its last hidden states and router logits): the DPO part from
`prefloss.reference` in float64 (bounded by `prefloss.testing.loss_error_bounds`), the auxiliary
loss recomputed here in float64 from the router logits by `float64_aux_loss`, written from the Switch
Transformer's definition, not from transformers' code. Gradients are float64 autograd through that
fp32 forward.

Tolerances. The fp32 auxiliary loss (transformers') sums ``L·N`` router probabilities per expert
(``L`` layers, ``N`` counted tokens) and divides exact counts: a relative error of at most
``(L·N + E + 8)·u`` (`aux_bound`; measured 4.4e-8 relative against a bound of 2.1e-5). Gradients:
the same fp32 backward through the decoder, the head and loss in fp32 instead of float64: 7e-7
relative measured, `GRAD_RTOL` = 1e-5 as in tests/test_trl_dpo.py. Both are far below what a missing
or mis-masked auxiliary loss changes (checked: without it the routers' gradients move by 0.99
relative at `COEF`; the test asks for more than 1e-2).
"""

from __future__ import annotations

import json

import pytest
import torch

from prefloss import reference
from prefloss.data import synthetic_preferences_path
from prefloss.hf import PreferenceConfig, PreferenceTrainer
from prefloss.hf.moe import is_moe, router_logits_kwargs, trainer_aux_loss_coef
from prefloss.hf.tiny import byte_level_tokenizer, tiny_llama, tiny_moe
from prefloss.testing import loss_error_bounds, plain_logprobs, sequence_error_scale

FAMILIES = ["mixtral", "qwen2_moe"]
COEF = 0.5  # large, so that the aux loss's share of the gradients is far above the tolerances
BETA = 0.1
PAIRS = 2
GRAD_RTOL = 1e-5
U32 = torch.finfo(torch.float32).eps / 2

with open(synthetic_preferences_path("train")) as _f:
    ROWS = [json.loads(next(_f)) for _ in range(PAIRS)]

pytestmark = pytest.mark.usefixtures("quiet_hf")


def float64_aux_loss(
    router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, float]:
    """Switch Transformer's load-balancing loss in float64, and the smallest gap between the k-th and
    (k+1)-th router probability of a counted token (the top-k choice is stable if it exceeds fp32's
    rounding).

    ``router_logits``: per MoE layer ``[N_all, E]`` (rows in ``attention_mask``'s flattened order).
    Over the ``L`` layers and the counted tokens ``n`` (mask 1), ``p = softmax(logits)``:
    ``f_e = #{(l, n): e ∈ top_k(p_{l,n})} / (L·N)``, ``P_e = Σ p_{l,n,e} / (L·N)``,
    ``aux = E · Σ_e f_e·P_e``.
    """
    counted = attention_mask.reshape(-1).bool()
    probs = torch.stack([z.double()[counted] for z in router_logits]).softmax(-1)  # [L, N, E]
    experts = probs.shape[-1]
    ranked = probs.detach().sort(-1, descending=True).values
    gap = float((ranked[..., top_k - 1] - ranked[..., top_k]).min())
    chosen = torch.zeros_like(probs).scatter_(-1, probs.topk(top_k, -1).indices, 1.0)
    f = chosen.mean(dim=(0, 1))
    p = probs.mean(dim=(0, 1))
    return experts * (f * p).sum(), gap


def aux_bound(aux: torch.Tensor, router_logits: tuple[torch.Tensor, ...], mask: torch.Tensor) -> float:
    """Bound on an fp32 computation's error on ``aux`` (module docstring)."""
    terms = len(router_logits) * int(mask.sum())
    experts = router_logits[0].shape[-1]
    return float((terms + experts + 8) * U32 * aux.abs())


def make_trainer(tmp_path, family: str, **config) -> PreferenceTrainer:
    tok = byte_level_tokenizer()
    policy, ref = (tiny_moe(tok, family, router_aux_loss_coef=COEF, seed=s) for s in (0, 1))
    args = PreferenceConfig(
        output_dir=str(tmp_path),
        loss="dpo",
        beta=BETA,
        per_device_train_batch_size=PAIRS,
        max_steps=1,
        max_length=48,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **config,
    )
    return PreferenceTrainer(policy, ref_model=ref, args=args, train_dataset=ROWS, processing_class=tok)


def expected_step(family: str, batch: dict, *, with_aux: bool = True):
    """(float64 loss, its fp32 bound, float64 aux loss, its bound, float64 gradients) of the batch."""
    tok = byte_level_tokenizer()
    policy, ref = (tiny_moe(tok, family, router_aux_loss_coef=COEF, seed=s) for s in (0, 1))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["shift_labels"]
    out = policy(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_router_logits=True)
    with torch.no_grad():
        ref_hidden = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    hidden, weight = out.hidden_states[-1], policy.lm_head.weight
    dpo = reference.preference_loss(
        "dpo",
        hidden,
        weight,
        labels,
        ref_hidden=ref_hidden,
        ref_weight=ref.lm_head.weight.detach(),
        beta=BETA,
    )
    aux, gap = float64_aux_loss(out.router_logits, mask, policy.config.num_experts_per_tok)
    assert gap > 1e-5, f"a token's top-k router choice is within {gap:.2g} of a tie: fp32 could flip it"
    (dpo + COEF * aux if with_aux else dpo).backward()
    grads = {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None}

    kw = dict(ref_hidden=ref_hidden, ref_weight=ref.lm_head.weight.detach())
    exact = reference.token_logprobs(hidden.detach(), weight.detach(), labels, **kw)
    plain = plain_logprobs(hidden.detach(), weight.detach(), labels, **kw)
    bounds = loss_error_bounds(
        "dpo",
        {k: getattr(exact, k).sum(-1) for k in ("policy", "ref")},
        (labels != -100).sum(-1),
        {k: sequence_error_scale(getattr(plain, k), getattr(exact, k)) for k in ("policy", "ref")},
        dtype=torch.float32,
        beta=BETA,
    )
    return bounds.loss + COEF * aux, bounds.loss_bound, aux, aux_bound(aux, out.router_logits, mask), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILIES)
def test_trainer_adds_the_aux_loss_as_float64(tmp_path, family) -> None:
    """One training micro-batch: loss, logged aux_loss and every gradient equal the float64
    computation of ``DPO + COEF · aux``; the reference's forward forms no router logits."""
    trainer = make_trainer(tmp_path, family)
    assert trainer._router_aux_loss_coef == COEF  # the config's, as transformers
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(PAIRS)])
    assert batch["attention_mask"].eq(0).any()  # padding, which the aux loss must leave out
    asked: dict[str, list] = {"policy": [], "ref": []}
    for name, model in (("policy", trainer.model), ("ref", trainer.ref_model)):
        model.register_forward_pre_hook(
            lambda _m, _a, kw, name=name: asked[name].append(kw.get("output_router_logits")), with_kwargs=True
        )
    model = trainer.model.train()
    loss = trainer.compute_loss(model, trainer._prepare_inputs(dict(batch)))
    loss.backward()
    aux_logged = float(trainer._metrics["train"]["aux_loss"][-1])
    assert asked["policy"][-1] is True and set(asked["ref"]) == {False}, asked

    truth, bound, aux, aux_err, expected = expected_step(family, batch)
    assert abs(aux_logged - float(aux)) <= aux_err, (aux_logged, float(aux), aux_err)
    assert abs(loss.item() - float(truth)) <= bound + COEF * aux_err, (loss.item(), float(truth), bound)
    assert COEF * float(aux) > 1e3 * (bound + COEF * aux_err)  # the aux term is far above the bound
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    worst = max((_rel(got[n], expected[n]), n) for n in expected)
    assert worst[0] <= GRAD_RTOL, worst

    # Informative: without the aux loss the routers' gradients are far from these.
    *_, without = expected_step(family, batch, with_aux=False)
    gates = [n for n in expected if n.endswith("gate.weight") and "shared" not in n]
    assert gates and min(_rel(without[n], expected[n]) for n in gates) > 1e3 * GRAD_RTOL


def test_coefficient_rules(tmp_path) -> None:
    """transformers' rule by default (the config's coefficient when it sets output_router_logits),
    PreferenceConfig.router_aux_loss_coef when set; refused for a model that is not a MoE."""
    tok = byte_level_tokenizer()
    asks, silent = tiny_moe(tok, router_aux_loss_coef=0.3), tiny_moe(tok, output_router_logits=False)
    llama = tiny_llama(tok, hidden_size=16, num_heads=2)
    assert is_moe(asks) and is_moe(silent) and not is_moe(llama)
    assert trainer_aux_loss_coef(asks) == 0.3 and trainer_aux_loss_coef(asks, 0.0) == 0.0
    assert trainer_aux_loss_coef(silent) == 0.0 and trainer_aux_loss_coef(silent, 0.1) == 0.1
    assert trainer_aux_loss_coef(llama) == 0.0 == trainer_aux_loss_coef(llama, 0.0)
    assert router_logits_kwargs(silent, True) == {"output_router_logits": True}
    assert router_logits_kwargs(llama, True) == {}
    with pytest.raises(ValueError, match="router_aux_loss_coef=0.1 but LlamaForCausalLM is not a mixture"):
        trainer_aux_loss_coef(llama, 0.1)
    for bad in (-0.1, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="router_aux_loss_coef must be a finite number >= 0"):
            PreferenceConfig(output_dir=str(tmp_path), use_cpu=True, router_aux_loss_coef=bad)
    # coefficient 0 for a MoE that asks for router logits: no aux loss, none logged
    trainer = make_trainer(tmp_path, "mixtral", router_aux_loss_coef=0.0)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(PAIRS)]))
    trainer.compute_loss(trainer.model.train(), batch)
    assert "aux_loss" not in trainer._metrics["train"] and "rewards/margins" in trainer._metrics["train"]
