"""Fused Triton kernels (installed as mlfast.kernels)."""
