"""Backends: torch chunked (any device) and Triton kernels (CUDA, or the interpreter)."""
