"""Frozen-head loss step against the 3-GEMM floor (and the trainable step against the 4-GEMM floor).

Times forward + backward of prefloss's ε-DPO and DPO loss modules (torch backend) on the
benchmark's inputs (`prefloss.benchmark.inputs`: B pairs, first eighth of every row prompt, rows
padded by different amounts), with the LM head frozen (``weight.requires_grad = False``, only
``∂hidden``) and, for comparison, trainable. Each step is timed alternately with its floor in this
one process, so the ratio is immune to the machine speeding up or slowing down (other jobs share
the CPU):

- frozen floor: 3 GEMMs over the counted tokens, ``[n, H] × [H, V]`` policy and reference logits,
  ``∂h = G·W``, into preallocated buffers;
- trainable floor: the same plus ``∂W = Gᵀ·h`` (what ``prefloss bench`` calls ``floor``).

Prints one JSON line per (loss, head) with the medians and the median of the per-pair ratios, and
the machine line. Usage::

    python scripts/measure_frozen_head.py [--seq-len 1024] [--repeats 5] [--losses epsilon_dpo dpo]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from prefloss.benchmark.inputs import Shape, make_inputs
from prefloss.losses import LOSSES

HYPERPARAMS = {"epsilon_dpo": {"beta": 0.01, "epsilon": 0.01}, "dpo": {"beta": 0.1}}


def floor_step(x, *, frozen: bool):
    """3 (frozen) or 4 GEMMs of ``n_counted·H·V`` into preallocated buffers."""
    h = x.hidden.detach().reshape(-1, x.hidden.shape[-1])
    hr = x.ref_hidden.reshape(-1, h.shape[1])
    keep = (x.labels.reshape(-1) != -100).nonzero().squeeze(1)
    h, hr = h[keep].contiguous(), hr[keep].contiguous()
    w, wr = x.weight.detach(), x.ref_weight
    n, v = h.shape[0], w.shape[0]
    logits = torch.empty(n, v, dtype=h.dtype)
    ref_logits = torch.empty_like(logits)
    grad_logits = torch.randn(n, v, dtype=h.dtype) * 1e-3
    grad_h = torch.empty_like(h)
    grad_w = torch.empty_like(w)

    def step():
        torch.mm(h, w.T, out=logits)
        torch.mm(hr, wr.T, out=ref_logits)
        torch.mm(grad_logits, w, out=grad_h)
        if not frozen:
            torch.mm(grad_logits.T, h, out=grad_w)

    return step


def loss_step(x, loss: str, *, frozen: bool):
    kwargs = dict(HYPERPARAMS[loss], backend="torch")
    if loss == "epsilon_dpo":
        kwargs["compare_dtype"] = None
    module = LOSSES[loss](**kwargs)
    x.weight.requires_grad_(not frozen)

    def step():
        x.hidden.grad = None
        x.weight.grad = None
        out = module(x.hidden, x.weight, x.labels, ref_hidden=x.ref_hidden, ref_weight=x.ref_weight)
        out.loss.backward()

    return step


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process)."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def machine() -> str:
    model = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"
    )
    return (
        f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"python {platform.python_version()}, load average {os.getloadavg()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--losses", nargs="+", default=["epsilon_dpo", "dpo"])
    parser.add_argument("--heads", nargs="+", default=["frozen", "trainable"])
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's). With 1 thread the CPU-time ratio is immune to other "
        "jobs taking the cores; with several, a descheduled thread stalls every parallel region.",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps({"machine": machine()}), flush=True)
    shape = Shape(args.batch, args.seq_len, args.hidden, args.vocab)
    x = make_inputs(shape, seed=0)
    for loss in args.losses:
        for head in args.heads:
            frozen = head == "frozen"
            step, floor = loss_step(x, loss, frozen=frozen), floor_step(x, frozen=frozen)
            step(), floor()  # warm-up (and compilation of the tile arithmetic)
            steps, floors = [], []
            for _ in range(args.repeats):
                steps.append(timed(step))
                floors.append(timed(floor))
            ratios = [a[0] / b[0] for a, b in zip(steps, floors, strict=True)]
            cpu_ratios = [a[1] / b[1] for a, b in zip(steps, floors, strict=True)]
            print(
                json.dumps(
                    {
                        "loss": loss,
                        "head": head,
                        "floor_gemms": 3 if frozen else 4,
                        "shape": shape.label(),
                        "threads": torch.get_num_threads(),
                        "step_s": round(statistics.median(s[0] for s in steps), 4),
                        "floor_s": round(statistics.median(f[0] for f in floors), 4),
                        "ratio_median": round(statistics.median(ratios), 4),
                        "ratios": [round(r, 4) for r in ratios],
                        "step_cpu_s": round(statistics.median(s[1] for s in steps), 4),
                        "floor_cpu_s": round(statistics.median(f[1] for f in floors), 4),
                        "cpu_ratio_median": round(statistics.median(cpu_ratios), 4),
                        "cpu_ratios": [round(r, 4) for r in cpu_ratios],
                        "load": os.getloadavg(),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
