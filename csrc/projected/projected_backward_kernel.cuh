// Backward of the projection-fused attention core (projected_attention_kernel.cuh is the forward):
// with x both key and value and S = scale q x^T per segment and head,
//
//   P = exp(S - lse)   dP = dO x^T   delta = rowsum(dO o O) - dlse   dS = P o (dP - delta)
//   dq = scale dS x    dx = P^T dO + scale dS^T q
//
// Four kernels, all deterministic (no atomics: every output element is written by one thread, and
// split partials are summed in a fixed order):
//
// * delta: one warp per row, fp32.
// * dx: one CTA per 16-key tile of a segment (and row split). The x tile stays in shared memory;
//   the segment's 16-row tiles of q and dO (with their lse and delta) stream through a cp.async
//   ring. Per row tile, as in the forward, the 8 warps split the Dv columns:
//   1. each warp computes partial S_w = q[:, cols_w] x[:, cols_w]^T and dP_w = dO[:, cols_w]
//      x[:, cols_w]^T on tensor cores -> shared memory;
//   2. all 256 threads (one per (row, key)) sum the 8 partials and form P and scale * dS, written
//      transposed ([key][row], rounded to T) to shared memory;
//   3. each warp adds P^T dO[:, cols_w] + (scale dS)^T q[:, cols_w] to its [16 keys, cols_w]
//      fp32 accumulator. Because x is also the value, both terms land in the same accumulator.
// * dq: one CTA per 16-row tile (and key split): q and dO stay in shared memory, x tiles stream;
//   steps 1-2 as above (dS not transposed), then each warp adds (scale dS) x[:, cols_w] to its
//   [16 rows, cols_w] accumulator.
// * split-sum: where a kernel's work is split (dq over key ranges, dx over row ranges: long global
//   segments), each split writes fp32 partials and this kernel adds them in split order.
//
// S and dP are recomputed in both kernels (7 tile GEMMs per (row tile, key tile) instead of 5): dS
// cannot be kept (a global segment's is rows x keys), and summing dq across key-tile CTAs would
// need atomics or a partial per key tile.
//
// Edge cases: rows past a segment's end and keys past it are zero-filled and masked (P = 0); a
// segment without keys gets dq = 0, one without queries dx = 0 (its key-tile CTAs loop over no
// rows); a split without tiles writes zero partials. Segment bounds are clamped to the tensors.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common/mma.cuh"
#include "common/ptx.cuh"
#include "common/segments.cuh"
#include "projected/projected_attention_kernel.cuh"
#include "projected/projected_backward_params.h"

namespace crosslmm {
namespace projected {

// ---------------------------------------------------------------------------------------------
// delta[row] = sum_c dO[row, c] O[row, c] - dlse[head, token]; one warp per row.
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(32 * kDeltaRowsPerCta)
    projected_backward_delta_kernel(const ProjectedBackwardParams p) {
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kDeltaRowsPerCta + warp;
  const int64_t rows_total = static_cast<int64_t>(p.total_q) * p.num_heads;
  if (row >= rows_total) return;
  const int64_t token = row / p.num_heads;
  const int64_t head = row % p.num_heads;
  const T* const dout = static_cast<const T*>(p.dout) + token * p.dout_token_stride +
                        head * p.dout_head_stride;
  const T* const out =
      static_cast<const T*>(p.out) + token * p.out_token_stride + head * p.out_head_stride;
  float sum = 0.f;
  for (int c = lane * 8; c < p.head_dim; c += 32 * 8) {  // Dv is a multiple of 8
    const Vec8<T> a = *reinterpret_cast<const Vec8<T>*>(dout + c);
    const Vec8<T> b = *reinterpret_cast<const Vec8<T>*>(out + c);
#pragma unroll
    for (int e = 0; e < 8; ++e) sum = fmaf(to_float(a.v[e]), to_float(b.v[e]), sum);
  }
  sum = group_sum<32>(sum);
  if (lane == 0) {
    const float dlse = p.dlse != nullptr ? p.dlse[head * p.total_q + token] : 0.f;
    p.delta[row] = sum - dlse;
  }
}

// ---------------------------------------------------------------------------------------------
// Pieces shared by the dq and dx kernels. Every helper is called by all kThreads threads.
// ---------------------------------------------------------------------------------------------

// The 16-row tile of rows [m0, m0 + valid_rows) of segment `qs` of a [total_q, H, Dv] tensor,
// global -> padded shared, zero-filled past valid_rows and in columns [Dv, round_up(Dv, 16)).
template <typename T, int kDvMax>
__device__ __forceinline__ void load_row_tile_async(T* dst, const T* src, int64_t token_stride,
                                                    int64_t head_stride, const Segment& qs,
                                                    int m0, int valid_rows, int num_heads,
                                                    int dv) {
  constexpr int kChunksPerRow = kDvMax / 8;
  static_assert((kBwdBlockM * kChunksPerRow) % kThreads == 0, "chunks must divide evenly");
  const int dv16 = (dv + 15) / 16 * 16;
#pragma unroll
  for (int i = 0; i < kBwdBlockM * kChunksPerRow / kThreads; ++i) {
    const int c = static_cast<int>(threadIdx.x) + i * kThreads;
    const int r = c / kChunksPerRow;
    const int chunk = c % kChunksPerRow;
    if (chunk * 8 >= dv16) continue;  // never read by an MMA
    const bool valid = r < valid_rows && chunk * 8 < dv;
    const T* s = src;
    if (valid) {
      const int row = m0 + r;
      const int token = qs.begin + row / num_heads;
      const int head = row % num_heads;
      s = src + static_cast<int64_t>(token) * token_stride +
          static_cast<int64_t>(head) * head_stride + chunk * 8;
    }
    cp_async_16(dst + tile_offset<kDvMax>(r, chunk), s, valid);
  }
}

// The 16-key tile of keys [key0, key0 + valid_keys) of segment `ks` of x.
template <typename T, int kDvMax>
__device__ __forceinline__ void load_key_tile_async(T* dst, const T* x, int64_t token_stride,
                                                    const Segment& ks, int key0, int valid_keys,
                                                    int dv) {
  constexpr int kChunksPerRow = kDvMax / 8;
  const int dv16 = (dv + 15) / 16 * 16;
  const T* const first = x + (static_cast<int64_t>(ks.begin) + key0) * token_stride;
#pragma unroll
  for (int i = 0; i < kBwdBlockN * kChunksPerRow / kThreads; ++i) {
    const int c = static_cast<int>(threadIdx.x) + i * kThreads;
    const int r = c / kChunksPerRow;
    const int chunk = c % kChunksPerRow;
    if (chunk * 8 >= dv16) continue;
    const bool valid = r < valid_keys && chunk * 8 < dv;
    const T* const s = valid ? first + static_cast<int64_t>(r) * token_stride + chunk * 8 : x;
    cp_async_16(dst + tile_offset<kDvMax>(r, chunk), s, valid);
  }
}

// lse and delta of the tile's 16 rows -> sStat[0..15] (lse, natural log) and sStat[16..31]
// (delta), zero past valid_rows (those rows are masked in the softmax step).
__device__ __forceinline__ void load_row_stats_async(float* sStat, const ProjectedBackwardParams& p,
                                                     const Segment& qs, int m0, int valid_rows) {
  const int tid = static_cast<int>(threadIdx.x);
  if (tid >= 2 * kBwdBlockM) return;
  const int r = tid % kBwdBlockM;
  const bool valid = r < valid_rows;
  const float* src = p.delta;
  if (valid) {
    const int row = m0 + r;
    const int64_t token = qs.begin + row / p.num_heads;
    const int64_t head = row % p.num_heads;
    src = tid < kBwdBlockM ? p.lse + head * p.total_q + token
                           : p.delta + token * p.num_heads + head;
  }
  cp_async_4(sStat + tid, src, valid);
}

// Step 1: this warp's partial S and dP of a 16-row tile (rows of sQ, sDO) against a 16-key tile
// (sX) over its columns -> sScore[0][warp], sScore[1][warp] ([16][kScoreStride] fp32 each).
template <typename T, int kDvMax>
__device__ __forceinline__ void partial_scores(float* sScore, const T* sQ, const T* sDO,
                                               const T* sX, int col_begin, int warp_cols) {
  using Tile = ProjectedBackwardTile<kDvMax>;
  constexpr int kKSteps = Tile::kColsMax / 16;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  float s[2][4] = {};
  float dp[2][4] = {};
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk) {
    if (kk * 16 < warp_cols) {  // warp-uniform
      const int col = col_begin + kk * 16;
      uint32_t aq[4], ado[4], bx[2][2];
      load_a_fragment<kDvMax>(aq, sQ, 0, col);
      load_a_fragment<kDvMax>(ado, sDO, 0, col);
      load_b_fragments_nk<kDvMax>(bx, sX, 0, col);
#pragma unroll
      for (int nb = 0; nb < 2; ++nb) {
        mma_16816<T>(s[nb], aq, bx[nb][0], bx[nb][1]);
        mma_16816<T>(dp[nb], ado, bx[nb][0], bx[nb][1]);
      }
    }
  }
  const int g = lane / 4;
  const int t = lane % 4;
  constexpr int kPartStride = kBwdBlockM * Tile::kScoreStride;
  float* const s_out = sScore + warp * kPartStride;
  float* const dp_out = sScore + (kWarps + warp) * kPartStride;
#pragma unroll
  for (int nb = 0; nb < 2; ++nb) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int offset = (g + 8 * i) * Tile::kScoreStride + nb * 8 + 2 * t;
      *reinterpret_cast<float2*>(s_out + offset) = make_float2(s[nb][2 * i], s[nb][2 * i + 1]);
      *reinterpret_cast<float2*>(dp_out + offset) = make_float2(dp[nb][2 * i], dp[nb][2 * i + 1]);
    }
  }
}

// Step 2 for the calling thread's (row, key) = (tid / 16, tid % 16): P and scale * dS from the
// warps' partial sums, 0 where the row or the key is past its segment's end.
struct ProbGrad {
  float p;
  float ds;  // scale * dS
};

template <int kDvMax>
__device__ __forceinline__ ProbGrad prob_and_grad(const float* sScore, const float* sStat,
                                                  const ProjectedBackwardParams& p,
                                                  int valid_rows, int valid_keys) {
  using Tile = ProjectedBackwardTile<kDvMax>;
  constexpr int kPartStride = kBwdBlockM * Tile::kScoreStride;
  const int tid = static_cast<int>(threadIdx.x);
  const int r = tid / kBwdBlockN;
  const int key = tid % kBwdBlockN;
  float s = 0.f, dp = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    if (w < p.active_warps) {  // warps without columns wrote nothing
      s += sScore[w * kPartStride + r * Tile::kScoreStride + key];
      dp += sScore[(kWarps + w) * kPartStride + r * Tile::kScoreStride + key];
    }
  }
  const float lse = sStat[r];
  // A row with keys has a finite lse; the -inf test only keeps exp2 finite if one does not.
  if (r >= valid_rows || key >= valid_keys || !(lse > -INFINITY)) return {0.f, 0.f};
  const float prob = exp2f(s * p.scale_log2 - lse * kLog2e);
  return {prob, prob * (dp - sStat[kBwdBlockM + r]) * p.scale};
}

// The loop of both kernels over their streamed tiles 0 .. num_tiles-1 (dq: x tiles; dx: q/dO row
// tiles), through a cp.async ring of `stages` stages: load(tile, stage) issues a tile's copies,
// body(tile, stage) computes on it once every thread's copies have landed. The caller has committed
// its resident operands as one group before. With one stage, each tile is loaded once every warp is
// done with the previous one (no overlap); with more, tiles stages-1 ahead are in flight (empty
// groups past the last tile keep the count the loop waits on fixed).
template <typename Load, typename Body>
__device__ __forceinline__ void stream_tiles(int num_tiles, int stages, Load&& load, Body&& body) {
#pragma unroll 1
  for (int i = 0; i < stages - 1; ++i) {
    if (i < num_tiles) load(i, i);
    cp_async_commit();
  }
#pragma unroll 1
  for (int it = 0; it < num_tiles; ++it) {
    if (stages == 1) {
      __syncthreads();  // every warp is done with the one stage
      load(it, 0);
      cp_async_commit();
    }
    // Tile `it` has landed (at most stages-2 newer groups pending); after the barrier every thread
    // sees every thread's copies and every warp has finished iteration it-1, so the stage that
    // iteration read can be refilled.
    cp_async_wait_pending(max(stages - 2, 0));
    __syncthreads();
    if (stages > 1) {
      const int next = it + stages - 1;
      if (next < num_tiles) load(next, next % stages);
      cp_async_commit();
    }
    body(it, it % stages);
  }
  cp_async_wait<0>();  // only empty groups can be pending; none may land after the CTA exits
}

// The epilogue of both kernels: fragment row half i (rows g + 8i) of the calling lane's [16,
// cols_w] fp32 accumulator, to `out` (rounded to T) or, with key/row splits, to `partial` (fp32);
// each points at the lane's first column (col_begin + 2t) of that row, and exactly one is non-null.
template <typename T, int kAccBlocks>
__device__ __forceinline__ void store_accumulator_row(const float (&acc)[kAccBlocks][4], int i,
                                                      T* out, float* partial, int col_begin,
                                                      int warp_cols, int dv) {
#pragma unroll
  for (int d = 0; d < kAccBlocks; ++d) {
    if (d * 8 < warp_cols && col_begin + d * 8 < dv) {
      if (partial != nullptr) {
        *reinterpret_cast<float2*>(partial + d * 8) = make_float2(acc[d][2 * i], acc[d][2 * i + 1]);
      } else {
        store2(out + d * 8, acc[d][2 * i], acc[d][2 * i + 1]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// dq: one CTA per (16-row tile, key split, segment).
// ---------------------------------------------------------------------------------------------
template <typename T, int kDvMax>
__global__ void __launch_bounds__(kThreads, 1)
    projected_core_backward_dq_kernel(const ProjectedBackwardParams p) {
  using Tile = ProjectedBackwardTile<kDvMax>;
  constexpr int kKSteps = Tile::kColsMax / 16;
  constexpr int kAccBlocks = Tile::kColsMax / 8;
  constexpr int kTileElems = kBwdBlockM * Tile::kRowStride;

  extern __shared__ __align__(128) unsigned char smem[];
  float* const sScore = reinterpret_cast<float*>(smem);  // [2][kWarps][16][kScoreStride]
  T* const sDS = reinterpret_cast<T*>(smem + Tile::kScoreBytes);  // [16 rows][kGradStride]
  float* const sStat =
      reinterpret_cast<float*>(smem + Tile::kScoreBytes + Tile::kGradBytes);  // lse, delta
  T* const sQ = reinterpret_cast<T*>(smem + Tile::kScoreBytes + Tile::kGradBytes +
                                     Tile::kRowStatBytes);
  T* const sDO = sQ + kTileElems;
  T* const sX = sDO + kTileElems;  // [stages][16][kRowStride]

  // Row tile fastest, then split, then segment (as the forward: a segment's row tiles run side by
  // side and share its x through L2).
  int64_t cta = blockIdx.x;
  const int m_block = static_cast<int>(cta % p.num_m_blocks);
  cta /= p.num_m_blocks;
  const int split = static_cast<int>(cta % p.dq_splits);
  const int b = static_cast<int>(cta / p.dq_splits);

  const Segment qs = segment_bounds(p.cu_seqlens_q, b, p.total_q);
  const int rows = qs.length * p.num_heads;  // fits: total_q * H <= INT32_MAX (host check)
  const int m0 = m_block * kBwdBlockM;
  if (m0 >= rows) return;  // uniform over the CTA
  const int rows_in_tile = min(kBwdBlockM, rows - m0);
  const Segment ks = segment_bounds(p.cu_seqlens_k, b, p.total_k);
  const int n_blocks = ceil_div_int(ks.length, kBwdBlockN);
  const int n_begin = static_cast<int>(static_cast<int64_t>(split) * n_blocks / p.dq_splits);
  const int n_end = static_cast<int>(static_cast<int64_t>(split + 1) * n_blocks / p.dq_splits);
  const int num_tiles = n_end - n_begin;

  const int dv = p.head_dim;
  const int dv16 = (dv + 15) / 16 * 16;
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int col_begin = warp * p.cols_per_warp;
  const int warp_cols = max(0, min(p.cols_per_warp, dv16 - col_begin));
  const T* const x = static_cast<const T*>(p.x);

  float acc[kAccBlocks][4];
#pragma unroll
  for (int d = 0; d < kAccBlocks; ++d) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[d][e] = 0.f;
  }

  // q, dO and the row stats: resident, one commit group ahead of the x tiles.
  if (num_tiles > 0) {
    load_row_tile_async<T, kDvMax>(sQ, static_cast<const T*>(p.q), p.q_token_stride,
                                   p.q_head_stride, qs, m0, rows_in_tile, p.num_heads, dv);
    load_row_tile_async<T, kDvMax>(sDO, static_cast<const T*>(p.dout), p.dout_token_stride,
                                   p.dout_head_stride, qs, m0, rows_in_tile, p.num_heads, dv);
    load_row_stats_async(sStat, p, qs, m0, rows_in_tile);
  }
  cp_async_commit();

  auto load_x = [&](int it, int stage) {
    const int key0 = (n_begin + it) * kBwdBlockN;
    load_key_tile_async<T, kDvMax>(sX + stage * kTileElems, x, p.x_token_stride, ks, key0,
                                   min(kBwdBlockN, ks.length - key0), dv);
  };
  stream_tiles(num_tiles, p.dq_stages, load_x, [&](int it, int stage) {
    const T* const sXs = sX + stage * kTileElems;
    if (warp_cols > 0) partial_scores<T, kDvMax>(sScore, sQ, sDO, sXs, col_begin, warp_cols);
    __syncthreads();

    {
      const int valid_keys = ks.length - (n_begin + it) * kBwdBlockN;
      const ProbGrad pg = prob_and_grad<kDvMax>(sScore, sStat, p, rows_in_tile, valid_keys);
      sDS[(tid / kBwdBlockN) * Tile::kGradStride + tid % kBwdBlockN] = from_float<T>(pg.ds);
    }
    __syncthreads();

    // dq[:, cols_w] += (scale dS) x[:, cols_w]. The next tile's barriers order these reads of sDS
    // and the x stage before they are overwritten.
    if (warp_cols > 0) {
      uint32_t a[4];
      load_a_fragment<kBwdBlockN>(a, sDS, 0, 0);
#pragma unroll
      for (int d2 = 0; d2 < kKSteps; ++d2) {
        if (d2 * 16 < warp_cols) {  // warp-uniform
          uint32_t bx[2][2];
          load_b_fragments_kn<kDvMax>(bx, sXs, 0, col_begin + d2 * 16);
          mma_16816<T>(acc[2 * d2], a, bx[0][0], bx[0][1]);
          mma_16816<T>(acc[2 * d2 + 1], a, bx[1][0], bx[1][1]);
        }
      }
    }
  });

  if (warp_cols == 0) return;
  const int g = lane / 4;
  const int t = lane % 4;
  const int64_t rows_total = static_cast<int64_t>(p.total_q) * p.num_heads;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = g + 8 * i;
    if (r >= rows_in_tile) continue;
    const int row = m0 + r;
    const int64_t flat =
        static_cast<int64_t>(qs.begin + row / p.num_heads) * p.num_heads + row % p.num_heads;
    const int64_t col = col_begin + 2 * t;
    if (p.dq_splits == 1) {
      store_accumulator_row<T>(acc, i, static_cast<T*>(p.dq) + flat * dv + col, nullptr,
                               col_begin, warp_cols, dv);
    } else {
      store_accumulator_row<T>(acc, i, nullptr,
                               p.dq_partial + (split * rows_total + flat) * dv + col, col_begin,
                               warp_cols, dv);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// dx: one CTA per (16-key tile, row split, segment).
// ---------------------------------------------------------------------------------------------
template <typename T, int kDvMax>
__global__ void __launch_bounds__(kThreads, 1)
    projected_core_backward_dx_kernel(const ProjectedBackwardParams p) {
  using Tile = ProjectedBackwardTile<kDvMax>;
  constexpr int kKSteps = Tile::kColsMax / 16;
  constexpr int kAccBlocks = Tile::kColsMax / 8;
  constexpr int kTileElems = kBwdBlockM * Tile::kRowStride;
  constexpr int kStageBytes = Tile::kDxStageBytes;

  extern __shared__ __align__(128) unsigned char smem[];
  float* const sScore = reinterpret_cast<float*>(smem);  // [2][kWarps][16][kScoreStride]
  T* const sPt = reinterpret_cast<T*>(smem + Tile::kScoreBytes);  // [16 keys][kGradStride]
  T* const sDSt = sPt + kBwdBlockN * Tile::kGradStride;           // [16 keys][kGradStride]
  T* const sX = reinterpret_cast<T*>(smem + Tile::kScoreBytes + 2 * Tile::kGradBytes);
  // Stage s: q tile, dO tile (16 rows each), then lse[16] and delta[16].
  unsigned char* const stage_base = smem + Tile::kDxFixedBytes;
  auto stage_q = [&](int s) { return reinterpret_cast<T*>(stage_base + s * kStageBytes); };
  auto stage_do = [&](int s) { return stage_q(s) + kTileElems; };
  auto stage_stat = [&](int s) {
    return reinterpret_cast<float*>(stage_base + s * kStageBytes + 2 * Tile::kTileBytes);
  };

  // Key tile fastest, then split, then segment: a segment's key tiles run side by side and share
  // its q and dO through L2.
  int64_t cta = blockIdx.x;
  const int n_block = static_cast<int>(cta % p.num_n_blocks);
  cta /= p.num_n_blocks;
  const int split = static_cast<int>(cta % p.dx_splits);
  const int b = static_cast<int>(cta / p.dx_splits);

  const Segment ks = segment_bounds(p.cu_seqlens_k, b, p.total_k);
  const int n0 = n_block * kBwdBlockN;
  if (n0 >= ks.length) return;  // uniform over the CTA
  const int keys_in_tile = min(kBwdBlockN, ks.length - n0);
  const Segment qs = segment_bounds(p.cu_seqlens_q, b, p.total_q);
  const int rows = qs.length * p.num_heads;
  const int m_blocks = ceil_div_int(rows, kBwdBlockM);
  const int m_begin = static_cast<int>(static_cast<int64_t>(split) * m_blocks / p.dx_splits);
  const int m_end = static_cast<int>(static_cast<int64_t>(split + 1) * m_blocks / p.dx_splits);
  const int num_tiles = m_end - m_begin;

  const int dv = p.head_dim;
  const int dv16 = (dv + 15) / 16 * 16;
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int col_begin = warp * p.cols_per_warp;
  const int warp_cols = max(0, min(p.cols_per_warp, dv16 - col_begin));

  auto load_rows = [&](int it, int stage) {  // it: index among this split's row tiles
    const int m0 = (m_begin + it) * kBwdBlockM;
    const int valid_rows = min(kBwdBlockM, rows - m0);
    load_row_tile_async<T, kDvMax>(stage_q(stage), static_cast<const T*>(p.q), p.q_token_stride,
                                   p.q_head_stride, qs, m0, valid_rows, p.num_heads, dv);
    load_row_tile_async<T, kDvMax>(stage_do(stage), static_cast<const T*>(p.dout),
                                   p.dout_token_stride, p.dout_head_stride, qs, m0, valid_rows,
                                   p.num_heads, dv);
    load_row_stats_async(stage_stat(stage), p, qs, m0, valid_rows);
  };

  float acc[kAccBlocks][4];
#pragma unroll
  for (int d = 0; d < kAccBlocks; ++d) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[d][e] = 0.f;
  }

  // The x tile: resident, one commit group ahead of the row tiles.
  if (num_tiles > 0) {
    load_key_tile_async<T, kDvMax>(sX, static_cast<const T*>(p.x), p.x_token_stride, ks, n0,
                                   keys_in_tile, dv);
  }
  cp_async_commit();

  stream_tiles(num_tiles, p.dx_stages, load_rows, [&](int it, int stage) {
    const T* const sQs = stage_q(stage);
    const T* const sDOs = stage_do(stage);
    if (warp_cols > 0) partial_scores<T, kDvMax>(sScore, sQs, sDOs, sX, col_begin, warp_cols);
    __syncthreads();

    {
      const int valid_rows = rows - (m_begin + it) * kBwdBlockM;
      const ProbGrad pg =
          prob_and_grad<kDvMax>(sScore, stage_stat(stage), p, valid_rows, keys_in_tile);
      // Transposed: the MMA below takes P^T and dS^T as its A operand, [key][row].
      const int offset = (tid % kBwdBlockN) * Tile::kGradStride + tid / kBwdBlockN;
      sPt[offset] = from_float<T>(pg.p);
      sDSt[offset] = from_float<T>(pg.ds);
    }
    __syncthreads();

    // dx[:, cols_w] += P^T dO[:, cols_w] + (scale dS)^T q[:, cols_w]
    if (warp_cols > 0) {
      uint32_t ap[4], ads[4];
      load_a_fragment<kBwdBlockM>(ap, sPt, 0, 0);
      load_a_fragment<kBwdBlockM>(ads, sDSt, 0, 0);
#pragma unroll
      for (int d2 = 0; d2 < kKSteps; ++d2) {
        if (d2 * 16 < warp_cols) {  // warp-uniform
          const int col = col_begin + d2 * 16;
          uint32_t bdo[2][2], bq[2][2];
          load_b_fragments_kn<kDvMax>(bdo, sDOs, 0, col);
          load_b_fragments_kn<kDvMax>(bq, sQs, 0, col);
#pragma unroll
          for (int nb = 0; nb < 2; ++nb) {
            mma_16816<T>(acc[2 * d2 + nb], ap, bdo[nb][0], bdo[nb][1]);
            mma_16816<T>(acc[2 * d2 + nb], ads, bq[nb][0], bq[nb][1]);
          }
        }
      }
    }
  });

  if (warp_cols == 0) return;
  const int g = lane / 4;
  const int t = lane % 4;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int k = g + 8 * i;
    if (k >= keys_in_tile) continue;
    const int64_t key = static_cast<int64_t>(ks.begin) + n0 + k;
    const int64_t col = col_begin + 2 * t;
    if (p.dx_splits == 1) {
      store_accumulator_row<T>(acc, i, static_cast<T*>(p.dx) + key * dv + col, nullptr, col_begin,
                               warp_cols, dv);
    } else {
      store_accumulator_row<T>(
          acc, i, nullptr,
          p.dx_partial + (split * static_cast<int64_t>(p.total_k) + key) * dv + col, col_begin,
          warp_cols, dv);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Split sum: dst[row] = sum over splits s = 0, 1, ... of partial[s][row], in that order, for the
// rows of every segment (rows_per_token rows per token of the segment: H for dq, 1 for dx). One
// CTA per (row within the segment, segment); its threads walk the channels 4 at a time.
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kSplitSumThreads)
    projected_backward_split_sum_kernel(const float* partial, T* dst, const int32_t* cu_seqlens,
                                        int total_tokens, int rows_per_token,
                                        int rows_per_segment, int64_t split_stride, int splits,
                                        int dv) {
  const int64_t cta = blockIdx.x;
  const int local = static_cast<int>(cta % rows_per_segment);
  const int b = static_cast<int>(cta / rows_per_segment);
  const Segment seg = segment_bounds(cu_seqlens, b, total_tokens);
  if (local >= seg.length * rows_per_token) return;
  const int64_t row = static_cast<int64_t>(seg.begin) * rows_per_token + local;
  for (int c = static_cast<int>(threadIdx.x) * 4; c < dv; c += kSplitSumThreads * 4) {
    const float* src = partial + row * dv + c;  // dv is a multiple of 8: whole float4s
    float total[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
    for (int s = 0; s < splits; ++s) {
      const float4 v = *reinterpret_cast<const float4*>(src + s * split_stride);
      total[0] += v.x;
      total[1] += v.y;
      total[2] += v.z;
      total[3] += v.w;
    }
    store4(dst + row * dv + c, total);
  }
}

}  // namespace projected
}  // namespace crosslmm
