"""`prefloss.trl.DPOTrainer` under DeepSpeed ZeRO-3 and FSDP2 (2 CPU processes, gloo) == one process.

`tests/workers/trl_engines_worker.py` trains DPO (``loss_type="sigmoid"``) and ε-DPO for 3
optimizer steps of 4 pairs (2 per rank; one process: all 4), plain SGD, with a reference model given
as ``ref_model`` and prepared by TRL itself (``prepare_deepspeed`` / ``prepare_fsdp`` in
``trl.DPOTrainer.__init__``). Checked here:

* the engine really ran: 2 processes; the policy's head is a ZeRO-3 ``[0]`` placeholder / an FSDP2
  ``DTensor`` shard of half the rows, and so is the reference's (a ``DeepSpeedEngine`` / a
  ``fully_shard``-ed model, as TRL prepares it), never an unsharded copy;
* each step's logged loss, gradient norm (before clipping), rewards and log-probs equal the
  one-process run's, and ε-DPO's β -- updated once per step from the steps of all pairs on all ranks --
  ends the same.

Found while writing it (TRL 1.16, accelerate 1.16, DeepSpeed 0.19.8, torch 2.13 CPU): TRL's
DPOTrainer and prefloss.trl's run under both engines unchanged; TRL's ZeRO-3 reference config sets
``stage3_param_persistence_threshold`` to ``10·hidden_size`` (320 here), which still partitions the
head. The one limit is accelerate's, not TRL's: on CPU it runs FSDP settings as DDP (its state turns to
FSDP only for GPU-type devices), so the worker sets the FSDP state by hand right after the Trainer
creates its accelerator, as accelerate does on GPUs (see the worker's docstring). Not covered: bf16
(TRL's default ``bf16=True``), gradient accumulation, PEFT and ``precompute_ref_log_probs`` under an
engine, and `prefloss.trl.CPOTrainer` under an engine.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("deepspeed")

RUNS = ("sigmoid", "epsilon_dpo")
STEPS = [1, 2, 3]
VOCAB = 259  # prefloss.hf.tiny.byte_level_tokenizer: 256 bytes + BOS, EOS, PAD
# The runs differ only in the order of fp32 reductions: micro-batches of 2 pairs instead of 4 (other
# padding, other GEMM blocking), gradients summed across ranks by an all-reduce / reduce-scatter
# instead of within one batch, and a gradient norm assembled from shards. At step 1 that is a few
# u·√K relative (u = 6e-8, K ≤ 10³ terms: ≤ 2e-6); the steps after add the weights' drift, a
# lr = 0.5 step (clipped to norm 1) of a gradient that differs by ~1e-6 relative, which moves the loss
# by about grad_norm·lr·1e-6 ≈ 4e-6. Measured: ≤ 3e-6 relative on loss and grad_norm, ≤ 3e-6
# absolute on rewards, 1 ulp on the log-prob sums (≈ -98). 2e-5 leaves 5× over that; a real error is
# far larger (a gradient not averaged over ranks doubles grad_norm; another pair in a step moves the
# rewards by 1e-2 or more).
RTOL = ATOL = 2e-5


@pytest.fixture(scope="module")
def single(engine_results) -> dict:
    return engine_results("trl", "single")


def test_single_process_baseline_trains(single) -> None:
    """The baseline: one process, unsharded heads, a plain reference; the runs move (the comparison
    below would prove little on constant values), and ε-DPO's β was updated."""
    assert single.keys() == set(RUNS)
    for run, result in single.items():
        assert result["processes"] == 1 and result["steps"] == STEPS, run
        assert result["reference"] == "LlamaForCausalLM", result["reference"]
        assert result["policy_head"]["local_shape"] == (VOCAB, 32) == result["ref_head"]["local_shape"]
        loss = result["logged"]["loss"]
        assert len(set(loss.tolist())) == len(STEPS), loss
    beta = single["epsilon_dpo"]["logged"]["kl/beta"]
    assert beta[0] == 0.5 and beta[-1] != 0.5, beta


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero3", "fsdp2"], ids=["zero3", "fsdp2"])
def test_dpo_trainer_under_engine_matches_one_process(engine, single, engine_results) -> None:
    results = engine_results("trl", engine)
    assert results.keys() == single.keys()
    for run, got in results.items():
        base = single[run]
        assert got["processes"] == 2, (engine, run, got["processes"])
        for head in ("policy_head", "ref_head"):
            if engine == "zero3":
                assert got[head]["zero3"] and got[head]["local_shape"] == (0,), (run, head, got[head])
            else:
                assert got[head]["type"] == "DTensor", (run, head, got[head])
                assert got[head]["local_shape"] == ((VOCAB + 1) // 2, 32), (run, head, got[head])
        reference = "DeepSpeedEngine" if engine == "zero3" else "FSDPLlamaForCausalLM"
        assert got["reference"] == reference, (run, got["reference"])
        assert got["steps"] == STEPS, got["steps"]
        assert got["logged"].keys() == base["logged"].keys()
        for name, value in base["logged"].items():
            torch.testing.assert_close(
                got["logged"][name], value, rtol=RTOL, atol=ATOL, msg=f"{engine}/{run}: {name}"
            )
        # ε-DPO's β follows from each step's mean s (integers, summed across ranks in fp64): equal, not
        # close; one flipped s would move that mean by 1/4 and β by 4 % or more
        assert got["state"].keys() == base["state"].keys()
        for key, value in base["state"].items():
            assert torch.equal(got["state"][key], value), (engine, run, key, got["state"][key], value)
