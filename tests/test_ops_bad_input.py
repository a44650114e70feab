"""Bad input to `prefloss.fused_logprobs` raises before any heavy work, naming the argument."""

from __future__ import annotations

import pytest
import torch

import prefloss


def inputs(**over):
    base = dict(
        hidden=torch.randn(2, 5, 8),
        weight=torch.randn(11, 8),
        labels=torch.randint(0, 11, (2, 5)),
    )
    base.update(over)
    return base


def call(**over):
    args = inputs(**{k: over.pop(k) for k in ("hidden", "weight", "labels") if k in over})
    return prefloss.fused_logprobs(args["hidden"], args["weight"], args["labels"], backend="torch", **over)


BAD = {
    "H-mismatch": (dict(weight=torch.randn(11, 9)), ValueError, "`hidden` last dim"),
    "labels-shape": (dict(labels=torch.randint(0, 11, (2, 4))), ValueError, "`labels` shape"),
    "labels-float": (dict(labels=torch.zeros(2, 5)), TypeError, "`labels` must be an integer"),
    "label-too-large": (dict(labels=torch.full((2, 5), 11)), ValueError, "got 11"),
    "label-negative": (dict(labels=torch.full((2, 5), -3)), ValueError, "got -3"),
    "weight-not-2d": (dict(weight=torch.randn(11, 8, 1)), ValueError, "`weight` must be [V, H]"),
    "dtype-mismatch": (dict(weight=torch.randn(11, 8, dtype=torch.float64)), TypeError, "same dtype"),
    "ref-hidden-only": (
        dict(ref_hidden=torch.randn(2, 5, 8)),
        ValueError,
        "`ref_hidden` was given without `ref_weight`",
    ),
    "ref-weight-only": (
        dict(ref_weight=torch.randn(11, 8)),
        ValueError,
        "`ref_weight` was given without `ref_hidden`",
    ),
    "ref-vocab": (
        dict(ref_hidden=torch.randn(2, 5, 8), ref_weight=torch.randn(12, 8)),
        ValueError,
        "vocabulary size",
    ),
    "epsilon-zero": (
        dict(ref_hidden=torch.randn(2, 5, 8), ref_weight=torch.randn(11, 8), epsilon=0.0),
        ValueError,
        "`epsilon` must be in (0, 1)",
    ),
    "epsilon-one": (
        dict(ref_hidden=torch.randn(2, 5, 8), ref_weight=torch.randn(11, 8), epsilon=1.0),
        ValueError,
        "`epsilon` must be in (0, 1)",
    ),
    "epsilon-without-ref": (dict(epsilon=0.1), ValueError, "`epsilon` needs the reference"),
    "softcap-zero": (dict(softcap=0.0), ValueError, "`softcap` must be a finite number > 0"),
    "softcap-negative": (dict(softcap=-1.0), ValueError, "`softcap`"),
    "logit-scale-nan": (dict(logit_scale=float("nan")), ValueError, "`logit_scale`"),
    "bias-shape": (dict(bias=torch.randn(10)), ValueError, "`bias` must be [V]"),
    "chunk-size-zero": (dict(chunk_size=0), ValueError, "`chunk_size` must be a positive int"),
    "hidden-not-tensor": (dict(hidden=[[1.0]]), TypeError, "`hidden` must be a torch.Tensor"),
    "hidden-int": (
        dict(hidden=torch.ones(2, 5, 8, dtype=torch.int64)),
        TypeError,
        "`hidden` must be a floating",
    ),
}


@pytest.mark.parametrize("name", list(BAD), ids=list(BAD))
def test_bad_input_raises_naming_the_argument(name):
    over, exc, message = BAD[name]
    with pytest.raises(exc) as info:
        call(**dict(over))
    assert message in str(info.value)


def test_unknown_backend():
    with pytest.raises(ValueError, match="`backend` must be one of"):
        prefloss.fused_logprobs(**inputs(), backend="cuda")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        prefloss.fused_logprobs(**inputs(), backend="triton")


def test_ignore_index_label_is_not_out_of_range():
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 0] = -1
    out = prefloss.fused_logprobs(torch.randn(2, 5, 8), torch.randn(11, 8), labels, ignore_index=-1)
    assert float(out.policy[0, 0]) == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices (CPU and CUDA)")
def test_tensors_on_different_devices():
    with pytest.raises(ValueError, match="one device"):
        prefloss.fused_logprobs(torch.randn(2, 5, 8).cuda(), torch.randn(11, 8), torch.randint(0, 11, (2, 5)))


def test_tensors_on_different_devices_meta():
    """Device mismatch is caught before any work (the meta device stands in for a GPU here)."""
    with pytest.raises(ValueError, match="one device"):
        prefloss.fused_logprobs(
            torch.randn(2, 5, 8, device="meta"), torch.randn(11, 8), torch.randint(0, 11, (2, 5))
        )
