// Parameters and shared-memory geometry of the projection-fused core's backward, shared by the host
// entry (projected_backward.cu) and the kernel files. Plain C++ without torch headers, like
// projected_params.h (whose constants — warps, Dv buckets, key tile — it reuses).
//
// Per segment and head, with S = scale q x^T (x is both key and value):
//
//   P = exp(S - lse)   dP = dO x^T   delta = rowsum(dO o O) - dlse   dS = P o (dP - delta)
//   dq = scale dS x    dx = P^T dO + scale dS^T q   (summed over every row of the segment)
//
// Rows are (query token, head) pairs as in the forward (projected_params.h); dq, dout and out are
// [total_q, H, Dv], delta is fp32 in the flat row order token * H + head.
#pragma once

#include <cstdint>

#include "projected/projected_params.h"

namespace crosslmm {
namespace projected {

// Both backward kernels work on tiles of 16 rows against tiles of 16 keys: one m16n8k16 step each
// way, so the Dv-wide accumulators (dq: [16 rows, cols_w], dx: [16 keys, cols_w]) are 72 fp32
// registers per thread at Dv 1152 and 128 at Dv 2048.
constexpr int kBwdBlockM = 16;
constexpr int kBwdBlockN = kBlockN;
// Stages of the streamed operand (dq: x tiles; dx: (q, dO) tile pairs). One stage is allowed: the
// Dv 2048 bucket holds only one next to its resident tiles; its loads then do not overlap the MMAs.
constexpr int kBwdMinStages = 1;
constexpr int kBwdMaxStages = 3;
constexpr int kDeltaRowsPerCta = 8;  // delta kernel: one warp per row
constexpr int kSplitSumThreads = 256;

struct ProjectedBackwardParams {
  const void* q;     // [total_q, H, Dv], channel stride 1, token/head strides multiples of 8
  const void* x;     // [total_k, Dv], channel stride 1, token stride a multiple of 8
  const void* dout;  // [total_q, H, Dv], as q
  const void* out;   // [total_q, H, Dv], as q
  const float* lse;   // [H, total_q] contiguous, natural log
  const float* dlse;  // [H, total_q] contiguous, or null
  float* delta;       // [total_q * H] scratch, flat row order
  void* dq;           // [total_q, H, Dv] contiguous
  void* dx;           // [total_k, Dv] contiguous
  float* dq_partial;  // dq_splits > 1: [dq_splits, total_q * H, Dv] fp32
  float* dx_partial;  // dx_splits > 1: [dx_splits, total_k, Dv] fp32
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int64_t q_token_stride, q_head_stride;        // elements
  int64_t dout_token_stride, dout_head_stride;  // elements
  int64_t out_token_stride, out_head_stride;    // elements
  int64_t x_token_stride;                       // elements
  int batch;
  int num_heads;
  int head_dim;       // Dv, a multiple of 8
  int total_q;
  int total_k;
  int cols_per_warp;  // as ProjectedForwardParams: a multiple of 16, at most kDvMax / kWarps
  int active_warps;
  int dq_stages;      // x tiles in flight in the dq kernel
  int dx_stages;      // (q, dO) tile pairs in flight in the dx kernel
  int num_m_blocks;   // 16-row tiles of the longest segment
  int num_n_blocks;   // 16-key tiles of the longest segment
  int dq_splits;      // key splits of the dq kernel (1: writes dq directly)
  int dx_splits;      // row splits of the dx kernel (1: writes dx directly)
  int max_seqlen_q;   // query tokens of the longest segment (split-sum grid)
  int max_seqlen_k;   // keys of the longest segment (split-sum grid)
  float scale;        // softmax_scale
  float scale_log2;   // softmax_scale * log2(e)
};

// Shared-memory geometry of the two kernels for a Dv bucket. Every region is a multiple of 16
// bytes; tile rows are padded by 16 bytes (csrc/common/mma.cuh) so ldmatrix is conflict-free.
template <int kDvMax>
struct ProjectedBackwardTile {
  static_assert(kDvMax % (16 * kWarps) == 0, "every warp must own whole 16-column k-steps");
  static constexpr int kColsMax = kDvMax / kWarps;
  static constexpr int kRowStride = kDvMax + 8;         // elements, q / dO / x tiles
  static constexpr int kScoreStride = kBwdBlockN + 8;   // floats
  static constexpr int kGradStride = kBwdBlockM + 8;    // elements, [16][16] dS / P tiles
  static constexpr int kTileBytes = kBwdBlockM * kRowStride * 2;  // one 16-row (or key) tile
  static_assert(kBwdBlockM == kBwdBlockN, "q, dO and x tiles share one geometry");
  // Per-warp partial S and dP: [2][kWarps][16][kScoreStride] fp32.
  static constexpr int kScoreBytes = 2 * kWarps * kBwdBlockM * kScoreStride * 4;
  static constexpr int kGradBytes = kBwdBlockM * kGradStride * 2;  // one [16][16] T operand tile
  static constexpr int kRowStatBytes = 2 * kBwdBlockM * 4;         // lse (log2 units), delta

  // dq kernel: partial scores, dS, row stats, resident q and dO tiles; then `stages` x tiles.
  static constexpr int kDqFixedBytes = kScoreBytes + kGradBytes + kRowStatBytes + 2 * kTileBytes;
  static constexpr int kDqStageBytes = kTileBytes;
  // dx kernel: partial scores, P^T and dS^T, row stats per stage, resident x tile; then `stages`
  // (q, dO) tile pairs (each with its rows' lse and delta).
  static constexpr int kDxFixedBytes = kScoreBytes + 2 * kGradBytes + kTileBytes;
  static constexpr int kDxStageBytes = 2 * kTileBytes + kRowStatBytes;
  static_assert(kScoreBytes % 16 == 0 && kGradBytes % 16 == 0 && kRowStatBytes % 16 == 0 &&
                    kTileBytes % 16 == 0,
                "shared-memory regions must keep 16-byte alignment");
  static constexpr int dq_smem_bytes(int stages) { return kDqFixedBytes + stages * kDqStageBytes; }
  static constexpr int dx_smem_bytes(int stages) { return kDxFixedBytes + stages * kDxStageBytes; }
};

// Implemented once per (T, kDvMax) in projected_backward_<dtype>_dv<kDvMax>.cu; T is __half or
// __nv_bfloat16. Launches, on `stream`, the delta kernel, the dx and dq kernels and, where a
// kernel is split, its split-sum kernel. Throws (c10::Error) when a launch fails.
template <typename T, int kDvMax>
void run_projected_backward(const ProjectedBackwardParams& p, cudaStream_t stream);

// CTAs of the dq and dx kernels that fit on one multiprocessor with their stage counts (for the
// split heuristic), as {dq, dx}.
template <typename T, int kDvMax>
void projected_backward_ctas_per_sm(int dq_stages, int dx_stages, int* dq_ctas, int* dx_ctas);

}  // namespace projected
}  // namespace crosslmm
