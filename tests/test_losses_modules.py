"""The loss modules (`prefloss.AlphaDPOLoss`, `EpsilonDPOLoss`, `DPOLoss`, `SimPOLoss`) on hidden states.

Inputs are ``[2B, T, H]`` hidden states (rows ``[0, B)`` chosen, ``[B, 2B)`` rejected) with masked
prompts and right padding. Ground truth is `prefloss.reference` in float64 (full logits), judged
with `prefloss.testing.assert_close_to_reference`; batch-level state (α-DPO's running statistics,
ε-DPO's β) is checked against float64 recurrences written out here from docs/losses.md.
Float64 inputs run the module converted with ``.to(torch.float64)`` (its statistics / β buffers
too), as any ``nn.Module`` is for float64 work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import prefloss
from prefloss import reference
from prefloss.testing import assert_close_to_reference

DTYPES = {"fp32": torch.float32, "fp64": torch.float64}

# Non-default hyperparameters, so a default silently used instead would show.
HPARAMS = {
    "alpha_dpo": dict(beta=2.0, gamma_beta_ratio=0.4, alpha=0.5),
    "epsilon_dpo": dict(beta=0.5, epsilon=0.1),
    "dpo": dict(beta=0.5),
    "simpo": dict(beta=2.0, gamma_beta_ratio=0.3),
}
NAMES = list(HPARAMS)
REFERENCE_FREE = {"simpo"}  # takes no reference model, and refuses reference arguments

COMMON_METRICS = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
}
EXTRA_METRICS = {
    "alpha_dpo": {
        "logps/ref_chosen",
        "logps/ref_rejected",
        "RATIO/ref_logratios",
        "RATIO/MIN_ref_logratios",
        "RATIO/MAX_ref_logratios",
        "RATIO/var_ref_logratios",
    },
    "epsilon_dpo": {"kl/p_epsilon_steps", "kl/n_epsilon_steps", "kl/beta"},
    "dpo": set(),
    "simpo": set(),
}


def make_module(name: str, **overrides) -> torch.nn.Module:
    kwargs = {**HPARAMS[name], **overrides}
    if name == "epsilon_dpo":
        kwargs.setdefault("compare_dtype", None)  # exact comparison, as the float64 reference
    return prefloss.losses.LOSSES[name](**kwargs)


@dataclass(frozen=True)
class Shape:
    pairs: int
    T: int
    H: int
    V: int


SHAPES = {
    "B3-T7-H10-V37": Shape(3, 7, 10, 37),
    "B1-T5-H3-V5": Shape(1, 5, 3, 5),
    "B4-T9-H6-V23": Shape(4, 9, 6, 23),
}


@dataclass
class Batch:
    hidden: torch.Tensor  # [2B, T, H], requires grad
    weight: torch.Tensor  # [V, H], requires grad
    labels: torch.Tensor  # [2B, T]
    ref_hidden: torch.Tensor
    ref_weight: torch.Tensor

    @property
    def ref(self) -> dict:
        return {"ref_hidden": self.ref_hidden, "ref_weight": self.ref_weight}

    def ref_of(self, name: str) -> dict:
        """The reference arguments loss ``name`` takes: none for a reference-free loss."""
        return {} if name in REFERENCE_FREE else self.ref

    def float64(self) -> dict:
        """Float64 leaf copies for the reference (fresh leaves, so gradients can be taken)."""
        return {
            "hidden": self.hidden.detach().double().requires_grad_(),
            "weight": self.weight.detach().double().requires_grad_(),
            "labels": self.labels,
            "ref_hidden": self.ref_hidden.detach().double(),
            "ref_weight": self.ref_weight.detach().double(),
        }


def make_batch(shape: Shape, dtype: torch.dtype, seed: int = 0, *, empty_rows=()) -> Batch:
    """Random policy; reference = policy + noise. Each pair shares a prompt (1..T/2 masked tokens),
    each response is right-padded by 0..2 tokens; ``empty_rows`` get no counted token at all."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * shape.pairs
    hidden = torch.randn(rows, shape.T, shape.H, generator=g, dtype=torch.float64)
    weight = torch.randn(shape.V, shape.H, generator=g, dtype=torch.float64) / shape.H**0.5 * 2
    ref_hidden = hidden + 0.3 * torch.randn(hidden.shape, generator=g, dtype=torch.float64)
    ref_weight = weight + 0.2 * torch.randn(weight.shape, generator=g, dtype=torch.float64) / shape.H**0.5
    labels = torch.randint(0, shape.V, (rows, shape.T), generator=g)
    prompt = torch.randint(1, max(2, shape.T // 2 + 1), (shape.pairs,), generator=g).repeat(2)
    pad = torch.randint(0, 3, (rows,), generator=g)
    t = torch.arange(shape.T)
    labels[(t[None] < prompt[:, None]) | (t[None] >= shape.T - pad[:, None])] = -100
    for r in empty_rows:
        labels[r] = -100
    return Batch(
        hidden.to(dtype).requires_grad_(),
        weight.to(dtype).requires_grad_(),
        labels,
        ref_hidden.to(dtype),
        ref_weight.to(dtype),
    )


def reference_sequences(batch: Batch, *, epsilon=None, normalise=False):
    """Float64 per-row (policy, ref, minus, plus) sums, or means over counted tokens."""
    tok = reference.token_logprobs(
        batch.hidden.detach().double(),
        batch.weight.detach().double(),
        batch.labels,
        ref_hidden=batch.ref_hidden.double(),
        ref_weight=batch.ref_weight.double(),
        epsilon=epsilon,
    )
    length = tok.mask.sum(-1).double().clamp(min=1)
    out = []
    for x in (tok.policy, tok.ref, tok.minus, tok.plus):
        s = None if x is None else x.sum(-1)
        out.append(s / length if s is not None and normalise else s)
    return out


def pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = x.shape[0] // 2
    return x[:b], x[b:]


def reference_steps(batch: Batch, epsilon: float) -> torch.Tensor:
    """ε-DPO steps from float64 sums; asserts no pair is within 1e-4 of a tie, so an fp32 (or
    float64) exact comparison in prefloss must reach the same steps."""
    pol, _, minus, plus = reference_sequences(batch, epsilon=epsilon)
    ell, ell_m, ell_p = ((c - r) for c, r in map(pairs, (pol, minus, plus)))
    gaps = torch.cat([(ell_m - ell).abs(), (ell - ell_p).abs()])
    assert float(gaps.min()) > 1e-4, "test data too close to an ε-DPO tie; pick another seed"
    return reference.epsilon_steps(*pairs(pol), *pairs(minus), *pairs(plus))


def reference_gaps(batch: Batch) -> torch.Tensor:
    """α-DPO's M = (π̄_w − π̄_l) − (ρ̄_w − ρ̄_l), float64, ``[B]``."""
    pol, ref, _, _ = reference_sequences(batch, normalise=True)
    (pc, pr), (rc, rr) = pairs(pol), pairs(ref)
    return (pc - pr) - (rc - rr)


def run_module(module, batch: Batch, upstream: float = 0.7, **kwargs):
    """Forward + backward of ``upstream·loss``; returns (output, ∂hidden, ∂weight)."""
    batch.hidden.grad = batch.weight.grad = None
    kw = dict(batch.ref_of(module.name))
    kw.update(kwargs)
    out = module(batch.hidden, batch.weight, batch.labels, **kw)
    (out.loss * upstream).backward()
    return out, batch.hidden.grad.clone(), batch.weight.grad.clone()


def run_reference(name: str, batch: Batch, upstream: float = 0.7, **hp):
    x = batch.float64()
    loss = reference.preference_loss(
        name,
        x["hidden"],
        x["weight"],
        x["labels"],
        ref_hidden=x["ref_hidden"],
        ref_weight=x["ref_weight"],
        **{**HPARAMS[name], **hp},
    )
    gh, gw = torch.autograd.grad(loss * upstream, [x["hidden"], x["weight"]])
    return loss.detach(), gh, gw


def all_finite(out, *grads) -> bool:
    tensors = [out.loss, *grads, *out.metrics.values(), out.chosen_rewards, out.rejected_rewards]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# --- against the float64 reference ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_module_matches_reference(name, shape, dtype):
    """Loss and gradients w.r.t. hidden and weight (random upstream gradient) at the first
    training step, vs `reference.preference_loss` in float64; metric names as in docs/losses.md."""
    batch = make_batch(shape, dtype, seed=11)
    if name == "epsilon_dpo":
        reference_steps(batch, HPARAMS[name]["epsilon"])
    module = make_module(name).to(dtype)
    out, gh, gw = run_module(module, batch, upstream=0.7)
    loss, rgh, rgw = run_reference(name, batch, upstream=0.7)
    assert_close_to_reference(out.loss, loss, dtype=dtype, name=f"{name} loss")
    assert_close_to_reference(gh, rgh, dtype=dtype, name=f"{name} d hidden")
    assert_close_to_reference(gw, rgw, dtype=dtype, name=f"{name} d weight")
    assert COMMON_METRICS | EXTRA_METRICS[name] <= set(out.metrics), sorted(out.metrics)
    assert all_finite(out, gh, gw)
    assert out.loss.dim() == 0 and out.chosen_rewards.shape == (shape.pairs,)


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_module_metrics_values(name):
    """``logps/*`` are means of the sums (DPO, ε-DPO) or of the per-token means (SimPO, α-DPO);
    ``rewards/margins`` is mean(chosen − rejected) reward (fp32), ``rewards/accuracies`` the
    fraction of pairs with chosen reward > rejected reward."""
    batch = make_batch(SHAPES["B4-T9-H6-V23"], torch.float64, seed=2)
    normalise = name in ("alpha_dpo", "simpo")
    pol, ref, _, _ = reference_sequences(batch, normalise=normalise)
    (pc, pr), (rc, rr) = pairs(pol), pairs(ref)
    out = make_module(name).double()(batch.hidden, batch.weight, batch.labels, **batch.ref_of(name))
    m = out.metrics
    tight = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m["logps/chosen"].double(), pc.mean(), **tight)
    torch.testing.assert_close(m["logps/rejected"].double(), pr.mean(), **tight)
    if name == "alpha_dpo":
        torch.testing.assert_close(m["logps/ref_chosen"].double(), rc.mean(), **tight)
        torch.testing.assert_close(m["logps/ref_rejected"].double(), rr.mean(), **tight)
    c, r = out.chosen_rewards.double(), out.rejected_rewards.double()
    # reward metrics are fp32 by design (`reward_metrics`), whatever the input dtype
    torch.testing.assert_close(m["rewards/margins"].double(), (c - r).mean(), rtol=1e-6, atol=1e-7)
    assert float(m["rewards/accuracies"]) == float((c > r).double().mean())
    if name == "dpo":
        beta = HPARAMS["dpo"]["beta"]
        torch.testing.assert_close(c, beta * (pc - rc), **tight)
        torch.testing.assert_close(r, beta * (pr - rr), **tight)


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_module_label_smoothing_matches_reference(name):
    """``label_smoothing=0.2``: ``−(1−ls)·log σ(x) − ls·log σ(−x)`` in every loss (float64)."""
    batch = make_batch(SHAPES["B3-T7-H10-V37"], torch.float64, seed=4)
    if name == "epsilon_dpo":
        reference_steps(batch, HPARAMS[name]["epsilon"])
    out, gh, gw = run_module(make_module(name, label_smoothing=0.2).double(), batch)
    loss, rgh, rgw = run_reference(name, batch, label_smoothing=0.2)
    assert_close_to_reference(out.loss, loss, dtype=torch.float64, name="loss")
    assert_close_to_reference(gh, rgh, dtype=torch.float64, name="d hidden")
    assert_close_to_reference(gw, rgw, dtype=torch.float64, name="d weight")


def test_alpha_dpo_policy_equal_to_reference_is_finite():
    """Policy == reference (same hidden and weight): every M = 0, the batch std is 0, and z = 0
    (the authors' code gives 0/0 = NaN). The loss is then SimPO's with margin r: per pair
    ``log(1 + e^{−β(Δθ − r)})`` — checked against the float64 SimPO reference — with finite
    gradients; the running std stays 0."""
    batch = make_batch(SHAPES["B3-T7-H10-V37"], torch.float32, seed=1)
    same = {"ref_hidden": batch.hidden.detach().clone(), "ref_weight": batch.weight.detach().clone()}
    module = make_module("alpha_dpo")
    out, gh, gw = run_module(module, batch, **same)
    assert all_finite(out, gh, gw)
    assert float(module.running_std) == 0.0
    hp = HPARAMS["alpha_dpo"]
    x = batch.float64()
    loss = reference.preference_loss(
        "simpo",
        x["hidden"],
        x["weight"],
        x["labels"],
        beta=hp["beta"],
        gamma_beta_ratio=hp["gamma_beta_ratio"],
    )
    gh64, gw64 = torch.autograd.grad(loss * 0.7, [x["hidden"], x["weight"]])
    assert_close_to_reference(out.loss, loss, dtype=torch.float32, name="loss")
    assert_close_to_reference(gh, gh64, dtype=torch.float32, name="d hidden")
    assert_close_to_reference(gw, gw64, dtype=torch.float32, name="d weight")


EMPTY = {
    "one-response": ((1,), ["pair 1 chosen (row 1)"]),
    "both-responses-of-a-pair": ((0, 3), ["pair 0 chosen (row 0)", "pair 0 rejected (row 3)"]),
    "every-response": (tuple(range(6)), ["6 of 6 responses have", "pair 2 rejected (row 5)"]),
}


def state(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def same_state(module, before: dict) -> bool:
    after = module.state_dict()
    return set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("empty", list(EMPTY), ids=list(EMPTY))
@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_empty_response_is_refused(name, empty, training):
    """A response with no counted token would get log-prob 0, the best possible (SimPO: reward 0,
    accuracy 1): every loss refuses the batch, naming the pair, which response and its row, before
    any log-prob is computed; a batch whose labels are all ``ignore_index`` is refused the same way.
    The loss's state (α-DPO's statistics, ε-DPO's step accumulators) is unchanged."""
    rows, names = EMPTY[empty]
    batch = make_batch(SHAPES["B3-T7-H10-V37"], torch.float32, seed=3, empty_rows=rows)
    module = make_module(name).train(training)
    before = state(module)
    with pytest.raises(ValueError, match="no counted token") as info:
        module(batch.hidden, batch.weight, batch.labels, **batch.ref)
    message = str(info.value)
    assert message.startswith(type(module).__name__) and "`ignore_index` = -100" in message
    for part in names:
        assert part in message, message
    assert same_state(module, before)
    assert batch.hidden.grad is None


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_empty_response_follows_ignore_index(name):
    """Emptiness is judged with the call's ``ignore_index``: rows of -1 with ``ignore_index=-1``
    are empty; the same batch with its -1 rows counted is accepted."""
    batch = make_batch(SHAPES["B3-T7-H10-V37"], torch.float32, seed=3)
    labels = batch.labels.masked_fill(batch.labels == -100, -1)
    labels[4] = -1
    with pytest.raises(ValueError, match=r"`ignore_index` = -1\): pair 1 rejected \(row 4\)"):
        make_module(name)(batch.hidden, batch.weight, labels, ignore_index=-1, **batch.ref)


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_ignore_index_must_be_an_int(name):
    batch = make_batch(SHAPES["B3-T7-H10-V37"], torch.float32)
    with pytest.raises(TypeError, match="`ignore_index` must be an int"):
        make_module(name)(batch.hidden, batch.weight, batch.labels, ignore_index=None, **batch.ref)


# --- precomputed reference log-probs --------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("name", ["alpha_dpo", "dpo"], ids=["alpha_dpo", "dpo"])
def test_precomputed_ref_logps_match_reference_model(name, dtype):
    """``ref_logps`` = per-row reference SUMS ``[2B]`` (α-DPO normalises them by each row's counted
    tokens itself) give the loss and gradients of passing ``ref_hidden``/``ref_weight``."""
    batch = make_batch(SHAPES["B4-T9-H6-V23"], dtype, seed=6)
    ref_logps = prefloss.sequence_logprobs(batch.ref_hidden, batch.ref_weight, batch.labels).policy
    assert ref_logps.shape == (8,)
    out_model, gh_model, gw_model = run_module(make_module(name).to(dtype), batch)
    out_pre, gh_pre, gw_pre = run_module(
        make_module(name).to(dtype), batch, ref_hidden=None, ref_weight=None, ref_logps=ref_logps
    )
    loss, rgh, rgw = run_reference(name, batch)
    for out, gh, gw, how in (
        (out_model, gh_model, gw_model, "ref model"),
        (out_pre, gh_pre, gw_pre, "ref_logps"),
    ):
        assert_close_to_reference(out.loss, loss, dtype=dtype, name=f"loss ({how})")
        assert_close_to_reference(gh, rgh, dtype=dtype, name=f"d hidden ({how})")
        assert_close_to_reference(gw, rgw, dtype=dtype, name=f"d weight ({how})")
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out_pre.loss, out_model.loss, **tol)
    torch.testing.assert_close(gh_pre, gh_model, **tol)


def test_epsilon_dpo_rejects_ref_logps():
    batch = make_batch(SHAPES["B3-T7-H10-V37"], torch.float32)
    with pytest.raises(ValueError, match="ref_logps"):
        make_module("epsilon_dpo")(
            batch.hidden, batch.weight, batch.labels, ref_logps=torch.zeros(6), **batch.ref
        )


# --- α-DPO running statistics ---------------------------------------------------------------------


def test_alpha_dpo_ema_statistics_over_training_calls():
    """From zero (docs/losses.md, α-DPO): μ_k = 0.9·μ_{k−1} + 0.1·mean(M_k), σ_k = 0.9·σ_{k−1} + 0.1·std(M_k)
    (unbiased), updated BEFORE use: call k's loss is `reference.alpha_dpo_losses` with (μ_k, σ_k).
    Micro-batches of 3, 4 and 3 pairs (float64 module and inputs: tight)."""
    module = make_module("alpha_dpo").double()
    hp = HPARAMS["alpha_dpo"]
    mu = sigma = 0.0
    for k, (shape, seed) in enumerate(
        [("B3-T7-H10-V37", 20), ("B4-T9-H6-V23", 21), ("B3-T7-H10-V37", 22)], 1
    ):
        batch = make_batch(SHAPES[shape], torch.float64, seed=seed)
        gap = reference_gaps(batch)
        mu = 0.9 * mu + 0.1 * float(gap.mean())
        sigma = 0.9 * sigma + 0.1 * float(gap.std(unbiased=True))
        out = module(batch.hidden, batch.weight, batch.labels, **batch.ref)
        assert int(module.num_updates) == k
        assert math.isclose(float(module.running_mean), mu, rel_tol=1e-12, abs_tol=1e-14)
        assert math.isclose(float(module.running_std), sigma, rel_tol=1e-12, abs_tol=1e-14)
        pol, ref, _, _ = reference_sequences(batch, normalise=True)
        expected = reference.alpha_dpo_losses(*pairs(pol), *pairs(ref), mean=mu, std=sigma, **hp).mean()
        assert_close_to_reference(out.loss, expected, dtype=torch.float64, name=f"loss at call {k}")


def test_alpha_dpo_ema_statistics_fp32_buffers():
    """The default fp32 buffers follow the same recurrence to fp32 accuracy (fp32 inputs)."""
    module = make_module("alpha_dpo")
    mu = sigma = 0.0
    for seed in (30, 31):
        batch = make_batch(SHAPES["B4-T9-H6-V23"], torch.float32, seed=seed)
        gap = reference_gaps(batch)
        mu = 0.9 * mu + 0.1 * float(gap.mean())
        sigma = 0.9 * sigma + 0.1 * float(gap.std())
        module(batch.hidden, batch.weight, batch.labels, **batch.ref)
    assert module.running_mean.dtype == torch.float32
    assert math.isclose(float(module.running_mean), mu, rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(float(module.running_std), sigma, rel_tol=1e-5, abs_tol=1e-6)


def test_alpha_dpo_eval_mode_does_not_update():
    """In eval mode the statistics are used as they are (no update, no count) and the loss is
    `reference.alpha_dpo_losses` with the stored (μ, σ)."""
    module = make_module("alpha_dpo").double()
    for seed in (40, 41):
        batch = make_batch(SHAPES["B3-T7-H10-V37"], torch.float64, seed=seed)
        module(batch.hidden, batch.weight, batch.labels, **batch.ref)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.eval()
    batch = make_batch(SHAPES["B4-T9-H6-V23"], torch.float64, seed=42)
    out = module(batch.hidden, batch.weight, batch.labels, **batch.ref)
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    pol, ref, _, _ = reference_sequences(batch, normalise=True)
    expected = reference.alpha_dpo_losses(
        *pairs(pol),
        *pairs(ref),
        mean=float(before["running_mean"]),
        std=float(before["running_std"]),
        **HPARAMS["alpha_dpo"],
    ).mean()
    assert_close_to_reference(out.loss, expected, dtype=torch.float64, name="eval loss")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_alpha_dpo_batch_normalization(training):
    """``normalization="batch"``: z = (M − mean(M)) / std(M) (unbiased) of this batch only, in
    train and eval; the running buffers are not touched."""
    module = make_module("alpha_dpo", normalization="batch").double().train(training)
    batch = make_batch(SHAPES["B4-T9-H6-V23"], torch.float64, seed=7)
    out = module(batch.hidden, batch.weight, batch.labels, **batch.ref)
    gap = reference_gaps(batch)
    pol, ref, _, _ = reference_sequences(batch, normalise=True)
    expected = reference.alpha_dpo_losses(
        *pairs(pol), *pairs(ref), mean=float(gap.mean()), std=float(gap.std()), **HPARAMS["alpha_dpo"]
    ).mean()
    assert_close_to_reference(out.loss, expected, dtype=torch.float64, name="loss")
    assert float(module.running_mean) == 0.0 and float(module.running_std) == 0.0
    assert int(module.num_updates) == 0


def first_counted(labels: torch.Tensor, row: int) -> int:
    return int((labels[row] != -100).nonzero()[0, 0])


NON_FINITE = {
    # where: (tensor to spoil, row, value, the culprit the message names)
    "nan-ref-hidden": ("ref_hidden", 1, float("nan"), "pair 1: reference chosen"),
    "inf-ref-hidden": ("ref_hidden", 4, float("inf"), "pair 1: reference rejected"),
    "nan-hidden": ("hidden", 0, float("nan"), "pair 0: policy chosen"),
    "nan-ref-logps": ("ref_logps", 5, float("nan"), "pair 2: reference rejected"),
}
STATISTICS_MODES = {
    "ema-train": ("ema", True),
    "batch-train": ("batch", True),
    "batch-eval": ("batch", False),
}


@pytest.mark.parametrize("mode", list(STATISTICS_MODES), ids=list(STATISTICS_MODES))
@pytest.mark.parametrize("where", list(NON_FINITE), ids=list(NON_FINITE))
def test_alpha_dpo_non_finite_margin_is_refused(where, mode):
    """One NaN/inf in the inputs makes that pair's M non-finite, and with it the batch's μ and σ:
    the EMA would be NaN for good and every later loss SimPO's. Wherever the statistics are taken
    the call raises, naming the pair and the log-prob, and the buffers are unchanged: the next clean
    batch's loss and gradients are the float64 reference's first step."""
    tensor, row, value, culprit = NON_FINITE[where]
    normalization, training = STATISTICS_MODES[mode]
    module = make_module("alpha_dpo", normalization=normalization).train(training)
    before = state(module)
    batch = make_batch(SHAPES["B3-T7-H10-V37"], torch.float32, seed=5)
    hidden, kwargs = batch.hidden, dict(batch.ref)
    if tensor == "ref_logps":
        ref_logps = prefloss.sequence_logprobs(batch.ref_hidden, batch.ref_weight, batch.labels).policy
        kwargs = {"ref_logps": ref_logps.index_fill(0, torch.tensor([row]), value)}
    elif tensor == "ref_hidden":
        kwargs["ref_hidden"] = batch.ref_hidden.clone()
        kwargs["ref_hidden"][row, first_counted(batch.labels, row), 0] = value
    else:
        hidden = batch.hidden.detach().clone()
        hidden[row, first_counted(batch.labels, row), 0] = value
        hidden.requires_grad_()
    with pytest.raises(ValueError, match="margin statistics are non-finite") as info:
        module(hidden, batch.weight, batch.labels, **kwargs)
    assert culprit in str(info.value) and "1 of 3 gathered pairs" in str(info.value), str(info.value)
    assert same_state(module, before)
    clean = make_batch(SHAPES["B3-T7-H10-V37"], torch.float32, seed=11)
    out, gh, gw = run_module(module, clean)
    # momentum 0: the reference's first-step statistics are the batch's own
    loss, rgh, rgw = run_reference("alpha_dpo", clean, momentum=0.0 if normalization == "batch" else 0.9)
    assert_close_to_reference(out.loss, loss, dtype=torch.float32, name="loss after the refusal")
    assert_close_to_reference(gh, rgh, dtype=torch.float32, name="d hidden")
    assert_close_to_reference(gw, rgw, dtype=torch.float32, name="d weight")
    assert int(module.num_updates) == (1 if mode == "ema-train" else 0)


def test_alpha_dpo_eval_ema_non_finite_input_gives_nan_loss():
    """In eval mode with ``"ema"`` no statistics are taken: a NaN input gives a NaN loss (loud) and
    a NaN reward for its pair only (the others' rewards are the float64 reference's); the state is
    unchanged."""
    module = make_module("alpha_dpo").double()
    first = make_batch(SHAPES["B3-T7-H10-V37"], torch.float64, seed=40)
    module(first.hidden, first.weight, first.labels, **first.ref)
    before = state(module)
    module.eval()
    batch = make_batch(SHAPES["B3-T7-H10-V37"], torch.float64, seed=41)
    spoiled = batch.ref_hidden.clone()
    spoiled[2, first_counted(batch.labels, 2), 0] = float("nan")
    out = module(batch.hidden, batch.weight, batch.labels, ref_hidden=spoiled, ref_weight=batch.ref_weight)
    assert torch.isnan(out.loss)
    assert same_state(module, before)
    pol, ref, _, _ = reference_sequences(batch, normalise=True)
    hp = HPARAMS["alpha_dpo"]
    want = hp["beta"] * ((1 - hp["alpha"]) * pairs(pol)[0] + hp["alpha"] * pairs(ref)[0])
    assert torch.isnan(out.chosen_rewards[2])
    torch.testing.assert_close(out.chosen_rewards[:2], want[:2], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["dpo", "simpo"], ids=["dpo", "simpo"])
def test_stateless_loss_with_non_finite_hidden_is_nan(name):
    """DPO and SimPO have no state to protect: a NaN in a counted row of ``hidden`` gives a NaN loss
    and a NaN reward for that pair only (no host sync is spent on checking); the other pairs'
    rewards are the float64 reference's."""
    batch = make_batch(SHAPES["B3-T7-H10-V37"], torch.float64, seed=8)
    hidden = batch.hidden.detach().clone()
    hidden[4, first_counted(batch.labels, 4), 0] = float("nan")  # pair 1, rejected
    out = make_module(name).double()(hidden, batch.weight, batch.labels, **batch.ref_of(name))
    assert torch.isnan(out.loss)
    pol, ref, _, _ = reference_sequences(batch, normalise=name == "simpo")
    beta = HPARAMS[name]["beta"]
    want = beta * (pairs(pol)[1] - (pairs(ref)[1] if name == "dpo" else 0))
    got = out.rejected_rewards
    assert torch.isnan(got[1])
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]], rtol=1e-10, atol=1e-12)


EPSILON_NON_FINITE = {"nan-hidden": "hidden", "nan-ref-hidden": "ref_hidden"}


@pytest.mark.parametrize("tensor", list(EPSILON_NON_FINITE.values()), ids=list(EPSILON_NON_FINITE))
def test_epsilon_dpo_non_finite_pair_is_not_counted(tensor):
    """A NaN in one pair's hidden states gives a NaN loss (loud), and that pair is left out of β's
    step mean (its s would be 0 only because NaN compares false): the accumulators hold the other
    pairs' float64 reference steps, and `update_beta` uses their mean."""
    hp = HPARAMS["epsilon_dpo"]
    batch = make_batch(SHAPES["B4-T9-H6-V23"], torch.float64, seed=11)
    steps = reference_steps(batch, hp["epsilon"])
    module = make_module("epsilon_dpo").double()
    spoiled = getattr(batch, tensor).detach().clone()
    spoiled[5, first_counted(batch.labels, 5), 0] = float("nan")  # pair 1, rejected
    kwargs = dict(batch.ref)
    hidden = batch.hidden
    if tensor == "hidden":
        hidden = spoiled.requires_grad_()
    else:
        kwargs["ref_hidden"] = spoiled
    out = module(hidden, batch.weight, batch.labels, **kwargs)
    assert torch.isnan(out.loss)
    kept = torch.tensor([0, 2, 3])
    assert float(module.step_count) == 3.0
    assert float(module.step_sum) == float(steps[kept].sum())
    module.update_beta()
    want = hp["beta"] / (1 + hp["epsilon"] * float(steps[kept].double().mean()))
    assert math.isclose(float(module.beta), want, rel_tol=1e-6)


# --- ε-DPO β --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_epsilon_dpo_update_beta_over_micro_batches(dtype):
    """docs/losses.md (ε-DPO): β ← β / (1 + ε·mean(s)), the mean over every pair seen in training
    since the last call (micro-batches of 3, 1 and 4 pairs: an exact pooled mean, not a mean of
    means). Losses before the update use the old β; eval-mode calls accumulate nothing, so an
    update after them leaves β unchanged; the step-fraction metrics are per micro-batch."""
    eps = HPARAMS["epsilon_dpo"]["epsilon"]
    beta = HPARAMS["epsilon_dpo"]["beta"]
    module = make_module("epsilon_dpo").to(dtype)
    beta = float(module.beta)  # the stored value (fp32-rounded for fp32 buffers)
    rtol = 1e-6 if dtype == torch.float32 else 1e-14

    def cycle(specs):
        steps = []
        for shape, seed in specs:
            batch = make_batch(SHAPES[shape], dtype, seed=seed)
            s = reference_steps(batch, eps)
            out = module(batch.hidden, batch.weight, batch.labels, **batch.ref)
            assert float(out.metrics["kl/beta"]) == float(module.beta)
            fractions = {"kl/p_epsilon_steps": (s > 0), "kl/n_epsilon_steps": (s < 0)}
            for key, hit in fractions.items():  # fp32 metrics
                assert math.isclose(float(out.metrics[key]), float(hit.double().mean()), rel_tol=1e-6), key
            steps.append(s)
        return torch.cat(steps)

    s = cycle([("B3-T7-H10-V37", 50), ("B1-T5-H3-V5", 51), ("B4-T9-H6-V23", 52)])
    assert s.ne(0).any()
    mean_s = float(s.mean())
    logged = module.update_beta()
    expected = beta / (1 + eps * mean_s)
    assert float(logged["kl/beta"]) == beta
    assert math.isclose(float(logged["kl/avg_steps"]), mean_s, rel_tol=1e-6)
    assert math.isclose(float(module.beta), expected, rel_tol=rtol)

    s2 = cycle([("B4-T9-H6-V23", 53), ("B3-T7-H10-V37", 54)])
    beta2 = float(module.beta)
    module.update_beta()
    assert math.isclose(float(module.beta), beta2 / (1 + eps * float(s2.mean())), rel_tol=rtol)

    module.eval()
    beta3 = module.beta.clone()
    batch = make_batch(SHAPES["B4-T9-H6-V23"], dtype, seed=55)
    assert reference_steps(batch, eps).ne(0).any()
    module(batch.hidden, batch.weight, batch.labels, **batch.ref)
    logged = module.update_beta()
    assert float(logged["kl/avg_steps"]) == 0.0
    assert torch.equal(module.beta, beta3)


def test_epsilon_dpo_loss_uses_current_beta():
    """After an update, the next loss is `reference.epsilon_dpo_losses` at the new β (float64)."""
    eps = HPARAMS["epsilon_dpo"]["epsilon"]
    module = make_module("epsilon_dpo").double()
    for seed in (60, 61):
        batch = make_batch(SHAPES["B3-T7-H10-V37"], torch.float64, seed=seed)
        reference_steps(batch, eps)
        module(batch.hidden, batch.weight, batch.labels, **batch.ref)
    module.update_beta()
    beta = float(module.beta)
    assert beta != HPARAMS["epsilon_dpo"]["beta"]
    batch = make_batch(SHAPES["B4-T9-H6-V23"], torch.float64, seed=62)
    steps = reference_steps(batch, eps)
    pol, ref, _, _ = reference_sequences(batch, epsilon=eps)
    expected = reference.epsilon_dpo_losses(*pairs(pol), *pairs(ref), steps, beta=beta, epsilon=eps).mean()
    out = module(batch.hidden, batch.weight, batch.labels, **batch.ref)
    assert_close_to_reference(out.loss, expected, dtype=torch.float64, name="loss")


# --- checkpoints ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alpha_dpo", "epsilon_dpo"], ids=["alpha_dpo", "epsilon_dpo"])
def test_state_dict_round_trip(name, tmp_path):
    """save → new module → load restores α-DPO's statistics, ε-DPO's β (the new module was built
    with another β) and step accumulators exactly; the next training loss and state are identical."""
    module = make_module(name)
    for seed in (70, 71):
        batch = make_batch(SHAPES["B3-T7-H10-V37"], torch.float32, seed=seed)
        module(batch.hidden, batch.weight, batch.labels, **batch.ref)
    if name == "epsilon_dpo":
        module.update_beta()
        batch = make_batch(SHAPES["B4-T9-H6-V23"], torch.float32, seed=72)
        module(batch.hidden, batch.weight, batch.labels, **batch.ref)  # pending steps are saved too
    path = tmp_path / "loss.pt"
    torch.save(module.state_dict(), path)
    # ε-DPO's β is state (a buffer): a module built with another β must get the saved one
    fresh = make_module(name, **({"beta": 1.0} if name == "epsilon_dpo" else {}))
    fresh.load_state_dict(torch.load(path))
    saved = module.state_dict()
    assert set(saved) == set(fresh.state_dict())
    assert all(torch.equal(saved[k], fresh.state_dict()[k]) for k in saved)
    if name == "alpha_dpo":
        assert int(fresh.num_updates) == 2 and float(fresh.running_std) != 0.0
    else:
        assert float(fresh.beta) != HPARAMS[name]["beta"] and float(fresh.step_count) == 4
    batch = make_batch(SHAPES["B4-T9-H6-V23"], torch.float32, seed=73)
    a = module(batch.hidden, batch.weight, batch.labels, **batch.ref)
    b = fresh(batch.hidden, batch.weight, batch.labels, **batch.ref)
    assert torch.equal(a.loss, b.loss)
    if name == "epsilon_dpo":
        module.update_beta()
        fresh.update_beta()
    assert all(torch.equal(module.state_dict()[k], fresh.state_dict()[k]) for k in saved)


# --- bad input ------------------------------------------------------------------------------------

CLASSES = {name: prefloss.losses.LOSSES[name] for name in NAMES}


@pytest.mark.parametrize(
    "beta", [0.0, -0.1, float("nan"), float("inf")], ids=["zero", "negative", "nan", "inf"]
)
@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_bad_beta(name, beta):
    with pytest.raises(ValueError, match="`beta`"):
        CLASSES[name](beta=beta)


@pytest.mark.parametrize("epsilon", [0.0, 1.0, -0.01, 1.5], ids=["zero", "one", "negative", "above-one"])
def test_bad_epsilon(epsilon):
    with pytest.raises(ValueError, match="`epsilon`"):
        prefloss.EpsilonDPOLoss(epsilon=epsilon)


NAN, INF = float("nan"), float("inf")
BAD_ARGUMENTS = {
    # id: (loss, keyword arguments, exception, message)
    "alpha-nan": ("alpha_dpo", dict(alpha=NAN), ValueError, "`alpha` must be a finite number >= 0, got nan"),
    "alpha-inf": ("alpha_dpo", dict(alpha=INF), ValueError, "`alpha` must be a finite number >= 0, got inf"),
    "alpha-negative": ("alpha_dpo", dict(alpha=-0.1), ValueError, "`alpha` must be a finite number >= 0"),
    "alpha-str": ("alpha_dpo", dict(alpha="0.2"), TypeError, "`alpha` must be a real number, got str"),
    "alpha-gamma-nan": ("alpha_dpo", dict(gamma_beta_ratio=NAN), ValueError, "`gamma_beta_ratio` must be a"),
    "simpo-gamma-inf": ("simpo", dict(gamma_beta_ratio=INF), ValueError, "`gamma_beta_ratio` must be a"),
    "simpo-gamma-none": ("simpo", dict(gamma_beta_ratio=None), TypeError, "`gamma_beta_ratio` must be a"),
    "momentum-nan": ("alpha_dpo", dict(momentum=NAN), ValueError, "`momentum` must be in [0, 1), got nan"),
    "momentum-one": ("alpha_dpo", dict(momentum=1.0), ValueError, "`momentum` must be in [0, 1), got 1.0"),
    "normalization": ("alpha_dpo", dict(normalization="none"), ValueError, "`normalization` must be one of"),
    "label-smoothing-nan": ("dpo", dict(label_smoothing=NAN), ValueError, "`label_smoothing` must be in"),
    "epsilon-nan": ("epsilon_dpo", dict(epsilon=NAN), ValueError, "`epsilon` must be in (0, 1), got nan"),
    "epsilon-inf": ("epsilon_dpo", dict(epsilon=INF), ValueError, "`epsilon` must be in (0, 1), got inf"),
    "beta-str": ("dpo", dict(beta="0.1"), TypeError, "`beta` must be a real number, got str"),
    "beta-bool": ("simpo", dict(beta=True), TypeError, "`beta` must be a real number, got bool"),
    "chunk-size-zero": ("simpo", dict(chunk_size=0), ValueError, "`chunk_size` must be a positive int"),
    "chunk-size-float": ("epsilon_dpo", dict(chunk_size=64.0), ValueError, "`chunk_size` must be a positive"),
    "backend": ("alpha_dpo", dict(backend="cuda"), ValueError, "`backend` must be one of"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS), ids=list(BAD_ARGUMENTS))
def test_bad_constructor_argument(case):
    """Every numeric constructor argument must be a finite real number in its range (NaN and inf
    included), and the op options are checked when the loss is built; the error names the argument."""
    name, kwargs, exc, message = BAD_ARGUMENTS[case]
    with pytest.raises(exc) as info:
        CLASSES[name](**kwargs)
    assert message in str(info.value), str(info.value)


def test_zero_dim_tensor_hyperparameters_are_read_as_floats():
    tensors = {k: torch.tensor(v) for k, v in dict(beta=2.0, alpha=0.5, momentum=0.5).items()}
    module = prefloss.AlphaDPOLoss(**tensors)
    assert (module.beta, module.alpha, module.momentum) == (2.0, 0.5, 0.5)
    assert all(type(v) is float for v in (module.beta, module.alpha, module.momentum))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_losses_trace_on_meta_inputs(name, training):
    """Shape tracing: every loss runs forward and backward on ``meta`` inputs while the module (its
    buffers) stays on CPU; the state is not updated by a trace (it has no values)."""
    module = make_module(name).train(training)
    before = state(module)
    meta = {"device": "meta", "dtype": torch.float32}
    hidden = torch.empty(4, 6, 8, **meta, requires_grad=True)
    weight = torch.empty(11, 8, **meta, requires_grad=True)
    labels = torch.empty(4, 6, dtype=torch.long, device="meta")
    ref = {"ref_hidden": torch.empty(4, 6, 8, **meta), "ref_weight": torch.empty(11, 8, **meta)}
    out = module(hidden, weight, labels, **({} if name in REFERENCE_FREE else ref))
    assert out.loss.device.type == "meta" and out.loss.shape == ()
    out.loss.backward()
    assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape
    assert same_state(module, before)


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_odd_number_of_rows(name):
    batch = make_batch(SHAPES["B3-T7-H10-V37"], torch.float32)
    with pytest.raises(ValueError, match="`hidden`"):
        make_module(name)(
            batch.hidden[:5],
            batch.weight,
            batch.labels[:5],
            ref_hidden=batch.ref_hidden[:5],
            ref_weight=batch.ref_weight,
        )


REFERENCE_ARGUMENTS = ("ref_hidden", "ref_weight", "ref_bias", "ref_logps")


@pytest.mark.parametrize("argument", REFERENCE_ARGUMENTS, ids=REFERENCE_ARGUMENTS)
def test_simpo_refuses_reference_arguments(argument):
    """SimPO uses no reference model: a reference argument is refused (not silently ignored), the
    error naming the argument, what was expected and what came, before any log-prob is computed."""
    batch = make_batch(SHAPES["B3-T7-H10-V37"], torch.float32)
    given = {
        "ref_hidden": batch.ref_hidden,
        "ref_weight": batch.ref_weight,
        "ref_bias": torch.zeros(batch.ref_weight.shape[0]),
        "ref_logps": torch.zeros(6),
    }[argument]
    with pytest.raises(ValueError) as info:
        make_module("simpo")(batch.hidden, batch.weight, batch.labels, **{argument: given})
    message = str(info.value)
    assert message.startswith("SimPOLoss: SimPO is reference-free"), message
    assert f"expected `{argument}` = None, got a tensor of shape {tuple(given.shape)}" in message, message
    assert batch.hidden.grad is None


# The published configs (docs/losses.md), stated here independently of the classes.
PUBLISHED_DEFAULTS = {
    "alpha_dpo": dict(beta=2.5, gamma_beta_ratio=0.6, alpha=0.2),
    "epsilon_dpo": dict(beta=0.01, epsilon=0.01),
    "dpo": dict(beta=0.1),
    "simpo": dict(beta=2.0, gamma_beta_ratio=0.25),
}


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_registry_reads_the_class_attributes(name):
    """`prefloss.losses.LOSSES` is keyed by each class's ``name``; its ``defaults`` are the published
    configs and what a module built without arguments uses; ``needs_reference``, ``takes_ref_logps``
    and ``length_normalised`` agree with what the losses do (the oracle states the normalisation on
    its own)."""
    cls = prefloss.losses.LOSSES[name]
    assert cls.name == name and sorted(prefloss.losses.LOSSES) == sorted(NAMES)
    assert dict(cls.defaults) == PUBLISHED_DEFAULTS[name]
    module = cls()  # ε-DPO's β is an fp32 buffer
    assert {k: float(getattr(module, k)) for k in cls.defaults} == pytest.approx(PUBLISHED_DEFAULTS[name])
    assert cls.needs_reference == (name not in REFERENCE_FREE)
    assert cls.takes_ref_logps == (name in ("alpha_dpo", "dpo"))
    assert cls.length_normalised == reference.NORMALISED[name]


REF_NEEDED = ["alpha_dpo", "epsilon_dpo", "dpo"]
HALF_REFERENCE = {"hidden-only": ("ref_hidden", "ref_weight"), "weight-only": ("ref_weight", "ref_hidden")}


@pytest.mark.parametrize("given", list(HALF_REFERENCE.values()), ids=list(HALF_REFERENCE))
@pytest.mark.parametrize("name", REF_NEEDED, ids=REF_NEEDED)
def test_reference_given_by_half(name, given):
    """Only one of ``ref_hidden``/``ref_weight``: the error names the missing one."""
    present, missing = given
    batch = make_batch(SHAPES["B3-T7-H10-V37"], torch.float32)
    with pytest.raises(ValueError, match=f"`{missing}`"):
        make_module(name)(batch.hidden, batch.weight, batch.labels, **{present: batch.ref[present]})


@pytest.mark.parametrize("name", REF_NEEDED, ids=REF_NEEDED)
def test_missing_reference(name):
    batch = make_batch(SHAPES["B3-T7-H10-V37"], torch.float32)
    with pytest.raises(ValueError, match="`ref_hidden`"):
        make_module(name)(batch.hidden, batch.weight, batch.labels)


@pytest.mark.parametrize("name", ["alpha_dpo", "dpo"], ids=["alpha_dpo", "dpo"])
def test_bad_ref_logps_shape(name):
    batch = make_batch(SHAPES["B3-T7-H10-V37"], torch.float32)
    with pytest.raises(ValueError, match="`ref_logps`"):
        make_module(name)(batch.hidden, batch.weight, batch.labels, ref_logps=torch.zeros(5))
