// Projection-fused attention core: per segment and head, out = softmax(q x^T * scale) x, where the
// keys and the values are the same [keys, Dv] tensor x and Dv is large (1152 for SigLIP). This is
// multi-query attention with one shared "kv head" of width Dv (see DESIGN.md, "Projection-fused
// attention"): q here is q~ = Wk_h^T q_h, and out is o~ = sum_j p_j x_j, before the Wv projection.
//
// Why not the cross-attention kernel with head dim Dv: its warps own rows and keep a [16, D]
// accumulator per warp, which for D = 1152 is 576 registers per thread. Here the 8 warps of a CTA
// split the Dv columns instead, so each warp keeps O[rows, its Dv/8 columns] (16 x 144 fp32 = 72
// registers per thread per m16 tile) and every warp reads only its own columns of each x tile:
//
//   per x tile of kKeys = 16 keys, or 32 for decode's one-m16-tile CTAs (streamed global -> shared
//   by cp.async, `stages` deep):
//   1. partial scores   S_w = Q[:, cols_w] X[:, cols_w]^T   (each warp, tensor cores, fp32)
//      -> shared memory, one [rows, kKeys] block per warp;
//   2. softmax          S = scale * sum_w S_w, masked past the segment's end; online softmax in
//      log2 units (running max m and sum l per row) by all 256 threads, 8 or 16 per row;
//      P (rounded to T) and each row's rescale factor exp2(m_old - m_new) -> shared memory;
//   3. P X              each warp rescales its accumulator rows and adds P X[:, cols_w].
//
// A CTA handles kBlockM = 16 or 32 rows (kMTiles m16 tiles; a row is a (query token, head) pair,
// see projected_params.h) against one split of one segment's keys: decode (12 rows) reads x once
// per step; frame-local V2V (108 rows per 729-key frame) reads each frame's x once per row tile,
// the repeats mostly from L2. Q stays in shared memory (registers hold the accumulators).
//
// Split-KV (flash-decoding): with few row tiles (decode: one per sequence) the keys of a segment
// are cut into num_splits near-equal ranges on different CTAs; each writes its normalised partial
// output (fp32) and partial lse, and projected_forward_combine_kernel merges them by lse.
//
// Edge cases: rows past the end of a segment read zero queries and are never written; keys past
// the end of a segment are zero-filled and masked to -inf; columns past Dv (Dv not a multiple of
// 16) are zero-filled; a segment or split without keys gives out = 0 and lse = -inf; a segment
// without queries launches no work. Segment bounds are clamped to the tensors
// (attention_common.cuh).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/mma.cuh"
#include "common/ptx.cuh"
#include "common/segments.cuh"
#include "projected/projected_params.h"

namespace crosslmm {
namespace projected {

// cp.async.wait_group takes an immediate; the pipeline depth is chosen at run time (it depends on
// the GPU's shared memory), so pick the instruction here. Waiting for more groups than needed is
// only stricter, never wrong.
__device__ __forceinline__ void cp_async_wait_pending(int pending) {
  static_assert(kMaxStages - 2 <= 2, "extend the cases below");
  if (pending >= 2) {
    cp_async_wait<2>();
  } else if (pending == 1) {
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}

// Reduction over the kGroup consecutive lanes that share one softmax row (kGroup a power of two,
// at most 32, groups aligned in the warp).
template <int kGroup>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int offset = kGroup / 2; offset > 0; offset /= 2) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

template <int kGroup>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int offset = kGroup / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename T, int kDvMax, int kMTiles, int kKeys>
__global__ void __launch_bounds__(kThreads, 1)
    projected_attention_core_forward_kernel(const ProjectedForwardParams p) {
  using Tile = ProjectedTile<kDvMax, kMTiles, kKeys>;
  constexpr int kBlockM = Tile::kBlockM;
  constexpr int kColsMax = Tile::kColsMax;
  constexpr int kKSteps = kColsMax / 16;    // 16-column steps a warp can own
  constexpr int kOutBlocks = kColsMax / 8;  // 8-column accumulator blocks a warp can own
  constexpr int kChunksPerRow = kDvMax / 8;  // 16-byte chunks of a full-width tile row
  constexpr int kKeySteps = kKeys / 16;       // 16-key halves of an x tile (k-steps of P X)
  // Softmax phase: kThreadsPerRow threads per row, kKeysPerThread keys each.
  constexpr int kThreadsPerRow = kThreads / kBlockM;
  constexpr int kKeysPerThread = kKeys / kThreadsPerRow;
  static_assert(kThreadsPerRow * kKeysPerThread == kKeys && kKeysPerThread >= 1 &&
                    kKeysPerThread <= 2 && kThreadsPerRow <= 32,
                "softmax thread map");
  static_assert((kBlockM * kChunksPerRow) % kThreads == 0 &&
                    (kKeys * kChunksPerRow) % kThreads == 0,
                "tile chunks must divide evenly over the threads");

  extern __shared__ __align__(128) unsigned char smem[];
  float* const sScore = reinterpret_cast<float*>(smem);  // [kWarps][kBlockM][kScoreStride]
  T* const sP = reinterpret_cast<T*>(smem + Tile::kScoreBytes);  // [kBlockM][kPStride]
  float* const sCorr = reinterpret_cast<float*>(smem + Tile::kScoreBytes + Tile::kPBytes);
  float* const sInvSum = sCorr + kBlockM;
  float* const sLse = sInvSum + kBlockM;
  T* const sQ = reinterpret_cast<T*>(smem + Tile::kScoreBytes + Tile::kPBytes +
                                     Tile::kRowStatBytes);  // [kBlockM][kRowStride]
  T* const sX = sQ + kBlockM * Tile::kRowStride;            // [stages][kKeys][kRowStride]
  constexpr int kStageElems = kKeys * Tile::kRowStride;

  // The CTA's work. Row tile fastest, then split, then segment: the row tiles of one frame run side
  // by side and share its x through L2; a decode step's splits cover one sequence's keys.
  int64_t cta = blockIdx.x;
  const int m_block = static_cast<int>(cta % p.num_m_blocks);
  cta /= p.num_m_blocks;
  const int split = static_cast<int>(cta % p.num_splits);
  const int b = static_cast<int>(cta / p.num_splits);

  const Segment qs = segment_bounds(p.cu_seqlens_q, b, p.total_q);
  const int rows = qs.length * p.num_heads;  // fits: total_q * H <= INT32_MAX (host check)
  const int m0 = m_block * kBlockM;
  if (m0 >= rows) return;  // uniform over the CTA
  const int rows_in_tile = min(kBlockM, rows - m0);
  const Segment ks = segment_bounds(p.cu_seqlens_k, b, p.total_k);

  // This split's key tiles: [split * n / S, (split + 1) * n / S), so splits differ by at most one
  // tile (and are empty only when the segment has fewer tiles than splits).
  const int n_blocks = ceil_div_int(ks.length, kKeys);
  const int n_begin = static_cast<int>(static_cast<int64_t>(split) * n_blocks / p.num_splits);
  const int n_end = static_cast<int>(static_cast<int64_t>(split + 1) * n_blocks / p.num_splits);
  const int num_tiles = n_end - n_begin;

  const int dv = p.head_dim;
  const int dv16 = (dv + 15) / 16 * 16;  // columns the MMAs cover; [dv, dv16) are zero-filled
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int col_begin = warp * p.cols_per_warp;  // this warp's columns [col_begin, +warp_cols)
  const int warp_cols = max(0, min(p.cols_per_warp, dv16 - col_begin));

  const T* const q = static_cast<const T*>(p.q);
  const T* const x = static_cast<const T*>(p.x);

  // Global -> shared loads, 16 bytes per cp.async. Chunks at or past dv16 are never read by an MMA
  // and are not loaded; chunks in [dv, dv16) and rows past the valid ones are zero-filled.
  auto load_q = [&]() {
#pragma unroll
    for (int i = 0; i < kBlockM * kChunksPerRow / kThreads; ++i) {
      const int c = tid + i * kThreads;
      const int r = c / kChunksPerRow;
      const int chunk = c % kChunksPerRow;
      if (chunk * 8 >= dv16) continue;
      const bool valid = r < rows_in_tile && chunk * 8 < dv;
      const T* src = q;
      if (valid) {
        const int row = m0 + r;
        const int token = qs.begin + row / p.num_heads;
        const int head = row % p.num_heads;
        src = q + static_cast<int64_t>(token) * p.q_token_stride +
              static_cast<int64_t>(head) * p.q_head_stride + chunk * 8;
      }
      cp_async_16(sQ + tile_offset<kDvMax>(r, chunk), src, valid);
    }
  };
  auto load_x = [&](int tile, int stage) {  // tile: index among the segment's key tiles
    const int key0 = tile * kKeys;
    const int valid_keys = min(kKeys, ks.length - key0);
    const T* const first = x + (static_cast<int64_t>(ks.begin) + key0) * p.x_token_stride;
    T* const dst = sX + stage * kStageElems;
#pragma unroll
    for (int i = 0; i < kKeys * kChunksPerRow / kThreads; ++i) {
      const int c = tid + i * kThreads;
      const int r = c / kChunksPerRow;
      const int chunk = c % kChunksPerRow;
      if (chunk * 8 >= dv16) continue;
      const bool valid = r < valid_keys && chunk * 8 < dv;
      const T* const src =
          valid ? first + static_cast<int64_t>(r) * p.x_token_stride + chunk * 8 : x;
      cp_async_16(dst + tile_offset<kDvMax>(r, chunk), src, valid);
    }
  };

  float o_acc[kMTiles][kOutBlocks][4];
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
    for (int d = 0; d < kOutBlocks; ++d) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o_acc[m][d][e] = 0.f;
    }
  }

  // Softmax state of this thread's row (shared by the kThreadsPerRow threads of the row): running
  // max in log2 units (the same in all of them) and this thread's share of the running sum.
  const int sm_row = tid / kThreadsPerRow;
  const int sm_key0 = (tid % kThreadsPerRow) * kKeysPerThread;
  float row_max = -INFINITY;
  float row_sum = 0.f;

  // Prologue: Q with the first tile, then tiles 1 .. stages-2, one commit group each (empty groups
  // where there are fewer tiles, so the group count the main loop waits on is always the same).
  if (num_tiles > 0) load_q();
#pragma unroll 1
  for (int i = 0; i < p.stages - 1; ++i) {
    if (i < num_tiles) load_x(n_begin + i, i);
    cp_async_commit();
  }

  const int g = lane / 4;  // fragment row group
  const int t = lane % 4;  // thread in the group: columns 2t, 2t+1 of each 8-wide block

#pragma unroll 1
  for (int it = 0; it < num_tiles; ++it) {
    // Tile `it` has landed (at most stages-2 newer groups pending); after the barrier every thread
    // sees every thread's copies, and every warp has finished iteration it-1, so the stage that
    // iteration read, (it-1) % stages, can be refilled with tile it + stages - 1.
    cp_async_wait_pending(p.stages - 2);
    __syncthreads();
    {
      const int next = it + p.stages - 1;
      if (next < num_tiles) load_x(n_begin + next, next % p.stages);
      cp_async_commit();
    }
    const T* const sXs = sX + (it % p.stages) * kStageElems;

    // 1. Partial scores over this warp's columns: S_w[rows, kKeys keys], in 8-key blocks.
    if (warp_cols > 0) {
      float s[kMTiles][2 * kKeySteps][4];
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
        for (int nb = 0; nb < 2 * kKeySteps; ++nb) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[m][nb][e] = 0.f;
        }
      }
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        if (kk * 16 < warp_cols) {  // warp-uniform
          const int col = col_begin + kk * 16;
          uint32_t a[kMTiles][4];
#pragma unroll
          for (int m = 0; m < kMTiles; ++m) load_a_fragment<kDvMax>(a[m], sQ, m * 16, col);
#pragma unroll
          for (int h = 0; h < kKeySteps; ++h) {
            uint32_t bx[2][2];
            load_b_fragments_nk<kDvMax>(bx, sXs, h * 16, col);
#pragma unroll
            for (int m = 0; m < kMTiles; ++m) {
              mma_16816<T>(s[m][2 * h], a[m], bx[0][0], bx[0][1]);
              mma_16816<T>(s[m][2 * h + 1], a[m], bx[1][0], bx[1][1]);
            }
          }
        }
      }
      float* const mine = sScore + warp * kBlockM * Tile::kScoreStride;
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
        for (int nb = 0; nb < 2 * kKeySteps; ++nb) {
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int r = m * 16 + g + 8 * i;
            *reinterpret_cast<float2*>(mine + r * Tile::kScoreStride + nb * 8 + 2 * t) =
                make_float2(s[m][nb][2 * i], s[m][nb][2 * i + 1]);
          }
        }
      }
    }
    __syncthreads();

    // 2. Online softmax of row sm_row over keys sm_key0 .. +kKeysPerThread.
    {
      const int keys_valid = ks.length - (n_begin + it) * kKeys;  // > 0
      float v[kKeysPerThread];
#pragma unroll
      for (int e = 0; e < kKeysPerThread; ++e) v[e] = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        if (w < p.active_warps) {  // warps without columns wrote nothing
          const float* const src =
              sScore + (w * kBlockM + sm_row) * Tile::kScoreStride + sm_key0;
          if constexpr (kKeysPerThread == 2) {
            const float2 pair = *reinterpret_cast<const float2*>(src);
            v[0] += pair.x;
            v[1] += pair.y;
          } else {
            v[0] += src[0];
          }
        }
      }
      float tile_max = -INFINITY;
#pragma unroll
      for (int e = 0; e < kKeysPerThread; ++e) {
        v[e] = sm_key0 + e < keys_valid ? v[e] * p.scale_log2 : -INFINITY;
        tile_max = fmaxf(tile_max, v[e]);
      }
      tile_max = group_max<kThreadsPerRow>(tile_max);
      const float new_max = fmaxf(row_max, tile_max);  // finite: every tile has a valid key
      const float correction = exp2f(row_max - new_max);  // 0 on the first tile (max was -inf)
      row_max = new_max;
      row_sum *= correction;
      float prob[kKeysPerThread];
#pragma unroll
      for (int e = 0; e < kKeysPerThread; ++e) {
        prob[e] = exp2f(v[e] - new_max);  // masked keys: exp2(-inf) = 0
        row_sum += prob[e];
      }
      T* const dst = sP + sm_row * Tile::kPStride + sm_key0;
      if constexpr (kKeysPerThread == 2) {
        store2(dst, prob[0], prob[1]);
      } else {
        dst[0] = from_float<T>(prob[0]);
      }
      if (sm_key0 == 0) sCorr[sm_row] = correction;
    }
    __syncthreads();

    // 3. O[:, cols_w] = O * correction + P X[:, cols_w].
    if (warp_cols > 0) {
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const float correction = sCorr[m * 16 + g + 8 * i];
#pragma unroll
          for (int d = 0; d < kOutBlocks; ++d) {
            o_acc[m][d][2 * i] *= correction;
            o_acc[m][d][2 * i + 1] *= correction;
          }
        }
      }
      uint32_t pa[kMTiles][kKeySteps][4];
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
        for (int h = 0; h < kKeySteps; ++h) load_a_fragment<kKeys>(pa[m][h], sP, m * 16, h * 16);
      }
#pragma unroll
      for (int d2 = 0; d2 < kKSteps; ++d2) {
        if (d2 * 16 < warp_cols) {  // warp-uniform
#pragma unroll
          for (int h = 0; h < kKeySteps; ++h) {
            uint32_t bx[2][2];
            load_b_fragments_kn<kDvMax>(bx, sXs, h * 16, col_begin + d2 * 16);
#pragma unroll
            for (int m = 0; m < kMTiles; ++m) {
              mma_16816<T>(o_acc[m][2 * d2], pa[m][h], bx[0][0], bx[0][1]);
              mma_16816<T>(o_acc[m][2 * d2 + 1], pa[m][h], bx[1][0], bx[1][1]);
            }
          }
        }
      }
    }
    // The next iteration's barrier orders these reads of sP, sCorr and the x stage before they are
    // overwritten.
  }
  cp_async_wait<0>();  // only empty groups can be pending; none may land after the CTA exits

  // Epilogue. Per row: 1 / l and lse = (m + log2 l) * ln 2; a row without keys (l = 0) gets out 0
  // and lse -inf.
  {
    const float sum = group_sum<kThreadsPerRow>(row_sum);
    if (sm_key0 == 0) {
      sInvSum[sm_row] = sum > 0.f ? 1.f / sum : 0.f;
      sLse[sm_row] = sum > 0.f ? (row_max + log2f(sum)) * kLn2 : -INFINITY;
    }
  }
  __syncthreads();

  const int64_t rows_total = static_cast<int64_t>(p.total_q) * p.num_heads;
  // Flat row index token * H + head of tile row r: the row of out viewed as [total_q * H, Dv].
  auto flat_row = [&](int r) {
    const int row = m0 + r;
    return static_cast<int64_t>(qs.begin + row / p.num_heads) * p.num_heads + row % p.num_heads;
  };
  if (warp_cols > 0) {
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = m * 16 + g + 8 * i;
        if (r >= rows_in_tile) continue;
        const float inv_sum = sInvSum[r];
        const int64_t row = flat_row(r);
        if (p.num_splits == 1) {
          T* const o = static_cast<T*>(p.out) + row * dv + col_begin + 2 * t;
#pragma unroll
          for (int d = 0; d < kOutBlocks; ++d) {
            if (d * 8 < warp_cols && col_begin + d * 8 < dv) {
              store2(o + d * 8, o_acc[m][d][2 * i] * inv_sum, o_acc[m][d][2 * i + 1] * inv_sum);
            }
          }
        } else {
          float* const o =
              p.out_partial + (split * rows_total + row) * dv + col_begin + 2 * t;
#pragma unroll
          for (int d = 0; d < kOutBlocks; ++d) {
            if (d * 8 < warp_cols && col_begin + d * 8 < dv) {
              *reinterpret_cast<float2*>(o + d * 8) =
                  make_float2(o_acc[m][d][2 * i] * inv_sum, o_acc[m][d][2 * i + 1] * inv_sum);
            }
          }
        }
      }
    }
  }
  if (tid < rows_in_tile) {
    const int64_t row = flat_row(tid);
    if (p.num_splits == 1) {
      const int64_t token = row / p.num_heads;
      const int64_t head = row % p.num_heads;
      p.lse[head * p.total_q + token] = sLse[tid];
    } else {
      p.lse_partial[split * rows_total + row] = sLse[tid];
    }
  }
}

// Merges the splits' partial results: lse = log sum_s exp(lse_s),
// out = sum_s exp(lse_s - lse) out_s. One CTA per (row, 128-channel chunk): a decode step has few
// rows (12 per sequence) but up to 256 splits, so the splits are spread over the CTA's 8 warps
// (warp w sums splits w, w + 8, ...; lane l owns 4 channels) and the warps' sums are added in
// shared memory in a fixed order (deterministic). Each channel chunk's CTA recomputes the lse merge
// (a few hundred floats). CTA index: channel chunk fastest, then the row within the segment, then
// the segment.
constexpr int kCombineWarps = 8;
constexpr int kCombineThreads = 32 * kCombineWarps;
constexpr int kCombineChannels = 128;  // 32 lanes x 4 channels
// Partials per warp loaded before the lse merge (8 x 8 warps = 64 splits; a decode step at T = 256
// has 132 on an H100).
constexpr int kCombinePrefetch = 8;
static_assert(kMaxSplits <= kCombineThreads, "one split's lse per thread");

template <typename T>
__global__ void __launch_bounds__(kCombineThreads)
    projected_forward_combine_kernel(const ProjectedForwardParams p, int rows_per_segment,
                                     int channel_tiles) {
  __shared__ float weights[kMaxSplits];
  __shared__ float warp_reduce[kCombineWarps];
  __shared__ float4 warp_sums[kCombineWarps][32];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Launched as a programmatic dependent of the forward kernel (launch_projected_forward_combine,
  // sm_90 builds): wait until that grid has completed and its partials are visible. A no-op
  // otherwise.
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  int64_t cta = blockIdx.x;
  const int channel_tile = static_cast<int>(cta % channel_tiles);
  cta /= channel_tiles;
  const int local = static_cast<int>(cta % rows_per_segment);
  const int b = static_cast<int>(cta / rows_per_segment);
  const Segment qs = segment_bounds(p.cu_seqlens_q, b, p.total_q);
  if (local >= qs.length * p.num_heads) return;  // uniform over the CTA
  // The segment's rows are contiguous in the flat (token * H + head) order.
  const int64_t row = static_cast<int64_t>(qs.begin) * p.num_heads + local;
  const int64_t rows_total = static_cast<int64_t>(p.total_q) * p.num_heads;
  const int splits = p.num_splits;
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  const int lane = tid % 32;

  // This warp's first kCombinePrefetch splits' partials, loaded before the lse merge below so
  // their latency overlaps it (the merge's weights are applied later, in the same order).
  const int dv = p.head_dim;
  const int c = channel_tile * kCombineChannels + lane * 4;  // dv is a multiple of 8: whole float4s
  const float* const src = p.out_partial + row * dv + c;
  float4 first[kCombinePrefetch];
#pragma unroll
  for (int i = 0; i < kCombinePrefetch; ++i) {
    const int s = warp + i * kCombineWarps;
    first[i] = c < dv && s < splits ? *reinterpret_cast<const float4*>(src + s * rows_total * dv)
                                    : make_float4(0.f, 0.f, 0.f, 0.f);
  }

  // lse over the splits (thread s holds split s), block-wide max then sum.
  const float lse_s = tid < splits ? p.lse_partial[tid * rows_total + row] : -INFINITY;
  float v = group_max<32>(lse_s);
  if (lane == 0) warp_reduce[warp] = v;
  __syncthreads();
  float lse_max = -INFINITY;
#pragma unroll
  for (int w = 0; w < kCombineWarps; ++w) lse_max = fmaxf(lse_max, warp_reduce[w]);
  __syncthreads();  // warp_reduce is reused below
  const float e = lse_max == -INFINITY ? 0.f : expf(lse_s - lse_max);  // 0 for empty splits
  v = group_sum<32>(e);
  if (lane == 0) warp_reduce[warp] = v;
  __syncthreads();
  float sum = 0.f;
#pragma unroll
  for (int w = 0; w < kCombineWarps; ++w) sum += warp_reduce[w];
  // No split saw a key: lse = -inf and every weight 0, so out = 0.
  const float lse = lse_max == -INFINITY ? -INFINITY : lse_max + logf(sum);
  if (tid < splits) weights[tid] = lse == -INFINITY ? 0.f : expf(lse_s - lse);
  __syncthreads();

  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  if (c < dv) {
    // Warp w adds splits w, w + 8, ... in that order: the prefetched ones, then the rest.
#pragma unroll
    for (int i = 0; i < kCombinePrefetch; ++i) {
      const int s = warp + i * kCombineWarps;
      if (s < splits) {
        const float w = weights[s];
        acc.x = fmaf(w, first[i].x, acc.x);
        acc.y = fmaf(w, first[i].y, acc.y);
        acc.z = fmaf(w, first[i].z, acc.z);
        acc.w = fmaf(w, first[i].w, acc.w);
      }
    }
#pragma unroll 4
    for (int s = warp + kCombinePrefetch * kCombineWarps; s < splits; s += kCombineWarps) {
      const float w = weights[s];
      const float4 x = *reinterpret_cast<const float4*>(src + s * rows_total * dv);
      acc.x = fmaf(w, x.x, acc.x);
      acc.y = fmaf(w, x.y, acc.y);
      acc.z = fmaf(w, x.z, acc.z);
      acc.w = fmaf(w, x.w, acc.w);
    }
  }
  warp_sums[warp][lane] = acc;
  __syncthreads();
  if (warp == 0 && c < dv) {
    float total[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int w = 0; w < kCombineWarps; ++w) {
      const float4 part = warp_sums[w][lane];
      total[0] += part.x;
      total[1] += part.y;
      total[2] += part.z;
      total[3] += part.w;
    }
    store4(static_cast<T*>(p.out) + row * dv + c, total);
  }
  if (tid == 0 && channel_tile == 0) {
    p.lse[(row % p.num_heads) * p.total_q + row / p.num_heads] = lse;
  }
}

}  // namespace projected
}  // namespace crosslmm
