// Host-side launchers of the projection-fused core's backward (projected_backward_kernel.cuh),
// included by the per-(dtype, Dv bucket) projected_backward_<dtype>_dv<D>.cu files that
// instantiate them.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "common/check.h"
#include "projected/projected_backward_kernel.cuh"
#include "projected/projected_backward_params.h"

namespace crosslmm {
namespace projected {

constexpr const char* kBackwardOp = "projected_attention_core_backward";

inline unsigned backward_grid(int64_t ctas, const char* kernel) {
  TORCH_CHECK(ctas <= 0x7fffffff, kBackwardOp, ": ", kernel, " grid too large (", ctas, " CTAs)");
  return static_cast<unsigned>(ctas);
}

template <typename T>
void launch_split_sum(const float* partial, T* dst, const int32_t* cu_seqlens, int total_tokens,
                      int rows_per_token, int64_t rows_per_segment, int64_t split_stride,
                      int splits, int dv, int batch, cudaStream_t stream) {
  if (rows_per_segment == 0) return;
  TORCH_CHECK(rows_per_segment <= 0x7fffffff, kBackwardOp, ": split-sum rows too many");
  projected_backward_split_sum_kernel<T>
      <<<backward_grid(rows_per_segment * batch, "split-sum"), kSplitSumThreads, 0, stream>>>(
          partial, dst, cu_seqlens, total_tokens, rows_per_token,
          static_cast<int>(rows_per_segment), split_stride, splits, dv);
  CROSSLMM_CHECK_LAUNCH();
}

template <typename T, int kDvMax>
void run_projected_backward(const ProjectedBackwardParams& p, cudaStream_t stream) {
  using Tile = ProjectedBackwardTile<kDvMax>;
  TORCH_CHECK(p.head_dim <= kDvMax && p.cols_per_warp <= kDvMax / kWarps &&
                  p.cols_per_warp % 16 == 0 && p.dq_stages >= kBwdMinStages &&
                  p.dq_stages <= kBwdMaxStages && p.dx_stages >= kBwdMinStages &&
                  p.dx_stages <= kBwdMaxStages && p.dq_splits >= 1 && p.dx_splits >= 1 &&
                  p.dq_splits <= kMaxSplits && p.dx_splits <= kMaxSplits,
              kBackwardOp, ": inconsistent launch plan");
  if (p.batch == 0) return;

  const int64_t rows_total = static_cast<int64_t>(p.total_q) * p.num_heads;
  if (rows_total > 0) {
    projected_backward_delta_kernel<T>
        <<<backward_grid((rows_total + kDeltaRowsPerCta - 1) / kDeltaRowsPerCta, "delta"),
           32 * kDeltaRowsPerCta, 0, stream>>>(p);
    CROSSLMM_CHECK_LAUNCH();
  }

  if (p.num_n_blocks > 0) {
    auto kernel = projected_core_backward_dx_kernel<T, kDvMax>;
    const int smem = Tile::dx_smem_bytes(p.dx_stages);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    kernel<<<backward_grid(static_cast<int64_t>(p.num_n_blocks) * p.dx_splits * p.batch, "dx"),
             kThreads, smem, stream>>>(p);
    CROSSLMM_CHECK_LAUNCH();
    if (p.dx_splits > 1) {
      launch_split_sum<T>(p.dx_partial, static_cast<T*>(p.dx), p.cu_seqlens_k, p.total_k, 1,
                          p.max_seqlen_k, static_cast<int64_t>(p.total_k) * p.head_dim,
                          p.dx_splits, p.head_dim, p.batch, stream);
    }
  }

  if (p.num_m_blocks > 0) {
    auto kernel = projected_core_backward_dq_kernel<T, kDvMax>;
    const int smem = Tile::dq_smem_bytes(p.dq_stages);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    kernel<<<backward_grid(static_cast<int64_t>(p.num_m_blocks) * p.dq_splits * p.batch, "dq"),
             kThreads, smem, stream>>>(p);
    CROSSLMM_CHECK_LAUNCH();
    if (p.dq_splits > 1) {
      launch_split_sum<T>(p.dq_partial, static_cast<T*>(p.dq), p.cu_seqlens_q, p.total_q,
                          p.num_heads, static_cast<int64_t>(p.max_seqlen_q) * p.num_heads,
                          rows_total * p.head_dim, p.dq_splits, p.head_dim, p.batch, stream);
    }
  }
}

template <typename T, int kDvMax>
void projected_backward_ctas_per_sm(int dq_stages, int dx_stages, int* dq_ctas, int* dx_ctas) {
  using Tile = ProjectedBackwardTile<kDvMax>;
  auto query = [](auto kernel, int smem) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    int ctas = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel, kThreads, smem));
    return ctas > 0 ? ctas : 1;
  };
  // Asked once per stage pair and process (host time on every call otherwise; as the forward,
  // this assumes the process's GPUs are all of one kind).
  static std::mutex mutex;
  static std::map<std::pair<int, int>, std::pair<int, int>> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(dq_stages, dx_stages);
  auto hit = cache.find(key);
  if (hit == cache.end()) {
    const int dq = query(projected_core_backward_dq_kernel<T, kDvMax>,
                         Tile::dq_smem_bytes(dq_stages));
    const int dx = query(projected_core_backward_dx_kernel<T, kDvMax>,
                         Tile::dx_smem_bytes(dx_stages));
    hit = cache.emplace(key, std::make_pair(dq, dx)).first;
  }
  *dq_ctas = hit->second.first;
  *dx_ctas = hit->second.second;
}

}  // namespace projected
}  // namespace crosslmm
