// Host side of the sm90_cluster projected-attention core: TMA tensor maps and the launch. Included
// by the per-dtype projected_attention_sm90_<dtype>.cu files that instantiate it.
//
// Both maps are 2-D, innermost first (channel, row), boxes of 64 channels (one 128-byte swizzle
// row) in the 128-byte swizzle: q viewed as [total_q * H, Dv] (rows are flat (token, head) pairs;
// box 64 rows), x as [total_k, Dv] (box Sm90Cluster::kKeys keys).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/check.h"
#include "common/sm90_tma_host.h"
#include "projected/projected_attention_launch.cuh"  // the split-KV combine
#include "projected/projected_attention_sm90_kernel.cuh"
#include "projected/projected_sm90.h"

namespace crosslmm {
namespace projected {

// A [rows, dv] matrix of T (channel stride 1, row stride in elements) as a TMA map with boxes of
// 64 channels x box_rows rows. False when TMA cannot describe it.
template <typename T>
bool encode_rows_map(CUtensorMap* map, const void* ptr, int64_t rows, int64_t dv,
                     int64_t row_stride, int box_rows) {
  const sm90_tma::EncodeTiledFn encode = sm90_tma::encode_tiled();
  if (encode == nullptr || rows <= 0 || dv <= 0) return false;
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  constexpr int64_t kElem = static_cast<int64_t>(sizeof(T));
  // A single row is never stepped along, so its stride is free: give it a valid one.
  const int64_t row_bytes = rows > 1 ? row_stride * kElem : dv * kElem;
  if (row_bytes <= 0 || row_bytes % 16 != 0 || row_bytes >= (int64_t{1} << 40)) return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(dv), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(row_bytes)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(Sm90Cluster::kAtom),
                             static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUtensorMapDataType dtype = std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                              : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  return encode(map, dtype, 2, const_cast<void*>(ptr), dims, strides, box, element_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <typename T>
bool run_projected_forward_sm90(const ProjectedForwardParams& p, cudaStream_t stream) {
  using Cfg = Sm90Cluster;
  if (p.num_m_blocks == 0 || p.batch == 0 || p.num_splits == 0) return true;
  TORCH_CHECK(p.head_dim > 0 && p.head_dim % Cfg::kAtom == 0 && p.head_dim <= Cfg::kDvMax &&
                  p.num_splits <= kMaxSplits && p.keys_per_tile == Cfg::kKeys,
              "projected_attention_core_forward (sm90_cluster): inconsistent launch plan");
  sm90_tma::make_context_current();
  CUtensorMap map_q, map_x;
  // q's rows are flat (token, head) pairs: one row stride (the head stride, or with one head the
  // token stride).
  const int64_t q_rows = static_cast<int64_t>(p.total_q) * p.num_heads;
  const int64_t q_row_stride = p.num_heads > 1 ? p.q_head_stride : p.q_token_stride;
  TORCH_CHECK(p.num_heads == 1 || p.total_q <= 1 ||
                  p.q_token_stride == p.num_heads * p.q_head_stride,
              "projected_attention_core_forward (sm90_cluster): q must be row-flat");
  if (!encode_rows_map<T>(&map_q, p.q, q_rows, p.head_dim, q_row_stride, Cfg::kBlockM) ||
      !encode_rows_map<T>(&map_x, p.x, p.total_k, p.head_dim, p.x_token_stride, Cfg::kKeys)) {
    return false;
  }
  auto kernel = projected_attention_core_forward_sm90_kernel<T>;
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
  const int64_t ctas = static_cast<int64_t>(p.num_m_blocks) * p.num_splits * p.batch *
                       Cfg::kClusterSize;
  TORCH_CHECK(ctas <= 0x7fffffff, "projected_attention_core_forward: grid too large (", ctas,
              " CTAs)");
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(ctas), 1, 1);
  config.blockDim = dim3(Cfg::kThreads, 1, 1);
  config.dynamicSmemBytes = Cfg::kSmemBytes;
  config.stream = stream;
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = Cfg::kClusterSize;
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  config.attrs = &cluster;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p, map_q, map_x));
  CROSSLMM_CHECK_LAUNCH();
  if (p.num_splits > 1) launch_projected_forward_combine<T>(p, stream);
  return true;
}

}  // namespace projected
}  // namespace crosslmm
