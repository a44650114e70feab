"""`scripts/gpu_check.py`'s logic without a GPU: device names, and measured-vs-model on a bench JSON.

(The whole script, `--dry-run`, takes ~3 minutes on 2 CPU cores: run by hand, not in CI.)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from prefloss.commands.plan import plan_step

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("prefloss_gpu_check", _PATH)
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("AMD Instinct MI300X", "mi300x"),
        ("AMD Instinct MI300X VF", "mi300x"),
        ("AMD Instinct MI325X", "mi325x"),
        ("AMD Instinct MI250X", "mi250x"),
        ("AMD Instinct MI210", None),
        ("NVIDIA L4", None),
        (None, None),
    ],
    ids=["h100", "h200", "a100", "mi300x", "mi300x-vf", "mi325x", "mi250x", "mi210", "other", "none"],
)
def test_gpu_key(name, key):
    assert gpu_check.gpu_key(name) == key


def test_compare_measured_with_the_model():
    shape = {"batch": 2, "seq_len": 64, "hidden": 32, "vocab": 512, "dtype": "bfloat16"}
    bench = {
        "results": [
            {
                "case": "prefloss-triton/epsilon_dpo",
                "method": "prefloss-triton",
                "loss": "epsilon_dpo",
                "status": "ok",
                "shape": shape,
                "counted_tokens": 213,  # odd: the model takes 212 (chosen and rejected rows)
                "time_s": {"median": 0.002},
                "peak_mib": {"median": 3.0},
                "interleaved_floor": {"ratio_median": 1.3},
            },
            {"case": "prefloss-triton/dpo", "method": "prefloss-triton", "loss": "dpo", "status": "wrong"},
            {"case": "floor", "method": "floor", "loss": None, "status": "ok", "time_s": {"median": 0.001}},
            {"case": "liger/dpo", "method": "liger", "loss": "dpo", "status": "ok"},
        ]
    }
    out = gpu_check._compare(bench, "h100", dry_run=False)
    plan = plan_step("epsilon_dpo", tokens=212, hidden=32, vocab=512, dtype="bfloat16", gpu="h100")
    eps, dpo = out["cases"]
    assert (eps["case"], dpo["case"], dpo["status"]) == (
        "prefloss-triton/epsilon_dpo",
        "prefloss-triton/dpo",
        "wrong",
    )
    assert "measured_ms" not in dpo
    assert eps["measured_ms"] == pytest.approx(2.0)
    assert eps["modelled_ms"] == pytest.approx(plan.step_time_s * 1e3)
    assert eps["measured_over_model"] == pytest.approx(0.002 / plan.step_time_s)
    assert eps["measured_effective_tflops"] == pytest.approx(plan.floor_flops / 0.002 / 1e12)
    assert eps["modelled_peak_mib"] == pytest.approx(plan.peak_bytes / 2**20)
    assert eps["floor_ratio_measured"] == 1.3
    assert out["floor_measured_ms"] == pytest.approx(1.0)
    # an unknown GPU: measured values only, no model
    assert "modelled_ms" not in gpu_check._compare(bench, None, dry_run=False)["cases"][0]
