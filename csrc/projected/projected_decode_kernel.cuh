// The decode kernel of the projection-fused attention core: the same contract and algorithm as
// projected_attention_core_forward_kernel (projected_attention_kernel.cuh) with one m16 row tile,
// Dv bucket kDvSmall and 32-key tiles, specialised for the call that is bound by reading x once: a
// decode step (1 query token x 12 heads = 12 rows against all T * 729 keys, split over the SMs).
//
// Why: the general kernel with two stages of 32 keys waits for the whole of tile `it` before it
// issues tile it + 1 into the stage tile it - 1 freed, so at every tile the SM's loads drain to
// nothing and the next tile starts with a full DRAM latency (~1 us at 74 KB per tile and ~23 GB/s
// per SM: the decode step ran at 75% of its floor). Two stages are all that fit next to q (37 KB)
// and the per-warp partial scores (20 KB). Here:
//   - q lives in registers (each warp's A fragments of its 144 columns: 9 k-steps x 4 = 36
//     registers), staged once through an x slot, which frees q's 37 KB;
//   - x streams through a ring of kDecodeSlots = 5 slots of 16 keys (a 32-key tile is two
//     consecutive slots, wherever they fall in the ring), one cp.async group per slot;
//   - at tile `it` the kernel waits for its two slots with the slot after them still allowed in
//     flight (cp.async.wait_group 1), then refills the two slots tile it - 1 freed: while a tile is
//     computed 3 slots (48 keys, 111 KB) are in flight, and while waiting at least one (37 KB).
// Per tile: partial scores per warp over its columns (q from registers), the cross-warp sum and
// online softmax by all 256 threads (16 per row, 2 keys each), P X per warp on its columns; three
// barriers per 32-key tile, as in the general kernel. The epilogue (1/l, lse, direct output or fp32
// split partials for projected_forward_combine_kernel) is the general kernel's. Splits are cut at
// 16 keys (the general kernel cuts at its 32-key tiles), so at T = 256 the 132 splits get 88 or 89
// units of 16 keys rather than 44 or 45 tiles; a split's last tile can be half masked.
//
// Shared memory: DecodeTile::kSmemBytes = 207,552 bytes (projected_params.h): one CTA per SM on an
// H100/H200 (227 KB per block); it does not fit an A100 (163 KB), whose host plan keeps the general
// kernel. Contract (projected_attention.cu): varlen segments, keys past a segment's end
// zero-filled and masked, columns in [Dv, round_up(Dv, 16)) zero-filled, empty segments/splits give
// out 0 and lse -inf, rows past a segment's end never written; results do not depend on timing.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common/mma.cuh"
#include "common/ptx.cuh"
#include "common/segments.cuh"
#include "common/sm90_ptx.cuh"
#include "projected/projected_attention_kernel.cuh"
#include "projected/projected_params.h"

namespace crosslmm {
namespace projected {

// One bulk copy (the TMA engine, no tensor map) of `bytes` (a multiple of 16, both addresses
// 16-byte aligned) global -> shared, completing its bytes on the mbarrier `bar`. sm_90 only.
__device__ __forceinline__ void bulk_copy_g2s(uint32_t dst, const void* src, uint32_t bytes,
                                              uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
          "r"(dst),
      "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(bar)
      : "memory");
}

// kBulk: fill the slots with bulk copies (one per key row, issued by warp 0, completing on the
// slot's mbarrier) instead of cp.async by every thread; only where the code is compiled for sm_90
// (the sm_80 pass of a kBulk instantiation is the cp.async kernel).
template <typename T, bool kBulk>
__global__ void __launch_bounds__(kThreads, 1)
    projected_decode_kernel(const ProjectedForwardParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kTma = kBulk;
#else
  constexpr bool kTma = false;
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Launched as a programmatic dependent of whatever ran before it on the stream
  // (launch_projected_decode, sm_90 code): its launch and CTA dispatch overlap that kernel's tail,
  // and nothing here touches global memory (cu_seqlens, q, x may all be that kernel's outputs)
  // before that grid has completed and its writes are visible. A no-op when launched plainly.
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  using Tile = DecodeTile;
  constexpr int kDvMax = kDvSmall;
  constexpr int kKeys = kBlockNWide;           // keys per compute tile (two slots)
  constexpr int kColsMax = kDvMax / kWarps;    // 144
  constexpr int kKSteps = kColsMax / 16;       // 9
  constexpr int kOutBlocks = kColsMax / 8;     // 18
  constexpr int kChunksPerRow = kDvMax / 8;    // 144 16-byte chunks per full-width row
  constexpr int kThreadsPerRow = kThreads / 16;  // softmax: 16 threads per row,
  constexpr int kKeysPerThread = kKeys / kThreadsPerRow;  // 2 keys each
  constexpr int kSlotElems = kDecodeSlotKeys * Tile::kRowStride;
  constexpr int kQSlot = kDecodeSlots - 2;  // q's staging slot: the first one refilled (it = 0)
  static_assert(kKeys == 2 * kDecodeSlotKeys, "a compute tile is two slots");
  static_assert(kDecodeSlots == 5, "the wait_group immediates below assume 5 slots");
  static_assert(kThreadsPerRow * kKeysPerThread == kKeys && kKeysPerThread == 2, "softmax map");
  static_assert((16 * kChunksPerRow) % kThreads == 0, "slot chunks must divide over the threads");

  extern __shared__ __align__(128) unsigned char smem[];
  float* const sScore = reinterpret_cast<float*>(smem);  // [kWarps][16][kScoreStride]
  T* const sP = reinterpret_cast<T*>(smem + Tile::kScoreBytes);  // [16][kPStride]
  float* const sCorr = reinterpret_cast<float*>(smem + Tile::kScoreBytes + Tile::kPBytes);
  float* const sInvSum = sCorr + 16;
  float* const sLse = sInvSum + 16;
  uint64_t* const sBar = reinterpret_cast<uint64_t*>(smem + Tile::kScoreBytes + Tile::kPBytes +
                                                     Tile::kRowStatBytes);  // [kDecodeSlots]
  T* const sSlots = reinterpret_cast<T*>(smem + Tile::kFixedBytes);  // [kDecodeSlots][16][stride]

  // The CTA's work, as in the general kernel: row tile fastest, then split, then segment.
  int64_t cta = blockIdx.x;
  const int m_block = static_cast<int>(cta % p.num_m_blocks);
  cta /= p.num_m_blocks;
  const int split = static_cast<int>(cta % p.num_splits);
  const int b = static_cast<int>(cta / p.num_splits);

  const Segment qs = segment_bounds(p.cu_seqlens_q, b, p.total_q);
  const int rows = qs.length * p.num_heads;
  const int m0 = m_block * 16;
  if (m0 >= rows) return;  // uniform over the CTA
  const int rows_in_tile = min(16, rows - m0);
  const Segment ks = segment_bounds(p.cu_seqlens_k, b, p.total_k);

  // This split's keys [key_begin, key_end): its 16-key units [u_begin, u_end) of the segment's
  // ceil(len / 16) (splits differ by at most 16 keys: at T = 256, 88 or 89 units on 132 SMs, where
  // 32-key units would give 44 or 45 tiles), computed as 32-key tiles from key_begin, the last
  // one's second half past key_end when the split has an odd number of units (zero-filled and
  // masked like keys past the segment's end). Slots j = 0 .. 2 * num_tiles - 1.
  const int n_units = ceil_div_int(ks.length, kDecodeSlotKeys);
  const int u_begin = static_cast<int>(static_cast<int64_t>(split) * n_units / p.num_splits);
  const int u_end = static_cast<int>(static_cast<int64_t>(split + 1) * n_units / p.num_splits);
  const int key_begin = u_begin * kDecodeSlotKeys;
  const int key_end = min(ks.length, u_end * kDecodeSlotKeys);
  const int num_tiles = (u_end - u_begin + 1) / 2;
  const int num_subs = 2 * num_tiles;

  const int dv = p.head_dim;
  const int dv16 = (dv + 15) / 16 * 16;
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int col_begin = warp * p.cols_per_warp;
  const int warp_cols = max(0, min(p.cols_per_warp, dv16 - col_begin));

  const T* const q = static_cast<const T*>(p.q);
  const T* const x = static_cast<const T*>(p.x);
  auto slot = [&](int j) { return sSlots + (j % kDecodeSlots) * kSlotElems; };

  // q rows -> slot kQSlot (16 rows, zero past the tile's rows and in [dv, dv16)).
  auto load_q = [&]() {
    T* const dst = sSlots + kQSlot * kSlotElems;
#pragma unroll
    for (int i = 0; i < 16 * kChunksPerRow / kThreads; ++i) {
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
      cp_async_16(dst + tile_offset<kDvMax>(r, chunk), src, valid);
    }
  };
  // 16 keys j * 16 .. of this split -> slot j % kDecodeSlots (keys past the split zero-filled).
  auto load_sub = [&](int j) {
    const int key0 = key_begin + j * kDecodeSlotKeys;
    const int valid_keys = key_end - key0;  // may be <= 0 in the last tile's second half
    const T* const first = x + (static_cast<int64_t>(ks.begin) + key0) * p.x_token_stride;
    T* const dst = slot(j);
#pragma unroll
    for (int i = 0; i < kDecodeSlotKeys * kChunksPerRow / kThreads; ++i) {
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

  // The same with bulk copies, by warp 0: lane r < valid copies key row r (dv * 2 bytes), lane 0
  // announces the slot's bytes on its mbarrier first; rows past the split's end are zeroed with
  // ordinary stores (only in a split's last tile: no bulk copy writes that slot again, and the
  // consumers see the zeros after the barrier that precedes their use). Columns [dv, dv16) of every
  // slot are zeroed once at the start and never written by a bulk copy.
  auto issue_sub_bulk = [&](int j) {
    const int key0 = key_begin + j * kDecodeSlotKeys;
    const int valid = max(0, min(kDecodeSlotKeys, key_end - key0));
    T* const dst = slot(j);
    const uint32_t bar = sm90::smem_u32(sBar + j % kDecodeSlots);
    if (valid < kDecodeSlotKeys) {
      const int chunks16 = dv16 / 8;
      for (int idx = lane; idx < (kDecodeSlotKeys - valid) * chunks16; idx += 32) {
        const int r = valid + idx / chunks16;
        *reinterpret_cast<Vec8<T>*>(dst + tile_offset<kDvMax>(r, idx % chunks16)) = Vec8<T>{};
      }
    }
    if (lane == 0) sm90::mbarrier_arrive_expect_tx(bar, static_cast<uint32_t>(valid * dv * 2));
    __syncwarp();
    if (lane < valid) {
      const T* const src = x + (static_cast<int64_t>(ks.begin) + key0 + lane) * p.x_token_stride;
      bulk_copy_g2s(sm90::smem_u32(dst + tile_offset<kDvMax>(lane, 0)), src,
                    static_cast<uint32_t>(dv * 2), bar);
    }
  };
  auto issue_sub = [&](int j) {  // all threads call it (cp.async) / warp 0 acts (bulk)
    if constexpr (kTma) {
      if (warp == 0) issue_sub_bulk(j);
    } else {
      load_sub(j);
    }
  };

  float o_acc[kOutBlocks][4];
#pragma unroll
  for (int d = 0; d < kOutBlocks; ++d) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o_acc[d][e] = 0.f;
  }
  const int sm_row = tid / kThreadsPerRow;
  const int sm_key0 = (tid % kThreadsPerRow) * kKeysPerThread;
  float row_max = -INFINITY;
  float row_sum = 0.f;
  const int g = lane / 4;
  const int t = lane % 4;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Let the combine grid (a programmatic dependent launch, launch_projected_forward_combine) be
  // scheduled once every CTA of this grid has started: its CTAs (5 KB of shared memory, 48
  // registers a thread) fit next to this kernel's and wait in griddepcontrol.wait for this grid to
  // complete, so the combine starts without a launch gap. (Triggering only lets the dependent
  // launch early; its wait still covers all of this grid's writes.)
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif

  if constexpr (kTma) {
    // mbarriers (one arrival: warp 0's lane 0 with the slot's byte count) and the zero columns
    // [dv, dv16) of the slots other than q's (q's load zero-fills them there).
    if (num_tiles > 0) {
      if (tid == 0) {
#pragma unroll
        for (int i = 0; i < kDecodeSlots; ++i) sm90::mbarrier_init(sm90::smem_u32(sBar + i), 1);
        sm90::fence_barrier_init();
      }
      if (dv < dv16) {
        for (int idx = tid; idx < kDecodeSlots * kDecodeSlotKeys; idx += kThreads) {
          const int s_idx = idx / kDecodeSlotKeys;
          if (s_idx == kQSlot) continue;
          *reinterpret_cast<Vec8<T>*>(sSlots + s_idx * kSlotElems +
                                      tile_offset<kDvMax>(idx % kDecodeSlotKeys, dv / 8)) =
              Vec8<T>{};
        }
      }
      __syncthreads();  // barriers initialised before warp 0 arrives on them
    }
  }

  // Prologue: q (one cp.async group), then slots 0, 1, 2 (one group each with cp.async, empty past
  // the split's keys, so the group counts below hold for any number of tiles).
  if (num_tiles > 0) load_q();
  cp_async_commit();
#pragma unroll
  for (int j = 0; j < kDecodeSlots - 2; ++j) {
    if (j < num_subs) issue_sub(j);
    if constexpr (!kTma) cp_async_commit();
  }
  // q's fragments of this warp's columns into registers (CTA-uniform branch: a split without keys
  // never reads the staging slot).
  uint32_t qa[kKSteps][4];
  if (num_tiles > 0) {
    if constexpr (kTma) {
      cp_async_wait<0>();  // q landed (the slots come on their mbarriers)
      sm90::fence_proxy_async_shared();  // q's writes before the bulk copy into its slot (it = 0)
    } else {
      cp_async_wait<kDecodeSlots - 2>();  // q landed; slots 0..2 may still be in flight
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      if (kk * 16 < warp_cols) {
        load_a_fragment<kDvMax>(qa[kk], sSlots + kQSlot * kSlotElems, 0, col_begin + kk * 16);
      }
    }
  }

#pragma unroll 1
  for (int it = 0; it < num_tiles; ++it) {
    // Slots 2it and 2it+1 have landed (slots up to 2it+2 were issued; the newest may pend). After
    // the barrier every thread sees every thread's copies, and every warp is done with tile it-1
    // (slots 2it-2, 2it-1) and, at it = 0, with q's staging slot: refill them with slots 2it+3 and
    // 2it+4 ((2it+3) % 5 = (2it-2) % 5, and slot 3 = kQSlot at it = 0).
    if constexpr (kTma) {
      // Slot uses j = 2it, 2it+1: the (j / kDecodeSlots)-th phase of slot j % kDecodeSlots.
#pragma unroll
      for (int j = 2 * it; j < 2 * it + 2; ++j) {
        sm90::mbarrier_wait(sm90::smem_u32(sBar + j % kDecodeSlots), (j / kDecodeSlots) & 1);
      }
    } else {
      cp_async_wait<1>();
    }
    __syncthreads();
#pragma unroll
    for (int j = 2 * it + kDecodeSlots - 2; j < 2 * it + kDecodeSlots; ++j) {
      if (j < num_subs) issue_sub(j);
      if constexpr (!kTma) cp_async_commit();
    }
    const T* const xs[2] = {slot(2 * it), slot(2 * it + 1)};

    // 1. Partial scores over this warp's columns: S_w[16 rows, 32 keys], in 8-key blocks.
    if (warp_cols > 0) {
      float s[4][4];
#pragma unroll
      for (int nb = 0; nb < 4; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nb][e] = 0.f;
      }
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        if (kk * 16 < warp_cols) {  // warp-uniform
          const int col = col_begin + kk * 16;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            uint32_t bx[2][2];
            load_b_fragments_nk<kDvMax>(bx, xs[h], 0, col);
            mma_16816<T>(s[2 * h], qa[kk], bx[0][0], bx[0][1]);
            mma_16816<T>(s[2 * h + 1], qa[kk], bx[1][0], bx[1][1]);
          }
        }
      }
      float* const mine = sScore + warp * 16 * Tile::kScoreStride;
#pragma unroll
      for (int nb = 0; nb < 4; ++nb) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int r = g + 8 * i;
          *reinterpret_cast<float2*>(mine + r * Tile::kScoreStride + nb * 8 + 2 * t) =
              make_float2(s[nb][2 * i], s[nb][2 * i + 1]);
        }
      }
    }
    __syncthreads();

    // 2. Online softmax of row sm_row over keys sm_key0, sm_key0 + 1 (log2 units).
    {
      const int keys_valid = key_end - (key_begin + it * kKeys);  // > 0: slot 2it has a key
      float v0 = 0.f, v1 = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        if (w < p.active_warps) {  // fixed order: deterministic
          const float2 pair = *reinterpret_cast<const float2*>(
              sScore + (w * 16 + sm_row) * Tile::kScoreStride + sm_key0);
          v0 += pair.x;
          v1 += pair.y;
        }
      }
      v0 = sm_key0 < keys_valid ? v0 * p.scale_log2 : -INFINITY;
      v1 = sm_key0 + 1 < keys_valid ? v1 * p.scale_log2 : -INFINITY;
      const float tile_max = group_max<kThreadsPerRow>(fmaxf(v0, v1));
      const float new_max = fmaxf(row_max, tile_max);     // finite: every tile has a valid key
      const float correction = exp2f(row_max - new_max);  // 0 on the first tile
      row_max = new_max;
      const float p0 = exp2f(v0 - new_max);
      const float p1 = exp2f(v1 - new_max);
      row_sum *= correction;  // the general kernel's operations, in its order
      row_sum += p0;
      row_sum += p1;
      store2(sP + sm_row * Tile::kPStride + sm_key0, p0, p1);
      if (sm_key0 == 0) sCorr[sm_row] = correction;
    }
    __syncthreads();

    // 3. O[:, cols_w] = O * correction + P X[:, cols_w].
    if (warp_cols > 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float correction = sCorr[g + 8 * i];
#pragma unroll
        for (int d = 0; d < kOutBlocks; ++d) {
          o_acc[d][2 * i] *= correction;
          o_acc[d][2 * i + 1] *= correction;
        }
      }
      uint32_t pa[2][4];
#pragma unroll
      for (int h = 0; h < 2; ++h) load_a_fragment<kKeys>(pa[h], sP, 0, h * 16);
#pragma unroll
      for (int d2 = 0; d2 < kKSteps; ++d2) {
        if (d2 * 16 < warp_cols) {  // warp-uniform
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            uint32_t bx[2][2];
            load_b_fragments_kn<kDvMax>(bx, xs[h], 0, col_begin + d2 * 16);
            mma_16816<T>(o_acc[2 * d2], pa[h], bx[0][0], bx[0][1]);
            mma_16816<T>(o_acc[2 * d2 + 1], pa[h], bx[1][0], bx[1][1]);
          }
        }
      }
    }
    // The next iteration's barrier orders these reads of sP, sCorr and the slots before they are
    // overwritten.
  }
  // Only empty cp.async groups can be pending (none may land after the CTA exits); every bulk copy
  // was waited for (each issued slot is consumed).
  cp_async_wait<0>();

  // Epilogue (the general kernel's): 1 / l and lse per row; a row without keys gets out 0 and
  // lse -inf.
  {
    const float sum = group_sum<kThreadsPerRow>(row_sum);
    if (sm_key0 == 0) {
      sInvSum[sm_row] = sum > 0.f ? 1.f / sum : 0.f;
      sLse[sm_row] = sum > 0.f ? (row_max + log2f(sum)) * kLn2 : -INFINITY;
    }
  }
  __syncthreads();

  const int64_t rows_total = static_cast<int64_t>(p.total_q) * p.num_heads;
  auto flat_row = [&](int r) {
    const int row = m0 + r;
    return static_cast<int64_t>(qs.begin + row / p.num_heads) * p.num_heads + row % p.num_heads;
  };
  if (warp_cols > 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = g + 8 * i;
      if (r >= rows_in_tile) continue;
      const float inv_sum = sInvSum[r];
      const int64_t row = flat_row(r);
      if (p.num_splits == 1) {
        T* const o = static_cast<T*>(p.out) + row * dv + col_begin + 2 * t;
#pragma unroll
        for (int d = 0; d < kOutBlocks; ++d) {
          if (d * 8 < warp_cols && col_begin + d * 8 < dv) {
            store2(o + d * 8, o_acc[d][2 * i] * inv_sum, o_acc[d][2 * i + 1] * inv_sum);
          }
        }
      } else {
        float* const o = p.out_partial + (split * rows_total + row) * dv + col_begin + 2 * t;
#pragma unroll
        for (int d = 0; d < kOutBlocks; ++d) {
          if (d * 8 < warp_cols && col_begin + d * 8 < dv) {
            *reinterpret_cast<float2*>(o + d * 8) =
                make_float2(o_acc[d][2 * i] * inv_sum, o_acc[d][2 * i + 1] * inv_sum);
          }
        }
      }
    }
  }
  if (tid < rows_in_tile) {
    const int64_t row = flat_row(tid);
    if (p.num_splits == 1) {
      p.lse[(row % p.num_heads) * p.total_q + row / p.num_heads] = sLse[tid];
    } else {
      p.lse_partial[split * rows_total + row] = sLse[tid];
    }
  }
}

}  // namespace projected
}  // namespace crosslmm
