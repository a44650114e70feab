"""`PreferenceTrainer` on image preference data (`prefloss.hf.vision`), with tiny random LLaVA and
Gemma 3 and Qwen2-VL models and processors built in code (`prefloss.hf.tiny`).

The collator's batches are the `PreferenceCollator` layout plus the vision inputs, each pair's images
twice (chosen row, rejected row); their tokens and tensors equal TRL's vision collator's. On such a
batch the trainer's first loss (DPO; α-DPO) is within `prefloss.testing.loss_error_bounds` of a float64
loss of the models' own last hidden states (``model(**batch, output_hidden_states=True)``, which runs
the vision tower) and output heads (`prefloss.reference`); its gradient reaches the vision tower.
What prefloss cannot do with images is refused by name.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("PIL")

from prefloss import reference  # noqa: E402
from prefloss.hf import PreferenceConfig, PreferenceTrainer  # noqa: E402
from prefloss.hf.tiny import (  # noqa: E402
    VISION_FAMILIES,
    tiny_image_preferences,
    tiny_vision_model,
    tiny_vision_processor,
)
from prefloss.hf.vision import VisionPreferenceCollator, is_image_data  # noqa: E402
from prefloss.testing import loss_error_bounds, plain_logprobs, sequence_error_scale  # noqa: E402

FAMILIES = list(VISION_FAMILIES)
VISION_TOWER = {"llava": "vision_tower", "gemma3": "vision_tower", "qwen2_vl": "visual"}  # its name
PAIRS = 2

pytestmark = pytest.mark.usefixtures("quiet_hf")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the tiny models' ops are too small to split, and on a loaded 2-core machine
    two threads made these tests 4x slower (their synchronisation, not their arithmetic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(family: str, conversational: bool) -> list[dict]:
    return tiny_image_preferences(3, placeholder=None if conversational else VISION_FAMILIES[family][0])


@pytest.mark.parametrize("conversational", [True, False], ids=["messages", "plain"])
@pytest.mark.parametrize("family", FAMILIES)
def test_collator_layout(family, conversational):
    processor = tiny_vision_processor(family)
    rows = _rows(family, conversational)
    batch = VisionPreferenceCollator(processor)(rows)
    b = len(rows)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["shift_labels"]
    assert ids.shape[0] == 2 * b
    # one image a row, each pair's twice: [2B, 3, 16, 16]; or Qwen2-VL's patches of the 2B images in
    # turn ([Σ t·h·w, 3·2·4·4]), one image_grid_thw row (t, h, w) per image, the grid following each
    # image's aspect ratio, and t·h·w / 4 image tokens (2 × 2 patches merged)
    pixels = batch["pixel_values"]
    tokens = torch.full((2 * b,), 4)
    if family == "qwen2_vl":
        grid = batch["image_grid_thw"]
        assert grid.shape == (2 * b, 3) and torch.equal(grid[:b], grid[b:])
        assert pixels.shape[0] == int(grid.prod(-1).sum()) and len(set(map(tuple, grid.tolist()))) > 1
        tokens = grid.prod(-1) // 4
    else:
        assert pixels.shape[0] == 2 * b
    assert torch.equal(pixels[: len(pixels) // 2], pixels[len(pixels) // 2 :])
    image_id = processor.tokenizer.image_token_id
    for i in range(2 * b):
        n = int(mask[i].sum())
        assert mask[i, :n].all() and not mask[i, n:].any()  # right-padded
        assert int((ids[i] == image_id).sum()) == tokens[i]  # the image's tokens
        scored = labels[i] != -100
        assert torch.equal(labels[i, scored], ids[i, 1:][scored[:-1]])  # shifted: t predicts t + 1
        assert not scored[n - 1 :].any()
        first = int(scored.nonzero()[0])
        assert (ids[i, : first + 1] == image_id).sum() == tokens[i]  # images in the unscored prompt
    # the prompts of a pair are the same row prefix; the responses differ
    for i in range(b):
        p = int((labels[i] != -100).nonzero()[0]) + 1
        assert torch.equal(ids[i, :p], ids[i + b, :p])
    if family != "llava":  # image tokens marked 1, everything else 0
        key = "token_type_ids" if family == "gemma3" else "mm_token_type_ids"
        assert torch.equal(batch[key].bool(), ids == image_id)
    trl_collator = pytest.importorskip("trl.trainer.dpo_trainer").DataCollatorForVisionPreference
    theirs = trl_collator(processor)([dict(r) for r in rows])
    completion = theirs.pop("completion_mask")
    assert theirs.keys() == batch.keys() - {"shift_labels"}
    for key, value in theirs.items():
        assert torch.equal(value, batch[key]), key
    assert torch.equal(labels[:, :-1], ids[:, 1:].masked_fill(completion[:, 1:] == 0, -100))


def test_is_image_data():
    assert is_image_data(tiny_image_preferences(1))
    assert is_image_data([{"image": None, "prompt": "", "chosen": "", "rejected": ""}])
    assert not is_image_data([{"prompt": "", "chosen": "", "rejected": ""}])


def _trainer(
    root,
    family,
    tiny_training_args,
    *,
    processing_class=None,
    ref=True,
    peft_config=None,
    eval_dataset=None,
    **config,
):
    processor = tiny_vision_processor(family)
    defaults = tiny_training_args(root, pairs=PAIRS)
    args = PreferenceConfig(**{**defaults, "loss": "dpo", **config})
    return PreferenceTrainer(
        model=tiny_vision_model(family, processor, seed=0),
        ref_model=tiny_vision_model(family, processor, seed=1) if ref else None,
        args=args,
        train_dataset=tiny_image_preferences(4),
        eval_dataset=eval_dataset,
        processing_class=processor if processing_class is None else processing_class,
        peft_config=peft_config,
    )


def _truth(name, model, ref, batch, **hp):
    """Float64 loss and its fp32 bound from the models' own last hidden states and output heads."""
    inputs = {k: v for k, v in batch.items() if k != "shift_labels"}
    labels = batch["shift_labels"]

    def hidden(m):
        with torch.no_grad():
            return m(**inputs, output_hidden_states=True, use_cache=False).hidden_states[-1]

    kw = dict(ref_hidden=hidden(ref), ref_weight=ref.get_output_embeddings().weight.detach())
    weight = model.get_output_embeddings().weight.detach()
    exact = reference.token_logprobs(hidden(model), weight, labels, **kw)
    plain = plain_logprobs(hidden(model), weight, labels, **kw)
    sums = {k: getattr(exact, k).sum(-1) for k in ("policy", "ref")}
    scales = {k: sequence_error_scale(getattr(plain, k), getattr(exact, k)) for k in ("policy", "ref")}
    length = (labels != -100).sum(-1)
    return loss_error_bounds(name, sums, length, scales, dtype=torch.float32, **hp)


LOSSES = [("dpo", dict(beta=0.1)), ("alpha_dpo", dict(beta=2.5, gamma_beta_ratio=0.6, alpha=0.2))]


@pytest.mark.parametrize(("loss", "hp"), LOSSES, ids=[n for n, _ in LOSSES])
@pytest.mark.parametrize("family", FAMILIES)
def test_first_loss_matches_float64(tmp_path, family, loss, hp, tiny_training_args):
    trainer = _trainer(tmp_path, family, tiny_training_args, loss=loss, **hp)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(PAIRS)])
    model = trainer.model
    model.train()
    value = trainer.compute_loss(model, trainer._prepare_inputs(dict(batch)))
    value.backward()
    bounds = _truth(loss, trainer.model, trainer.ref_model, batch, **hp)
    assert abs(value.item() - bounds.loss.item()) <= bounds.loss_bound, (value.item(), bounds.loss.item())
    tower = [p.grad for n, p in model.named_parameters() if VISION_TOWER[family] in n and p.grad is not None]
    assert tower and any(g.abs().sum() > 0 for g in tower)


def test_trains_three_steps_and_evaluates(tmp_path, tiny_training_args):
    trainer = _trainer(tmp_path, "gemma3", tiny_training_args, eval_dataset=tiny_image_preferences(2, seed=1))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # DPO on the same 4 pairs: the margin grows
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and "eval_rewards/margins" in metrics


def test_lora_policy_first_loss_matches_float64(tmp_path, tiny_training_args):
    """A LoRA policy is its own reference with its adapters disabled, images passed to both."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = _trainer(tmp_path, "llava", tiny_training_args, ref=False, peft_config=config)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(PAIRS)])
    trainer.model.train()
    value = trainer.compute_loss(trainer.model, trainer._prepare_inputs(dict(batch)))

    class Disabled(torch.nn.Module):  # the float64 truth's reference: the PEFT model, adapters off
        def __init__(self, m):
            super().__init__()
            self.m = m

        def get_output_embeddings(self):
            return self.m.get_output_embeddings()

        def forward(self, **kw):
            with self.m.disable_adapter():
                return self.m(**kw)

    bounds = _truth("dpo", trainer.model, Disabled(trainer.model), batch, beta=0.1)
    assert abs(value.item() - bounds.loss.item()) <= bounds.loss_bound, (value.item(), bounds.loss.item())
    assert abs(value.item() - math.log(2)) > 1e-3  # the adapters moved the policy off its reference


def test_refusals(tmp_path, tiny_training_args):
    with pytest.raises(ValueError, match="precompute_ref_log_probs=True is not supported with image"):
        _trainer(tmp_path, "llava", tiny_training_args, precompute_ref_log_probs=True)
    tokenizer = tiny_vision_processor("llava").tokenizer
    with pytest.raises(ValueError, match="needs the model.s processor as processing_class"):
        _trainer(tmp_path, "llava", tiny_training_args, processing_class=tokenizer)
    trainer = _trainer(tmp_path, "llava", tiny_training_args, max_length=20)
    with pytest.raises(ValueError, match=r"row 0: the prompt has \d+ tokens .* max_length=20"):
        trainer.data_collator([trainer.train_dataset[0]])


def test_output_head_check_sees_vision_model(tmp_path, tiny_training_args):
    """Gemma 3's vision-language forward applies no logit soft-cap (its text-only ``ForCausalLM``
    does): with ``final_logit_softcapping`` set, prefloss's head would, and the first-step check (run on
    the batch with its images) refuses the model rather than train on wrong log-probs."""
    trainer = _trainer(tmp_path, "gemma3", tiny_training_args)
    for m in (trainer.model, trainer.ref_model):
        m.config.text_config.final_logit_softcapping = 2.0
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(PAIRS)])
    with pytest.raises(ValueError, match="Gemma3ForConditionalGeneration.*differ from log_softmax"):
        trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
