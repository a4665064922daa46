// Geometry and entry of the Hopper (sm_90a) projection-fused attention core, "sm90_cluster"
// (projected_attention_sm90_kernel.cuh), shared by the host entry (projected_attention.cu) and the
// kernel files. Plain C++ without torch headers, like projected_params.h.
#pragma once

#include <cuda_runtime_api.h>

#include "projected/projected_params.h"

namespace crosslmm {
namespace projected {

// A 2-CTA cluster computes one tile of kSm90BlockM rows ((query, head) pairs of one segment, as
// the mma.sync kernel packs them) against one split of the segment's keys. CTA c of the cluster
// owns 64-channel atoms [c * ceil(A / 2), ...) of the A = Dv / 64 atoms of q and of O, and streams
// the same atoms of x in kSm90Keys-key tiles.
struct Sm90Cluster {
  static constexpr int kBlockM = 64;   // rows per cluster: one wgmma M
  static constexpr int kKeys = 32;     // keys per x tile: one wgmma N of S, two k-steps of P x
  static constexpr int kStages = 3;    // x tiles in flight per CTA (TMA ring)
  static constexpr int kDvMax = 1152;  // 18 atoms: 9 per CTA
  static constexpr int kAtom = 64;     // channels per 128-byte swizzle row (16-bit elements)
  static constexpr int kAtomsPerCta = kDvMax / kAtom / 2;                  // 9
  static constexpr int kAtomsPerConsumer = (kAtomsPerCta + 1) / 2;         // 5 (and 4)
  static constexpr int kClusterSize = 2;
  static constexpr int kThreads = 384;  // producer warpgroup + 2 consumer warpgroups
  static constexpr int kConsumers = 2;
  // Score slots, each [4 float4][128 threads] fp32 (a thread's 16 accumulator values of S = 64
  // rows x 32 keys): one per consumer warpgroup for its partial (the CTA's two partials are summed
  // through them), then two receive buffers that the other CTA's sum lands in, alternately.
  static constexpr int kScoreSlotBytes = kBlockM * kKeys * 4;  // 8 KB
  static constexpr int kReceiveBuffers = 2;
  static constexpr int kScoreSlots = kConsumers + kReceiveBuffers;
  // Shared memory, from a 1024-byte aligned base (swizzle atoms): Q atoms [9][64 rows][128 B],
  // x stages [3][9 atoms][32 keys][128 B], score slots [2 partials + 2 receive buffers][8 KB],
  // then the mbarriers.
  static constexpr int kQAtomBytes = kBlockM * 128;  // 8 KB
  static constexpr int kXAtomBytes = kKeys * 128;    // 4 KB
  static constexpr int kQOffset = 0;
  static constexpr int kXOffset = kQOffset + kAtomsPerCta * kQAtomBytes;
  static constexpr int kXStageBytes = kAtomsPerCta * kXAtomBytes;
  static constexpr int kScoreOffset = kXOffset + kStages * kXStageBytes;
  static constexpr int kBarrierOffset = kScoreOffset + kScoreSlots * kScoreSlotBytes;
  // q_full, x_full[kStages], x_empty[kStages], s_full[kReceiveBuffers].
  static constexpr int kNumBarriers = 1 + 2 * kStages + kReceiveBuffers;
  // + 1024: the dynamic shared memory base is only 16-byte aligned; the kernel rounds it up.
  static constexpr int kSmemBytes = kBarrierOffset + 8 * kNumBarriers + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "must fit an H100's 227 KB per block");
  static_assert(kDvMax <= kDvSmall, "the mma.sync Dv bucket it falls back to covers it");
};

// Runs the sm90_cluster kernel and, when p.num_splits > 1, the mma.sync kernel's combine kernel.
// p as for run_projected_forward, with num_m_blocks counted in Sm90Cluster::kBlockM rows and the
// splits over Sm90Cluster::kKeys-key tiles; q must be row-flat (q_token_stride = H *
// q_head_stride, or H = 1), and Dv a multiple of 64, at most Sm90Cluster::kDvMax. Returns false,
// having launched nothing, when TMA cannot describe q or x (the caller runs mma_sync); throws
// (c10::Error) when a launch fails. The caller has checked that the device is sm_90 and the build
// holds sm_90a code. Implemented once per T in projected_attention_sm90_<dtype>.cu.
template <typename T>
bool run_projected_forward_sm90(const ProjectedForwardParams& p, cudaStream_t stream);

}  // namespace projected
}  // namespace crosslmm
