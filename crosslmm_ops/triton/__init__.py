"""Triton kernels: the fallback back end (imported lazily, only when the triton back end runs)."""
