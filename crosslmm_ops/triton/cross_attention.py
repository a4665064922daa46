"""Triton fallback of the cross-attention kernels (same contract as csrc/attention/).

Everything works on the packed varlen layout: ``q [total_q, Hq, D]``, ``k, v [total_k, Hk, D]``
(channels contiguous, other strides arbitrary), int32 ``cu_seqlens [B+1]``; query segment ``i``
attends to key segment ``i`` only, non-causal; query head ``h`` reads key/value head
``h // (Hq // Hk)`` (GQA/MQA).

Forward (FlashAttention-2 with split-KV, "flash-decoding"): one program per (row block, key/value
head, segment, split). A program's rows are the (query, query head) pairs of one GQA group, query
by query (row ``r`` is query ``r // group`` of head ``hk * group + r % group``), so every K/V tile
it loads serves all the heads that read it: 9 frame-local queries of a 6-head group fill one
64-row tile where one program per head would fill six 16-row tiles, each loading the same keys.
Short queries against long keys give too few programs to fill the GPU, so the keys of a segment
are divided into ``num_splits`` contiguous ranges, one program each; each writes its partial
output and log-sum-exp to fp32 scratch and a second small kernel merges them by LSE. With one
split the first kernel writes the result directly.

Backward (FlashAttention-2): ``delta = rowsum(dO * O) - dlse`` first, then one kernel per key block
accumulating dK and dV over every packed row (query, head) of its GQA group, and one kernel per
block of packed rows and key split accumulating dQ over the split's key blocks, laid out like the
forward: short queries against long keys (V2V global: 576 queries, 46,656 keys) would otherwise
give fewer programs than SMs, each walking every key. With several splits each writes its fp32
partial dQ and a small kernel sums them in split order. Each output element is written by exactly
one program, with no atomics, so the backward is deterministic by construction.

Head dims are padded to a power of two (at least 16, for ``tl.dot``) with masks, so 40, 72, 96 or
odd widths work; ``tl.dot`` accumulates in fp32. Softmax runs in base 2 (``exp2``) with the scale
folded into ``log2(e) * softmax_scale``; the LSE is stored in natural log.
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

MAX_HEAD_DIM = 256


@triton.jit
def _load_tile(ptr, rows, stride_t, head_offset, offs_d, mask):
    """A [rows, D] tile of one head (``rows``: int64 token indices), zero where masked."""
    return tl.load(
        ptr + rows[:, None] * stride_t + head_offset + offs_d[None, :], mask=mask, other=0.0
    )


@triton.jit
def _load_rows(ptr, rows, stride_t, heads, stride_h, offs_d, mask):
    """A [rows, D] tile whose row ``i`` is token ``rows[i]`` of head ``heads[i]`` (int64 both): a
    block of packed (query, head) rows. Zero where masked."""
    return tl.load(
        ptr + rows[:, None] * stride_t + heads[:, None] * stride_h + offs_d[None, :],
        mask=mask,
        other=0.0,
    )


@triton.jit
def _load_row_stats(Lse, Delta, h, total_q, rows, mask):
    """The rows' LSE (in base 2, as the kernels' exp2 wants it) and delta; ``h``, the head, is
    one for all rows or one per row."""
    lse = tl.load(Lse + h * total_q + rows, mask=mask, other=0.0) * 1.4426950408889634
    return lse, tl.load(Delta + h * total_q + rows, mask=mask, other=0.0)


@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    cu_q,
    cu_k,
    sq_t,
    sq_h,
    sk_t,
    sk_h,
    sv_t,
    sv_h,
    so_s,
    so_t,
    so_h,
    sl_s,
    sl_h,
    num_m_blocks,
    num_splits,
    head_dim,
    group,
    scale_log2,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seg = tl.program_id(0) // num_m_blocks
    m_block = tl.program_id(0) % num_m_blocks
    hk = tl.program_id(1)
    split = tl.program_id(2)  # int32 in the loop bounds; int64 where it scales a stride
    q_start, q_len = segment(cu_q, seg)
    if m_block * BLOCK_M >= q_len * group:
        return
    k_start, k_len = segment(cu_k, seg)
    # This split's contiguous range of key blocks (possibly empty: it then writes lse = -inf).
    n_blocks = tl.cdiv(k_len, BLOCK_N)
    per_split = tl.cdiv(n_blocks, num_splits)
    blk_lo = split * per_split
    blk_hi = tl.minimum(blk_lo + per_split, n_blocks)

    # Packed rows: (query, head of the group) pairs, query-major (see the module docstring).
    packed = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = packed < q_len * group
    mask_d = offs_d < head_dim
    rows = (q_start + packed // group).to(tl.int64)
    heads = (hk * group + packed % group).to(tl.int64)
    q = _load_rows(Q, rows, sq_t, heads, sq_h, offs_d, mask_m[:, None] & mask_d[None, :])

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for nb in range(blk_lo, blk_hi):
        cols = nb * BLOCK_N + offs_n
        mask_n = cols < k_len
        krows = (k_start + cols).to(tl.int64)
        kt = tl.load(
            K + krows[None, :] * sk_t + hk * sk_h + offs_d[:, None],
            mask=mask_n[None, :] & mask_d[:, None],
            other=0.0,
        )  # K transposed: [D, N]
        s = tl.dot(q, kt, input_precision=PRECISION) * scale_log2
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # Every block in range holds at least one real key, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V, krows, sv_t, hk * sv_h, offs_d, mask_n[:, None] & mask_d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # No keys (an empty segment or an empty split): output 0 and lse -inf, never NaN. A NaN in the
    # inputs makes l NaN, which must reach the output (`!= 0`, not `> 0`, lets it through).
    has_keys = l_i != 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = tl.where(has_keys[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) / 1.4426950408889634, float("-inf"))
    o_ptrs = (
        Out
        + split.to(tl.int64) * so_s
        + rows[:, None] * so_t
        + heads[:, None] * so_h
        + offs_d[None, :]
    )
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(Lse + split.to(tl.int64) * sl_s + heads * sl_h + rows, lse, mask=mask_m)


@triton.jit
def _attn_merge_kernel(
    PartOut,
    PartLse,
    Out,
    Lse,
    total_q,
    num_splits,
    head_dim,
    sp_s,
    sp_t,
    sp_h,
    spl_s,
    spl_h,
    so_t,
    so_h,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    h = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = rows < total_q
    mask = mask_m[:, None] & (offs_d < head_dim)[None, :]
    rows = rows.to(tl.int64)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(num_splits):
        m = tl.maximum(
            m, tl.load(PartLse + s * spl_s + h * spl_h + rows, mask=mask_m, other=float("-inf"))
        )
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # all splits empty: every weight is exp(-inf)=0
    w_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Step the pointer split by split: split * (split stride) could pass 2**31 in int32.
    o_ptrs = PartOut + rows[:, None] * sp_t + h * sp_h + offs_d[None, :]
    for s in range(num_splits):
        lse_s = tl.load(PartLse + s * spl_s + h * spl_h + rows, mask=mask_m, other=float("-inf"))
        w = tl.exp(lse_s - m_safe)
        w_sum += w
        acc += w[:, None] * tl.load(o_ptrs, mask=mask, other=0.0)
        o_ptrs += sp_s
    has_keys = w_sum != 0.0  # NaN partials stay NaN (see the forward's epilogue)
    w_safe = tl.where(has_keys, w_sum, 1.0)
    out = tl.where(has_keys[:, None], acc / w_safe[:, None], 0.0)
    lse = tl.where(has_keys, m_safe + tl.log(w_safe), float("-inf"))
    tl.store(
        Out + rows[:, None] * so_t + h * so_h + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=mask,
    )
    tl.store(Lse + h * total_q + rows, lse, mask=mask_m)


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out,
    dOut,
    dLse,
    Delta,
    total_q,
    head_dim,
    so_t,
    so_h,
    sdo_t,
    sdo_h,
    sdl_h,
    sdl_t,
    HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    h = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = rows < total_q
    mask = mask_m[:, None] & (offs_d < head_dim)[None, :]
    rows = rows.to(tl.int64)
    o = tl.load(Out + rows[:, None] * so_t + h * so_h + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(dOut + rows[:, None] * sdo_t + h * sdo_h + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        # d lse_i / d s_ij = p_ij, so a gradient on the LSE enters exactly like -delta.
        delta -= tl.load(dLse + h * sdl_h + rows * sdl_t, mask=mask_m, other=0.0).to(tl.float32)
    tl.store(Delta + h * total_q + rows, delta, mask=mask_m)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    dOut,
    Lse,
    Delta,
    dK,
    dV,
    cu_q,
    cu_k,
    sq_t,
    sq_h,
    sk_t,
    sk_h,
    sv_t,
    sv_h,
    sdo_t,
    sdo_h,
    sdk_t,
    sdk_h,
    total_q,
    num_n_blocks,
    head_dim,
    group,
    scale,
    scale_log2,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seg = tl.program_id(0) // num_n_blocks
    n_block = tl.program_id(0) % num_n_blocks
    hk = tl.program_id(1)
    k_start, k_len = segment(cu_k, seg)
    if n_block * BLOCK_N >= k_len:
        return
    q_start, q_len = segment(cu_q, seg)

    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < k_len
    mask_d = offs_d < head_dim
    kv_mask = mask_n[:, None] & mask_d[None, :]
    krows = (k_start + offs_n).to(tl.int64)
    k = _load_tile(K, krows, sk_t, hk * sk_h, offs_d, kv_mask)
    v = _load_tile(V, krows, sv_t, hk * sv_h, offs_d, kv_mask)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # GQA: this program owns its key block for every query head of the group, so dK and dV are
    # summed over the group here instead of with atomics. It walks the group's packed rows
    # (query, head), query-major as in the forward: 9 queries of a 6-head group are 54 rows, two
    # 32-row blocks, where a walk head by head would take six blocks of 9 rows.
    for m0 in range(0, q_len * group, BLOCK_M):
        packed = m0 + offs_m
        mask_m = packed < q_len * group
        qrows = (q_start + packed // group).to(tl.int64)
        heads = (hk * group + packed % group).to(tl.int64)
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = _load_rows(Q, qrows, sq_t, heads, sq_h, offs_d, q_mask)
        do = _load_rows(dOut, qrows, sdo_t, heads, sdo_h, offs_d, q_mask)
        lse, delta = _load_row_stats(Lse, Delta, heads, total_q, qrows, mask_m)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2  # [N, M]
        pt = tl.where(mask_m[None, :], tl.exp2(st - lse[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)

    out_off = krows[:, None] * sdk_t + hk * sdk_h + offs_d[None, :]
    tl.store(dK + out_off, (dk * scale).to(dK.dtype.element_ty), mask=kv_mask)
    tl.store(dV + out_off, dv.to(dV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    dOut,
    Lse,
    Delta,
    dQ,
    cu_q,
    cu_k,
    sq_t,
    sq_h,
    sk_t,
    sk_h,
    sv_t,
    sv_h,
    sdo_t,
    sdo_h,
    sdq_s,
    sdq_t,
    sdq_h,
    total_q,
    num_m_blocks,
    num_splits,
    head_dim,
    group,
    scale,
    scale_log2,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dQ of one block of a GQA group's packed rows over one split's range of key blocks: the
    forward's program layout, so each K/V tile serves every head of the group. With one split it
    writes dQ; with more, each split its fp32 partial (zeros for an empty range), summed in order
    by ``_attn_bwd_dq_reduce_kernel``."""
    seg = tl.program_id(0) // num_m_blocks
    m_block = tl.program_id(0) % num_m_blocks
    hk = tl.program_id(1)
    split = tl.program_id(2)
    q_start, q_len = segment(cu_q, seg)
    if m_block * BLOCK_M >= q_len * group:
        return
    k_start, k_len = segment(cu_k, seg)
    n_blocks = tl.cdiv(k_len, BLOCK_N)
    per_split = tl.cdiv(n_blocks, num_splits)
    blk_lo = split * per_split
    blk_hi = tl.minimum(blk_lo + per_split, n_blocks)

    packed = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = packed < q_len * group
    mask_d = offs_d < head_dim
    q_mask = mask_m[:, None] & mask_d[None, :]
    qrows = (q_start + packed // group).to(tl.int64)
    heads = (hk * group + packed % group).to(tl.int64)
    q = _load_rows(Q, qrows, sq_t, heads, sq_h, offs_d, q_mask)
    do = _load_rows(dOut, qrows, sdo_t, heads, sdo_h, offs_d, q_mask)
    lse, delta = _load_row_stats(Lse, Delta, heads, total_q, qrows, mask_m)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for nb in range(blk_lo, blk_hi):  # no keys: dq stays 0
        cols = nb * BLOCK_N + offs_n
        mask_n = cols < k_len
        kv_mask = mask_n[:, None] & mask_d[None, :]
        krows = (k_start + cols).to(tl.int64)
        k = _load_tile(K, krows, sk_t, hk * sk_h, offs_d, kv_mask)
        v = _load_tile(V, krows, sv_t, hk * sv_h, offs_d, kv_mask)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        p = tl.where(mask_n[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    # split * (split stride) can pass 2**31
    dq_ptrs = (
        dQ
        + split.to(tl.int64) * sdq_s
        + qrows[:, None] * sdq_t
        + heads[:, None] * sdq_h
        + offs_d[None, :]
    )
    tl.store(dq_ptrs, (dq * scale).to(dQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _attn_bwd_dq_reduce_kernel(
    Part,
    dQ,
    numel,
    num_splits,
    split_stride,
    BLOCK: tl.constexpr,
):
    """dQ = the sum of the splits' fp32 partials, split 0 first: the same order on every run, so
    the backward stays bitwise reproducible. ``Part`` is ``[splits, total_q, Hq, D]`` and ``dQ``
    ``[total_q, Hq, D]``, both contiguous, so elements are flat indices."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros([BLOCK], tl.float32)
    ptrs = Part + offs
    for _ in range(num_splits):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += split_stride
    tl.store(dQ + offs, acc.to(dQ.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------
# Not tuned: no GPU was at hand when these were written. They follow FlashAttention-2's Triton
# kernels and keep, on an H100 (228 KB shared memory, 255 registers a thread), the pipelined K/V
# tiles inside shared memory and each thread's fp32 accumulator at about 64 registers:
#   forward   bf16/fp16, D <= 128: BLOCK_M 128 (smaller for short query segments), BLOCK_N 64,
#             8 warps at 128x128, 3 stages;  D = 256 or fp32 input: BLOCK_M 64, BLOCK_N 32, 2 stages
#   backward  dK/dV: a key block of 64 (32 at D = 256) against query blocks of 32 (16);
#             dQ: a query block of 64 (32) against key blocks of 32 (16); 8 warps at D = 256.
# Measure with benchmarks/bench_cross_attention.py and adjust.


def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def _forward_config(packed_rows: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Launch options for a forward whose programs hold at most ``packed_rows`` rows (a query
    segment's queries times the heads of a GQA group)."""
    block_d = _block_d(head_dim)
    wide = block_d > 128 or (dtype == torch.float32 and block_d > 64)
    # Few rows (decode, frame-local V2V) waste most of a 128-row tile: shrink it.
    block_m = min(64 if wide else 128, max(16, next_power_of_2(packed_rows)))
    return dict(
        BLOCK_M=block_m,
        BLOCK_N=32 if wide else 64,
        BLOCK_D=block_d,
        num_warps=8 if block_m * block_d >= 128 * 128 else 4,
        num_stages=2 if wide else 3,
    )


def _backward_config(packed_rows: int, head_dim: int, dtype: torch.dtype) -> tuple[dict, dict]:
    """(dK/dV kernel, dQ kernel) block sizes and launch options; ``packed_rows`` as in
    :func:`_forward_config`. At head dim 128 in 16 bits both kernels run 4 warps, the dQ kernel 3
    stages: on the H100's V2V T=64 rows (tools/triton_backward_probe.py) 4 warps took 1.3-1.4 ms
    off each kernel against 8, and 3 stages beat 2 in the dQ kernel."""
    block_d = _block_d(head_dim)
    wide = block_d > 128
    big, small = (32, 16) if wide else (64, 32)
    warps = 8 if wide else 4
    two_byte = dtype != torch.float32
    dkdv_stages = 3 if block_d < 128 and two_byte else 2
    dq_stages = 3 if not wide and two_byte else 2
    dq_rows = min(big, max(16, next_power_of_2(packed_rows)))
    return (
        dict(BLOCK_M=small, BLOCK_N=big, BLOCK_D=block_d, num_warps=warps, num_stages=dkdv_stages),
        dict(
            BLOCK_M=dq_rows, BLOCK_N=small, BLOCK_D=block_d, num_warps=warps, num_stages=dq_stages
        ),
    )


# ----------------------------------------------------------------------------------------------
# Entry points: the same contract as crosslmm_ops._C.attention_forward / attention_backward
# ----------------------------------------------------------------------------------------------


def _check_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, (
        "channels must be contiguous"
    )
    assert q.shape[-1] <= MAX_HEAD_DIM, f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    num_splits: int,
    kernel: str | None = None,
) -> str:
    """Same contract as ``crosslmm_ops._C.attention_forward`` (see csrc/attention/): writes
    ``out [total_q, Hq, D]`` and the natural-log ``lse`` (float32, contiguous ``[Hq, total_q]``).
    ``num_splits=0`` picks the split count with :func:`num_splits_heuristic`. ``kernel`` (the CUDA
    kernel choice) is taken for the same signature and ignored: Triton has one kernel. Returns the
    kernel that ran: ``"triton"``, or ``"none"`` (nothing to compute)."""
    del kernel
    _check_layout(q, k, v)
    check_launch(q.dtype, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    assert out.stride(-1) == 1 and lse.is_contiguous() and lse.dtype == torch.float32
    total_q, Hq, D = q.shape
    batch = cu_seqlens_q.shape[0] - 1
    if total_q == 0 or batch <= 0:
        return "none"
    Hk = k.shape[1]
    group = Hq // Hk
    packed_rows = max(max_seqlen_q, 1) * group  # a program's rows: (query, head of the group)
    cfg = _forward_config(packed_rows, D, q.dtype)
    m_blocks = cdiv(packed_rows, cfg["BLOCK_M"])
    key_blocks = cdiv(max_seqlen_k, cfg["BLOCK_N"])
    if num_splits <= 0:
        num_splits = num_splits_heuristic(batch * m_blocks * Hk, sm_count(q.device), key_blocks)
    num_splits = max(1, min(num_splits, max(key_blocks, 1), MAX_SPLITS))
    if triton_interpreted():
        cfg.update(num_warps=1, num_stages=1)
    precision = dot_precision(q.dtype)
    scale_log2 = softmax_scale * LOG2E
    grid = (batch * m_blocks, Hk, num_splits)
    common = dict(PRECISION=precision, **cfg)
    if num_splits == 1:
        _attn_fwd_kernel[grid](
            q,
            k,
            v,
            out,
            lse,
            cu_seqlens_q,
            cu_seqlens_k,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            0,
            out.stride(0),
            out.stride(1),
            0,
            lse.stride(0),
            m_blocks,
            1,
            D,
            group,
            scale_log2,
            **common,
        )
        return "triton"
    # Scratch is written in full by the split programs (an empty split writes lse = -inf).
    part_out = torch.empty((num_splits, total_q, Hq, D), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((num_splits, Hq, total_q), dtype=torch.float32, device=q.device)
    _attn_fwd_kernel[grid](
        q,
        k,
        v,
        part_out,
        part_lse,
        cu_seqlens_q,
        cu_seqlens_k,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        m_blocks,
        num_splits,
        D,
        group,
        scale_log2,
        **common,
    )
    merge_m = 16 if triton_interpreted() else 64
    _attn_merge_kernel[(cdiv(total_q, merge_m), Hq)](
        part_out,
        part_lse,
        out,
        lse,
        total_q,
        num_splits,
        D,
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        out.stride(0),
        out.stride(1),
        BLOCK_M=merge_m,
        BLOCK_D=cfg["BLOCK_D"],
        num_warps=1 if triton_interpreted() else 4,
    )
    return "triton"


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    deterministic: bool,
    kernel: str | None = None,
    dlse: torch.Tensor | None = None,
    num_splits: int = 0,
) -> str:
    """Same contract as ``crosslmm_ops._C.attention_backward`` (see csrc/attention/), plus an
    optional gradient ``dlse [Hq, total_q]`` on the LSE and ``num_splits``, the dQ kernel's key
    splits (0: :func:`num_splits_heuristic` picks them, as in the forward). Always deterministic
    (no atomics; split partials are summed in a fixed order), so ``deterministic`` changes
    nothing here; ``kernel`` is taken for the same signature and ignored. Returns ``"triton"``,
    or ``"none"`` (nothing to compute)."""
    del deterministic, kernel
    _check_layout(q, k, v)
    check_launch(q.dtype, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    assert dout.stride(-1) == 1 and out.stride(-1) == 1 and lse.is_contiguous()
    assert dq.is_contiguous() and dk.is_contiguous() and dv.is_contiguous()
    total_q, Hq, D = q.shape
    total_k, Hk, _ = k.shape
    batch = cu_seqlens_q.shape[0] - 1
    if batch <= 0 or total_q + total_k == 0:
        return "none"
    group = Hq // Hk
    packed_rows = max(max_seqlen_q, 1) * group
    dkdv_cfg, dq_cfg = _backward_config(packed_rows, D, q.dtype)
    if triton_interpreted():
        for cfg in (dkdv_cfg, dq_cfg):
            cfg.update(num_warps=1, num_stages=1)
    precision = dot_precision(q.dtype)

    delta = torch.empty((Hq, total_q), dtype=torch.float32, device=q.device)
    if total_q:
        rows = 16 if triton_interpreted() else 64
        _attn_bwd_preprocess_kernel[(cdiv(total_q, rows), Hq)](
            out,
            dout,
            dlse if dlse is not None else lse,
            delta,
            total_q,
            D,
            out.stride(0),
            out.stride(1),
            dout.stride(0),
            dout.stride(1),
            dlse.stride(0) if dlse is not None else 0,
            dlse.stride(1) if dlse is not None else 0,
            HAS_DLSE=dlse is not None,
            BLOCK_M=rows,
            BLOCK_D=_block_d(D),
            num_warps=1 if triton_interpreted() else 4,
        )
    strides = (
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        dout.stride(0),
        dout.stride(1),
    )
    scale_log2 = softmax_scale * LOG2E
    if total_k:
        n_blocks = cdiv(max(max_seqlen_k, 1), dkdv_cfg["BLOCK_N"])
        _attn_bwd_dkdv_kernel[(batch * n_blocks, Hk)](
            q,
            k,
            v,
            dout,
            lse,
            delta,
            dk,
            dv,
            cu_seqlens_q,
            cu_seqlens_k,
            *strides,
            dk.stride(0),
            dk.stride(1),
            total_q,
            n_blocks,
            D,
            group,
            softmax_scale,
            scale_log2,
            PRECISION=precision,
            **dkdv_cfg,
        )
    if total_q:
        m_blocks = cdiv(packed_rows, dq_cfg["BLOCK_M"])
        key_blocks = cdiv(max_seqlen_k, dq_cfg["BLOCK_N"])
        if num_splits <= 0:
            num_splits = num_splits_heuristic(batch * m_blocks * Hk, sm_count(q.device), key_blocks)
        num_splits = max(1, min(num_splits, max(key_blocks, 1), MAX_SPLITS))
        if num_splits > 1 and not dq.is_contiguous():
            # The split sum walks dq as flat elements (the ops allocate it contiguous).
            raise ValueError("attention_backward: dq must be contiguous to take key splits")
        # Split partials in fp32 scratch, written in full: every (row, head) of every split.
        target = (
            dq
            if num_splits == 1
            else torch.empty((num_splits, *dq.shape), dtype=torch.float32, device=q.device)
        )
        _attn_bwd_dq_kernel[(batch * m_blocks, Hk, num_splits)](
            q,
            k,
            v,
            dout,
            lse,
            delta,
            target,
            cu_seqlens_q,
            cu_seqlens_k,
            *strides,
            target.stride(0) if num_splits > 1 else 0,
            target.stride(-3),
            target.stride(-2),
            total_q,
            m_blocks,
            num_splits,
            D,
            group,
            softmax_scale,
            scale_log2,
            PRECISION=precision,
            **dq_cfg,
        )
        if num_splits > 1:
            block = 256 if triton_interpreted() else 1024
            _attn_bwd_dq_reduce_kernel[(cdiv(dq.numel(), block),)](
                target,
                dq,
                dq.numel(),
                num_splits,
                target.stride(0),
                BLOCK=block,
                num_warps=1 if triton_interpreted() else 4,
            )
    return "triton"
