"""DDP, FSDP2 and DeepSpeed ZeRO-3 on 2 CPU processes (gloo) == one unsharded process, merged batch.

`tests/workers/engines_worker.py` trains for 2 optimizer steps of 2 micro-batches through
`prefloss.hf.preference_loss` under each configuration below (the worker's ``CONFIGS``). The plain
fp32 configuration of each engine trains α-DPO (α: running statistics all-reduced over ranks), ε-DPO
(ε: per-pair β steps) and DPO; each variant, which changes how the engine holds the parameters,
trains one loss, rotated so that each loss meets several variants:

* DDP: ``ddp`` (all three); ``ddp-packed`` (α);
* FSDP2: the head in the root unit, root kept after forward (``fsdp2-root``, all three) or
  resharded (``-root-raf``, ε); the head in its own unit, resharded after forward (``-head``, DPO)
  or kept (``-head-keep``, α); tied embeddings (``-tied-raf``, ε); bf16 ``MixedPrecisionPolicy``
  with fp32 reduction (``-root-raf-bf16``, α; ``-head-bf16``, DPO); LoRA (``-lora-raf``, α);
  packed rows (``-root-raf-packed``, ε);
* DeepSpeed ZeRO-3: ``zero3`` (all three); tied embeddings (``-tied``, DPO); bf16 (``-bf16``, ε);
  LoRA (``-lora``, α); a mixture-of-experts model (``-moe``, DPO); packed rows (``-packed``, ε).

LoRA: PEFT adapters on q/v, the head trained through ``modules_to_save``, the reference being the
same model with adapters disabled (`prefloss.hf.AdaptersDisabled`). MoE: a tiny Mixtral with its
routers' load-balancing loss (`prefloss.hf.moe`), against one process computing each rank's rows in
turn (the aux loss is per rank; see the worker's docstring): losses, aux losses, gradients and
weights. Packed: ``preference_loss(padding_free=True)``, each rank packing its rows into one row,
against one process packing the merged batch, which itself trains as the padded one (equal in
float64: tests/test_hf_packing.py; here in fp32 within the rounding α-DPO amplifies).

Each is compared with one process without any engine on the merged batch, which trains only the
losses compared with it: fp32 for the fp32 runs; for the bf16 runs, the same computation in bf16
(params cast as FSDP2 casts them, or the whole module as DeepSpeed does). fp32 runs must agree to
float round-off; bf16 runs must be as close to the fp32 baseline as the one-process bf16
computation is (bf16 rounding of per-rank gradients is allowed, nothing more).

Also checked: the policy starts equal to the reference (prepared by the engine, in the policy's
compute dtype), so the first micro-batch's DPO/ε-DPO rewards are exactly 0 and α-DPO's statistics
stay exactly 0 after the first step (every configuration, whichever loss it trains); prefloss gathers
a sharded head at most twice per forward (policy and reference, never per chunk: the loss runs 8-row
chunks) and at most once per backward, and does gather where the engine resharded it.
"""

from __future__ import annotations

import math

import pytest
import torch

LOSSES = ("alpha_dpo", "epsilon_dpo", "dpo")
MICRO_BATCHES = 4
# prefloss's own gathers of a sharded head over the 4 micro-batches, (forward, backward). The
# reference is resharded after every forward, so it is gathered once per micro-batch everywhere but
# DDP; the policy's head once in forward and once in backward where the engine resharded it, never
# where the engine keeps it whole after the forward. (Tied embeddings under ZeRO-3: DeepSpeed keeps
# the shared weight available at times, so only the upper bound holds.)
EXPECTED_GATHERS = {
    "ddp": (0, 0),
    "ddp-packed": (0, 0),
    "fsdp2-root-raf-packed": (8, 4),
    "zero3-packed": (8, 4),
    "fsdp2-root": (4, 0),
    "fsdp2-head-keep": (4, 0),
    **dict.fromkeys(
        ["fsdp2-root-raf", "fsdp2-head", "fsdp2-tied-raf", "fsdp2-root-raf-bf16", "fsdp2-head-bf16"], (8, 4)
    ),
    "zero3": (8, 4),
    "zero3-bf16": (8, 4),
    "zero3-lora": (8, 4),
    "zero3-moe": (8, 4),
    # LoRA: the trained head copy (modules_to_save) and the reference's original head share the
    # root unit, so one unshard serves both
    "fsdp2-lora-raf": (4, 4),
}


@pytest.fixture(scope="module")
def single(engine_results) -> dict:
    return engine_results("engines", "single")


def _baseline(config: str) -> str:
    if config.endswith("-packed"):
        return "fp32-packed"
    if "bf16" in config:
        return "bf16-params" if config.startswith("fsdp2") else "bf16-module"
    for variant in ("tied", "lora", "moe"):
        if variant in config:
            return f"fp32-{variant}"
    return "fp32"


def _grad_errors(run: dict, base: dict, key: str) -> dict[str, float]:
    """Per parameter, the largest relative (norm) error over the steps."""
    errors = {}
    for step, expected in enumerate(base[key]):
        got = run[key][step]
        assert got.keys() == expected.keys(), f"{key}: parameters differ: {got.keys() ^ expected.keys()}"
        for name, e in expected.items():
            err = float((got[name] - e).norm() / e.norm().clamp(min=1e-30))
            errors[name] = max(errors.get(name, 0.0), err)
    return errors


def _state_error(run: dict, base: dict) -> float:
    return max(
        (
            float((got[k].double() - exp[k].double()).abs().max())
            for got, exp in zip(run["states"], base["states"], strict=True)
            for k in exp
        ),
        default=0.0,
    )


def _check_fp32(config: str, loss: str, run: dict, base: dict) -> None:
    torch.testing.assert_close(
        run["losses"], base["losses"], rtol=2e-5, atol=2e-6, msg=f"{config}/{loss} loss"
    )
    for key, bound in (("grads", 2e-5), ("params", 1e-5)):
        worst = max(_grad_errors(run, base, key).items(), key=lambda kv: kv[1])
        assert worst[1] <= bound, f"{config}/{loss}: {key} of {worst[0]} off by {worst[1]:.3g} (rel)"
    assert _state_error(run, base) <= 1e-6, f"{config}/{loss}: loss state differs"
    if "aux" in base:
        torch.testing.assert_close(run["aux"], base["aux"], rtol=2e-5, atol=2e-6, msg=f"{config} aux loss")


def _check_bf16(config: str, loss: str, run: dict, base: dict, fp32: dict) -> None:
    """As close to the fp32 baseline as the one-process bf16 computation, and close to the latter."""
    budget = float((base["losses"] - fp32["losses"]).abs().max())
    err = float((run["losses"] - fp32["losses"]).abs().max())
    assert err <= 1.5 * budget + 1e-3, (
        f"{config}/{loss}: loss off fp32 by {err:.3g}, bf16 itself {budget:.3g}"
    )
    for key in ("grads", "params"):
        budget = max(_grad_errors(base, fp32, key).values())
        worst = max(_grad_errors(run, fp32, key).items(), key=lambda kv: kv[1])
        assert worst[1] <= 1.5 * budget + 1e-3, (
            f"{config}/{loss}: {key} of {worst[0]} off fp32 by {worst[1]:.3g} (rel), bf16 itself {budget:.3g}"
        )
        near = max(_grad_errors(run, base, key).values())
        assert near <= 3e-2, f"{config}/{loss}: {key} off the one-process bf16 run by {near:.3g}"
    budget = _state_error(base, fp32)
    assert _state_error(run, fp32) <= 1.5 * budget + 1e-4, f"{config}/{loss}: loss state off"


def test_baselines_are_informative(single) -> None:
    """The comparisons below can fail: the states move, bf16 is measurably not fp32."""
    fp32 = single["fp32"]
    assert set(fp32) == set(LOSSES), fp32.keys()
    assert float(fp32["epsilon_dpo"]["states"][-1]["beta"]) != 0.5, "ε-DPO's β never moved"
    assert float(fp32["alpha_dpo"]["states"][-1]["running_std"]) > 0, "α-DPO's statistics never moved"
    assert fp32["dpo"]["losses"][-1] != fp32["dpo"]["losses"][0], "training did not move the policy"
    packed_losses = single["fp32-packed"]
    assert packed_losses, "no packed baseline"
    for loss, packed in packed_losses.items():  # packed == padded in fp32 (float64: test_hf_packing.py)
        padded = fp32[loss]
        torch.testing.assert_close(packed["losses"], padded["losses"], rtol=2e-5, atol=2e-6, msg=loss)
        worst = max(_grad_errors(packed, padded, "grads").values())
        assert worst <= 1e-4, f"{loss}: packed gradients off the padded ones by {worst:.3g} (rel)"
    for bf16 in ("bf16-params", "bf16-module"):
        assert single[bf16], f"no {bf16} baseline"
        for loss, run in single[bf16].items():
            assert max(_grad_errors(run, fp32[loss], "grads").values()) > 1e-3, f"{bf16}/{loss} is fp32"
    # The MoE's loss holds its aux loss: policy == reference at the first micro-batch, so DPO's part
    # is exactly log 2; and the routers moved the aux loss.
    moe = single["fp32-moe"]["dpo"]
    first = math.log(2) + moe["aux_coef"] * float(moe["aux"][0])
    assert abs(float(moe["losses"][0]) - first) <= 1e-6, (moe["losses"][0], first)
    assert moe["aux"].min() > 1.0 and moe["aux"][-1] != moe["aux"][0]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["ddp", "fsdp2", "zero3"], ids=["ddp", "fsdp2", "zero3"])
def test_two_ranks_match_one_process(family, single, engine_results) -> None:
    results = engine_results("engines", family)
    plain = {"ddp": "ddp", "fsdp2": "fsdp2-root", "zero3": "zero3"}[family]
    missing = {c for c in EXPECTED_GATHERS if c.split("-")[0] == family} - results.keys()
    assert not missing, f"configurations not run: {sorted(missing)}"
    assert set(results[plain]) == set(LOSSES), f"{plain} trains {sorted(results[plain])}"
    for config, per_loss in results.items():
        assert per_loss, f"{config} trains no loss"
        for loss in per_loss:  # all of LOSSES in the plain configuration, one in each variant
            baseline = single[_baseline(config)]
            assert loss in baseline, f"{config}/{loss}: the baseline {_baseline(config)} has no {loss}"
            run, base = per_loss[loss], baseline[loss]
            if "bf16" in config:
                _check_bf16(config, loss, run, base, single["fp32"][loss])
            else:
                _check_fp32(config, loss, run, base)
            # Policy == reference at the start, computed by the same engine in the same dtype.
            if loss == "alpha_dpo":
                state = run["states"][0]
                assert float(state["running_mean"]) == 0.0 and float(state["running_std"]) == 0.0, config
            else:
                assert run["zero_rewards_at_start"], f"{config}/{loss}: policy == reference, rewards ≠ 0"
            forward, backward = run["gathers"]
            assert forward <= 2 * MICRO_BATCHES and backward <= MICRO_BATCHES, (
                f"{config}/{loss}: {forward} forward / {backward} backward gathers in {MICRO_BATCHES} "
                "micro-batches"
            )
            if config in EXPECTED_GATHERS:
                assert (forward, backward) == EXPECTED_GATHERS[config], f"{config}/{loss}: gathers"
