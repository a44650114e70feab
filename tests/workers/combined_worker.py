"""Runs the jobs of several engine workers for one engine in one launch: the interpreter start, the
imports and the process group are paid once instead of once per worker.

    python combined_worker.py ENGINE OUT_DIR PORT JOB[,JOB...]

JOB: ``engines`` (engines_worker.py), ``trainer`` (trainer_engines_worker.py), ``trl``
(trl_engines_worker.py), ``distributed`` (distributed_worker.py), in `JOBS` order. ENGINE:
``single`` (each job's one-process baseline, its share of the work in each of 2 forked processes:
the workers' ``main_single``), or ``ddp``, ``fsdp2``, ``zero3`` (2 gloo ranks: each rank runs every
job's ``main`` in turn; the first job sets up the process group, the later ones, and the Trainers,
join it). Each job writes what its worker
writes alone to ``OUT_DIR/JOB/``. Run from ``tests/workers/`` (its folder is on ``sys.path``) with
cwd outside the repository (`run_engine_worker` in tests/conftest.py).
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch.distributed as dist  # noqa: E402
from worker_setup import launch  # noqa: E402

JOBS = {
    "engines": "engines_worker",
    "trainer": "trainer_engines_worker",
    "trl": "trl_engines_worker",
    "distributed": "distributed_worker",
}
SINGLE = ("engines", "trl", "distributed")  # the jobs with a one-process baseline
WORLD = 2


def job_dir(out_dir: str, job: str) -> str:
    path = os.path.join(out_dir, job)
    os.makedirs(path, exist_ok=True)
    return path


def rank_main(rank: int, engine: str, jobs: list[str], out_dir: str, port: int) -> None:
    """Rank ``rank`` (or, for ``single``, part ``rank``) runs each job in turn."""
    for job in jobs:
        worker = importlib.import_module(JOBS[job])
        if engine == "single":
            worker.main_single(rank, WORLD, job_dir(out_dir, job))
        else:
            worker.main(rank, WORLD, engine, job_dir(out_dir, job), port)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(engine: str, jobs: list[str], out_dir: str, port: int) -> None:
    unknown = [job for job in jobs if job not in JOBS or (engine == "single" and job not in SINGLE)]
    if unknown:
        raise SystemExit(f"combined_worker.py: no job {unknown} for engine {engine!r}; jobs: {list(JOBS)}")
    jobs = [job for job in JOBS if job in jobs]  # the engines job first: it sets up the process group
    workers = [importlib.import_module(JOBS[job]) for job in jobs]
    preload = tuple(dict.fromkeys(name for worker in workers for name in worker.preload(engine)))
    launch(rank_main, (engine, jobs, out_dir, port), nprocs=WORLD, preload=preload)
    if engine == "single":
        for job, worker in zip(jobs, workers, strict=True):
            worker.merge_single(job_dir(out_dir, job))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[4].split(","), sys.argv[2], int(sys.argv[3]))
