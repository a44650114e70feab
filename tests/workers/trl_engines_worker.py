"""Worker for tests/test_trl_engines.py: `prefloss.trl.DPOTrainer` in one process, or under DeepSpeed
ZeRO-3 or FSDP2 on two gloo processes.

    python trl_engines_worker.py ENGINE OUT_DIR PORT

ENGINE: ``single`` (one process, no engine: the baseline), ``zero3`` or ``fsdp2`` (two processes).
Each run of `RUNS` trains the tiny Llama policy (seed 0) against a tiny Llama reference (seed 1) for
`STEPS` optimizer steps of `PAIRS` pairs in all (one micro-batch per rank: ``PAIRS // world`` pairs
each), plain SGD, the pairs in their order. Accelerate hands rank r the r-th micro-batch of each
step, so one step sees the same pairs in every configuration. Rank 0 saves the logged per-step
values, the loss state after training and what the engine did (the policy's and the reference's head
types and shapes, the reference's wrapper type, the number of processes) to ``OUT_DIR/ENGINE.pt``.
The ``single`` runs are shared out over 2 processes, each training its runs alone (`main_single`).

The reference is TRL's: the ``ref_model`` given is prepared by ``trl.DPOTrainer.__init__`` with
TRL's own ``prepare_deepspeed`` (ZeRO-3: a ``DeepSpeedEngine`` with TRL's inference config) or
``prepare_fsdp`` (FSDP2: one ``fully_shard`` on the whole model); prefloss.trl only reads it.

How each engine is reached on CPU (accelerate 1.16):
* ZeRO-3: ``DPOConfig(deepspeed=..., use_cpu=True)`` runs real ZeRO-3 over gloo as it is. The
  models are built before the config: ``TrainingArguments(deepspeed=...)`` switches ``from_config``
  to ``deepspeed.zero.Init``, which would read a world size of 1 here.
* FSDP2: accelerate runs FSDP settings as DDP on CPU (its state turns to FSDP only for GPU-type
  devices). `FSDP2OnCPU` sets the state accelerate sets on GPUs -- ``fsdp_plugin``, distributed type
  FSDP, ``is_fsdp_enabled`` -- right after the Trainer creates its accelerator, before TRL's
  ``__init__`` prepares the reference (``prepare_fsdp``) and before accelerate's own FSDP2
  preparation shards the policy when training starts (``fully_shard`` per decoder layer, then the
  root).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from worker_setup import distributed_env, engine_arguments, launch, merge_parts  # noqa: E402

RUNS = {
    "sigmoid": {"loss_type": "sigmoid", "beta": 0.5},
    # compare_dtype=None: ε-DPO's steps s ∈ {-1, 0, 1} from an exact fp32 comparison, so that rounding
    # differences between the configurations cannot flip a bf16-rounded tie
    "epsilon_dpo": {
        "loss_type": "epsilon_dpo",
        "beta": 0.5,
        "epsilon": 0.3,
        "loss_kwargs": {"compare_dtype": None},
    },
}
PAIRS, STEPS = 4, 3
LOGGED = ("loss", "grad_norm", "rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen")


def trainer_class(engine: str) -> type:
    import prefloss.trl as ptrl

    if engine != "fsdp2":
        return ptrl.DPOTrainer

    class FSDP2OnCPU(ptrl.DPOTrainer):
        """What accelerate does on GPUs, done by hand: its CPU path ignores the FSDP settings."""

        def create_accelerator_and_postprocess(self) -> None:
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            super().create_accelerator_and_postprocess()
            state = self.accelerator.state
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            state.distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True

    return FSDP2OnCPU


def _head(model: torch.nn.Module) -> dict:
    from prefloss.hf.model import unwrap_model

    weight = unwrap_model(model).get_output_embeddings().weight
    return {
        "type": type(weight).__name__,
        "zero3": hasattr(weight, "ds_id"),
        "local_shape": tuple(getattr(weight, "_local_tensor", weight).shape),
    }


def train(engine: str, world: int, run: str, out_dir: str) -> dict:
    import datasets
    import transformers
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    import prefloss.trl as ptrl
    from prefloss.data import synthetic_preferences_path
    from prefloss.hf.tiny import byte_level_tokenizer, tiny_llama

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    unset_hf_deepspeed_config()  # the previous run's arguments would put from_config under zero.Init
    with open(synthetic_preferences_path("train")) as f:
        rows = [json.loads(line) for line in f][: PAIRS * STEPS]
    tok = byte_level_tokenizer()
    policy = tiny_llama(tok, hidden_size=32, seed=0)  # both before the config (see the docstring)
    ref = tiny_llama(tok, hidden_size=32, seed=1)
    args = ptrl.DPOConfig(
        output_dir=out_dir,
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        ddp_backend="gloo" if world > 1 else None,
        per_device_train_batch_size=PAIRS // world,
        max_steps=STEPS,
        optim="sgd",
        learning_rate=0.5,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        seed=0,
        **RUNS[run],
        **engine_arguments(engine),
    )
    trainer = trainer_class(engine)(
        model=policy,
        ref_model=ref,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    names = LOGGED + (("kl/beta",) if run == "epsilon_dpo" else ())
    return {
        "processes": trainer.accelerator.num_processes,
        "steps": [h["step"] for h in logs],
        "logged": {name: torch.tensor([h[name] for h in logs], dtype=torch.float64) for name in names},
        "state": {k: v.detach().clone().cpu() for k, v in trainer.loss_fn.state_dict().items()},
        "policy_head": _head(trainer.model_wrapped),
        "ref_head": _head(trainer.ref_model),
        "reference": type(trainer.ref_model).__name__,
    }


def main(rank: int, world: int, engine: str, out_dir: str, port: int) -> None:
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(distributed_env(rank, world, port))
    results = {run: train(engine, world, run, os.path.join(out_dir, run)) for run in RUNS}
    if rank == 0:
        torch.save(results, os.path.join(out_dir, f"{engine}.pt"))


def main_single(part: int, parts: int, out_dir: str) -> None:
    """Part ``part`` of ``parts`` of the one-process baseline: every ``parts``-th run of `RUNS`, trained
    by this process alone, so that the baseline uses both cores."""
    torch.set_num_threads(1)
    runs = list(RUNS)[part::parts]
    results = {run: train("single", 1, run, os.path.join(out_dir, run)) for run in runs}
    torch.save(results, os.path.join(out_dir, f"single-{part}.pt"))


def merge_single(out_dir: str, parts: int = 2) -> None:
    """``OUT_DIR/single.pt`` from the ``parts`` files `main_single` saved."""
    merge_parts(out_dir, RUNS, parts)


def preload(engine: str) -> tuple[str, ...]:
    """Modules the launcher imports before it forks the ranks, which then share them
    (`worker_setup.launch`)."""
    shared = ("datasets", "transformers.trainer", "prefloss.trl")
    return shared + (("deepspeed",) if engine == "zero3" else ())


if __name__ == "__main__":
    engine, out_dir, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if engine == "single":
        launch(main_single, (2, out_dir), preload=preload(engine))
        merge_single(out_dir)
    else:
        launch(main, (2, engine, out_dir, port), preload=preload(engine))
