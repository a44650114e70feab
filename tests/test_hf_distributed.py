"""Data parallelism through the Trainer/accelerate: 2 CPU processes (gloo) == 1 process, merged batch.

`tests/workers/distributed_worker.py` (a job of the one-process and DDP launches of the engine
tests, `engine_results` in tests/conftest.py) trains α-DPO and ε-DPO for 2 optimizer steps of 2
micro-batches each, sequential sampling, plain SGD (Adam's normalisation would magnify float
round-off in near-zero gradients). With 2 ranks of B pairs per micro-batch, accelerate gives rank r
the batches r, r+2, ..., so each micro-batch of the 2 ranks together holds exactly the pairs of the
single process's micro-batch of 2B pairs. The loss, the synchronised gradients at the first
optimizer step, the loss state (α-DPO's running statistics, ε-DPO's β; exact fp32 comparisons, so
that β moves at step 1) and the final weights must agree.
"""

from __future__ import annotations

import pytest
import torch


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_merged_batch(engine_results) -> None:
    single, ddp = engine_results("distributed", "single"), engine_results("distributed", "ddp")
    for loss in ("alpha_dpo", "epsilon_dpo"):
        one, two = single[loss], ddp[loss]
        torch.testing.assert_close(two["loss"], one["loss"], atol=1e-5, rtol=1e-5, msg=f"{loss}: loss")
        torch.testing.assert_close(two["accuracy"], one["accuracy"], msg=f"{loss}: reward accuracy")
        assert one["grads"].keys() == two["grads"].keys() and one["grads"]
        for name, grad in one["grads"].items():
            torch.testing.assert_close(
                two["grads"][name], grad, atol=1e-6, rtol=1e-4, msg=f"{loss}: grad {name}"
            )
        assert one["state"].keys() == two["state"].keys()
        for name, value in one["state"].items():
            torch.testing.assert_close(
                two["state"][name], value, atol=1e-6, rtol=1e-5, msg=f"{loss}: state {name}"
            )
        for name, p in one["params"].items():
            torch.testing.assert_close(
                two["params"][name], p, atol=1e-5, rtol=1e-4, msg=f"{loss}: param {name}"
            )
    # The states must have moved, or the comparison says nothing.
    assert float(single["epsilon_dpo"]["state"]["beta"]) != 0.5
    assert any(
        float(v.abs().sum()) > 0 for v in single["alpha_dpo"]["state"].values() if v.is_floating_point()
    )
