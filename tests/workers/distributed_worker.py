"""Worker for tests/test_hf_distributed.py: `PreferenceTrainer` with plain data parallelism (DDP through
accelerate) on 2 gloo processes, or in one process on the merged batch.

    python distributed_worker.py ENGINE OUT_DIR PORT

ENGINE: ``single`` (one process per loss, its 4 pairs per micro-batch; the two losses in two forked
processes, each alone: `main_single`) or ``ddp`` (2 ranks of 2 pairs per micro-batch). α-DPO and
ε-DPO train 2 optimizer steps of 2 micro-batches each, sequential sampling, plain SGD. Saved (rank
0, ``OUT_DIR/ENGINE.pt``), per loss: the logged losses and reward accuracies, the synchronised
gradients at the first optimizer step, the loss state and the weights after training.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from transformers import TrainerCallback
from worker_setup import distributed_env, launch, merge_parts

B = 2  # pairs per rank and micro-batch; one process: 2 * B
EPS = {"epsilon": 0.3, "beta": 0.5, "loss_kwargs": {"compare_dtype": None}}
LOSSES = {"alpha_dpo": {}, "epsilon_dpo": EPS}  # loss -> its PreferenceConfig settings


class GradSnapshot(TrainerCallback):
    """The gradients at the first optimizer step, as the optimizer sees them (synchronised)."""

    def __init__(self) -> None:
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            params = model.named_parameters()
            self.grads = {n: p.grad.detach().clone() for n, p in params if p.grad is not None}


def train(world: int, out_dir: str, losses: tuple[str, ...]) -> dict:
    import transformers

    from prefloss.data import synthetic_preferences_path
    from prefloss.hf import PreferenceConfig, PreferenceTrainer
    from prefloss.hf.tiny import byte_level_tokenizer, tiny_llama

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    with open(synthetic_preferences_path("train")) as f:
        rows = [json.loads(line) for line in f][:16]
    result = {}
    ddp = {"ddp_backend": "gloo"} if world > 1 else {}
    for loss in losses:
        tok = byte_level_tokenizer()
        model = tiny_llama(tok, hidden_size=32, intermediate_size=64, num_heads=2, seed=0)
        args = PreferenceConfig(
            output_dir=os.path.join(out_dir, loss),
            loss=loss,
            max_steps=2,
            gradient_accumulation_steps=2,
            per_device_train_batch_size=B * (2 // world),
            learning_rate=0.1,
            optim="sgd",
            report_to=[],
            use_cpu=True,
            max_length=48,
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            train_sampling_strategy="sequential",
            seed=0,
            **ddp,
            **LOSSES[loss],
        )
        snapshot = GradSnapshot()
        trainer = PreferenceTrainer(
            model, args=args, train_dataset=rows, processing_class=tok, callbacks=[snapshot]
        )
        trainer.train()
        assert trainer.accelerator.num_processes == world, trainer.accelerator.num_processes
        logs = [h for h in trainer.state.log_history if "loss" in h]
        result[loss] = {
            "loss": torch.tensor([h["loss"] for h in logs]),
            "accuracy": torch.tensor([h["rewards/accuracies"] for h in logs]),
            "grads": snapshot.grads,
            "state": {k: v.clone() for k, v in trainer.loss_fn.state_dict().items()},
            "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        }
    return result


def main(rank: int, world: int, engine: str, out_dir: str, port: int) -> None:
    """Rank ``rank`` of ``world`` (2) under DDP; the Trainer joins the process group a job before it
    in this process set up (combined_worker.py), else sets one up."""
    assert engine == "ddp" and world == 2, (engine, world)
    os.environ.update(distributed_env(rank, world, port))
    torch.set_num_threads(1)
    result = train(world, out_dir, tuple(LOSSES))
    if rank == 0:
        torch.save(result, os.path.join(out_dir, "ddp.pt"))


def main_single(part: int, parts: int, out_dir: str) -> None:
    """Part ``part`` of ``parts`` of the one-process run: every ``parts``-th loss, this process alone."""
    torch.set_num_threads(1)
    result = train(1, out_dir, tuple(LOSSES)[part::parts])
    torch.save(result, os.path.join(out_dir, f"single-{part}.pt"))


def merge_single(out_dir: str, parts: int = 2) -> None:
    """``OUT_DIR/single.pt`` from the ``parts`` files `main_single` saved."""
    merge_parts(out_dir, LOSSES, parts)


def preload(engine: str) -> tuple[str, ...]:
    """Modules the launcher imports before it forks the ranks, which then share them
    (`worker_setup.launch`)."""
    return ("transformers.trainer", "accelerate", "prefloss.hf")


if __name__ == "__main__":
    engine, out_dir, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if engine == "single":
        launch(main_single, (2, out_dir), preload=preload(engine))
        merge_single(out_dir)
    else:
        launch(main, (2, engine, out_dir, port), preload=preload(engine))
