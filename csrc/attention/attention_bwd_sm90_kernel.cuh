// Cross-attention backward for Hopper (sm_90a): the dK/dV kernel on wgmma + TMA, warp-specialised,
// after FlashAttention-3's backward design (written from the PTX ISA, no CUTLASS). Same contract as
// the mma.sync dK/dV kernel (attention_bwd_kernel.cuh): packed varlen segments, GQA (a kv head's
// gradients sum over every query head of its group), no atomics, every output element written
// once after a fixed-order loop (bitwise deterministic). Head dim 128, fp16/bf16. The Delta
// preprocess and the dQ pass are the mma.sync kernels (attention_bwd_sm90_launch.cuh).
//
// With S = q k^T, P = exp(S * scale - lse), Delta = rowsum(dout * out), per key tile:
//   dV = P^T dO,   dP = dO V^T,   dS = P * (dP - Delta),   dK = scale * dS^T Q
// computed on the transposed problem (keys as the M dimension) so a warpgroup's accumulators are
// exactly its own keys' rows of dK and dV.
//
// CTA = (128-key tile, kv head, segment), 3 warpgroups:
//   warpgroup 0, producer: thread 0 loads K and V (128 keys x 128 channels) once by TMA, then
//       streams the query tiles (64 query rows x 128 channels of Q and of dO) by TMA into a
//       kStages-deep ring. The tiles walk the kv head's group head by head (head-major: a TMA box
//       is 64 consecutive tokens of one head), 64 query rows at a time. Per stage: qdo_full (TMA
//       bytes), empty (one arrival per consumer warp, 8).
//   warpgroups 1 and 2, consumers: keys 64c .. 64c + 63 of the tile each. Per query tile:
//         S^T  = K Q^T            wgmma m64n64k16 x 8, K and Q from shared memory (K-major)
//         dP^T = V dO^T           wgmma m64n64k16 x 8, V and dO from shared memory (K-major)
//         P^T  = exp2(S^T * scale log2 e - lse log2 e)        (while dP^T is on the tensor cores)
//         dV  += P^T dO           wgmma m64n128k16 x 4, P^T from registers (the S^T accumulator
//                                 layout is the A-register layout), dO from shared memory as an
//                                 MN-major operand (rows = query rows = the K dimension)
//         dS^T = P^T * (dP^T - Delta)                          (while dV's GEMM runs)
//         dK  += dS^T Q           wgmma m64n128k16 x 4, the same with Q
//       then release the stage. The two consumer warpgroups run unsynchronised, so one's exp2 /
//       elementwise work overlaps the other's GEMMs. Each consumer warpgroup stages its own copy
//       of the tile's lse (log2 units, +inf for rows past the segment end, so their P is exactly
//       0) and Delta: thread r < 64 loads row r's lse, thread 64 + r its Delta, one tile ahead
//       (into a register, so the global load's latency hides behind a whole tile), stores it at
//       the tile's start into one of two buffers, and the warpgroup meets at a named barrier
//       before reading. Double buffering makes that one barrier per tile enough: buffer b is
//       rewritten two tiles later, after every thread has passed the next tile's barrier, i.e.
//       finished reading. (An earlier version had a producer warp write the stats and signal an
//       mbarrier: correct, but compute-sanitizer's racecheck reported it, as it does not follow
//       mbarrier ordering of plain shared-memory stores.)
//
// Shared memory (1024-byte aligned): K, V (32 KB each: two [128 keys][64 channels] halves), then
// Q[kStages], dO[kStages] (16 KB each: two [64 rows][64 channels] halves), all in TMA's 128-byte
// swizzle (the canonical wgmma layout, see make_smem_desc_sw128), then the consumers' lse / Delta
// buffers [consumer][2][lse 64 | Delta 64] fp32, then the mbarriers.
//
// Segment edges. TMA zero-fills only past the end of the whole tensor, so a query tile's rows may
// run into the next segment: the consumers zero those rows of Q and dO in shared memory before
// using a partial tile (so S = dP = 0 there even if the neighbour holds inf/NaN), and their lse is
// +inf and Delta 0, so P = dS = 0 exactly. Keys past the segment end need nothing: a key's dK / dV
// row depends only on that key's own row of S^T / dP^T, and those rows are never stored.
//
// Epilogue: dK * scale and dV rounded to T are staged through the warpgroup's own (finished) rows
// of the K and V buffers and written with 16-byte stores. A segment without queries runs no
// GEMM and writes dK = dV = 0.
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
struct Sm90BackwardDkDvConfig {
  static_assert(kHeadDim == 128, "the sm90 backward is written for head dim 128");
  static_assert(kStages >= 2, "the query-tile ring needs at least two stages");
  static constexpr int kBlockN = 128;  // keys per CTA (2 consumer warpgroups x 64)
  static constexpr int kBlockM = 64;   // query rows per step
  static constexpr int kThreads = 384;
  static constexpr int kConsumerThreads = 256;
  static constexpr int kKeysPerWarpgroup = 64;
  static constexpr int kKVHalfBytes = kBlockN * 64 * 2;  // [128 keys][64 channels]
  static constexpr int kKVTileBytes = 2 * kKVHalfBytes;
  static constexpr int kRowHalfBytes = kBlockM * 64 * 2;  // [64 rows][64 channels]
  static constexpr int kRowTileBytes = 2 * kRowHalfBytes;
  static constexpr int kKOffset = 0;
  static constexpr int kVOffset = kKVTileBytes;
  static constexpr int kQOffset = 2 * kKVTileBytes;
  static constexpr int kDOOffset = kQOffset + kStages * kRowTileBytes;
  static constexpr int kStatsOffset = kDOOffset + kStages * kRowTileBytes;
  static constexpr int kStatsBytes = 2 * 2 * 2 * kBlockM * 4;  // [consumer][buffer][lse | Delta]
  static constexpr int kBarrierOffset = kStatsOffset + kStatsBytes;
  static constexpr int kNumBarriers = 1 + 2 * kStages;  // kv_full; qdo_full, empty
  // + 1024: the dynamic shared memory base is only 16-byte aligned; the kernel rounds it up.
  static constexpr int kSmemBytes = kBarrierOffset + 8 * kNumBarriers + 1024;
  // Register split (setmaxnreg): 128 * 24 + 256 * 240 = 64512 <= 65536, the launch's 384 * 168.
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  // Named barriers (0 is __syncthreads): the consumers together, each consumer warpgroup alone.
  static constexpr uint32_t kConsumersBarrier = 1;
  static constexpr uint32_t kWarpgroupBarrier = 2;  // + consumer index
};

// exp2 on the MUFU unit (results below 2^-126 flush to 0). Same as the forward's exp2_approx,
// under another name so both kernel headers can be included together.
__device__ __forceinline__ float bwd_exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

template <typename T, int kHeadDim, int kStages>
__global__ void __launch_bounds__(384, 1)
    attention_backward_dkdv_sm90_kernel(const __grid_constant__ AttentionBackwardParams p,
                                        const __grid_constant__ CUtensorMap tmap_q,
                                        const __grid_constant__ CUtensorMap tmap_dout,
                                        const __grid_constant__ CUtensorMap tmap_k,
                                        const __grid_constant__ CUtensorMap tmap_v,
                                        const int num_key_tiles) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = Sm90BackwardDkDvConfig<kHeadDim, kStages>;
  using namespace sm90;
  constexpr int kBlockN = Cfg::kBlockN;
  constexpr int kBlockM = Cfg::kBlockM;
  constexpr uint32_t kKVHalf = Cfg::kKVHalfBytes;
  constexpr uint32_t kRowHalf = Cfg::kRowHalfBytes;

  // Key tile fastest, then the kv head, then the segment.
  int64_t cta = blockIdx.x;
  const int n_block = static_cast<int>(cta % num_key_tiles);
  cta /= num_key_tiles;
  const int kv_head = static_cast<int>(cta % p.num_heads_k);
  const int b = static_cast<int>(cta / p.num_heads_k);

  const Segment ks = segment_bounds(p.cu_seqlens_k, b, p.total_k);
  const int key0 = n_block * kBlockN;
  if (key0 >= ks.length) return;  // uniform over the CTA, before any barrier exists
  const Segment qs = segment_bounds(p.cu_seqlens_q, b, p.total_q);
  const int group = p.num_heads_q / p.num_heads_k;
  const int first_head = kv_head * group;
  const int m_tiles = ceil_div_int(qs.length, kBlockM);  // per query head
  const int count = m_tiles * group;                      // query tiles; 0: no queries

  extern __shared__ __align__(16) unsigned char smem_raw[];  // aligned by hand below
  const uint32_t raw_addr = smem_u32(smem_raw);
  const uint32_t base = (raw_addr + 1023u) & ~1023u;  // swizzle atoms need 1024-byte alignment
  unsigned char* const base_ptr = smem_raw + (base - raw_addr);
  const uint32_t sK = base + Cfg::kKOffset;
  const uint32_t sV = base + Cfg::kVOffset;
  auto sQ = [&](int stage) { return base + Cfg::kQOffset + stage * Cfg::kRowTileBytes; };
  auto sdO = [&](int stage) { return base + Cfg::kDOOffset + stage * Cfg::kRowTileBytes; };
  float* const s_stats = reinterpret_cast<float*>(base_ptr + Cfg::kStatsOffset);
  const uint32_t bars = base + Cfg::kBarrierOffset;
  const uint32_t kv_full = bars;
  auto qdo_full = [&](int stage) { return bars + 8u * (1 + stage); };
  auto empty = [&](int stage) { return bars + 8u * (1 + kStages + stage); };

  const int tid = static_cast<int>(threadIdx.x);
  const int warpgroup = tid / 128;
  const int lane = tid % 32;

  if (tid == 0) {
    mbarrier_init(kv_full, 1);
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(qdo_full(s), 1);     // the producer's arrive.expect_tx, then the TMA bytes
      mbarrier_init(empty(s), 8);        // one arrival per consumer warp
    }
    fence_barrier_init();
  }
  __syncthreads();  // the only CTA-wide barrier; after it the warpgroups go their own ways

  if (warpgroup == 0) {
    // ------------------------------------------------------------------------------------------
    // Producer
    // ------------------------------------------------------------------------------------------
    setmaxnreg_dec<Cfg::kProducerRegs>();
    const int warp = tid / 32;
    // Tile i of the walk is query head first_head + i / m_tiles, rows (i % m_tiles) * 64 .. + 63
    // of the segment; it goes to stage i % kStages, whose use u = i / kStages waits until the
    // consumers released use u - 1 (parity (u & 1) ^ 1 passes at once for u = 0).
    if (warp == 0 && lane == 0 && count > 0) {
      tma_prefetch_descriptor(&tmap_q);
      tma_prefetch_descriptor(&tmap_dout);
      tma_prefetch_descriptor(&tmap_k);
      tma_prefetch_descriptor(&tmap_v);
      const int key_row = ks.begin + key0;
      mbarrier_arrive_expect_tx(kv_full, 2 * Cfg::kKVTileBytes);
      tma_load_3d(sK, &tmap_k, kv_full, 0, kv_head, key_row);
      tma_load_3d(sK + kKVHalf, &tmap_k, kv_full, 64, kv_head, key_row);
      tma_load_3d(sV, &tmap_v, kv_full, 0, kv_head, key_row);
      tma_load_3d(sV + kKVHalf, &tmap_v, kv_full, 64, kv_head, key_row);
      for (int i = 0; i < count; ++i) {
        const int stage = i % kStages;
        const int head = first_head + i / m_tiles;
        const int row = qs.begin + (i % m_tiles) * kBlockM;
        mbarrier_wait(empty(stage), ((i / kStages) & 1) ^ 1);
        mbarrier_arrive_expect_tx(qdo_full(stage), 2 * Cfg::kRowTileBytes);
        tma_load_3d(sQ(stage), &tmap_q, qdo_full(stage), 0, head, row);
        tma_load_3d(sQ(stage) + kRowHalf, &tmap_q, qdo_full(stage), 64, head, row);
        tma_load_3d(sdO(stage), &tmap_dout, qdo_full(stage), 0, head, row);
        tma_load_3d(sdO(stage) + kRowHalf, &tmap_dout, qdo_full(stage), 64, head, row);
      }
    }
  } else {
    // --------------------------------------------------------------------------------------------
    // Consumers
    // --------------------------------------------------------------------------------------------
    setmaxnreg_inc<Cfg::kConsumerRegs>();
    const int consumer = warpgroup - 1;  // keys 64 * consumer .. + 63 of the tile
    const int consumer_tid = tid - 128;  // 0..255
    const int wg_tid = tid % 128;
    const int warp = wg_tid / 32;  // 16-key slab of the warpgroup's 64 keys
    const int quad_col = lane % 4;  // t: columns 2t, 2t+1 of each 8-column block
    const int quad_row = lane / 4;  // g: rows g and g + 8 of the warp's slab
    const float scale_log2 = p.scale_log2;

    float dk[64], dv[64];
#pragma unroll
    for (int e = 0; e < 64; ++e) dk[e] = dv[e] = 0.f;

    // This warpgroup's 64 rows of each K / V half.
    const uint32_t k_rows = sK + consumer * Cfg::kKeysPerWarpgroup * 128;
    const uint32_t v_rows = sV + consumer * Cfg::kKeysPerWarpgroup * 128;

    // Query tile j's lse (log2 units; +inf past the segment end) for wg_tid < 64, else its Delta
    // (0 past the end), row wg_tid % 64: what this thread stages for tile j.
    auto load_stat = [&](int j) {
      const int head = first_head + j / m_tiles;
      const int row = (j % m_tiles) * kBlockM + wg_tid % 64;
      const bool is_lse = wg_tid < 64;
      if (row >= qs.length) return is_lse ? INFINITY : 0.f;
      const int64_t at = static_cast<int64_t>(head) * p.total_q + qs.begin + row;
      return is_lse ? p.lse[at] * kLog2e : p.delta[at];
    };
    float* const my_stats = s_stats + consumer * 2 * 2 * kBlockM;  // [buffer][lse 64 | Delta 64]

    if (count > 0) {
      float stat_next = load_stat(0);
      mbarrier_wait(kv_full, 0);
      for (int i = 0; i < count; ++i) {
        const int stage = i % kStages;
        const uint32_t parity = (i / kStages) & 1;
        const uint32_t q_tile = sQ(stage);
        const uint32_t do_tile = sdO(stage);
        float* const stats = my_stats + (i % 2) * 2 * kBlockM;
        stats[wg_tid] = stat_next;
        if (i + 1 < count) stat_next = load_stat(i + 1);  // used at the next tile's start
        named_barrier_sync(Cfg::kWarpgroupBarrier + consumer, 128);  // the stats are in place
        const float* const lse_log2 = stats;
        const float* const delta = stats + kBlockM;
        mbarrier_wait(qdo_full(stage), parity);

        const int rows_valid = qs.length - (i % m_tiles) * kBlockM;  // >= 1
        if (rows_valid < kBlockM) {
          // Zero rows past the segment end of Q and dO (both halves), split over both consumer
          // warpgroups (they read the same tile), before either issues a GEMM on it.
          // 16-byte chunks: 8 per row, half and tensor.
          const int chunks = (kBlockM - rows_valid) * 32;
          for (int idx = consumer_tid; idx < chunks; idx += Cfg::kConsumerThreads) {
            const int row = rows_valid + idx / 32;
            const int chunk = idx % 32;  // tensor (chunk / 16), half (chunk / 8 % 2), 16 B piece
            const uint32_t tile = chunk < 16 ? q_tile : do_tile;
            const uint32_t addr =
                tile + ((chunk / 8) % 2) * kRowHalf + row * 128 + (chunk % 8) * 16;
            asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0u)
                         : "memory");
          }
          fence_proxy_async_shared();
          named_barrier_sync(Cfg::kConsumersBarrier, Cfg::kConsumerThreads);
        }

        // S^T = K Q^T and dP^T = V dO^T: 64 keys x 64 query rows each, 8 k-steps of 16 channels.
        float st[32], dpt[32];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kHeadDim / 16; ++kk) {
          const uint32_t key_off = (kk / 4) * kKVHalf + (kk % 4) * 32;
          const uint32_t row_off = (kk / 4) * kRowHalf + (kk % 4) * 32;
          wgmma_m64n64k16_ss<T>(st, make_smem_desc_sw128(k_rows + key_off, 16, 1024),
                                make_smem_desc_sw128(q_tile + row_off, 16, 1024), kk > 0 ? 1 : 0);
        }
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < kHeadDim / 16; ++kk) {
          const uint32_t key_off = (kk / 4) * kKVHalf + (kk % 4) * 32;
          const uint32_t row_off = (kk / 4) * kRowHalf + (kk % 4) * 32;
          wgmma_m64n64k16_ss<T>(dpt, make_smem_desc_sw128(v_rows + key_off, 16, 1024),
                                make_smem_desc_sw128(do_tile + row_off, 16, 1024), kk > 0 ? 1 : 0);
        }
        wgmma_commit();
        wgmma_wait<1>();  // S^T done; dP^T may still run
        fence_operands(st);

        // P^T = exp2(S^T * scale log2 e - lse log2 e); column = query row of the tile.
        uint32_t pa[16];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float2 l = *reinterpret_cast<const float2*>(lse_log2 + 8 * j + 2 * quad_col);
          st[4 * j + 0] = bwd_exp2_approx(fmaf(st[4 * j + 0], scale_log2, -l.x));
          st[4 * j + 1] = bwd_exp2_approx(fmaf(st[4 * j + 1], scale_log2, -l.y));
          st[4 * j + 2] = bwd_exp2_approx(fmaf(st[4 * j + 2], scale_log2, -l.x));
          st[4 * j + 3] = bwd_exp2_approx(fmaf(st[4 * j + 3], scale_log2, -l.y));
        }
        // As the A operand: k-step kk (query rows 16kk .. 16kk + 15) in pa[4kk .. 4kk + 3].
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            pa[4 * kk + r] = pack2<T>(st[8 * kk + 2 * r], st[8 * kk + 2 * r + 1]);
          }
        }

        // dV += P^T dO: dO as the MN-major B operand (K = query rows, 16 per step = 2048 bytes
        // into both halves; leading byte offset = one 64-channel half, stride = 8 rows).
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBlockM / 16; ++kk) {
          const uint32_t a[4] = {pa[4 * kk], pa[4 * kk + 1], pa[4 * kk + 2], pa[4 * kk + 3]};
          wgmma_m64n128k16_rs_tb<T>(dv, a, make_smem_desc_sw128(do_tile + kk * 16 * 128,
                                                                kRowHalf, 1024));
        }
        wgmma_commit();
        wgmma_wait<1>();  // dP^T done; dV's GEMM may still run
        fence_operands(dpt);

        // dS^T = P^T * (dP^T - Delta).
        uint32_t da[16];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float2 dl = *reinterpret_cast<const float2*>(delta + 8 * j + 2 * quad_col);
          dpt[4 * j + 0] = st[4 * j + 0] * (dpt[4 * j + 0] - dl.x);
          dpt[4 * j + 1] = st[4 * j + 1] * (dpt[4 * j + 1] - dl.y);
          dpt[4 * j + 2] = st[4 * j + 2] * (dpt[4 * j + 2] - dl.x);
          dpt[4 * j + 3] = st[4 * j + 3] * (dpt[4 * j + 3] - dl.y);
        }
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            da[4 * kk + r] = pack2<T>(dpt[8 * kk + 2 * r], dpt[8 * kk + 2 * r + 1]);
          }
        }

        // dK += dS^T Q (the softmax scale is applied once, in the epilogue).
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBlockM / 16; ++kk) {
          const uint32_t a[4] = {da[4 * kk], da[4 * kk + 1], da[4 * kk + 2], da[4 * kk + 3]};
          wgmma_m64n128k16_rs_tb<T>(dk, a, make_smem_desc_sw128(q_tile + kk * 16 * 128,
                                                                kRowHalf, 1024));
        }
        wgmma_commit();
        wgmma_wait<0>();
        fence_operands(dv);
        fence_operands(dk);
        fence_operands(pa);
        fence_operands(da);

        // Release the stage: one arrival per warp once the whole warp is done with it.
        __syncwarp();
        if (lane == 0) mbarrier_arrive(empty(stage));
      }
    }

    // --------------------------------------------------------------------------------------------
    // Epilogue: dK * scale and dV as T, staged through this warpgroup's own 64 rows of the K and V
    // buffers (its GEMMs are done, the other warpgroup never reads these rows) in the same swizzled
    // layout: element (key r, channel 8j + 2t) at half j / 8, chunk (j % 8) ^ (r % 8); r % 8 = g.
    // --------------------------------------------------------------------------------------------
    fence_proxy_async_shared();  // the wgmmas' (async-proxy) reads before the ordinary stores
    const float scale = p.softmax_scale;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp * 16 + quad_row + 8 * r;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        const uint32_t off =
            (j / 8) * kKVHalf + row * 128 + (((j % 8) ^ quad_row) << 4) + 4 * quad_col;
        const uint32_t k_bits = pack2<T>(dk[4 * j + 2 * r] * scale, dk[4 * j + 2 * r + 1] * scale);
        const uint32_t v_bits = pack2<T>(dv[4 * j + 2 * r], dv[4 * j + 2 * r + 1]);
        asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(k_rows + off), "r"(k_bits) : "memory");
        asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(v_rows + off), "r"(v_bits) : "memory");
      }
    }
    named_barrier_sync(Cfg::kWarpgroupBarrier + consumer, 128);

    // 64 keys x 16 chunks of 16 bytes per tensor; 16 consecutive threads write one 256-byte row.
    const int wg_key0 = key0 + consumer * Cfg::kKeysPerWarpgroup;  // segment key of row 0
    T* const dk_out = static_cast<T*>(p.dk) + static_cast<int64_t>(kv_head) * p.dk_head_stride;
    T* const dv_out = static_cast<T*>(p.dv) + static_cast<int64_t>(kv_head) * p.dv_head_stride;
#pragma unroll
    for (int it = 0; it < (Cfg::kKeysPerWarpgroup * 16) / 128; ++it) {
      const int idx = it * 128 + wg_tid;
      const int row = idx / 16;
      const int chunk = idx % 16;
      if (wg_key0 + row >= ks.length) continue;
      const uint32_t off = (chunk / 8) * kKVHalf + row * 128 + (((chunk % 8) ^ (row % 8)) << 4);
      const int64_t token = static_cast<int64_t>(ks.begin) + wg_key0 + row;
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        uint32_t v[4];
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3])
                     : "r"((t == 0 ? k_rows : v_rows) + off)
                     : "memory");
        Vec8<T> value;
        memcpy(&value, v, sizeof(value));
        T* const dst = t == 0 ? dk_out + token * p.dk_token_stride + chunk * 8
                              : dv_out + token * p.dv_token_stride + chunk * 8;
        *reinterpret_cast<Vec8<T>*>(dst) = value;
      }
    }
  }
#elif defined(__CUDA_ARCH__)
  // Compiled for a target without wgmma/TMA: the host never launches this (it checks the device
  // and the build's architectures); fail loudly if it ever happens.
  __trap();
#endif
}


// ---------------------------------------------------------------------------------------------
// dQ on wgmma + TMA: the forward's shape of kernel. CTA = (128 query rows of one query head, head,
// key split, segment), producer warpgroup + 2 consumer warpgroups of 64 rows; Q and dO loaded once,
// 64-key K / V tiles streamed through a kStages-deep ring (k_full: TMA bytes of K and V; empty: one
// arrival per consumer warp). Per key tile each consumer warpgroup:
//   S  = Q K^T        wgmma m64n64k16 x 8 (Q, K from shared memory, K-major)
//   dP = dO V^T       wgmma m64n64k16 x 8
//   P  = exp2(S * scale log2 e - lse log2 e), dS = P * (dP - Delta), both 0 for keys past the
//        segment end (a select, so inf / NaN in a neighbouring segment's K / V cannot leak in)
//   dQ += dS K        wgmma m64n128k16 x 4, dS from registers, K as the MN-major B operand
// The last tile's K rows past the segment end are zeroed in shared memory first (dS is 0 there, but
// 0 * inf would be NaN). Query rows past the segment end are computed and never stored (a row's dQ
// depends only on its own Q / dO / lse / Delta). With one split, dQ * scale is written as T through
// the warpgroup's Q rows (16-byte stores); with several, each split writes its fp32 partial
// dQ * scale to [split][Hq][total_q][128] and attention_backward_dq_sum_kernel adds the splits in
// split order (deterministic).
// ---------------------------------------------------------------------------------------------

template <int kHeadDim, int kStages>
struct Sm90BackwardDqConfig {
  static_assert(kHeadDim == 128, "the sm90 backward is written for head dim 128");
  static_assert(kStages >= 2, "the K/V ring needs at least two stages");
  static constexpr int kBlockM = 128;  // query rows per CTA (2 consumer warpgroups x 64)
  static constexpr int kBlockN = 64;   // keys per K/V tile
  static constexpr int kThreads = 384;
  static constexpr int kConsumerThreads = 256;
  static constexpr int kRowsPerWarpgroup = 64;
  static constexpr int kRowHalfBytes = kBlockM * 64 * 2;  // [128 rows][64 channels]
  static constexpr int kRowTileBytes = 2 * kRowHalfBytes;
  static constexpr int kKVHalfBytes = kBlockN * 64 * 2;  // [64 keys][64 channels]
  static constexpr int kKVTileBytes = 2 * kKVHalfBytes;
  static constexpr int kQOffset = 0;
  static constexpr int kDOOffset = kRowTileBytes;
  static constexpr int kKOffset = 2 * kRowTileBytes;
  static constexpr int kVOffset = kKOffset + kStages * kKVTileBytes;
  static constexpr int kBarrierOffset = kVOffset + kStages * kKVTileBytes;
  static constexpr int kNumBarriers = 1 + 2 * kStages;  // q_full; kv_full, empty
  static constexpr int kSmemBytes = kBarrierOffset + 8 * kNumBarriers + 1024;
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  static constexpr uint32_t kConsumersBarrier = 1;
  static constexpr uint32_t kWarpgroupBarrier = 2;  // + consumer index
};

template <typename T, int kHeadDim, int kStages>
__global__ void __launch_bounds__(384, 1)
    attention_backward_dq_sm90_kernel(const __grid_constant__ AttentionBackwardParams p,
                                      const __grid_constant__ CUtensorMap tmap_q,
                                      const __grid_constant__ CUtensorMap tmap_dout,
                                      const __grid_constant__ CUtensorMap tmap_k,
                                      const __grid_constant__ CUtensorMap tmap_v,
                                      const int num_m_blocks, const int num_splits,
                                      float* const dq_partial) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = Sm90BackwardDqConfig<kHeadDim, kStages>;
  using namespace sm90;
  constexpr int kBlockM = Cfg::kBlockM;
  constexpr int kBlockN = Cfg::kBlockN;
  constexpr uint32_t kRowHalf = Cfg::kRowHalfBytes;
  constexpr uint32_t kKVHalf = Cfg::kKVHalfBytes;

  // m-block fastest, then the head (CTAs side by side share K / V through L2), split, segment.
  int64_t cta = blockIdx.x;
  const int m_block = static_cast<int>(cta % num_m_blocks);
  cta /= num_m_blocks;
  const int head = static_cast<int>(cta % p.num_heads_q);
  cta /= p.num_heads_q;
  const int split = static_cast<int>(cta % num_splits);
  const int b = static_cast<int>(cta / num_splits);

  const Segment qs = segment_bounds(p.cu_seqlens_q, b, p.total_q);
  const int m0 = m_block * kBlockM;
  if (m0 >= qs.length) return;  // uniform over the CTA, before any barrier exists
  const Segment ks = segment_bounds(p.cu_seqlens_k, b, p.total_k);
  const int kv_head = head / (p.num_heads_q / p.num_heads_k);
  const int n_blocks_segment = ceil_div_int(ks.length, kBlockN);
  const int per_split = ceil_div_int(n_blocks_segment, num_splits);
  const int n_begin = min(split * per_split, n_blocks_segment);
  const int n_end = min(n_begin + per_split, n_blocks_segment);
  const int count = n_end - n_begin;  // uniform over the CTA; 0: this split writes zeros

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw_addr = smem_u32(smem_raw);
  const uint32_t base = (raw_addr + 1023u) & ~1023u;
  const uint32_t sQ = base + Cfg::kQOffset;
  const uint32_t sdO = base + Cfg::kDOOffset;
  auto sK = [&](int stage) { return base + Cfg::kKOffset + stage * Cfg::kKVTileBytes; };
  auto sV = [&](int stage) { return base + Cfg::kVOffset + stage * Cfg::kKVTileBytes; };
  const uint32_t bars = base + Cfg::kBarrierOffset;
  const uint32_t q_full = bars;
  auto kv_full = [&](int stage) { return bars + 8u * (1 + stage); };
  auto empty = [&](int stage) { return bars + 8u * (1 + kStages + stage); };

  const int tid = static_cast<int>(threadIdx.x);
  const int warpgroup = tid / 128;
  const int lane = tid % 32;

  if (tid == 0) {
    mbarrier_init(q_full, 1);
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(kv_full(s), 1);
      mbarrier_init(empty(s), 8);
    }
    fence_barrier_init();
  }
  __syncthreads();

  if (warpgroup == 0) {
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if (tid == 0 && count > 0) {
      tma_prefetch_descriptor(&tmap_q);
      tma_prefetch_descriptor(&tmap_dout);
      tma_prefetch_descriptor(&tmap_k);
      tma_prefetch_descriptor(&tmap_v);
      const int q_row = qs.begin + m0;
      mbarrier_arrive_expect_tx(q_full, 2 * Cfg::kRowTileBytes);
      tma_load_3d(sQ, &tmap_q, q_full, 0, head, q_row);
      tma_load_3d(sQ + kRowHalf, &tmap_q, q_full, 64, head, q_row);
      tma_load_3d(sdO, &tmap_dout, q_full, 0, head, q_row);
      tma_load_3d(sdO + kRowHalf, &tmap_dout, q_full, 64, head, q_row);
      for (int i = 0; i < count; ++i) {
        const int stage = i % kStages;
        const int key_row = ks.begin + (n_begin + i) * kBlockN;
        mbarrier_wait(empty(stage), ((i / kStages) & 1) ^ 1);
        mbarrier_arrive_expect_tx(kv_full(stage), 2 * Cfg::kKVTileBytes);
        tma_load_3d(sK(stage), &tmap_k, kv_full(stage), 0, kv_head, key_row);
        tma_load_3d(sK(stage) + kKVHalf, &tmap_k, kv_full(stage), 64, kv_head, key_row);
        tma_load_3d(sV(stage), &tmap_v, kv_full(stage), 0, kv_head, key_row);
        tma_load_3d(sV(stage) + kKVHalf, &tmap_v, kv_full(stage), 64, kv_head, key_row);
      }
    }
  } else {
    setmaxnreg_inc<Cfg::kConsumerRegs>();
    const int consumer = warpgroup - 1;  // rows 64 * consumer .. + 63 of the tile
    const int consumer_tid = tid - 128;
    const int wg_tid = tid % 128;
    const int warp = wg_tid / 32;
    const int quad_col = lane % 4;
    const int quad_row = lane / 4;
    const float scale_log2 = p.scale_log2;
    const int wg_row0 = m0 + consumer * Cfg::kRowsPerWarpgroup;  // segment row of the slab's row 0

    // lse (log2 units) and Delta of this thread's rows g and g + 8 (i = 0, 1); rows past the
    // segment end get +inf / 0 (P = 0; they are never stored anyway).
    float row_lse_log2[2], row_delta[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = wg_row0 + warp * 16 + quad_row + 8 * i;
      row_lse_log2[i] = INFINITY;
      row_delta[i] = 0.f;
      if (row < qs.length && count > 0) {
        const int64_t at = static_cast<int64_t>(head) * p.total_q + qs.begin + row;
        row_lse_log2[i] = p.lse[at] * kLog2e;
        row_delta[i] = p.delta[at];
      }
    }

    float dq[64];
#pragma unroll
    for (int e = 0; e < 64; ++e) dq[e] = 0.f;
    const uint32_t q_rows = sQ + consumer * Cfg::kRowsPerWarpgroup * 128;
    const uint32_t do_rows = sdO + consumer * Cfg::kRowsPerWarpgroup * 128;

    if (count > 0) {
      mbarrier_wait(q_full, 0);
      for (int i = 0; i < count; ++i) {
        const int stage = i % kStages;
        const uint32_t k_tile = sK(stage);
        const uint32_t v_tile = sV(stage);
        mbarrier_wait(kv_full(stage), (i / kStages) & 1);
        const int keys_valid = ks.length - (n_begin + i) * kBlockN;  // >= 1
        if (keys_valid < kBlockN) {
          // Zero K rows past the segment end (both halves), split over both consumer warpgroups.
          zero_tile_rows(k_tile, kKVHalf, keys_valid, kBlockN, consumer_tid,
                         Cfg::kConsumerThreads);
          named_barrier_sync(Cfg::kConsumersBarrier, Cfg::kConsumerThreads);
        }

        float s[32], dp[32];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kHeadDim / 16; ++kk) {
          const uint32_t row_off = (kk / 4) * kRowHalf + (kk % 4) * 32;
          const uint32_t key_off = (kk / 4) * kKVHalf + (kk % 4) * 32;
          wgmma_m64n64k16_ss<T>(s, make_smem_desc_sw128(q_rows + row_off, 16, 1024),
                                make_smem_desc_sw128(k_tile + key_off, 16, 1024), kk > 0 ? 1 : 0);
        }
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < kHeadDim / 16; ++kk) {
          const uint32_t row_off = (kk / 4) * kRowHalf + (kk % 4) * 32;
          const uint32_t key_off = (kk / 4) * kKVHalf + (kk % 4) * 32;
          wgmma_m64n64k16_ss<T>(dp, make_smem_desc_sw128(do_rows + row_off, 16, 1024),
                                make_smem_desc_sw128(v_tile + key_off, 16, 1024), kk > 0 ? 1 : 0);
        }
        wgmma_commit();
        wgmma_wait<1>();  // S done; dP may still run
        fence_operands(s);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            s[4 * j + q] = bwd_exp2_approx(fmaf(s[4 * j + q], scale_log2, -row_lse_log2[q / 2]));
          }
        }
        // Keep the exp2s above the wait (they are what overlaps dP's GEMM): pin them, and end the
        // basic block on a value computed from them (never taken in practice, and if it were, a
        // 0 ns sleep), as in the forward.
        fence_operands(s);
        schedule_barrier(__float_as_uint(s[0]) | __float_as_uint(s[31]));
        wgmma_wait<0>();
        fence_operands(dp);
        uint32_t da[16];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const bool key_valid = 8 * j + 2 * quad_col + (q & 1) < keys_valid;
            dp[4 * j + q] = key_valid ? s[4 * j + q] * (dp[4 * j + q] - row_delta[q / 2]) : 0.f;
          }
        }
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            da[4 * kk + r] = pack2<T>(dp[8 * kk + 2 * r], dp[8 * kk + 2 * r + 1]);
          }
        }
        // dQ += dS K: K as the MN-major B operand (K dimension = keys, 16 per step = 2048 bytes
        // into both halves; leading byte offset = one 64-channel half, stride = 8 keys).
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          const uint32_t a[4] = {da[4 * kk], da[4 * kk + 1], da[4 * kk + 2], da[4 * kk + 3]};
          wgmma_m64n128k16_rs_tb<T>(dq, a, make_smem_desc_sw128(k_tile + kk * 16 * 128, kKVHalf,
                                                                1024));
        }
        wgmma_commit();
        wgmma_wait<0>();
        fence_operands(dq);
        fence_operands(da);
        __syncwarp();
        if (lane == 0) mbarrier_arrive(empty(stage));
      }
    }

    // Epilogue.
    const float scale = p.softmax_scale;
    const float row_scale[2] = {scale, scale};
    const AccumulatorLane acc_lane{wg_tid, warp, quad_row, quad_col};
    const int valid_rows = qs.length - wg_row0;
    if (num_splits > 1) {  // fp32 partial dQ * scale
      const int64_t partial_row0 =
          (static_cast<int64_t>(split) * p.num_heads_q + head) * p.total_q + qs.begin + wg_row0;
      store_accumulator_fp32(dq_partial + partial_row0 * kHeadDim, dq, row_scale, acc_lane,
                             valid_rows);
    } else {
      // dQ * scale as T through this warpgroup's 64 rows of the Q buffer (swizzled as Q). (count
      // == 0: the Q buffer was never loaded; staging zeros is still fine.)
      T* const dq_out = static_cast<T*>(p.dq) +
                        static_cast<int64_t>(qs.begin + wg_row0) * p.dq_token_stride +
                        static_cast<int64_t>(head) * p.dq_head_stride;
      store_accumulator_staged<T>(dq_out, p.dq_token_stride, q_rows, kRowHalf, dq, row_scale,
                                  acc_lane, valid_rows, Cfg::kWarpgroupBarrier + consumer);
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// dq = sum over splits (in split order, so bitwise deterministic) of the fp32 partials
// [num_splits][Hq][total_q][kHeadDim], rounded to T. Grid: per segment, rows_bound * Hq rows of
// kHeadDim / 8 threads (8 channels each), rows_bound >= the longest query segment; tokens past the
// segment's end do nothing, so only (token, head) rows the dQ kernel wrote (every split writes each
// of its rows, zeros for an empty split) are read.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(256)
    attention_backward_dq_sum_kernel(const AttentionBackwardParams p, const int num_splits,
                                     const float* __restrict__ dq_partial, const int rows_bound,
                                     const int ctas_per_segment) {
  constexpr int kLanesPerRow = kHeadDim / 8;
  const int b = static_cast<int>(blockIdx.x / ctas_per_segment);
  const int64_t idx =
      static_cast<int64_t>(blockIdx.x % ctas_per_segment) * 256 + threadIdx.x;
  const int64_t row_local = idx / kLanesPerRow;  // (token in segment) * Hq + head
  const int c = static_cast<int>(idx % kLanesPerRow) * 8;
  const Segment qs = segment_bounds(p.cu_seqlens_q, b, p.total_q);
  const int token_local = static_cast<int>(row_local / p.num_heads_q);
  if (token_local >= min(qs.length, rows_bound)) return;
  const int head = static_cast<int>(row_local % p.num_heads_q);
  const int token = qs.begin + token_local;
  const int64_t rows = static_cast<int64_t>(p.num_heads_q) * p.total_q;
  const int64_t row = static_cast<int64_t>(head) * p.total_q + token;
  float acc[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] = 0.f;
  for (int s = 0; s < num_splits; ++s) {
    const float* const src = dq_partial + (s * rows + row) * kHeadDim + c;
    const float4 lo = *reinterpret_cast<const float4*>(src);
    const float4 hi = *reinterpret_cast<const float4*>(src + 4);
    acc[0] += lo.x;
    acc[1] += lo.y;
    acc[2] += lo.z;
    acc[3] += lo.w;
    acc[4] += hi.x;
    acc[5] += hi.y;
    acc[6] += hi.z;
    acc[7] += hi.w;
  }
  uint32_t bits[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) bits[e] = pack2<T>(acc[2 * e], acc[2 * e + 1]);
  Vec8<T> value;
  memcpy(&value, bits, sizeof(value));
  T* const dst = static_cast<T*>(p.dq) + static_cast<int64_t>(token) * p.dq_token_stride +
                 static_cast<int64_t>(head) * p.dq_head_stride + c;
  *reinterpret_cast<Vec8<T>*>(dst) = value;
}

}  // namespace attention
}  // namespace crosslmm
