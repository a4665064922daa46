"""What the Triton kernels and launchers of every op share: the segment lookup, the dot
precision, the key-split heuristic (flash-decoding) and the checks each launcher makes before it
hands tensors to a kernel."""

from __future__ import annotations

import functools
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
# The split model's costs in key-block units (one program on one key block: about 2 us on an
# H100): launching the merge kernel; one program's fp32 partial output written and merged (128 KB
# at ~3 TB/s); and each split in the merge's loop, which walks a row's splits one after another
# (a global load's latency, 1-2 us, per split). The last was fitted on the H100
# (tools/triton_forward_probe.py, two runs): V2V T=32 at Hk=2 took 0.142 ms with 4 splits and
# 0.149-0.151 with 9; decoding one query against 32 frames' keys 0.042 ms with 18 splits, 0.045
# with 37 and 0.056 with 61.
SPLIT_MERGE_LAUNCH_COST = 1.5
SPLIT_PARTIALS_COST = 0.0225
SPLIT_MERGE_LOOP_COST = 1.0
INTERPRETER_SM_COUNT = 132  # an H100, so the interpreter exercises the same split decisions


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for a launch's host side: ``triton.cdiv`` is a constexpr function, about
    1.6 us a call, and a short call's launch is host-bound."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` on the host, without its constexpr-function overhead."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


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


def shared_memory_per_block(device: torch.device) -> int | None:
    """Bytes of shared memory a kernel's block can have on ``device`` (opting in beyond 48 KB,
    as Triton does); ``None`` off the GPU (the interpreter has no limit) or where torch does not
    say."""
    if device.type != "cuda":
        return None
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)


@functools.lru_cache(maxsize=4096)  # on every launch's host path; its arguments are a few ints
def num_splits_heuristic(programs: int, num_sms: int, num_key_blocks: int) -> int:
    """How many ranges to split each segment's keys into (flash-decoding).

    ``programs`` is the number of (query block, head, segment) programs without splitting. The
    count minimises a time model in units of one program's work on one key block (the CUDA sm90
    forward's ``sm90_key_splits`` uses the same model with its own tile): whole waves of
    ``num_sms`` programs, each doing ``ceil(num_key_blocks / s) + 1`` units (the 1: loading Q,
    the epilogue), plus for ``s > 1`` the merge launch, the fp32 partials each program writes
    and the merge reads, and the merge's loop over the splits. Wave quantisation is what it sees
    that "fill one wave" does not: V2V at T = 64 is 54 programs of 729 key blocks; 3 splits give
    162 programs, a second wave of 30, where 7 give 378 in three nearly full waves. A larger
    count must win by 2%. Each split keeps at least ``MIN_BLOCKS_PER_SPLIT`` key blocks; at most
    ``MAX_SPLITS``.
    """
    if programs <= 0 or num_key_blocks <= 0:
        return 1
    most = max(1, min(MAX_SPLITS, num_key_blocks // MIN_BLOCKS_PER_SPLIT))
    best, best_cost = 1, 0.0
    for splits in range(1, most + 1):
        waves = math.ceil(programs * splits / num_sms)
        cost = waves * (math.ceil(num_key_blocks / splits) + 1)
        if splits > 1:
            cost += (
                SPLIT_MERGE_LAUNCH_COST
                + SPLIT_PARTIALS_COST * programs * splits
                + SPLIT_MERGE_LOOP_COST * splits
            )
        if splits == 1 or cost < best_cost * 0.98:
            best, best_cost = splits, cost
    return best


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
