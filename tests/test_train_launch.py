"""The launch recipes of README "Distributed training": ``accelerate launch`` with the shipped configs.

* ZeRO-3 (configs/accelerate/zero3.yaml + ds_zero3.json), 2 processes on CPU, exactly the README
  command from the repository root, shortened to 10 steps (one evaluation and one checkpoint, both at
  the end): the held-out accuracy rises as in the single-process run (measured: 0.555 -> 0.86), and
  the run says it was DeepSpeed ZeRO-3 with 2 processes.
* FSDP2 (configs/accelerate/fsdp2.yaml) on CPU: accelerate would run it as DDP, unsharded;
  `PreferenceTrainer` refuses with an error that names the engine and the fix instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _accelerate(env: dict[str, str], config: str, out: Path, *train_args: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    cmd = [*launcher, "--config_file", f"configs/accelerate/{config}", "-m", "prefloss", "train"]
    cmd += ["--output-dir", str(out), "--quiet", "--no-plot", *train_args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture
def launch_env(subprocess_env) -> dict[str, str]:
    return subprocess_env(
        OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DS_ACCELERATOR="cpu"
    )


@pytest.mark.slow
def test_zero3_launch_recipe_learns_on_two_cpu_processes(tmp_path, launch_env) -> None:
    proc = _accelerate(
        launch_env, "zero3.yaml", tmp_path, "--max-steps", "10", "--eval-steps", "10", "--save-steps", "10"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["engine"] == {"name": "DeepSpeed ZeRO-3", "processes": 2, "per_device_train_batch_size": 8}
    before, after = metrics["heldout"]["before"], metrics["heldout"]["after"]
    assert after["preference_accuracy"] >= before["preference_accuracy"] + 0.2, (before, after)
    assert after["implicit_reward_accuracy"] >= 0.75, after
    assert proc.stdout.count("held-out preference accuracy") == 1  # one summary, from rank 0
    assert (tmp_path / "prefloss_loss_state.pt").exists()


@pytest.mark.slow
def test_fsdp2_launch_recipe_on_cpu_is_refused_not_run_as_ddp(tmp_path, launch_env) -> None:
    proc = _accelerate(launch_env, "fsdp2.yaml", tmp_path, "--max-steps", "2")
    assert proc.returncode != 0
    assert "FSDP was requested" in proc.stderr and "ignores FSDP settings on CPU" in proc.stderr, proc.stderr[
        -4000:
    ]
    assert "configs/accelerate/zero3.yaml" in proc.stderr
    assert not (tmp_path / "metrics.json").exists()
