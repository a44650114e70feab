"""Test-wide set-up.

Without CUDA the Triton kernels run under Triton's interpreter on CPU tensors. The variable must be
set before any module defining ``@triton.jit`` kernels is imported (jit decides at decoration time),
which is why it is set here, at collection, and why prefloss imports its kernels lazily.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
