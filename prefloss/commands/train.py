"""``prefloss train``: preference-train a causal LM with α-DPO (default), ε-DPO, DPO or SimPO.

Without arguments it trains a tiny Llama-style model (built from a config, ~0.4 M parameters) with
α-DPO on the synthetic preference data shipped in ``prefloss/data`` (instruction -> letter case, see
`prefloss.data`) and shows, on held-out pairs with unseen words, that the preference was learned.
``--model`` / ``--data`` take any local Hugging Face model directory / TRL-style JSONL instead.

Held-out metrics (before = the initial model, after = the trained one):

* preference accuracy: fraction of pairs whose chosen response has the higher mean per-token
  log-prob under the model (the reference-free reward of SimPO/α-DPO); ~50% for a model that ignores
  the prompt;
* implicit-reward accuracy: fraction of pairs with
  ``log π(y_w|x) − log π₀(y_w|x) > log π(y_l|x) − log π₀(y_l|x)`` (DPO's implicit reward, sums, π₀ the
  initial model = the reference);
* the margins: mean differences of the same two quantities.

One tie rule everywhere: a tie counts as wrong (strict ``>``), as in the losses' ``rewards/accuracies``,
TRL and the papers' code. So the implicit-reward accuracy is 0% at step 0 by construction (π = π₀:
every pair ties), and a model that gives both responses the same mean log-prob scores 0% preference
accuracy, not 50%.

Runs are not mixed: a non-empty ``--output-dir`` is refused unless ``--resume`` (continue its last
checkpoint, which must have the same ``--loss``) or ``--overwrite-output-dir`` (delete its
checkpoints first) is given; resuming a run that already reached ``--max-steps`` trains nothing. A
non-finite loss is logged as such and stops the run after ``--max-nonfinite-steps`` consecutive steps
(default 1, see `prefloss.hf.PreferenceConfig.max_nonfinite_steps`), exit status 1.

Outputs in ``--output-dir``: the trained model and tokenizer, checkpoints, ``metrics.json`` and
``curves.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefloss.commands.cli_args import (
    InputError,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)
from prefloss.losses import LOSSES as LOSS_CLASSES

DEFAULT_OUTPUT_DIR = "prefloss-output"
LOSS_NAMES = tuple(LOSS_CLASSES)  # the `--loss` choices


def _seed(text: str) -> int:
    """``--seed``: an integer in [0, 2**32 - 1], numpy's seed range (``transformers.set_seed`` seeds it)."""
    value = nonnegative_int(text)
    if value > 2**32 - 1:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32 - 1], got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``prefloss train``."""
    g = parser.add_argument_group("model and data")
    g.add_argument(
        "--model", default=None, help="local Hugging Face causal-LM directory (default: a tiny Llama)"
    )
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    g.add_argument(
        "--data", default=None, help="training JSONL with prompt/chosen/rejected (default: shipped)"
    )
    g.add_argument(
        "--eval-data", default=None, help="held-out JSONL (default: shipped eval split, or 10%% of --data)"
    )
    g.add_argument(
        "--max-length",
        type=positive_int,
        default=64,
        help="most tokens of prompt + response (default: %(default)s)",
    )
    g.add_argument(
        "--max-prompt-length", type=positive_int, default=None, help="prompt tokens kept when too long"
    )
    g.add_argument(
        "--prompt-bos",
        default="tokenizer",
        choices=("tokenizer", "always", "never"),
        help="BOS before each prompt: as the tokenizer puts it (default, like TRL), always, or never",
    )
    g.add_argument(
        "--overlong-prompts",
        default="error",
        choices=("error", "drop"),
        help="a prompt with no room for a response within --max-length: error (default) or drop the row",
    )
    g = parser.add_argument_group("loss")
    g.add_argument(
        "--loss", default="alpha_dpo", choices=LOSS_NAMES, help="preference loss (default: alpha_dpo)"
    )
    g.add_argument(
        "--beta", type=positive_float, default=None, help="β (default: the loss's published default)"
    )
    g.add_argument("--gamma-beta-ratio", type=nonnegative_float, default=None, help="γ/β (alpha_dpo, simpo)")
    g.add_argument("--alpha", type=nonnegative_float, default=None, help="α (alpha_dpo)")
    g.add_argument("--epsilon", type=positive_float, default=None, help="ε (epsilon_dpo)")
    g.add_argument("--precompute-ref", action="store_true", help="score the reference once, then drop it")
    g.add_argument(
        "--backend", default="auto", help="fused-op backend: auto, torch or triton (default: auto)"
    )
    g.add_argument("--chunk-size", type=positive_int, default=None, help="tokens per chunk of the fused op")
    g = parser.add_argument_group("LoRA (PEFT; the reference is the model with adapters disabled)")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights")
    g.add_argument("--lora-r", type=positive_int, default=8, help="LoRA rank (default: %(default)s)")
    g.add_argument(
        "--lora-alpha", type=positive_float, default=16.0, help="LoRA alpha (default: %(default)s)"
    )
    g.add_argument(
        "--lora-target-modules",
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        help="comma-separated module names to adapt (default: %(default)s; not lm_head)",
    )
    g = parser.add_argument_group("training")
    g.add_argument(
        "--max-steps", type=positive_int, default=100, help="optimizer steps (default: %(default)s)"
    )
    g.add_argument(
        "--batch-size", type=positive_int, default=8, help="pairs per micro-batch (default: %(default)s)"
    )
    g.add_argument(
        "--grad-accum",
        type=positive_int,
        default=1,
        help="micro-batches per optimizer step (default: %(default)s)",
    )
    g.add_argument(
        "--learning-rate", type=positive_float, default=1e-3, help="AdamW, constant after 10 warm-up steps"
    )
    g.add_argument(
        "--eval-steps",
        type=positive_int,
        default=50,
        help="held-out loss metrics every N steps (default: %(default)s)",
    )
    g.add_argument(
        "--save-steps", type=positive_int, default=50, help="checkpoint every N steps (default: %(default)s)"
    )
    g.add_argument("--seed", type=_seed, default=0, help="model init, data order (default: 0)")
    g.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 mixed precision (the Trainer's bf16; under DeepSpeed, 'auto' in its config follows it)",
    )
    g.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help="(default: %(default)s)")
    g.add_argument(
        "--resume",
        nargs="?",
        const="last",
        default=None,
        help="resume from a checkpoint (default: the last in --output-dir); its run must have used the "
        "same --loss. A run that already reached --max-steps trains nothing",
    )
    g.add_argument(
        "--overwrite-output-dir",
        action="store_true",
        help="start over in a non-empty --output-dir: delete its checkpoint-* folders first (without this "
        "or --resume, a non-empty --output-dir is an error: two runs' checkpoints would mix)",
    )
    g.add_argument(
        "--max-nonfinite-steps",
        type=positive_int,
        default=1,
        help="stop (exit status 1) after this many consecutive optimizer steps with a NaN/inf loss, "
        "before the last one's update (default: %(default)s: one such update makes the weights NaN)",
    )
    g.add_argument("--no-plot", action="store_true", help="do not write curves.png")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


# --------------------------------------------------------------------------------------------------
# Pieces


def _load_model_and_tokenizer(args: argparse.Namespace) -> tuple[Any, Any, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefloss.hf.tiny import byte_level_tokenizer, tiny_llama

    if args.model is None:
        tokenizer = (
            byte_level_tokenizer()
            if args.tokenizer is None
            else AutoTokenizer.from_pretrained(args.tokenizer)
        )
        return tiny_llama(tokenizer, seed=args.seed), tokenizer, "tiny Llama (from config, random init)"
    if not os.path.isdir(args.model):
        raise ValueError(f"--model must be a local Hugging Face model directory, got {args.model!r}")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model)
    return model, tokenizer, args.model


def _load_data(args: argparse.Namespace) -> tuple[Any, Any, str]:
    from prefloss.data import synthetic_preferences_path
    from prefloss.hf.data import load_preferences

    if args.data is None:
        train = load_preferences(str(synthetic_preferences_path("train")))
        held = load_preferences(str(args.eval_data or synthetic_preferences_path("eval")))
        return train, held, "shipped synthetic preferences (prefloss/data)"
    data = load_preferences(args.data)
    if args.eval_data is not None:
        return data, load_preferences(args.eval_data), args.data
    if len(data) < 10:
        raise ValueError(f"--data {args.data!r} has {len(data)} rows; give --eval-data or at least 10 rows")
    split = data.train_test_split(test_size=0.1, seed=args.seed)
    return split["train"], split["test"], f"{args.data} (10% held out)"


def _is_main_process() -> bool:
    """Rank 0 (or no launcher): ``accelerate launch`` / ``torchrun`` set ``RANK`` in every process."""
    return os.environ.get("RANK", "0") == "0"


def _checkpoint_to_resume(args: argparse.Namespace) -> str | None:
    """Check ``--output-dir`` against ``--resume`` / ``--overwrite-output-dir`` before any work runs.

    Returns the checkpoint to resume from, or ``None`` for a fresh run (after deleting the old run's
    checkpoints with ``--overwrite-output-dir``). Raises `InputError` for a non-empty ``--output-dir``
    without either flag, a missing checkpoint, or a checkpoint of another ``--loss``.
    """
    from transformers.trainer_utils import get_last_checkpoint

    from prefloss.hf.trainer import checkpoint_loss_name

    out = Path(args.output_dir)
    if args.resume is not None and args.overwrite_output_dir:
        raise InputError(
            "--resume continues the run in --output-dir and --overwrite-output-dir deletes it: give one"
        )
    if out.exists() and not out.is_dir():
        raise InputError(f"--output-dir {str(out)!r}: expected a directory, got a file")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if args.resume is None:
        if entries and not args.overwrite_output_dir:
            shown = ", ".join(entries[:4]) + (f", ... ({len(entries)} entries)" if len(entries) > 4 else "")
            raise InputError(
                f"--output-dir {str(out)!r} is not empty ({shown}): a new run there would mix its "
                "checkpoints with the old run's. Give --resume to continue the old run, "
                "--overwrite-output-dir to delete its checkpoints and start over, or another --output-dir"
            )
        old = [n for n in entries if n.startswith("checkpoint-") and (out / n).is_dir()]
        old += [n for n in entries if n in ("metrics.json", "curves.png")]
        if old and _is_main_process():
            for name in old:
                if (out / name).is_dir():
                    shutil.rmtree(out / name, ignore_errors=True)
                else:
                    (out / name).unlink(missing_ok=True)
            print(f"--overwrite-output-dir: deleted the previous run's {', '.join(old)} in {out}")
        return None
    if args.resume == "last":
        checkpoint = get_last_checkpoint(str(out)) if out.is_dir() else None
        if checkpoint is None:
            raise InputError(f"--resume: no checkpoint-<step> folder in --output-dir {str(out)!r} to resume")
    else:
        checkpoint = args.resume
        if not os.path.isdir(checkpoint):
            raise InputError(f"--resume {checkpoint!r}: expected a checkpoint directory, got no directory")
    saved = checkpoint_loss_name(checkpoint)
    if saved is not None and saved != args.loss:
        raise InputError(
            f"--resume {checkpoint!r}: that run was trained with --loss {saved}, this command has --loss "
            f"{args.loss}. Resume with --loss {saved}, or start the {args.loss} run in another --output-dir"
        )
    return checkpoint


def _checkpoint_step(checkpoint: str) -> int | None:
    """The optimizer step a checkpoint was saved at (its ``trainer_state.json``), ``None`` without one."""
    path = Path(checkpoint) / "trainer_state.json"
    if not path.is_file():
        return None
    return int(json.loads(path.read_text())["global_step"])


def heldout_metrics(scores: dict[str, Any], initial: dict[str, Any]) -> dict[str, float]:
    """Held-out preference metrics (module docstring) from `prefloss.hf.score_pairs` outputs."""
    mean_c = scores["chosen_logps"] / scores["chosen_length"].clamp(min=1)
    mean_r = scores["rejected_logps"] / scores["rejected_length"].clamp(min=1)
    reward_c = scores["chosen_logps"] - initial["chosen_logps"]
    reward_r = scores["rejected_logps"] - initial["rejected_logps"]
    # Ties count as wrong (strict >), as in `prefloss.losses.common`'s rewards/accuracies and TRL.
    return {
        "preference_accuracy": float((mean_c > mean_r).float().mean()),
        "preference_margin": float((mean_c - mean_r).mean()),
        "implicit_reward_accuracy": float((reward_c > reward_r).float().mean()),
        "implicit_reward_margin": float((reward_c - reward_r).mean()),
    }


@contextlib.contextmanager
def _quiet_native_output() -> Iterator[None]:
    """Silence file descriptors 1 and 2 for a moment: the profiler's native start/stop log lines
    (``USDT: ... profiler_start``) bypass Python's streams."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in (1, 2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            os.dup2(devnull, fd)
        yield
    finally:
        for fd, copy_ in zip((1, 2), saved, strict=True):
            os.dup2(copy_, fd)
            os.close(copy_)
        os.close(devnull)


def _cpu_peak_allocated(fn: Any) -> int:
    """Peak bytes allocated on CPU while ``fn()`` runs, above what was allocated when it began.

    From the allocator's own events as `torch.profiler` records them (``profile_memory=True``): every
    allocation and free, in order, compiled (Inductor) code included; views and in-place results
    allocate nothing and count nothing. Not a ``TorchDispatchMode``: any dispatch mode makes
    ``torch.compile`` fall back to eager for the rest of the process, and the torch backend's
    compiled tile arithmetic would then be measured running eagerly (docs/performance.md).
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_native_output():
        prof.start()
    try:
        fn()
    finally:
        with _quiet_native_output():
            prof.stop()
    cpu = torch._C._autograd.DeviceType.CPU
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type() == cpu:
            live += event.nbytes()
            peak = max(peak, live)
    return peak


def measure_peak_memory(fn: Any, device: Any) -> int:
    """Peak memory (bytes) of the tensors ``fn()`` allocates, its inputs excluded.

    CUDA: the allocator's peak above what was allocated before. CPU (torch keeps no allocator
    statistics there, and the process RSS does not grow when freed memory is reused): the peak of the
    allocator's live bytes above the start, from the profiler's allocation events
    (`_cpu_peak_allocated`), autograd's backward and compiled code included.
    """
    import torch

    fn()  # warm-up
    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    return int(_cpu_peak_allocated(fn))


def _loss_memory(trainer: Any) -> dict[str, Any]:
    """Peak memory of one loss forward+backward on a training batch: fused vs full logits."""
    import torch

    from prefloss.hf.engines import gathered_heads
    from prefloss.hf.model import decoder_hidden_states

    n = min(trainer.args.per_device_train_batch_size, len(trainer.train_dataset))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    device = trainer.args.device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    labels = batch["shift_labels"].to(device)
    ref_model = trainer.ref_model
    with torch.no_grad():
        hidden = decoder_hidden_states(trainer.model, ids, mask).detach()
        ref_hidden = decoder_hidden_states(ref_model, ids, mask).detach() if ref_model is not None else None
        # Whole copies of the heads (gathered under ZeRO-3/FSDP2): the measurement is of the op alone.
        with gathered_heads(trainer.model, ref_model) as heads:
            head = heads.policy
            weight = head.weight.detach().clone().requires_grad_(True)
            ref_head = heads.ref
            ref_weight = ref_head.weight.detach().clone() if ref_head is not None else None
    loss_fn = copy.deepcopy(trainer.loss_fn)
    kwargs: dict[str, Any] = head.fused_kwargs()
    if "ref_logps" in batch:
        kwargs["ref_logps"] = batch["ref_logps"].to(device)
    elif ref_hidden is not None:
        kwargs.update(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_head.bias)

    def fused() -> None:
        h = hidden.clone().requires_grad_(True)
        loss_fn(h, weight, labels, **kwargs).loss.backward()

    def full_logits() -> None:
        h = hidden.clone().requires_grad_(True)
        logits = h.float() @ weight.float().T
        if head.bias is not None:
            logits = logits + head.bias.float()
        if head.logit_scale is not None:
            logits = logits * head.logit_scale
        if head.softcap is not None:
            logits = head.softcap * torch.tanh(logits / head.softcap)
        valid = labels != -100
        logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        (logp * valid).sum().backward()

    return {
        "batch_shape": list(ids.shape),
        "vocab_size": int(weight.shape[0]),
        "full_logits_bytes": int(ids.numel() * weight.shape[0] * 4),
        "fused_loss_bytes": measure_peak_memory(fused, device),
        "full_logits_logprobs_bytes": measure_peak_memory(full_logits, device),
        "method": "CUDA max_memory_allocated"
        if device.type == "cuda"
        else "CPU allocator events (torch.profiler)",
    }


def _progress_callback(trainer: Any, total: int, quiet: bool) -> Any:
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """A progress bar showing the latest loss, train reward accuracy and β."""

        def __init__(self) -> None:
            self.bar = None
            self.start_step = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start_step = state.global_step
            if state.is_world_process_zero and not quiet:
                self.bar = tqdm(total=total, initial=state.global_step, desc="training", dynamic_ncols=True)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if self.bar is None or not logs or "loss" not in logs:
                return
            beta = logs.get("kl/beta", _current_beta(trainer))
            self.bar.set_postfix(
                loss=f"{logs['loss']:.4f}",
                acc=f"{logs.get('rewards/accuracies', float('nan')):.3f}",
                beta=f"{beta:.4g}",
            )

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return Progress()


def _float_or_none(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _current_beta(trainer: Any) -> float:
    beta = getattr(trainer.loss_fn, "beta", float("nan"))
    return float(beta)


def _plot(
    history: list[dict[str, Any]], before: dict[str, float], after: dict[str, float], steps: int, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot([h["step"] for h in train], [h["loss"] for h in train], label="train loss")
    if evals:
        ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_title("loss")
    ax.legend()
    ax = axes[1]
    ax.plot(
        [h["step"] for h in train],
        [h.get("rewards/accuracies") for h in train],
        label="train reward accuracy",
    )
    if evals:
        ax.plot(
            [h["step"] for h in evals],
            [h.get("eval_rewards/accuracies") for h in evals],
            "o-",
            label="held-out reward accuracy (loss metric)",
        )
    ax.plot(
        [0, steps],
        [before["preference_accuracy"], after["preference_accuracy"]],
        "s",
        markersize=9,
        label="held-out preference accuracy (before / after)",
    )
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step")
    ax.set_title("reward accuracy")
    ax.legend(fontsize=8)
    ax = axes[2]
    if any("kl/beta" in h for h in train):
        ax.plot([h["step"] for h in train], [h.get("kl/beta") for h in train], label="β (ε-DPO)")
        ax.set_title("β")
    else:
        ax.plot(
            [h["step"] for h in train], [h.get("rewards/margins") for h in train], label="train reward margin"
        )
        if evals:
            ax.plot(
                [h["step"] for h in evals],
                [h.get("eval_rewards/margins") for h in evals],
                "o-",
                label="held-out",
            )
        ax.set_title("reward margin")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _summary(result: dict[str, Any]) -> str:
    b, a = result["heldout"]["before"], result["heldout"]["after"]
    mem = result["loss_peak_memory"]
    rows = [
        (
            "held-out preference accuracy",
            f"{b['preference_accuracy']:.1%}",
            f"{a['preference_accuracy']:.1%}",
        ),
        (
            "held-out preference margin (nats/token)",
            f"{b['preference_margin']:+.3f}",
            f"{a['preference_margin']:+.3f}",
        ),
        (
            "held-out implicit-reward accuracy",
            f"{b['implicit_reward_accuracy']:.1%}",
            f"{a['implicit_reward_accuracy']:.1%}",
        ),
        (
            "held-out implicit-reward margin (nats)",
            f"{b['implicit_reward_margin']:+.3f}",
            f"{a['implicit_reward_margin']:+.3f}",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  {'before':>9}  {'after':>9}"]
    lines += [f"{name:{width}}  {x:>9}  {y:>9}" for name, x, y in rows]
    t = result["train"]
    lines += [
        "",
        f"loss {result['loss']} | {t['steps_this_run']} steps in {t['runtime_s']:.1f} s "
        f"({t['steps_per_second']:.2f} steps/s, held-out evals and checkpoints included) "
        f"on {result['machine']['device']}",
        f"engine: {result['engine']['name']}, {result['engine']['processes']} process(es) x "
        f"{result['engine']['per_device_train_batch_size']} pairs per micro-batch; trained "
        f"{result['model']['trainable_parameters']:,} of {result['model']['parameters']:,} parameters"
        + (" (LoRA, reference = adapters disabled)" if result["model"]["lora"] else ""),
        f"loss peak memory (forward+backward), batch {mem['batch_shape']}, V={mem['vocab_size']}: fused "
        f"{_fmt_bytes(mem['fused_loss_bytes'])} vs full-logits log-softmax "
        f"{_fmt_bytes(mem['full_logits_logprobs_bytes'])} ({mem['method']}; one fp32 logits tensor here is "
        f"{_fmt_bytes(mem['full_logits_bytes'])})",
        "preference accuracy: chosen has the higher mean per-token log-prob under the model;",
        "implicit-reward accuracy: log π/π₀ (sums) higher for chosen, π₀ = initial model (0% at step 0:",
        "all pairs tie there); in both a tie counts as wrong, as in rewards/accuracies and TRL.",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Entry point


def run(args: argparse.Namespace) -> int:
    """Train, evaluate before/after on held-out pairs, write metrics.json and curves.png."""
    import datasets
    import torch
    import transformers
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from prefloss.hf.trainer import (
        LOSSES,
        NonFiniteLossError,
        PreferenceConfig,
        PreferenceTrainer,
        score_pairs,
    )

    if args.loss not in LOSSES:
        raise ValueError(f"unknown loss {args.loss!r}: expected one of {sorted(LOSSES)}")
    if args.max_prompt_length is not None and args.max_prompt_length >= args.max_length:
        raise InputError(
            f"--max-prompt-length must be < --max-length ({args.max_length}), got {args.max_prompt_length}"
        )
    checkpoint = _checkpoint_to_resume(args)
    if checkpoint is not None:
        step = _checkpoint_step(checkpoint)
        if step is not None and step >= args.max_steps:
            if _is_main_process():
                print(
                    f"--resume: {checkpoint} is at step {step}, which already reached --max-steps "
                    f"{args.max_steps}: nothing to train; {args.output_dir} is left as it is. Give a larger "
                    "--max-steps to train further."
                )
            return 0
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.set_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    model, tokenizer, model_name = _load_model_and_tokenizer(args)
    train_data, eval_data, data_name = _load_data(args)
    loss_kwargs: dict[str, Any] = {"backend": args.backend}
    if args.chunk_size is not None:
        loss_kwargs["chunk_size"] = args.chunk_size
    use_cpu = not torch.cuda.is_available()
    config = PreferenceConfig(
        output_dir=str(output_dir),
        loss=args.loss,
        beta=args.beta,
        gamma_beta_ratio=args.gamma_beta_ratio,
        alpha=args.alpha,
        epsilon=args.epsilon,
        loss_kwargs=loss_kwargs,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        prompt_bos=args.prompt_bos,
        overlong_prompts=args.overlong_prompts,
        precompute_ref_log_probs=args.precompute_ref,
        max_nonfinite_steps=args.max_nonfinite_steps,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=max(args.batch_size, 16),
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(10, args.max_steps // 10),
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        eval_on_start=True,
        save_strategy="steps",
        save_steps=args.save_steps,
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=use_cpu,
        bf16=args.bf16,
        disable_tqdm=False,
        dataloader_num_workers=0,
    )
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        targets = [name.strip() for name in args.lora_target_modules.split(",") if name.strip()]
        if not targets:
            raise ValueError("--lora-target-modules must name at least one module, got an empty list")
        peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=targets)
    trainer = PreferenceTrainer(
        model,
        args=config,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    progress = _progress_callback(trainer, args.max_steps, args.quiet)
    trainer.add_callback(progress)

    # Held-out scores of the initial model: the "before" numbers and π₀ of the implicit reward.
    collator, heldout = trainer.data_collator, trainer.eval_dataset
    initial = score_pairs(trainer.model, heldout, collator, batch_size=64, device=config.device)
    before = heldout_metrics(initial, initial)

    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except NonFiniteLossError as exc:
        if progress.bar is not None:
            progress.bar.close()
        if trainer.is_world_process_zero():
            print(
                f"prefloss train: error: {exc} (--learning-rate; --max-nonfinite-steps "
                f"{args.max_nonfinite_steps} is the limit of consecutive non-finite steps)",
                file=sys.stderr,
            )
        return 1
    runtime = time.perf_counter() - start
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if evals and evals[-1]["step"] == trainer.state.global_step:
        final_eval = {k: v for k, v in evals[-1].items() if k != "step"}
    else:
        final_eval = trainer.evaluate()
    trainer.save_model(str(output_dir))

    after = heldout_metrics(
        score_pairs(trainer.model, heldout, collator, batch_size=64, device=config.device), initial
    )
    steps_this_run = trainer.state.global_step - progress.start_step
    from prefloss.hf.engines import engine_name

    result = {
        "loss": args.loss,
        "engine": {
            "name": engine_name(trainer.model_wrapped),
            "processes": trainer.accelerator.num_processes,
            "per_device_train_batch_size": args.batch_size,
        },
        "loss_hyperparameters": {
            k: _float_or_none(getattr(trainer.loss_fn, k, None)) for k in LOSSES[args.loss].takes
        },
        "model": {
            "name": model_name,
            "parameters": sum(p.numel() for p in trainer.model.parameters()),
            "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "lora": None if peft_config is None else {"r": args.lora_r, "alpha": args.lora_alpha},
        },
        "data": {
            "train": data_name,
            "train_pairs": len(trainer.train_dataset),
            "heldout_pairs": len(heldout),
        },
        "heldout": {
            "before": before,
            "after": after,
            "definitions": {
                "preference_accuracy": "fraction of held-out pairs whose chosen response has the higher mean "
                "per-token log-prob under the model (strictly: a tie counts as wrong)",
                "preference_margin": "mean of (mean log-prob chosen - mean log-prob rejected)",
                "implicit_reward_accuracy": "fraction with log pi/pi0(chosen) > log pi/pi0(rejected), sums, "
                "pi0 = the initial model; a tie counts as wrong (0 at step 0, where every pair ties)",
                "implicit_reward_margin": "mean of (log pi/pi0(chosen) - log pi/pi0(rejected))",
            },
        },
        "final_eval": final_eval,
        "train": {
            "steps": trainer.state.global_step,
            "steps_this_run": steps_this_run,
            "runtime_s": runtime,
            "steps_per_second": steps_this_run / runtime if runtime > 0 else float("nan"),
            "timing_note": "wall clock of trainer.train(): periodic held-out evaluation and checkpoints "
            "included",
        },
        "loss_peak_memory": _loss_memory(trainer),
        "machine": {
            "device": "cuda: " + torch.cuda.get_device_name()
            if not use_cpu
            else f"CPU ({os.cpu_count()} cores)",
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "log_history": trainer.state.log_history,
    }
    if not trainer.is_world_process_zero():  # every rank computed the same held-out scores
        return 0
    (output_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
    if not args.no_plot:
        _plot(trainer.state.log_history, before, after, trainer.state.global_step, output_dir / "curves.png")
    print(_summary(result))
    print(
        f"wrote {output_dir / 'metrics.json'}" + ("" if args.no_plot else f" and {output_dir / 'curves.png'}")
    )
    return 0
