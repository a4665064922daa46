// Host-side launchers of the attention forward kernels (attention_fwd_kernel.cuh), included by the
// per-(dtype, head dim) attention_fwd_<dtype>_hd<D>.cu files that instantiate them.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention/attention_fwd_kernel.cuh"
#include "attention/attention_params.h"
#include "common/check.h"

namespace crosslmm {
namespace attention {

// Launches the combine over p's partial results (p.num_splits > 1), on `stream`: a warp per row
// for few splits, a CTA per row for many (attention_fwd_kernel.cuh says why).
template <typename T, int kHeadDim>
void launch_attention_forward_combine(const AttentionForwardParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.max_seqlen_q) * p.num_heads_q * p.batch;
  if (rows == 0) return;
  const bool warp_per_row = p.num_splits <= kCombineWarpMaxSplits;
  const int64_t ctas = warp_per_row ? (rows + kCombineWarps - 1) / kCombineWarps : rows;
  TORCH_CHECK(ctas <= 0x7fffffff, "attention_forward: combine grid too large (", ctas, " CTAs)");
  if (warp_per_row) {
    attention_forward_combine_warp_kernel<T, kHeadDim>
        <<<static_cast<unsigned>(ctas), kCombineThreads, 0, stream>>>(p);
  } else {
    attention_forward_combine_kernel<T, kHeadDim>
        <<<static_cast<unsigned>(ctas), kCombineThreads, 0, stream>>>(p);
  }
  CROSSLMM_CHECK_LAUNCH();
}

template <typename T, int kHeadDim, int kNWarps>
void launch_attention_forward(const AttentionForwardParams& p, cudaStream_t stream) {
  using Tile = ForwardTile<kHeadDim, kNWarps>;
  auto kernel = attention_forward_kernel<T, kHeadDim, kNWarps>;
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::kSmemBytes));
  const int64_t ctas = static_cast<int64_t>(p.num_m_blocks) * p.head_ctas * p.batch * p.num_splits;
  TORCH_CHECK(ctas <= 0x7fffffff, "attention_forward: grid too large (", ctas, " CTAs)");
  kernel<<<static_cast<unsigned>(ctas), Tile::kThreads, Tile::kSmemBytes, stream>>>(p);
  CROSSLMM_CHECK_LAUNCH();
}

template <typename T, int kHeadDim>
void run_attention_forward(const AttentionForwardParams& p, int block_m, cudaStream_t stream) {
  if (p.num_m_blocks == 0 || p.head_ctas == 0 || p.batch == 0) return;
  TORCH_CHECK(block_m == 64 || block_m == 128, "attention_forward: block_m must be 64 or 128");
  if (block_m == 64) {
    launch_attention_forward<T, kHeadDim, 4>(p, stream);
  } else {
    launch_attention_forward<T, kHeadDim, 8>(p, stream);
  }
  if (p.num_splits > 1) launch_attention_forward_combine<T, kHeadDim>(p, stream);
}

template <typename T, int kHeadDim>
int attention_forward_ctas_per_sm(int block_m) {
  auto query = [](auto kernel, int threads, int smem_bytes) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
    int ctas = 0;
    C10_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel, threads, smem_bytes));
    return ctas > 0 ? ctas : 1;
  };
  // Asked once per kernel and process (thread-safe statics): the occupancy query costs host time
  // on every short call otherwise. (Assumes the process's GPUs are all of one kind.)
  if (block_m == 64) {
    using Tile = ForwardTile<kHeadDim, 4>;
    static const int ctas64 =
        query(attention_forward_kernel<T, kHeadDim, 4>, Tile::kThreads, Tile::kSmemBytes);
    return ctas64;
  }
  using Tile = ForwardTile<kHeadDim, 8>;
  static const int ctas128 =
      query(attention_forward_kernel<T, kHeadDim, 8>, Tile::kThreads, Tile::kSmemBytes);
  return ctas128;
}

}  // namespace attention
}  // namespace crosslmm
