"""Triton kernels of the projection-fused attention core ``crosslmm::projected_attention_core``.

The core is multi-query attention in which the keys and the values are the same tensor: every query
row of segment ``i`` attends to the tokens ``x`` of key segment ``i`` (non-causal)::

    out[r] = softmax_j(scale * q[r] . x[j]) x[j]            r = (kv head, token, head in group)

Layouts (see crosslmm_ops/ops/projected_attention.py, which owns the contract):

* ``q``, ``out`` (and ``dout``, ``dq``) ``[Hk, total_q, G, Dv]`` ("grouped"; the op keeps them in
  token-major storage, rows ``[total_q, Hq, Dv]``) with any strides and the channels contiguous;
  ``Hq = Hk * G`` rows per query token, head ``h = k * G + g``;
* ``x`` ``[total_k, Dv]``, channels contiguous, any token stride;
* ``lse`` ``[Hq, total_q]`` float32 contiguous, natural log;
* int32 ``cu_seqlens_q / cu_seqlens_k`` ``[B + 1]`` (in tokens, not rows).

``Dv`` (1152 for SigLIP) is wide and not a power of two. A program keeps its rows' accumulator for
the whole width on chip, so ``x`` is read once: the width is covered by two power-of-two slabs,
``DV_HI`` (the largest power of two <= Dv, 1024) and ``DV_LO`` (the rest, padded: 128), masked past
``Dv``.
Each key tile ``x[BLOCK_N, Dv]`` is loaded once and used twice, for the scores (``q x^T``) and the
output (``p x``).

Forward: one program per (block of ``BLOCK_M`` rows of a segment, key split). Rows are
(token, head) pairs of one segment: decoding has ``Hq * 1`` rows (one program holds them all, the
keys are split across programs and merged by LSE: flash-decoding); frame-local V2V has 9 * 12 = 108
rows per frame, seven 16-row programs that read the same 729 keys (from L2 after the first).

Backward (FlashAttention-2, deterministic, no atomics): ``delta = rowsum(dO * O) - dlse``; one
program per (row block, key split) accumulates ``dq``; one program per key block accumulates
``dx = P^T dO + scale * dS^T q`` - the value and the key contribution of the same token - over every
row of its segment.

Launch configurations are not tuned (no GPU was at hand when this was written): they keep, on an
H100, a 16-row fp32 accumulator of 1152 channels at ~72 registers a thread (8 warps) and two stages
of a 32 x 1152 bf16 key tile (147 KB) in shared memory. Measure with
benchmarks/bench_projected_attention.py and adjust.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from crosslmm_ops._backend import triton_interpreted
from crosslmm_ops.triton.common import (
    LOG2E,
    MAX_SPLITS,
    cdiv,
    check_launch,
    dot_precision,
    next_power_of_2,
    num_splits_heuristic,
    segment,
    sm_count,
)

MAX_WIDTH = 2048  # Dv; wider accumulators do not fit a program's registers


@triton.jit
def _rows(m0, q_start, n_rows, HQ: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows ``m0 .. m0 + BLOCK_M`` of a segment as (mask, token, head, kv head, head in group)."""
    r = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask = r < n_rows
    t = q_start + r // HQ
    h = r % HQ
    return mask, t, h, h // GROUP, h % GROUP


@triton.jit
def _load_slabs(ptr, row_off, mask, dv, DV_HI: tl.constexpr, DV_LO: tl.constexpr):
    """Rows ``ptr + row_off`` as the two slabs ``[:, :DV_HI]`` and ``[:, DV_HI:DV_HI + DV_LO]``,
    zero past ``dv``."""
    hi = tl.arange(0, DV_HI)
    lo = DV_HI + tl.arange(0, DV_LO)
    a = tl.load(
        ptr + row_off[:, None] + hi[None, :], mask=mask[:, None] & (hi < dv)[None, :], other=0.0
    )
    b = tl.load(
        ptr + row_off[:, None] + lo[None, :], mask=mask[:, None] & (lo < dv)[None, :], other=0.0
    )
    return a, b


@triton.jit
def _store_slabs(ptr, row_off, mask, dv, a, b, DV_HI: tl.constexpr, DV_LO: tl.constexpr):
    hi = tl.arange(0, DV_HI)
    lo = DV_HI + tl.arange(0, DV_LO)
    tl.store(
        ptr + row_off[:, None] + hi[None, :],
        a.to(ptr.dtype.element_ty),
        mask=mask[:, None] & (hi < dv)[None, :],
    )
    tl.store(
        ptr + row_off[:, None] + lo[None, :],
        b.to(ptr.dtype.element_ty),
        mask=mask[:, None] & (lo < dv)[None, :],
    )


@triton.jit
def _split_range(k_len, num_splits, split, BLOCK_N: tl.constexpr):
    """This split's contiguous range of key blocks (possibly empty)."""
    n_blocks = tl.cdiv(k_len, BLOCK_N)
    per_split = tl.cdiv(n_blocks, num_splits)
    lo = split * per_split
    return lo, tl.minimum(lo + per_split, n_blocks)


@triton.jit
def _fwd_kernel(
    Q,
    X,
    Out,
    Lse,
    cu_q,
    cu_k,
    sq_k,
    sq_t,
    sq_g,
    sx_t,
    so_s,
    so_k,
    so_t,
    so_g,
    sl_s,
    total_q,
    dv,
    num_m_blocks,
    num_splits,
    scale_log2,
    HQ: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DV_HI: tl.constexpr,
    DV_LO: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seg = tl.program_id(0) // num_m_blocks
    m_block = tl.program_id(0) % num_m_blocks
    split = tl.program_id(1).to(tl.int64)  # split * (split stride) can pass 2**31
    q_start, q_len = segment(cu_q, seg)
    n_rows = q_len * HQ
    if m_block * BLOCK_M >= n_rows:
        return
    k_start, k_len = segment(cu_k, seg)
    blk_lo, blk_hi = _split_range(k_len, num_splits, split, BLOCK_N)

    mask_m, t, h, kh, g = _rows(m_block * BLOCK_M, q_start, n_rows, HQ, GROUP, BLOCK_M)
    q_hi, q_lo = _load_slabs(Q, kh * sq_k + t * sq_t + g * sq_g, mask_m, dv, DV_HI, DV_LO)
    offs_n = tl.arange(0, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_hi = tl.zeros([BLOCK_M, DV_HI], tl.float32)
    acc_lo = tl.zeros([BLOCK_M, DV_LO], tl.float32)
    for nb in range(blk_lo, blk_hi):
        cols = nb * BLOCK_N + offs_n
        mask_n = cols < k_len
        x_hi, x_lo = _load_slabs(X, (k_start + cols).to(tl.int64) * sx_t, mask_n, dv, DV_HI, DV_LO)
        s = tl.dot(q_hi, tl.trans(x_hi), input_precision=PRECISION)
        s = tl.dot(q_lo, tl.trans(x_lo), s, input_precision=PRECISION) * scale_log2
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # Every block in range holds at least one real key, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(x_hi.dtype)
        acc_hi = tl.dot(p, x_hi, acc_hi * alpha[:, None], input_precision=PRECISION)
        acc_lo = tl.dot(p, x_lo, acc_lo * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    # No keys (an empty segment or an empty split): output 0 and lse -inf, never NaN.
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    acc_hi = tl.where(has_keys[:, None], acc_hi / l_safe[:, None], 0.0)
    acc_lo = tl.where(has_keys[:, None], acc_lo / l_safe[:, None], 0.0)
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) / 1.4426950408889634, float("-inf"))
    _store_slabs(
        Out + split * so_s,
        kh * so_k + t * so_t + g * so_g,
        mask_m,
        dv,
        acc_hi,
        acc_lo,
        DV_HI,
        DV_LO,
    )
    tl.store(Lse + split * sl_s + h * total_q + t, lse, mask=mask_m)


@triton.jit
def _merge_kernel(
    PartOut,
    PartLse,
    Out,
    Lse,
    total_q,
    n_rows,
    num_splits,
    dv,
    sp_s,
    sp_k,
    sp_t,
    sp_g,
    so_k,
    so_t,
    so_g,
    spl_s,
    HQ: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Merge the splits' partial outputs by their LSE. Rows in token-major order, as the op
    stores them; one program per (row block, channel block)."""
    mask_r, t, h, kh, g = _rows(tl.program_id(0) * BLOCK_R, 0, n_rows, HQ, GROUP, BLOCK_R)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = mask_r[:, None] & (offs_d < dv)[None, :]
    lse_off = h * total_q + t

    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in range(num_splits):
        m = tl.maximum(m, tl.load(PartLse + s * spl_s + lse_off, mask=mask_r, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # every split empty: every weight is 0
    w_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    o_ptrs = PartOut + (kh * sp_k + t * sp_t + g * sp_g)[:, None] + offs_d[None, :]
    for s in range(num_splits):
        lse_s = tl.load(PartLse + s * spl_s + lse_off, mask=mask_r, other=float("-inf"))
        w = tl.exp(lse_s - m_safe)
        w_sum += w
        acc += w[:, None] * tl.load(o_ptrs, mask=mask, other=0.0)
        o_ptrs += sp_s  # stepped, so split * stride never overflows int32
    has_keys = w_sum > 0.0
    w_safe = tl.where(has_keys, w_sum, 1.0)
    out = tl.where(has_keys[:, None], acc / w_safe[:, None], 0.0)
    out_row = kh * so_k + t * so_t + g * so_g
    tl.store(Out + out_row[:, None] + offs_d[None, :], out.to(Out.dtype.element_ty), mask=mask)
    if tl.program_id(1) == 0:
        tl.store(
            Lse + lse_off, tl.where(has_keys, m_safe + tl.log(w_safe), float("-inf")), mask=mask_r
        )


@triton.jit
def _bwd_preprocess_kernel(
    Out,
    dOut,
    dLse,
    Delta,
    total_q,
    n_rows,
    dv,
    so_k,
    so_t,
    so_g,
    sdo_k,
    sdo_t,
    sdo_g,
    HAS_DLSE: tl.constexpr,
    HQ: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``delta = rowsum(dO * O) - dlse`` for rows in token-major order."""
    mask_r, t, h, kh, g = _rows(tl.program_id(0) * BLOCK_R, 0, n_rows, HQ, GROUP, BLOCK_R)
    lse_off = h * total_q + t
    o_row = kh * so_k + t * so_t + g * so_g
    do_row = kh * sdo_k + t * sdo_t + g * sdo_g
    acc = tl.zeros([BLOCK_R], tl.float32)
    for d0 in range(0, dv, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_r[:, None] & (offs_d < dv)[None, :]
        o = tl.load(Out + o_row[:, None] + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(dOut + do_row[:, None] + offs_d[None, :], mask=mask, other=0.0)
        acc += tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        # d lse_r / d s_rj = p_rj, so a gradient on the LSE enters exactly like -delta.
        acc -= tl.load(dLse + lse_off, mask=mask_r, other=0.0).to(tl.float32)
    tl.store(Delta + lse_off, acc, mask=mask_r)


@triton.jit
def _bwd_dq_kernel(
    Q,
    X,
    dOut,
    Lse,
    Delta,
    dQ,
    cu_q,
    cu_k,
    sq_k,
    sq_t,
    sq_g,
    sx_t,
    sdo_k,
    sdo_t,
    sdo_g,
    sdq_s,
    sdq_k,
    sdq_t,
    sdq_g,
    total_q,
    dv,
    num_m_blocks,
    num_splits,
    scale,
    scale_log2,
    HQ: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DV_HI: tl.constexpr,
    DV_LO: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seg = tl.program_id(0) // num_m_blocks
    m_block = tl.program_id(0) % num_m_blocks
    split = tl.program_id(1).to(tl.int64)
    q_start, q_len = segment(cu_q, seg)
    n_rows = q_len * HQ
    if m_block * BLOCK_M >= n_rows:
        return
    k_start, k_len = segment(cu_k, seg)
    blk_lo, blk_hi = _split_range(k_len, num_splits, split, BLOCK_N)

    mask_m, t, h, kh, g = _rows(m_block * BLOCK_M, q_start, n_rows, HQ, GROUP, BLOCK_M)
    q_hi, q_lo = _load_slabs(Q, kh * sq_k + t * sq_t + g * sq_g, mask_m, dv, DV_HI, DV_LO)
    do_hi, do_lo = _load_slabs(dOut, kh * sdo_k + t * sdo_t + g * sdo_g, mask_m, dv, DV_HI, DV_LO)
    lse = tl.load(Lse + h * total_q + t, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + h * total_q + t, mask=mask_m, other=0.0)
    offs_n = tl.arange(0, BLOCK_N)

    dq_hi = tl.zeros([BLOCK_M, DV_HI], tl.float32)
    dq_lo = tl.zeros([BLOCK_M, DV_LO], tl.float32)
    for nb in range(blk_lo, blk_hi):  # no keys: dq stays 0
        cols = nb * BLOCK_N + offs_n
        mask_n = cols < k_len
        x_hi, x_lo = _load_slabs(X, (k_start + cols).to(tl.int64) * sx_t, mask_n, dv, DV_HI, DV_LO)
        s = tl.dot(q_hi, tl.trans(x_hi), input_precision=PRECISION)
        s = tl.dot(q_lo, tl.trans(x_lo), s, input_precision=PRECISION) * scale_log2
        p = tl.where(mask_n[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do_hi, tl.trans(x_hi), input_precision=PRECISION)
        dp = tl.dot(do_lo, tl.trans(x_lo), dp, input_precision=PRECISION)
        ds = (p * (dp - delta[:, None])).to(x_hi.dtype)
        dq_hi = tl.dot(ds, x_hi, dq_hi, input_precision=PRECISION)
        dq_lo = tl.dot(ds, x_lo, dq_lo, input_precision=PRECISION)

    _store_slabs(
        dQ + split * sdq_s,
        kh * sdq_k + t * sdq_t + g * sdq_g,
        mask_m,
        dv,
        dq_hi * scale,
        dq_lo * scale,
        DV_HI,
        DV_LO,
    )


@triton.jit
def _bwd_dx_kernel(
    Q,
    X,
    dOut,
    Lse,
    Delta,
    dX,
    cu_q,
    cu_k,
    sq_k,
    sq_t,
    sq_g,
    sx_t,
    sdo_k,
    sdo_t,
    sdo_g,
    sdx_t,
    total_q,
    dv,
    num_n_blocks,
    scale,
    scale_log2,
    HQ: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DV_HI: tl.constexpr,
    DV_LO: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seg = tl.program_id(0) // num_n_blocks
    n_block = tl.program_id(0) % num_n_blocks
    k_start, k_len = segment(cu_k, seg)
    if n_block * BLOCK_N >= k_len:
        return
    q_start, q_len = segment(cu_q, seg)
    n_rows = q_len * HQ

    cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < k_len
    x_off = (k_start + cols).to(tl.int64)
    x_hi, x_lo = _load_slabs(X, x_off * sx_t, mask_n, dv, DV_HI, DV_LO)

    # The token is both the key and the value: dx = P^T dO (value) + scale * dS^T q (key), summed
    # here over every row (query token x head) of the segment, so no atomics are needed.
    dx_hi = tl.zeros([BLOCK_N, DV_HI], tl.float32)
    dx_lo = tl.zeros([BLOCK_N, DV_LO], tl.float32)
    for m0 in range(0, n_rows, BLOCK_M):
        mask_m, t, h, kh, g = _rows(m0, q_start, n_rows, HQ, GROUP, BLOCK_M)
        q_hi, q_lo = _load_slabs(Q, kh * sq_k + t * sq_t + g * sq_g, mask_m, dv, DV_HI, DV_LO)
        do_hi, do_lo = _load_slabs(
            dOut, kh * sdo_k + t * sdo_t + g * sdo_g, mask_m, dv, DV_HI, DV_LO
        )
        lse = tl.load(Lse + h * total_q + t, mask=mask_m, other=0.0) * 1.4426950408889634
        delta = tl.load(Delta + h * total_q + t, mask=mask_m, other=0.0)
        st = tl.dot(x_hi, tl.trans(q_hi), input_precision=PRECISION)
        st = tl.dot(x_lo, tl.trans(q_lo), st, input_precision=PRECISION) * scale_log2  # [N, M]
        pt = tl.where(mask_m[None, :], tl.exp2(st - lse[None, :]), 0.0)
        dpt = tl.dot(x_hi, tl.trans(do_hi), input_precision=PRECISION)
        dpt = tl.dot(x_lo, tl.trans(do_lo), dpt, input_precision=PRECISION)
        dst = (pt * (dpt - delta[None, :]) * scale).to(q_hi.dtype)
        pt = pt.to(do_hi.dtype)
        dx_hi = tl.dot(pt, do_hi, dx_hi, input_precision=PRECISION)
        dx_hi = tl.dot(dst, q_hi, dx_hi, input_precision=PRECISION)
        dx_lo = tl.dot(pt, do_lo, dx_lo, input_precision=PRECISION)
        dx_lo = tl.dot(dst, q_lo, dx_lo, input_precision=PRECISION)

    _store_slabs(dX, x_off * sdx_t, mask_n, dv, dx_hi, dx_lo, DV_HI, DV_LO)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


def width_slabs(dv: int) -> tuple[int, int]:
    """``(DV_HI, DV_LO)``: the largest power of two <= ``dv`` (at least 16, ``tl.dot``'s minimum)
    and the rest padded to a power of two (at least 16; all masked when ``dv`` is a power of
    two). 1152 -> (1024, 128), 768 -> (512, 256), 1024 -> (1024, 16), 40 -> (32, 16)."""
    hi = max(16, 1 << (max(dv, 1).bit_length() - 1))
    rest = max(dv - hi, 0)
    return hi, max(16, next_power_of_2(rest) if rest else 16)


def _tile_rows(dv: int, dtype: torch.dtype, budget: int) -> int:
    """Keys per tile so that two stages of the ``[rows, DV_HI + DV_LO]`` tile fit ``budget`` bytes
    of shared memory."""
    width = sum(width_slabs(dv))
    rows = 32
    while rows > 16 and 2 * rows * width * dtype.itemsize > budget:
        rows //= 2
    return rows


def forward_config(dv: int, dtype: torch.dtype) -> dict:
    hi, lo = width_slabs(dv)
    return dict(
        BLOCK_M=16,
        BLOCK_N=_tile_rows(dv, dtype, 160 * 1024),
        DV_HI=hi,
        DV_LO=lo,
        num_warps=8 if hi >= 512 else 4,
        num_stages=2,
    )


def backward_config(dv: int, dtype: torch.dtype) -> tuple[dict, dict]:
    """(dq kernel, dx kernel) configurations."""
    hi, lo = width_slabs(dv)
    launch = dict(num_warps=8 if hi >= 512 else 4, num_stages=1 if hi >= 1024 else 2)
    dq = dict(BLOCK_M=16, BLOCK_N=_tile_rows(dv, dtype, 96 * 1024), DV_HI=hi, DV_LO=lo, **launch)
    dx = dict(BLOCK_M=16, BLOCK_N=16, DV_HI=hi, DV_LO=lo, **launch)
    return dq, dx


# What Triton adds to the dot operands' tiles in shared memory, at most, by element size (its
# layouts pad 16-bit tiles more): the largest gap between shared_memory_bytes' tiles and what
# Triton's compiler reports, over every width bucket from 512 (tests/test_triton_compile.py).
_SHARED_MEMORY_SLACK = {2: 16 * 1024, 4: 2176}


def shared_memory_bytes(dv: int, dtype: torch.dtype) -> int:
    """Shared memory per block that the core's kernels need at width ``dv``, the most of the
    forward's and the backward's: their dot operands' tiles, ``[rows, DV_HI + DV_LO]`` each (the
    forward's q and x tiles; the backward's q, dO and x tiles), and Triton's slack. float32 at the
    widest widths needs more than a GPU has (the backward at Dv 1408: 290 KB)."""
    width = sum(width_slabs(dv))
    fwd, (dq, _) = forward_config(dv, dtype), backward_config(dv, dtype)
    rows = max(fwd["BLOCK_M"] + fwd["BLOCK_N"], 2 * dq["BLOCK_M"] + dq["BLOCK_N"])
    return rows * width * dtype.itemsize + _SHARED_MEMORY_SLACK[dtype.itemsize]


def _interpreted(cfg: dict) -> dict:
    if triton_interpreted():
        cfg = dict(cfg, num_warps=1, num_stages=1)
    return cfg


def _choose_splits(
    num_splits: int, batch: int, m_blocks: int, key_blocks: int, device: torch.device
) -> int:
    if num_splits <= 0:
        num_splits = num_splits_heuristic(batch * m_blocks, sm_count(device), key_blocks)
    return max(1, min(num_splits, max(key_blocks, 1), MAX_SPLITS))


def _grouped_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(kv head, token, head in group) strides of a ``[Hk, total_q, G, Dv]`` tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def _grouped_scratch(num_splits: int, q: torch.Tensor) -> torch.Tensor:
    """Float32 per-split partials ``[num_splits, Hk, total_q, G, Dv]`` of ``q``'s grouped shape,
    token-major within a split like the op's tensors (the merge reads rows in that order)."""
    hk, total_q, group, dv = q.shape
    scratch = torch.empty(
        (num_splits, total_q, hk, group, dv), dtype=torch.float32, device=q.device
    )
    return scratch.permute(0, 2, 1, 3, 4)


def _check(
    q: torch.Tensor, x: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor
) -> None:
    assert q.dim() == 4 and x.dim() == 2 and q.shape[-1] == x.shape[-1]
    assert q.stride(-1) == 1 and x.stride(-1) == 1, "channels must be contiguous"
    assert q.shape[-1] <= MAX_WIDTH, f"width {q.shape[-1]} > {MAX_WIDTH}"
    check_launch(q.dtype, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------


def projected_attention_core_forward(
    q: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    num_splits: int,
) -> None:
    """Writes ``out [Hk, total_q, G, Dv]`` (any strides, channels contiguous) and the natural-log
    ``lse`` (float32, contiguous ``[Hq, total_q]``). ``num_splits=0`` picks the split count from
    the occupancy."""
    _check(q, x, cu_seqlens_q, cu_seqlens_k)
    assert out.stride(-1) == 1 and lse.is_contiguous() and lse.dtype == torch.float32
    hk, total_q, group, dv = q.shape
    hq = hk * group
    batch = cu_seqlens_q.shape[0] - 1
    if total_q == 0 or batch <= 0:
        return
    cfg = _interpreted(forward_config(dv, q.dtype))
    m_blocks = cdiv(max(max_seqlen_q * hq, 1), cfg["BLOCK_M"])
    key_blocks = cdiv(max_seqlen_k, cfg["BLOCK_N"])
    num_splits = _choose_splits(num_splits, batch, m_blocks, key_blocks, q.device)
    common = dict(HQ=hq, GROUP=group, PRECISION=dot_precision(q.dtype), **cfg)
    grid = (batch * m_blocks, num_splits)
    scale_log2 = softmax_scale * LOG2E
    if num_splits == 1:
        _fwd_kernel[grid](
            q,
            x,
            out,
            lse,
            cu_seqlens_q,
            cu_seqlens_k,
            *_grouped_strides(q),
            x.stride(0),
            0,
            *_grouped_strides(out),
            0,
            total_q,
            dv,
            m_blocks,
            1,
            scale_log2,
            **common,
        )
        return
    # Scratch is written in full by the split programs (an empty split writes lse = -inf).
    part_out = _grouped_scratch(num_splits, q)
    part_lse = torch.empty((num_splits, hq, total_q), dtype=torch.float32, device=q.device)
    _fwd_kernel[grid](
        q,
        x,
        part_out,
        part_lse,
        cu_seqlens_q,
        cu_seqlens_k,
        *_grouped_strides(q),
        x.stride(0),
        part_out.stride(0),
        *_grouped_strides(part_out[0]),
        part_lse.stride(0),
        total_q,
        dv,
        m_blocks,
        num_splits,
        scale_log2,
        **common,
    )
    n_rows = hq * total_q
    rows = 16 if triton_interpreted() else 32
    block_d = 128
    _merge_kernel[(cdiv(n_rows, rows), cdiv(dv, block_d))](
        part_out,
        part_lse,
        out,
        lse,
        total_q,
        n_rows,
        num_splits,
        dv,
        part_out.stride(0),
        *_grouped_strides(part_out[0]),
        *_grouped_strides(out),
        part_lse.stride(0),
        HQ=hq,
        GROUP=group,
        BLOCK_R=rows,
        BLOCK_D=block_d,
        num_warps=1 if triton_interpreted() else 4,
    )


def projected_attention_core_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dq: torch.Tensor,
    dx: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    num_splits: int = 0,
    dlse: torch.Tensor | None = None,
) -> None:
    """Writes ``dq`` (``q``'s shape, any strides with the channels contiguous) and ``dx``
    (``x``'s shape, contiguous); ``dlse`` (``[Hq, total_q]``) is an optional gradient on the LSE.
    Deterministic: no atomics, and the key splits of ``dq`` are summed in a fixed order."""
    _check(q, x, cu_seqlens_q, cu_seqlens_k)
    assert dout.stride(-1) == 1 and out.stride(-1) == 1 and lse.is_contiguous()
    assert dq.stride(-1) == 1 and dx.is_contiguous()
    hk, total_q, group, dv = q.shape
    hq = hk * group
    total_k = x.shape[0]
    batch = cu_seqlens_q.shape[0] - 1
    if batch <= 0 or total_q + total_k == 0:
        return
    dq_cfg, dx_cfg = (_interpreted(c) for c in backward_config(dv, q.dtype))
    precision = dot_precision(q.dtype)
    scale_log2 = softmax_scale * LOG2E
    n_rows = hq * total_q
    delta = torch.empty((hq, total_q), dtype=torch.float32, device=q.device)
    if n_rows:
        rows = 16 if triton_interpreted() else 32
        _bwd_preprocess_kernel[(cdiv(n_rows, rows),)](
            out,
            dout,
            dlse.contiguous() if dlse is not None else lse,
            delta,
            total_q,
            n_rows,
            dv,
            *_grouped_strides(out),
            *_grouped_strides(dout),
            HAS_DLSE=dlse is not None,
            HQ=hq,
            GROUP=group,
            BLOCK_R=rows,
            BLOCK_D=128,
            num_warps=1 if triton_interpreted() else 4,
        )
    common = dict(HQ=hq, GROUP=group, PRECISION=precision)
    q_strides, do_strides = _grouped_strides(q), _grouped_strides(dout)
    if total_k:
        n_blocks = cdiv(max(max_seqlen_k, 1), dx_cfg["BLOCK_N"])
        _bwd_dx_kernel[(batch * n_blocks,)](
            q,
            x,
            dout,
            lse,
            delta,
            dx,
            cu_seqlens_q,
            cu_seqlens_k,
            *q_strides,
            x.stride(0),
            *do_strides,
            dx.stride(0),
            total_q,
            dv,
            n_blocks,
            softmax_scale,
            scale_log2,
            **common,
            **dx_cfg,
        )
    if not total_q:
        return
    m_blocks = cdiv(max(max_seqlen_q * hq, 1), dq_cfg["BLOCK_M"])
    key_blocks = cdiv(max_seqlen_k, dq_cfg["BLOCK_N"])
    num_splits = _choose_splits(num_splits, batch, m_blocks, key_blocks, q.device)
    target = dq if num_splits == 1 else _grouped_scratch(num_splits, q)
    split_stride = 0 if num_splits == 1 else target.stride(0)
    _bwd_dq_kernel[(batch * m_blocks, num_splits)](
        q,
        x,
        dout,
        lse,
        delta,
        target,
        cu_seqlens_q,
        cu_seqlens_k,
        *q_strides,
        x.stride(0),
        *do_strides,
        split_stride,
        *_grouped_strides(target if num_splits == 1 else target[0]),
        total_q,
        dv,
        m_blocks,
        num_splits,
        softmax_scale,
        scale_log2,
        **common,
        **dq_cfg,
    )
    if num_splits > 1:
        # Rows a split never visits (none of its keys) are never written: every split program
        # of an existing row block writes its whole block, zeros for an empty range.
        torch.sum(target, 0, out=dq) if dq.dtype == torch.float32 else dq.copy_(target.sum(0))
