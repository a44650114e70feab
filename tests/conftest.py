"""Test-wide set-up.

Without CUDA the Triton kernels run under Triton's interpreter on CPU tensors. The variable must be
set before any module defining ``@triton.jit`` kernels is imported (jit decides at decoration time),
which is why it is set here, at collection, and why prefloss imports its kernels lazily.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_engine_worker(script: str, mode: str, out_dir: Path) -> dict:
    """Run ``tests/<script> MODE OUT_DIR PORT`` (2 gloo processes on CPU) with ``cwd=out_dir``, so the
    repository's ``kernels/`` folder is never on ``sys.path``, and load the ``OUT_DIR/MODE.pt`` it saves."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        DS_ACCELERATOR="cpu",
    )
    worker = Path(__file__).with_name(script)
    proc = subprocess.run(
        [sys.executable, str(worker), mode, str(out_dir), str(_free_port())],
        cwd=out_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"{script} {mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out_dir / f"{mode}.pt", weights_only=False)


@pytest.fixture(scope="session")
def run_engine_worker():
    """`_run_engine_worker`, for the 2-process workers of the engine tests."""
    return _run_engine_worker


@pytest.fixture(scope="session")
def kernel_device() -> torch.device:
    """Where Triton kernels launched directly can run: CPU tensors under the interpreter (set above when
    there is no CUDA, and what CI runs), CUDA tensors when compiling them for a GPU."""
    return torch.device("cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda")
