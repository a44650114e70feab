"""Data parallelism through the Trainer/accelerate: 2 CPU processes (gloo) == 1 process, merged batch.

A worker script (written to ``tmp_path``, run there so the repo's ``kernels/`` folder is never on
``sys.path``) trains α-DPO and ε-DPO for 2 optimizer steps of 2 micro-batches each, sequential
sampling, plain SGD (Adam's normalisation would magnify float round-off in near-zero gradients).
With 2 ranks of B pairs per micro-batch, accelerate gives rank r the batches r, r+2, ..., so each
micro-batch of the 2 ranks together holds exactly the pairs of the single process's micro-batch
of 2B pairs. The loss, the synchronised gradients at the first optimizer step, the loss state
(α-DPO's running statistics, ε-DPO's β; exact fp32 comparisons, so that β moves at step 1) and
the final weights must agree. The one-process run trains its two losses in two forked processes,
each alone (both cores).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

WORKER = r"""
import json, os, sys
import torch
import transformers
from transformers import TrainerCallback

transformers.logging.set_verbosity_error()
from prefloss.data import synthetic_preferences_path
from prefloss.hf import PreferenceConfig, PreferenceTrainer
from prefloss.hf.tiny import byte_level_tokenizer, tiny_llama

B = 2


class GradSnapshot(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            params = model.named_parameters()
            self.grads = {n: p.grad.detach().clone() for n, p in params if p.grad is not None}


EPS = {"epsilon": 0.3, "beta": 0.5, "loss_kwargs": {"compare_dtype": None}}
LOSSES = {"alpha_dpo": {}, "epsilon_dpo": EPS}


def run(world_size, out_dir, losses=tuple(LOSSES), name=None):
    torch.manual_seed(0)
    rows = [json.loads(line) for line in open(synthetic_preferences_path("train"))][:16]
    result = {}
    ddp = {"ddp_backend": "gloo"} if world_size > 1 else {}
    for loss in losses:
        extra = LOSSES[loss]
        tok = byte_level_tokenizer()
        model = tiny_llama(tok, hidden_size=32, intermediate_size=64, num_heads=2, seed=0)
        args = PreferenceConfig(
            output_dir=os.path.join(out_dir, loss), loss=loss, max_steps=2, gradient_accumulation_steps=2,
            per_device_train_batch_size=B * (2 // world_size), learning_rate=0.1, optim="sgd", report_to=[],
            use_cpu=True, max_length=48, save_strategy="no", logging_steps=1, disable_tqdm=True,
            train_sampling_strategy="sequential", seed=0, **ddp, **extra,
        )
        snapshot = GradSnapshot()
        trainer = PreferenceTrainer(
            model, args=args, train_dataset=rows, processing_class=tok, callbacks=[snapshot]
        )
        trainer.train()
        assert trainer.accelerator.num_processes == world_size, trainer.accelerator.num_processes
        logs = [h for h in trainer.state.log_history if "loss" in h]
        result[loss] = {
            "loss": torch.tensor([h["loss"] for h in logs]),
            "accuracy": torch.tensor([h["rewards/accuracies"] for h in logs]),
            "grads": snapshot.grads,
            "state": {k: v.clone() for k, v in trainer.loss_fn.state_dict().items()},
            "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        }
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(result, os.path.join(out_dir, name or f"world{world_size}.pt"))


def single_worker(part, parts, out_dir):
    # one process alone, no process group: this part's losses of the one-process run
    torch.set_num_threads(1)
    run(1, out_dir, tuple(LOSSES)[part::parts], f"world1-{part}.pt")


def ddp_worker(rank, world_size, out_dir, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run(world_size, out_dir)


if __name__ == "__main__":
    world_size, out_dir, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    if world_size == 1:  # the two losses in two forked processes, each alone: both cores
        torch.multiprocessing.start_processes(single_worker, args=(2, out_dir), nprocs=2, start_method="fork")
        parts = [torch.load(os.path.join(out_dir, f"world1-{i}.pt"), weights_only=False) for i in range(2)]
        torch.save({**parts[0], **parts[1]}, os.path.join(out_dir, "world1.pt"))
    else:
        # fork: the children inherit the imports above instead of importing them again
        torch.multiprocessing.start_processes(
            ddp_worker, args=(world_size, out_dir, port), nprocs=world_size, start_method="fork"
        )
"""


def _run_worker(tmp_path, world_size: int, subprocess_env, free_port) -> dict:
    env = subprocess_env(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"
    )
    script = tmp_path / "ddp_worker.py"
    script.write_text(WORKER)
    proc = subprocess.run(
        [sys.executable, str(script), str(world_size), str(tmp_path), str(free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, (
        f"world size {world_size} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return torch.load(tmp_path / f"world{world_size}.pt", weights_only=False)


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_merged_batch(tmp_path, subprocess_env, free_port) -> None:
    single = _run_worker(tmp_path, 1, subprocess_env, free_port)
    ddp = _run_worker(tmp_path, 2, subprocess_env, free_port)
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
