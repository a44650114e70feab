"""`PreferenceTrainer` under DeepSpeed ZeRO-3 and FSDP2 (2 CPU processes, gloo), with gradient
accumulation, a checkpoint and a resume; DDP is the baseline.

`tests/workers/trainer_engines_worker.py` trains α-DPO and ε-DPO for 3 optimizer steps of 2
micro-batches, checkpointing at step 2 (the first step after which both loss states have moved),
then trains again from ``checkpoint-2`` in a new trainer; the other runs train 2 steps without
checkpoints. Checked here:

* the engine really ran: the policy's head is a ZeRO-3 ``[0]`` placeholder / an FSDP2 ``DTensor``
  shard of half the rows, and the reference was prepared by the same engine (a ``DeepSpeedEngine``
  / a ``fully_shard``-ed model), never an unsharded copy;
* ZeRO-3 and FSDP2 log the same losses and reward accuracies as DDP, and reach the same loss state
  (α-DPO's running statistics, ε-DPO's β), for α-DPO, ε-DPO, DPO, and DPO with precomputed reference
  log-probs (which equal the live reference's under DDP), and for ε-DPO with ``padding_free=True``
  (which equals the padded run under DDP);
* the resumed run starts from the loss state saved at step 2 (not the initial one), runs only step
  3, and ends where the uninterrupted run ended.

FSDP2 on CPU: accelerate 1.16 runs FSDP settings as DDP on CPU, so the worker sets accelerate's
FSDP state by hand after building the trainer (see the worker's docstring); accelerate's own FSDP2
preparation then shards the model when training starts.
"""

from __future__ import annotations

import pytest
import torch

RESUMED = ("alpha_dpo", "epsilon_dpo")  # trained 3 steps with a checkpoint at step 2; the rest 2 steps


@pytest.fixture(scope="module")
def ddp(engine_results) -> dict:
    return engine_results("trainer", "ddp")


def _assert_states_close(got: dict, expected: dict, msg: str) -> None:
    assert got.keys() == expected.keys(), msg
    for key, value in expected.items():
        torch.testing.assert_close(
            got[key].double(), value.double(), atol=1e-6, rtol=1e-5, msg=f"{msg}: {key}"
        )


def test_padding_free_equals_padded(ddp) -> None:
    """ε-DPO with ``padding_free=True`` (each rank packs its micro-batch) logs the padded run's losses
    and accuracies and ends with its β; the engines reproduce DDP's packed run in the test below."""
    padded, packed = ddp["epsilon_dpo"]["full"], ddp["epsilon_dpo_packed"]["full"]
    last = packed["steps"][-1]
    assert packed["steps"] == padded["steps"][:last] == [1, 2], (packed["steps"], padded["steps"])
    torch.testing.assert_close(packed["loss"], padded["loss"][:last], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(packed["accuracy"], padded["accuracy"][:last])
    _assert_states_close(packed["state_after_step"][last], padded["state_after_step"][last], "packed β")
    assert not torch.equal(packed["state_after_step"][last]["beta"], packed["state_at_start"]["beta"])


def test_precomputed_reference_equals_the_live_one(ddp) -> None:
    """DPO with precomputed reference log-probs (scored once by the initial policy) trains as with the
    live reference; the engines reproduce DDP's precomputed run in the test below."""
    live, precomputed = ddp["dpo"]["full"], ddp["dpo_precomputed"]["full"]
    assert precomputed["reference"] == "NoneType" and live["reference"] != "NoneType"
    torch.testing.assert_close(precomputed["loss"], live["loss"], atol=1e-5, rtol=1e-5)
    assert live["loss"][-1] != live["loss"][0]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero3", "fsdp2"], ids=["zero3", "fsdp2"])
def test_trainer_under_engine_matches_ddp_and_resumes(engine, ddp, engine_results) -> None:
    results = engine_results("trainer", engine)
    assert results.keys() == ddp.keys()
    for run, runs in results.items():
        full, base = runs["full"], ddp[run]["full"]
        if engine == "zero3":
            assert full["head"].startswith("Parameter ds_numel=") and full["head_shape"] == (0,), full["head"]
            reference = "DeepSpeedEngine"
        else:
            assert full["head"] == "DTensor" and full["head_shape"][0] < base["head_shape"][0], full
            reference = "FSDPLlamaForCausalLM"
        assert full["reference"] == ("NoneType" if run == "dpo_precomputed" else reference), full["reference"]
        assert full["steps"] == ([1, 2, 3] if run in RESUMED else [1, 2]), full["steps"]
        last = full["steps"][-1]
        torch.testing.assert_close(full["loss"], base["loss"], atol=2e-5, rtol=2e-5, msg=f"{engine}/{run}")
        torch.testing.assert_close(full["accuracy"], base["accuracy"], msg=f"{engine}/{run} accuracy")
        _assert_states_close(
            full["state_after_step"][last], base["state_after_step"][last], f"{engine}/{run} state"
        )
        assert ("resumed" in runs) == (run in RESUMED), (run, runs.keys())
        if run not in RESUMED:
            continue

        # The resumed run starts from step 2's loss state and trains step 3 only.
        resumed = runs["resumed"]
        assert sorted(resumed["state_after_step"]) == [3], resumed["state_after_step"].keys()
        _assert_states_close(
            resumed["state_at_start"], full["state_after_step"][2], f"{run}: state on resume"
        )
        initial = full["state_at_start"]
        assert any(not torch.equal(resumed["state_at_start"][k], initial[k]) for k in initial), (
            f"{run}: the state at step 2 equals the initial one; the resume check would prove nothing"
        )
        torch.testing.assert_close(resumed["loss"][2:], full["loss"][2:], atol=1e-6, rtol=1e-6, msg=run)
        _assert_states_close(resumed["state_after_step"][3], full["state_after_step"][3], f"{run}: final")
