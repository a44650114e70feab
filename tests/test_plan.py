"""`prefloss plan`: the CUDA step of the triton backend, run on meta tensors at Llama-3-8B shapes.

The targets of the CUDA path, checked on the model (no GPU): every GEMM takes 16-bit operands when the
inputs are 16-bit (none with 32-bit operands over 1 % of the step's FLOPs), the step's GEMM FLOPs
stay within 5/4 of the 4-GEMM floor (+1 %), the peak of live memory beyond the inputs is at most
1.6 GiB for ε-DPO (bf16 weights, bf16 gradients: 1.04 GiB of it), and the modelled effective
throughput on an H100 SXM is at least 650 TFLOP/s. Before the vocabulary-tiled backward, the ∂W
GEMM took fp32 operands (20 % of the FLOPs) and the peak was 3.0 GiB: these tests failed.
AMD Instinct GPUs (MI300X, MI325X, one MI250X GCD): the same recorded step, timed at their datasheet peaks.
"""

from __future__ import annotations

import json

import pytest

from prefloss.commands import cli
from prefloss.commands.plan import AMD_GPUS, GIB, GPUS, LOSSES, ROCM_UNVERIFIED, plan_step

LLAMA3_8B = {"tokens": 8192, "hidden": 4096, "vocab": 128256}


@pytest.fixture(scope="module")
def plans():
    cache = {}

    def get(loss, dtype="bfloat16", gpu="h100", frozen_head=False):
        key = (loss, dtype, gpu, frozen_head)
        if key not in cache:
            cache[key] = plan_step(loss, **LLAMA3_8B, dtype=dtype, gpu=gpu, frozen_head=frozen_head)
        return cache[key]

    return get


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"], ids=["bf16", "fp16"])
@pytest.mark.parametrize("loss", LOSSES, ids=LOSSES)
def test_gemms_take_16bit_operands_and_stay_within_5_4_of_the_floor(plans, loss, dtype):
    plan = plans(loss, dtype)
    step = plan.gemm_flops
    wide = [g for g in plan.gemms if g.operands_32bit]
    assert sum(g.flops for g in wide) <= 0.01 * step, [(g.role, g.a_dtype, g.b_dtype, g.flops) for g in wide]
    assert step <= 1.25 * plan.floor_flops * 1.01, (step / plan.floor_flops, plan.parts())
    # and no GEMM result is wider than fp32 (nothing in float64)
    assert {g.out_dtype for g in plan.gemms} <= {dtype, "float32"}


def test_gemm_count_is_the_documented_one(plans):
    """ε-DPO: forward policy 1 + reference 1, backward recompute 1 + ∂h 1 + ∂W 1, in units of N·H·V."""
    plan = plans("epsilon_dpo")
    unit = 2.0 * LLAMA3_8B["tokens"] * LLAMA3_8B["hidden"] * LLAMA3_8B["vocab"]
    by_role = {}
    for g in plan.gemms:
        by_role[g.role] = by_role.get(g.role, 0.0) + g.flops
    assert by_role == {
        "logits h·Wᵀ": unit,
        "reference h_ref·W_refᵀ": unit,
        "recompute h·Wᵀ": unit,
        "∂h = G·W": unit,
        "∂W = Gᵀ·h": unit,
    }


def test_epsilon_dpo_peak_memory_and_modelled_throughput(plans):
    plan = plans("epsilon_dpo")
    # bf16 gradients: ∂W [V, H] and ∂h [N, H], 2 bytes each
    grads = 2 * (LLAMA3_8B["vocab"] + LLAMA3_8B["tokens"]) * LLAMA3_8B["hidden"]
    assert plan.gradient_bytes == grads
    assert plan.retained_bytes == grads  # nothing but the gradients outlives the step
    assert plan.peak_bytes <= 1.6 * GIB, plan.peak_bytes / GIB
    assert plan.effective_tflops >= 650, plan.effective_tflops
    assert plans("epsilon_dpo", gpu="h200").effective_tflops >= plan.effective_tflops


def test_frozen_head_floor_is_three_gemms(plans):
    plan = plans("dpo", frozen_head=True)
    assert plan.floor_gemms == 3
    assert not any(g.role == "∂W = Gᵀ·h" for g in plan.gemms)
    assert plan.gradient_bytes == 2 * LLAMA3_8B["tokens"] * LLAMA3_8B["hidden"]


def test_every_gpu_names_its_source():
    for spec in GPUS.values():
        assert "datasheet" in spec.source and spec.tflops_16bit > spec.tflops_fp32 > 0
        # MI250X has no TF32
        assert spec.tflops_tf32 is None or spec.tflops_16bit > spec.tflops_tf32 > spec.tflops_fp32


# Datasheet peaks, written out here: (16-bit TFLOP/s dense, fp32 TFLOP/s, HBM TB/s, memory GB)
AMD_DATASHEETS = {
    "mi300x": (1307.4, 163.4, 5.3, 192),
    "mi325x": (1307.4, 163.4, 6.0, 256),
    "mi250x": (383.0 / 2, 95.7 / 2, 3.2768 / 2, 128 / 2),  # one GCD: half the package
}


@pytest.mark.parametrize("gpu", AMD_GPUS, ids=AMD_GPUS)
def test_amd_model_is_the_same_step_at_the_datasheet_peaks(plans, gpu):
    """The recorded step does not depend on the GPU; its roofline, recomputed here from the datasheet
    figures, is the plan's time."""
    h100, plan = plans("epsilon_dpo"), plans("epsilon_dpo", gpu=gpu)
    assert [(g.role, g.m, g.n, g.k, g.flops, g.bytes) for g in plan.gemms] == [
        (g.role, g.m, g.n, g.k, g.flops, g.bytes) for g in h100.gemms
    ]
    assert (plan.peak_bytes, plan.gradient_bytes) == (h100.peak_bytes, h100.gradient_bytes)
    tflops_16, tflops_32, tb_s, gb = AMD_DATASHEETS[gpu]
    spec = plan.gpu_spec
    assert (spec.tflops_16bit, spec.tflops_fp32, spec.memory_gb) == pytest.approx((tflops_16, tflops_32, gb))
    assert spec.hbm_tb_s == pytest.approx(tb_s)
    expected = sum(
        max(g.flops / ((tflops_32 if g.operands_32bit else tflops_16) * 1e12), g.bytes / (tb_s * 1e12))
        for g in plan.gemms
    ) + sum((r.bytes_read + r.bytes_written) / (tb_s * 1e12) for r in (*plan.kernels, *plan.other))
    assert plan.step_time_s == pytest.approx(expected, rel=1e-12)
    assert plan.floor_time_s == pytest.approx(plan.floor_flops / (tflops_16 * 1e12), rel=1e-12)


def test_amd_cli_prints_the_model_its_source_and_what_is_unverified(tmp_path, capsys):
    path = tmp_path / "plan.json"
    argv = ["plan", "--loss", "dpo", "--tokens", "512", "--hidden", "256", "--vocab", "1000"]
    assert cli.main([*argv, "--gpu", "mi300x", "--json", str(path)]) == 0
    text = capsys.readouterr().out
    assert "MODEL" in text and "not a measurement" in text and "ROCm" in text
    assert "datasheet" in text and "1307.4" in text and "unverified on ROCm" in text
    assert "out_dtype" in text
    data = json.loads(path.read_text())
    assert data["gpu"] == "mi300x" and data["rocm_unverified"] == list(ROCM_UNVERIFIED)
    assert cli.main([*argv, "--gpu", "h100", "--json", str(path)]) == 0
    assert "rocm_unverified" not in json.loads(path.read_text())
    assert "ROCm" not in capsys.readouterr().out


def test_cli_prints_a_model_and_writes_json(tmp_path, capsys):
    path = tmp_path / "plan.json"
    assert (
        cli.main(
            [
                "plan",
                "--loss",
                "dpo",
                "--tokens",
                "512",
                "--hidden",
                "256",
                "--vocab",
                "1000",
                "--gpu",
                "a100",
                "--json",
                str(path),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "MODEL" in text and "not a measurement" in text and "effective" in text
    data = json.loads(path.read_text())
    assert "MODEL" in data["model"]
    assert data["loss"] == "dpo" and data["gpu"] == "a100" and data["floor_gemms"] == 4
    assert data["effective_tflops"] == pytest.approx(data["floor_flops"] / data["step_time_s"] / 1e12)
    assert data["gemms"] and data["kernels"] and data["parts"]
    assert {"role", "m", "n", "k", "a_dtype", "b_dtype", "flops", "time_s"} <= set(data["gemms"][0])
    assert {"name", "bytes_read", "bytes_written", "time_s"} <= set(data["kernels"][0])
    assert data["gpu_spec"]["source"]


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--loss", "kto"], "--loss"),
        (["--tokens", "0"], "--tokens"),
        (["--tokens", "many"], "--tokens"),
        (["--hidden", "-4"], "--hidden"),
        (["--vocab", "1.5"], "--vocab"),
        (["--dtype", "int8"], "--dtype"),
        (["--gpu", "v100"], "--gpu"),
    ],
    ids=["loss", "tokens-zero", "tokens-text", "hidden", "vocab", "dtype", "gpu"],
)
def test_cli_bad_arguments_name_the_argument(argv, named, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["plan", *argv])
    assert exc.value.code == 2
    assert named in capsys.readouterr().err


def test_cli_odd_tokens(capsys):
    assert cli.main(["plan", "--tokens", "7"]) == 2
    assert "--tokens" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"loss": "kto"}, "`loss`"),
        ({"tokens": 0}, "`tokens`"),
        ({"tokens": 9}, "`tokens`"),
        ({"hidden": 2.0}, "`hidden`"),
        ({"dtype": "int8"}, "`dtype`"),
        ({"gpu": "v100"}, "`gpu`"),
    ],
    ids=["loss", "tokens", "odd-tokens", "hidden", "dtype", "gpu"],
)
def test_plan_step_bad_arguments(kwargs, named):
    with pytest.raises(ValueError, match=named):
        plan_step(**kwargs)
