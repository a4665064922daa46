// Host-side launchers of the projection-fused attention kernels (projected_attention_kernel.cuh),
// included by the per-(dtype, Dv bucket) projected_attention_<dtype>_dv<D>.cu files that
// instantiate them.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "common/check.h"
#include "projected/projected_attention_kernel.cuh"
#include "projected/projected_params.h"

namespace crosslmm {
namespace projected {

template <typename T, int kDvMax, int kMTiles, int kKeys>
void launch_projected_forward(const ProjectedForwardParams& p, cudaStream_t stream) {
  using Tile = ProjectedTile<kDvMax, kMTiles, kKeys>;
  auto kernel = projected_attention_core_forward_kernel<T, kDvMax, kMTiles, kKeys>;
  const int smem = Tile::smem_bytes(p.stages);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int64_t ctas = static_cast<int64_t>(p.num_m_blocks) * p.num_splits * p.batch;
  TORCH_CHECK(ctas <= 0x7fffffff, "projected_attention_core_forward: grid too large (", ctas, " CTAs)");
  kernel<<<static_cast<unsigned>(ctas), kThreads, smem, stream>>>(p);
  CROSSLMM_CHECK_LAUNCH();
}

// Merges the splits' partial results (p.out_partial, p.lse_partial) into p.out and p.lse; both
// forward kernels write that format.
template <typename T>
void launch_projected_forward_combine(const ProjectedForwardParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.max_seqlen_q) * p.num_heads;
  const int64_t channel_tiles = (p.head_dim + kCombineChannels - 1) / kCombineChannels;
  const int64_t ctas = rows * channel_tiles * p.batch;
  TORCH_CHECK(rows <= 0x7fffffff && ctas <= 0x7fffffff,
              "projected_attention_core_forward: combine grid too large (", ctas, " CTAs)");
  if (ctas == 0) return;
  projected_forward_combine_kernel<T><<<static_cast<unsigned>(ctas), kCombineThreads, 0, stream>>>(
      p, static_cast<int>(rows), static_cast<int>(channel_tiles));
  CROSSLMM_CHECK_LAUNCH();
}

template <typename T, int kDvMax>
void run_projected_forward(const ProjectedForwardParams& p, int m_tiles, cudaStream_t stream) {
  if (p.num_m_blocks == 0 || p.batch == 0 || p.num_splits == 0) return;
  TORCH_CHECK(p.head_dim <= kDvMax && p.cols_per_warp <= kDvMax / kWarps &&
                  p.cols_per_warp % 16 == 0 && p.stages >= kMinStages && p.stages <= kMaxStages &&
                  p.num_splits <= kMaxSplits &&
                  (p.keys_per_tile == kBlockN ||
                   (p.keys_per_tile == kBlockNWide && m_tiles == 1 && kDvMax <= kDvSmall)),
              "projected_attention_core_forward: inconsistent launch plan");
  if (m_tiles == 1 && p.keys_per_tile == kBlockN) {
    launch_projected_forward<T, kDvMax, 1, kBlockN>(p, stream);
  } else if constexpr (kDvMax <= kDvSmall) {
    TORCH_CHECK(m_tiles == 1 || m_tiles == 2,
                "projected_attention_core_forward: m_tiles must be 1 or 2");
    if (m_tiles == 1) {
      launch_projected_forward<T, kDvMax, 1, kBlockNWide>(p, stream);
    } else {
      launch_projected_forward<T, kDvMax, 2, kBlockN>(p, stream);
    }
  } else {
    TORCH_CHECK(false, "projected_attention_core_forward: Dv > ", kDvSmall,
                " supports 16-row tiles only");
  }
  if (p.num_splits > 1) launch_projected_forward_combine<T>(p, stream);
}

template <typename T, int kDvMax>
int projected_forward_ctas_per_sm(int m_tiles, int keys, int stages) {
  auto query = [](auto kernel, int smem) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    int ctas = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel, kThreads, smem));
    return ctas > 0 ? ctas : 1;
  };
  // Asked once per (m_tiles, stages) and process: the occupancy query is host time on every
  // decode step otherwise. (Stages follow from the device's shared memory, so, as for the
  // attention kernels, this assumes the process's GPUs are all of one kind.)
  static std::mutex mutex;
  static std::map<std::tuple<int, int, int>, int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(m_tiles, keys, stages);
  const auto hit = cache.find(key);
  if (hit != cache.end()) return hit->second;
  int ctas = 0;
  if constexpr (kDvMax <= kDvSmall) {
    if (m_tiles == 2) {
      ctas = query(projected_attention_core_forward_kernel<T, kDvMax, 2, kBlockN>,
                   ProjectedTile<kDvMax, 2>::smem_bytes(stages));
    } else if (keys == kBlockNWide) {
      ctas = query(projected_attention_core_forward_kernel<T, kDvMax, 1, kBlockNWide>,
                   ProjectedTile<kDvMax, 1, kBlockNWide>::smem_bytes(stages));
    }
  }
  if (ctas == 0) {
    ctas = query(projected_attention_core_forward_kernel<T, kDvMax, 1, kBlockN>,
                 ProjectedTile<kDvMax, 1>::smem_bytes(stages));
  }
  cache.emplace(key, ctas);
  return ctas;
}

}  // namespace projected
}  // namespace crosslmm
