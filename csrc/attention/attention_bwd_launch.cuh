// Host-side launchers of the attention backward kernels (attention_bwd_kernel.cuh), included by the
// per-(dtype, head dim) attention_bwd_<dtype>_hd<D>.cu files that instantiate them.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention/attention_bwd_kernel.cuh"
#include "attention/attention_params.h"
#include "common/check.h"

namespace crosslmm {
namespace attention {

template <typename T, int kHeadDim>
void run_attention_backward(const AttentionBackwardParams& p, cudaStream_t stream) {
  using Tile = BackwardTile<kHeadDim>;

  const int64_t delta_rows = static_cast<int64_t>(p.total_q) * p.num_heads_q;
  if (delta_rows > 0) {
    constexpr int kRowsPerCta = kDeltaThreads / (kHeadDim / 8);
    const int64_t ctas = (delta_rows + kRowsPerCta - 1) / kRowsPerCta;
    TORCH_CHECK(ctas <= 0x7fffffff, "attention_backward: Delta grid too large (", ctas, " CTAs)");
    attention_backward_delta_kernel<T, kHeadDim>
        <<<static_cast<unsigned>(ctas), kDeltaThreads, 0, stream>>>(p);
    CROSSLMM_CHECK_LAUNCH();
  }

  const int64_t dkdv_ctas = static_cast<int64_t>(p.num_n_blocks) * p.num_heads_k * p.batch;
  if (dkdv_ctas > 0) {
    TORCH_CHECK(dkdv_ctas <= 0x7fffffff, "attention_backward: dK/dV grid too large (", dkdv_ctas,
                " CTAs)");
    auto kernel = attention_backward_dkdv_kernel<T, kHeadDim>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        Tile::kDkDvSmemBytes));
    kernel<<<static_cast<unsigned>(dkdv_ctas), kBackwardThreads, Tile::kDkDvSmemBytes, stream>>>(p);
    CROSSLMM_CHECK_LAUNCH();
  }

  const int64_t dq_ctas = static_cast<int64_t>(p.num_m_blocks) * p.head_ctas * p.batch;
  if (dq_ctas > 0) {
    TORCH_CHECK(dq_ctas <= 0x7fffffff, "attention_backward: dQ grid too large (", dq_ctas,
                " CTAs)");
    auto kernel = attention_backward_dq_kernel<T, kHeadDim>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        Tile::kDqSmemBytes));
    kernel<<<static_cast<unsigned>(dq_ctas), kBackwardThreads, Tile::kDqSmemBytes, stream>>>(p);
    CROSSLMM_CHECK_LAUNCH();
  }
}

}  // namespace attention
}  // namespace crosslmm
