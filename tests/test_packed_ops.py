"""`prefloss.sequence_logprobs` on packed (padding-free) batches: ``cu_seqlens``.

The ``S`` sequences of a padded ``[S, T]`` batch are packed here with a Python loop over the rows
(independent of `prefloss.fused.segments.pack_rows`). Ground truth is `prefloss.reference` in
float64 on the PADDED layout; the per-sequence sums are judged with the criterion of
`prefloss.testing` (``ERROR_MARGIN · sequence_error_scale(plain)`` per sequence, plain PyTorch at the
same dtype on the padded layout) and the gradients with plain PyTorch's gradient error as baseline,
for a random upstream gradient on the sums. Both backends (Triton under its interpreter on CPU).
"""

from __future__ import annotations

import pytest
import torch

import prefloss
from prefloss import reference
from prefloss.testing import (
    ERROR_MARGIN,
    assert_close_to_reference,
    plain_logprobs,
    plain_token_logprobs,
    sequence_error_scale,
)

# Several vocabulary tiles on these small V, the last one partial (conftest.py).
pytestmark = pytest.mark.usefixtures("small_vocab_tiles")

BACKENDS = ["torch", "triton"]

# Sequence lengths (tokens) and prompt lengths (ignored labels at the start): the last label of
# every sequence is ignored (the last-label rule), so a sequence of length n with prompt p counts
# n − 1 − p tokens. Sequence 2 counts one token, sequence 4 none (length 1).
LENGTHS = (7, 3, 2, 9, 1, 5)
PROMPTS = (2, 1, 0, 4, 0, 1)
T, H, V = 9, 12, 45


def padded_batch(dtype, seed=0, *, bias=False):
    """``hidden [S, T, H]``, ``weight [V, H]``, ``labels [S, T]`` (right padding, ignored prompt and
    last label), ``bias``, and a reference near the policy."""
    g = torch.Generator().manual_seed(seed)
    s = len(LENGTHS)
    hidden = torch.randn(s, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 2
    labels = torch.randint(0, V, (s, T), generator=g)
    t = torch.arange(T)
    length, prompt = torch.tensor(LENGTHS), torch.tensor(PROMPTS)
    labels[(t[None] < prompt[:, None]) | (t[None] >= length[:, None] - 1)] = -100
    ref_hidden = hidden + 0.3 * torch.randn(hidden.shape, generator=g, dtype=torch.float64)
    ref_weight = weight + 0.2 * torch.randn(weight.shape, generator=g, dtype=torch.float64) / H**0.5
    b = (0.3 * torch.randn(V, generator=g, dtype=torch.float64)).to(dtype) if bias else None
    return (
        hidden.to(dtype),
        weight.to(dtype),
        labels,
        b,
        ref_hidden.to(dtype),
        ref_weight.to(dtype),
    )


def pack(x: torch.Tensor) -> torch.Tensor:
    """``[S, T, ...]`` → ``[1, L, ...]``: the first ``LENGTHS[i]`` positions of each row, in order."""
    return torch.cat([x[i, :n] for i, n in enumerate(LENGTHS)]).unsqueeze(0)


def cu_seqlens() -> torch.Tensor:
    out = [0]
    for n in LENGTHS:
        out.append(out[-1] + n)
    return torch.tensor(out)


CASES = {
    "policy-bias-trainable": dict(bias=True, ref=False, epsilon=None, frozen=False),
    "ref-epsilon-trainable": dict(bias=False, ref=True, epsilon=0.2, frozen=False),
    "ref-frozen-head": dict(bias=False, ref=True, epsilon=None, frozen=True),
}


# bf16 on the torch backend only: the Triton interpreter is slow, and the packed path adds nothing
# dtype-specific to the kernels (they see the same counted rows as in a padded call).
RUNS = {"torch-fp32": ("torch", torch.float32), "torch-bf16": ("torch", torch.bfloat16)}
RUNS["triton-fp32"] = ("triton", torch.float32)


@pytest.mark.parametrize("run", list(RUNS), ids=list(RUNS))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_packed_sums_and_gradients_against_float64_padded(case, run):
    """Packed sums (policy, reference, ε mixtures) and lengths are the padded batch's; the gradients
    w.r.t. the packed hidden states, the head's weight and bias (a random upstream gradient on the
    policy sums) are the float64 padded gradients at the packed positions."""
    c = CASES[case]
    backend, dtype = RUNS[run]
    hidden, weight, labels, bias, ref_hidden, ref_weight = padded_batch(dtype, seed=3, bias=c["bias"])
    cu = cu_seqlens()
    packed_hidden = pack(hidden).requires_grad_()
    weight.requires_grad_(not c["frozen"])
    if bias is not None:
        bias.requires_grad_()
    refs = dict(ref_hidden=pack(ref_hidden), ref_weight=ref_weight) if c["ref"] else {}
    seq = prefloss.sequence_logprobs(
        packed_hidden,
        weight,
        pack(labels),
        cu_seqlens=cu,
        bias=bias,
        epsilon=c["epsilon"],
        chunk_size=4,
        backend=backend,
        **refs,
    )
    upstream = torch.randn(len(LENGTHS), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # (name, packed-call leaf, float64 leaf, plain leaf) of every input that wants a gradient
    h64, plain_h = (hidden.detach().double().requires_grad_(), hidden.detach().clone().requires_grad_())
    w64, plain_w = (weight.detach().double(), weight.detach().clone())
    b64 = plain_b = None
    leaves = [("hidden", packed_hidden, h64, plain_h)]
    if not c["frozen"]:
        leaves.append(("weight", weight, w64.requires_grad_(), plain_w.requires_grad_()))
    if bias is not None:
        b64, plain_b = bias.detach().double().requires_grad_(), bias.detach().clone().requires_grad_()
        leaves.append(("bias", bias, b64, plain_b))
    grads = torch.autograd.grad((seq.policy * upstream.float()).sum(), [x[1] for x in leaves])

    # float64 ground truth and plain PyTorch at the same dtype, on the padded layout
    ref64 = dict(ref_hidden=ref_hidden.double(), ref_weight=ref_weight.double()) if c["ref"] else {}
    tok64 = reference.token_logprobs(h64, w64, labels, bias=b64, epsilon=c["epsilon"], **ref64)
    plain_refs = dict(ref_hidden=ref_hidden, ref_weight=ref_weight) if c["ref"] else {}
    plain = plain_logprobs(plain_h, plain_w, labels, epsilon=c["epsilon"], **plain_refs)
    plain = plain._replace(policy=plain_token_logprobs(plain_h, plain_w, labels, bias=plain_b))

    assert torch.equal(seq.length, (labels != -100).sum(-1))
    for kind in ("policy", "ref", "minus", "plus"):
        got, want, base = getattr(seq, kind), getattr(tok64, kind), getattr(plain, kind)
        if want is None:
            assert got is None, kind
            continue
        bound = ERROR_MARGIN * sequence_error_scale(base, want)
        assert_close_to_reference(got, want.sum(-1), bound=bound, name=f"{kind} sums")
    assert seq.policy[4] == 0 and seq.length[4] == 0  # the length-1 sequence counts no token

    expected = torch.autograd.grad((tok64.policy.sum(-1) * upstream).sum(), [x[2] for x in leaves])
    baseline = torch.autograd.grad((plain.policy.sum(-1) * upstream.float()).sum(), [x[3] for x in leaves])
    for (name, *_), got, want, base in zip(leaves, grads, expected, baseline, strict=True):
        if name == "hidden":  # at the packed positions (the padded rows' padding has no gradient)
            got, want, base = got[0], pack(want)[0], pack(base)[0]
        assert_close_to_reference(got, want, dtype=dtype, baseline=base, name=f"d {name}")


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKENDS)
def test_packed_equals_padded_call(backend):
    """Float64 inputs: the packed call's sums and lengths equal the padded call's to float64
    rounding (the same tokens, summed in another order), under ``torch.no_grad`` too."""
    hidden, weight, labels, _, ref_hidden, ref_weight = padded_batch(torch.float64, seed=5)
    kw = dict(ref_weight=ref_weight, epsilon=0.3, backend=backend)
    padded = prefloss.sequence_logprobs(hidden, weight, labels, ref_hidden=ref_hidden, **kw)
    with torch.no_grad():
        packed = prefloss.sequence_logprobs(
            pack(hidden), weight, pack(labels), ref_hidden=pack(ref_hidden), cu_seqlens=cu_seqlens(), **kw
        )
    for kind in ("policy", "ref", "minus", "plus"):
        torch.testing.assert_close(getattr(packed, kind), getattr(padded, kind), rtol=1e-12, atol=1e-12)
    assert torch.equal(packed.length, padded.length)
    means = packed.mean()
    torch.testing.assert_close(means.policy, padded.mean().policy, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKENDS)
def test_counted_last_label_is_refused(backend):
    """A counted label at a sequence's last position would be scored with the next sequence's first
    token: refused before any log-prob is computed, naming `labels`, the position, the sequence and
    `cu_seqlens`; with ``ignore_index=-1`` the rule follows the call's ``ignore_index``."""
    hidden, weight, labels, *_ = padded_batch(torch.float32)
    packed = pack(labels)
    cu = cu_seqlens()
    last = int(cu[4]) - 1  # sequence 3's last position
    packed[0, last] = 7
    with pytest.raises(ValueError) as info:
        prefloss.sequence_logprobs(pack(hidden), weight, packed, cu_seqlens=cu, backend=backend)
    message = str(info.value)
    for part in (f"`labels`[0, {last}] = 7", "sequence 3", "`cu_seqlens`", "cu_seqlens[4] - 1", "-100"):
        assert part in message, message
    ok = pack(labels).masked_fill(pack(labels) == -100, -1)
    prefloss.sequence_logprobs(pack(hidden), weight, ok, cu_seqlens=cu, ignore_index=-1, backend=backend)
    with pytest.raises(ValueError, match=r"`ignore_index` = -1"):
        prefloss.sequence_logprobs(pack(hidden), weight, pack(labels), cu_seqlens=cu, ignore_index=-1)


PACKED_ERRORS = {
    # name: (how the call is changed, error, message fragment)
    "labels-1d": (dict(labels="1d"), ValueError, r"`labels` must be \[1, L\] with `cu_seqlens`"),
    "labels-2-rows": (dict(labels="2rows"), ValueError, r"`labels` must be \[1, L\].*got shape \(2, "),
    "cu-short": (dict(cu=torch.tensor([0, 7, 10])), ValueError, r"must end at the packed token count L = 27"),
    "cu-int32": (dict(cu=cu_seqlens().int()), TypeError, "`cu_seqlens` must be an int64 tensor"),
    "labels-float": (dict(labels="float"), TypeError, r"`labels` must be an integer tensor"),
    "hidden-padded": (dict(hidden="padded"), ValueError, r"`labels` shape must equal `hidden`.shape\[:-1\]"),
}


@pytest.mark.parametrize("case", list(PACKED_ERRORS), ids=list(PACKED_ERRORS))
def test_packed_shape_errors(case):
    change, error, match = PACKED_ERRORS[case]
    hidden, weight, labels, *_ = padded_batch(torch.float32)
    h, lab, cu = pack(hidden), pack(labels), change.get("cu", cu_seqlens())
    if change.get("labels") == "1d":
        lab = lab[0]
    elif change.get("labels") == "float":
        lab = lab.float()
    elif change.get("labels") == "2rows":
        lab = lab.expand(2, -1)
    if change.get("hidden") == "padded":
        h = hidden
    with pytest.raises(error, match=match):
        prefloss.sequence_logprobs(h, weight, lab, cu_seqlens=cu)
