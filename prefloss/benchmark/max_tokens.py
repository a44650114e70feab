"""``prefloss bench --max-tokens``: the most tokens per step whose forward+backward fits a memory budget.

For each case, at a stated shape (``B`` pairs, hidden size ``H``, vocabulary ``V``, dtype), the
search finds the largest sequence length ``T`` (a multiple of `QUANTUM`) whose step peak stays
within the budget; the figure reported is the step's tokens ``2B·T``. A probe at ``T`` runs two
forward+backward steps on fresh inputs of that shape and takes the second one's peak
(`prefloss.benchmark.measure.run_measured`: the step's own peak, gradients included, the inputs
not), as the timed bench does after its warm-up: the first step at a shape may also hold one-time
costs (torch.compile's, on CPU host memory; on a GPU not device memory). A probe that raises an
out-of-memory error (the probe's own cap, `probe_cap_bytes`, stops it before the machine runs
short) does not fit.

`search` is the bisection, independent of what is measured: two small probes (``T0`` and ``2·T0``),
then, while every probe fits, the next aims at the ``T*`` where the line ``peak ≈ a + b·T`` through
the two largest fitting probes meets the budget: just below it first (``T*·(1 − 0.4·r)``: a probe
that fits costs less than one past the limit), then just past it (``T*·(1 + 0.4·r)``), each at most
`GROWTH` (2) times the largest fit. A chunked case's buffers bend the line at small ``T``, or
flatten it (buffers that shrink as ∂hidden grows): aimed up to 8 times past the largest fit, the
search probed 1.7–2 times past the limit, its costliest probe; trusting a line that had predicted
the last peak within 5 % (16 times) did the same on a flat stretch. When the peak is not affine
there (a chunk boundary, a cap on chunk rows), plain bisection of the bracket (``lo`` fits, ``hi``
does not), each probe placed by interpolating the two measured peaks within the bracket's middle
half, until ``hi − lo ≤ max(QUANTUM, r·lo)``. The same search runs over
`prefloss.commands.plan`'s MODEL of the CUDA step (`plan_max_tokens`).

Each case runs in its own fresh process (`prefloss.benchmark.worker`, mode ``max_tokens``), as
the timed bench does, under the process cap ``--mem-limit-gib``.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass

QUANTUM = 32  # T is a multiple of 32: prompt T/8 and padding (i mod 8)·T/32 stay whole (inputs.py)
# V/H = 64, the timed sweep's ratio (32000/512): full-logits methods need ~16·V bytes per token, the
# chunked ones ~4·H, so the figure's ratios carry over; small enough that a chunked case's last
# probes (~10^5 tokens) take seconds.
DEFAULT_SHAPE = {"batch": 1, "hidden": 64, "vocab": 4096, "dtype": "float32"}
DEFAULT_BUDGET_GIB = 0.0625
DEFAULT_RESOLUTION = 1 / 16
DEFAULT_START = 256  # the first probe's T
DEFAULT_CAP = 1 << 20  # the largest T probed; a case fitting there is reported as ">= cap"
GROWTH = 2  # while nothing exceeds the budget, a probe's T is at most this times the largest fit
MIB = 1024 * 1024


@dataclass
class Search:
    """Outcome of `search`: ``fits`` is the largest ``T`` seen to fit (0: none), ``exceeds`` the
    smallest seen not to (``None``: none up to the cap), ``probes`` every ``(T, peak bytes or None
    for out of memory)`` in the order probed."""

    fits: int
    exceeds: int | None
    probes: list[tuple[int, float | None]]

    @property
    def capped(self) -> bool:
        return self.exceeds is None


def search(
    peak_at: Callable[[int], float | None],
    budget: float,
    *,
    quantum: int = QUANTUM,
    start: int = DEFAULT_START,
    cap: int = DEFAULT_CAP,
    resolution: float = DEFAULT_RESOLUTION,
) -> Search:
    """The largest ``T`` (a multiple of ``quantum``, ``≤ cap``) with ``peak_at(T) ≤ budget``.

    Args:
        peak_at: ``T`` → peak bytes of the step at that ``T``; ``None`` when it ran out of memory.
            Assumed non-decreasing in ``T`` (the search trusts a bracket once it has one).
        budget: bytes.
        quantum, start, cap: the grid of ``T`` (``start`` and ``cap`` rounded to it).
        resolution: stop when the bracket ``(fits, exceeds)`` is within ``max(quantum,
            resolution·fits)``.

    Returns:
        `Search` (``fits`` within ``resolution`` of the true limit when the peak is monotone).
    """
    if budget <= 0 or not math.isfinite(budget):
        raise ValueError(f"`budget` must be a positive number of bytes, got {budget!r}.")
    if quantum < 1 or start < 1 or cap < 1 or not 0 < resolution < 1:
        raise ValueError(
            f"`quantum`, `start`, `cap` must be >= 1 and `resolution` in (0, 1), got "
            f"{quantum}, {start}, {cap}, {resolution}."
        )
    cap = max(quantum, cap // quantum * quantum)
    probes: list[tuple[int, float | None]] = []
    seen: dict[int, float | None] = {}
    lo, hi = 0, None

    def probe(t: int) -> bool:
        nonlocal lo, hi
        t = min(cap, max(quantum, t // quantum * quantum))
        if t not in seen:
            seen[t] = peak_at(t)
            probes.append((t, seen[t]))
        ok = seen[t] is not None and seen[t] <= budget
        if ok and t > lo:
            lo = t
        if not ok and (hi is None or t < hi):
            hi = t
        return ok

    def fitted() -> list[tuple[int, float]]:
        return sorted((t, p) for t, p in seen.items() if p is not None)

    def affine_target() -> float | None:
        """``T`` where the line through the two measured probes closest to the budget meets it."""
        pts = fitted()
        below = [q for q in pts if q[1] <= budget][-1:]
        above = [q for q in pts if q[1] > budget][:1]
        pair = below + above if below and above else pts[-2:]
        if len(pair) < 2 or pair[1][1] <= pair[0][1]:
            return None
        (t0, p0), (t1, p1) = pair
        return t0 + (budget - p0) * (t1 - t0) / (p1 - p0)

    def done() -> bool:
        return hi is not None and hi - lo <= max(quantum, resolution * lo)

    start = min(cap, max(quantum, start // quantum * quantum))
    if probe(start) and start < cap:
        probe(2 * start)
    # Grow until there is a bracket: aim where the line through the two largest fitting probes meets
    # the budget (T*), at most `GROWTH` times the largest fit (a chunked case's buffers bend or
    # flatten that line at small T, and it aims far past the limit). Aim just below T* first (a probe
    # that fits costs less than one past the limit, and the line through it is the better one),
    # then just past it once the bracket would be within the resolution.
    while hi is None and lo < cap:
        target = affine_target()
        if target is None:  # a flat or falling peak (a chunked case's buffers): no estimate
            t = GROWTH * lo
        elif lo >= target * (1 - 0.6 * resolution):
            t = min(GROWTH * lo, target * (1 + 0.4 * resolution))
        else:
            t = min(GROWTH * lo, target * (1 - 0.4 * resolution))
        before = lo
        probe(max(lo + quantum, math.ceil(t / quantum) * quantum))
        if hi is None and lo == before:
            break  # the cap
        if hi is not None and not done():  # overshot: try just below the estimate once
            target = affine_target()
            if target is not None and lo < target * (1 - 0.4 * resolution) < hi:
                probe(int(target * (1 - 0.4 * resolution)))
    if lo == 0 and hi is not None and hi > quantum:  # even the start does not fit
        hi_before = None
        while hi != hi_before and not done():
            hi_before = hi
            probe(max(quantum, hi // 2))
    # Bisection of the bracket, each probe interpolated within its middle half.
    while hi is not None and not done():
        width = hi - lo
        target = affine_target()
        mid = lo + width / 2 if target is None else min(hi - width / 4, max(lo + width / 4, target))
        t = int(mid) // quantum * quantum
        if t <= lo:
            t = lo + quantum
        if t >= hi:
            break
        probe(t)
    return Search(lo, hi, probes)


def probe_cap_bytes(budget: float, inputs_bytes: float) -> float:
    """Address space a probe may add (RLIMIT_DATA, as the bench's case processes): the inputs, twice
    the budget and 512 MiB for allocator slack. A step that needs more is over the budget anyway."""
    return inputs_bytes + 2 * budget + 512 * MIB


def case_peak(case, base, t: int, *, seed: int, device: str, budget: float) -> float | None:
    """Peak bytes of ``case``'s step at ``base`` with ``seq_len=t``: the second of two steps on fresh
    inputs (the first is a warm-up, as in the timed bench); ``None`` when either ran out of memory."""
    import dataclasses
    import resource

    import torch

    from prefloss.benchmark.inputs import make_inputs
    from prefloss.benchmark.measure import _proc_status_kib, run_measured
    from prefloss.benchmark.protocol import is_oom

    shape = dataclasses.replace(base, seq_len=t)
    rows, size = shape.rows, torch.tensor([], dtype=shape.torch_dtype).element_size()
    inputs_bytes = (2 * rows * t * shape.hidden + 2 * shape.vocab * shape.hidden) * size + rows * t * 8
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if device == "cpu":
        limit = _proc_status_kib("VmData") * 1024 + int(probe_cap_bytes(budget, inputs_bytes))
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    x = step = None
    try:
        x = make_inputs(shape, seed=seed, device=device)
        step = case.build(x)

        def zero_grads():
            x.hidden.grad = None
            x.weight.grad = None

        dev = torch.device(device)
        run_measured(step, dev, zero_grads)  # warm-up: one-time costs (torch.compile) stay out
        return run_measured(step, dev, zero_grads).peak_bytes
    except Exception as exc:
        if is_oom(exc):
            return None
        raise
    finally:
        x = step = None  # the inputs and the step's graph go before the next probe
        gc.collect()
        if device == "cpu":
            resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def run_case(spec: dict, shape_dict: dict) -> dict:
    """The worker's ``max_tokens`` mode: `search` over ``T`` for ``spec["case"]`` at ``shape_dict``."""
    import time

    from prefloss.benchmark.cases import CASES
    from prefloss.benchmark.inputs import Shape

    case = CASES[spec["case"]]
    base = Shape(**shape_dict)
    budget = spec["budget_gib"] * 1024**3
    t0 = time.perf_counter()

    def peak_at(t: int) -> float | None:
        return case_peak(case, base, t, seed=spec["seed"], device=spec["device"], budget=budget)

    found = search(peak_at, budget, start=spec["start"], cap=spec["cap"], resolution=spec["resolution"])
    return {
        "status": "ok",
        **result_record(found, base.batch),
        "seconds": time.perf_counter() - t0,
    }


def result_record(found: Search, batch: int) -> dict:
    """JSON record of a `Search` over ``T`` at ``batch`` pairs: tokens per step are ``2·batch·T``."""
    return {
        "max_seq_len": found.fits,
        "max_tokens": 2 * batch * found.fits,
        "first_over_seq_len": found.exceeds,
        "capped": found.capped,
        "probes": [{"seq_len": t, "peak_mib": None if p is None else p / MIB} for t, p in found.probes],
    }


DEFAULT_CASES = (
    "prefloss-torch/dpo",
    "prefloss-torch/epsilon_dpo",
    "prefloss-torch-frozen/dpo",
    "authors/dpo",
    "authors/epsilon_dpo",
    "liger/dpo",
    "trl/dpo",
    "torch-lce/dpo",
)  # one DPO per method (every method has it), and ε-DPO where it exists; --cases picks others


def run(
    cases: list,
    base,
    *,
    budget_gib: float,
    seed: int,
    device: str,
    mem_limit_gib: float | None,
    timeout_s: float,
    threads: int | None,
    start: int,
    cap: int,
    resolution: float,
    jobs: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """One fresh process per case (`prefloss.benchmark.worker`, mode ``max_tokens``), each running
    `search` over ``T`` at the shape ``base``; one record per case, in the order of ``cases``.

    ``jobs`` processes run at once (default: one per available CPU core on CPU, 1 on a GPU, whose
    memory the processes would share); on CPU each then runs ``cores // jobs`` torch threads unless
    ``threads`` says otherwise. A probe's peak is its own process's (`run_measured`), so the
    figures do not depend on ``jobs``; each case's seconds do. The cases that reach the largest T
    start first (`_costliest_first`), so that the processes finish close together.
    """
    import tempfile
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from prefloss.benchmark.spawn import spawn_worker

    jobs, threads = parallel_plan(device, len(cases), jobs, threads)
    common = {
        "mode": "max_tokens",
        "shapes": [base.to_dict()],
        "seed": seed,
        "device": device,
        "mem_limit_gib": mem_limit_gib,
        "threads": threads,
        "budget_gib": budget_gib,
        "start": start,
        "cap": cap,
        "resolution": resolution,
    }
    bar = tqdm(total=len(cases), disable=not progress, unit="case", dynamic_ncols=True)
    bar.set_description(f"{jobs} at once" if jobs > 1 else "searching")

    lock = threading.Lock()

    def done() -> None:
        with lock:
            bar.update(1)

    def one(case) -> dict:
        (result,) = spawn_worker({**common, "case": case.name}, scratch, timeout_s, done)
        return {"case": case.name, "method": case.method, "loss": case.loss, **result}

    with tempfile.TemporaryDirectory(prefix="prefloss-max-tokens-") as scratch:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {case.name: pool.submit(one, case) for case in _costliest_first(cases)}
            records = [futures[case.name].result() for case in cases]
    bar.close()
    return records


def parallel_plan(device: str, n_cases: int, jobs: int | None, threads: int | None) -> tuple[int, int | None]:
    """``(jobs, threads)`` for `run`: case processes at once (given, else one per available core on
    CPU and 1 on a GPU; never more than the cases) and torch threads in each (given, else on CPU
    ``cores // jobs`` when several run at once; ``None``: torch's default)."""
    import os

    cores = len(os.sched_getaffinity(0))
    jobs = min(jobs or (cores if device == "cpu" else 1), n_cases)
    if threads is None and device == "cpu" and jobs > 1:
        threads = max(1, cores // jobs)
    return jobs, threads


# Methods whose step memory grows by ~H bytes per token rather than ~V: their search reaches T of
# 10^4-10^5 and takes minutes; the full-logits methods' takes seconds.
_CHUNKED_METHODS = ("torch-lce", "prefloss-torch", "prefloss-triton")  # frozen-head cases: prefloss-torch


def _costliest_first(cases: list) -> list:
    """``cases`` with the chunked methods first (torch-lce, whose small chunks make it the slowest
    per token, ahead of prefloss), the rest in their order: the longest searches start first."""
    rank = {m: i for i, m in enumerate(_CHUNKED_METHODS)}
    return sorted(cases, key=lambda c: rank.get(c.method, len(rank)))


# The GPU MODEL: `prefloss plan`'s modelled peak of the CUDA step against a stated budget.
GIB = 1024**3
LLAMA3_8B = {"name": "Llama-3-8B", "params": 8.03e9, "hidden": 4096, "vocab": 128256}
GPU_MEMORY_GIB = 80.0
ZERO3_GPUS = 8


def model_states_gib(params: float, frozen_head: bool, zero3_gpus: int = ZERO3_GPUS) -> float:
    """Per-GPU bytes (GiB) of the model's states that the loss step's budget leaves out.

    Trainable (full fine-tuning under ZeRO-3 on ``zero3_gpus`` GPUs): bf16 weights (2 B), bf16
    gradients (2 B), fp32 master weights and Adam's two moments (12 B) and the bf16 reference (2 B)
    per parameter, each sharded: ``18·P / zero3_gpus``. Frozen head (LoRA on one GPU): the bf16
    weights, ``2·P``; the policy with its adapters disabled is the reference; the adapters and
    their optimizer states (well under 1 % of P) are not counted.
    """
    return (2 * params if frozen_head else 18 * params / zero3_gpus) / GIB


def plan_max_tokens(
    loss: str,
    *,
    frozen_head: bool,
    budget_gib: float,
    model: dict = LLAMA3_8B,
    dtype: str = "bfloat16",
    gpu: str = "h100",
    direct_limit: int = 1 << 17,
    resolution: float = DEFAULT_RESOLUTION,
) -> dict:
    """A MODEL: the most tokens per step whose modelled peak (`prefloss.commands.plan.plan_step`:
    live device memory beyond the inputs, gradients included) stays within ``budget_gib``.

    `plan_step` runs the real code on meta tensors in time proportional to the tokens, too slow
    for millions of tokens; past ``direct_limit`` tokens the peak is extrapolated along the line
    through `plan_step` at ``direct_limit/2`` and ``direct_limit`` (past a few chunks it grows by
    ∂hidden alone: the record keeps the slope, and a third point, ``3/4·direct_limit``, must lie on
    the line within 0.1 %, else the record says ``affine: False``). Up to ``direct_limit`` the
    search probes `plan_step` itself. Tokens are multiples of 1024 (even: one chosen and one
    rejected row of ``tokens/2``).
    """
    from prefloss.commands.plan import plan_step

    budget = budget_gib * GIB

    def plan_peak(tokens: int) -> float:
        return float(
            plan_step(
                loss,
                tokens=tokens,
                hidden=model["hidden"],
                vocab=model["vocab"],
                dtype=dtype,
                gpu=gpu,
                frozen_head=frozen_head,
            ).peak_bytes
        )

    half, three_q, full = (plan_peak(n) for n in (direct_limit // 2, 3 * direct_limit // 4, direct_limit))
    slope = (full - half) / (direct_limit - direct_limit // 2)
    line_at_three_q = half + slope * (direct_limit // 4)
    affine = abs(three_q - line_at_three_q) <= 1e-3 * three_q
    quantum = 1024
    if full <= budget and slope > 0:
        tokens = int(direct_limit + (budget - full) / slope) // quantum * quantum
        method = f"extrapolated linearly past {direct_limit} tokens"
        probes = [(direct_limit // 2, half), (3 * direct_limit // 4, three_q), (direct_limit, full)]
    else:
        found = search(
            plan_peak, budget, quantum=quantum, start=8 * quantum, cap=direct_limit, resolution=resolution
        )
        tokens, method, probes = found.fits, "plan_step probed directly", found.probes
    return {
        "MODEL": True,
        "loss": loss,
        "frozen_head": frozen_head,
        "model": model["name"],
        "hidden": model["hidden"],
        "vocab": model["vocab"],
        "dtype": dtype,
        "gpu": gpu,
        "budget_gib": budget_gib,
        "max_tokens": tokens,
        "method": method,
        "bytes_per_token": slope,
        "affine": affine,
        "probes": [{"tokens": t, "peak_gib": None if p is None else p / GIB} for t, p in probes],
    }


def gpu_model(
    losses=("epsilon_dpo", "alpha_dpo", "dpo", "simpo"),
    frozen=("epsilon_dpo", "dpo"),
    gpu_memory_gib: float = GPU_MEMORY_GIB,
    **kwargs,
) -> dict:
    """`plan_max_tokens` for each loss with a trainable head (ZeRO-3 budget) and each of ``frozen``
    with a frozen head (LoRA budget), with the budgets stated: ``gpu_memory_gib`` minus
    `model_states_gib`. A MODEL (no GPU measured)."""
    params = LLAMA3_8B["params"]
    rows = []
    for frozen_head, names in ((False, losses), (True, frozen)):
        states = model_states_gib(params, frozen_head)
        for loss in names:
            rows.append(
                {
                    **plan_max_tokens(
                        loss, frozen_head=frozen_head, budget_gib=gpu_memory_gib - states, **kwargs
                    ),
                    "model_states_gib": states,
                }
            )
    return {
        "MODEL": True,
        "note": "prefloss plan's modelled peak of the loss step (triton backend, meta tensors), not a "
        "measurement; the decoder's activations for these tokens are not counted",
        "gpu_memory_gib": gpu_memory_gib,
        "budgets": {
            "trainable": f"{gpu_memory_gib:g} GiB minus full fine-tuning states under ZeRO-3 on {ZERO3_GPUS} "
            f"GPUs: {model_states_gib(params, False):.1f} GiB (bf16 weights and gradients, fp32 master "
            "weights and Adam moments, bf16 reference: 18 B per parameter / 8)",
            "frozen_head": f"{gpu_memory_gib:g} GiB minus LoRA states on one GPU: "
            f"{model_states_gib(params, True):.1f} GiB (bf16 weights, 2 B per parameter; the policy "
            "with adapters disabled is the reference)",
        },
        "rows": rows,
    }


def table(document: dict) -> str:
    """Plain-text table of a ``--max-tokens`` run: per case the largest ``T`` and tokens per step
    within the budget, then the GPU MODEL's rows when present."""
    from prefloss.benchmark.machine import one_line

    cfg = document["config"]
    s = cfg["shape"]
    lines = [
        f"machine: {one_line(document['machine'])}",
        f"largest tokens per step within {cfg['budget_gib']:g} GiB of step peak (forward+backward, the "
        "gradients included, the inputs not; the second of two steps at each T), "
        f"B={s['batch']} pairs, H={s['hidden']}, V={s['vocab']}, {s['dtype']}; "
        f"T searched in multiples of {QUANTUM} to within {cfg['resolution']:.3g} of itself",
    ]
    if cfg.get("jobs"):
        lines.append(
            f"{cfg['jobs']} case process(es) at once, {cfg.get('threads') or 'default'} torch "
            "thread(s) each; a probe's peak is its own process's"
        )
    rows = document["results"]
    ref = next((r for r in rows if r["case"] == "authors/dpo" and r["status"] == "ok"), None)
    width = 2 + max(len("case"), *(len(r["case"]) for r in rows))
    head = f"{'case':<{width}}{'max T':>9}{'tokens/step':>13}{'x authors/dpo':>15}{'peak MiB':>10}"
    head += f"{'over at T':>11}{'probes':>8}{'s':>7}"
    lines += ["", head, "-" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            why = r.get("error", "")[:90]
            lines.append(f"{r['case']:<{width}}{r['status'].upper():>9}  {why}")
            continue
        at = [p["peak_mib"] for p in r["probes"] if p["seq_len"] == r["max_seq_len"]]
        peak = f"{at[0]:.1f}" if at and at[0] is not None else "-"
        times = "-" if not ref or not ref["max_tokens"] else f"{r['max_tokens'] / ref['max_tokens']:.1f}x"
        over = ">cap" if r["capped"] else str(r["first_over_seq_len"])
        lines.append(
            f"{r['case']:<{width}}{r['max_seq_len']:>9}{r['max_tokens']:>13}{times:>15}{peak:>10}"
            f"{over:>11}{len(r['probes']):>8}{r['seconds']:>7.0f}"
        )
    model = document.get("gpu_model")
    if model:
        lines += ["", f"MODEL (not measured): {model['note']}"]
        for kind, text in model["budgets"].items():
            lines.append(f"  budget, {kind}: {text}")
        head = f"{'MODEL: loss':<28}{'head':<11}{'budget GiB':>11}{'max tokens':>12}{'B/token':>9}  how"
        lines += [head, "-" * len(head)]
        for r in model["rows"]:
            head_kind = "frozen" if r["frozen_head"] else "trainable"
            lines.append(
                f"{'prefloss-triton/' + r['loss']:<28}{head_kind:<11}{r['budget_gib']:>11.1f}"
                f"{r['max_tokens']:>12}{r['bytes_per_token']:>9.0f}  {r['method']}"
                + ("" if r["affine"] else " (NOT affine: read as rough)")
            )
        first = model["rows"][0]
        lines.append(
            f"  {first['model']} shapes (H={first['hidden']}, V={first['vocab']}), {first['dtype']}, "
            f"{first['gpu']}: MODEL"
        )
    return "\n".join(lines)


def write_plot(document: dict, path: str) -> str:
    """One figure: tokens per step within the budget, a bar per case (log scale); with the GPU
    MODEL, a second panel labelled MODEL."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prefloss.benchmark.report import COLORS, plot_title

    rows = [r for r in document["results"] if r["status"] == "ok"]
    model = document.get("gpu_model")
    panels = 2 if model else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 0.45 * max(len(rows), 6) + 1.6), squeeze=False)
    ax = axes[0][0]
    names = [r["case"] for r in rows]
    ax.barh(names, [r["max_tokens"] for r in rows], color=[COLORS.get(r["method"], "C7") for r in rows])
    for i, r in enumerate(rows):
        ax.text(
            r["max_tokens"],
            i,
            f" {r['max_tokens']:,}" + (" (cap)" if r["capped"] else ""),
            va="center",
            fontsize=7,
        )
    cfg = document["config"]
    s = cfg["shape"]
    ax.set_xscale("log")
    ax.set_xlim(
        min(r["max_tokens"] for r in rows if r["max_tokens"]) / 3
        if any(r["max_tokens"] for r in rows)
        else 1,
        4 * max([r["max_tokens"] for r in rows] + [1]),
    )
    ax.invert_yaxis()
    ax.set_xlabel(f"tokens per step (2B·T) within {cfg['budget_gib']:g} GiB of step peak")
    ax.set_title(f"measured: B={s['batch']} pairs, H={s['hidden']}, V={s['vocab']}, {s['dtype']}", fontsize=9)
    if model:
        ax2 = axes[0][1]
        labels = [
            f"{r['loss']} ({'frozen' if r['frozen_head'] else 'trainable'} head)" for r in model["rows"]
        ]
        ax2.barh(labels, [r["max_tokens"] for r in model["rows"]], color="C3", hatch="//", alpha=0.6)
        for i, r in enumerate(model["rows"]):
            ax2.text(r["max_tokens"], i, f" {r['max_tokens'] / 1e6:.2f} M", va="center", fontsize=7)
        ax2.invert_yaxis()
        first = model["rows"][0]
        ax2.set_xlabel("tokens per step within the budget (MODEL)")
        ax2.set_title(
            f"MODEL, not measured: prefloss plan, {first['model']} shapes, {first['dtype']}, "
            f"{first['gpu']},\n"
            f"{model['gpu_memory_gib']:g} GiB minus the model's states (docs/bench.md)",
            fontsize=8,
        )
        ax2.set_xlim(0, 1.25 * max(r["max_tokens"] for r in model["rows"]))
    fig.suptitle(
        plot_title("max tokens per step within a memory budget", document["machine"], 2 * panels), fontsize=8
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
