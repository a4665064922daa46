"""Every environment variable the library reads, read here and nowhere else.

Two kinds:

* **per call** (a test or a user may change them between calls): :func:`backend`
  (``CROSSLMM_BACKEND``), :func:`projected_path` (``CROSSLMM_PROJECTED_PATH``),
  :func:`attention_sm90` (``CROSSLMM_ATTENTION_SM90``), :func:`attention_bwd_sm90`
  (``CROSSLMM_ATTENTION_BWD_SM90``), :func:`projected_kernel` (``CROSSLMM_PROJECTED_KERNEL``),
  :func:`projected_bwd_cuda` (``CROSSLMM_PROJECTED_BWD_CUDA``),
  :func:`triton_interpret` (``TRITON_INTERPRET``, Triton's own);
* **once, at import** (each read was measurable host time in short calls): :data:`EAGER_FUNCTION`
  (``CROSSLMM_EAGER_FUNCTION``), :data:`POISON_OUTPUTS` (``CROSSLMM_POISON_OUTPUTS``),
  :data:`CHECK_REPLICAS` (``CROSSLMM_CHECK_REPLICAS``).

The values are validated here; what they mean for a call is decided in
:mod:`crosslmm_ops.planner`, which :func:`crosslmm_ops.explain` reports. This module imports
nothing of the library.
"""

from __future__ import annotations

import os

BACKEND_VAR = "CROSSLMM_BACKEND"
PROJECTED_PATH_VAR = "CROSSLMM_PROJECTED_PATH"
ATTENTION_SM90_VAR = "CROSSLMM_ATTENTION_SM90"
ATTENTION_BWD_SM90_VAR = "CROSSLMM_ATTENTION_BWD_SM90"
PROJECTED_BWD_CUDA_VAR = "CROSSLMM_PROJECTED_BWD_CUDA"
EAGER_FUNCTION_VAR = "CROSSLMM_EAGER_FUNCTION"
POISON_OUTPUTS_VAR = "CROSSLMM_POISON_OUTPUTS"
CHECK_REPLICAS_VAR = "CROSSLMM_CHECK_REPLICAS"
PROJECTED_KERNEL_VAR = "CROSSLMM_PROJECTED_KERNEL"
TRITON_INTERPRET_VAR = "TRITON_INTERPRET"

# The values each per-call variable takes (the empty string and unset mean the first one).
BACKEND_VALUES = ("auto", "cuda", "triton", "torch")
PROJECTED_PATH_VALUES = ("auto", "fused", "materialized")
ATTENTION_SM90_VALUES = ("auto", "0", "1", "packed")
ATTENTION_BWD_SM90_VALUES = ("auto", "0", "1", "dkdv")
PROJECTED_BWD_CUDA_VALUES = ("auto", "0")
PROJECTED_KERNEL_VALUES = ("auto", "mma_sync", "decode", "decode_bulk", "sm90_cluster")

# Read once, at import.
EAGER_FUNCTION = os.environ.get(EAGER_FUNCTION_VAR, "1") != "0"
POISON_OUTPUTS = os.environ.get(POISON_OUTPUTS_VAR, "0") == "1"
CHECK_REPLICAS = os.environ.get(CHECK_REPLICAS_VAR, "0") == "1"


def _read(name: str, allowed: tuple[str, ...], lower: bool = True) -> str:
    value = os.environ.get(name, "") or allowed[0]
    if lower:
        value = value.lower()
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def backend() -> str:
    """``CROSSLMM_BACKEND``: the back end a call without ``backend=`` asks for (``"auto"``)."""
    value = os.environ.get(BACKEND_VAR, "auto") or "auto"
    if value.lower() not in BACKEND_VALUES:
        raise ValueError(
            f"backend must be one of {BACKEND_VALUES}, got {value!r} (from {BACKEND_VAR})"
        )
    return value.lower()


def projected_path() -> str:
    """``CROSSLMM_PROJECTED_PATH``: ``"auto"``, ``"fused"`` or ``"materialized"``."""
    return _read(PROJECTED_PATH_VAR, PROJECTED_PATH_VALUES)


def attention_sm90() -> str:
    """``CROSSLMM_ATTENTION_SM90``: the Hopper attention forward ``"0"`` never, ``"1"`` wherever
    it can run, ``"auto"`` (unset) where the query segments fill its tiles; ``"packed"`` its
    GQA-packed kernel (sm90_packed) wherever that can run, whatever the query length (to compare
    the kernels)."""
    return _read(ATTENTION_SM90_VAR, ATTENTION_SM90_VALUES, lower=False)


def attention_bwd_sm90() -> str:
    """``CROSSLMM_ATTENTION_BWD_SM90``: as :func:`attention_sm90` for the backward, plus
    ``"dkdv"`` (the sm90 dK/dV kernel with the mma.sync dQ kernel, a diagnostic)."""
    return _read(ATTENTION_BWD_SM90_VAR, ATTENTION_BWD_SM90_VALUES, lower=False)


def projected_bwd_cuda() -> str:
    """``CROSSLMM_PROJECTED_BWD_CUDA``: ``"auto"`` (unset) runs the backward of a CUDA projected
    core on CUDA where the extension has it; ``"0"`` on Triton (or torch) instead (to compare
    them)."""
    return _read(PROJECTED_BWD_CUDA_VAR, PROJECTED_BWD_CUDA_VALUES)


def projected_kernel() -> str:
    """``CROSSLMM_PROJECTED_KERNEL``: the projected core's CUDA forward kernel. ``"auto"`` (unset):
    :func:`crosslmm_ops.planner.projected_core_kernel` decides; ``"sm90_cluster"`` (the Hopper
    kernel), ``"mma_sync"`` (the general mma.sync kernels, never the decode kernel), ``"decode"`` /
    ``"decode_bulk"`` (the decode kernel with cp.async / bulk-copy loads): that kernel wherever
    it can run."""
    return _read(PROJECTED_KERNEL_VAR, PROJECTED_KERNEL_VALUES)


def triton_interpret() -> bool:
    """``TRITON_INTERPRET``: Triton kernels run in the CPU interpreter."""
    return os.environ.get(TRITON_INTERPRET_VAR, "0") not in ("", "0")


def overrides() -> dict[str, str]:
    """The library's variables that are set in this process, name -> value (for explain/info)."""
    names = (
        BACKEND_VAR,
        PROJECTED_PATH_VAR,
        ATTENTION_SM90_VAR,
        ATTENTION_BWD_SM90_VAR,
        PROJECTED_BWD_CUDA_VAR,
        PROJECTED_KERNEL_VAR,
        EAGER_FUNCTION_VAR,
        POISON_OUTPUTS_VAR,
        CHECK_REPLICAS_VAR,
        TRITON_INTERPRET_VAR,
    )
    return {n: os.environ[n] for n in names if os.environ.get(n)}
