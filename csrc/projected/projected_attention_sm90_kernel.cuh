// Projection-fused attention core for Hopper (sm_90a), "sm90_cluster": the same contract as the
// mma.sync kernel (projected_attention_kernel.cuh; contract at the top of projected_attention.cu),
// for Dv a multiple of 64 up to 1152, on wgmma + TMA with a 2-CTA cluster per 64-row tile.
//
// Why a cluster. With Dv = 1152 a 64-row q tile is 144 KB and O is 64 x 1152 fp32 (288 KB of
// registers): neither fits one CTA next to an x pipeline. Split over two CTAs by channel, each
// holds q[:, its 576 channels] (72 KB) and streams x[:, its 576 channels] (keys = values = x, so
// the channels a CTA reads for S are exactly those its half of O needs). Only S crosses: it is a
// sum over all channels, so each CTA's partial S goes to the other through distributed shared
// memory.
//
// CTA (rank c of its cluster), 3 warpgroups (Sm90Cluster in projected_sm90.h):
//   warpgroup 0, producer: one thread issues TMA. q's atoms of this CTA once (64 rows x 64 channels
//       per box), then per key tile of the split this CTA's atoms of x (32 keys x 64 channels per
//       box) into a kStages-deep ring: x_full (bytes landed) / x_empty (8 consumer warps done).
//   warpgroups 1 and 2, consumers: consumer 0 owns the CTA's atoms 0-4, consumer 1 atoms 5-8, for
//       all 64 rows of O (160 or 128 fp32 registers a thread). A Dv below 1152 runs the same
//       tiles, with the atoms past Dv zeroed in shared memory once (never loaded).
//       Per key tile i:
//         partial S  = q[:, my atoms] x_i[:, my atoms]^T      wgmma m64n32k16 SS, 4 per atom
//         exchange   partial S -> the cluster's S in two hops, 16 floats a thread in its own
//                    accumulator layout: (1) the CTA's sum, through a score slot per consumer
//                    (st.shared, named barriers between the two consumers); (2) the other CTA's
//                    sum, which each consumer half sends with st.async into this CTA's receive
//                    buffer i % 2, completing bytes on its s_full (expected by one thread here),
//                    as a TMA load would. No barrier marks the buffer free: it
//                    is written again two exchanges later, after the other CTA has received this
//                    one's next sum. Both sums are of two terms, hence commutative: every
//                    consumer of the cluster gets bitwise the same S = (c00 + c01) + (c10 + c11).
//         softmax    online, log2 units, in registers (the wgmma accumulator layout: a thread
//                    holds 2 rows x 8 keys, rows reduced over the quad)
//         O += P x_i[:, my atoms]   wgmma m64n64k16 RS per atom (2 k-steps), P from registers
//       Overlap: iteration i issues S_{i+1} and then P_i x_i, exchanges S_{i+1} and runs its
//       softmax while P_i x_i is still on the tensor cores.
//
// Rows are (query, head) pairs of one segment, flat (token * H + head), so a tile is one TMA box
// of a 2-D map over q viewed as [total_q * H, Dv] (the host makes q row-flat). Rows past the
// segment end are computed (on the next segment's q, or TMA's zero fill) and never written. Keys
// past the segment end: masked to -inf in S, and the x rows zeroed (each consumer its own atoms)
// before P x, as in the mma.sync kernel (0 * NaN from another segment would be NaN). A split
// without keys writes out 0 / lse -inf (or those partials). lse comes from CTA 0's consumer 0.
//
// Shared memory per CTA: Q 72 KB + x 3 x 36 KB + score slots 32 KB + barriers = 213 KB.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common/mma.cuh"
#include "common/segments.cuh"
#include "common/sm90_ptx.cuh"
#include "projected/projected_params.h"
#include "projected/projected_sm90.h"

namespace crosslmm {
namespace projected {

// Launched with clusters of Sm90Cluster::kClusterSize CTAs along x (a launch attribute: the
// __cluster_dims__ attribute does not compile for the build's other targets).
template <typename T>
__global__ void __launch_bounds__(Sm90Cluster::kThreads, 1)
    projected_attention_core_forward_sm90_kernel(const __grid_constant__ ProjectedForwardParams p,
                                                 const __grid_constant__ CUtensorMap tmap_q,
                                                 const __grid_constant__ CUtensorMap tmap_x) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = Sm90Cluster;
  using namespace sm90;
  constexpr int kBlockM = Cfg::kBlockM;
  constexpr int kKeys = Cfg::kKeys;
  constexpr int kStages = Cfg::kStages;
  constexpr int kAtomsMax = Cfg::kAtomsPerConsumer;
  // Register split (setmaxnreg): 128 * 24 + 256 * 240 = 64512 <= 65536, the launch's 384 * 168.
  constexpr uint32_t kProducerRegs = 24;
  constexpr uint32_t kConsumerRegs = 240;
  constexpr uint32_t kConsumerBarrier = 1;  // named barrier of consumer w alone: 1 + w
  constexpr uint32_t kPartialsBarrier = 3;  // both consumers: both partials are in their slots
  constexpr uint32_t kSlotFreeBarrier = 4;  // 4 + w: the other consumer has read w's partial
  // How far (log2 units) a row's running max may pass the reference that P and O are kept
  // against before both move: P <= 2^8.
  constexpr float kMaxLag = 8.f;

  // The cluster's tile: m-block fastest, then split, then segment (both CTAs agree on it).
  const uint32_t rank = cluster_ctarank();
  int64_t cluster = blockIdx.x / Cfg::kClusterSize;
  const int m_block = static_cast<int>(cluster % p.num_m_blocks);
  cluster /= p.num_m_blocks;
  const int split = static_cast<int>(cluster % p.num_splits);
  const int b = static_cast<int>(cluster / p.num_splits);

  const Segment qs = segment_bounds(p.cu_seqlens_q, b, p.total_q);
  const int rows = qs.length * p.num_heads;  // fits: total_q * H <= INT32_MAX (host check)
  const int m0 = m_block * kBlockM;
  if (m0 >= rows) return;  // uniform over the cluster, before any barrier exists
  const int rows_in_tile = min(kBlockM, rows - m0);
  const Segment ks = segment_bounds(p.cu_seqlens_k, b, p.total_k);
  const int n_blocks = ceil_div_int(ks.length, kKeys);
  const int n_begin = static_cast<int>(static_cast<int64_t>(split) * n_blocks / p.num_splits);
  const int n_end = static_cast<int>(static_cast<int64_t>(split + 1) * n_blocks / p.num_splits);
  const int count = n_end - n_begin;  // uniform over the cluster

  // This CTA's atoms: [cta_atom0, cta_atom0 + kAtomsPerCta) of the 18 of Dv = 1152. A smaller Dv
  // runs the same tiles: the atoms past Dv (at and after cta_atoms_loaded) are never loaded, their
  // shared memory is zeroed once, by the whole CTA before its first barrier, so they add 0 to S,
  // and their O is not stored.
  const int cta_atom0 = static_cast<int>(rank) * Cfg::kAtomsPerCta;
  const int cta_atoms_loaded =
      max(0, min(Cfg::kAtomsPerCta, p.head_dim / Cfg::kAtom - cta_atom0));

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw_addr = smem_u32(smem_raw);
  const uint32_t base = (raw_addr + 1023u) & ~1023u;  // swizzle atoms need 1024-byte alignment
  auto sQ = [&](int atom) { return base + Cfg::kQOffset + atom * Cfg::kQAtomBytes; };
  auto sX = [&](int stage, int atom) {
    return base + Cfg::kXOffset + stage * Cfg::kXStageBytes + atom * Cfg::kXAtomBytes;
  };
  const uint32_t bars = base + Cfg::kBarrierOffset;
  const uint32_t q_full = bars;
  auto x_full = [&](int stage) { return bars + 8u * (1 + stage); };
  auto x_empty = [&](int stage) { return bars + 8u * (1 + kStages + stage); };
  auto s_full = [&](int buffer) { return bars + 8u * (1 + 2 * kStages + buffer); };

  const int tid = static_cast<int>(threadIdx.x);
  const int warpgroup = tid / 128;

  if (tid == 0) {
    mbarrier_init(q_full, 1);
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(x_full(s), 1);  // the producer's arrive.expect_tx, then the TMA bytes
      mbarrier_init(x_empty(s), 8);  // one arrival per consumer warp of this CTA
    }
    // Receive buffer b: this CTA's arrive.expect_tx, then the other CTA's st.async bytes.
    for (int b = 0; b < Cfg::kReceiveBuffers; ++b) mbarrier_init(s_full(b), 1);
    fence_barrier_init();
  }
  // Atoms past Dv (from cta_atoms_loaded on): their q and x stages are zeroed here, once, by the
  // whole CTA, since TMA never writes them. The cluster barrier below orders these writes (made
  // visible to the async proxy by the fence) before every wgmma that reads them.
  if (count > 0 && cta_atoms_loaded < Cfg::kAtomsPerCta) {
    constexpr int kQChunks = Cfg::kQAtomBytes / 16;
    constexpr int kXChunks = Cfg::kXAtomBytes / 16;
    constexpr int kChunksPerAtom = kQChunks + kStages * kXChunks;
    const int unloaded = Cfg::kAtomsPerCta - cta_atoms_loaded;
    for (int idx = tid; idx < unloaded * kChunksPerAtom; idx += Cfg::kThreads) {
      const int a = cta_atoms_loaded + idx / kChunksPerAtom;
      const int chunk = idx % kChunksPerAtom;
      const uint32_t addr = chunk < kQChunks ? sQ(a) + chunk * 16
                                             : sX((chunk - kQChunks) / kXChunks, a) +
                                                   ((chunk - kQChunks) % kXChunks) * 16;
      asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0u) : "memory");
    }
    fence_proxy_async_shared();
  }
  // Both CTAs' barriers exist before either CTA arrives on the other's.
  cluster_sync();

  if (warpgroup == 0) {
    // ------------------------------------------------------------------------------------------
    // Producer
    // ------------------------------------------------------------------------------------------
    setmaxnreg_dec<kProducerRegs>();
    if (tid == 0 && count > 0) {
      tma_prefetch_descriptor(&tmap_q);
      tma_prefetch_descriptor(&tmap_x);
      const int q_row = qs.begin * p.num_heads + m0;  // flat row, < total_q * H
      mbarrier_arrive_expect_tx(q_full, cta_atoms_loaded * Cfg::kQAtomBytes);
      for (int a = 0; a < cta_atoms_loaded; ++a) {
        tma_load_2d(sQ(a), &tmap_q, q_full, (cta_atom0 + a) * Cfg::kAtom, q_row);
      }
      // Tile i goes to stage i % kStages; its use u = i / kStages of the stage waits until the
      // consumers released use u - 1 (parity (u & 1) ^ 1 passes at once for u = 0).
      for (int i = 0; i < count; ++i) {
        const int stage = i % kStages;
        mbarrier_wait(x_empty(stage), ((i / kStages) & 1) ^ 1);
        mbarrier_arrive_expect_tx(x_full(stage), cta_atoms_loaded * Cfg::kXAtomBytes);
        const int key_row = ks.begin + (n_begin + i) * kKeys;
        for (int a = 0; a < cta_atoms_loaded; ++a) {
          tma_load_2d(sX(stage, a), &tmap_x, x_full(stage), (cta_atom0 + a) * Cfg::kAtom,
                      key_row);
        }
      }
    }
    __syncwarp();
  } else {
    // ------------------------------------------------------------------------------------------
    // Consumers
    // ------------------------------------------------------------------------------------------
    setmaxnreg_inc<kConsumerRegs>();
    const int consumer = warpgroup - 1;
    const int wg_tid = tid % 128;
    const int warp = wg_tid / 32;
    const int lane = tid % 32;
    const int quad_col = lane % 4;  // t: columns 2t, 2t+1 of each 8-column block
    const int quad_row = lane / 4;  // g: rows g and g + 8 of the warp's 16-row slab
    const float scale_log2 = p.scale_log2;

    // My atoms, as indices among the CTA's: consumer 0 the first kAtomsMax (5), consumer 1 the
    // other 4. The counts are compile-time (kMyAtoms below): wgmmas under a run-time condition
    // would make ptxas serialise them.
    const int my_atom0 = consumer * kAtomsMax;

    // Score slots: consumer w's partial in slot w, receive buffer b in slot kConsumers + b; a
    // thread's float4 j of a slot at (j * 128 + wg_tid) * 16.
    const uint32_t peer = rank ^ 1u;
    const uint32_t thread_offset = Cfg::kScoreOffset + wg_tid * 16;
    const uint32_t receive_offset = thread_offset + Cfg::kConsumers * Cfg::kScoreSlotBytes;
    const uint32_t receive_remote = map_to_cta(base + receive_offset, peer);
    const uint32_t s_full_remote = map_to_cta(s_full(0), peer);

    auto consume = [&]<int kMyAtoms>() {
      float o[kMyAtoms > 0 ? kMyAtoms : 1][32];
      // S of a key tile: this consumer's partial (the wgmma accumulator), then the cluster's sum,
      // then P in fp32. One array: registers are what bounds the atoms a consumer can own.
      float s[16];
      uint32_t p_even[8], p_odd[8];
#pragma unroll
      for (int a = 0; a < kMyAtoms; ++a) {
#pragma unroll
        for (int e = 0; e < 32; ++e) o[a][e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < 16; ++e) s[e] = 0.f;  // the partial stays 0 without atoms
#pragma unroll
      for (int e = 0; e < 8; ++e) p_even[e] = p_odd[e] = 0u;
      float row_max[2] = {-INFINITY, -INFINITY};  // log2 units, scale applied
      float row_sum[2] = {0.f, 0.f};              // this thread's 8 keys' share

      // Descriptors as one base per operand plus a compile-time offset (address >> 4 in the low
      // bits; every address stays below 256 KB, so the 14-bit field never carries). The q base
      // goes through an empty asm at every use: otherwise ptxas hoists all 20 loop-invariant q
      // descriptors (40 registers) out of the key loop, and the 5-atom consumer spills.
      const uint64_t desc_q_base = make_smem_desc_sw128(sQ(my_atom0), 16, 1024);
      auto issue_s = [&](int stage) {
        uint64_t desc_q0 = desc_q_base;
        asm volatile("" : "+l"(desc_q0));
        const uint64_t desc_x0 = make_smem_desc_sw128(sX(stage, my_atom0), 16, 1024);
#pragma unroll
        for (int a = 0; a < kMyAtoms; ++a) {
#pragma unroll
          for (int kk = 0; kk < 4; ++kk) {  // 16 channels = 32 bytes per k-step
            wgmma_m64n32k16_ss<T>(s, desc_q0 + ((a * Cfg::kQAtomBytes + kk * 32) >> 4),
                                  desc_x0 + ((a * Cfg::kXAtomBytes + kk * 32) >> 4),
                                  a > 0 || kk > 0 ? 1 : 0);
          }
        }
      };
      auto issue_pv = [&](int stage, const uint32_t (&pa)[8]) {
        // Keys 16kk.. are rows 16kk.. of an atom; x is the MN-major B operand (channels
        // contiguous), 8-key groups 1024 bytes apart; N = 64 is one atom (the leading offset,
        // between 64-channel blocks, is not used).
        const uint64_t desc_x0 =
            make_smem_desc_sw128(sX(stage, my_atom0), Cfg::kXAtomBytes, 1024);
#pragma unroll
        for (int a = 0; a < kMyAtoms; ++a) {
#pragma unroll
          for (int kk = 0; kk < kKeys / 16; ++kk) {
            const uint32_t pk[4] = {pa[4 * kk], pa[4 * kk + 1], pa[4 * kk + 2], pa[4 * kk + 3]};
            wgmma_m64n64k16_rs_tb<T>(o[a], pk,
                                     desc_x0 + ((a * Cfg::kXAtomBytes + kk * 16 * 128) >> 4));
          }
        }
      };
      // Waits for x tile i and, for the segment's last tile, zeroes this consumer's atoms of its
      // rows past the segment end (P is 0 there, but 0 * NaN is not).
      auto wait_x = [&](int i) {
        const int stage = i % kStages;
        mbarrier_wait(x_full(stage), (i / kStages) & 1);
        const int valid = ks.length - (n_begin + i) * kKeys;
        if (kMyAtoms > 0 && valid < kKeys) {
          const int per_atom = (kKeys - valid) * 8;  // 16-byte chunks, 8 per row
          for (int idx = wg_tid; idx < kMyAtoms * per_atom; idx += 128) {
            const int a = idx / per_atom;
            const int rest = idx % per_atom;
            const uint32_t addr =
                sX(stage, my_atom0 + a) + (valid + rest / 8) * 128 + (rest % 8) * 16;
            asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0u)
                         : "memory");
          }
          fence_proxy_async_shared();
          named_barrier_sync(kConsumerBarrier + consumer, 128);
        }
      };
      // s: this consumer's partial S (complete) -> the cluster's sum, for the n-th exchange.
      // First the CTA's sum through the two partial slots, then the other CTA's sum through
      // receive buffer n % 2. Both sums are commutative, so all four consumers of the cluster get
      // bitwise the same S = (c00 + c01) + (c10 + c11), hence the same softmax.
      auto exchange = [&](int n) {
        constexpr int kFloat4Stride = 128 * 16;
        // Not hoisted out of the key loop: 16 addresses would stay live across it.
        uint32_t slots = base + thread_offset;
        asm volatile("" : "+r"(slots));
        const uint32_t mine = slots + consumer * Cfg::kScoreSlotBytes;
        const uint32_t theirs = slots + (consumer ^ 1) * Cfg::kScoreSlotBytes;
        // s += this thread's 16 floats of the slot at `slot`. Loads in asm volatile stay in j
        // order, so at most one j's floats are in flight.
        auto add_slot = [&](uint32_t slot) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            float v[4];
            asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                         : "=f"(v[0]), "=f"(v[1]), "=f"(v[2]), "=f"(v[3])
                         : "r"(slot + j * kFloat4Stride)
                         : "memory");
#pragma unroll
            for (int e = 0; e < 4; ++e) s[4 * j + e] += v[e];
          }
        };
        if (n > 0) named_barrier_sync(kSlotFreeBarrier + consumer, 256);  // read n - 1
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(mine + j * kFloat4Stride),
                       "f"(s[4 * j]), "f"(s[4 * j + 1]), "f"(s[4 * j + 2]), "f"(s[4 * j + 3])
                       : "memory");
        }
        named_barrier_sync(kPartialsBarrier, 256);
        add_slot(theirs);
        if (n + 1 < count) named_barrier_arrive(kSlotFreeBarrier + (consumer ^ 1), 256);
        // The CTA's sum to the other CTA: consumer w sends float4s 2w and 2w + 1 (both consumers
        // hold all four), 8 KB in all, which the other CTA's receive buffer expects.
        const int buffer = n & 1;
        const uint32_t buffer_offset = buffer * Cfg::kScoreSlotBytes;
        if (consumer == 0 && wg_tid == 0) {
          mbarrier_arrive_expect_tx(s_full(buffer), Cfg::kScoreSlotBytes);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          // Selects, not s[4 * (2 * consumer + h) + e]: an index known only at run time would
          // put s in local memory.
          float v[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) v[e] = consumer == 0 ? s[4 * h + e] : s[8 + 4 * h + e];
          st_async_v4(receive_remote + buffer_offset + (2 * consumer + h) * kFloat4Stride, v,
                      s_full_remote + 8u * buffer);
        }
        mbarrier_wait(s_full(buffer), (n >> 1) & 1);
        // Buffer n % 2 is written again at exchange n + 2, which the other CTA sends only after
        // its exchange n + 1 received this CTA's sum n + 1, sent after these loads.
        add_slot(slots + Cfg::kConsumers * Cfg::kScoreSlotBytes + buffer_offset);
      };
      // Online softmax of s for key tile i; the rescale factors of O in corr.
      auto softmax = [&](int i, float (&corr)[2]) {
        const int valid = ks.length - (n_begin + i) * kKeys;  // >= 1
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float tile_max = -INFINITY;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int key = 8 * j + 2 * quad_col + e;
              float& v = s[4 * j + 2 * r + e];
              v = key < valid ? v * scale_log2 : -INFINITY;
              tile_max = fmaxf(tile_max, v);
            }
          }
          tile_max = quad_max(tile_max);
          // The reference max moves only when the tile's max exceeds it by more than
          // kMaxLag: P stays below 2^kMaxLag (exact in fp32, bf16 and fp16 alike, and the final
          // O / l cancels the reference), and O is rescaled only on those tiles. Every consumer
          // of the cluster holds the same S, so all take the same decisions.
          const float ahead = tile_max - row_max[r];  // +inf on the first tile; tile_max finite
          const float ref = ahead > kMaxLag ? tile_max : row_max[r];
          corr[r] = exp2f(row_max[r] - ref);  // 0 on the first tile, else 1 unless moved
          row_max[r] = ref;
          float sum = 0.f;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float& v = s[4 * j + 2 * r + e];
              v = exp2f(v - ref);
              sum += v;
            }
          }
          row_sum[r] = row_sum[r] * corr[r] + sum;
        }
      };
      auto pack_p = [&](uint32_t (&pa)[8]) {
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            pa[4 * kk + r] = pack2<T>(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
          }
        }
      };
      auto rescale_o = [&](const float (&corr)[2]) {
        // Most tiles move no row's reference max (see softmax): then the warp skips the
        // kMyAtoms * 32 multiplies.
        if (!__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) return;
#pragma unroll
        for (int a = 0; a < kMyAtoms; ++a) {
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            o[a][4 * j + 0] *= corr[0];
            o[a][4 * j + 1] *= corr[0];
            o[a][4 * j + 2] *= corr[1];
            o[a][4 * j + 3] *= corr[1];
          }
        }
      };
      auto release_x = [&](int stage) {
        __syncwarp();
        if (lane == 0) mbarrier_arrive(x_empty(stage));
      };
      auto fence_o = [&]() {
#pragma unroll
        for (int a = 0; a < kMyAtoms; ++a) fence_operands(o[a]);
      };

      if (count > 0) {
        mbarrier_wait(q_full, 0);
        // Key tile 0: S only.
        wait_x(0);
        if constexpr (kMyAtoms > 0) {
          wgmma_fence();
          issue_s(0);
          wgmma_commit();
          wgmma_wait<0>();
          fence_operands(s);
        }
        exchange(0);
        {
          float corr[2];
          softmax(0, corr);  // O is still 0
        }
        pack_p(p_even);

        // Iteration i < count - 1: S_{i+1} and P_i x_i, P_i in `cur`; P_{i+1} goes to `next`.
        auto step = [&](int i, uint32_t (&cur)[8], uint32_t (&next)[8]) {
          wait_x(i + 1);
          if constexpr (kMyAtoms > 0) {
            wgmma_fence();
            issue_s((i + 1) % kStages);
            wgmma_commit();
            issue_pv(i % kStages, cur);
            wgmma_commit();
            wgmma_wait<1>();  // S_{i+1} done; P_i x_i may still run
            fence_operands(s);
          }
          float corr[2];
          exchange(i + 1);
          softmax(i + 1, corr);
          pack_p(next);
          if constexpr (kMyAtoms > 0) {
            // Pin the softmax before the wait so it stays overlapped with P_i x_i (see
            // schedule_barrier; the row sums are never 0 once a tile was seen).
            fence_operands(next);
            fence_operands(corr);
            fence_operands(row_sum);
            schedule_barrier(__float_as_uint(row_sum[0]) | __float_as_uint(row_sum[1]));
            wgmma_wait<0>();
            fence_o();
            fence_operands(cur);
          }
          release_x(i % kStages);
          rescale_o(corr);
        };
        // The last tile's P x.
        auto last = [&](int i, uint32_t (&cur)[8]) {
          if constexpr (kMyAtoms > 0) {
            wgmma_fence();
            issue_pv(i % kStages, cur);
            wgmma_commit();
            wgmma_wait<0>();
            fence_o();
            fence_operands(cur);
          }
          release_x(i % kStages);
        };
        // Unrolled by two so the P buffers alternate at compile time.
        int i = 0;
        for (; i + 2 < count; i += 2) {
          step(i, p_even, p_odd);
          step(i + 1, p_odd, p_even);
        }
        // (The tail as two separate branches: a branch holding both a step and the last P x
        // made ptxas serialise every wgmma of the kernel.)
        const bool odd_tail = i + 1 < count;
        if (odd_tail) step(i, p_even, p_odd);
        const int last_tile = odd_tail ? i + 1 : i;
        if (odd_tail) {
          last(last_tile, p_odd);
        } else {
          last(last_tile, p_even);
        }
      }

      // ----------------------------------------------------------------------------------------
      // Epilogue: O / l and lse per row; rows past the tile's valid ones are not written.
      // ----------------------------------------------------------------------------------------
      float inv_sum[2], lse[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float sum = quad_sum(row_sum[r]);
        inv_sum[r] = sum > 0.f ? 1.f / sum : 0.f;
        lse[r] = sum > 0.f ? (row_max[r] + log2f(sum)) * kLn2 : -INFINITY;
      }
      const int64_t rows_total = static_cast<int64_t>(p.total_q) * p.num_heads;
      const int64_t flat0 = static_cast<int64_t>(qs.begin) * p.num_heads + m0;
      const int dv = p.head_dim;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int tile_row = 16 * warp + quad_row + 8 * r;
        if (tile_row >= rows_in_tile) continue;
        const int64_t row = flat0 + tile_row;
        if (rank == 0 && consumer == 0 && quad_col == 0) {
          if (p.num_splits == 1) {
            p.lse[(row % p.num_heads) * p.total_q + row / p.num_heads] = lse[r];
          } else {
            p.lse_partial[split * rows_total + row] = lse[r];
          }
        }
#pragma unroll
        for (int a = 0; a < kMyAtoms; ++a) {
          if ((cta_atom0 + my_atom0 + a) * Cfg::kAtom >= dv) continue;  // zero-filled atom
          const int col0 = (cta_atom0 + my_atom0 + a) * Cfg::kAtom + 2 * quad_col;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const float lo = o[a][4 * j + 2 * r] * inv_sum[r];
            const float hi = o[a][4 * j + 2 * r + 1] * inv_sum[r];
            if (p.num_splits == 1) {
              store2(static_cast<T*>(p.out) + row * dv + col0 + 8 * j, lo, hi);
            } else {
              *reinterpret_cast<float2*>(p.out_partial + (split * rows_total + row) * dv + col0 +
                                         8 * j) = make_float2(lo, hi);
            }
          }
        }
      }
    };
    if (consumer == 0) {
      consume.template operator()<kAtomsMax>();
    } else {
      consume.template operator()<Cfg::kAtomsPerCta - kAtomsMax>();
    }
  }
  // No CTA leaves while the other may still arrive on its barriers or write its score slots.
  cluster_sync();
#elif defined(__CUDA_ARCH__)
  // Compiled for a target without wgmma/TMA/clusters: the host never launches this.
  __trap();
#endif
}

}  // namespace projected
}  // namespace crosslmm
