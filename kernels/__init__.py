"""Triton kernels for prefloss, importable only as ``prefloss.kernels`` (see DESIGN.md)."""
