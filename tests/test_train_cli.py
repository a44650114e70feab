"""``prefloss train`` end to end: learning on held-out pairs, resume == uninterrupted, options, errors.

The default run (tiny Llama, shipped synthetic data, α-DPO) is shortened to 40 steps. A second run
resumes from its step-20 checkpoint and must end with the same metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from prefloss.commands import train
from prefloss.commands.cli_args import InputError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    return parser.parse_args(list(argv))


SHORT = ("--max-steps", "40", "--eval-steps", "20", "--save-steps", "20", "--quiet", "--no-plot")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("default")
    assert train.run(parse("--output-dir", str(out), *SHORT)) == 0
    return out


@pytest.mark.slow
def test_default_run_learns_the_preference(default_run, capsys) -> None:
    metrics = json.loads((default_run / "metrics.json").read_text())
    before, after = metrics["heldout"]["before"], metrics["heldout"]["after"]
    assert before["implicit_reward_accuracy"] == 0.0  # π = π₀ at step 0: all ties, and a tie is wrong
    assert after["preference_accuracy"] >= before["preference_accuracy"] + 0.25, (before, after)
    assert after["preference_accuracy"] >= 0.8
    assert after["implicit_reward_accuracy"] >= 0.8
    assert after["preference_margin"] > before["preference_margin"]
    assert metrics["train"]["steps"] == 40
    assert metrics["loss"] == "alpha_dpo"
    assert "eval_rewards/accuracies" in metrics["final_eval"]
    for name in ("loss", "rewards/accuracies", "rewards/margins"):
        assert any(name in h for h in metrics["log_history"])
    assert (default_run / "model.safetensors").exists()
    assert (default_run / "prefloss_loss_state.pt").exists()


@pytest.mark.slow
def test_resume_from_checkpoint_gives_the_same_final_metrics(default_run, tmp_path) -> None:
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(default_run / "checkpoint-20", out / "checkpoint-20")
    assert train.run(parse("--output-dir", str(out), "--resume", *SHORT)) == 0
    full = json.loads((default_run / "metrics.json").read_text())
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["train"]["steps"] == 40 and resumed["train"]["steps_this_run"] == 20
    for key, value in full["heldout"]["after"].items():
        assert resumed["heldout"]["after"][key] == pytest.approx(value, abs=1e-5), key
    for key, value in full["final_eval"].items():
        if key.startswith("eval_") and not key.endswith(("runtime", "per_second")):
            assert resumed["final_eval"][key] == pytest.approx(value, abs=1e-5), key
    full_log = {h["step"]: h["loss"] for h in full["log_history"] if "loss" in h}
    resumed_log = {h["step"]: h["loss"] for h in resumed["log_history"] if "loss" in h}
    for step in range(21, 41):
        assert resumed_log[step] == pytest.approx(full_log[step], abs=1e-5), step


@pytest.mark.slow
def test_non_empty_output_dir_is_refused(default_run, tmp_path) -> None:
    """A 2nd run into the 1st run's folder would overwrite some of its checkpoints and keep others."""
    out = tmp_path / "reused"
    shutil.copytree(default_run, out)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(InputError, match=r"--output-dir .* is not empty .*--resume.*--overwrite-output-dir"):
        train.run(parse("--output-dir", str(out), "--seed", "1", *SHORT))
    assert sorted(p.name for p in out.iterdir()) == before


def test_non_empty_output_dir_is_refused_before_any_work(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("not a run")
    with pytest.raises(InputError, match=r"is not empty \(notes.txt\)"):
        train.run(parse("--output-dir", str(tmp_path), "--quiet"))
    with pytest.raises(InputError, match="--resume continues the run .* --overwrite-output-dir deletes it"):
        train.run(parse("--output-dir", str(tmp_path), "--resume", "--overwrite-output-dir"))
    with pytest.raises(InputError, match="--resume: no checkpoint-<step> folder in --output-dir"):
        train.run(parse("--output-dir", str(tmp_path), "--resume"))


@pytest.mark.slow
def test_resume_with_another_loss_names_both_losses(default_run, tmp_path) -> None:
    out = tmp_path / "resumed"
    shutil.copytree(default_run / "checkpoint-20", out / "checkpoint-20")
    match = "trained with --loss alpha_dpo, this command has --loss dpo. Resume with --loss alpha_dpo"
    with pytest.raises(InputError, match=match):
        train.run(parse("--output-dir", str(out), "--resume", "--loss", "dpo", *SHORT))


@pytest.mark.slow
def test_resume_of_a_finished_run_trains_nothing(default_run, tmp_path, capsys) -> None:
    """Resuming checkpoint-40 of a 40-step run: exit 0, says so, metrics and checkpoints unchanged
    (transformers alone trains a 41st step and writes checkpoint-41)."""
    out = tmp_path / "finished"
    shutil.copytree(default_run, out)
    metrics = (out / "metrics.json").read_bytes()
    assert train.run(parse("--output-dir", str(out), "--resume", *SHORT)) == 0
    assert "is at step 40, which already reached --max-steps 40: nothing to train" in capsys.readouterr().out
    assert (out / "metrics.json").read_bytes() == metrics
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-40"]


@pytest.mark.slow
def test_overwrite_output_dir_deletes_the_old_run_first(default_run, tmp_path, capsys) -> None:
    out = tmp_path / "overwritten"
    shutil.copytree(default_run, out)
    argv = ("--max-steps", "2", "--eval-steps", "2", "--save-steps", "1", "--quiet", "--no-plot")
    assert train.run(parse("--output-dir", str(out), "--overwrite-output-dir", "--seed", "1", *argv)) == 0
    said = capsys.readouterr().out
    assert (
        "--overwrite-output-dir: deleted the previous run's checkpoint-20, checkpoint-40, metrics.json"
        in said
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 2 and metrics["train"]["steps_this_run"] == 2


@pytest.mark.slow
def test_nonfinite_training_stops_with_a_one_line_error(tmp_path, capsys) -> None:
    """The issue's run: DPO at learning rate 1e6 overflows within a few steps. The loss / gradient norm
    is logged as non-finite (not 0.0), the command exits 1 with one error line and no traceback, and
    every checkpoint written holds finite weights (none after the stop)."""
    from safetensors.torch import load_file

    from prefloss.commands.cli import main

    out = tmp_path / "nan"
    argv = ["train", "--loss", "dpo", "--learning-rate", "1e6", "--max-steps", "30", "--eval-steps", "30"]
    assert main([*argv, "--save-steps", "1", "--quiet", "--no-plot", "--output-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "prefloss train: error: training stopped at step" in err and "Traceback" not in err, err
    assert "--max-nonfinite-steps 1" in err
    assert not (out / "metrics.json").exists()
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    stopped_at = int(err.split("training stopped at step ")[1].split(":")[0])
    assert [int(p.name.split("-")[1]) for p in checkpoints] == list(range(1, stopped_at))
    for checkpoint in checkpoints:
        for name, value in load_file(checkpoint / "model.safetensors").items():
            assert torch.isfinite(value).all(), (checkpoint.name, name)
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    assert all(math.isfinite(h["loss"]) for h in state["log_history"] if "loss" in h)


NUMERIC_CASES = [
    ("--max-steps", "0", "an integer >= 1"),
    ("--max-steps", "-3", "an integer >= 1"),
    ("--grad-accum", "0", "an integer >= 1"),
    ("--batch-size", "0", "an integer >= 1"),
    ("--eval-steps", "0", "an integer >= 1"),
    ("--save-steps", "0", "an integer >= 1"),
    ("--max-length", "0", "an integer >= 1"),
    ("--max-prompt-length", "0", "an integer >= 1"),
    ("--chunk-size", "0", "an integer >= 1"),
    ("--lora-r", "0", "an integer >= 1"),
    ("--max-nonfinite-steps", "0", "an integer >= 1"),
    ("--seed", "-1", "an integer >= 0"),
    ("--seed", str(2**32), r"an integer in \[0, 2\*\*32 - 1\]"),
    ("--learning-rate", "0", "a finite number > 0"),
    ("--learning-rate", "inf", "a finite number > 0"),
    ("--beta", "nan", "a finite number > 0"),
    ("--epsilon", "-0.1", "a finite number > 0"),
    ("--alpha", "nan", "a finite number >= 0"),
    ("--gamma-beta-ratio", "-1", "a finite number >= 0"),
    ("--lora-alpha", "0", "a finite number > 0"),
]


@pytest.mark.parametrize(
    "flag, value, expected", NUMERIC_CASES, ids=[f"{flag}={value}" for flag, value, _ in NUMERIC_CASES]
)
def test_numeric_arguments_are_checked_at_parse_time(capsys, flag: str, value: str, expected: str) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(flag, value)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert re.search(f"argument {flag}: expected {expected}, got '{re.escape(value)}'", err), err


def test_max_prompt_length_must_be_below_max_length(tmp_path) -> None:
    with pytest.raises(InputError, match=r"--max-prompt-length must be < --max-length \(64\), got 64"):
        train.run(parse("--max-prompt-length", "64", "--output-dir", str(tmp_path / "out")))


def test_loss_names_match_the_trainer() -> None:
    """The CLI's ``--loss`` choices and the trainer's loss table are the loss classes' attributes."""
    from prefloss.hf.trainer import LOSSES
    from prefloss.losses import LOSSES as LOSS_CLASSES

    assert sorted(train.LOSS_NAMES) == sorted(LOSSES) == sorted(LOSS_CLASSES)
    for name, cls in LOSS_CLASSES.items():
        assert LOSSES[name].takes == tuple(cls.defaults) == cls.hyperparameters
        assert LOSSES[name].needs_reference == cls.needs_reference


def test_unknown_loss_is_an_error(capsys) -> None:
    with pytest.raises(SystemExit):
        parse("--loss", "ipo")
    assert "invalid choice: 'ipo'" in capsys.readouterr().err


def test_data_missing_a_column_is_an_error(tmp_path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: 'rejected' is missing"):
        train.run(parse("--data", str(data), "--output-dir", str(tmp_path / "out"), "--quiet"))


def test_model_path_must_be_a_directory(tmp_path) -> None:
    with pytest.raises(ValueError, match="local Hugging Face model directory"):
        train.run(
            parse("--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "out"), "--quiet")
        )


@pytest.mark.slow
def test_cli_with_local_model_and_data_epsilon_dpo(tmp_path) -> None:
    """The console entry point in a subprocess (cwd=tmp_path): --model dir, --data JSONL, ε-DPO."""
    from prefloss.hf.tiny import byte_level_tokenizer, tiny_llama

    tok = byte_level_tokenizer()
    model_dir = tmp_path / "model"
    tiny_llama(tok, hidden_size=32, intermediate_size=64, num_heads=2).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = [
        {"prompt": f"say {w}\n", "chosen": w.upper(), "rejected": w}
        for w in (
            "apple",
            "river",
            "stone",
            "cloud",
            "grass",
            "light",
            "ocean",
            "tiger",
            "piano",
            "lemon",
            "robot",
        )
    ]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable,
        "-m",
        "prefloss.commands.cli",
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
    ]
    cmd += ["--loss", "epsilon_dpo", "--epsilon", "0.2", "--max-steps", "3", "--batch-size", "2"]
    cmd += ["--grad-accum", "2", "--eval-steps", "2", "--save-steps", "2", "--output-dir", "out"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "held-out preference accuracy" in proc.stdout
    assert "beta=" in proc.stderr  # the progress bar shows β
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["loss"] == "epsilon_dpo" and metrics["loss_hyperparameters"]["epsilon"] == 0.2
    assert metrics["data"]["heldout_pairs"] == 2  # 10% of 11, rounded up by datasets
    assert any("kl/beta" in h for h in metrics["log_history"])
    assert (tmp_path / "out" / "curves.png").stat().st_size > 0


def test_loss_memory_measurement_sees_the_logits() -> None:
    """Full logits of 512 tokens x V=4096 in fp32 are 8 MiB; the chunked op stays far below."""
    import torch

    import prefloss

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(512, 32, generator=g), torch.randn(4096, 32, generator=g) * 0.1
    labels = torch.randint(0, 4096, (512,), generator=g)

    def full() -> None:
        h = hidden.clone().requires_grad_(True)
        torch.log_softmax(h @ weight.T, -1).gather(-1, labels[:, None]).sum().backward()

    def fused() -> None:
        h = hidden.clone().requires_grad_(True)
        prefloss.fused_logprobs(h, weight, labels, chunk_size=64).policy.sum().backward()

    full_bytes = train.measure_peak_memory(full, torch.device("cpu"))
    fused_bytes = train.measure_peak_memory(fused, torch.device("cpu"))
    assert full_bytes >= 16 * 2**20  # the logits and their log-softmax, both kept for backward
    assert fused_bytes < full_bytes / 4


def test_loss_memory_measurement_counts_allocations_only_and_keeps_compiled_code() -> None:
    """Views and in-place results allocate nothing; one new 4 MiB tensor is 4 MiB. And compiled
    code keeps running compiled while measured and after (a ``TorchDispatchMode`` meter made Dynamo
    fall back to eager for the rest of the process)."""
    import torch

    w = torch.zeros(1024, 1024)
    cpu = torch.device("cpu")

    def views_and_in_place() -> None:
        w[:10].sum()
        w.add_(1.0)
        w.view(-1)[:5].mul_(2.0)

    assert train.measure_peak_memory(views_and_in_place, cpu) < 1024
    assert train.measure_peak_memory(lambda: torch.ones(1024, 1024), cpu) == 4 * 2**20

    calls = []

    def counting_backend(graph, example_inputs):
        def run(*args):
            calls.append(1)
            return graph(*args)

        return run

    compiled = torch.compile(
        lambda x: torch.exp(x - x.amax(1, keepdim=True)).sum(1), backend=counting_backend
    )
    x = torch.randn(64, 64)
    compiled(x)
    assert len(calls) == 1
    train.measure_peak_memory(lambda: compiled(x), cpu)  # warm-up + measured call
    compiled(x)
    assert len(calls) == 4
