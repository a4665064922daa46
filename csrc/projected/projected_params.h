// Parameters and tile geometry of the projection-fused attention core, shared by the host entry
// (projected_attention.cu) and the kernel files. Plain C++ without torch headers, like
// attention/attention_params.h, so the kernels compile on their own.
//
// The op: per segment b and head h, out = softmax(q x^T * scale) x, where q is [total_q, H, Dv] and
// x is [total_k, Dv] (multi-query attention whose keys and values are the same tensor; Dv is the
// vision width, 1152 for SigLIP). See projected_attention_kernel.cuh for the algorithm.
//
// Rows. Every (query token, head) pair of a segment is one "row"; row r of segment b is query token
// cu_seqlens_q[b] + r / H, head r % H. Since all heads read the same x, a CTA takes a tile of 16 or
// 32 rows (one or two m16 MMA tiles) of any heads and tokens: a decode step (1 token x 12 heads =
// 12 rows) is one tile, so x is read once per step, not once per head. The flat index
// token * H + head of a row is also its row in `out` viewed as [total_q * H, Dv].
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace crosslmm {
namespace projected {

constexpr int kBlockN = 16;      // keys per x tile (one k-step of P X)
// Keys per x tile of one-m16-tile calls (decode: 1 token x 12 heads) where shared memory holds two
// such stages: half the tiles, so half the per-tile barriers and cross-warp score reductions per
// byte of x, in the call that is bound by reading x.
constexpr int kBlockNWide = 32;
constexpr int kWarps = 8;        // warps per CTA: each owns 1/8 of the Dv columns
constexpr int kThreads = 32 * kWarps;
constexpr int kMinStages = 2;    // x tiles in shared memory: one in use, at least one in flight
constexpr int kMaxStages = 4;
constexpr int kMaxSplits = 256;  // key splits per segment (scratch and combine loop stay small)
// Dv buckets (kDvMax): one kernel instantiation serves every Dv up to its bucket. The columns are
// spread over the warps evenly at run time (ProjectedForwardParams::cols_per_warp), so a smaller Dv
// costs no extra work, only unused shared memory and registers.
constexpr int kDvSmall = 1152;   // SigLIP's width; 144 columns per warp
constexpr int kDvLarge = 2048;   // the contract's limit; 256 columns per warp, one m16 tile only

struct ProjectedForwardParams {
  const void* q;       // [total_q, H, Dv], channel stride 1, token/head strides multiples of 8
  const void* x;       // [total_k, Dv], channel stride 1, token stride a multiple of 8
  void* out;           // [total_q, H, Dv] contiguous
  float* lse;          // [H, total_q], natural log
  float* out_partial;  // num_splits > 1: [num_splits, total_q * H, Dv] fp32, each split's O / l
  float* lse_partial;  // num_splits > 1: [num_splits, total_q * H], natural log
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int64_t q_token_stride, q_head_stride;  // elements
  int64_t x_token_stride;                 // elements
  int batch;
  int num_heads;
  int head_dim;       // Dv, a multiple of 8
  int total_q;
  int total_k;
  int cols_per_warp;  // Dv columns (of round_up(Dv, 16)) each warp owns; a multiple of 16
  int active_warps;   // warps that own at least one column: ceil(round_up(Dv, 16) / cols_per_warp)
  int stages;         // x tiles in the shared-memory ring, kMinStages..kMaxStages
  int max_seqlen_q;   // query tokens of the longest segment (grid of the combine kernel)
  int num_m_blocks;   // row tiles per segment, for the longest segment
  int num_splits;     // key splits; 1 writes out/lse directly
  int keys_per_tile;  // kBlockN, or kBlockNWide for one-m16-tile launches (the host's choice)
  float scale_log2;   // softmax_scale * log2(e): the kernels work in log2 units (exp2)
  int decode_kernel;  // kDecodeNone, or the decode kernel's load path (projected_decode_kernel.cuh)
};

// Shared-memory geometry of the forward kernel for a Dv bucket, a tile of kMTiles m16 tiles and
// x tiles of kKeys keys.
// All regions are multiples of 16 bytes, so every region starts 16-byte aligned. Rows of Q and x
// tiles are padded by 16 bytes (as in csrc/common/mma.cuh) so ldmatrix is conflict-free.
template <int kDvMax, int kMTiles, int kKeys = kBlockN>
struct ProjectedTile {
  static_assert(kKeys == kBlockN || kKeys == kBlockNWide, "x tiles of 16 or 32 keys");
  static_assert(kDvMax % (16 * kWarps) == 0, "every warp must own whole 16-column k-steps");
  static constexpr int kBlockM = 16 * kMTiles;
  static constexpr int kColsMax = kDvMax / kWarps;  // most columns one warp can own
  static constexpr int kRowStride = kDvMax + 8;     // elements, Q and x tiles
  static constexpr int kScoreStride = kKeys + 8;  // floats: conflict-free float2 stores
  static constexpr int kPStride = kKeys + 8;      // elements: conflict-free ldmatrix
  // Fixed regions, in order: per-warp partial scores [kWarps][kBlockM][kScoreStride] fp32,
  // P [kBlockM][kPStride] 16-bit, per-row rescale factors and final 1/l and lse (fp32 each),
  // Q [kBlockM][kRowStride] 16-bit. Then `stages` x tiles [kBlockN][kRowStride] 16-bit.
  static constexpr int kScoreBytes = kWarps * kBlockM * kScoreStride * 4;
  static constexpr int kPBytes = kBlockM * kPStride * 2;
  static constexpr int kRowStatBytes = 3 * kBlockM * 4;
  static constexpr int kQBytes = kBlockM * kRowStride * 2;
  static constexpr int kFixedBytes = kScoreBytes + kPBytes + kRowStatBytes + kQBytes;
  static constexpr int kStageBytes = kKeys * kRowStride * 2;
  static_assert(kScoreBytes % 16 == 0 && kPBytes % 16 == 0 && kRowStatBytes % 16 == 0 &&
                    kQBytes % 16 == 0 && kStageBytes % 16 == 0,
                "shared-memory regions must keep 16-byte alignment");
  static constexpr int smem_bytes(int stages) { return kFixedBytes + stages * kStageBytes; }
};

// The decode kernel (projected_decode_kernel.cuh): one m16 row tile, Dv bucket kDvSmall, 32-key
// compute tiles read from a ring of kDecodeSlots 16-key x slots (a tile is two consecutive slots),
// q held in registers (it is staged once through a slot), so the ring is 5 slots deep where the
// general kernel fits 2 stages of 32 keys next to q: while a tile is being computed, the next 3
// slots (48 keys) are in flight, and while waiting for a tile one more slot still is.
constexpr int kDecodeSlots = 5;
constexpr int kDecodeSlotKeys = 16;
// ProjectedForwardParams::decode_kernel: the general kernel, or the decode kernel filling its slots
// with cp.async (16 bytes per thread), or with one bulk copy (cp.async.bulk, the TMA engine) per
// key row completing on a per-slot mbarrier (sm_90 code; code compiled for sm_80 uses cp.async).
constexpr int kDecodeNone = 0;
constexpr int kDecodeCpAsync = 1;
constexpr int kDecodeBulk = 2;
struct DecodeTile {
  static constexpr int kRowStride = kDvSmall + 8;      // elements, the q staging and x slots
  static constexpr int kScoreStride = kBlockNWide + 8;  // floats, per-warp partial scores
  static constexpr int kPStride = kBlockNWide + 8;      // elements
  // Regions, in order: partial scores [kWarps][16][kScoreStride] fp32, P [16][kPStride] 16-bit,
  // per-row rescale factors, 1 / l and lse (fp32, 16 each), one mbarrier per slot (bulk copies),
  // then kDecodeSlots x slots [kDecodeSlotKeys][kRowStride] 16-bit (slot kDecodeSlots - 2 holds q
  // before the first tile).
  static constexpr int kScoreBytes = kWarps * 16 * kScoreStride * 4;
  static constexpr int kPBytes = 16 * kPStride * 2;
  static constexpr int kRowStatBytes = 3 * 16 * 4;
  static constexpr int kBarrierBytes = (kDecodeSlots * 8 + 15) / 16 * 16;
  static constexpr int kFixedBytes = kScoreBytes + kPBytes + kRowStatBytes + kBarrierBytes;
  static constexpr int kSlotBytes = kDecodeSlotKeys * kRowStride * 2;
  static constexpr int kSmemBytes = kFixedBytes + kDecodeSlots * kSlotBytes;  // 207,600
  static_assert(kScoreBytes % 16 == 0 && kPBytes % 16 == 0 && kRowStatBytes % 16 == 0 &&
                    kBarrierBytes % 16 == 0 && kSlotBytes % 16 == 0,
                "shared-memory regions must keep 16-byte alignment");
  static_assert(2 * kSmemBytes > 233472, "one CTA per SM (228 KB per SM on sm_80 and sm_90)");
};

// Implemented once per (T, kDvMax) in projected_attention_<dtype>_dv<kDvMax>.cu; T is __half or
// __nv_bfloat16. m_tiles is 1 or 2 (2 only for kDvMax = kDvSmall); p.keys_per_tile is kBlockN, or
// kBlockNWide with m_tiles 1 and kDvMax = kDvSmall; p.decode_kernel != kDecodeNone (m_tiles 1,
// kDvMax = kDvSmall, keys_per_tile kBlockNWide) runs the decode kernel instead. Launches the
// forward kernel and, when p.num_splits > 1, the combine kernel, on `stream`. Throws (c10::Error)
// when a launch fails.
template <typename T, int kDvMax>
void run_projected_forward(const ProjectedForwardParams& p, int m_tiles, cudaStream_t stream);

// CTAs of the forward kernel that fit on one multiprocessor with `stages` x tiles of `keys` keys
// (for the split heuristic).
template <typename T, int kDvMax>
int projected_forward_ctas_per_sm(int m_tiles, int keys, int stages);

}  // namespace projected
}  // namespace crosslmm
