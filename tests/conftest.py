"""Test-wide set-up, and the builders several test files share.

Without CUDA the Triton kernels run under Triton's interpreter on CPU tensors. The variable must be
set before any module defining ``@triton.jit`` kernels is imported (jit decides at decoration time),
which is why it is set here, at collection, and why prefloss imports its kernels lazily.

``tests/`` is not a package (``--import-mode=importlib``): test files cannot import each other, so
what they share comes as fixtures from here. ``tests/workers/`` holds the scripts the engine tests run
as separate processes (`run_engine_worker`; one launch per engine for all of them: `engine_results`);
pytest never collects them (`collect_ignore`).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Scripts run by the engine tests in their own processes, not test modules.
collect_ignore = ["workers"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _subprocess_env(**settings: str) -> dict[str, str]:
    """This process's environment for a child process, plus ``settings``: without the rendezvous
    variables a launcher may have set for pytest itself (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_PORT``)."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env.update(settings)
    return env


def _run_engine_worker(script: str, mode: str, out_dir: Path, *args: str) -> dict:
    """Run ``tests/workers/<script> MODE OUT_DIR PORT [ARGS]`` (2 gloo processes on CPU) with
    ``cwd=out_dir``, so the repository's ``kernels/`` folder is never on ``sys.path``, and load the
    ``OUT_DIR/MODE.pt`` it saves (without it, return ``{}``: combined_worker.py saves per job)."""
    env = _subprocess_env(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        DS_ACCELERATOR="cpu",
    )
    worker = Path(__file__).parent / "workers" / script
    proc = subprocess.run(
        [sys.executable, str(worker), mode, str(out_dir), str(_free_port()), *args],
        cwd=out_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (
        f"{script} {mode} {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    saved = out_dir / f"{mode}.pt"
    return torch.load(saved, weights_only=False) if saved.exists() else {}


@pytest.fixture(scope="session")
def run_engine_worker():
    """`_run_engine_worker`, for the 2-process workers of the engine tests."""
    return _run_engine_worker


# The engine workers' jobs (tests/workers/combined_worker.py): the test file that reads each, and the
# engines it runs under.
ENGINE_JOBS = {
    "engines": ("test_hf_engines.py", ("single", "ddp", "fsdp2", "zero3")),
    "trainer": ("test_hf_trainer_engines.py", ("ddp", "fsdp2", "zero3")),
    "trl": ("test_trl_engines.py", ("single", "fsdp2", "zero3")),
    "distributed": ("test_hf_distributed.py", ("single", "ddp")),
}


@pytest.fixture(scope="session")
def engine_results(request, tmp_path_factory):
    """``engine_results(job, engine)``: what job ``job`` of tests/workers/combined_worker.py saved
    under ``engine``. One launch per engine and session runs every job whose test file has a test
    in the session (`ENGINE_JOBS`), so that the engine tests pay each engine's process start,
    imports and process group once; ``pytest tests/test_hf_engines.py`` runs its own job alone."""
    files = {Path(str(item.fspath)).name for item in request.session.items}
    launched: dict[str, dict[str, dict]] = {}
    failed: dict[str, str] = {}  # a failed launch fails every test that needs it, without rerunning

    def results(job: str, engine: str) -> dict:
        if engine in failed:
            pytest.fail(f"the {engine} launch failed (see the first test that needed it):\n{failed[engine]}")
        if engine not in launched:
            jobs = [j for j, (file, engines) in ENGINE_JOBS.items() if file in files and engine in engines]
            jobs = jobs if job in jobs else [*jobs, job]
            out = tmp_path_factory.mktemp(f"engine-{engine}")
            try:
                _run_engine_worker("combined_worker.py", engine, out, ",".join(jobs))
            except AssertionError as error:
                failed[engine] = str(error)[-2000:]
                raise
            launched[engine] = {j: torch.load(out / j / f"{engine}.pt", weights_only=False) for j in jobs}
        return launched[engine][job]

    return results


@pytest.fixture(scope="session")
def subprocess_env():
    """`_subprocess_env`: ``subprocess_env(**settings)``, the environment for a child process."""
    return _subprocess_env


@pytest.fixture(scope="session")
def free_port():
    """`_free_port`: ``free_port()``, a TCP port on 127.0.0.1 free at the time of the call."""
    return _free_port


@pytest.fixture(scope="session")
def kernel_device() -> torch.device:
    """Where Triton kernels launched directly can run: CPU tensors under the interpreter (set above when
    there is no CUDA, and what CI runs), CUDA tensors when compiling them for a GPU."""
    return torch.device("cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda")


# --- fused log-prob inputs (test_ops_fused_logprobs.py, test_ops_frozen_head.py) ---------------------


def _make_logprob_inputs(case, dtype: torch.dtype, seed: int = 0) -> tuple:
    """``(hidden, weight, labels, bias, ref_hidden, ref_weight)`` for a test file's ``Case``.

    ``hidden`` ``[rows, T, H]`` and ``weight`` ``[V, H]`` at ``dtype``; ``labels`` ``[rows, T]`` with
    a fraction ``ignore_frac`` of -100, row 1 all -100 with ``empty_row``, and with ``peaked`` a larger
    scale and the arg-max as label for most tokens (confident, near-zero log-probs); ``bias`` ``[V]``
    with ``case.bias``; a reference near the policy with ``case.ref`` (else ``None``s).
    """
    g = torch.Generator().manual_seed(seed)
    scale = 3.0 if case.peaked else 0.5
    hidden = (torch.randn(case.rows, case.T, case.H, generator=g) * scale).to(dtype)
    weight = torch.randn(case.V, case.H, generator=g) / case.H**0.5 * (4.0 if case.peaked else 1.0)
    weight = weight.to(dtype)
    labels = torch.randint(0, case.V, (case.rows, case.T), generator=g)
    labels[torch.rand(case.rows, case.T, generator=g) < case.ignore_frac] = -100
    if case.empty_row:
        labels[1] = -100
    if case.peaked:  # the label is the arg-max for most tokens: confident, near-zero log-probs
        labels = torch.where(labels == -100, labels, (hidden.float() @ weight.float().T).argmax(-1))
    bias = (torch.randn(case.V, generator=g) * 0.3).to(dtype) if case.bias else None
    ref_hidden = ref_weight = None
    if case.ref:
        ref_hidden = (hidden.float() + 0.5 * torch.randn(hidden.shape, generator=g)).to(dtype)
        ref_weight = (weight.float() + 0.5 * torch.randn(weight.shape, generator=g) / case.H**0.5).to(dtype)
    return hidden, weight, labels, bias, ref_hidden, ref_weight


@pytest.fixture(scope="session")
def make_logprob_inputs():
    """`_make_logprob_inputs`: ``make_logprob_inputs(case, dtype, seed=0)``."""
    return _make_logprob_inputs


@pytest.fixture
def small_vocab_tiles(monkeypatch):
    """The torch backend's vocabulary tile at 32 (default 4096): small V spans several tiles, the last
    one partial, so the online rescaling across tiles is exercised."""
    import prefloss.fused.torch_backend

    monkeypatch.setattr(prefloss.fused.torch_backend, "VOCAB_TILE", 32)


# --- tiny trainers, prefloss.trl's against TRL's (test_trl_dpo.py, test_trl_cpo.py) -----------------


def _preference_rows(n: int = 12) -> list[dict]:
    """The first ``n`` pairs (``prompt``/``chosen``/``rejected``) of prefloss's synthetic training data."""
    from prefloss.data import synthetic_preferences_path

    with open(synthetic_preferences_path("train")) as f:
        return [json.loads(line) for line in f][:n]


def _tiny_training_args(output_dir, pairs: int) -> dict:
    """The training arguments both trainers of a comparison get: CPU, fp32 (not TRL's bf16), no
    gradient checkpointing, ``pairs`` pairs per micro-batch, 3 steps each logged, no checkpoints,
    learning rate 1e-3, seed 0."""
    return dict(
        output_dir=str(output_dir),
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=pairs,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-3,
        seed=0,
    )


@pytest.fixture(scope="session")
def preference_rows():
    """`_preference_rows`: ``preference_rows(n=12)``."""
    return _preference_rows


@pytest.fixture(scope="session")
def tiny_training_args():
    """`_tiny_training_args`: ``tiny_training_args(output_dir, pairs)``."""
    return _tiny_training_args


@pytest.fixture
def quiet_hf():
    """Hugging Face logging at errors only, no dataset progress bars."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
