"""Padding-free (packed) micro-batches: `prefloss.hf.packing`, ``preference_loss(padding_free=True)`` and
``PreferenceConfig(padding_free=True)``.

The equality tests run in float64 end to end (the tiny Llama policy and reference, the fused op, the
loss), so that a correct packed computation agrees with the float64 oracle (`prefloss.reference` on
the padded batch's hidden states) to float64 rounding, while any real difference -- a token that sees
the previous sequence, a dropped or leaked label, a wrong position -- moves the loss by 1e-3 or more.
Loss state (α-DPO's running statistics, ε-DPO's β) is compared with the padded call's after two
micro-batches. `TOLERANCES[float64]` (1e-9 relative) is the float64-identity bound of
`prefloss.testing`.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import prefloss
from prefloss import reference
from prefloss.data import synthetic_preferences_path
from prefloss.hf.collator import PreferenceCollator
from prefloss.hf.data import tokenize_preferences
from prefloss.hf.packing import (
    check_packed_forward,
    check_packing_support,
    pack_batch,
    unpack_rows,
)
from prefloss.hf.step import preference_loss
from prefloss.hf.tiny import byte_level_tokenizer, tiny_llama
from prefloss.hf.trainer import PreferenceConfig, PreferenceTrainer
from prefloss.losses import LOSSES
from prefloss.testing import TOLERANCES, loss_error_bounds, plain_logprobs, sequence_error_scale

RTOL = TOLERANCES[torch.float64]

with open(synthetic_preferences_path("train")) as _f:
    ROWS = [json.loads(next(_f)) for _ in range(8)]


# --- pack_batch ---------------------------------------------------------------------------------------


def test_pack_batch_layout_by_hand() -> None:
    """Three rows of T = 5: right-padded (3 real), left-padded (2 real), full (5 real)."""
    ids = torch.tensor([[11, 12, 13, 0, 0], [0, 0, 0, 21, 22], [31, 32, 33, 34, 35]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    x = -100
    labels = torch.tensor([[x, 13, x, x, x], [x, x, x, 22, x], [x, x, 34, 35, x]])
    packed = pack_batch(ids, mask, labels)
    assert packed.input_ids.tolist() == [[11, 12, 13, 21, 22, 31, 32, 33, 34, 35]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 4]]
    assert packed.labels.tolist() == [[x, 13, x, 22, x, x, x, 34, 35, x]]
    assert packed.cu_seqlens.tolist() == [0, 3, 5, 10] and packed.cu_seqlens.dtype == torch.int64
    restored = unpack_rows(packed.input_ids[..., None], mask)[..., 0]
    assert torch.equal(restored, ids * mask)
    # no mask: every token real, each row one sequence
    whole = pack_batch(ids, None, torch.full_like(ids, x))
    assert whole.cu_seqlens.tolist() == [0, 5, 10, 15] and whole.position_ids[0, 5:10].tolist() == [
        0,
        1,
        2,
        3,
        4,
    ]


@pytest.mark.parametrize(
    "row0_mask, row0_labels, match",
    [
        ([1, 1, 1, 0], [-100, 5, 6, -100], r"`labels` row 0 position 2 \(its last real position\) is 6"),
        ([1, 1, 0, 0], [-100, -100, -100, 7], r"`labels` row 0 position 3 \(a padding position\) is 7"),
        ([1, 0, 1, 0], [-100, -100, -100, -100], r"`attention_mask` row 0 has padding between real tokens"),
        ([0, 0, 0, 0], [-100, -100, -100, -100], r"`mask` row 0 has no real token"),
    ],
    ids=["label-at-last-position", "label-at-padding", "mask-with-hole", "empty-row"],
)
def test_pack_batch_refuses_what_packing_would_change(row0_mask, row0_labels, match) -> None:
    ids = torch.arange(8).reshape(2, 4)
    mask = torch.tensor([row0_mask, [1, 1, 1, 1]])
    labels = torch.tensor([row0_labels, [-100, 1, 2, -100]])
    with pytest.raises(ValueError, match=match):
        pack_batch(ids, mask, labels)


# --- preference_loss: packed == padded == float64 oracle ------------------------------------------------


def _models():
    tok = byte_level_tokenizer()
    policy = tiny_llama(tok, hidden_size=32, intermediate_size=64, num_heads=2, seed=0).double()
    ref = tiny_llama(tok, hidden_size=32, intermediate_size=64, num_heads=2, seed=1).double()
    return tok, policy, ref.eval().requires_grad_(False)


def _batches(tok, pairs: int = 2) -> list[dict[str, torch.Tensor]]:
    """Two micro-batches of ``pairs`` pairs; max_length 40 cuts some rows, so lengths differ."""
    data = tokenize_preferences(ROWS[: 2 * pairs], tok, max_length=40)
    collate = PreferenceCollator(tok.pad_token_id)
    return [collate([data[i] for i in range(k * pairs, (k + 1) * pairs)]) for k in range(2)]


LOSS_CASES = {
    "alpha_dpo": dict(),
    "epsilon_dpo": dict(beta=0.1, epsilon=0.3, compare_dtype=None),
    "dpo": dict(beta=0.5),
    "simpo": dict(),
}
LOSS_CLASSES = {
    "alpha_dpo": prefloss.AlphaDPOLoss,
    "epsilon_dpo": prefloss.EpsilonDPOLoss,
    "dpo": prefloss.DPOLoss,
    "simpo": prefloss.SimPOLoss,
}


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_grads_close(got: dict, expected: dict, what: str) -> None:
    assert got.keys() == expected.keys() and got, what
    for name, e in expected.items():
        err = float((got[name] - e).norm() / e.norm().clamp(min=1e-300))
        assert err <= RTOL, f"{what}: gradient of {name} off by {err:.3g} (relative)"


@pytest.mark.parametrize("name", list(LOSS_CASES), ids=list(LOSS_CASES))
def test_packed_preference_loss_equals_padded_and_float64(name: str) -> None:
    tok, policy, ref = _models()
    ref_model = None if name == "simpo" else ref
    padded_fn, packed_fn = (LOSS_CLASSES[name](**LOSS_CASES[name]).double() for _ in range(2))
    first, second = _batches(tok)
    ids, mask, labels = first["input_ids"], first["attention_mask"], first["shift_labels"]
    assert len(set(mask.sum(1).tolist())) > 1, "the rows must differ in length, else nothing is padded"

    # the float64 oracle on the padded batch's hidden states (first step: the losses' initial state)
    hidden = policy(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    kw = {}
    if ref_model is not None:
        with torch.no_grad():
            ref_hidden = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        kw = dict(ref_hidden=ref_hidden, ref_weight=ref.lm_head.weight)
    hp = {k: v for k, v in LOSS_CASES[name].items() if k != "compare_dtype"}
    truth = reference.preference_loss(name, hidden, policy.lm_head.weight, labels, **kw, **hp)
    truth.backward()
    expected_grads = _grads(policy)

    losses, grads = {}, {}
    for mode, fn in (("padded", padded_fn), ("packed", packed_fn)):
        out = preference_loss(
            fn, policy, ids, mask, labels, ref_model=ref_model, padding_free=mode == "packed"
        )
        out.loss.backward()
        losses[mode], grads[mode] = out.loss.detach(), _grads(policy)
    # packed == padded to float64 rounding; both as close to the oracle as the padded call is (the
    # padded call itself is within float64 rounding of it but for ε-DPO, whose ε enters the fused op
    # in fp32: 2e-9 relative on the loss, 7e-8 on gradients)
    torch.testing.assert_close(losses["packed"], losses["padded"], rtol=RTOL, atol=0)
    _assert_grads_close(grads["packed"], grads["padded"], f"{name} packed vs padded")
    truth = truth.detach()
    off = float((losses["padded"] - truth).abs()) + RTOL * float(truth.abs())
    assert float((losses["packed"] - truth).abs()) <= off, (name, losses["packed"], truth)
    for param, expected in expected_grads.items():
        scale = float(expected.norm())
        padded_off = float((grads["padded"][param] - expected).norm()) + RTOL * scale
        assert float((grads["packed"][param] - expected).norm()) <= padded_off, (name, param)
    if name != "epsilon_dpo":
        torch.testing.assert_close(losses["padded"], truth.detach(), rtol=RTOL, atol=0)
        _assert_grads_close(grads["padded"], expected_grads, f"{name} padded vs float64")

    # a second micro-batch: the loss reads the state the first left; then ε-DPO's β update
    ids, mask, labels = second["input_ids"], second["attention_mask"], second["shift_labels"]
    again = {
        mode: preference_loss(
            fn, policy, ids, mask, labels, ref_model=ref_model, padding_free=mode == "packed"
        )
        for mode, fn in (("padded", padded_fn), ("packed", packed_fn))
    }
    torch.testing.assert_close(again["packed"].loss, again["padded"].loss, rtol=RTOL, atol=0)
    for k, v in again["padded"].metrics.items():
        torch.testing.assert_close(again["packed"].metrics[k], v, rtol=RTOL, atol=1e-12, msg=k)
    for fn in (padded_fn, packed_fn):
        if hasattr(fn, "update_beta"):
            fn.update_beta()
    state, expected_state = packed_fn.state_dict(), padded_fn.state_dict()
    for k, v in expected_state.items():
        torch.testing.assert_close(state[k], v, rtol=RTOL, atol=1e-15, msg=f"{name} state {k}")
    if name == "epsilon_dpo":
        assert float(packed_fn.beta) != 0.1, "ε-DPO's β never moved: the state check would prove nothing"
    if name == "alpha_dpo":
        assert float(packed_fn.running_std) > 0, "α-DPO's statistics never moved"


def test_packed_preference_loss_with_precomputed_reference() -> None:
    """``ref_logps`` (precomputed sums) with a packed policy: the padded call's loss and gradients."""
    tok, policy, ref = _models()
    (batch, _) = _batches(tok)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["shift_labels"]
    with torch.no_grad():
        ref_logps = prefloss.sequence_logprobs(
            ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1],
            ref.lm_head.weight,
            labels,
        ).policy
    results = {}
    for packed in (False, True):
        out = preference_loss(
            prefloss.DPOLoss(beta=0.5), policy, ids, mask, labels, ref_logps=ref_logps, padding_free=packed
        )
        out.loss.backward()
        results[packed] = (out.loss.detach(), _grads(policy))
    torch.testing.assert_close(results[True][0], results[False][0], rtol=RTOL, atol=0)
    _assert_grads_close(results[True][1], results[False][1], "dpo ref_logps packed")


def test_packed_lora_policy_with_adapters_disabled_reference() -> None:
    """A LoRA policy whose reference is itself with adapters disabled (`AdaptersDisabled`): packed ==
    padded (float64), the loss and the adapters' gradients."""
    peft = pytest.importorskip("peft")
    from prefloss.hf.adapters import AdaptersDisabled

    tok, policy, _ = _models()
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    policy = peft.get_peft_model(policy, config)
    ref = AdaptersDisabled(policy)
    batch, _ = _batches(tok)
    results = {}
    for packed in (False, True):
        out = preference_loss(
            prefloss.DPOLoss(beta=0.5),
            policy,
            batch["input_ids"],
            batch["attention_mask"],
            batch["shift_labels"],
            ref_model=ref,
            padding_free=packed,
        )
        out.loss.backward()
        results[packed] = (out.loss.detach(), _grads(policy))
    torch.testing.assert_close(results[True][0], results[False][0], rtol=RTOL, atol=0)
    assert all("lora_" in n for n in results[False][1])
    _assert_grads_close(results[True][1], results[False][1], "LoRA packed vs padded")


def test_packed_moe_keeps_its_load_balancing_loss() -> None:
    """A MoE policy's router aux loss over the packed tokens is the padded one's (transformers averages
    over the tokens whose attention_mask is 1; packed, every token is real). fp32: the MoE layers'
    grouped GEMMs take no float64; two fp32 computations of one step differ by a few √K·u (measured on
    tiny Mixtral 2e-7 on gradients, on tiny Qwen2-MoE 2.4e-6 on the loss and 4.9e-6 on gradients), so
    1e-5 and 5e-5."""
    from prefloss.hf.tiny import tiny_moe

    tok = byte_level_tokenizer()
    policy, ref = (
        tiny_moe(tok, "mixtral", seed=0),
        tiny_moe(tok, "mixtral", seed=1).eval().requires_grad_(False),
    )
    batch, _ = _batches(tok)
    results = {}
    for packed in (False, True):
        out = preference_loss(
            prefloss.DPOLoss(beta=0.5),
            policy,
            batch["input_ids"],
            batch["attention_mask"],
            batch["shift_labels"],
            ref_model=ref,
            router_aux_loss_coef=0.5,
            padding_free=packed,
        )
        out.loss.backward()
        results[packed] = (out.loss.detach(), out.metrics["aux_loss"].detach(), _grads(policy))
    (loss, aux, grads), (packed_loss, packed_aux, packed_grads) = results[False], results[True]
    torch.testing.assert_close(packed_aux, aux, rtol=1e-6, atol=0)
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=0)
    assert packed_grads.keys() == grads.keys() and any("gate" in n for n in grads)
    worst = max(
        (float((packed_grads[n] - g).norm() / g.norm().clamp(min=1e-30)), n) for n, g in grads.items()
    )
    assert worst[0] <= 5e-5, worst


# --- refusals ----------------------------------------------------------------------------------------


def _tiny_lfm2() -> torch.nn.Module:
    """LFM2: short convolutions between its attention layers carry tokens across a sequence boundary."""
    config = AutoConfig.for_model(
        "lfm2",
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["conv", "full_attention"],
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).double()


def test_model_that_leaks_across_sequences_is_refused_by_name_and_by_the_forward_check() -> None:
    model = _tiny_lfm2()
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"Lfm2ForCausalLM \(model_type 'lfm2'\).*layer types \['conv'\]"):
        check_packing_support(model)
    # the forward check catches it without the name: the packed hidden states differ from separate runs
    with pytest.raises(ValueError, match=r"cannot run Lfm2ForCausalLM .*sdpa.*from each sequence run alone"):
        check_packed_forward(model, ids, None)
    labels = torch.full_like(ids, -100)
    labels[:, 5:8] = ids[:, 6:9]
    with pytest.raises(ValueError, match="padding_free=True cannot run Lfm2ForCausalLM"):
        preference_loss(prefloss.SimPOLoss(), model, ids, None, labels, padding_free=True)


def test_llama_passes_the_forward_check_in_float32() -> None:
    """sdpa and eager keep packed sequences apart (the check's error is rounding only), and the check
    warns that their packed mask is dense."""
    tok = byte_level_tokenizer()
    ids = torch.randint(3, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    for implementation in ("sdpa", "eager"):
        model = tiny_llama(tok, hidden_size=32, intermediate_size=64, num_heads=2, seed=0)
        model.config._attn_implementation = implementation
        with pytest.warns(UserWarning, match=r"dense \[L, L\] block-causal mask"):  # its cost, once
            assert check_packed_forward(model, ids, None) <= 1e-5, implementation


def test_vision_language_model_and_extra_inputs_are_refused() -> None:
    from prefloss.hf.tiny import tiny_vision_model, tiny_vision_processor

    vlm = tiny_vision_model("llava", tiny_vision_processor("llava"))
    with pytest.raises(
        ValueError, match=r"LlavaForConditionalGeneration \(model_type 'llava'\).*vision-language"
    ):
        check_packing_support(vlm)
    tok = byte_level_tokenizer()
    llama = tiny_llama(tok, hidden_size=32, intermediate_size=64, num_heads=2, seed=0)
    with pytest.raises(ValueError, match=r"model inputs beyond the tokens \(\['pixel_values'\]\)"):
        check_packing_support(llama, {"pixel_values": torch.zeros(1)})
    llama.config._attn_implementation = "paged|sdpa"
    with pytest.raises(ValueError, match=r"attention implementation 'paged\|sdpa' is not known"):
        check_packing_support(llama)


# --- PreferenceTrainer --------------------------------------------------------------------------------


def test_trainer_padding_free_trains_as_padded(tmp_path) -> None:
    """Two optimizer steps of 2 micro-batches of 2 pairs (float64 models, SGD): the packed run's
    micro-batch losses, final weights and loss state (α-DPO) are the padded run's; the first micro-batch
    loss is the float64 oracle's, within `loss_error_bounds` at float64 (its first step divides by
    0.1·std of two margins, which amplifies float64 rounding to ~1e-9)."""
    loss, hp = "alpha_dpo", {}  # ε-DPO's β updates through the Trainer: tests/test_hf_trainer_engines.py
    runs = {}
    for packed in (False, True):
        tok, policy, ref = _models()
        args = PreferenceConfig(
            output_dir=str(tmp_path / str(packed)),
            loss=loss,
            max_steps=2,
            gradient_accumulation_steps=2,
            per_device_train_batch_size=2,
            learning_rate=0.1,
            optim="sgd",
            report_to=[],
            use_cpu=True,
            max_length=40,
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            train_sampling_strategy="sequential",
            seed=0,
            padding_free=packed,
            **hp,
        )
        trainer = PreferenceTrainer(
            policy, ref_model=ref, args=args, train_dataset=ROWS, processing_class=tok
        )
        losses: list[torch.Tensor] = []
        compute_loss = trainer.compute_loss

        def recorded(*a, _compute=compute_loss, _losses=losses, **k):
            loss_value = _compute(*a, **k)
            _losses.append(loss_value.detach().clone())
            return loss_value

        trainer.compute_loss = recorded
        trainer.train()
        runs[packed] = (trainer, torch.stack(losses))
    (padded, padded_losses), (packed, packed_losses) = runs[False], runs[True]
    assert packed.args.padding_free and len(packed_losses) == 4
    torch.testing.assert_close(packed_losses, padded_losses, rtol=RTOL, atol=0)
    for (name, p), q in zip(packed.model.named_parameters(), padded.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=1e-13, msg=name)
    expected_state = padded.loss_fn.state_dict()
    for k, v in packed.loss_fn.state_dict().items():
        torch.testing.assert_close(v, expected_state[k], rtol=RTOL, atol=1e-15, msg=k)

    # the first micro-batch's loss against the float64 oracle
    first = padded.data_collator([padded.train_dataset[i] for i in range(2)])
    _, policy, ref = _models()
    ids, mask, labels = first["input_ids"], first["attention_mask"], first["shift_labels"]
    with torch.no_grad():
        hidden = policy(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        ref_hidden = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    exact = reference.token_logprobs(
        hidden, policy.lm_head.weight, labels, ref_hidden=ref_hidden, ref_weight=ref.lm_head.weight
    )
    plain = plain_logprobs(
        hidden, policy.lm_head.weight, labels, ref_hidden=ref_hidden, ref_weight=ref.lm_head.weight
    )
    hp = {**LOSSES[loss].defaults, **{k: v for k, v in hp.items() if k != "loss_kwargs"}}
    bounds = loss_error_bounds(  # α-DPO's first step amplifies rounding by 1/(0.1·std of the margins)
        loss,
        {k: getattr(exact, k).sum(-1) for k in ("policy", "ref")},
        (labels != -100).sum(-1),
        {k: sequence_error_scale(getattr(plain, k), getattr(exact, k)) for k in ("policy", "ref")},
        dtype=torch.float64,
        **hp,
    )
    err = float((packed_losses[0] - bounds.loss).abs())
    assert err <= bounds.loss_bound, (err, bounds.loss_bound)


def test_trainer_refuses_padding_free_with_image_data(tmp_path) -> None:
    from prefloss.hf.tiny import tiny_image_preferences, tiny_vision_model, tiny_vision_processor

    processor = tiny_vision_processor("llava")
    args = PreferenceConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], padding_free=True)
    with pytest.raises(ValueError, match="padding_free=True is not supported with image preference data"):
        PreferenceTrainer(
            tiny_vision_model("llava", processor),
            args=args,
            train_dataset=tiny_image_preferences(2),
            processing_class=processor,
        )
