// Cross-attention forward for Hopper (sm_90a) on GQA-packed short query sets: a frame's 9 queries
// times the 6 query heads of a KV group (54 rows), a decode step's 1 x 6. Same contract as the
// mma.sync kernel (attention_fwd_kernel.cuh), whose launch plan it shares: packed varlen segments,
// rows = (query token, head in group) pairs through RowMap, out + lse (natural log), or fp32
// partial results + partial lse per key split for the combine kernel. Head dim 128, fp16/bf16,
// non-causal, softmax_scale > 0.
//
// Why a third kernel: these calls stream K/V once and do little arithmetic per byte, but the
// mma.sync kernel's tensor-core work per 64-key tile is still about half the time the tile takes
// to arrive from DRAM, so it does not hide; wgmma does the same work at a higher rate and
// asynchronously. The FA3-style sm90 kernel does not fit these calls: its CTA is 128 rows of one
// query head (a 9-query frame would fill 9 of them).
//
// CTA = (64 packed rows, KV head, key split, segment), one warpgroup (128 threads), no producer:
// every thread issues cp.async copies into a kStages-deep ring of 64-key K/V tiles (16-byte
// chunks, zero-filled past the segment end, so no V row of another segment can put 0 x inf into
// P V), as the mma.sync kernel does, but into the 128-byte-swizzled layout that wgmma reads. Per
// key tile:
//   S = Q K^T        wgmma m64n64k16 x 8, Q and K from shared memory (K-major)
//   online softmax   in registers (the wgmma accumulator layout is the mma.m16n8 one), log2 units
//   O += P V         wgmma m64n128k16 x 4, P from registers, V from shared memory (MN-major)
// Shared memory: Q (16 KB) + kStages x (K 16 KB + V 16 KB); with three stages 112 KB + 1 KB of
// alignment slack, so two CTAs share a multiprocessor (228 KB). Each tile is two [64 rows][64
// channels] halves of 8 KB, 16-byte chunk c of row r stored at chunk c ^ (r % 8) of its 128-byte
// row (the 128-byte swizzle; see make_smem_desc_sw128 in common/sm90_ptx.cuh).
//
// cp.async writes shared memory through the generic proxy and wgmma reads it through the async
// proxy: every thread fences (fence.proxy.async) after its copies have landed and before the
// barrier that precedes the wgmmas.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "attention/attention_common.cuh"
#include "attention/attention_fwd_sm90_kernel.cuh"  // exp2_approx
#include "attention/attention_params.h"
#include "common/mma.cuh"
#include "common/sm90_ptx.cuh"

namespace crosslmm {
namespace attention {

template <int kHeadDim, int kStages>
struct Sm90PackedConfig {
  static_assert(kHeadDim == 128, "the packed sm90 forward is written for head dim 128");
  static_assert(kStages >= 2, "the K/V ring needs at least two stages");
  static constexpr int kBlockM = 64;  // packed rows per CTA: one warpgroup's wgmma M
  static constexpr int kThreads = 128;
  static constexpr int kHalfBytes = 64 * 128;        // [64 rows][64 channels] of 2-byte elements
  static constexpr int kTileBytes = 2 * kHalfBytes;  // Q, K or V: 64 rows x 128 channels
  static constexpr int kQOffset = 0;
  static constexpr int kStageOffset = kTileBytes;    // stage s: K, then V
  static constexpr int kStageBytes = 2 * kTileBytes;
  // + 1024: the dynamic shared memory base is only 16-byte aligned; the kernel rounds it up.
  static constexpr int kSmemBytes = kTileBytes + kStages * kStageBytes + 1024;
};

// rows x 128 channels of T, global -> shared through cp.async, in the 128-byte-swizzled layout
// (two 64-channel halves). Rows at or past valid_rows are zero-filled; `row_address(r)` is only
// called for r < valid_rows. The caller commits the group.
template <int kThreads, typename T, typename RowAddress>
__device__ __forceinline__ void load_tile_sw128(unsigned char* tile, int valid_rows,
                                                const T* fallback, RowAddress row_address) {
  constexpr int kHalfBytes = 64 * 128;
  constexpr int kChunks = 64 * 16;  // 16-byte chunks: 16 per 128-channel row
  static_assert(kChunks % kThreads == 0, "tile chunks must divide evenly over the threads");
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int c = static_cast<int>(threadIdx.x) + i * kThreads;
    const int row = c / 16;
    const int chunk = c % 16;
    const bool valid = row < valid_rows;
    const T* src = valid ? row_address(row) + chunk * 8 : fallback;
    const int swizzled = (chunk % 8) ^ (row % 8);
    cp_async_16(tile + (chunk / 8) * kHalfBytes + row * 128 + swizzled * 16, src, valid);
  }
}

template <typename T, int kHeadDim, int kStages>
__global__ void __launch_bounds__(128)
    attention_forward_sm90_packed_kernel(const __grid_constant__ AttentionForwardParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = Sm90PackedConfig<kHeadDim, kStages>;
  using namespace sm90;
  constexpr int kBlockM = Cfg::kBlockM;
  constexpr int kThreads = Cfg::kThreads;
  constexpr uint32_t kHalf = Cfg::kHalfBytes;

  // The CTA's tile, ordered as the mma.sync kernel's (the launch plan is shared).
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

  const int n_blocks_segment = ceil_div_int(ks.length, kBlockN);
  const int per_split = ceil_div_int(n_blocks_segment, p.num_splits);
  const int n_begin = min(split * per_split, n_blocks_segment);
  const int n_end = min(n_begin + per_split, n_blocks_segment);

  extern __shared__ __align__(16) unsigned char smem_raw[];  // aligned by hand below
  const uint32_t raw_addr = smem_u32(smem_raw);
  unsigned char* const base = smem_raw + (((raw_addr + 1023u) & ~1023u) - raw_addr);
  const uint32_t base_addr = smem_u32(base);  // 1024-byte aligned: swizzle atoms start here
  unsigned char* const sQ = base + Cfg::kQOffset;
  auto sK = [&](int stage) { return base + Cfg::kStageOffset + stage * Cfg::kStageBytes; };
  auto sV = [&](int stage) { return sK(stage) + Cfg::kTileBytes; };
  auto addr = [&](const unsigned char* ptr) {
    return base_addr + static_cast<uint32_t>(ptr - base);
  };

  const T* const q = static_cast<const T*>(p.q);
  const T* const k = static_cast<const T*>(p.k);
  const T* const v = static_cast<const T*>(p.v);
  const T* const k_head = k + static_cast<int64_t>(kv_head) * p.k_head_stride;
  const T* const v_head = v + static_cast<int64_t>(kv_head) * p.v_head_stride;

  auto load_q = [&]() {
    load_tile_sw128<kThreads>(sQ, rows_in_tile, q, [&](int r) {
      const int row = m0 + r;
      return q + static_cast<int64_t>(row_map.token(row)) * p.q_token_stride +
             static_cast<int64_t>(row_map.head(row)) * p.q_head_stride;
    });
  };
  auto load_kv = [&](int n_block, int stage) {
    const int key0 = n_block * kBlockN;
    const int valid = min(kBlockN, ks.length - key0);
    const int64_t first = static_cast<int64_t>(ks.begin) + key0;
    load_tile_sw128<kThreads>(sK(stage), valid, k,
                              [&](int r) { return k_head + (first + r) * p.k_token_stride; });
    load_tile_sw128<kThreads>(sV(stage), valid, v,
                              [&](int r) { return v_head + (first + r) * p.v_token_stride; });
  };

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int quad_col = lane % 4;  // t: columns 2t, 2t+1 of each 8-column block
  const int quad_row = lane / 4;  // g: rows g and g + 8 of the warp's 16-row slab
  const float scale_log2 = p.scale_log2;  // > 0 (the host only dispatches positive scales)

  float o[64];  // O, the m64n128 accumulator layout
  float s[32];  // S of one key tile, the m64n64 accumulator layout
#pragma unroll
  for (int e = 0; e < 64; ++e) o[e] = 0.f;
  // Running max of the raw scores (scale not applied) and sum of exp2 for this thread's two rows:
  // r = 0 is row g of the warp's slab, r = 1 row g + 8 (accumulator elements 4j + 0,1 and 4j + 2,3).
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};

  // Prologue: Q and the first kStages - 1 key tiles, one cp.async group each (empty past the
  // split's last tile, which keeps the group count uniform).
  if (n_begin < n_end) load_q();
  cp_async_commit();
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (n_begin + t < n_end) load_kv(n_begin + t, t);
    cp_async_commit();
  }

  int stage = 0;  // ring slot of tile n_block
  for (int n_block = n_begin; n_block < n_end; ++n_block) {
    // Prefetch tile n_block + kStages - 1 into the slot tile n_block - 1 used: its wgmmas were
    // waited for, and every thread passed the barrier at the end of the previous iteration.
    const int prefetch = n_block + kStages - 1;
    const int prefetch_stage = stage == 0 ? kStages - 1 : stage - 1;
    if (prefetch < n_end) load_kv(prefetch, prefetch_stage);
    cp_async_commit();
    cp_async_wait<kStages - 1>();  // Q and tile n_block have landed (this thread's copies)
    fence_proxy_async_shared();    // ... and are visible to wgmma once all threads pass:
    __syncthreads();

    // S = Q K^T: 8 k-steps of 16 channels; k-step kk is 32 bytes into half kk / 4.
    const uint32_t q_tile = addr(sQ), k_tile = addr(sK(stage)), v_tile = addr(sV(stage));
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      const uint32_t offset = (kk / 4) * kHalf + (kk % 4) * 32;
      wgmma_m64n64k16_ss<T>(s, make_smem_desc_sw128(q_tile + offset, 16, 1024),
                            make_smem_desc_sw128(k_tile + offset, 16, 1024), kk > 0 ? 1 : 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(s);

    // Online softmax; keys past the segment end (only in its last tile) get -inf.
    const int keys_valid = ks.length - n_block * kBlockN;
    if (keys_valid < kBlockN) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (j * 8 + 2 * quad_col + (e & 1) >= keys_valid) s[4 * j + e] = -INFINITY;
        }
      }
    }
    float corr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = row_max[r];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        tile_max = fmaxf(tile_max, fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
      }
      tile_max = quad_max(tile_max);
      // While every score seen is -inf the max is -inf; 0 keeps exp2(-inf - max) = 0, not NaN.
      const float max_scaled = tile_max == -INFINITY ? 0.f : tile_max * scale_log2;
      corr[r] = exp2_approx(row_max[r] * scale_log2 - max_scaled);  // 0 on the first tile
      row_max[r] = tile_max;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        s[4 * j + 2 * r] = exp2_approx(fmaf(s[4 * j + 2 * r], scale_log2, -max_scaled));
        s[4 * j + 2 * r + 1] = exp2_approx(fmaf(s[4 * j + 2 * r + 1], scale_log2, -max_scaled));
        sum += s[4 * j + 2 * r] + s[4 * j + 2 * r + 1];
      }
      row_sum[r] = row_sum[r] * corr[r] + sum;
    }
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      o[4 * j + 0] *= corr[0];
      o[4 * j + 1] *= corr[0];
      o[4 * j + 2] *= corr[1];
      o[4 * j + 3] *= corr[1];
    }

    // O += P V: 4 k-steps of 16 keys, P as the A registers (the S accumulator layout is the
    // A-operand layout), V as the MN-major operand (its two 64-channel halves are the N blocks).
    uint32_t pa[16];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        pa[4 * kk + r] = pack2<T>(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
      }
    }
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t a[4] = {pa[4 * kk], pa[4 * kk + 1], pa[4 * kk + 2], pa[4 * kk + 3]};
      wgmma_m64n128k16_rs_tb<T>(o, a, make_smem_desc_sw128(v_tile + kk * 16 * 128, kHalf, 1024));
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(o);
    fence_operands(pa);
    __syncthreads();  // every thread is done with this stage before the next prefetch refills it
    stage = stage == kStages - 1 ? 0 : stage + 1;
  }
  cp_async_wait<0>();  // no copy may still be landing in shared memory when the CTA exits

  // Epilogue (as the mma.sync kernel's): O / l and the lse per row; a row without keys gets 0 and
  // -inf. Thread rows: warp * 16 + g + 8 r; columns 8 j + 2 t, + 1.
  T* const out = static_cast<T*>(p.out);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = quad_sum(row_sum[r]);  // all lanes, before any lane skips a row
    // sum == 0: no keys. A NaN input makes sum NaN, and NaN must reach the output, not a 0.
    const float inv_sum = sum != 0.f ? 1.f / sum : 0.f;
    const float lse = sum != 0.f ? (row_max[r] * scale_log2 + log2f(sum)) * kLn2 : -INFINITY;
    const int tile_row = warp * 16 + quad_row + 8 * r;
    if (tile_row >= rows_in_tile) continue;
    const int row = m0 + tile_row;
    const int token = row_map.token(row);
    const int head = row_map.head(row);
    if (p.num_splits == 1) {
      T* const o_row = out + static_cast<int64_t>(token) * p.out_token_stride +
                       static_cast<int64_t>(head) * p.out_head_stride;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        store2(o_row + j * 8 + 2 * quad_col, o[4 * j + 2 * r] * inv_sum,
               o[4 * j + 2 * r + 1] * inv_sum);
      }
      if (quad_col == 0) p.lse[static_cast<int64_t>(head) * p.total_q + token] = lse;
    } else {
      const int64_t partial_row =
          (static_cast<int64_t>(split) * p.num_heads_q + head) * p.total_q + token;
      float* const o_row = p.out_partial + partial_row * kHeadDim;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        *reinterpret_cast<float2*>(o_row + j * 8 + 2 * quad_col) =
            make_float2(o[4 * j + 2 * r] * inv_sum, o[4 * j + 2 * r + 1] * inv_sum);
      }
      if (quad_col == 0) p.lse_partial[partial_row] = lse;
    }
  }
#elif defined(__CUDA_ARCH__)
  // Compiled for a target without wgmma: the host never launches this (it checks the device and
  // the build's architectures); fail loudly if it ever happens.
  __trap();
#endif
}

}  // namespace attention
}  // namespace crosslmm
