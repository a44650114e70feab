"""Precision of the frozen-head ``∂hidden`` for J stored in hidden's dtype (shipped) or in fp32.

For fp32/bf16/fp16 inputs and both backends (Triton under its interpreter without CUDA), the max
absolute error of ``∂hidden`` against the float64 reference (`prefloss.reference`), for a random
upstream gradient, of:

- ``plain``: plain PyTorch at the input dtype (`prefloss.testing.plain_token_logprobs`), the
  baseline of the project's error criterion;
- ``trainable``: prefloss with the head trainable (backward recomputes the logits);
- ``frozen``: prefloss's frozen-head path as shipped, ``J`` in hidden's dtype;
- ``frozen_fp32_J``: the same ``J`` kept in fp32, ``∂h = (g·J).to(dtype)`` (torch backend: the
  accumulator rows before their rounding; Triton: the same GEMM with an fp32 result).

Each is also given over plain's error. Prints one JSON line per (backend, dtype). Usage::

    python scripts/measure_frozen_head_precision.py [--seq-len 256] [--hidden 256] [--vocab 8192]
"""

from __future__ import annotations

import argparse
import json
import os
from functools import partial

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import prefloss  # noqa: E402
from prefloss import reference, torch_backend  # noqa: E402
from prefloss.benchmark.inputs import Shape, make_inputs  # noqa: E402
from prefloss.testing import max_abs_err, plain_token_logprobs  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def grad_hidden(fn, hidden, upstream):
    h = hidden.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad((fn(h) * upstream).sum(), h)
    return g


def fp32_jacobian_torch(hidden, weight, labels, upstream):
    """∂h from the torch backend's fp32 accumulator rows (J before rounding to hidden's dtype)."""
    rows = []
    original = torch_backend._jacobian_rows

    def keep(*args):
        out = original(*args)
        rows.append(out.clone())
        return out

    torch_backend._jacobian_rows = keep
    try:
        h = hidden.detach().clone().requires_grad_(True)
        prefloss.fused_logprobs(h, weight, labels, backend="torch")
    finally:
        torch_backend._jacobian_rows = original
    return scatter_rows(torch.cat(rows), hidden, labels, upstream)


def fp32_jacobian_triton(hidden, weight, labels, upstream, chunk: int = 512):
    """∂h with J = (∂logp/∂raw) @ W as an fp32 result, the kernels run as the backend runs them."""
    from prefloss.kernels import logprobs as kernels

    keep = labels.reshape(-1) != -100
    h = hidden.reshape(-1, hidden.shape[-1])[keep]
    y = labels.reshape(-1)[keep]
    parts = []
    for r0 in range(0, h.shape[0], chunk):
        logits = h[r0 : r0 + chunk] @ weight.T
        stats = kernels.logprobs_fwd(logits, y[r0 : r0 + chunk])
        ones = torch.ones(logits.shape[0], dtype=torch.float32)
        kernels.logprobs_bwd(logits, y[r0 : r0 + chunk], stats.lse, ones)
        parts.append(logits.float() @ weight.float())
    return scatter_rows(torch.cat(parts), hidden, labels, upstream)


def scatter_rows(jac, hidden, labels, upstream):
    keep = labels.reshape(-1) != -100
    out = torch.zeros(hidden.reshape(-1, hidden.shape[-1]).shape, dtype=hidden.dtype)
    out[keep] = (jac * upstream.reshape(-1)[keep][:, None]).to(hidden.dtype)
    return out.reshape(hidden.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--backends", nargs="+", default=["torch", "triton"])
    args = parser.parse_args()
    shape = Shape(args.batch, args.seq_len, args.hidden, args.vocab)
    x = make_inputs(shape, seed=0)
    labels = x.labels
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1))
    for backend in args.backends:
        for name, dtype in DTYPES.items():
            hidden, weight = x.hidden.detach().to(dtype), x.weight.detach().to(dtype)
            # the truth of the rounded inputs: what any computation at this dtype starts from
            want = grad_hidden(
                lambda h, w=weight.double(): reference.token_logprobs(h, w, labels).policy,  # noqa: B008 - binds this dtype's weight
                hidden.double(),
                upstream,
            )
            w_train = weight.clone().requires_grad_(True)

            def fused(h, w=weight, b=backend):
                return prefloss.fused_logprobs(h, w, labels, backend=b).policy

            got = {
                "plain": grad_hidden(
                    partial(plain_token_logprobs, weight=weight, labels=labels), hidden, upstream
                ),
                "trainable": grad_hidden(partial(fused, w=w_train), hidden, upstream),
                "frozen": grad_hidden(fused, hidden, upstream),
            }
            if backend == "torch":
                got["frozen_fp32_J"] = fp32_jacobian_torch(hidden, weight, labels, upstream)
            else:
                got["frozen_fp32_J"] = fp32_jacobian_triton(hidden, weight, labels, upstream)
            errors = {k: max_abs_err(v, want) for k, v in got.items()}
            print(
                json.dumps(
                    {
                        "backend": backend,
                        "dtype": name,
                        "shape": shape.label(),
                        "max_abs_grad_hidden": float(want.abs().max()),
                        "max_abs_err": {k: float(f"{v:.3e}") for k, v in errors.items()},
                        "over_plain": {k: round(v / errors["plain"], 3) for k, v in errors.items()},
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
