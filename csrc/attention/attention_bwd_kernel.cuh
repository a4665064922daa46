// Cross-attention backward, FlashAttention-2 style, on tensor cores (mma.sync m16n8k16).
//
// With S = q k^T, P = exp(S * scale - lse) (recomputed from the forward's lse, never stored) and
// Delta = rowsum(dout * out):
//   dv = P^T dout,   dP = dout v^T,   dS = P * (dP - Delta),
//   dq = scale * dS k,   dk = scale * dS^T q
//
// Three kernels, in this order on one stream:
//   1. attention_backward_delta_kernel: Delta [Hq, total_q] (fp32).
//   2. attention_backward_dkdv_kernel: one CTA per (64-key tile, kv head, segment). Each of its 4
//      warps owns 16 keys and accumulates their dk and dv rows in registers while the CTA walks
//      every query row of the segment for every query head of the GQA group (rows packed as (token,
//      head in group), see attention_params.h), 32 or 64 rows at a time, double-buffered. It works
//      on the transposed problem (S^T = k q^T, keys as the M dimension) so that each warp's
//      accumulators are exactly its own keys' rows of dk and dv.
//   3. attention_backward_dq_kernel: one CTA per (64-row tile, head or packed group, segment),
//      warps own 16 rows each (as in the forward) and walk the segment's key tiles,
//      double-buffered, accumulating dq in registers.
// Every output element is written by exactly one thread after a fixed-order loop: no atomics, so
// the gradients are bitwise deterministic by construction (the `deterministic` flag changes
// nothing). Segments without queries get dk = dv = 0; segments without keys get dq = 0.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "attention/attention_common.cuh"
#include "attention/attention_params.h"
#include "common/mma.cuh"

namespace crosslmm {
namespace attention {

constexpr int kBackwardWarps = 4;
constexpr int kBackwardThreads = 32 * kBackwardWarps;

template <int kHeadDim>
struct BackwardTile {
  static_assert(kBackwardBlockM == 16 * kBackwardWarps, "the dq kernel gives each warp 16 rows");
  // dQ kernel: rows per CTA, 16 per warp.
  static constexpr int kDqBlockM = kBackwardBlockM;
  // dK/dV kernel: query rows per step of its loop. Each thread holds its keys' dK and dV rows
  // (2 * kHeadDim / 2 floats) plus P^T and dS^T for the step (kDkDvBlockM / 2 floats each); 32 rows
  // at head dim 128 keeps that within the 255-register limit without spills.
  static constexpr int kDkDvBlockM = kHeadDim == 128 ? 32 : 64;
  static constexpr int kTileDq = kDqBlockM * kSmemRowStride<kHeadDim>;  // elements, padded rows
  static constexpr int kTileDkDvRows = kDkDvBlockM * kSmemRowStride<kHeadDim>;
  static constexpr int kTileKV = kBlockN * kSmemRowStride<kHeadDim>;
  // dK/dV: K, V, then Q and dO with two stages each, then lse and Delta with two stages each.
  static constexpr int kDkDvSmemBytes = (2 * kTileKV + 4 * kTileDkDvRows) * 2 + 4 * kDkDvBlockM * 4;
  // dQ: Q, dO, then K and V with two stages each.
  static constexpr int kDqSmemBytes = (2 * kTileDq + 4 * kTileKV) * 2;
};

// ---------------------------------------------------------------------------------------------
// 1. Delta = rowsum(dout * out), one row per (token, head); kHeadDim / 8 lanes per row, 16 bytes
//    each.
// ---------------------------------------------------------------------------------------------

constexpr int kDeltaThreads = 256;

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kDeltaThreads)
    attention_backward_delta_kernel(const AttentionBackwardParams p) {
  constexpr int kLanesPerRow = kHeadDim / 8;
  constexpr int kRowsPerCta = kDeltaThreads / kLanesPerRow;
  static_assert(32 % kLanesPerRow == 0, "a row's lanes must sit in one warp");
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerCta + threadIdx.x / kLanesPerRow;
  const int lane = static_cast<int>(threadIdx.x) % kLanesPerRow;
  const bool valid = row < static_cast<int64_t>(p.total_q) * p.num_heads_q;
  const int token = valid ? static_cast<int>(row / p.num_heads_q) : 0;
  const int head = valid ? static_cast<int>(row % p.num_heads_q) : 0;

  float acc = 0.f;
  if (valid) {
    const T* const dout = static_cast<const T*>(p.dout) +
                          static_cast<int64_t>(token) * p.dout_token_stride +
                          static_cast<int64_t>(head) * p.dout_head_stride + lane * 8;
    const T* const out = static_cast<const T*>(p.out) +
                         static_cast<int64_t>(token) * p.out_token_stride +
                         static_cast<int64_t>(head) * p.out_head_stride + lane * 8;
    const Vec8<T> dout8 = *reinterpret_cast<const Vec8<T>*>(dout);
    const Vec8<T> out8 = *reinterpret_cast<const Vec8<T>*>(out);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc = fmaf(to_float(dout8.v[e]), to_float(out8.v[e]), acc);
  }
#pragma unroll
  for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) {
    acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  }
  if (valid && lane == 0) p.delta[static_cast<int64_t>(head) * p.total_q + token] = acc;
}

// ---------------------------------------------------------------------------------------------
// 2. dK, dV.
// ---------------------------------------------------------------------------------------------

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kBackwardThreads)
    attention_backward_dkdv_kernel(const AttentionBackwardParams p) {
  using Tile = BackwardTile<kHeadDim>;
  constexpr int kBlockM = Tile::kDkDvBlockM;
  constexpr int kThreads = kBackwardThreads;
  constexpr int kKSteps = kHeadDim / 16;    // k-steps over channels (S^T = K Q^T, dP^T = V dO^T)
  constexpr int kRowBlocks = kBlockM / 8;   // 8-row n-blocks of S^T and dP^T
  constexpr int kOutBlocks = kHeadDim / 8;  // 8-channel n-blocks of dK and dV

  extern __shared__ __align__(128) unsigned char smem[];
  T* const sK = reinterpret_cast<T*>(smem);
  T* const sV = sK + Tile::kTileKV;
  T* const sQ = sV + Tile::kTileKV;             // [2 stages][kBlockM][kHeadDim]
  T* const sdO = sQ + 2 * Tile::kTileDkDvRows;  // [2 stages][kBlockM][kHeadDim]
  float* const sLse =
      reinterpret_cast<float*>(sdO + 2 * Tile::kTileDkDvRows);  // [2 stages][kBlockM]
  float* const sDelta = sLse + 2 * kBlockM;                     // [2 stages][kBlockM]

  // n-block fastest, then kv head, then segment.
  int64_t cta = blockIdx.x;
  const int n_block = static_cast<int>(cta % p.num_n_blocks);
  cta /= p.num_n_blocks;
  const int kv_head = static_cast<int>(cta % p.num_heads_k);
  const int b = static_cast<int>(cta / p.num_heads_k);

  const Segment ks = segment_bounds(p.cu_seqlens_k, b, p.total_k);
  const int key0 = n_block * kBlockN;
  if (key0 >= ks.length) return;  // uniform over the CTA
  const int keys_in_tile = min(kBlockN, ks.length - key0);
  const Segment qs = segment_bounds(p.cu_seqlens_q, b, p.total_q);
  const int group = p.num_heads_q / p.num_heads_k;
  const RowMap row_map{qs.begin, kv_head * group, group};  // every query head of the group
  const int rows = qs.length * group;
  const int row_tiles = ceil_div_int(rows, kBlockM);

  const T* const q = static_cast<const T*>(p.q);
  const T* const dout = static_cast<const T*>(p.dout);

  auto load_keys = [&]() {
    const int64_t first = static_cast<int64_t>(ks.begin) + key0;
    const T* const k_head =
        static_cast<const T*>(p.k) + static_cast<int64_t>(kv_head) * p.k_head_stride;
    const T* const v_head =
        static_cast<const T*>(p.v) + static_cast<int64_t>(kv_head) * p.v_head_stride;
    load_tile_async<kBlockN, kHeadDim, kThreads>(
        sK, keys_in_tile, k_head, [&](int r) { return k_head + (first + r) * p.k_token_stride; });
    load_tile_async<kBlockN, kHeadDim, kThreads>(
        sV, keys_in_tile, v_head, [&](int r) { return v_head + (first + r) * p.v_token_stride; });
  };
  auto load_rows = [&](int row_tile, int stage) {
    const int m0 = row_tile * kBlockM;
    const int valid = min(kBlockM, rows - m0);
    load_tile_async<kBlockM, kHeadDim, kThreads>(
        sQ + stage * Tile::kTileDkDvRows, valid, q, [&](int r) {
          return q + static_cast<int64_t>(row_map.token(m0 + r)) * p.q_token_stride +
                 static_cast<int64_t>(row_map.head(m0 + r)) * p.q_head_stride;
        });
    load_tile_async<kBlockM, kHeadDim, kThreads>(
        sdO + stage * Tile::kTileDkDvRows, valid, dout, [&](int r) {
          return dout + static_cast<int64_t>(row_map.token(m0 + r)) * p.dout_token_stride +
                 static_cast<int64_t>(row_map.head(m0 + r)) * p.dout_head_stride;
        });
    // lse and Delta of each row (threads [0, kBlockM) load lse, the next kBlockM load Delta).
    for (int i = static_cast<int>(threadIdx.x); i < 2 * kBlockM; i += kThreads) {
      const bool is_delta = i >= kBlockM;
      const int r = is_delta ? i - kBlockM : i;
      const bool row_valid = r < valid;
      const int64_t index =
          row_valid ? static_cast<int64_t>(row_map.head(m0 + r)) * p.total_q + row_map.token(m0 + r)
                    : 0;
      float* const dst = (is_delta ? sDelta : sLse) + stage * kBlockM + r;
      const float* const src = is_delta ? p.delta + index : p.lse + index;
      cp_async_4(dst, src, row_valid);
    }
  };

  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int quad_col = lane % 4;

  float dk_acc[kOutBlocks][4];
  float dv_acc[kOutBlocks][4];
#pragma unroll
  for (int d = 0; d < kOutBlocks; ++d) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      dk_acc[d][e] = 0.f;
      dv_acc[d][e] = 0.f;
    }
  }

  if (row_tiles > 0) {
    load_keys();
    load_rows(0, 0);
  }
  cp_async_commit();

  for (int row_tile = 0; row_tile < row_tiles; ++row_tile) {
    const int stage = row_tile & 1;
    if (row_tile + 1 < row_tiles) load_rows(row_tile + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const int rows_in_tile = min(kBlockM, rows - row_tile * kBlockM);
    const T* const sQ_stage = sQ + stage * Tile::kTileDkDvRows;
    const T* const sdO_stage = sdO + stage * Tile::kTileDkDvRows;
    const float* const sLse_stage = sLse + stage * kBlockM;
    const float* const sDelta_stage = sDelta + stage * kBlockM;

    // S^T = K Q^T: the warp's 16 keys x the tile's kBlockM rows.
    float pt[kRowBlocks][4];
#pragma unroll
    for (int j = 0; j < kRowBlocks; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) pt[j][e] = 0.f;
    }
#pragma unroll
    for (int ks_ = 0; ks_ < kKSteps; ++ks_) {
      uint32_t ka[4];
      load_a_fragment<kHeadDim>(ka, sK, warp * 16, ks_ * 16);
#pragma unroll
      for (int j2 = 0; j2 < kRowBlocks / 2; ++j2) {
        uint32_t qb[2][2];
        load_b_fragments_nk<kHeadDim>(qb, sQ_stage, j2 * 16, ks_ * 16);
        mma_16816<T>(pt[2 * j2], ka, qb[0][0], qb[0][1]);
        mma_16816<T>(pt[2 * j2 + 1], ka, qb[1][0], qb[1][1]);
      }
    }

    // P^T = exp2(S^T * scale * log2 e - lse * log2 e); zero for keys past the segment end and for
    // rows past the tile end (their Q, dO, lse, Delta were zero-filled).
#pragma unroll
    for (int j = 0; j < kRowBlocks; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = j * 8 + 2 * quad_col + (e & 1);       // row of the query tile
        const int key = warp * 16 + lane / 4 + 8 * (e >> 1);  // key of the key tile
        const float prob = exp2f(pt[j][e] * p.scale_log2 - sLse_stage[col] * kLog2e);
        pt[j][e] = (key < keys_in_tile && col < rows_in_tile) ? prob : 0.f;
      }
    }

    // dV += P^T dO.
#pragma unroll
    for (int kt = 0; kt < kBlockM / 16; ++kt) {
      uint32_t pa[4];
      pack_a_from_accumulators<T>(pa, pt[2 * kt], pt[2 * kt + 1]);
#pragma unroll
      for (int d2 = 0; d2 < kHeadDim / 16; ++d2) {
        uint32_t ob[2][2];
        load_b_fragments_kn<kHeadDim>(ob, sdO_stage, kt * 16, d2 * 16);
        mma_16816<T>(dv_acc[2 * d2], pa, ob[0][0], ob[0][1]);
        mma_16816<T>(dv_acc[2 * d2 + 1], pa, ob[1][0], ob[1][1]);
      }
    }

    // dP^T = V dO^T.
    float ds_t[kRowBlocks][4];
#pragma unroll
    for (int j = 0; j < kRowBlocks; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) ds_t[j][e] = 0.f;
    }
#pragma unroll
    for (int ks_ = 0; ks_ < kKSteps; ++ks_) {
      uint32_t va[4];
      load_a_fragment<kHeadDim>(va, sV, warp * 16, ks_ * 16);
#pragma unroll
      for (int j2 = 0; j2 < kRowBlocks / 2; ++j2) {
        uint32_t ob[2][2];
        load_b_fragments_nk<kHeadDim>(ob, sdO_stage, j2 * 16, ks_ * 16);
        mma_16816<T>(ds_t[2 * j2], va, ob[0][0], ob[0][1]);
        mma_16816<T>(ds_t[2 * j2 + 1], va, ob[1][0], ob[1][1]);
      }
    }

    // dS^T = P^T * (dP^T - Delta), in place.
#pragma unroll
    for (int j = 0; j < kRowBlocks; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = j * 8 + 2 * quad_col + (e & 1);
        ds_t[j][e] = pt[j][e] * (ds_t[j][e] - sDelta_stage[col]);
      }
    }

    // dK += dS^T Q (the softmax scale is applied once, at the end).
#pragma unroll
    for (int kt = 0; kt < kBlockM / 16; ++kt) {
      uint32_t da[4];
      pack_a_from_accumulators<T>(da, ds_t[2 * kt], ds_t[2 * kt + 1]);
#pragma unroll
      for (int d2 = 0; d2 < kHeadDim / 16; ++d2) {
        uint32_t qb[2][2];
        load_b_fragments_kn<kHeadDim>(qb, sQ_stage, kt * 16, d2 * 16);
        mma_16816<T>(dk_acc[2 * d2], da, qb[0][0], qb[0][1]);
        mma_16816<T>(dk_acc[2 * d2 + 1], da, qb[1][0], qb[1][1]);
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  cp_async_wait<0>();

  // Each thread holds keys g and g + 8 of its warp's 16, channels 2t, 2t+1 of every 8.
  T* const dk = static_cast<T*>(p.dk) + static_cast<int64_t>(kv_head) * p.dk_head_stride;
  T* const dv = static_cast<T*>(p.dv) + static_cast<int64_t>(kv_head) * p.dv_head_stride;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int key = warp * 16 + lane / 4 + 8 * i;
    if (key >= keys_in_tile) continue;
    const int64_t token = static_cast<int64_t>(ks.begin) + key0 + key;
    T* const dk_row = dk + token * p.dk_token_stride;
    T* const dv_row = dv + token * p.dv_token_stride;
#pragma unroll
    for (int d = 0; d < kOutBlocks; ++d) {
      const int c = d * 8 + 2 * quad_col;
      store2(dk_row + c, dk_acc[d][2 * i] * p.softmax_scale,
             dk_acc[d][2 * i + 1] * p.softmax_scale);
      store2(dv_row + c, dv_acc[d][2 * i], dv_acc[d][2 * i + 1]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 3. dQ.
// ---------------------------------------------------------------------------------------------

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kBackwardThreads)
    attention_backward_dq_kernel(const AttentionBackwardParams p) {
  using Tile = BackwardTile<kHeadDim>;
  constexpr int kBlockM = Tile::kDqBlockM;
  constexpr int kThreads = kBackwardThreads;
  constexpr int kKSteps = kHeadDim / 16;     // k-steps over channels (S = Q K^T, dP = dO V^T)
  constexpr int kScoreBlocks = kBlockN / 8;  // 8-key n-blocks of S and dP
  constexpr int kOutBlocks = kHeadDim / 8;   // 8-channel n-blocks of dQ

  extern __shared__ __align__(128) unsigned char smem[];
  T* const sQ = reinterpret_cast<T*>(smem);
  T* const sdO = sQ + Tile::kTileDq;
  T* const sK = sdO + Tile::kTileDq;     // [2 stages][kBlockN][kHeadDim]
  T* const sV = sK + 2 * Tile::kTileKV;  // [2 stages][kBlockN][kHeadDim]

  int64_t cta = blockIdx.x;
  const int m_block = static_cast<int>(cta % p.num_m_blocks);
  cta /= p.num_m_blocks;
  const int head_cta = static_cast<int>(cta % p.head_ctas);
  const int b = static_cast<int>(cta / p.head_ctas);

  const Segment qs = segment_bounds(p.cu_seqlens_q, b, p.total_q);
  const int rows = qs.length * p.rows_per_query;
  const int m0 = m_block * kBlockM;
  if (m0 >= rows) return;  // uniform over the CTA
  const int rows_in_tile = min(kBlockM, rows - m0);
  const Segment ks = segment_bounds(p.cu_seqlens_k, b, p.total_k);
  const RowMap row_map{qs.begin, head_cta * p.rows_per_query, p.rows_per_query};
  const int kv_head = row_map.first_head / (p.num_heads_q / p.num_heads_k);
  const int n_blocks = ceil_div_int(ks.length, kBlockN);

  const T* const q = static_cast<const T*>(p.q);
  const T* const dout = static_cast<const T*>(p.dout);
  const T* const k_head =
      static_cast<const T*>(p.k) + static_cast<int64_t>(kv_head) * p.k_head_stride;
  const T* const v_head =
      static_cast<const T*>(p.v) + static_cast<int64_t>(kv_head) * p.v_head_stride;

  auto load_rows = [&]() {
    load_tile_async<kBlockM, kHeadDim, kThreads>(sQ, rows_in_tile, q, [&](int r) {
      return q + static_cast<int64_t>(row_map.token(m0 + r)) * p.q_token_stride +
             static_cast<int64_t>(row_map.head(m0 + r)) * p.q_head_stride;
    });
    load_tile_async<kBlockM, kHeadDim, kThreads>(sdO, rows_in_tile, dout, [&](int r) {
      return dout + static_cast<int64_t>(row_map.token(m0 + r)) * p.dout_token_stride +
             static_cast<int64_t>(row_map.head(m0 + r)) * p.dout_head_stride;
    });
  };
  auto load_kv = [&](int n_block, int stage) {
    const int key0 = n_block * kBlockN;
    const int valid = min(kBlockN, ks.length - key0);
    const int64_t first = static_cast<int64_t>(ks.begin) + key0;
    load_tile_async<kBlockN, kHeadDim, kThreads>(
        sK + stage * Tile::kTileKV, valid, k_head,
        [&](int r) { return k_head + (first + r) * p.k_token_stride; });
    load_tile_async<kBlockN, kHeadDim, kThreads>(
        sV + stage * Tile::kTileKV, valid, v_head,
        [&](int r) { return v_head + (first + r) * p.v_token_stride; });
  };

  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int quad_col = lane % 4;

  // lse (log2 units) and Delta of this thread's rows g and g + 8. A row past the tile end gets
  // lse = +inf, so its P is exactly 0.
  float row_lse_log2[2];
  float row_delta[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp * 16 + lane / 4 + 8 * i;
    row_lse_log2[i] = INFINITY;
    row_delta[i] = 0.f;
    if (r < rows_in_tile) {
      const int64_t index =
          static_cast<int64_t>(row_map.head(m0 + r)) * p.total_q + row_map.token(m0 + r);
      row_lse_log2[i] = p.lse[index] * kLog2e;
      row_delta[i] = p.delta[index];
    }
  }

  float dq_acc[kOutBlocks][4];
#pragma unroll
  for (int d = 0; d < kOutBlocks; ++d) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dq_acc[d][e] = 0.f;
  }

  if (n_blocks > 0) {
    load_rows();
    load_kv(0, 0);
  }
  cp_async_commit();

  for (int n_block = 0; n_block < n_blocks; ++n_block) {
    const int stage = n_block & 1;
    if (n_block + 1 < n_blocks) load_kv(n_block + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const T* const sK_stage = sK + stage * Tile::kTileKV;
    const T* const sV_stage = sV + stage * Tile::kTileKV;
    const int keys_valid = ks.length - n_block * kBlockN;

    // S = Q K^T and dP = dO V^T for the warp's 16 rows and the tile's 64 keys.
    float ps[kScoreBlocks][4];
    float dps[kScoreBlocks][4];
#pragma unroll
    for (int j = 0; j < kScoreBlocks; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        ps[j][e] = 0.f;
        dps[j][e] = 0.f;
      }
    }
#pragma unroll
    for (int ks_ = 0; ks_ < kKSteps; ++ks_) {
      uint32_t qa[4];
      load_a_fragment<kHeadDim>(qa, sQ, warp * 16, ks_ * 16);
#pragma unroll
      for (int j2 = 0; j2 < kScoreBlocks / 2; ++j2) {
        uint32_t kb[2][2];
        load_b_fragments_nk<kHeadDim>(kb, sK_stage, j2 * 16, ks_ * 16);
        mma_16816<T>(ps[2 * j2], qa, kb[0][0], kb[0][1]);
        mma_16816<T>(ps[2 * j2 + 1], qa, kb[1][0], kb[1][1]);
      }
    }
#pragma unroll
    for (int ks_ = 0; ks_ < kKSteps; ++ks_) {
      uint32_t oa[4];
      load_a_fragment<kHeadDim>(oa, sdO, warp * 16, ks_ * 16);
#pragma unroll
      for (int j2 = 0; j2 < kScoreBlocks / 2; ++j2) {
        uint32_t vb[2][2];
        load_b_fragments_nk<kHeadDim>(vb, sV_stage, j2 * 16, ks_ * 16);
        mma_16816<T>(dps[2 * j2], oa, vb[0][0], vb[0][1]);
        mma_16816<T>(dps[2 * j2 + 1], oa, vb[1][0], vb[1][1]);
      }
    }

    // dS = P * (dP - Delta), P = exp2(S * scale * log2 e - lse * log2 e), 0 past the segment end.
#pragma unroll
    for (int j = 0; j < kScoreBlocks; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e >> 1;
        const float prob = exp2f(ps[j][e] * p.scale_log2 - row_lse_log2[i]);
        const bool key_valid = j * 8 + 2 * quad_col + (e & 1) < keys_valid;
        dps[j][e] = key_valid ? prob * (dps[j][e] - row_delta[i]) : 0.f;
      }
    }

    // dQ += dS K (the softmax scale is applied once, at the end).
#pragma unroll
    for (int kt = 0; kt < kBlockN / 16; ++kt) {
      uint32_t da[4];
      pack_a_from_accumulators<T>(da, dps[2 * kt], dps[2 * kt + 1]);
#pragma unroll
      for (int d2 = 0; d2 < kHeadDim / 16; ++d2) {
        uint32_t kb[2][2];
        load_b_fragments_kn<kHeadDim>(kb, sK_stage, kt * 16, d2 * 16);
        mma_16816<T>(dq_acc[2 * d2], da, kb[0][0], kb[0][1]);
        mma_16816<T>(dq_acc[2 * d2 + 1], da, kb[1][0], kb[1][1]);
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  cp_async_wait<0>();

  T* const dq = static_cast<T*>(p.dq);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp * 16 + lane / 4 + 8 * i;
    if (r >= rows_in_tile) continue;
    T* const dq_row = dq + static_cast<int64_t>(row_map.token(m0 + r)) * p.dq_token_stride +
                      static_cast<int64_t>(row_map.head(m0 + r)) * p.dq_head_stride;
#pragma unroll
    for (int d = 0; d < kOutBlocks; ++d) {
      store2(dq_row + d * 8 + 2 * quad_col, dq_acc[d][2 * i] * p.softmax_scale,
             dq_acc[d][2 * i + 1] * p.softmax_scale);
    }
  }
}

}  // namespace attention
}  // namespace crosslmm
