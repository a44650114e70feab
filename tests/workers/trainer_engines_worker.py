"""Worker for tests/test_hf_trainer_engines.py: `PreferenceTrainer` under DDP, ZeRO-3 or FSDP2.

    python trainer_engines_worker.py ENGINE OUT_DIR PORT

ENGINE: ``ddp``, ``zero3`` or ``fsdp2``; two gloo processes on CPU. Each run of `RUNS` trains
`STEPS` optimizer steps of 2 micro-batches (2 pairs per rank each, plain SGD); α-DPO and ε-DPO
(`RESUMED`) train `RESUMED_STEPS`, save one checkpoint, at step `CHECKPOINT` (`CheckpointAt`), and
then train again from it in a new trainer, which runs the last step only; DPO runs with a live
reference and with precomputed reference log-probs; ε-DPO also with ``padding_free=True``. Rank 0
saves the logged losses and reward accuracies, the loss state at the start and after every step, and
what the engine did (the policy's head type after training, the reference's type) to
``OUT_DIR/ENGINE.pt``.

How each engine is reached on CPU (accelerate 1.16):
* ZeRO-3: ``TrainingArguments(deepspeed=..., use_cpu=True)`` runs real ZeRO-3 over gloo as it is.
  The model is built before the arguments: ``TrainingArguments(deepspeed=...)`` switches
  ``from_config`` to ``deepspeed.zero.Init``, which would read a world size of 1 here.
* FSDP2: accelerate runs FSDP settings as DDP on CPU (its state only turns to FSDP for GPU-type
  devices). The worker sets the state accelerate would have set -- ``fsdp_plugin``, distributed type
  FSDP -- after building the trainer, so that accelerate's own FSDP2 preparation shards the model
  (``fully_shard`` per decoder layer, then the root) when training starts.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from worker_setup import distributed_env, engine_arguments, launch  # noqa: E402

# run name -> PreferenceConfig settings; the first two are also resumed from their step-2 checkpoint
RUNS = {
    "alpha_dpo": {"loss": "alpha_dpo"},
    "epsilon_dpo": {
        "loss": "epsilon_dpo",
        "beta": 0.5,
        "epsilon": 0.3,
        "loss_kwargs": {"compare_dtype": None},
    },
    "epsilon_dpo_packed": {
        "loss": "epsilon_dpo",
        "beta": 0.5,
        "epsilon": 0.3,
        "loss_kwargs": {"compare_dtype": None},
        "padding_free": True,
    },
    "dpo": {"loss": "dpo", "beta": 0.5},
    "dpo_precomputed": {"loss": "dpo", "beta": 0.5, "precompute_ref_log_probs": True},
}
RESUMED = ("alpha_dpo", "epsilon_dpo")
# Steps 1-2 move the loss state (α-DPO's statistics stay 0 after step 1: the policy starts equal to
# the reference), so the checkpoint is at step 2 and the resumed runs need one step after it.
PAIRS, GAS, STEPS, CHECKPOINT, RESUMED_STEPS = 2, 2, 2, 2, 3
# engine settings of the checkpoint the resumed runs save and resume from, on top of
# worker_setup.engine_arguments
ZERO3_CHECKPOINTS = {"stage3_gather_16bit_weights_on_model_save": True}
FSDP2_CHECKPOINTS = {"state_dict_type": "SHARDED_STATE_DICT"}


def force_fsdp_on_cpu(trainer, args) -> None:
    """What accelerate does on GPUs, done by hand: its CPU path ignores the FSDP settings."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


class StateLog(TrainerCallback):
    """The loss state when training (re)starts and after every optimizer step of this run (the
    callback runs after PreferenceTrainer's own, which updates ε-DPO's β)."""

    def __init__(self, trainer) -> None:
        self.trainer, self.at_start, self.after_step = trainer, None, {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.at_start = snapshot(self.trainer.loss_fn)

    def on_step_end(self, args, state, control, **kwargs):
        self.after_step[state.global_step] = snapshot(self.trainer.loss_fn)


class CheckpointAt(TrainerCallback):
    """Saves at step ``step`` only: the Trainer would also save at the last step, which no run
    resumes from (runs after the Trainer's own flow callback, so it has the last word)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_save = state.global_step == self.step


def snapshot(module) -> dict:
    return {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}


def train(engine: str, run: str, out_dir: str, resume: str | None) -> dict:
    import transformers

    from prefloss.data import synthetic_preferences_path
    from prefloss.hf import PreferenceConfig, PreferenceTrainer
    from prefloss.hf.tiny import byte_level_tokenizer, tiny_llama

    transformers.logging.set_verbosity_error()
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # the previous run's arguments would put from_config under zero.Init
    rows = [json.loads(line) for line in open(synthetic_preferences_path("train"))][:32]
    tok = byte_level_tokenizer()
    model = tiny_llama(tok, hidden_size=32, intermediate_size=64, num_heads=2, seed=0)  # before the args
    resumes = run in RESUMED
    args = PreferenceConfig(
        output_dir=out_dir,
        max_steps=RESUMED_STEPS if resumes else STEPS,
        gradient_accumulation_steps=GAS,
        per_device_train_batch_size=PAIRS,
        learning_rate=0.1,
        optim="sgd",
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        max_length=48,
        save_strategy="steps" if resumes else "no",
        save_steps=CHECKPOINT,
        logging_steps=1,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        seed=0,
        **RUNS[run],
        **engine_arguments(engine, zero_optimization=ZERO3_CHECKPOINTS, fsdp_config=FSDP2_CHECKPOINTS),
    )
    trainer = PreferenceTrainer(model, args=args, train_dataset=rows, processing_class=tok)
    states = StateLog(trainer)
    trainer.add_callback(states)
    if resumes:
        trainer.add_callback(CheckpointAt(CHECKPOINT))
    if engine == "fsdp2":
        force_fsdp_on_cpu(trainer, args)
    trainer.train(resume_from_checkpoint=resume)
    assert trainer.accelerator.num_processes == 2, trainer.accelerator.num_processes
    logs = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    from prefloss.hf.engines import unwrap_model

    head = unwrap_model(trainer.model_wrapped).get_output_embeddings().weight
    return {
        "steps": [h["step"] for h in logs],
        "loss": torch.tensor([h["loss"] for h in logs]),
        "accuracy": torch.tensor([h["rewards/accuracies"] for h in logs]),
        "state": {k: v.detach().clone().cpu() for k, v in trainer.loss_fn.state_dict().items()},
        "head": type(head).__name__ + (f" ds_numel={head.ds_numel}" if hasattr(head, "ds_id") else ""),
        "head_shape": tuple(getattr(head, "_local_tensor", head).shape),
        "reference": type(trainer.ref_model).__name__,
        "state_at_start": states.at_start,
        "state_after_step": states.after_step,  # {global step: loss state}
    }


def main(rank: int, world: int, engine: str, out_dir: str, port: int) -> None:
    """Rank ``rank`` of ``world`` (2) trains `RUNS` under ``engine``; the Trainer joins the process
    group a job before it in this process set up (combined_worker.py), else sets one up."""
    assert world == 2, world
    os.environ.update(distributed_env(rank, world, port))
    torch.set_num_threads(1)
    results = {}
    for run in RUNS:
        run_dir = os.path.join(out_dir, run)
        results[run] = {"full": train(engine, run, run_dir, None)}
        if run in RESUMED:
            checkpoint = os.path.join(run_dir, f"checkpoint-{CHECKPOINT}")
            results[run]["resumed"] = train(engine, run, run_dir, checkpoint)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, f"{engine}.pt"))


def preload(engine: str) -> tuple[str, ...]:
    """Modules the launcher imports before it forks the ranks, which then share them
    (`worker_setup.launch`)."""
    shared = ("transformers.trainer", "accelerate", "prefloss.hf")
    return shared + (("deepspeed",) if engine == "zero3" else ())


if __name__ == "__main__":
    engine, out_dir, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    launch(main, (2, engine, out_dir, port), preload=preload(engine))
