"""The frozen-head path of `prefloss.fused_logprobs`: ``J = ∂logp/∂h`` formed in the forward.

When only ``∂hidden`` is wanted (LoRA: the LM head is frozen), the forward also forms
``J_t = Σ_v (onehot(y_t) − softmax(z_t))_v · dz_v/draw_v · W_v`` and the backward is the per-row
scale ``∂h_t = g_t · J_t``: 3 GEMMs of ``n·H·V`` a step with a reference instead of 4. Checked on
both backends (Triton under the interpreter on CPU) against the float64 reference with the shared
criterion of `prefloss.testing` (err ≤ ERROR_MARGIN · plain PyTorch's error at the same dtype), with
a random upstream gradient; the GEMM work is counted with a dispatch mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import prefloss
from prefloss import reference
from prefloss.testing import assert_close_to_reference, plain_token_logprobs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = ["torch", "triton"]


# Several vocabulary tiles on these small V, the last one partial (conftest.py).
pytestmark = pytest.mark.usefixtures("small_vocab_tiles")


@dataclass(frozen=True)
class Case:
    rows: int = 4
    T: int = 13
    H: int = 24
    V: int = 101  # not a power of two: 4 tiles of 32, the last partial
    chunk_size: int = 8
    ignore_frac: float = 0.25
    empty_row: bool = False
    peaked: bool = False
    bias: bool = False
    softcap: float | None = None
    logit_scale: float | None = None
    ref: bool = False
    epsilon: float | None = None


CASES = {
    "plain": Case(),
    "softcap-logit-scale-bias": Case(softcap=2.0, logit_scale=0.37, bias=True),
    "heavy-masking": Case(ignore_frac=0.9),
    "fully-ignored-sequence": Case(empty_row=True),
    "peaked-logits": Case(peaked=True),
    "ref-epsilon-softcap": Case(ref=True, epsilon=0.3, softcap=3.0),
    "V-below-one-tile": Case(V=13, chunk_size=64),
}


def _fused(case, hidden, weight, labels, bias, ref_hidden, ref_weight, backend):
    return prefloss.fused_logprobs(
        hidden,
        weight,
        labels,
        bias=bias,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        epsilon=case.epsilon,
        logit_scale=case.logit_scale,
        softcap=case.softcap,
        chunk_size=case.chunk_size,
        backend=backend,
    )


class GemmCounter(TorchDispatchMode):
    """Matmul work in the dispatcher: FLOPs/2 (multiply-adds) of every mm/addmm/bmm, and the largest
    tensor any op produced (a ``[N, V]`` logit matrix would show there)."""

    MATMULS = {"mm", "addmm", "addmm_", "bmm", "matmul"}

    def __init__(self):
        super().__init__()
        self.multiply_adds = 0
        self.calls = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in self.MATMULS:
            a, b = (args[1], args[2]) if name.startswith("addmm") else (args[0], args[1])
            self.multiply_adds += (
                a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
            )
            self.calls += 1
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("dtype_name", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case_name", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKENDS)
def test_frozen_head_against_float64(backend, case_name, dtype_name, monkeypatch, make_logprob_inputs):
    monkeypatch.setenv("PREFLOSS_COMPILE", "never")  # the compiled tile path: test_compiled_tiles_*
    case, dtype = CASES[case_name], DTYPES[dtype_name]
    hidden, weight, labels, bias, ref_hidden, ref_weight = make_logprob_inputs(case, dtype)
    hidden.requires_grad_(True)  # weight and bias stay frozen
    out = _fused(case, hidden, weight, labels, bias, ref_hidden, ref_weight, backend)

    h64 = hidden.detach().double().requires_grad_(True)
    ref64 = reference.token_logprobs(
        h64,
        weight.double(),
        labels,
        bias=None if bias is None else bias.double(),
        ref_hidden=None if ref_hidden is None else ref_hidden.double(),
        ref_weight=None if ref_weight is None else ref_weight.double(),
        epsilon=case.epsilon,
        logit_scale=case.logit_scale,
        softcap=case.softcap,
    )
    plain_opts = dict(bias=bias, logit_scale=case.logit_scale, softcap=case.softcap)
    plain = plain_token_logprobs(hidden, weight, labels, **plain_opts)
    assert_close_to_reference(out.policy, ref64.policy, dtype=dtype, baseline=plain, name="policy")
    if case.ref:
        plain_ref = plain_token_logprobs(
            ref_hidden, ref_weight, labels, logit_scale=case.logit_scale, softcap=case.softcap
        )
        assert_close_to_reference(out.ref, ref64.ref, dtype=dtype, baseline=plain_ref, name="ref")

    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1))
    (got,) = torch.autograd.grad((out.policy * upstream).sum(), hidden)
    (want,) = torch.autograd.grad((ref64.policy * upstream.double()).sum(), h64)
    (base,) = torch.autograd.grad((plain * upstream).sum(), hidden)
    assert got.dtype == dtype and got.shape == hidden.shape
    assert_close_to_reference(got, want, dtype=dtype, baseline=base, name="grad hidden")
    assert torch.equal(got[labels == -100], torch.zeros_like(got[labels == -100]))
    assert weight.grad is None


def test_compiled_tiles_against_float64(monkeypatch, make_logprob_inputs):
    """The torch backend's compiled tile arithmetic (softcap's chain factor included)."""
    from prefloss.fused import tile_math

    monkeypatch.setenv("PREFLOSS_COMPILE", "always")
    case = CASES["softcap-logit-scale-bias"]
    hidden, weight, labels, bias, *_ = make_logprob_inputs(case, torch.float32)
    hidden.requires_grad_(True)
    out = _fused(case, hidden, weight, labels, bias, None, None, "torch")
    h64 = hidden.detach().double().requires_grad_(True)
    ref64 = reference.token_logprobs(
        h64, weight.double(), labels, bias=bias.double(), logit_scale=case.logit_scale, softcap=case.softcap
    )
    plain = plain_token_logprobs(hidden, weight, labels, bias=bias, logit_scale=case.logit_scale, softcap=2.0)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1))
    (got,) = torch.autograd.grad((out.policy * upstream).sum(), hidden)
    (want,) = torch.autograd.grad((ref64.policy * upstream.double()).sum(), h64)
    (base,) = torch.autograd.grad((plain * upstream).sum(), hidden)
    assert_close_to_reference(got, want, dtype=torch.float32, baseline=base, name="grad hidden")
    assert tile_math._Fused.failed is None, f"torch.compile failed: {tile_math._Fused.failed}"


@pytest.mark.parametrize("case_name", ["plain", "softcap-logit-scale-bias", "fully-ignored-sequence"])
def test_frozen_equals_trainable_in_float64(case_name, monkeypatch, make_logprob_inputs):
    """Same ∂hidden from both paths, to float64 rounding (torch backend: it runs float64)."""
    monkeypatch.setenv("PREFLOSS_COMPILE", "never")
    case = CASES[case_name]
    hidden, weight, labels, bias, *_ = make_logprob_inputs(case, torch.float64)
    upstream = torch.randn(labels.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = []
    for trainable in (False, True):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(trainable)
        out = _fused(case, h, w, labels, bias, None, None, "torch")
        grads.append(torch.autograd.grad((out.policy * upstream).sum(), h)[0])
    scale = max(1.0, float(grads[1].abs().max()))
    assert_close_to_reference(
        grads[0], grads[1], dtype=torch.float64, scale=scale, name="frozen vs trainable"
    )


@pytest.mark.parametrize("dtype_name", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKENDS)
def test_frozen_and_trainable_paths_agree(backend, dtype_name, monkeypatch, make_logprob_inputs):
    """At fp32/bf16/fp16 the two paths round differently; each is within the criterion of the float64
    ∂hidden, so they differ by at most the sum of the two bounds (here: twice the one bound)."""
    monkeypatch.setenv("PREFLOSS_COMPILE", "never")
    case, dtype = CASES["softcap-logit-scale-bias"], DTYPES[dtype_name]
    hidden, weight, labels, bias, *_ = make_logprob_inputs(case, dtype)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(3))
    grads = []
    for trainable in (False, True):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(trainable)
        out = _fused(case, h, w, labels, bias, None, None, backend)
        grads.append(torch.autograd.grad((out.policy * upstream).sum(), h)[0])
    h64 = hidden.detach().double().requires_grad_(True)
    ref64 = reference.token_logprobs(
        h64, weight.double(), labels, bias=bias.double(), logit_scale=case.logit_scale, softcap=case.softcap
    )
    (want,) = torch.autograd.grad((ref64.policy * upstream.double()).sum(), h64)
    hp = hidden.clone().requires_grad_(True)
    plain = plain_token_logprobs(hp, weight, labels, bias=bias, logit_scale=case.logit_scale, softcap=2.0)
    (base,) = torch.autograd.grad((plain * upstream).sum(), hp)
    bound = assert_close_to_reference(grads[1], want, dtype=dtype, baseline=base, name="trainable").bound
    assert_close_to_reference(grads[0], want, dtype=dtype, baseline=base, name="frozen")
    assert_close_to_reference(grads[0], grads[1].double(), bound=2 * bound, name="frozen vs trainable")


# --- GEMM work and memory -----------------------------------------------------------------------


HEADS = {
    # name: (hidden requires grad, weight requires grad, bias requires grad, grad mode on)
    "frozen": (True, False, False, True),
    "trainable-weight": (True, True, False, True),
    "trainable-bias-only": (True, False, True, True),
    "no-grad": (True, False, False, False),
    "hidden-without-grad": (False, False, False, True),
}
# Units of one n·H·V GEMM (forward, backward), with a reference model.
EXPECTED_UNITS = {
    "frozen": (3, 0),  # policy, reference, J; backward scales rows
    "trainable-weight": (2, 3),  # unchanged: recompute, ∂h, ∂W
    "trainable-bias-only": (2, 2),  # unchanged: recompute, ∂h (∂b is a column sum)
    "no-grad": (2, None),
    "hidden-without-grad": (2, None),
}


@pytest.mark.parametrize("head", list(HEADS), ids=list(HEADS))
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKENDS)
def test_gemm_work_per_path(backend, head, monkeypatch, make_logprob_inputs):
    monkeypatch.setenv("PREFLOSS_COMPILE", "never")
    case = Case(rows=2, T=24, H=16, V=100, chunk_size=16, bias=True, ref=True, epsilon=0.1)
    hidden, weight, labels, bias, ref_hidden, ref_weight = make_logprob_inputs(case, torch.float32)
    need_h, need_w, need_b, grad_on = HEADS[head]
    hidden.requires_grad_(need_h), weight.requires_grad_(need_w), bias.requires_grad_(need_b)
    n = int((labels != -100).sum())
    unit = n * case.H * case.V
    with torch.set_grad_enabled(grad_on):
        with GemmCounter() as fwd:
            out = _fused(case, hidden, weight, labels, bias, ref_hidden, ref_weight, backend)
    want_fwd, want_bwd = EXPECTED_UNITS[head]
    assert fwd.multiply_adds == want_fwd * unit, f"forward: {fwd.multiply_adds / unit} GEMMs of n·H·V"
    if want_bwd is None:
        assert not out.policy.requires_grad
        return
    with GemmCounter() as bwd:
        out.policy.sum().backward()
    assert bwd.multiply_adds == want_bwd * unit, f"backward: {bwd.multiply_adds / unit} GEMMs of n·H·V"
    if head == "frozen":
        assert bwd.calls == 0
    # memory flat: nothing of logit size [n, V]; the largest is a chunk's tile/buffer or [N, H]
    chunk = case.chunk_size * (32 if backend == "torch" else case.V)
    largest_allowed = max(chunk, hidden.numel(), weight.numel())
    assert max(fwd.largest, bwd.largest) <= largest_allowed < n * case.V


def test_backward_twice_with_retain_graph(monkeypatch, make_logprob_inputs):
    """J is read, not consumed: a second backward through the same graph gives the same gradient."""
    monkeypatch.setenv("PREFLOSS_COMPILE", "never")
    hidden, weight, labels, *_ = make_logprob_inputs(Case(), torch.float32)
    hidden.requires_grad_(True)
    out = prefloss.fused_logprobs(hidden, weight, labels, chunk_size=8, backend="torch")
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(4))
    (first,) = torch.autograd.grad((out.policy * upstream).sum(), hidden, retain_graph=True)
    (second,) = torch.autograd.grad((out.policy * upstream).sum(), hidden)
    assert torch.equal(first, second)


def test_every_token_ignored(monkeypatch):
    monkeypatch.setenv("PREFLOSS_COMPILE", "never")
    hidden = torch.randn(2, 4, 8, requires_grad=True)
    weight = torch.randn(11, 8)
    out = prefloss.fused_logprobs(hidden, weight, torch.full((2, 4), -100), backend="torch")
    out.policy.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


@pytest.mark.parametrize("hip", [None, "6.4"], ids=["cuda", "rocm"])
def test_out_dtype_gemm_refused_only_falls_back_on_rocm(hip, monkeypatch):
    """The backward's 16-bit GEMM into fp32 (``addmm(out_dtype=...)``): when a GPU build refuses it,
    a ROCm build upcasts the operands instead (once refused, never tried again) and a CUDA build
    raises. Traced on meta tensors, where the non-CPU branch runs."""
    from prefloss.fused import triton_backend

    real_addmm, calls = torch.addmm, []

    def refusing_addmm(*args, **kwargs):
        calls.append(kwargs.get("out_dtype"))
        if "out_dtype" in kwargs:
            raise RuntimeError("_addmm_out_dtype: not supported for ROCm")
        return real_addmm(*args, **kwargs)

    monkeypatch.setattr(torch, "addmm", refusing_addmm)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setitem(triton_backend._OUT_DTYPE_GEMM, "ok", True)
    acc = torch.empty(4, 8, device="meta")
    a, b = (
        torch.empty(4, 16, dtype=torch.bfloat16, device="meta"),
        torch.empty(16, 8, dtype=torch.bfloat16, device="meta"),
    )
    if hip is None:
        with pytest.raises(RuntimeError, match="not supported"):
            triton_backend._addmm_fp32_(acc, a, b)
        return
    triton_backend._addmm_fp32_(acc, a, b)
    triton_backend._addmm_fp32_(acc, a, b)
    assert calls == [torch.float32]  # tried once, then the upcast path
    assert triton_backend._OUT_DTYPE_GEMM["ok"] is False
    assert acc.shape == (4, 8) and acc.dtype == torch.float32
