// Cross-attention forward, FlashAttention-2 style, on tensor cores (mma.sync m16n8k16):
//
//   out = softmax(q k^T * scale) v,   lse = log(sum_j exp(q k_j^T * scale))   (natural log)
//
// One CTA per (row tile, head or kv-head group, segment, key split). Its kNWarps warps each own 16
// rows of the tile (kBlockM = 16 * kNWarps rows), keep their Q fragments in registers, and walk the
// CTA's range of 64-key tiles, which are staged in shared memory by cp.async with two stages (tile
// n+1 streams in while tile n is used). Per key tile a warp computes S = Q K^T (16 x 64, fp32),
// updates the running row max m and row sum l (online softmax, in log2 units: the scale and log2(e)
// are folded into one multiply so every exponential is an exp2), rescales its O accumulator and
// adds P V, with P taken straight from the S registers (see mma.cuh). At the end O / l and
// lse = (m + log2 l) * ln 2 are written.
//
// Split-KV (flash-decoding): when there are too few row tiles to fill the GPU, the keys of each
// segment are cut into num_splits ranges handled by different CTAs; each writes its normalised
// partial output (fp32) and its partial lse to scratch, and attention_forward_combine_kernel merges
// them: lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse) * out_s.
//
// Empty cases come out finite: a segment (or a split) with no keys has l = 0 and gives out = 0 and
// lse = -inf; a segment with no queries launches no work.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "attention/attention_common.cuh"
#include "attention/attention_params.h"
#include "common/mma.cuh"

namespace crosslmm {
namespace attention {

template <int kHeadDim, int kNWarps>
struct ForwardTile {
  static constexpr int kBlockM = 16 * kNWarps;  // rows per CTA
  static constexpr int kThreads = 32 * kNWarps;
  static constexpr int kTileQ = kBlockM * kSmemRowStride<kHeadDim>;  // elements, padded rows
  static constexpr int kTileKV = kBlockN * kSmemRowStride<kHeadDim>;
  // Q, then K and V with two stages each.
  static constexpr int kSmemBytes = (kTileQ + 4 * kTileKV) * 2;
};

template <typename T, int kHeadDim, int kNWarps>
__global__ void __launch_bounds__(32 * kNWarps)
    attention_forward_kernel(const AttentionForwardParams p) {
  using Tile = ForwardTile<kHeadDim, kNWarps>;
  constexpr int kBlockM = Tile::kBlockM;
  constexpr int kThreads = Tile::kThreads;
  constexpr int kKSteps = kHeadDim / 16;     // k-steps of S = Q K^T
  constexpr int kScoreBlocks = kBlockN / 8;  // 8-key n-blocks of S
  constexpr int kOutBlocks = kHeadDim / 8;   // 8-channel n-blocks of O

  extern __shared__ __align__(128) unsigned char smem[];
  T* const sQ = reinterpret_cast<T*>(smem);
  T* const sK = sQ + Tile::kTileQ;       // [2 stages][kBlockN][kHeadDim]
  T* const sV = sK + 2 * Tile::kTileKV;  // [2 stages][kBlockN][kHeadDim]

  // The CTA's tile. m-block varies fastest, then the head: CTAs running side by side read the same
  // K/V, which then mostly comes from L2.
  int64_t cta = blockIdx.x;
  const int m_block = static_cast<int>(cta % p.num_m_blocks);
  cta /= p.num_m_blocks;
  const int head_cta = static_cast<int>(cta % p.head_ctas);
  cta /= p.head_ctas;
  const int split = static_cast<int>(cta % p.num_splits);
  const int b = static_cast<int>(cta / p.num_splits);

  const Segment qs = segment_bounds(p.cu_seqlens_q, b, p.total_q);
  const int rows = qs.length * p.rows_per_query;
  const int m0 = m_block * kBlockM;
  if (m0 >= rows) return;  // uniform over the CTA
  const int rows_in_tile = min(kBlockM, rows - m0);
  const Segment ks = segment_bounds(p.cu_seqlens_k, b, p.total_k);
  const RowMap row_map{qs.begin, head_cta * p.rows_per_query, p.rows_per_query};
  const int kv_head = row_map.first_head / (p.num_heads_q / p.num_heads_k);

  // This split's key tiles: the segment's tiles cut into num_splits near-equal ranges (some may be
  // empty when the segment is short).
  const int n_blocks_segment = ceil_div_int(ks.length, kBlockN);
  const int per_split = ceil_div_int(n_blocks_segment, p.num_splits);
  const int n_begin = min(split * per_split, n_blocks_segment);
  const int n_end = min(n_begin + per_split, n_blocks_segment);

  const T* const q = static_cast<const T*>(p.q);
  const T* const k = static_cast<const T*>(p.k);
  const T* const v = static_cast<const T*>(p.v);
  const T* const k_head = k + static_cast<int64_t>(kv_head) * p.k_head_stride;
  const T* const v_head = v + static_cast<int64_t>(kv_head) * p.v_head_stride;

  auto load_q = [&]() {
    load_tile_async<kBlockM, kHeadDim, kThreads>(sQ, rows_in_tile, q, [&](int r) {
      const int row = m0 + r;
      return q + static_cast<int64_t>(row_map.token(row)) * p.q_token_stride +
             static_cast<int64_t>(row_map.head(row)) * p.q_head_stride;
    });
  };
  auto load_kv = [&](int n_block, int stage) {
    const int key0 = n_block * kBlockN;
    const int valid = min(kBlockN, ks.length - key0);
    const int64_t first = static_cast<int64_t>(ks.begin) + key0;
    load_tile_async<kBlockN, kHeadDim, kThreads>(sK + stage * Tile::kTileKV, valid, k, [&](int r) {
      return k_head + (first + r) * p.k_token_stride;
    });
    load_tile_async<kBlockN, kHeadDim, kThreads>(sV + stage * Tile::kTileKV, valid, v, [&](int r) {
      return v_head + (first + r) * p.v_token_stride;
    });
  };

  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int quad_col = lane % 4;  // t in the fragment layouts: columns 2t, 2t+1 of each n-block

  uint32_t q_frag[kKSteps][4];
  float o_acc[kOutBlocks][4];
#pragma unroll
  for (int d = 0; d < kOutBlocks; ++d) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o_acc[d][e] = 0.f;
  }
  // Running max (log2 units, scaled) and sum of exp2 for this thread's two rows: i = 0 is row
  // g = lane / 4 of the warp's 16, i = 1 is row g + 8 (accumulator elements 0,1 and 2,3).
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};

  if (n_begin < n_end) {
    load_q();
    load_kv(n_begin, 0);
  }
  cp_async_commit();

  for (int n_block = n_begin; n_block < n_end; ++n_block) {
    const int stage = (n_block - n_begin) & 1;
    // Prefetch the next tile into the other stage; that stage was last read in the previous
    // iteration, which every warp finished before its closing __syncthreads().
    if (n_block + 1 < n_end) load_kv(n_block + 1, stage ^ 1);
    cp_async_commit();  // possibly empty: keeps "all groups but the newest" = this tile
    cp_async_wait<1>();
    __syncthreads();

    if (n_block == n_begin) {
#pragma unroll
      for (int ks_ = 0; ks_ < kKSteps; ++ks_) {
        load_a_fragment<kHeadDim>(q_frag[ks_], sQ, warp * 16, ks_ * 16);
      }
    }
    const T* const sK_stage = sK + stage * Tile::kTileKV;
    const T* const sV_stage = sV + stage * Tile::kTileKV;

    // S = Q K^T for the warp's 16 rows and the tile's 64 keys.
    float s[kScoreBlocks][4];
#pragma unroll
    for (int j = 0; j < kScoreBlocks; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
    }
#pragma unroll
    for (int ks_ = 0; ks_ < kKSteps; ++ks_) {
#pragma unroll
      for (int j2 = 0; j2 < kScoreBlocks / 2; ++j2) {
        uint32_t bk[2][2];
        load_b_fragments_nk<kHeadDim>(bk, sK_stage, j2 * 16, ks_ * 16);
        mma_16816<T>(s[2 * j2], q_frag[ks_], bk[0][0], bk[0][1]);
        mma_16816<T>(s[2 * j2 + 1], q_frag[ks_], bk[1][0], bk[1][1]);
      }
    }

    // To log2 units; keys past the end of the segment (only in its last tile) get -inf.
    const int keys_valid = ks.length - n_block * kBlockN;
#pragma unroll
    for (int j = 0; j < kScoreBlocks; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] *= p.scale_log2;
        if (keys_valid < kBlockN && j * 8 + 2 * quad_col + (e & 1) >= keys_valid) {
          s[j][e] = -INFINITY;
        }
      }
    }

    // Online softmax.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < kScoreBlocks; ++j) {
        tile_max = fmaxf(tile_max, fmaxf(s[j][2 * i], s[j][2 * i + 1]));
      }
      tile_max = quad_max(tile_max);
      const float new_max = fmaxf(row_max[i], tile_max);
      // While every key seen so far is masked the max is -inf; subtracting 0 instead keeps
      // exp2(-inf - max) = 0 rather than NaN.
      const float base = new_max == -INFINITY ? 0.f : new_max;
      const float correction = exp2f(row_max[i] - base);  // 0 on the first tile (max was -inf)
      row_max[i] = new_max;
      row_sum[i] *= correction;
#pragma unroll
      for (int d = 0; d < kOutBlocks; ++d) {
        o_acc[d][2 * i] *= correction;
        o_acc[d][2 * i + 1] *= correction;
      }
#pragma unroll
      for (int j = 0; j < kScoreBlocks; ++j) {
        s[j][2 * i] = exp2f(s[j][2 * i] - base);
        s[j][2 * i + 1] = exp2f(s[j][2 * i + 1] - base);
        row_sum[i] += s[j][2 * i] + s[j][2 * i + 1];
      }
    }

    // O += P V, P rounded to T as the A operand.
#pragma unroll
    for (int kt = 0; kt < kBlockN / 16; ++kt) {
      uint32_t pa[4];
      pack_a_from_accumulators<T>(pa, s[2 * kt], s[2 * kt + 1]);
#pragma unroll
      for (int d2 = 0; d2 < kHeadDim / 16; ++d2) {
        uint32_t bv[2][2];
        load_b_fragments_kn<kHeadDim>(bv, sV_stage, kt * 16, d2 * 16);
        mma_16816<T>(o_acc[2 * d2], pa, bv[0][0], bv[0][1]);
        mma_16816<T>(o_acc[2 * d2 + 1], pa, bv[1][0], bv[1][1]);
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  cp_async_wait<0>();  // no copy may still be landing in shared memory when the CTA exits

  // Epilogue: O / l and the lse, per row; a row without keys gets 0 and -inf.
  T* const out = static_cast<T*>(p.out);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float sum = quad_sum(row_sum[i]);  // all lanes, before any lane skips a row
    // sum == 0: no keys. A NaN input makes sum NaN, and NaN must reach the output, not a 0.
    const float inv_sum = sum != 0.f ? 1.f / sum : 0.f;
    const float lse = sum != 0.f ? (row_max[i] + log2f(sum)) * kLn2 : -INFINITY;
    const int r = warp * 16 + lane / 4 + 8 * i;
    if (r >= rows_in_tile) continue;
    const int row = m0 + r;
    const int token = row_map.token(row);
    const int head = row_map.head(row);
    if (p.num_splits == 1) {
      T* const o = out + static_cast<int64_t>(token) * p.out_token_stride +
                   static_cast<int64_t>(head) * p.out_head_stride;
#pragma unroll
      for (int d = 0; d < kOutBlocks; ++d) {
        store2(o + d * 8 + 2 * quad_col, o_acc[d][2 * i] * inv_sum, o_acc[d][2 * i + 1] * inv_sum);
      }
      if (quad_col == 0) p.lse[static_cast<int64_t>(head) * p.total_q + token] = lse;
    } else {
      const int64_t partial_row =
          (static_cast<int64_t>(split) * p.num_heads_q + head) * p.total_q + token;
      float* const o = p.out_partial + partial_row * kHeadDim;
#pragma unroll
      for (int d = 0; d < kOutBlocks; ++d) {
        *reinterpret_cast<float2*>(o + d * 8 + 2 * quad_col) =
            make_float2(o_acc[d][2 * i] * inv_sum, o_acc[d][2 * i + 1] * inv_sum);
      }
      if (quad_col == 0) p.lse_partial[partial_row] = lse;
    }
  }
}

// Merge the splits' partial results: one CTA per (query token, query head), CTA index token
// fastest, then head, then segment. Its threads share out the splits: the LSE max and sum are
// block reductions, and each warp accumulates every kCombineWarps-th split's partial output over
// all channels (lane l owns channels 4l..4l+3), then the warps' sums are added. Decode runs up to
// 128 splits for a single row; one warp walking them all was a chain of dependent global loads
// (14 us for 88 splits against a 59 us attention kernel).
constexpr int kCombineWarps = 4;
constexpr int kCombineThreads = 32 * kCombineWarps;

__device__ __forceinline__ float warp_all_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float warp_all_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kCombineThreads)
    attention_forward_combine_kernel(const AttentionForwardParams p) {
  static_assert(kHeadDim % 4 == 0 && kHeadDim <= 128, "a warp covers at most 128 channels");
  __shared__ float block_max[kCombineWarps];
  __shared__ float block_sum[kCombineWarps];
  __shared__ float weights[kCombineThreads];
  __shared__ float4 warp_acc[kCombineWarps][32];

  int64_t cta = blockIdx.x;
  const int local = static_cast<int>(cta % p.max_seqlen_q);
  cta /= p.max_seqlen_q;
  const int head = static_cast<int>(cta % p.num_heads_q);
  const int b = static_cast<int>(cta / p.num_heads_q);
  const Segment qs = segment_bounds(p.cu_seqlens_q, b, p.total_q);
  if (local >= qs.length) return;  // the whole CTA: the barriers below see every thread
  const int token = qs.begin + local;
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32, lane = tid % 32;

  const int64_t split_stride = static_cast<int64_t>(p.num_heads_q) * p.total_q;  // rows per split
  const int64_t row = static_cast<int64_t>(head) * p.total_q + token;
  const float* const split_lse = p.lse_partial + row;

  // fmaxf drops NaN, so a split whose inputs held a NaN is tracked apart and poisons the merge.
  float lse_max = -INFINITY;
  bool nan_seen = false;
  for (int s = tid; s < p.num_splits; s += kCombineThreads) {
    const float l = split_lse[s * split_stride];
    nan_seen |= isnan(l);
    lse_max = fmaxf(lse_max, l);
  }
  nan_seen = __syncthreads_or(nan_seen);
  lse_max = warp_all_max(lse_max);
  if (lane == 0) block_max[warp] = lse_max;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kCombineWarps; ++w) lse_max = fmaxf(lse_max, block_max[w]);

  float lse = nan_seen ? NAN : -INFINITY;
  if (lse_max != -INFINITY || nan_seen) {  // the same in every thread
    float sum = 0.f;
    for (int s = tid; s < p.num_splits; s += kCombineThreads)
      sum += expf(split_lse[s * split_stride] - lse_max);
    sum = warp_all_sum(sum);
    if (lane == 0) block_sum[warp] = sum;
    __syncthreads();
    sum = 0.f;
#pragma unroll
    for (int w = 0; w < kCombineWarps; ++w) sum += block_sum[w];
    lse = lse_max + logf(sum);
  }

  const int c = lane * 4;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  if (lse != -INFINITY) {  // no keys anywhere: out stays 0 (a NaN lse makes every weight NaN)
    for (int base = 0; base < p.num_splits; base += kCombineThreads) {
      __syncthreads();  // the previous chunk's weights are consumed
      const int s = base + tid;
      weights[tid] = s < p.num_splits ? expf(split_lse[s * split_stride] - lse) : 0.f;  // 0: empty
      __syncthreads();
      const int count = min(kCombineThreads, p.num_splits - base);
      if (c < kHeadDim) {
#pragma unroll 4
        for (int j = warp; j < count; j += kCombineWarps) {
          const float weight = weights[j];
          const int64_t split_row = row + static_cast<int64_t>(base + j) * split_stride;
          const float4 x =
              *reinterpret_cast<const float4*>(p.out_partial + split_row * kHeadDim + c);
          acc[0] = fmaf(weight, x.x, acc[0]);
          acc[1] = fmaf(weight, x.y, acc[1]);
          acc[2] = fmaf(weight, x.z, acc[2]);
          acc[3] = fmaf(weight, x.w, acc[3]);
        }
      }
    }
  }
  warp_acc[warp][lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int w = 1; w < kCombineWarps; ++w) {
    const float4 x = warp_acc[w][lane];
    acc[0] += x.x;
    acc[1] += x.y;
    acc[2] += x.z;
    acc[3] += x.w;
  }
  T* const o = static_cast<T*>(p.out) + static_cast<int64_t>(token) * p.out_token_stride +
               static_cast<int64_t>(head) * p.out_head_stride;
  if (c < kHeadDim) store4(o + c, acc);
  if (lane == 0) p.lse[row] = lse;
}

// The same merge with one warp per row and kCombineWarps rows per CTA, for few splits: V2V at
// T = 32 merges 3,456 rows of a handful of splits each, where a CTA per row left three of its four
// warps idle (10.2 us against 7.2 us for a warp per row). Lane l owns channels 4l..4l+3; the
// splits' LSEs are shared out over the lanes for the max and the sum, then every lane walks all the
// splits for its channels (the loads of successive splits are independent, so they overlap).
// launch_attention_forward_combine picks this kernel for num_splits <= kCombineWarpMaxSplits.
constexpr int kCombineWarpMaxSplits = 16;

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kCombineThreads)
    attention_forward_combine_warp_kernel(const AttentionForwardParams p) {
  static_assert(kHeadDim % 4 == 0 && kHeadDim <= 128, "a warp covers at most 128 channels");
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  int64_t cta = static_cast<int64_t>(blockIdx.x) * kCombineWarps + warp;  // this warp's row
  const int local = static_cast<int>(cta % p.max_seqlen_q);
  cta /= p.max_seqlen_q;
  const int head = static_cast<int>(cta % p.num_heads_q);
  const int b = static_cast<int>(cta / p.num_heads_q);
  if (b >= p.batch) return;  // the last CTA's spare warps (no block barriers below)
  const Segment qs = segment_bounds(p.cu_seqlens_q, b, p.total_q);
  if (local >= qs.length) return;
  const int token = qs.begin + local;

  const int64_t split_stride = static_cast<int64_t>(p.num_heads_q) * p.total_q;
  const int64_t row = static_cast<int64_t>(head) * p.total_q + token;
  const float* const split_lse = p.lse_partial + row;

  float lse_max = -INFINITY;
  bool nan_seen = false;
  for (int s = lane; s < p.num_splits; s += 32) {
    const float l = split_lse[s * split_stride];
    nan_seen |= isnan(l);
    lse_max = fmaxf(lse_max, l);
  }
  nan_seen = __any_sync(0xffffffffu, nan_seen);
  lse_max = warp_all_max(lse_max);
  float lse = nan_seen ? NAN : -INFINITY;
  if (lse_max != -INFINITY || nan_seen) {
    float sum = 0.f;
    for (int s = lane; s < p.num_splits; s += 32) sum += expf(split_lse[s * split_stride] - lse_max);
    lse = lse_max + logf(warp_all_sum(sum));
  }

  const int c = lane * 4;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  if (lse != -INFINITY && c < kHeadDim) {
#pragma unroll 4
    for (int s = 0; s < p.num_splits; ++s) {
      const int64_t split_row = row + static_cast<int64_t>(s) * split_stride;
      const float weight = expf(split_lse[s * split_stride] - lse);  // 0 for an empty split
      const float4 x = *reinterpret_cast<const float4*>(p.out_partial + split_row * kHeadDim + c);
      acc[0] = fmaf(weight, x.x, acc[0]);
      acc[1] = fmaf(weight, x.y, acc[1]);
      acc[2] = fmaf(weight, x.z, acc[2]);
      acc[3] = fmaf(weight, x.w, acc[3]);
    }
  }
  T* const o = static_cast<T*>(p.out) + static_cast<int64_t>(token) * p.out_token_stride +
               static_cast<int64_t>(head) * p.out_head_stride;
  if (c < kHeadDim) store4(o + c, acc);
  if (lane == 0) p.lse[row] = lse;
}

}  // namespace attention
}  // namespace crosslmm
