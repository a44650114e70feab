"""The loss modules on packed (padding-free) batches: ``loss_fn(..., cu_seqlens=...)``.

A padded ``[2B, T]`` pair batch (rows ``[0, B)`` chosen, ``[B, 2B)`` rejected, right padding, each
row's last label ignored) is packed here with a Python loop over the rows, in row order, into one
``[1, L]`` row with ``cu_seqlens [2B+1]``. Ground truth is `prefloss.reference` in float64 on the
PADDED layout, judged with `prefloss.testing.assert_close_to_reference` as
tests/test_losses_modules.py does; both the packed and the padded call are held to it, on both
backends (Triton under its interpreter on CPU). Loss state (α-DPO's running statistics, ε-DPO's β)
after packed calls is checked against float64 recurrences and against the padded calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import prefloss
from prefloss import reference
from prefloss.testing import assert_close_to_reference

HPARAMS = {
    "alpha_dpo": dict(beta=2.0, gamma_beta_ratio=0.4, alpha=0.5),
    "epsilon_dpo": dict(beta=0.5, epsilon=0.1),
    "dpo": dict(beta=0.5),
    "simpo": dict(beta=2.0, gamma_beta_ratio=0.3),
}
NAMES = list(HPARAMS)
REFERENCE_FREE = {"simpo"}
BACKENDS = ["torch", "triton"]
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
H, V, T = 6, 29, 9


def make_module(name: str, **overrides) -> torch.nn.Module:
    kwargs = {**HPARAMS[name], **overrides}
    if name == "epsilon_dpo":
        kwargs.setdefault("compare_dtype", None)  # exact comparison, as the float64 reference
    return prefloss.losses.LOSSES[name](**kwargs)


@dataclass
class Batch:
    """One pair batch in both layouts; the padded tensors are the float64-ready originals."""

    hidden: torch.Tensor  # [2B, T, H]
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor  # [V]
    labels: torch.Tensor  # [2B, T]
    ref_hidden: torch.Tensor
    ref_weight: torch.Tensor
    lengths: list[int]  # tokens of each sequence (row)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[2B, T, ...]`` → ``[1, L, ...]``: each row's first ``lengths[r]`` positions, in row order."""
        return torch.cat([x[r, :n] for r, n in enumerate(self.lengths)]).unsqueeze(0)

    @property
    def cu_seqlens(self) -> torch.Tensor:
        cu = [0]
        for n in self.lengths:
            cu.append(cu[-1] + n)
        return torch.tensor(cu)


def make_batch(pairs: int, dtype: torch.dtype, seed: int = 0) -> Batch:
    """Random policy, reference = policy + noise. Each pair shares a prompt of 1..3 ignored labels;
    sequence lengths differ (prompt + 2..5 tokens); the last label of every sequence is ignored, and
    the rejected response of pair 0 counts exactly one token."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    hidden = torch.randn(rows, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 2
    bias = 0.3 * torch.randn(V, generator=g, dtype=torch.float64)
    ref_hidden = hidden + 0.3 * torch.randn(hidden.shape, generator=g, dtype=torch.float64)
    ref_weight = weight + 0.2 * torch.randn(weight.shape, generator=g, dtype=torch.float64) / H**0.5
    labels = torch.randint(0, V, (rows, T), generator=g)
    prompt = torch.randint(1, 4, (pairs,), generator=g).repeat(2)
    length = prompt + torch.randint(2, 6, (rows,), generator=g)
    length[pairs] = prompt[pairs] + 2  # one counted token: the prompt, the response token, its end
    t = torch.arange(T)
    labels[(t[None] < prompt[:, None]) | (t[None] >= length[:, None] - 1)] = -100
    return Batch(
        hidden.to(dtype),
        weight.to(dtype),
        bias.to(dtype),
        labels,
        ref_hidden.to(dtype),
        ref_weight.to(dtype),
        length.tolist(),
    )


def run(module, batch: Batch, *, packed: bool, upstream: float = 0.7, bias: bool = True, **kwargs):
    """Forward + backward of ``upstream·loss``; returns (output, ∂hidden at the packed positions
    ``[L, H]``, ∂weight, ∂bias)."""
    hidden = (batch.pack(batch.hidden) if packed else batch.hidden).detach().clone().requires_grad_()
    weight = batch.weight.detach().clone().requires_grad_()
    b = batch.bias.detach().clone().requires_grad_() if bias else None
    kw = {}
    if module.name not in REFERENCE_FREE:
        ref_hidden = batch.pack(batch.ref_hidden) if packed else batch.ref_hidden
        kw = dict(ref_hidden=ref_hidden, ref_weight=batch.ref_weight)
    if packed:
        kw["cu_seqlens"] = batch.cu_seqlens
    kw.update(kwargs)
    labels = batch.pack(batch.labels) if packed else batch.labels
    out = module(hidden, weight, labels, bias=b, **kw)
    (out.loss * upstream).backward()
    gh = hidden.grad[0] if packed else batch.pack(hidden.grad)[0]
    return out, gh, weight.grad, None if b is None else b.grad


def run_reference(name: str, batch: Batch, upstream: float = 0.7, *, bias: bool = True, **hp):
    """The float64 loss and its gradients on the padded layout (∂hidden at the packed positions)."""
    h = batch.hidden.detach().double().requires_grad_()
    w = batch.weight.detach().double().requires_grad_()
    b = batch.bias.detach().double().requires_grad_() if bias else None
    loss = reference.preference_loss(
        name,
        h,
        w,
        batch.labels,
        bias=b,
        ref_hidden=batch.ref_hidden.double(),
        ref_weight=batch.ref_weight.double(),
        **{**HPARAMS[name], **hp},
    )
    grads = torch.autograd.grad(loss * upstream, [x for x in (h, w, b) if x is not None])
    return (loss.detach(), batch.pack(grads[0])[0], *grads[1:], *((None,) if b is None else ()))


def reference_sequences(batch: Batch, *, epsilon=None, normalise=False):
    """Float64 per-row (policy, ref, minus, plus) sums, or means over counted tokens."""
    tok = reference.token_logprobs(
        batch.hidden.double(),
        batch.weight.double(),
        batch.labels,
        bias=batch.bias.double(),
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
    """ε-DPO's float64 steps; asserts no pair is within 1e-4 of a tie (so fp32 reaches the same)."""
    pol, _, minus, plus = reference_sequences(batch, epsilon=epsilon)
    ell, ell_m, ell_p = ((c - r) for c, r in map(pairs, (pol, minus, plus)))
    gaps = torch.cat([(ell_m - ell).abs(), (ell - ell_p).abs()])
    assert float(gaps.min()) > 1e-4, "test data too close to an ε-DPO tie; pick another seed"
    return reference.epsilon_steps(*pairs(pol), *pairs(minus), *pairs(plus))


# --- loss and gradients against the float64 reference ---------------------------------------------


# The Triton kernels accumulate in fp32 whatever the input dtype: float64 runs the torch backend only.
LAYOUT_CASES = {"torch-fp32": ("torch", torch.float32), "torch-fp64": ("torch", torch.float64)}
LAYOUT_CASES["triton-fp32"] = ("triton", torch.float32)


@pytest.mark.parametrize("case", list(LAYOUT_CASES), ids=list(LAYOUT_CASES))
@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_packed_equals_padded_against_float64(name, case):
    """Loss, ∂hidden, ∂weight and ∂bias of the packed call and of the padded call, each against the
    float64 padded reference (first training step); the metrics and rewards of both agree."""
    backend, dtype = LAYOUT_CASES[case]
    batch = make_batch(3, dtype, seed=11)
    if name == "epsilon_dpo":
        reference_steps(batch, HPARAMS[name]["epsilon"])
    expected = run_reference(name, batch)
    results = {}
    for packed in (False, True):
        module = make_module(name, backend=backend, chunk_size=4).to(dtype)
        out, *grads = run(module, batch, packed=packed)
        layout = "packed" if packed else "padded"
        assert_close_to_reference(out.loss, expected[0], dtype=dtype, name=f"{name} {layout} loss")
        for what, got, want in zip(("d hidden", "d weight", "d bias"), grads, expected[1:], strict=True):
            assert_close_to_reference(got, want, dtype=dtype, name=f"{name} {layout} {what}")
        results[layout] = out
    padded, packed = results["padded"], results["packed"]
    assert set(packed.metrics) == set(padded.metrics)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for key in padded.metrics:
        torch.testing.assert_close(packed.metrics[key], padded.metrics[key], **tol, msg=key)
    torch.testing.assert_close(packed.chosen_rewards, padded.chosen_rewards, **tol)
    torch.testing.assert_close(packed.rejected_rewards, padded.rejected_rewards, **tol)


@pytest.mark.parametrize("name", ["alpha_dpo", "dpo"], ids=["alpha_dpo", "dpo"])
def test_packed_with_precomputed_ref_logps(name):
    """``ref_logps [2B]`` from a packed reference call (`prefloss.sequence_logprobs` with
    ``cu_seqlens``) give the float64 padded loss and gradients (fp32, no bias)."""
    batch = make_batch(3, torch.float32, seed=6)
    ref_logps = prefloss.sequence_logprobs(
        batch.pack(batch.ref_hidden), batch.ref_weight, batch.pack(batch.labels), cu_seqlens=batch.cu_seqlens
    ).policy
    assert ref_logps.shape == (6,)
    out, gh, gw, _ = run(
        make_module(name),
        batch,
        packed=True,
        bias=False,
        ref_hidden=None,
        ref_weight=None,
        ref_logps=ref_logps,
    )
    loss, rgh, rgw, _ = run_reference(name, batch, bias=False)
    assert_close_to_reference(out.loss, loss, dtype=torch.float32, name="loss")
    assert_close_to_reference(gh, rgh, dtype=torch.float32, name="d hidden")
    assert_close_to_reference(gw, rgw, dtype=torch.float32, name="d weight")


# --- loss state -------------------------------------------------------------------------------------


def test_alpha_dpo_running_statistics_packed_equal_padded():
    """Three training calls (3, 4 and 2 pairs), packed and padded modules side by side (float64):
    μ_k = 0.9·μ_{k−1} + 0.1·mean(M_k), σ_k = 0.9·σ_{k−1} + 0.1·std(M_k) (docs/losses.md) in both, and
    call k's packed loss is `reference.alpha_dpo_losses` with (μ_k, σ_k)."""
    padded_module = make_module("alpha_dpo").double()
    packed_module = make_module("alpha_dpo").double()
    hp = HPARAMS["alpha_dpo"]
    mu = sigma = 0.0
    for k, (n_pairs, seed) in enumerate([(3, 20), (4, 21), (2, 22)], 1):
        batch = make_batch(n_pairs, torch.float64, seed=seed)
        pol, ref, _, _ = reference_sequences(batch, normalise=True)
        (pc, pr), (rc, rr) = pairs(pol), pairs(ref)
        gap = (pc - pr) - (rc - rr)
        mu = 0.9 * mu + 0.1 * float(gap.mean())
        sigma = 0.9 * sigma + 0.1 * float(gap.std(unbiased=True))
        run(padded_module, batch, packed=False)
        out, *_ = run(packed_module, batch, packed=True)
        for module in (padded_module, packed_module):
            assert int(module.num_updates) == k
            assert math.isclose(float(module.running_mean), mu, rel_tol=1e-12, abs_tol=1e-14)
            assert math.isclose(float(module.running_std), sigma, rel_tol=1e-12, abs_tol=1e-14)
        expected = reference.alpha_dpo_losses(pc, pr, rc, rr, mean=mu, std=sigma, **hp).mean()
        assert_close_to_reference(out.loss, expected, dtype=torch.float64, name=f"packed loss at call {k}")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_epsilon_dpo_beta_update_packed_equals_padded(dtype):
    """Two micro-batches (3 and 2 pairs) then `update_beta`: β ← β / (1 + ε·mean(s)) over the 5 pairs,
    the same β and step accumulators packed and padded; the next packed loss uses the new β
    (float64 reference at that β)."""
    eps = HPARAMS["epsilon_dpo"]["epsilon"]
    padded_module = make_module("epsilon_dpo").to(dtype)
    packed_module = make_module("epsilon_dpo").to(dtype)
    beta = float(packed_module.beta)
    steps = []
    for n_pairs, seed in ((3, 50), (2, 51)):
        batch = make_batch(n_pairs, dtype, seed=seed)
        steps.append(reference_steps(batch, eps))
        run(padded_module, batch, packed=False)
        out, *_ = run(packed_module, batch, packed=True)
        assert torch.equal(packed_module.step_sum, padded_module.step_sum)
        assert torch.equal(packed_module.step_count, padded_module.step_count)
    s = torch.cat(steps)
    assert s.ne(0).any()
    padded_module.update_beta()
    packed_module.update_beta()
    assert torch.equal(packed_module.beta, padded_module.beta)
    rtol = 1e-6 if dtype == torch.float32 else 1e-14
    assert math.isclose(float(packed_module.beta), beta / (1 + eps * float(s.mean())), rel_tol=rtol)

    batch = make_batch(3, dtype, seed=52)
    step = reference_steps(batch, eps)
    out, *_ = run(packed_module, batch, packed=True)
    pol, ref, _, _ = reference_sequences(batch)
    expected = reference.epsilon_dpo_losses(
        *pairs(pol), *pairs(ref), step, beta=float(packed_module.beta), epsilon=eps
    ).mean()
    assert_close_to_reference(out.loss, expected, dtype=dtype, name="packed loss at the new β")


# --- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_packed_empty_response_is_refused(name):
    """A packed response with no counted token is refused by name (pair, chosen/rejected, its
    sequence in ``cu_seqlens``) before any log-prob is computed; the loss state is unchanged."""
    batch = make_batch(3, torch.float32, seed=3)
    batch.labels[4] = -100  # pair 1's rejected response
    module = make_module(name)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=r"1 of 6 responses has no counted token") as info:
        run(module, batch, packed=True)
    assert "pair 1 rejected (sequence 4)" in str(info.value) and "`cu_seqlens`" in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_packed_counted_last_label_is_refused(name):
    """A counted label at a sequence's last position (it would be scored with the next sequence's
    first token) is refused through every loss, naming the sequence and the position."""
    batch = make_batch(3, torch.float32, seed=3)
    last = batch.lengths[2] - 1
    batch.labels[2, last] = 5
    position = sum(batch.lengths[:2]) + last
    with pytest.raises(ValueError, match=rf"`labels`\[0, {position}\] = 5 .* sequence 2 in `cu_seqlens`"):
        run(make_module(name), batch, packed=True)


BAD_PACKED = {
    # name: (keyword changes to the packed call, error, message fragment)
    "odd-sequences": ("odd", ValueError, r"even number of sequences .* got 5"),
    "cu-int32": ("int32", TypeError, "`cu_seqlens` must be an int64 tensor"),
    "cu-wrong-total": ("total", ValueError, r"must end at the packed token count"),
    "cu-not-from-0": ("start", ValueError, r"must start at 0"),
    "hidden-padded": ("padded-hidden", ValueError, r"`hidden` must be \[1, L, H\] with `cu_seqlens`"),
    "ref-hidden-padded": ("padded-ref", ValueError, r"`labels` shape must equal `ref_hidden`.shape\[:-1\]"),
    "ref-logps-wrong-count": ("ref_logps", ValueError, r"`ref_logps` must have shape \[2B\] = \[6\]"),
}


@pytest.mark.parametrize("case", list(BAD_PACKED), ids=list(BAD_PACKED))
def test_bad_packed_inputs(case):
    how, error, match = BAD_PACKED[case]
    batch = make_batch(3, torch.float32, seed=3)
    hidden, labels, cu = batch.pack(batch.hidden), batch.pack(batch.labels), batch.cu_seqlens
    kw = dict(ref_hidden=batch.pack(batch.ref_hidden), ref_weight=batch.ref_weight)
    if how == "odd":
        cu = torch.cat([cu[:3], cu[4:]])
    elif how == "int32":
        cu = cu.int()
    elif how == "total":
        cu = torch.cat([cu[:-1], cu[-1:] + 1])
    elif how == "start":
        cu = torch.cat([cu[:1] + 1, cu[1:]])
    elif how == "padded-hidden":
        hidden = batch.hidden
    elif how == "padded-ref":
        kw["ref_hidden"] = batch.ref_hidden
    elif how == "ref_logps":
        kw = dict(ref_logps=torch.zeros(4))
    with pytest.raises(error, match=match):
        make_module("dpo")(hidden, batch.weight, labels, cu_seqlens=cu, **kw)
