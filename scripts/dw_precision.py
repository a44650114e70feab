"""Precision of the triton backend's ∂W (16-bit GEMM operands, fp32 accumulation) against float64.

Runs on CPU under Triton's interpreter, where the backward emulates the CUDA numerics (16-bit
operands upcast to fp32: the products are exact, the sums fp32, the result rounded once to the
weight's dtype, as a GEMM with fp32 accumulation and a 16-bit output does). Prints, for each dtype,
the error of ∂W (and ∂h) against float64 of: the triton backend with one row block (the default
at these shapes), with 4 row blocks (one extra rounding per block), the torch backend (fp32
accumulator, rounded once), and plain PyTorch autograd at the input dtype.

    TRITON_INTERPRET=1 python scripts/dw_precision.py [--tokens 4096 --hidden 64 --vocab 2048]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import prefloss  # noqa: E402
from prefloss import reference, triton_backend  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    n, H, V = args.tokens, args.hidden, args.vocab
    g = torch.Generator().manual_seed(args.seed)
    hidden32 = torch.randn(n, H, generator=g)
    weight32 = torch.randn(V, H, generator=g) * (2.0 / H**0.5)  # logits of std ≈ 2
    labels = torch.randint(0, V, (n,), generator=g)
    grad_out = torch.randn(n, generator=g)
    print(f"n={n} H={H} V={V}: error of ∂W / ∂h against float64 (max |err| / max |∂|, ‖err‖/‖∂‖)")
    for dtype in (torch.bfloat16, torch.float16):
        h16, w16 = hidden32.to(dtype), weight32.to(dtype)

        def grads(fn, h16=h16, w16=w16):
            h = h16.detach().clone().requires_grad_()
            w = w16.detach().clone().requires_grad_()
            (fn(h, w) * grad_out.to(torch.float32)).sum().backward()
            return h.grad, w.grad

        def fused(backend, **kw):
            return lambda h, w: prefloss.fused_logprobs(h, w, labels, backend=backend, **kw).policy.float()

        h64 = h16.double().requires_grad_()
        w64 = w16.double().requires_grad_()
        (reference.token_logprobs(h64, w64, labels).policy * grad_out.double()).sum().backward()
        want = {"∂W": w64.grad, "∂h": h64.grad}

        def plain(h, w):
            return torch.log_softmax((h @ w.T).float(), -1).gather(1, labels[:, None]).squeeze(1)

        results = {"triton, 1 row block": grads(fused("triton"))}
        saved = triton_backend.BWD_BLOCK_ELEMENTS
        triton_backend.BWD_BLOCK_ELEMENTS = (n // 4) * H
        try:
            results["triton, 4 row blocks"] = grads(fused("triton"))
        finally:
            triton_backend.BWD_BLOCK_ELEMENTS = saved
        results["torch backend"] = grads(fused("torch"))
        results[f"plain PyTorch {dtype}"] = grads(plain)
        u = torch.finfo(dtype).eps / 2
        print(f"\n{dtype} (unit roundoff u = {u:.2e})")
        for name, (gh, gw) in results.items():
            cells = []
            for label, got in (("∂W", gw), ("∂h", gh)):
                err = (got.double() - want[label]).abs()
                cells.append(
                    f"{label} {err.max() / want[label].abs().max():.2e} {err.norm() / want[label].norm():.2e}"
                )
            print(f"  {name:<30} " + "   ".join(cells))


if __name__ == "__main__":
    main()
