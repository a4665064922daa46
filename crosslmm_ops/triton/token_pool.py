"""Triton fallback of the token-pooling gather kernel (same function as csrc/pooling/token_pool.cu).

One program computes one destination token of one frame for a block of channels. It walks the
frames that feed it and its CSR row of source tokens, a block of taps at a time so that all of the
block's loads are in flight together, and combines them by weighted sum (avg, adaptive, bilinear,
and every backward except max's), by max with the first winner in scan order (max forward), or by
summing the gradients whose recorded winner is this token (max backward). No atomics: each output
element is written once, deterministically.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from crosslmm_ops._backend import triton_interpreted


@triton.jit
def _token_mix_kernel(
    src, dst, argmax, row_ptr, col_idx, weight,
    src_sb, src_st, src_sn, dst_sb, dst_st, dst_sn,
    src_frames, src_tokens, dst_frames, dst_tokens, channels,
    temporal_stride, frames_in, tokens_in,
    KIND: tl.constexpr,  # 0 weighted sum, 1 max forward, 2 max backward
    TIME_TRANSPOSED: tl.constexpr,
    WRITE_ARGMAX: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    o = row % dst_tokens
    bt = row // dst_tokens
    t = bt % dst_frames
    b = bt // dst_frames

    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < channels
    begin = tl.load(row_ptr + o)
    end = tl.load(row_ptr + o + 1)
    row_len = end - begin

    if TIME_TRANSPOSED:  # backward: input frame t was pooled into output frame t // s
        f_first = t // temporal_stride
        f_last = f_first + 1
        count = tl.minimum(temporal_stride, frames_in - f_first * temporal_stride)
    else:
        f_first = t * temporal_stride
        f_last = tl.minimum(f_first + temporal_stride, src_frames)
        count = f_last - f_first
    frame_weight = 1.0 / count.to(tl.float32)

    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    best = tl.full([BLOCK_D], float("-inf"), tl.float32)
    best_pos = tl.full([BLOCK_D], -1, tl.int32)
    my_pos = (t * tokens_in + o).to(tl.int32)
    big = 2147483647

    for f in range(f_first, f_last):
        for j0 in range(0, row_len, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            mask_j = offs_j < row_len
            tok = tl.load(col_idx + begin + offs_j, mask=mask_j, other=0).to(tl.int64)
            mask = mask_j[:, None] & mask_d[None, :]
            ptrs = src + b * src_sb + f * src_st + tok[:, None] * src_sn + offs_d[None, :]
            if KIND == 0:
                vals = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(weight + begin + offs_j, mask=mask_j, other=0.0) * frame_weight
                acc += tl.sum(vals * w[:, None], axis=0)
            elif KIND == 2:
                vals = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                a_ptrs = argmax + ((b * src_frames + f) * src_tokens + tok[:, None]) * channels \
                    + offs_d[None, :]
                won = tl.load(a_ptrs, mask=mask, other=-1)
                acc += tl.sum(tl.where(won == my_pos, vals, 0.0), axis=0)
            else:
                vals = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)
                is_nan = vals != vals
                has_nan = tl.max(is_nan.to(tl.int32), axis=0) > 0
                top = tl.max(tl.where(is_nan, float("-inf"), vals), axis=0)
                hit = tl.where(has_nan[None, :], is_nan, vals == top[None, :]) & mask
                first = tl.min(tl.where(hit, offs_j[:, None], big), axis=0)  # earliest winner
                winner_tok = tl.load(col_idx + begin + first, mask=mask_d & (first < row_len),
                                     other=0)
                block_best = tl.where(has_nan, float("nan"), top)
                # Earlier blocks win ties; NaN beats numbers; nothing beats an earlier NaN.
                best_nan = best != best
                better = (best_pos < 0) | (has_nan & ~best_nan) | (~has_nan & ~best_nan & (top > best))
                better = better & (first < row_len)
                best = tl.where(better, block_best, best)
                best_pos = tl.where(better, (f * tokens_in + winner_tok).to(tl.int32), best_pos)

    out_ptrs = dst + b * dst_sb + t * dst_st + o * dst_sn + offs_d
    if KIND == 1:
        tl.store(out_ptrs, best.to(dst.dtype.element_ty), mask=mask_d)
        if WRITE_ARGMAX:
            tl.store(argmax + ((b * dst_frames + t) * dst_tokens + o) * channels + offs_d, best_pos,
                     mask=mask_d)
    else:
        tl.store(out_ptrs, acc.to(dst.dtype.element_ty), mask=mask_d)


def token_pool_mix(src: torch.Tensor, dst: torch.Tensor, row_ptr: torch.Tensor,
                   col_idx: torch.Tensor, weight: torch.Tensor, argmax: torch.Tensor | None,
                   kind: int, temporal_stride: int, frames_in: int, tokens_in: int,
                   time_transposed: bool, max_row_len: int) -> None:
    """Same contract as ``crosslmm_ops._C.token_pool_mix`` (see csrc/pooling/token_pool.cu)."""
    assert src.stride(3) == 1 and dst.stride(3) == 1, "channels must be contiguous"
    if kind == 2:
        assert argmax is not None and argmax.is_contiguous() and argmax.shape == src.shape
    rows = dst.shape[0] * dst.shape[1] * dst.shape[2]
    if rows == 0:
        return
    channels = src.shape[3]
    if triton_interpreted():
        block_d = min(triton.next_power_of_2(channels), 64)
    else:
        block_d = min(triton.next_power_of_2(channels), 256)
    block_j = max(1, min(triton.next_power_of_2(max(max_row_len, 1)), 16))
    grid = (rows, triton.cdiv(channels, block_d))
    _token_mix_kernel[grid](
        src, dst, argmax if argmax is not None else dst, row_ptr, col_idx, weight,
        src.stride(0), src.stride(1), src.stride(2), dst.stride(0), dst.stride(1), dst.stride(2),
        src.shape[1], src.shape[2], dst.shape[1], dst.shape[2], channels,
        temporal_stride, frames_in, tokens_in,
        KIND=kind, TIME_TRANSPOSED=time_transposed, WRITE_ARGMAX=argmax is not None,
        BLOCK_J=block_j, BLOCK_D=block_d,
        num_warps=4,
    )
