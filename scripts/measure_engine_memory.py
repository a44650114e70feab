"""Peak memory per rank of one ε-DPO training step under DDP, FSDP2 and DeepSpeed ZeRO-3 (CPU, gloo).

    cd /tmp && python /path/to/repo/scripts/measure_engine_memory.py [--seq-len 1024] [--vocab 32000]
        [--hidden 512] [--phases loss,plain] [--configs ddp,...] [--no-single] [--json PATH]

Run it from outside the repository (its ``kernels/`` folder must not be on ``sys.path``). It puts
``tests/workers/`` on ``sys.path`` for the engine tests' helpers (tests/workers/worker_setup.py):
``launch`` forks the ranks, ``distributed_env`` and ``free_port`` give their gloo rendezvous,
``engine_arguments("zero3")`` the ZeRO-3 settings. 2 ranks run, one after the other, ``ddp``
(``DistributedDataParallel``), ``fsdp2-root`` (``fully_shard`` per decoder layer, then the root, whose
unit holds ``lm_head`` with the embedding; ``reshard_after_forward=True``), ``fsdp2-head`` (the same
plus ``lm_head`` in its own unit) and ``zero3`` (``deepspeed.initialize``, stage 3,
``stage3_param_persistence_threshold`` 0, ``gradient_clipping`` 0.0); then one process without
engine, ``single`` (world size 1, the same per-rank batch). Model: a Llama from
``AutoConfig.for_model`` (no download), 2 layers, intermediate 1024, 8 heads, untied head, fp32,
``torch.optim.AdamW``; the reference is a copy prepared by ``prefloss.hf.prepare_reference``. Per rank
2 pairs (4 rows) of ``--seq-len`` tokens, the first 1/8 a prompt shared by the pair (labels -100).

Each process first calls the loss (``prefloss.EpsilonDPOLoss(beta=0.01, epsilon=0.01)``) once at the
measured shapes, so ``torch.compile`` runs before any measurement; each configuration warms up with
one full and one plain step at 1/8 of the length. Every measured phase (``--phases``) is followed,
unmeasured, by an optimizer step and ``zero_grad(set_to_none=True)``:

* ``loss``: after the policy and reference forwards (not measured), the rest of
  ``prefloss.hf.step.preference_loss``: the heads gathered by ``prefloss.hf.engines.gathered_heads``,
  the fused loss and the backward; ``fwd_rss_MiB`` is its peak up to the end of the fused forward;
* ``step``: ``preference_loss(...)`` + backward, forwards included;
* ``plain``: ``model(..., logits_to_keep=1)`` + a reference forward + backward of ``logits.mean()``.

The meter is the bench's (``prefloss.benchmark.measure.run_measured``): the resident-set peak of the
phase above the resident set at its start, with glibc's ``MALLOC_ENV`` (the script re-executes itself
with it; the forked ranks inherit it). It sees engine buffers, gloo and FSDP2's unsharded parameters,
net of what the phase frees. "Held", per rank after an optimizer step: unique storages of parameters,
ZeRO-3's fp32 master partitions, gradients, AdamW state; and the process RSS. Machine and versions:
``prefloss.benchmark.machine``. The former ``--tensor-meter`` (a ``TorchDispatchMode``) is gone: under
it the compiled tile arithmetic runs eagerly and FSDP2's unsharded parameters are invisible; see
docs/history/engines-memory-2026-12-02.md.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import tempfile
import time
import warnings
from importlib import metadata

for _key, _value in {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}.items():
    os.environ.setdefault(_key, _value)
import torch  # noqa: E402

import prefloss  # noqa: E402
from prefloss.benchmark import machine  # noqa: E402
from prefloss.benchmark.measure import MALLOC_ENV, MIB, cpu_peak_supported, resident_mib, run_measured  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests", "workers"))  # the engine workers' helpers
from worker_setup import distributed_env, engine_arguments, free_port, launch  # noqa: E402

ENGINE_CONFIGS, PHASES = ("ddp", "fsdp2-root", "fsdp2-head", "zero3"), ("loss", "step", "plain")
PAIRS_PER_RANK, LAYERS, INTERMEDIATE, HEADS, LR, WORLD = 2, 2, 1024, 8, 1e-6, 2
LOSS = "EpsilonDPOLoss(beta=0.01, epsilon=0.01)"


def make_loss() -> torch.nn.Module:
    return prefloss.EpsilonDPOLoss(beta=0.01, epsilon=0.01)  # what LOSS names


def deepspeed_config(world: int) -> dict:
    sizes = {"train_micro_batch_size_per_gpu": PAIRS_PER_RANK, "train_batch_size": PAIRS_PER_RANK * world}
    fixed = {"gradient_accumulation_steps": 1, "gradient_clipping": 0.0, "steps_per_print": 10**9}
    return {**engine_arguments("zero3")["deepspeed"], **sizes, **fixed}


def setup(config: str, model: torch.nn.Module, ref: torch.nn.Module, world: int):
    """(policy as the engine holds it, prepared reference, optimizer: the DeepSpeed engine for zero3)."""
    from prefloss.hf import engines

    if config.startswith("fsdp2"):
        from torch.distributed.fsdp import fully_shard

        for module in [*model.model.layers, *[model.lm_head] * (config == "fsdp2-head"), model]:
            fully_shard(module, reshard_after_forward=True)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    if config == "zero3":
        import deepspeed

        model, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(world))
        opt = model
    elif config == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    return model, engines.prepare_reference(ref, model), opt


def storage_mib(tensors) -> float:
    """MiB of the unique storages behind ``tensors`` (DTensors: their local shard)."""
    storages = {}
    for t in tensors:
        if t is not None:
            s = (t.to_local() if hasattr(t, "to_local") else t).untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(v for k, v in storages.items() if k) / MIB


def held_mib(config: str, policy, opt) -> dict[str, float]:
    """MiB this rank holds: parameters (ZeRO-3: its partitions; ``params_gathered_now``: full ones it
    holds), fp32 master partitions, gradients (ZeRO-3: its flat buffer), optimizer state; process RSS."""
    from prefloss.hf.model import unwrap_model

    params, zero = list(unwrap_model(policy).parameters()), getattr(policy, "optimizer", None)
    states = (zero.optimizer if config == "zero3" else opt).state.values()
    out = {"params": storage_mib(params), "params_gathered_now": 0.0, "master": 0.0}
    out["grads"] = storage_mib(p.grad for p in params)
    out["optim_state"] = storage_mib(v for s in states for v in s.values() if torch.is_tensor(v) and v.dim())
    if config == "zero3":  # zero: DeepSpeedZeroOptimizer_Stage3
        out["params"] = storage_mib(p.ds_tensor for p in params)
        out["params_gathered_now"] = storage_mib(p.data for p in params if p.data.numel())
        out["master"] = storage_mib(getattr(zero, "fp32_partitioned_groups_flat", []))
        out["grads"] = storage_mib([getattr(zero, "grad_partitions_flat_buffer", None)])
    return {**out, "rss_MiB": resident_mib()[0]}


def measured(fn) -> dict[str, float]:
    """``fn(mark)`` under the bench's resident-set meter; MiB above the resident set at the start.
    ``mark(name)`` records the high-water mark so far as ``{name}_rss_MiB``."""
    start, marks = {}, {}

    def before() -> None:
        gc.collect()
        start["rss"] = resident_mib()[0]

    def mark(name: str) -> None:
        marks[f"{name}_rss_MiB"] = resident_mib()[1] - start["rss"]

    m = run_measured(lambda: fn(mark), torch.device("cpu"), before)
    after = resident_mib()[0] - start["rss"]
    return {"rss_MiB": m.peak_bytes / MIB, "rss_after_MiB": after, "seconds": m.seconds, **marks}


def build_model(args) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=INTERMEDIATE)
    sizes.update(num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS)
    tokens = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    config = AutoConfig.for_model("llama", **sizes, **tokens, max_position_embeddings=max(args.seq_len, 256))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def make_batch(rank: int, args):
    """``[2B, T]`` ids, mask, labels (rows ``[0, B)`` chosen, ``[B, 2B)`` rejected, shared prompts)."""
    g = torch.Generator().manual_seed(1000 + rank)
    rows, prompt = 2 * PAIRS_PER_RANK, args.seq_len // 8
    ids = torch.randint(3, args.vocab, (rows, args.seq_len), generator=g)
    ids[PAIRS_PER_RANK:, :prompt] = ids[:PAIRS_PER_RANK, :prompt]
    labels = torch.cat([ids[:, 1:], torch.full((rows, 1), -100)], dim=1)
    labels[:, : prompt - 1] = -100  # labels[t] is token t+1: the prompt's tokens are never targets
    return ids, torch.ones_like(ids), labels


def run_config(config: str, rank: int, world: int, args, log) -> dict:
    from prefloss.hf import engines
    from prefloss.hf.model import decoder_hidden_states
    from prefloss.hf.step import preference_loss

    t_config = time.perf_counter()
    model = build_model(args)
    policy, ref, opt = setup(config, model, copy.deepcopy(model), world)
    loss_fn, (ids, mask, labels) = make_loss(), make_batch(rank, args)
    backward = policy.backward if config == "zero3" else torch.Tensor.backward

    def optimizer_step() -> None:
        opt.step()  # DeepSpeed's engine also zeroes the gradients
        if config != "zero3":
            opt.zero_grad(set_to_none=True)
        if world > 1:
            torch.distributed.barrier()

    def full_step(t: int = args.seq_len) -> None:
        backward(preference_loss(loss_fn, policy, ids[:, :t], mask[:, :t], labels[:, :t], ref_model=ref).loss)

    def plain_step(t: int = args.seq_len) -> None:
        kwargs = dict(input_ids=ids[:, :t], attention_mask=mask[:, :t], use_cache=False, logits_to_keep=1)
        logits = policy(**kwargs).logits
        with torch.no_grad():
            ref(**kwargs)
        backward(logits.float().mean())

    state: dict = {}

    def loss_after_forwards(mark) -> None:  # preference_loss (prefloss/hf/step.py) after its forwards
        hidden, ref_hidden = state.pop("hidden"), state.pop("ref_hidden")
        with engines.gathered_heads(policy, ref) as heads:
            kwargs = heads.policy.fused_kwargs()
            kwargs.update(ref_hidden=ref_hidden, ref_weight=heads.ref.weight, ref_bias=heads.ref.bias)
            out = loss_fn(heads.release_after_backward(hidden), heads.policy.weight, labels, **kwargs)
            loss = heads.gather_before_backward(out.loss)
        del hidden, ref_hidden, out, kwargs
        mark("fwd")
        backward(loss)
        state["gathers"] = heads.gathers

    short = max(16, args.seq_len // 8)  # warm-up: lazy engine init, AdamW state, DDP buckets, ZeRO-3 trace
    log(f"{config}: set up in {time.perf_counter() - t_config:.1f}s; warm-up (full + plain step, T={short})")
    for step in (full_step, plain_step):
        step(short)
        optimizer_step()
    access = engines.head_access(policy)
    result = {"held": held_mib(config, policy, opt), "engine": access.engine}
    result["head_gathered_between_steps"] = access.is_gathered()
    for phase in args.phases:
        if world > 1:
            torch.distributed.barrier()
        if phase == "loss":
            state["hidden"] = decoder_hidden_states(policy, ids, mask)
            with torch.no_grad():
                state["ref_hidden"] = decoder_hidden_states(ref, ids, mask)
            result["head_gathered_after_forward"] = access.is_gathered()
            m = {**measured(loss_after_forwards), "gathers": state["gathers"]}
        else:
            m = measured(lambda mark, step=full_step if phase == "step" else plain_step: step())
        optimizer_step()
        result[phase] = m
        fwd = f" (forward part {m['fwd_rss_MiB']:.1f})" if "fwd_rss_MiB" in m else ""
        log(f"{config}: {phase:5s} peak rss {m['rss_MiB']:6.1f} MiB{fwd} ({m['seconds']:.1f}s)")
    return {**result, "seconds": time.perf_counter() - t_config}


def compile_warmup(rank: int, args) -> None:
    """One loss call at the measured shapes on random inputs: ``torch.compile`` of the tile arithmetic
    (`prefloss.fused.tile_math`), with every recompilation those shapes trigger, happens here."""
    labels = make_batch(rank, args)[2]
    hidden, ref_hidden = (torch.randn(*labels.shape, args.hidden) for _ in range(2))
    weight = 0.02 * torch.randn(args.vocab, args.hidden)
    refs = dict(ref_hidden=ref_hidden, ref_weight=weight)
    make_loss()(hidden.requires_grad_(), weight.clone().requires_grad_(), labels, **refs).loss.backward()


def worker(rank: int, world: int, configs: list[str], args, port: int, out_dir: str) -> None:
    # DeepSpeed 0.19 calls torch.distributed's deprecated all_gather_into_tensor/reduce_scatter_tensor.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")
    torch.set_num_threads(1)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - args.t_start:6.1f}s] world {world} rank {rank}: {msg}", flush=True)

    if world > 1:
        import deepspeed

        os.environ.update(distributed_env(rank, world, port))
        deepspeed.init_distributed(dist_backend="gloo")  # torch.distributed, gloo, used by every engine
    results = {"rss_start_MiB": resident_mib()[0]}
    if {"loss", "step"} & set(args.phases):
        log("compiling the loss's tile arithmetic (one loss call at the measured shapes)")
        t = time.perf_counter()
        compile_warmup(rank, args)
        results["compile_warmup_s"] = time.perf_counter() - t
        log(f"compiled in {results['compile_warmup_s']:.1f}s")
    for config in configs:
        results[config] = run_config(config, rank, world, args, log)
        gc.collect()
    with open(os.path.join(out_dir, f"world{world}-rank{rank}.json"), "w") as f:
        json.dump({**results, "seconds": time.perf_counter() - t0}, f)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# Table columns per phase: (title, key prefix); the loss phase also shows its forward part.
COLUMNS = {"loss": [("loss fwd part", "fwd_"), ("loss+bwd", "")], "step": [("full step", "")]}
COLUMNS["plain"] = [("plain fwd+bwd", "")]
HELD_TITLE = " params  master   grads   optim"
EXPLANATION = """\
Per rank, MiB = 2^20 bytes: the phase's resident-set peak above the resident set at its start.
  loss fwd part / loss+bwd  after the forwards (not measured): the heads gathered and the fused loss,
                            up to the end of its forward / with the backward (prefloss.hf.step's body)
  full step                 preference_loss(...) + backward, forwards included
  plain fwd+bwd             model(..., logits_to_keep=1) + reference forward + backward of logits.mean()
  held / RSS                unique storages after an optimizer step (module docstring) / whole process"""


def table(rows: list[dict], phases: list[str]) -> str:
    columns = [(p, title, prefix) for p in phases for title, prefix in COLUMNS[p]]
    held = ("params", "master", "grads", "optim_state")
    head = " | ".join(["config      rank", *(f"{c[1]:>13s}" for c in columns), HELD_TITLE])
    lines = [head + " |     RSS", "-" * (len(head) + 10)]
    for r in rows:
        cells = [f"{r[p][prefix + 'rss_MiB']:13.1f}" for p, _, prefix in columns]
        cells.append(" ".join(f"{r['held'][k]:7.1f}" for k in held) + f" | {r['held']['rss_MiB']:7.1f}")
        lines.append(" | ".join([f"{r['config']:11s} {r['rank']:>4d}", *cells]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per row (default 1024)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size V (default 32000)")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size H (default 512)")
    parser.add_argument("--configs", default=",".join(ENGINE_CONFIGS), help="engine configurations to run")
    parser.add_argument("--phases", default="loss,plain", help=f"phases of {PHASES} (default loss,plain)")
    parser.add_argument("--no-single", action="store_true", help="skip the world-size-1 run without engine")
    parser.add_argument("--json", help="write the results as JSON here")
    args = parser.parse_args()
    args.phases, configs = [p for p in args.phases.split(",") if p], [c for c in args.configs.split(",") if c]
    if args.seq_len < 16:
        parser.error(f"--seq-len must be at least 16, got {args.seq_len}")
    if not args.phases or set(args.phases) - set(PHASES) or set(configs) - set(ENGINE_CONFIGS):
        parser.error(f"--phases of {PHASES}, --configs of {ENGINE_CONFIGS}; got {args.phases}, {configs}")
    if not cpu_peak_supported():
        parser.error("the resident-set meter needs Linux's /proc/self/clear_refs")
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):  # glibc reads them at process start
        os.execve(sys.executable, sys.orig_argv, {**os.environ, **MALLOC_ENV})
    if os.path.abspath(os.getcwd()) == REPO or REPO in map(os.path.abspath, sys.path):
        print("warning: the repository root is on sys.path (its kernels/ shadows imports)", file=sys.stderr)
    args.t_start, head_mib = time.perf_counter(), args.vocab * args.hidden * 4 / MIB
    runs = [(WORLD, configs)] * bool(configs) + [(1, ["single"])] * (not args.no_single)
    shape = f"V={args.vocab} H={args.hidden} layers={LAYERS} T={args.seq_len} {PAIRS_PER_RANK} pairs/rank"
    plan = "; then ".join(f"world {w}: {', '.join(c)}" for w, c in runs)
    print(f"eps-DPO step memory: {shape} fp32; head V*H*4 = {head_mib:.1f} MiB; {plan}", flush=True)
    rows, per_process = [], {}
    with tempfile.TemporaryDirectory() as out:
        for world, cfgs in runs:
            launch(worker, (world, cfgs, args, free_port(), out), world, preload=("deepspeed", "prefloss.hf"))
            for rank in range(world):
                with open(os.path.join(out, f"world{world}-rank{rank}.json")) as f:
                    data = json.load(f)
                per_process[f"world{world}-rank{rank}"] = {k: data[k] for k in ("rss_start_MiB", "seconds")}
                rows += [{"config": c, "rank": rank, "world": world, **data[c]} for c in cfgs]
    runtime, info = time.perf_counter() - args.t_start, machine.describe("cpu")
    print(f"\n{table(rows, args.phases)}\n(full LM head V*H*4 = {head_mib:.1f} MiB)\n\n{EXPLANATION}\n")
    print(f"total runtime {runtime:.0f}s on {machine.one_line(info)}")
    if args.json:
        settings = {k: getattr(args, k) for k in ("seq_len", "phases", "vocab", "hidden")}
        settings.update(layers=LAYERS, intermediate=INTERMEDIATE, heads=HEADS, pairs_per_rank=PAIRS_PER_RANK)
        settings.update(dtype="float32", loss=LOSS, optimizer=f"AdamW(lr={LR})", **MALLOC_ENV)
        settings["deepspeed_config"] = deepspeed_config(WORLD)
        versions = {**info.pop("versions"), **{m: metadata.version(m) for m in ("deepspeed", "transformers")}}
        payload = dict(settings=settings, head_MiB=head_mib, machine=info, versions=versions)
        with open(args.json, "w") as f:
            json.dump(
                {**payload, "runtime_s": runtime, "rows": rows, "per_process": per_process}, f, indent=1
            )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
