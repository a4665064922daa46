"""What the Triton kernels and launchers of every op share: the segment lookup, the dot
precision, the key-split heuristic (flash-decoding) and the checks each launcher makes before it
hands tensors to a kernel."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from crosslmm_ops._backend import triton_dot_dtype_ok

LOG2E = 1.4426950408889634
MAX_SPLITS = 128
# Splitting a segment's keys into ranges shorter than this many key blocks costs more in the merge
# than it gains in parallelism.
MIN_BLOCKS_PER_SPLIT = 4
INTERPRETER_SM_COUNT = 132  # an H100, so the interpreter exercises the same split decisions


@triton.jit
def segment(cu_seqlens, seg):
    """(first token, length) of segment ``seg``."""
    start = tl.load(cu_seqlens + seg)
    return start, tl.load(cu_seqlens + seg + 1) - start


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own matmul setting (tf32 only when the user allowed it).
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits_heuristic(programs: int, num_sms: int, num_key_blocks: int) -> int:
    """How many ranges to split each segment's keys into (flash-decoding).

    ``programs`` is the number of (query block, head, segment) programs without splitting. When they
    already fill about a wave of SMs, one split; otherwise enough splits to fill one wave, keeping
    at least ``MIN_BLOCKS_PER_SPLIT`` key blocks per split and at most ``MAX_SPLITS`` splits.
    """
    if programs <= 0 or programs >= 0.8 * num_sms:
        return 1
    want = math.ceil(num_sms / programs)
    most = max(1, num_key_blocks // MIN_BLOCKS_PER_SPLIT)
    return max(1, min(want, most, MAX_SPLITS))


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
            raise ValueError(
                f"{name} must be contiguous (the Triton kernels read its storage "
                f"without strides), got strides {t.stride()}; pass "
                f"{name}.contiguous()"
            )
