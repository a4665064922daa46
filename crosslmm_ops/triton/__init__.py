"""Triton kernels: the fallback back end (imported lazily, only when the triton back end runs),
and the checks every launcher makes before it hands tensors to a kernel."""

from __future__ import annotations

import torch

from crosslmm_ops._backend import triton_dot_dtype_ok


def check_launch(dot_dtype: torch.dtype | None = None, **index: torch.Tensor) -> None:
    """Refuse a launch that would compute garbage or read the wrong memory, for every caller of a
    launcher (the ops already prepare their arguments so): ``dot_dtype``, the dtype a kernel
    multiplies in with ``tl.dot`` (``None``: it has none), must be one ``tl.dot`` computes right
    here (:func:`~crosslmm_ops._backend.triton_dot_dtype_ok`); the ``index`` tensors
    (``cu_seqlens``), which kernels read without strides, must be contiguous
    (:func:`~crosslmm_ops._backend.kernel_index`)."""
    if dot_dtype is not None:
        ok, why = triton_dot_dtype_ok(dot_dtype)
        if not ok:
            raise RuntimeError(why)
    for name, t in index.items():
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the Triton kernels read its storage "
                             f"without strides), got strides {t.stride()}; pass "
                             f"{name}.contiguous()")
