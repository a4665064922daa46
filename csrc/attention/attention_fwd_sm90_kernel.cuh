// Cross-attention forward for Hopper (sm_90a): wgmma + TMA, warp-specialised, FlashAttention-3
// style. Same contract as the mma.sync kernel (attention_fwd_kernel.cuh): packed varlen segments,
// GQA by head mapping, out + lse (natural log), or fp32 partial results + partial lse per key split
// for the combine kernel. Head dim 128, fp16/bf16, non-causal.
//
// CTA = (128-row query tile, query head or GQA group, key split, segment), 3 warpgroups. The rows
// are one query head's 128 tokens, or, where that gives fewer tiles (V2V at T = 32: 288 queries
// fill three 128-row tiles of each head to 75%), a GQA group's heads packed: (token, head) pairs,
// token-major, whole tokens per tile (21 tokens x 6 heads = 126 rows), so K/V are read once per
// group. Q comes in one TMA box of 64 channels x heads x tokens either way.
//
//   warpgroup 0, producer: one thread issues TMA loads. Q (128 rows x 128 channels) once; then the
//       split's K and V tiles (128 keys x 128 channels each) into a kStages-deep ring. Each stage
//       has four mbarriers: k_full / v_full (the TMA's bytes have landed) and k_empty / v_empty
//       (all 8 consumer warps are done reading). K and V are released separately: a K tile is free
//       once S = Q K^T is computed, a V tile only after O += P V, so the next K can stream in
//       early. The producer gives most of its registers to the consumers (setmaxnreg).
//   warpgroups 1 and 2, consumers: 64 query rows each. Per key tile n:
//         S = Q K_n^T          wgmma m64n128k16 x 8 (Q and K from shared memory, both K-major)
//         online softmax       in registers, log2 units, exp2 (scale * log2 e folded in one FFMA)
//         O += P V_n           wgmma m64n128k16 x 8, P from registers (the S accumulator layout is
//                              the A-register layout of the next wgmma, as with mma.sync), V from
//                              shared memory as an MN-major ("transposed") operand
//       Intra-warpgroup overlap: iteration n issues S_n and then P_{n-1} V_{n-1}, and runs the
//       softmax of S_n while P_{n-1} V_{n-1} is still on the tensor cores. Ping-pong: two named
//       barriers make the warpgroups take turns issuing their GEMMs, so one warpgroup's softmax
//       (exp2 on the MUFU unit) overlaps the other's GEMMs.
//
// Shared memory (1024-byte aligned): Q, then K[kStages], then V[kStages], 32 KB each, then the
// mbarriers. Every tile is two 16 KB halves (channels 0-63, 64-127) of [128 rows][64 channels],
// 128-byte rows in TMA's 128-byte swizzle, which is the canonical wgmma layout (see
// make_smem_desc_sw128 in common/sm90_ptx.cuh). TMA boxes are 64 channels wide because a
// 128-byte swizzle allows at most 128-byte box rows.
//
// Segment edges. TMA zero-fills only past the end of the whole tensor, so a tile's rows may run
// into the next segment's tokens: key columns past the segment end are set to -inf in S (so
// exp2 gives exactly 0), the last V tile's rows past the segment end are zeroed in shared memory
// before P V (0 * inf or 0 * NaN from another segment would be NaN), and query rows past the end
// are computed but never stored.
//
// Epilogue: O / l rounded to T is staged through this warpgroup's (no longer needed) part of the Q
// buffer and written with 16-byte stores, 16 threads per 256-byte row; lse = (m + log2 l) ln 2. A
// row without keys gets 0 and -inf. Split CTAs write fp32 partials straight from registers.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "attention/attention_common.cuh"
#include "attention/attention_params.h"
#include "attention/attention_sm90_epilogue.cuh"
#include "common/mma.cuh"
#include "common/sm90_ptx.cuh"

namespace crosslmm {
namespace attention {

template <int kHeadDim, int kStages>
struct Sm90ForwardConfig {
  static_assert(kHeadDim == 128, "the sm90 forward is written for head dim 128");
  static_assert(kStages >= 2, "the K/V ring needs at least two stages");
  static constexpr int kBlockM = kSm90BlockM;  // query rows per CTA (2 consumer warpgroups x 64)
  static constexpr int kBlockN = kSm90BlockN;  // keys per K/V tile
  static constexpr int kThreads = 384;         // producer + 2 consumer warpgroups
  static constexpr int kConsumerThreads = 256;
  static constexpr int kHalfBytes = 128 * 64 * 2;  // one [128 rows][64 channels] half of a tile
  static constexpr int kTileBytes = 2 * kHalfBytes;
  static constexpr int kRowsPerWarpgroup = 64;
  static constexpr int kWarpgroupRowBytes = kRowsPerWarpgroup * 128;  // its rows in one half
  static constexpr int kQOffset = 0;
  static constexpr int kKOffset = kTileBytes;
  static constexpr int kVOffset = kTileBytes * (1 + kStages);
  static constexpr int kBarrierOffset = kTileBytes * (1 + 2 * kStages);
  static constexpr int kNumBarriers = 1 + 4 * kStages;  // q_full; k_full, v_full, k_empty, v_empty
  // + 1024: the dynamic shared memory base is only 16-byte aligned; the kernel rounds it up.
  static constexpr int kSmemBytes = kBarrierOffset + 8 * kNumBarriers + 1024;
  // Register split (setmaxnreg): 128 * 24 + 256 * 240 = 64512 <= 65536, the launch's 384 * 168.
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  // Named barriers (0 is __syncthreads): the ping-pong turn of consumer warpgroup 0 / 1, the
  // consumers together, and each consumer warpgroup alone.
  static constexpr uint32_t kTurnBarrier = 1;            // + consumer index
  static constexpr uint32_t kConsumersBarrier = 3;
  static constexpr uint32_t kWarpgroupBarrier = 4;       // + consumer index
};

// exp2 on the MUFU unit; results below 2^-126 flush to 0 (they are p values far below bf16's
// resolution next to the row's max, which contributes exp2(0) = 1).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

template <typename T, int kHeadDim, int kStages>
__global__ void __launch_bounds__(384, 1)
    attention_forward_sm90_kernel(const __grid_constant__ AttentionForwardParams p,
                                  const __grid_constant__ CUtensorMap tmap_q,
                                  const __grid_constant__ CUtensorMap tmap_k,
                                  const __grid_constant__ CUtensorMap tmap_v) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = Sm90ForwardConfig<kHeadDim, kStages>;
  using namespace sm90;
  constexpr int kBlockM = Cfg::kBlockM;
  constexpr int kBlockN = Cfg::kBlockN;
  constexpr uint32_t kHalf = Cfg::kHalfBytes;
  constexpr uint32_t kTileBytes = Cfg::kTileBytes;

  // The CTA's tile; m-block fastest, then the head (CTAs side by side share K/V through L2).
  int64_t cta = blockIdx.x;
  const int m_block = static_cast<int>(cta % p.num_m_blocks);
  cta /= p.num_m_blocks;
  const int head_cta = static_cast<int>(cta % p.head_ctas);
  cta /= p.head_ctas;
  const int split = static_cast<int>(cta % p.num_splits);
  const int b = static_cast<int>(cta / p.num_splits);

  // Tile rows are (query token, head) pairs, token-major, rows_per_query heads per token: 1 (one
  // query head per CTA), or the GQA group packed (whole tokens per tile: 21 tokens x 6 heads = 126
  // of the 128 rows). The Q box fills box_rows rows.
  const int rows_per_query = p.rows_per_query;
  const int tokens_per_tile = kBlockM / rows_per_query;
  const int box_rows = tokens_per_tile * rows_per_query;
  const Segment qs = segment_bounds(p.cu_seqlens_q, b, p.total_q);
  const int token0 = m_block * tokens_per_tile;  // the tile's first token in the segment
  if (token0 >= qs.length) return;  // uniform over the CTA, before any barrier exists
  const Segment ks = segment_bounds(p.cu_seqlens_k, b, p.total_k);
  const int first_head = head_cta * rows_per_query;
  const int kv_head = first_head / (p.num_heads_q / p.num_heads_k);

  // This split's key tiles (see the mma.sync kernel): some splits of a short segment are empty.
  const int n_blocks_segment = ceil_div_int(ks.length, kBlockN);
  const int per_split = ceil_div_int(n_blocks_segment, p.num_splits);
  const int n_begin = min(split * per_split, n_blocks_segment);
  const int n_end = min(n_begin + per_split, n_blocks_segment);
  const int count = n_end - n_begin;  // uniform over the CTA

  extern __shared__ __align__(16) unsigned char smem_raw[];  // aligned by hand below
  const uint32_t raw_addr = smem_u32(smem_raw);
  const uint32_t base = (raw_addr + 1023u) & ~1023u;  // swizzle atoms need 1024-byte alignment
  const uint32_t sQ = base + Cfg::kQOffset;
  auto sK = [&](int stage) { return base + Cfg::kKOffset + stage * kTileBytes; };
  auto sV = [&](int stage) { return base + Cfg::kVOffset + stage * kTileBytes; };
  const uint32_t bars = base + Cfg::kBarrierOffset;
  const uint32_t q_full = bars;
  auto k_full = [&](int stage) { return bars + 8u * (1 + stage); };
  auto v_full = [&](int stage) { return bars + 8u * (1 + kStages + stage); };
  auto k_empty = [&](int stage) { return bars + 8u * (1 + 2 * kStages + stage); };
  auto v_empty = [&](int stage) { return bars + 8u * (1 + 3 * kStages + stage); };

  const int tid = static_cast<int>(threadIdx.x);
  const int warpgroup = tid / 128;

  if (tid == 0) {
    mbarrier_init(q_full, 1);
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(k_full(s), 1);  // the producer's arrive.expect_tx, then the TMA bytes
      mbarrier_init(v_full(s), 1);
      mbarrier_init(k_empty(s), 8);  // one arrival per consumer warp
      mbarrier_init(v_empty(s), 8);
    }
    fence_barrier_init();
  }
  __syncthreads();  // the only CTA-wide barrier; after it the warpgroups go their own ways

  if (warpgroup == 0) {
    // ------------------------------------------------------------------------------------------
    // Producer
    // ------------------------------------------------------------------------------------------
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if (tid == 0 && count > 0) {
      tma_prefetch_descriptor(&tmap_q);
      tma_prefetch_descriptor(&tmap_k);
      tma_prefetch_descriptor(&tmap_v);

      // Q: boxes of 64 channels x rows_per_query heads x tokens_per_tile tokens (the host encodes
      // the map so), rows landing token-major as the tile's rows.
      const int q_token = qs.begin + token0;
      mbarrier_arrive_expect_tx(q_full, static_cast<uint32_t>(box_rows) * 2u * 128u);
      tma_load_3d(sQ, &tmap_q, q_full, 0, first_head, q_token);
      tma_load_3d(sQ + kHalf, &tmap_q, q_full, 64, first_head, q_token);

      // Tile i of the split goes to stage i % kStages; its use u = i / kStages of that stage
      // waits until the consumers released use u - 1 (parity (u & 1) ^ 1: passes at once for
      // u = 0).
      auto load = [&](const CUtensorMap* map, uint32_t dst, uint32_t full, uint32_t empty, int i) {
        mbarrier_wait(empty, ((i / kStages) & 1) ^ 1);
        mbarrier_arrive_expect_tx(full, kTileBytes);
        const int key_row = ks.begin + (n_begin + i) * kBlockN;
        tma_load_3d(dst, map, full, 0, kv_head, key_row);
        tma_load_3d(dst + kHalf, map, full, 64, kv_head, key_row);
      };
      auto load_k = [&](int i) {
        const int s = i % kStages;
        load(&tmap_k, sK(s), k_full(s), k_empty(s), i);
      };
      auto load_v = [&](int i) {
        const int s = i % kStages;
        load(&tmap_v, sV(s), v_full(s), v_empty(s), i);
      };
      // K runs one tile ahead of V: iteration i of the consumers needs K_i and V_{i-1}.
      load_k(0);
      for (int i = 0; i < count; ++i) {
        if (i + 1 < count) load_k(i + 1);
        load_v(i);
      }
    }
  } else {
    // --------------------------------------------------------------------------------------------
    // Consumers
    // --------------------------------------------------------------------------------------------
    setmaxnreg_inc<Cfg::kConsumerRegs>();
    const int consumer = warpgroup - 1;  // 0 or 1: rows 64 * consumer .. + 63 of the tile
    const int consumer_tid = tid - 128;  // 0..255
    const int wg_tid = tid % 128;  // 0..127 within the warpgroup
    const int warp = wg_tid / 32;  // 16-row slab of the warpgroup's 64 rows
    const int lane = tid % 32;
    const int quad_col = lane % 4;  // t: columns 2t, 2t+1 of each 8-column block
    const int quad_row = lane / 4;  // g: rows g and g + 8 of the warp's slab
    const float scale_log2 = p.scale_log2;  // > 0 (the host only dispatches positive scales)

    float o[64];
    float s[64];
    // P as the A operand of P V: k-step kk (keys 16kk..16kk+15) in p_x[4kk .. 4kk+3]. Two buffers
    // used in turn: P_i is packed while P_{i-1} V_{i-1} still reads the other one, so the compiler
    // never has a reason to wait for that GEMM before the softmax (it would put the new P into the
    // registers the tensor cores are reading and hoist the wait above the exp2s).
    uint32_t p_even[32], p_odd[32];
#pragma unroll
    for (int e = 0; e < 64; ++e) o[e] = 0.f;
#pragma unroll
    for (int e = 0; e < 32; ++e) p_even[e] = p_odd[e] = 0u;
    // Running max of the raw scores (scale not applied) and sum of exp2 for this thread's two rows:
    // i = 0 is row g, i = 1 row g + 8 (accumulator elements 4j + 0,1 and 4j + 2,3).
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.f, 0.f};

    // One arrival per warp on an "empty" barrier, once the whole warp is done with the stage.
    auto release = [&](uint32_t bar) {
      __syncwarp();
      if (lane == 0) mbarrier_arrive(bar);
    };
    auto take_turn = [&]() { named_barrier_sync(Cfg::kTurnBarrier + consumer, 256); };
    auto pass_turn = [&]() { named_barrier_arrive(Cfg::kTurnBarrier + (consumer ^ 1), 256); };

    const uint32_t q_rows = sQ + consumer * Cfg::kWarpgroupRowBytes;
    auto issue_s = [&](int stage) {
      const uint32_t k_tile = sK(stage);
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        const uint32_t offset = (kk / 4) * kHalf + (kk % 4) * 32;  // 16 channels = 32 bytes
        const uint64_t desc_q = make_smem_desc_sw128(q_rows + offset, 16, 1024);
        const uint64_t desc_k = make_smem_desc_sw128(k_tile + offset, 16, 1024);
        wgmma_m64n128k16_ss<T>(s, desc_q, desc_k, kk > 0 ? 1 : 0);
      }
    };
    auto issue_pv = [&](int stage, const uint32_t (&pa)[32]) {
      const uint32_t v_tile = sV(stage);
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        // Keys 16kk..16kk+15 are rows 16kk.. of both halves; the two 64-channel halves are the N
        // column blocks (leading byte offset = one half), 8-key groups are 1024 bytes apart.
        const uint64_t desc_v = make_smem_desc_sw128(v_tile + kk * 16 * 128, kHalf, 1024);
        const uint32_t a[4] = {pa[4 * kk], pa[4 * kk + 1], pa[4 * kk + 2], pa[4 * kk + 3]};
        wgmma_m64n128k16_rs_tb<T>(o, a, desc_v);
      }
    };

    // Online softmax of S for key tile i of the split; returns the rescale factors of O in corr.
    auto softmax = [&](int i, float (&corr)[2]) {
      const int keys_valid = ks.length - (n_begin + i) * kBlockN;  // >= 1
      if (keys_valid < kBlockN) {
#pragma unroll
        for (int j = 0; j < 16; ++j) {
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            if (j * 8 + 2 * quad_col + (q & 1) >= keys_valid) s[4 * j + q] = -INFINITY;
          }
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float tile_max = row_max[r];
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          tile_max = fmaxf(tile_max, fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
        }
        tile_max = quad_max(tile_max);
        // While every score seen is -inf the max is -inf; 0 keeps exp2(-inf - max) = 0, not NaN.
        const float max_scaled = tile_max == -INFINITY ? 0.f : tile_max * scale_log2;
        corr[r] = exp2_approx(row_max[r] * scale_log2 - max_scaled);  // 0 on the first tile
        row_max[r] = tile_max;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          s[4 * j + 2 * r] = exp2_approx(fmaf(s[4 * j + 2 * r], scale_log2, -max_scaled));
          s[4 * j + 2 * r + 1] = exp2_approx(fmaf(s[4 * j + 2 * r + 1], scale_log2, -max_scaled));
          sum += s[4 * j + 2 * r] + s[4 * j + 2 * r + 1];
        }
        row_sum[r] = row_sum[r] * corr[r] + sum;
      }
    };
    auto pack_p = [&](uint32_t (&pa)[32]) {
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          pa[4 * kk + r] = pack2<T>(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
        }
      }
    };
    auto rescale_o = [&](const float (&corr)[2]) {
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        o[4 * j + 0] *= corr[0];
        o[4 * j + 1] *= corr[0];
        o[4 * j + 2] *= corr[1];
        o[4 * j + 3] *= corr[1];
      }
    };

    if (count > 0 && box_rows < kBlockM) {
      // Rows the Q box does not fill: zero them, so that they compute finite scores (never
      // stored), before the consumers' first wgmma.
      zero_tile_rows(sQ, kHalf, box_rows, kBlockM, consumer_tid, Cfg::kConsumerThreads);
      named_barrier_sync(Cfg::kConsumersBarrier, Cfg::kConsumerThreads);
    }
    if (count > 0) {
      if (consumer == 1) pass_turn();  // consumer 0 issues first
      mbarrier_wait(q_full, 0);

      // Key tile 0: S only (its P V is issued with the next tile's S).
      mbarrier_wait(k_full(0), 0);
      take_turn();
      wgmma_fence();
      issue_s(0);
      wgmma_commit();
      pass_turn();
      wgmma_wait<0>();
      fence_operands(s);
      release(k_empty(0));
      {
        float corr[2];
        softmax(0, corr);  // O is still 0: nothing to rescale
      }
      pack_p(p_even);

      // Key tile i >= 1: S_i and P_{i-1} V_{i-1}, with P_{i-1} in `cur`; P_i goes to `next`.
      auto step = [&](int i, uint32_t (&cur)[32], uint32_t (&next)[32]) {
        const int stage = i % kStages;
        const int prev = (i - 1) % kStages;
        mbarrier_wait(k_full(stage), (i / kStages) & 1);
        mbarrier_wait(v_full(prev), ((i - 1) / kStages) & 1);
        take_turn();
        wgmma_fence();
        issue_s(stage);
        wgmma_commit();
        issue_pv(prev, cur);
        wgmma_commit();
        pass_turn();
        wgmma_wait<1>();  // S_i done; P_{i-1} V_{i-1} may still run
        fence_operands(s);
        release(k_empty(stage));
        float corr[2];
        softmax(i, corr);
        pack_p(next);
        // Pin the softmax results before the wait so the compiler cannot sink the exp2s below it:
        // they are what overlaps with P_{i-1} V_{i-1} on the tensor cores.
        fence_operands(next);
        fence_operands(corr);
        fence_operands(row_sum);
        // The row sums are never 0 (the row max contributes exp2(0) = 1; a NaN is not 0 either),
        // and if one were, the only effect would be a 0 ns sleep.
        schedule_barrier(__float_as_uint(row_sum[0]) | __float_as_uint(row_sum[1]));
        wgmma_wait<0>();
        fence_operands(o);
        fence_operands(cur);
        release(v_empty(prev));
        rescale_o(corr);
      };
      // Unrolled by two so the buffers alternate at compile time (registers cannot be indexed at
      // run time).
      int i = 1;
      for (; i + 1 < count; i += 2) {
        step(i, p_even, p_odd);
        step(i + 1, p_odd, p_even);
      }
      const bool last_in_odd = i < count;
      if (last_in_odd) step(i, p_even, p_odd);

      // The last tile's P V.
      const int last = (count - 1) % kStages;
      mbarrier_wait(v_full(last), ((count - 1) / kStages) & 1);
      const int last_valid = ks.length - (n_end - 1) * kBlockN;
      if (last_valid < kBlockN) {
        // Zero V rows past the segment end (both halves), split over the 256 consumer threads.
        zero_tile_rows(sV(last), kHalf, last_valid, kBlockN, consumer_tid, Cfg::kConsumerThreads);
        named_barrier_sync(Cfg::kConsumersBarrier, Cfg::kConsumerThreads);
      }
      auto last_pv = [&](uint32_t (&pa)[32]) {
        take_turn();
        wgmma_fence();
        issue_pv(last, pa);
        wgmma_commit();
        pass_turn();
        wgmma_wait<0>();
        fence_operands(o);
        fence_operands(pa);
      };
      // (Each branch a complete commit/wait sequence: ptxas wants every wgmma group closed on
      // the path that opened it.)
      if (last_in_odd) {
        last_pv(p_odd);
      } else {
        last_pv(p_even);
      }
      release(v_empty(last));
      // Consumer 1 passed the turn once more than consumer 0 took it (its first pass_turn): take
      // it, so no named barrier is left half-arrived when the CTA exits.
      if (consumer == 0) take_turn();
    }

    // --------------------------------------------------------------------------------------------
    // Epilogue
    // --------------------------------------------------------------------------------------------
    float inv_sum[2], lse[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = quad_sum(row_sum[r]);
      // sum == 0: no keys. A NaN input makes sum NaN, and NaN must reach the output, not a 0.
      inv_sum[r] = sum != 0.f ? 1.f / sum : 0.f;
      lse[r] = sum != 0.f ? (row_max[r] * scale_log2 + log2f(sum)) * kLn2 : -INFINITY;
    }
    // Tile row -> its token in the segment, or -1 for a row not to be written (past the
    // segment's end, or past the rows the Q box fills); and its query head.
    auto row_token = [&](int tile_row) {
      const int token = token0 + tile_row / rows_per_query;
      return tile_row < box_rows && token < qs.length ? token : -1;
    };
    auto row_head = [&](int tile_row) { return first_head + tile_row % rows_per_query; };
    const int wg_row0 = consumer * Cfg::kRowsPerWarpgroup;  // tile row of the slab's row 0

    // The lse, from one thread per quad.
    if (quad_col == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int tile_row = wg_row0 + warp * 16 + quad_row + 8 * r;
        const int token = row_token(tile_row);
        if (token >= 0) {
          const int64_t at =
              static_cast<int64_t>(row_head(tile_row)) * p.total_q + qs.begin + token;
          if (p.num_splits == 1) {
            p.lse[at] = lse[r];
          } else {
            p.lse_partial[static_cast<int64_t>(split) * p.num_heads_q * p.total_q + at] = lse[r];
          }
        }
      }
    }

    const AccumulatorLane acc_lane{wg_tid, warp, quad_row, quad_col};
    if (p.num_splits > 1) {  // fp32 partial O / l, [split][head][token] rows
      store_accumulator_fp32_rows(
          [&](int row) -> float* {
            const int token = row_token(wg_row0 + row);
            if (token < 0) return nullptr;
            const int64_t at =
                (static_cast<int64_t>(split) * p.num_heads_q + row_head(wg_row0 + row)) *
                    p.total_q +
                qs.begin + token;
            return p.out_partial + at * kHeadDim;
          },
          o, inv_sum, acc_lane);
    } else {
      // O / l as T through this warpgroup's 64 rows of the Q buffer (its own S GEMMs are all
      // done, and the other warpgroup never reads these rows), swizzled as Q.
      T* const out = static_cast<T*>(p.out);
      store_accumulator_staged_rows<T>(
          [&](int row) -> T* {
            const int token = row_token(wg_row0 + row);
            if (token < 0) return nullptr;
            return out + static_cast<int64_t>(qs.begin + token) * p.out_token_stride +
                   static_cast<int64_t>(row_head(wg_row0 + row)) * p.out_head_stride;
          },
          q_rows, kHalf, o, inv_sum, acc_lane, Cfg::kWarpgroupBarrier + consumer);
    }
  }
#elif defined(__CUDA_ARCH__)
  // Compiled for a target without wgmma/TMA: the host never launches this (it checks the device
  // and the build's architectures); fail loudly if it ever happens.
  __trap();
#endif
}

}  // namespace attention
}  // namespace crosslmm
