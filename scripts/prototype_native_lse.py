"""Measurement prototype, not used by prefloss: how much faster the ε-DPO forward's tile arithmetic
(four row log-sum-exps of a ``[C, V_t]`` tile pair: policy, reference and the two ε-mixtures) gets
with a hand-written C++ loop and a polynomial ``exp`` than compiled by Inductor (whose vectorised
``exp`` is Sleef's, 1 ulp).

Builds a small C++ extension (``torch.utils.cpp_extension.load_inline``, ~50 s the first time, then
cached), checks both against float64, and times them alternately on one thread (process CPU time,
best of ``--repeats`` rounds of 10 calls). Run pinned to one core, outside the repository root::

    taskset -c 0 python scripts/prototype_native_lse.py

The ``exp`` here is a degree-7 Taylor polynomial after Cody–Waite reduction (1.7 units of
roundoff at most, measured), without special cases beyond a clamp at −87: good enough to time, not
to ship. See docs/history/tile-arithmetic-2026-12-03.md for what was measured and why it was not taken.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.cpp_extension import load_inline

from prefloss import tile_math

SOURCE = r"""
#include <torch/extension.h>
#include <cmath>
#include <cstdint>
#include <cstring>

static inline float poly_exp(float x) {  // x <= 0; Cody-Waite reduction, Taylor degree 7, 2^n by bits
  x = x < -87.0f ? -87.0f : x;
  float n = __builtin_rintf(x * 1.44269504088896341f);
  float r = __builtin_fmaf(n, -0.693359375f, x);
  r = __builtin_fmaf(n, 2.12194440e-4f, r);
  float p = 1.98412698e-4f;
  p = __builtin_fmaf(p, r, 1.38888889e-3f);
  p = __builtin_fmaf(p, r, 8.33333333e-3f);
  p = __builtin_fmaf(p, r, 4.16666667e-2f);
  p = __builtin_fmaf(p, r, 1.66666667e-1f);
  p = __builtin_fmaf(p, r, 0.5f);
  p = __builtin_fmaf(p, r, 1.0f);
  p = __builtin_fmaf(p, r, 1.0f);
  int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// [C, 4] float64: lse of z, z_ref, z - eps*(z_ref - z), z + eps*(z_ref - z), row by row.
torch::Tensor four_lses(torch::Tensor z, torch::Tensor zr, double eps) {
  const int64_t rows = z.size(0), cols = z.size(1);
  auto out = torch::empty({rows, 4}, z.options().dtype(torch::kFloat64));
  const float* zp = z.data_ptr<float>();
  const float* rp = zr.data_ptr<float>();
  double* o = out.data_ptr<double>();
  const float e = (float)eps;
  for (int64_t i = 0; i < rows; ++i) {
    const float* a = zp + i * cols;
    const float* b = rp + i * cols;
    float m0 = -INFINITY, m1 = -INFINITY, m2 = -INFINITY, m3 = -INFINITY;
#pragma omp simd reduction(max : m0, m1, m2, m3)
    for (int64_t j = 0; j < cols; ++j) {
      float d = b[j] - a[j], lo = __builtin_fmaf(-e, d, a[j]), hi = __builtin_fmaf(e, d, a[j]);
      m0 = a[j] > m0 ? a[j] : m0;
      m1 = b[j] > m1 ? b[j] : m1;
      m2 = lo > m2 ? lo : m2;
      m3 = hi > m3 ? hi : m3;
    }
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t j = 0; j < cols; ++j) {
      float d = b[j] - a[j], lo = __builtin_fmaf(-e, d, a[j]), hi = __builtin_fmaf(e, d, a[j]);
      s0 += poly_exp(a[j] - m0);
      s1 += poly_exp(b[j] - m1);
      s2 += poly_exp(lo - m2);
      s3 += poly_exp(hi - m3);
    }
    o[4 * i] = m0 + std::log((double)s0);
    o[4 * i + 1] = m1 + std::log((double)s1);
    o[4 * i + 2] = m2 + std::log((double)s2);
    o[4 * i + 3] = m3 + std::log((double)s3);
  }
  return out;
}
"""


def best_ms(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        for _ in range(10):
            fn()
        best = min(best, (time.process_time() - t) / 10)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--epsilon", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    flags = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp-simd", "-ffp-contract=fast"]
    native = load_inline(
        "prefloss_prototype_lse", cpp_sources=SOURCE, functions=["four_lses"], extra_cflags=flags
    )
    gen = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(args.rows, args.cols, generator=gen)
    z_ref = 3 * torch.randn(args.rows, args.cols, generator=gen)
    eps = torch.tensor(args.epsilon, dtype=torch.float64)
    inductor = torch.compile(tile_math.log_sum_exps, dynamic=True)
    exact = torch.stack(tile_math.log_sum_exps(z.double(), z_ref.double(), eps), 1)
    runs = {
        "inductor (Sleef exp)": lambda: torch.stack(inductor(z, z_ref, eps), 1),
        "C++ (polynomial exp)": lambda: native.four_lses(z, z_ref, args.epsilon),
    }
    for name, fn in runs.items():
        err = float((fn() - exact).abs().max())
        print(f"{name:<22} max abs err vs float64 {err:.2e}")
    times = {name: [] for name in runs}
    for _ in range(3):  # alternate, so drift hits both
        for name, fn in runs.items():
            times[name].append(best_ms(fn, args.repeats))
    for name, ts in times.items():
        print(f"{name:<22} {min(ts):7.2f} ms per [{args.rows}, {args.cols}] tile pair (best of {len(ts)})")
    a, b = (min(ts) for ts in times.values())
    print(f"ratio {a / b:.2f}")


if __name__ == "__main__":
    main()
