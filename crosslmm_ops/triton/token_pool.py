"""Triton fallback of the token-pooling gather kernel (same function as csrc/pooling/token_pool.cu).

The CSR plan is handed to this kernel as a padded table: destination token ``o`` reads source
tokens ``taps[o, :]`` with ``weights[o, :]`` (padding has weight 0 and token -1). One program
computes ``ROWS`` consecutive destination tokens for a block of channels; it loads a
``[ROWS, BLOCK_J, BLOCK_D]`` tile of source rows at once (all loads in flight together, no
dependent loop for the usual short rows) and combines it by weighted sum (avg, adaptive, bilinear,
and every backward except max's), by max with the first winner in scan order (max forward), or by
summing the gradients whose recorded winner is this token (max backward). No atomics: each output
element is written once, deterministically.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from crosslmm_ops._backend import triton_interpreted
from crosslmm_ops.ops.token_pool import csr_table
from crosslmm_ops.triton.common import cdiv, next_power_of_2


@triton.jit
def _token_mix_kernel(
    src,
    dst,
    argmax,
    taps,
    weights,
    src_sb,
    src_st,
    src_sn,
    dst_sb,
    dst_st,
    dst_sn,
    total_rows,
    src_frames,
    src_tokens,
    dst_frames,
    dst_tokens,
    channels,
    width,
    temporal_stride,
    frames_in,
    tokens_in,
    KIND: tl.constexpr,  # 0 weighted sum, 1 max forward, 2 max backward
    TIME_TRANSPOSED: tl.constexpr,
    FRAMES_PER_ROW: tl.constexpr,  # most source frames one destination row reads
    WRITE_ARGMAX: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < total_rows
    rows = tl.where(row_ok, rows, 0)
    o = rows % dst_tokens
    bt = rows // dst_tokens
    t = bt % dst_frames
    b = bt // dst_frames

    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < channels

    if TIME_TRANSPOSED:  # backward: input frame t was pooled into output frame t // s
        f_first = t // temporal_stride
        f_last = f_first + 1
        count = tl.minimum(temporal_stride, frames_in - f_first * temporal_stride)
    else:
        f_first = t * temporal_stride
        f_last = tl.minimum(f_first + temporal_stride, src_frames)
        count = f_last - f_first
    frame_weight = 1.0 / count.to(tl.float32)  # [ROWS]

    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    best = tl.full([ROWS, BLOCK_D], float("-inf"), tl.float32)
    best_pos = tl.full([ROWS, BLOCK_D], -1, tl.int32)
    my_pos = (t * tokens_in + o).to(tl.int32)  # [ROWS]
    big = 2147483647

    for df in tl.static_range(FRAMES_PER_ROW):
        f = f_first + df  # [ROWS]
        frame_ok = row_ok & (f < f_last)
        for j0 in range(0, width, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            tap_ok = frame_ok[:, None] & (offs_j[None, :] < width)
            tok = tl.load(taps + o[:, None] * width + offs_j[None, :], mask=tap_ok, other=-1)
            tap_ok = tap_ok & (tok >= 0)
            tok = tl.where(tap_ok, tok, 0).to(tl.int64)  # [ROWS, BLOCK_J]
            mask = tap_ok[:, :, None] & mask_d[None, None, :]
            ptrs = (
                src
                + (b * src_sb + f * src_st)[:, None, None]
                + tok[:, :, None] * src_sn
                + offs_d[None, None, :]
            )
            if KIND == 0:
                vals = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(weights + o[:, None] * width + offs_j[None, :], mask=tap_ok, other=0.0)
                w = w * frame_weight[:, None]
                acc += tl.sum(vals * w[:, :, None], axis=1)
            elif KIND == 2:
                vals = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                won = tl.load(
                    argmax
                    + (((b * src_frames + f)[:, None] * src_tokens + tok) * channels)[:, :, None]
                    + offs_d[None, None, :],
                    mask=mask,
                    other=-1,
                )
                acc += tl.sum(tl.where(won == my_pos[:, None, None], vals, 0.0), axis=1)
            else:
                vals = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)
                is_nan = vals != vals
                has_nan = tl.max(is_nan.to(tl.int32), axis=1) > 0  # [ROWS, BLOCK_D]
                top = tl.max(tl.where(is_nan, float("-inf"), vals), axis=1)
                if not WRITE_ARGMAX:
                    # No backward needs the winners: a running maximum that NaN wins for good.
                    best = tl.where((best != best) | has_nan, float("nan"), tl.maximum(best, top))
                else:
                    hit = tl.where(has_nan[:, None, :], is_nan, vals == top[:, None, :]) & mask
                    jj = tl.broadcast_to(offs_j[None, :, None], [ROWS, BLOCK_J, BLOCK_D])
                    first = tl.min(tl.where(hit, jj, big), axis=1)  # earliest winner in this block
                    found = first < big
                    winner_tok = tl.load(
                        taps + o[:, None] * width + tl.where(found, first, 0),
                        mask=found & mask_d[None, :],
                        other=0,
                    )
                    block_best = tl.where(has_nan, float("nan"), top)
                    # Earlier blocks win ties; NaN beats numbers; nothing beats an earlier NaN.
                    best_nan = best != best
                    better = (
                        (best_pos < 0)
                        | (has_nan & ~best_nan)
                        | (~has_nan & ~best_nan & (top > best))
                    )
                    better = better & found
                    best = tl.where(better, block_best, best)
                    best_pos = tl.where(
                        better, (f[:, None] * tokens_in + winner_tok).to(tl.int32), best_pos
                    )

    out_mask = row_ok[:, None] & mask_d[None, :]
    out_ptrs = dst + (b * dst_sb + t * dst_st + o * dst_sn)[:, None] + offs_d[None, :]
    if KIND == 1:
        tl.store(out_ptrs, best.to(dst.dtype.element_ty), mask=out_mask)
        if WRITE_ARGMAX:
            tl.store(
                argmax
                + (((b * dst_frames + t) * dst_tokens + o) * channels)[:, None]
                + offs_d[None, :],
                best_pos,
                mask=out_mask,
            )
    else:
        tl.store(out_ptrs, acc.to(dst.dtype.element_ty), mask=out_mask)


# The CSR rows as a padded table, keyed on the (cached, per-device) plan tensors themselves, so
# that it is built once per plan.
_padded_table = functools.lru_cache(maxsize=256)(csr_table)


def token_pool_mix(
    src: torch.Tensor,
    dst: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    weight: torch.Tensor,
    argmax: torch.Tensor | None,
    kind: int,
    temporal_stride: int,
    frames_in: int,
    tokens_in: int,
    time_transposed: bool,
    max_row_len: int,
) -> None:
    """Same contract as ``crosslmm_ops._C.token_pool_mix`` (see csrc/pooling/token_pool.cu)."""
    assert src.stride(3) == 1 and dst.stride(3) == 1, "channels must be contiguous"
    if kind == 2:
        assert argmax is not None and argmax.is_contiguous() and argmax.shape == src.shape
    total_rows = dst.shape[0] * dst.shape[1] * dst.shape[2]
    if total_rows == 0:
        return
    taps, table_w = _padded_table(row_ptr, col_idx, weight)
    width = taps.shape[1]
    channels = src.shape[3]
    block_d = min(next_power_of_2(channels), 64 if triton_interpreted() else 128)
    block_j = min(next_power_of_2(width), 16)
    # Enough rows per program that a tile holds ~32 source rows (fewer, larger programs).
    rows_per_program = max(1, min(32 // block_j, 8))
    grid = (cdiv(total_rows, rows_per_program), cdiv(channels, block_d))
    _token_mix_kernel[grid](
        src,
        dst,
        argmax if argmax is not None else dst,
        taps,
        table_w,
        src.stride(0),
        src.stride(1),
        src.stride(2),
        dst.stride(0),
        dst.stride(1),
        dst.stride(2),
        total_rows,
        src.shape[1],
        src.shape[2],
        dst.shape[1],
        dst.shape[2],
        channels,
        width,
        temporal_stride,
        frames_in,
        tokens_in,
        KIND=kind,
        TIME_TRANSPOSED=time_transposed,
        FRAMES_PER_ROW=1 if time_transposed else temporal_stride,
        WRITE_ARGMAX=argmax is not None,
        ROWS=rows_per_program,
        BLOCK_J=block_j,
        BLOCK_D=block_d,
        num_warps=4,
    )
