"""Triton kernels for prefloss, importable only as ``prefloss.kernels`` (see DESIGN.md).

Set ``TRITON_INTERPRET=1`` before importing this package to run the kernels on CPU tensors.
"""

from prefloss.kernels.logprobs import logprobs_bwd, logprobs_fwd

__all__ = ["logprobs_bwd", "logprobs_fwd"]
