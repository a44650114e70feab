"""Peak memory per rank of one ε-DPO training step under DDP, FSDP2 and DeepSpeed ZeRO-3 (CPU, gloo).

    python scripts/measure_engine_memory.py [--seq-len 1024] [--vocab 32000] [--hidden 512] [--json PATH]

Run it with the working directory outside the repository (its top-level ``kernels/`` folder must
not be on ``sys.path``), e.g. ``cd /tmp && python /path/to/repo/scripts/measure_engine_memory.py``.

Launches 2 gloo processes (``torch.multiprocessing.spawn``) that run, one after the other, each
engine configuration:

* ``ddp``: ``DistributedDataParallel``;
* ``fsdp2-root``: ``fully_shard`` per decoder layer, the LM head left to the root unit (with the
  embedding and the final norm), root ``reshard_after_forward=True``;
* ``fsdp2-head``: as ``fsdp2-root`` plus ``lm_head`` in its own unit (``reshard_after_forward=True``);
* ``zero3``: ``deepspeed.initialize``, ZeRO stage 3, ``stage3_param_persistence_threshold`` 0,
  ``gradient_clipping`` 0.0, other settings at DeepSpeed's defaults;

then one process without any engine (``single``, world size 1, the same per-rank batch) for
comparison. Model: a Llama built with ``AutoConfig.for_model("llama", ...)`` (no download), vocabulary
32000, hidden 512, 2 layers, intermediate 1024, 8 heads, untied head, fp32, ``torch.optim.AdamW``;
the reference is a copy prepared by ``prefloss.hf.prepare_reference``. Batch per rank: 2 pairs
(4 rows) of ``--seq-len`` tokens, the first 1/8 of each row a prompt shared by the pair (labels
-100 there). Loss: ``prefloss.EpsilonDPOLoss(beta=0.01, epsilon=0.01)``, defaults otherwise.

Each process first calls the loss once at the measured shapes on random inputs (the loss's
``torch.compile`` and its recompilations happen there). Per configuration and rank, after warm-up
(one full step and one plain step at 1/8 of the length, each with an optimizer step: lazy engine
initialisation, optimizer state, DDP's bucket rebuild, DeepSpeed's module trace), the measured
phases (``--phases``, default ``loss,plain``), each followed (unmeasured) by an optimizer step and
``zero_grad(set_to_none=True)``:

* ``loss``: the policy forward (``decoder_hidden_states``, with grad) and the reference forward
  (no grad) run first, unmeasured; measured is what comes after: the heads gathered by
  ``prefloss.hf.engines.gathered_heads``, the fused ε-DPO loss, and the backward (through the fused
  op, then through the model) -- the body of ``prefloss.hf.step.preference_loss`` after its forwards;
* ``step``: ``preference_loss(...)`` + backward, forwards included;
* ``plain``: ``model(..., logits_to_keep=1)`` + a reference forward (no grad) + backward of the trivial
  loss ``logits.mean()`` (last position only): what the same forward + backward costs without the
  preference loss.

The meter (``rss``): the process's resident-set high-water mark during the phase above its resident
set at the start (``/proc/self/clear_refs`` resets the mark; ``MALLOC_MMAP_THRESHOLD_`` is fixed at
64 KiB so freed large blocks go back to the OS and a later allocation shows up again), the same
meter as ``bench/``. It sees everything (engine buffers, gloo, FSDP2's unsharded parameters); it is
net of what the phase frees (the forward's activations, freed by the backward, make room).

``--tensor-meter`` adds a second run of each phase under a ``TorchDispatchMode`` (``tensors``: peak
live bytes of the storages torch ops create in the phase; see `_new_storage_bytes_mode`). It is
kept apart because it changes what it measures: under an active dispatch mode the loss's
``torch.compile``-d tile arithmetic runs as plain eager code, with ``[C, V_t]`` temporaries the
compiled code does not allocate (Dynamo: "skipping ... non-infra torch dispatch mode present"), and
goes on running eagerly after the mode is gone, so each such run is followed by
``torch._dynamo.reset()`` and a fresh compile; and it cannot see FSDP2's unsharded parameters
(storages grown by ``UntypedStorage.resize_``, outside the dispatcher). Measured numbers of both are in
docs/history/engines-memory-2026-12-02.md.

Also per rank: bytes held (unique storages) of parameters, master copies, gradients and optimizer
state after an optimizer step, the process RSS, and the full head ``V·H·4``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import re
import socket
import sys
import tempfile
import time

# Before torch is imported (and inherited by the spawned processes): freed blocks of >= 64 KiB go
# back to the OS at once, so the resident-set high-water mark follows the live allocations.
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

MiB = 2**20
ENGINE_CONFIGS = ("ddp", "fsdp2-root", "fsdp2-head", "zero3")
PAIRS_PER_RANK = 2
LAYERS, INTERMEDIATE, HEADS = 2, 1024, 8
LR = 1e-6
PHASES = ("loss", "step", "plain")


# --------------------------------------------------------------------------------------------------
# Meters


def _proc_status_kib(*keys: str) -> dict[str, int]:
    with open("/proc/self/status") as f:
        text = f.read()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) for k in keys}


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _new_storage_bytes_mode():
    """A ``TorchDispatchMode``: peak live bytes of the CPU tensor storages that torch ops *create*
    while it is active.

    Like ``prefloss.commands.train._live_tensor_bytes_mode``, except that an op's output whose storage is
    shared with one of the op's inputs (a view, an in-place op, an ``out=`` argument) is not
    counted: that mode counts the storage of any output it has not seen before, so a slice of a
    weight that existed before the phase adds the whole weight (measured: ``w[0:10].sum()`` of a
    4 MiB ``w`` reads 4 MiB), and under ZeRO-3 a view of DeepSpeed's 500M-element gradient bucket
    adds ~1.9 GiB that is never touched.
    """
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    def storage_of(t):
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            return None
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a wrapper subclass without storage
            return None
        return storage if storage.data_ptr() else None

    class NewStorageBytes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
            self.live = 0
            self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for key, (ref, nbytes) in list(self.storages.items()):
                if ref.expired():
                    del self.storages[key]
                    self.live -= nbytes
            inputs = set()
            for t in tree_flatten((args, kwargs or {}))[0]:
                storage = storage_of(t)
                if storage is not None:
                    inputs.add(storage.data_ptr())
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                storage = storage_of(t)
                if storage is None:
                    continue
                key = storage.data_ptr()
                if key not in inputs and key not in self.storages:
                    self.storages[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            return out

    return NewStorageBytes()


def measure(fn, tensor_meter: bool = False) -> dict[str, float]:
    """Run ``fn(mark)`` once; MiB. ``mark(name)`` records the peak(s) so far as ``{name}_rss_MiB``
    (and ``{name}_tensors_MiB``), e.g. at the end of the loss's forward part.

    Without ``tensor_meter``: the resident-set meter alone (``rss_MiB``). With it: the same run
    under `_new_storage_bytes_mode` as well (``tensors_MiB``, and its ``rss_MiB`` taken under the
    mode, which changes the computation: see the module docstring)."""
    import contextlib

    gc.collect()
    rss0 = _proc_status_kib("VmRSS")["VmRSS"]
    reset = _reset_rss_peak()
    marks: dict[str, float] = {}
    mode = _new_storage_bytes_mode() if tensor_meter else None
    with mode if mode is not None else contextlib.nullcontext():

        def mark(name: str) -> None:
            hwm = _proc_status_kib("VmHWM")["VmHWM"]
            marks[f"{name}_rss_MiB"] = (hwm - rss0) / 1024 if reset else float("nan")
            if mode is not None:
                marks[f"{name}_tensors_MiB"] = mode.peak / MiB

        t0 = time.perf_counter()
        fn(mark)
        seconds = time.perf_counter() - t0
    after = _proc_status_kib("VmRSS", "VmHWM")
    out = {
        "rss_MiB": (after["VmHWM"] - rss0) / 1024 if reset else float("nan"),
        "rss_after_MiB": (after["VmRSS"] - rss0) / 1024,
        "seconds": seconds,
        **marks,
    }
    if mode is not None:
        out["tensors_MiB"] = mode.peak / MiB
    return out


def _storage_bytes(tensors) -> int:
    """Bytes of the unique storages behind ``tensors`` (DTensors: their local shard)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        if hasattr(t, "to_local"):
            t = t.to_local()
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key and key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def _optimizer_state_tensors(opt) -> list[torch.Tensor]:
    return [
        v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor) and v.dim()
    ]


def held_bytes(config: str, policy, opt) -> dict[str, float]:
    """MiB held by this rank for the policy: parameters, fp32 master copies, gradients, optimizer state."""
    from prefloss.hf.model import unwrap_model

    inner = unwrap_model(policy)
    params = list(inner.parameters())
    if config == "zero3":
        zero = policy.optimizer  # DeepSpeedZeroOptimizer_Stage3
        out = {
            "params": _storage_bytes([p.ds_tensor for p in params]),
            "params_gathered_now": _storage_bytes([p.data for p in params if p.data.numel()]),
            "master": _storage_bytes(getattr(zero, "fp32_partitioned_groups_flat", [])),
            "grads": _storage_bytes([getattr(zero, "grad_partitions_flat_buffer", None)]),
            "optim_state": _storage_bytes(_optimizer_state_tensors(zero.optimizer)),
        }
    else:
        out = {
            "params": _storage_bytes(params),
            "params_gathered_now": 0,
            "master": 0,
            "grads": _storage_bytes([p.grad for p in params]),
            "optim_state": _storage_bytes(_optimizer_state_tensors(opt)),
        }
    out = {k: v / MiB for k, v in out.items()}
    out["rss_MiB"] = _proc_status_kib("VmRSS")["VmRSS"] / 1024
    return out


# --------------------------------------------------------------------------------------------------
# Model, data, engines


def build_model(vocab: int, hidden: int, seq_len: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=max(seq_len, 256),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def make_batch(rank: int, vocab: int, seq_len: int):
    """``[2B, T]`` ids, mask, labels (rows ``[0, B)`` chosen, ``[B, 2B)`` rejected, shared prompts)."""
    g = torch.Generator().manual_seed(1000 + rank)
    rows = 2 * PAIRS_PER_RANK
    ids = torch.randint(3, vocab, (rows, seq_len), generator=g)
    prompt = seq_len // 8
    ids[PAIRS_PER_RANK:, :prompt] = ids[:PAIRS_PER_RANK, :prompt]
    mask = torch.ones_like(ids)
    labels = torch.cat([ids[:, 1:], torch.full((rows, 1), -100)], dim=1)
    labels[:, : prompt - 1] = -100  # labels[t] is token t+1: the prompt's tokens are never targets
    return ids, mask, labels


def deepspeed_config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": PAIRS_PER_RANK,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def setup(config: str, model: torch.nn.Module, ref: torch.nn.Module):
    """(policy as the engine holds it, prepared reference, optimizer; the DeepSpeed engine for zero3)."""
    from prefloss.hf import engines

    if config.startswith("fsdp2"):
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        if config == "fsdp2-head":
            fully_shard(model.lm_head, reshard_after_forward=True)
        fully_shard(model, reshard_after_forward=True)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        return model, engines.prepare_reference(ref, model), opt
    if config == "zero3":
        import deepspeed

        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=LR), config=deepspeed_config()
        )
        return engine, engines.prepare_reference(ref, engine), engine
    if config == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        policy = DistributedDataParallel(model)
        return policy, engines.prepare_reference(ref, policy), torch.optim.AdamW(model.parameters(), lr=LR)
    assert config == "single"
    return model, engines.prepare_reference(ref, model), torch.optim.AdamW(model.parameters(), lr=LR)


# --------------------------------------------------------------------------------------------------
# One configuration on one rank


def run_config(config: str, rank: int, world: int, args, log) -> dict:
    import prefloss
    from prefloss.hf import engines
    from prefloss.hf.model import decoder_hidden_states
    from prefloss.hf.step import preference_loss

    t_config = time.perf_counter()
    model = build_model(args.vocab, args.hidden, args.seq_len)
    ref = copy.deepcopy(model)
    policy, ref, opt = setup(config, model, ref)
    loss_fn = prefloss.EpsilonDPOLoss(beta=0.01, epsilon=0.01)
    ids, mask, labels = make_batch(rank, args.vocab, args.seq_len)
    short = max(16, args.seq_len // 8)
    is_ds = config == "zero3"

    def backward(loss):
        if is_ds:
            policy.backward(loss)
        else:
            loss.backward()

    def optimizer_step():
        if is_ds:
            policy.step()  # also zeroes the gradients
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if world > 1:
            torch.distributed.barrier()

    def full_step(t: int = args.seq_len):
        out = preference_loss(loss_fn, policy, ids[:, :t], mask[:, :t], labels[:, :t], ref_model=ref)
        backward(out.loss)

    def plain_step(t: int = args.seq_len):
        kwargs = {
            "input_ids": ids[:, :t],
            "attention_mask": mask[:, :t],
            "use_cache": False,
            "logits_to_keep": 1,
        }
        logits = policy(**kwargs).logits
        with torch.no_grad():
            ref(**kwargs)
        backward(logits.float().mean())

    # The body of preference_loss after its forwards (prefloss/hf/step.py), for the ``loss`` phase.
    state: dict = {}

    def forwards():
        state["hidden"] = decoder_hidden_states(policy, ids, mask)
        with torch.no_grad():
            state["ref_hidden"] = decoder_hidden_states(ref, ids, mask)

    def loss_after_forwards(mark):
        hidden, ref_hidden = state.pop("hidden"), state.pop("ref_hidden")
        with engines.gathered_heads(policy, ref) as heads:
            state["gathered_heads_at_entry"] = heads.gathers
            kwargs = heads.policy.fused_kwargs()
            kwargs.update(ref_hidden=ref_hidden, ref_weight=heads.ref.weight, ref_bias=heads.ref.bias)
            out = loss_fn(heads.release_after_backward(hidden), heads.policy.weight, labels, **kwargs)
            loss = heads.gather_before_backward(out.loss)
        del hidden, ref_hidden, out, kwargs
        mark("fwd")  # the gathered heads are released again (or kept, where the engine keeps them)
        backward(loss)
        state["gathers"] = heads.gathers

    # Warm-up at 1/8 of the length (the engines' lazy initialisation, DDP's bucket rebuild at its 2nd
    # iteration, DeepSpeed's module trace, AdamW's state); the loss's torch.compile is warmed up once
    # per process at full length by `compile_warmup`.
    log(f"{config}: set up in {time.perf_counter() - t_config:.1f}s; warm-up (full + plain step, T={short})")
    t = time.perf_counter()
    full_step(short)
    optimizer_step()
    plain_step(short)
    optimizer_step()
    held = held_bytes(config, policy, opt)  # after an optimizer step: steady state
    log(f"{config}: warm-up {time.perf_counter() - t:.1f}s")

    result: dict = {"held": held}
    access = engines.head_access(policy)
    result["engine"] = access.engine
    result["head_gathered_between_steps"] = access.is_gathered()

    def run_phase(phase: str, tensor_meter: bool) -> dict:
        if world > 1:
            torch.distributed.barrier()
        if phase == "loss":
            forwards()
            result["head_gathered_after_forward"] = access.is_gathered()
            m = measure(loss_after_forwards, tensor_meter)
            m["gathers"] = state["gathers"]
        elif phase == "step":
            m = measure(lambda mark: full_step(), tensor_meter)
        else:
            m = measure(lambda mark: plain_step(), tensor_meter)
        optimizer_step()
        return m

    for phase in args.phases:
        m = run_phase(phase, tensor_meter=False)
        fwd = f" (forward part {m['fwd_rss_MiB']:.1f})" if "fwd_rss_MiB" in m else ""
        msg = f"{config}: {phase:5s} peak rss {m['rss_MiB']:6.1f} MiB{fwd} ({m['seconds']:.1f}s)"
        if args.tensor_meter:
            t = run_phase(phase, tensor_meter=True)
            m.update({f"mode_{k}": v for k, v in t.items()})
            fwd = f" (forward part {t['fwd_tensors_MiB']:.1f})" if "fwd_tensors_MiB" in t else ""
            msg += f"; under the dispatch mode: tensors {t['tensors_MiB']:6.1f}{fwd}, rss {t['rss_MiB']:6.1f}"
            if phase in ("loss", "step"):
                # Dynamo skipped the tile functions under the mode ("non-infra torch dispatch mode
                # present") and keeps running them eagerly afterwards (measured: the loss forward's
                # peak 128 instead of 51 MiB, 2.5x the time, for the rest of the process); a reset and
                # a fresh compile restore the compiled path for the next measurements.
                torch._dynamo.reset()
                compile_warmup(rank, args)
        result[phase] = m
        log(msg)
    result["seconds"] = time.perf_counter() - t_config
    return result


def compile_warmup(rank: int, args) -> float:
    """One call of the loss at the measured shapes (random inputs): ``torch.compile`` of its tile
    arithmetic (`prefloss.fused.tile_math`), with every recompilation those shapes trigger, happens here."""
    import prefloss

    t0 = time.perf_counter()
    _, _, labels = make_batch(rank, args.vocab, args.seq_len)
    g = torch.Generator().manual_seed(7)
    rows = labels.shape[0]
    hidden = torch.randn(rows, args.seq_len, args.hidden, generator=g).requires_grad_(True)
    weight = (0.02 * torch.randn(args.vocab, args.hidden, generator=g)).requires_grad_(True)
    ref_hidden = torch.randn(rows, args.seq_len, args.hidden, generator=g)
    loss_fn = prefloss.EpsilonDPOLoss(beta=0.01, epsilon=0.01)
    loss_fn(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=weight.detach()).loss.backward()
    return time.perf_counter() - t0


def _die_with_parent() -> None:
    """Linux: end this worker when the launching process dies (spawned workers outlive it otherwise)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl
        os._exit(1)


def worker(rank: int, world: int, configs: list[str], args, port: int, out_dir: str) -> None:
    import warnings

    _die_with_parent()

    # DeepSpeed 0.19 calls torch.distributed's deprecated all_gather_into_tensor/reduce_scatter_tensor.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")
    torch.set_num_threads(1)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - args.t_start:6.1f}s] world {world} rank {rank}: {msg}", flush=True)

    if world > 1:
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
        )
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # torch.distributed, gloo, used by every engine
    import prefloss  # noqa: F401  (import cost outside the first configuration's timing)

    results = {"rss_start_MiB": _proc_status_kib("VmRSS")["VmRSS"] / 1024}
    if "loss" in args.phases or "step" in args.phases:
        log("compiling the loss's tile arithmetic (one loss call at the measured shapes)")
        results["compile_warmup_s"] = compile_warmup(rank, args)
        log(f"compiled in {results['compile_warmup_s']:.1f}s")
    for config in configs:
        results[config] = run_config(config, rank, world, args, log)
        gc.collect()  # the configuration's models, engines and optimizer went out of scope
    results["seconds"] = time.perf_counter() - t0
    with open(os.path.join(out_dir, f"world{world}-rank{rank}.json"), "w") as f:
        json.dump(results, f)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# Report


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _versions() -> dict[str, str]:
    import deepspeed
    import transformers

    import prefloss

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "prefloss": getattr(prefloss, "__version__", "?"),
        "prefloss_git": _git_state(os.path.dirname(os.path.dirname(os.path.abspath(prefloss.__file__)))),
    }


def _git_state(path: str) -> str:
    """``<short commit>`` of the checkout prefloss was imported from, ``+dirty`` with local changes."""
    import subprocess

    try:
        commit = subprocess.run(
            ["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


# Table columns: (title, phase, key prefix); the loss phase also shows its forward part.
COLUMNS = {
    "loss": [("loss fwd part", "loss", "fwd_"), ("loss+bwd", "loss", "")],
    "step": [("full step", "step", "")],
    "plain": [("plain fwd+bwd", "plain", "")],
}


def table(rows: list[dict], head_MiB: float, phases: list[str], tensor_meter: bool) -> str:
    columns = [c for p in phases for c in COLUMNS[p]]
    width = 26 if tensor_meter else 13
    sub = f"{'rss':>8s} {'tensors':>8s} {'(rss)':>8s}" if tensor_meter else f"{'rss':>13s}"
    lines = [
        f"{'config':11s} {'rank':>4s} | "
        + " | ".join(f"{title:>{width}s}" for title, _, _ in columns)
        + f" | {'params':>7s} {'master':>7s} {'grads':>7s} {'optim':>7s} | {'RSS':>7s}",
        f"{'':11s} {'':>4s} | "
        + " | ".join([sub] * len(columns))
        + f" | {'held MiB per rank':^31s} | {'MiB':>7s}",
    ]
    lines.append("-" * len(lines[0]))
    for r in rows:
        h = r["held"]
        cells = []
        for _, p, prefix in columns:
            m = r[p]
            cell = f"{m[prefix + 'rss_MiB']:{8 if tensor_meter else 13}.1f}"
            if tensor_meter:
                cell += f" {m['mode_' + prefix + 'tensors_MiB']:8.1f} {m['mode_' + prefix + 'rss_MiB']:8.1f}"
            cells.append(cell)
        held = f"{h['params']:7.1f} {h['master']:7.1f} {h['grads']:7.1f} {h['optim_state']:7.1f}"
        lines.append(
            f"{r['config']:11s} {r['rank']:>4d} | {' | '.join(cells)} | {held} | {h['rss_MiB']:7.1f}"
        )
    lines.append(f"(full LM head V*H*4 = {head_MiB:.1f} MiB; all numbers MiB = 2^20 bytes)")
    return "\n".join(lines)


EXPLANATION = """\
What was measured, per rank, in MiB:
  loss+bwd      policy and reference forwards done first (not measured); then the heads gathered by
                prefloss.hf.engines.gathered_heads, the fused eps-DPO loss and the backward (fused op,
                then the whole model): what preference_loss adds on top of the forwards.
  loss fwd part the same phase's peak up to the end of the fused forward (heads gathered, loss
                computed, gathered_heads block left), before the backward starts.
  full step     preference_loss(...) + backward, forwards included.
  plain fwd+bwd model(..., logits_to_keep=1) + reference forward (no grad) + backward of logits.mean():
                the same forward/backward without the preference loss.
  rss           resident-set high-water mark in the phase above the resident set at its start.
  tensors (rss) --tensor-meter only: a second run of the phase under a TorchDispatchMode: peak live
                bytes of the storages torch ops create (views/in-place/out= of older storage not
                counted), and that run's rss. Under the mode the compiled tile arithmetic runs as
                eager code, and FSDP2's unsharded parameters (storage resize_) are not seen.
  held          unique storages after an optimizer step: parameters (ZeRO-3: its partitions), ZeRO-3's
                fp32 master partitions, gradients (ZeRO-3: its flat gradient-partition buffer; others
                are set to None between steps, so 0), AdamW state; RSS = whole process."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per row (default 1024)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size V (default 32000)")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size H (default 512)")
    parser.add_argument("--configs", default=",".join(ENGINE_CONFIGS), help="engine configurations to run")
    parser.add_argument(
        "--phases",
        default="loss,plain",
        help="measured phases, comma-separated, of: loss (after the forwards), plain, step (full "
        "preference_loss + backward; adds ~40 s per configuration). Default: loss,plain",
    )
    parser.add_argument(
        "--tensor-meter",
        action="store_true",
        help="run each phase a second time under a TorchDispatchMode tensor meter (2-3x the time)",
    )
    parser.add_argument("--no-single", action="store_true", help="skip the world-size-1 run without engine")
    parser.add_argument("--json", help="write the results as JSON here")
    args = parser.parse_args()
    if args.seq_len < 16:
        parser.error("--seq-len must be at least 16")
    args.phases = [p for p in args.phases.split(",") if p]
    if not args.phases or set(args.phases) - set(PHASES):
        parser.error(f"--phases: choose from {PHASES}")
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(ENGINE_CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; choose from {ENGINE_CONFIGS}")
    args.t_start = time.perf_counter()
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.abspath(os.getcwd()) == repo_root or repo_root in map(os.path.abspath, sys.path):
        print(
            "warning: the repository root is on sys.path (its kernels/ folder shadows prefloss.kernels' "
            "imports); run from another directory",
            file=sys.stderr,
        )

    world = 2
    head_MiB = args.vocab * args.hidden * 4 / MiB
    print(
        f"eps-DPO step memory: V={args.vocab} H={args.hidden} layers={LAYERS} T={args.seq_len} "
        f"{PAIRS_PER_RANK} pairs/rank fp32; head V*H*4 = {head_MiB:.1f} MiB; "
        f"{world} gloo ranks: {', '.join(configs)}" + ("" if args.no_single else "; then world 1: single"),
        flush=True,
    )
    rows = []
    raw = {}
    with tempfile.TemporaryDirectory() as out_dir:
        runs = [(world, configs)] + ([] if args.no_single else [(1, ["single"])])
        for w, cfgs in runs:
            if not cfgs:
                continue
            torch.multiprocessing.spawn(worker, args=(w, cfgs, args, _free_port(), out_dir), nprocs=w)
            for rank in range(w):
                with open(os.path.join(out_dir, f"world{w}-rank{rank}.json")) as f:
                    data = json.load(f)
                raw[f"world{w}-rank{rank}"] = data
                for c in cfgs:
                    rows.append({"config": c, "rank": rank, "world": w, **data[c]})
    runtime = time.perf_counter() - args.t_start
    print()
    print(table(rows, head_MiB, args.phases, args.tensor_meter))
    print()
    print(EXPLANATION)
    print(f"\ntotal runtime {runtime:.0f}s on {os.cpu_count()} x {_cpu_name()}")
    if args.json:
        payload = {
            "settings": {
                "seq_len": args.seq_len,
                "phases": args.phases,
                "tensor_meter": args.tensor_meter,
                "vocab": args.vocab,
                "hidden": args.hidden,
                "layers": LAYERS,
                "intermediate": INTERMEDIATE,
                "heads": HEADS,
                "pairs_per_rank": PAIRS_PER_RANK,
                "dtype": "float32",
                "loss": "EpsilonDPOLoss(beta=0.01, epsilon=0.01)",
                "optimizer": f"AdamW(lr={LR})",
                "deepspeed_config": deepspeed_config(),
                "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            },
            "head_MiB": head_MiB,
            "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()},
            "versions": _versions(),
            "runtime_s": runtime,
            "rows": rows,
            "per_process": {
                k: {"rss_start_MiB": v["rss_start_MiB"], "seconds": v["seconds"]} for k, v in raw.items()
            },
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
