// Host-side helpers of the projection-fused core's entry points (projected_attention.cu, the
// forward; projected_backward.cu, the backward): argument checks, the dtype / Dv-bucket dispatch,
// the device's shared-memory limit and the key-split heuristic.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/check.h"
#include "projected/projected_params.h"

namespace crosslmm {
namespace projected {

// Calls fn.template operator()<T, kDvMax>() for the dtype and Dv bucket; `op` names the entry point
// in the error.
template <typename Fn>
void dispatch_dtype_dv(const char* op, at::ScalarType dtype, int dv_max, Fn&& fn) {
  if (dtype == at::kHalf) {
    if (dv_max == kDvSmall) return fn.template operator()<__half, kDvSmall>();
    if (dv_max == kDvLarge) return fn.template operator()<__half, kDvLarge>();
  } else if (dtype == at::kBFloat16) {
    if (dv_max == kDvSmall) return fn.template operator()<__nv_bfloat16, kDvSmall>();
    if (dv_max == kDvLarge) return fn.template operator()<__nv_bfloat16, kDvLarge>();
  }
  TORCH_CHECK(false, op, ": unsupported dtype ", dtype, " / Dv bucket ", dv_max);
}

inline int max_smem_per_block() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return bytes;
}

// The Dv bucket (kernel instantiation) of a width and its column split: round_up(Dv, 16) columns
// spread evenly over the 8 warps in whole 16-column k-steps (1152 -> 144 per warp; 200 -> 32 per
// warp, 7 warps busy).
struct ColumnSplit {
  int dv_max;
  int cols_per_warp;
  int active_warps;
};

inline ColumnSplit column_split(int64_t dv) {
  const int64_t dv16 = ceil_div(dv, 16) * 16;
  const int64_t cols_per_warp = ceil_div(ceil_div(dv16, kWarps), 16) * 16;
  return {dv <= kDvSmall ? kDvSmall : kDvLarge, static_cast<int>(cols_per_warp),
          static_cast<int>(ceil_div(dv16, cols_per_warp))};
}

// True when the kernels can read t in place: the 16-byte loads need every stride of a dimension of
// size > 1 (other than the channels) to be a multiple of 8 elements and a 16-byte aligned base.
inline bool loads_16_byte_aligned(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  }
  return true;
}

// t itself where the kernels can read it in place, else one contiguous copy.
inline at::Tensor readable_16_byte(const at::Tensor& t) {
  return loads_16_byte_aligned(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

// The checks both entry points make of q [total_q, H, Dv], x [total_k, Dv], the segments and the
// scalars (each error names the argument and `op`).
inline void check_core_inputs(const char* op, const at::Tensor& q, const at::Tensor& x,
                              const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                              int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                              int64_t num_splits) {
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  CROSSLMM_CHECK_CUDA(q);
  CROSSLMM_CHECK_CUDA(x);
  CROSSLMM_CHECK_SAME_DEVICE(q, x);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": q must have dtype float16 or bfloat16, got ", q.scalar_type());
  CROSSLMM_CHECK_DTYPE(x, q.scalar_type());
  CROSSLMM_CHECK_DIM(q, 3);
  CROSSLMM_CHECK_DIM(x, 2);
  const int64_t total_q = q.size(0), heads = q.size(1), dv = q.size(2);
  const int64_t total_k = x.size(0);
  TORCH_CHECK(x.size(1) == dv, op, ": x must have q's width Dv = q.size(2) = ", dv,
              " in its last dimension, got x of shape ", x.sizes());
  TORCH_CHECK(dv > 0 && dv % 8 == 0 && dv <= kDvLarge, op,
              ": Dv (q.size(2)) must be a positive multiple of 8 and at most ", kDvLarge, ", got ",
              dv);
  TORCH_CHECK(heads >= 1, op, ": q must have at least one head (q.size(1)), got shape ",
              q.sizes());
  TORCH_CHECK(q.stride(2) == 1, op,
              ": q must have channel (last-dim) stride 1, got strides ", q.strides());
  TORCH_CHECK(x.stride(1) == 1, op,
              ": x must have channel (last-dim) stride 1, got strides ", x.strides());
  check_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, q);
  check_cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, q);
  TORCH_CHECK(cu_seqlens_q.numel() == cu_seqlens_k.numel(), op,
              ": cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got ",
              cu_seqlens_q.numel(), " and ", cu_seqlens_k.numel());
  TORCH_CHECK(total_q * heads <= kInt32Max && total_k <= kInt32Max, op,
              ": too many rows (total_q * num_heads = ", total_q * heads, ", total_k = ", total_k,
              "; at most 2^31 - 1 each)");
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, op,
              ": max_seqlen_q and max_seqlen_k must be >= 0, got ", max_seqlen_q, " and ",
              max_seqlen_k);
  TORCH_CHECK(std::isfinite(softmax_scale), op, ": softmax_scale must be finite, got ",
              softmax_scale);
  TORCH_CHECK(num_splits >= 0, op, ": num_splits must be >= 0 (0 = heuristic), got ", num_splits);
}

// Split heuristic: a split keeps at least this many tiles, and costs about this many tiles of
// fixed work (loading its resident operands, filling the pipeline, writing and merging its
// partial result).
constexpr int64_t kMinTilesPerSplit = 4;
constexpr int64_t kSplitOverheadTiles = 3;

// Splits of each CTA's loop of `tiles` tiles (key tiles of a row tile, or row tiles of a key
// tile). With num_splits = 0: the number that minimises the estimated time,
// waves(s) * (tiles per split + fixed cost per split), where waves(s) = ceil(ctas * s / wave): one
// split when the CTAs already fill the GPU, about one CTA per SM per sequence for decode (a
// batch-1 decode step at T = 256 frames runs 132 splits of ~88 tiles on 132 SMs).
// `units_per_tile`: the units a split is cut in per tile (the forward's decode kernel cuts splits at
// 16 keys and computes 32-key tiles: 2; `tiles` then counts units).
inline int64_t choose_splits(int64_t num_splits, int64_t ctas, int64_t tiles, int64_t wave,
                             int64_t units_per_tile = 1) {
  if (num_splits > 0) {
    return std::min<int64_t>({num_splits, std::max<int64_t>(1, tiles), kMaxSplits});
  }
  const int64_t min_units = kMinTilesPerSplit * units_per_tile;
  const int64_t overhead_units = kSplitOverheadTiles * units_per_tile;
  const int64_t max_splits =
      std::min<int64_t>(kMaxSplits, std::max<int64_t>(1, tiles / min_units));
  int64_t best = 1;
  double best_cost = -1.0;
  for (int64_t s = 1; s <= max_splits; ++s) {
    const double waves = static_cast<double>(ceil_div(ctas * s, wave));
    const double cost = waves * static_cast<double>(ceil_div(tiles, s) + overhead_units);
    if (best_cost < 0 || cost < best_cost) {
      best = s;
      best_cost = cost;
    }
  }
  return best;
}

}  // namespace projected
}  // namespace crosslmm
