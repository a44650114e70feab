"""Triton row kernels (`prefloss.kernels.logprobs`) against float64, with the torch backend as baseline.

Criterion everywhere (`prefloss.testing`): ``err(triton) <= err(torch at the same dtype) + tol[dtype]``,
errors measured against float64 computed from the same (already rounded) inputs. Without CUDA the
kernels run under Triton's interpreter (tests/conftest.py), so shapes are small and tiles wide.
Inputs are drawn on the CPU (the same values everywhere) and moved to the ``kernel_device`` fixture:
CPU tensors under the interpreter, CUDA tensors when the kernels are compiled for a GPU.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prefloss
import prefloss.kernels
from prefloss import reference
from prefloss.fused import rows as torch_rows
from prefloss.kernels import logprobs as kernels
from prefloss.testing import assert_close_to_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def test_kernels_import_name():
    assert prefloss.kernels.__name__ == "prefloss.kernels"
    assert kernels.__name__ == "prefloss.kernels.logprobs"
    folder = Path(kernels.__file__).resolve().parent
    spec = importlib.util.find_spec("kernels")
    # A bare `kernels` must never be our folder (it would shadow Hugging Face's `kernels` package).
    assert spec is None or spec.origin is None or folder not in Path(spec.origin).resolve().parents


def test_repository_root_does_not_shadow_hugging_face_kernels():
    # `python -c`, `python -m` and Jupyter put the current directory first on sys.path. From the
    # repository root, the top-level kernels/ folder (no __init__.py) must lose to an installed
    # `kernels` package, which transformers >= 5.25 imports, and prefloss.kernels must still resolve.
    root = Path(__file__).resolve().parents[1]
    code = (
        "import importlib.util, pathlib, transformers.modeling_utils, prefloss.kernels.logprobs as k\n"
        "spec = importlib.util.find_spec('kernels')\n"
        f"root = pathlib.Path({str(root)!r})\n"
        "origin = spec and spec.origin and pathlib.Path(spec.origin).resolve()\n"
        "assert origin is None or root not in origin.parents, spec\n"
        "print(k.__name__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "prefloss.kernels.logprobs"


# --- launchers on raw rows ----------------------------------------------------------------------

# (n, V, block_v, options): block_v None takes the autotuned path (one wide tile under the interpreter).
ROW_CASES = {
    "V1000-blocks": (6, 1000, 128, {}),
    "V-below-block": (5, 100, None, {}),
    "odd-N": (13, 257, 64, {}),
    "peaked": (7, 500, 128, {"peaked": True}),
    "bias": (6, 300, 64, {"bias": True}),
    "logit-scale": (6, 300, 128, {"logit_scale": 0.37}),
    "softcap": (6, 300, 128, {"softcap": 3.0}),
    "ref": (6, 300, 128, {"ref": True, "ref_bias": True}),
    "ref-eps": (7, 700, 256, {"ref": True, "epsilon": 0.25}),
    "all": (
        9,
        1000,
        256,
        {"ref": True, "epsilon": 0.1, "bias": True, "ref_bias": True, "logit_scale": 1.7, "softcap": 7.5},
    ),
}


def _make_rows(n, V, dtype, opts, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, V, generator=g) * 4
    labels = torch.randint(0, V, (n,), generator=g)
    if opts.get("peaked"):
        # Confident rows: the label's logit far above the rest (logp ~ 0), and some far below.
        raw[torch.arange(n), labels] = torch.where(torch.arange(n) % 2 == 0, 60.0, -60.0)
    ref = torch.randn(n, V, generator=g) * 4 if opts.get("ref") else None
    bias = torch.randn(V, generator=g) if opts.get("bias") else None
    ref_bias = torch.randn(V, generator=g) if opts.get("ref_bias") else None
    cast = lambda x: None if x is None else x.to(device, dtype)
    return cast(raw), labels.to(device), cast(ref), cast(bias), cast(ref_bias)


def _logp64(z, labels):
    return torch.log_softmax(z, dim=1).gather(1, labels[:, None]).squeeze(1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(ROW_CASES), ids=list(ROW_CASES))
def test_logprobs_rows_fwd_bwd(case, dtype, kernel_device):
    n, V, block_v, opts = ROW_CASES[case]
    raw, labels, ref_raw, bias, ref_bias = _make_rows(n, V, dtype, opts, kernel_device)
    eps, scale, cap = opts.get("epsilon"), opts.get("logit_scale"), opts.get("softcap")
    kw = {"bias": bias, "logit_scale": scale, "softcap": cap}
    fwd_kw = {**kw, "ref_logits": ref_raw, "ref_bias": ref_bias, "epsilon": eps}

    # float64 truth from the same rounded inputs; the policy side is differentiated by autograd.
    raw64 = raw.double().requires_grad_()
    z = reference.transform_logits(raw64, bias, scale, cap)
    expected = {"logp": _logp64(z, labels), "lse": torch.logsumexp(z, dim=1)}
    if ref_raw is not None:
        zr = reference.transform_logits(ref_raw, ref_bias, scale, cap)
        expected["ref"] = _logp64(zr, labels)
        if eps is not None:
            expected["minus"] = _logp64((1 + eps) * z - eps * zr, labels)
            expected["plus"] = _logp64((1 - eps) * z + eps * zr, labels)

    clone = lambda x: None if x is None else x.clone()
    got = kernels.logprobs_fwd(raw, labels, **fwd_kw, block_v=block_v)
    base = torch_rows.logprobs_fwd(raw.clone(), labels, **{**fwd_kw, "ref_logits": clone(ref_raw)})
    for name in got._fields:
        if name in expected:
            assert getattr(got, name).dtype == torch.float32
            assert_close_to_reference(
                getattr(got, name), expected[name], dtype=dtype, baseline=getattr(base, name), name=name
            )
        else:
            assert getattr(got, name) is None, name

    grad = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(kernel_device)
    (expected_draw,) = torch.autograd.grad((expected["logp"] * grad.double()).sum(), raw64)
    buf = raw.clone()
    out = kernels.logprobs_bwd(buf, labels, got.lse, grad, **kw, block_v=block_v)
    assert out.data_ptr() == buf.data_ptr() and out.dtype == dtype
    base_draw = torch_rows.logprobs_bwd(raw.clone(), labels, base.lse, grad, **kw)
    assert_close_to_reference(out, expected_draw, dtype=dtype, baseline=base_draw, name="d raw")


def test_logprobs_rows_strided_view(kernel_device):
    """Rows that are a view with a row stride larger than V (a slice of a wider buffer)."""
    n, V = 5, 300
    wide = (torch.randn(n, V + 24) * 3).to(kernel_device)
    raw = wide[:, :V]
    padding = wide[:, V:].clone()
    labels = torch.randint(0, V, (n,)).to(kernel_device)
    got = kernels.logprobs_fwd(raw, labels, ref_logits=raw, epsilon=0.5, block_v=128)
    z = raw.double()
    assert_close_to_reference(got.logp, _logp64(z, labels), dtype=torch.float32, name="logp")
    assert_close_to_reference(got.minus, _logp64(z, labels), dtype=torch.float32, name="minus")
    grad = torch.randn(n).to(kernel_device)
    kernels.logprobs_bwd(raw, labels, got.lse, grad, block_v=128)
    expected = grad.double()[:, None] * (torch.nn.functional.one_hot(labels, V) - torch.softmax(z, dim=1))
    assert_close_to_reference(raw, expected, dtype=torch.float32, name="d raw")
    assert torch.equal(wide[:, V:], padding), "the backward kernel wrote outside the [n, V] view"


def test_logprobs_rows_empty(kernel_device):
    raw = torch.empty(0, 50, device=kernel_device)
    labels = torch.empty(0, dtype=torch.long, device=kernel_device)
    got = kernels.logprobs_fwd(raw, labels)
    assert got.logp.shape == (0,) and got.lse.shape == (0,)
    assert kernels.logprobs_bwd(raw, labels, got.lse, got.lse).shape == (0, 50)


def test_logprobs_rows_bad_arguments(kernel_device):
    raw = torch.randn(4, 64, device=kernel_device)
    labels = torch.randint(0, 64, (4,), device=kernel_device)
    with pytest.raises(ValueError, match="epsilon"):
        kernels.logprobs_fwd(raw, labels, epsilon=0.1)
    with pytest.raises(ValueError, match="unit stride"):
        kernels.logprobs_fwd(raw.T.contiguous().T, labels)
    with pytest.raises(ValueError, match="block_v"):
        kernels.logprobs_fwd(raw, labels, block_v=100)
    with pytest.raises(ValueError, match="labels"):
        kernels.logprobs_fwd(raw, labels[:3])
    with pytest.raises(ValueError, match="ref_logits"):
        kernels.logprobs_fwd(raw, labels, ref_logits=raw[:, :32])
    with pytest.raises(ValueError, match="lse"):
        kernels.logprobs_bwd(
            raw, labels, torch.zeros(3, device=kernel_device), torch.zeros(4, device=kernel_device)
        )


# --- end to end: prefloss.fused_logprobs(..., backend="triton") --------------------------------

# (batch, T, H, V, chunk_size, options)
E2E_CASES = {
    "odd-V-chunks": (2, 9, 16, 1000, 5, {}),
    "heavy-mask": (3, 12, 16, 500, 8, {"ignore_frac": 0.8}),
    "masked-row": (3, 7, 16, 300, None, {"masked_row": True}),
    "frozen-head": (2, 8, 16, 400, 7, {"frozen": True, "bias": True}),
    "softcap-scale-bias": (2, 8, 16, 333, 6, {"softcap": 4.0, "logit_scale": 1.3, "bias": True}),
    "ref-eps": (2, 8, 16, 600, 5, {"ref": True, "epsilon": 0.3, "bias": True, "masked_row": True}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(E2E_CASES), ids=list(E2E_CASES))
def test_fused_logprobs_triton(case, dtype, kernel_device):
    B, T, H, V, chunk, opts = E2E_CASES[case]
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(B, T, H, generator=g).to(kernel_device, dtype)
    weight = (torch.randn(V, H, generator=g) * 0.6).to(kernel_device, dtype)
    bias = torch.randn(V, generator=g).to(kernel_device, dtype) if opts.get("bias") else None
    labels = torch.randint(0, V, (B, T), generator=g)
    if opts.get("ignore_frac"):
        labels[torch.rand(B, T, generator=g) < opts["ignore_frac"]] = -100
    if opts.get("masked_row"):
        labels[1] = -100
    labels = labels.to(kernel_device)
    ref_hidden = ref_weight = None
    if opts.get("ref"):
        ref_hidden = (hidden.float() + 0.3 * torch.randn(B, T, H, generator=g).to(kernel_device)).to(dtype)
        ref_weight = (weight.float() + 0.1 * torch.randn(V, H, generator=g).to(kernel_device)).to(dtype)
    kw = {
        "ref_hidden": ref_hidden,
        "ref_weight": ref_weight,
        "epsilon": opts.get("epsilon"),
        "logit_scale": opts.get("logit_scale"),
        "softcap": opts.get("softcap"),
    }
    grad_out = torch.randn(B, T, generator=g).to(kernel_device)
    frozen = opts.get("frozen", False)

    def run(backend_or_ref):
        leaves = {"hidden": hidden.detach().clone(), "weight": weight.detach().clone()}
        if bias is not None:
            leaves["bias"] = bias.detach().clone()
        if backend_or_ref == "reference":
            leaves = {k: v.double() for k, v in leaves.items()}
        for name, t in leaves.items():
            t.requires_grad_(not (frozen and name in ("weight", "bias")))
        args = (leaves["hidden"], leaves["weight"], labels)
        if backend_or_ref == "reference":
            out = reference.token_logprobs(*args, bias=leaves.get("bias"), **kw)
        else:
            out = prefloss.fused_logprobs(
                *args, bias=leaves.get("bias"), **kw, chunk_size=chunk, backend=backend_or_ref
            )
        (out.policy * grad_out.to(out.policy.dtype)).sum().backward()
        grads = {k: v.grad for k, v in leaves.items() if v.requires_grad}
        return out, grads

    expected, expected_grads = run("reference")
    got, got_grads = run("triton")
    base, base_grads = run("torch")
    assert torch.equal(got.mask, expected.mask)
    for name in ("policy", "ref", "minus", "plus"):
        if getattr(expected, name) is None:
            assert getattr(got, name) is None, name
            continue
        assert_close_to_reference(
            getattr(got, name), getattr(expected, name), dtype=dtype, baseline=getattr(base, name), name=name
        )
    assert set(got_grads) == set(expected_grads) == ({"hidden"} if frozen else set(got_grads))
    for name, expected_grad in expected_grads.items():
        assert got_grads[name].dtype == dtype
        assert_close_to_reference(
            got_grads[name], expected_grad, dtype=dtype, baseline=base_grads[name], name=f"d {name}"
        )
