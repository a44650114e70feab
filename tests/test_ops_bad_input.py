"""Bad input to `prefloss.fused_logprobs` raises before any heavy work, naming the argument."""

from __future__ import annotations

import json
import subprocess
import sys

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


# --- numeric options and ignore_index: finite numbers of the right type, or an error naming them ----

NAN, INF = float("nan"), float("inf")
REF = dict(ref_hidden=torch.randn(2, 5, 8), ref_weight=torch.randn(11, 8))
BAD_OPTIONS = {
    "epsilon-nan": (dict(REF, epsilon=NAN), ValueError, "`epsilon` must be in (0, 1), got nan"),
    "epsilon-inf": (dict(REF, epsilon=INF), ValueError, "`epsilon` must be in (0, 1), got inf"),
    "epsilon-str": (dict(REF, epsilon="0.1"), TypeError, "`epsilon` must be a real number, got str"),
    "epsilon-tensor": (dict(REF, epsilon=torch.tensor(0.1)), TypeError, "`epsilon` must be a Python float"),
    "softcap-inf": (dict(softcap=INF), ValueError, "`softcap` must be a finite number > 0, got inf"),
    "softcap-bool": (dict(softcap=True), TypeError, "`softcap` must be a real number, got bool"),
    "logit-scale-inf": (dict(logit_scale=-INF), ValueError, "`logit_scale` must be a finite number > 0"),
    "logit-scale-str": (dict(logit_scale="2"), TypeError, "`logit_scale` must be a real number, got str"),
    "chunk-size-float": (dict(chunk_size=1.5), ValueError, "`chunk_size` must be a positive int or None"),
    "chunk-size-bool": (dict(chunk_size=True), ValueError, "`chunk_size` must be a positive int or None"),
    "ignore-index-none": (dict(ignore_index=None), TypeError, "`ignore_index` must be an int"),
    "ignore-index-float": (dict(ignore_index=-100.0), TypeError, "`ignore_index` must be an int"),
    "ignore-index-bool": (dict(ignore_index=False), TypeError, "`ignore_index` must be an int"),
    "ignore-index-tensor": (
        dict(ignore_index=torch.tensor(-100)),
        TypeError,
        "`ignore_index` must be an int",
    ),
}


@pytest.mark.parametrize("name", list(BAD_OPTIONS), ids=list(BAD_OPTIONS))
def test_bad_option_raises_naming_it(name):
    over, exc, message = BAD_OPTIONS[name]
    with pytest.raises(exc) as info:
        call(**dict(over))
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize("fn", ["fused_logprobs", "sequence_logprobs"], ids=["fused", "sequence"])
def test_numpy_integer_options_are_accepted(fn):
    """Integral / real numbers of any kind (NumPy's included) are fine: only the type's kind counts."""
    np = pytest.importorskip("numpy")
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = -1
    out = getattr(prefloss, fn)(
        torch.randn(2, 5, 8),
        torch.randn(11, 8),
        labels,
        ignore_index=np.int64(-1),
        chunk_size=np.int32(3),
        softcap=np.float32(30.0),
        backend="torch",
    )
    assert out.policy.shape[0] == 2


# --- first-order gradients only -----------------------------------------------------------------

BACKENDS_ON_CPU = ["torch", "triton"]  # triton: Triton's interpreter on CPU (tests/conftest.py)


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable-head", "frozen-head"])
@pytest.mark.parametrize("backend", BACKENDS_ON_CPU, ids=BACKENDS_ON_CPU)
def test_double_backward_is_refused(backend, frozen):
    """``create_graph=True`` asks for a differentiable gradient; the backward is not differentiable
    (the frozen head's ``∂h = g·J`` would silently drop ``∂J/∂h``): a clear RuntimeError, for both
    backward paths. A plain backward after it still works."""
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=not frozen)
    labels = torch.randint(0, 11, (2, 5))
    out = prefloss.fused_logprobs(hidden, weight, labels, backend=backend)
    with pytest.raises(RuntimeError, match="first-order gradients only") as info:
        torch.autograd.grad(out.policy.sum(), hidden, create_graph=True, retain_graph=True)
    assert "create_graph=True" in str(info.value)
    (grad,) = torch.autograd.grad(out.policy.sum(), hidden)
    assert torch.isfinite(grad).all()


def test_double_backward_through_a_loss_is_refused():
    batch = inputs(hidden=torch.randn(2, 5, 8, requires_grad=True))
    out = prefloss.SimPOLoss(backend="torch")(batch["hidden"], batch["weight"], batch["labels"])
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(out.loss, batch["hidden"], create_graph=True)


# --- a head parameter that a sharding engine holds only in part ---------------------------------

# Run in a child process: one gloo process group of world size 1, a real FSDP-style DTensor
# (Shard(0) over a 1-device CPU mesh) and a real DeepSpeed ZeRO-3 partitioned parameter
# (`deepspeed.zero.Init`), each passed as `weight` and as `ref_weight`; then the same ZeRO-3
# parameter inside `GatheredParameters` (whole again) must work.
SHARDED_SCRIPT = r"""
import json, os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", LOCAL_RANK="0",
                  WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
import torch
import torch.distributed as dist
dist.init_process_group("gloo")
import prefloss
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

h, lab = torch.randn(2, 5, 8), torch.randint(0, 11, (2, 5))
results = {}

def attempt(key, weight):
    for role, kwargs in (("weight", {}), ("ref_weight", {"ref_hidden": h, "ref_weight": weight})):
        try:
            prefloss.fused_logprobs(h, weight if role == "weight" else torch.randn(11, 8), lab, **kwargs)
            results[f"{key}/{role}"] = "no error"
        except Exception as e:
            results[f"{key}/{role}"] = f"{type(e).__name__}: {e}"

attempt("dtensor", distribute_tensor(torch.randn(11, 8), init_device_mesh("cpu", (1,)), [Shard(0)]))
import deepspeed
config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
with deepspeed.zero.Init(config_dict_or_path=config):
    head = torch.nn.Linear(8, 11, bias=False)
results["zero3/shape"] = list(head.weight.shape)
attempt("zero3", head.weight)
with deepspeed.zero.GatheredParameters([head.weight]):
    got = prefloss.fused_logprobs(h, head.weight, lab).policy
    w64 = head.weight.detach().double()
    want = torch.log_softmax(h.double() @ w64.T, -1).gather(-1, lab[..., None])[..., 0]
    results["zero3/gathered_max_error"] = float((got.double() - want).abs().max())
dist.destroy_process_group()
print("RESULTS " + json.dumps(results))
"""


def test_sharded_head_parameters_are_refused(tmp_path, subprocess_env, free_port):
    """A ZeRO-3 partitioned parameter (a ``[0]`` placeholder) and a sharded DTensor, passed straight
    to the op as ``weight`` or ``ref_weight``, raise a ValueError saying what the tensor is and what
    to call instead (`prefloss.hf.preference_loss` / `prefloss.hf.gathered_heads`); the ZeRO-3
    parameter once gathered is whole and works (its log-probs against float64 log_softmax)."""
    pytest.importorskip("deepspeed")
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(free_port())],
        cwd=tmp_path,
        env=subprocess_env(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS ") :])
    assert results["zero3/shape"] == [0]
    for role in ("weight", "ref_weight"):
        dtensor, zero3 = results[f"dtensor/{role}"], results[f"zero3/{role}"]
        assert dtensor.startswith(f"ValueError: `{role}` is a torch.distributed.tensor.DTensor"), dtensor
        assert zero3.startswith(f"ValueError: `{role}` is a DeepSpeed ZeRO-3 partitioned parameter"), zero3
        assert "whole shape (11, 8), held here as shape (0,)" in zero3
        for message in (dtensor, zero3):
            assert "prefloss.hf.preference_loss" in message and "prefloss.hf.gathered_heads" in message
    assert results["zero3/gathered_max_error"] < 1e-5
