"""Helpers for testing the kernels (used by tests/ and benchmarks/; public, for users too)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from crosslmm_ops import _backend


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Fill every output a kernel allocates with NaN (INT_MIN for integer outputs) before the
    kernel runs, so an element the kernel forgets to write shows up as a failure."""
    prev = getattr(_backend._poison, "on", False)
    _backend._poison.on = True
    try:
        yield
    finally:
        _backend._poison.on = prev


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; inf when anything is NaN."""
    a, e = actual.double(), expected.double()
    if torch.isnan(a).any() or torch.isnan(e).any():
        return float("inf")
    denom = e.norm().item()
    return (a - e).norm().item() / (denom if denom > 0 else 1.0)


def non_contiguous(x: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """The same values as ``x`` in a non-contiguous tensor: every other slice of a twice-wide
    buffer along ``dim`` (channels stay contiguous, as real slices of a bigger tensor do)."""
    dim = dim % x.dim()
    shape = list(x.shape)
    shape[dim] *= 2
    wide = torch.randn(shape, dtype=x.dtype, device=x.device)
    view = wide.narrow(dim, 0, shape[dim]).unflatten(dim, (x.shape[dim], 2)).select(dim + 1, 1)
    view.copy_(x)
    assert not view.is_contiguous()
    return view


def fast_backends(device: str | torch.device) -> list[str]:
    """The non-reference back ends (``cuda``, ``triton``) that can run on ``device`` here."""
    dev = torch.device(device)
    return [
        name
        for name, check in (("cuda", _backend.cuda_runnable), ("triton", _backend.triton_runnable))
        if check(dev)[0]
    ]


def cu_seqlens(lengths, device: str | torch.device = "cpu") -> torch.Tensor:
    """int32 ``cu_seqlens`` ``[0, l0, l0 + l1, ...]`` of the segment ``lengths``."""
    bounds = [0] + torch.tensor(list(lengths), dtype=torch.int64).cumsum(0).tolist()
    return torch.tensor(bounds, dtype=torch.int32, device=device)


@contextlib.contextmanager
def env_value(name: str, value: str | None) -> Iterator[None]:
    """Set (or, with ``None``, unset) environment variable ``name`` inside the block, restoring it
    after: for the switches the extension reads on every call (``CROSSLMM_ATTENTION_SM90`` ...)."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def sm90_skip_reason(binding: str) -> str | None:
    """Why the Hopper (sm_90a) kernels cannot be tested here (``None`` when they can): a CUDA GPU of
    compute capability 9.0 and an extension built for 90a that has ``binding``."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    ext = _backend.extension()
    if ext is None or not hasattr(ext, binding):
        return f"needs crosslmm_ops._C built with {binding}"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        return f"needs an sm_90 GPU (H100/H200), got sm_{major}{minor}"
    if "90a" not in _backend.extension_archs():
        return f"the extension was built for sm_{', sm_'.join(_backend.extension_archs())}, not 90a"
    return None
