"""What the engine workers (``tests/workers/*_worker.py``) share: the process environment and the engine
settings.

The workers run as scripts (``python tests/workers/<worker>.py ...``, see ``run_engine_worker`` in
conftest.py; the tests run them as jobs of one launch per engine, ``combined_worker.py``), so
``tests/workers/`` is on their ``sys.path`` and they import this module by its name. Not a test
file: pytest does not collect ``tests/workers/`` (``collect_ignore`` in conftest.py), and test
files do not import it.
"""

from __future__ import annotations

import importlib
import os
import socket
from collections.abc import Callable
from typing import Any

import torch.multiprocessing


def launch(main: Callable[..., None], args: tuple, nprocs: int = 2, preload: tuple[str, ...] = ()) -> None:
    """Run ``main(rank, *args)`` in ``nprocs`` processes and wait for them, as
    ``torch.multiprocessing.spawn`` does but by forking after importing the modules named in
    ``preload``: each child inherits this process's imports (torch, transformers, DeepSpeed, prefloss)
    instead of importing them again, which is about two thirds of a 2-process launch's CPU time on a
    2-core machine (ddp engine worker: 38 s -> 16 s). Safe here because the parent has computed nothing
    (no thread pool started, no CUDA)."""
    for name in preload:
        importlib.import_module(name)
    torch.multiprocessing.start_processes(main, args=args, nprocs=nprocs, start_method="fork")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free at the time of the call (for ``distributed_env``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The ``env://`` rendezvous variables ``torchrun`` would set for process ``rank`` of ``world`` on
    one machine; ``os.environ.update(...)`` them before ``init_process_group``, ``deepspeed`` or a Trainer."""
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
    }


def engine_arguments(
    engine: str, *, zero_optimization: dict[str, Any] | None = None, fsdp_config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``TrainingArguments`` settings for ``engine``: ``zero3`` (DeepSpeed ZeRO-3, every parameter
    partitioned, sizes from the Trainer), ``fsdp2`` (``fully_shard`` per Llama decoder layer, then the
    root) or anything else (none: one process or DDP). A worker's own additions go to ZeRO's
    ``zero_optimization`` and to ``fsdp_config``."""
    if engine == "zero3":
        return {
            "deepspeed": {
                "zero_optimization": {
                    "stage": 3,
                    "stage3_param_persistence_threshold": 0,
                    **(zero_optimization or {}),
                },
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "train_batch_size": "auto",
                "gradient_clipping": "auto",
                "zero_allow_untested_optimizer": True,
            }
        }
    if engine == "fsdp2":
        return {
            "fsdp": "full_shard",
            "fsdp_config": {
                "fsdp_version": 2,
                "reshard_after_forward": True,
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                "cpu_ram_efficient_loading": False,
                **(fsdp_config or {}),
            },
        }
    return {}


def merge_parts(out_dir: str, expected: Any, parts: int = 2) -> None:
    """``OUT_DIR/single.pt``: the union of the dicts a worker's ``main_single`` saved as
    ``OUT_DIR/single-<part>.pt``, which must hold exactly the keys ``expected``."""
    results = {}
    for part in range(parts):
        results.update(torch.load(os.path.join(out_dir, f"single-{part}.pt"), weights_only=False))
    assert results.keys() == set(expected), f"parts hold {sorted(results)}, expected {sorted(expected)}"
    torch.save(results, os.path.join(out_dir, "single.pt"))
