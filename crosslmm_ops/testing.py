"""Helpers for testing the kernels (used by tests/ and benchmarks/; public so users can reuse them)."""

from __future__ import annotations

import contextlib
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
    return [name for name, check in (("cuda", _backend.cuda_runnable), ("triton", _backend.triton_runnable))
            if check(dev)[0]]
