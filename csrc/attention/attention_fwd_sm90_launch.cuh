// Host side of the Hopper (sm_90a) attention forward: TMA tensor maps and the launch. Included by
// the per-dtype attention_fwd_sm90_<dtype>_hd128.cu files that instantiate it.
//
// The tensor maps are built with the driver's cuTensorMapEncodeTiled (common/sm90_tma_host.h).
// Each map is 3-D over a [tokens, heads, head_dim] tensor with its own strides (innermost first:
// channel, head, token), so the head is a coordinate and strided views (slices of a fused qkv
// tensor) are read in place; the box is 64 channels x 1 head x 128 tokens in the 128-byte swizzle
// (K, V, and Q of one head), or 64 channels x the GQA group's heads x 128 / group tokens (Q with
// the group's heads packed).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "attention/attention_fwd_launch.cuh"  // the split-KV combine kernel and its launch
#include "attention/attention_fwd_sm90_kernel.cuh"
#include "attention/attention_fwd_sm90_packed_kernel.cuh"
#include "attention/attention_params.h"
#include "common/check.h"
#include "common/sm90_tma_host.h"

namespace crosslmm {
namespace attention {
namespace sm90_host {

using sm90_tma::encode_tiled;
using sm90_tma::EncodeTiledFn;
using sm90_tma::make_context_current;

// A [tokens, heads, kHeadDim] tensor of T (channel stride 1, other strides in elements) as a TMA
// map with boxes of 64 channels x box_heads heads x box_rows tokens. False when TMA cannot
// describe it (strides not multiples of 16 bytes or too large, base not 16-byte aligned, no
// tokens).
template <typename T, int kHeadDim>
bool encode_token_map(CUtensorMap* map, const void* ptr, int64_t tokens, int64_t heads,
                      int64_t token_stride, int64_t head_stride, int box_rows,
                      int box_heads = 1) {
  const EncodeTiledFn encode = encode_tiled();
  auto fail = [](int why) {
    sm90_last_encode_failure = why;
    return false;
  };
  if (encode == nullptr) return fail(1);
  if (tokens <= 0 || heads <= 0) return fail(2);
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return fail(3);
  constexpr int64_t kElem = static_cast<int64_t>(sizeof(T));
  // A dimension of size 1 is never stepped along, so its stride is free: give it a valid one.
  const int64_t head_bytes = heads > 1 ? head_stride * kElem : kHeadDim * kElem;
  const int64_t token_bytes = tokens > 1 ? token_stride * kElem : heads * kHeadDim * kElem;
  for (const int64_t bytes : {head_bytes, token_bytes}) {
    if (bytes <= 0 || bytes % 16 != 0 || bytes >= (int64_t{1} << 40)) return fail(4);
  }
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(kHeadDim), static_cast<cuuint64_t>(heads),
                              static_cast<cuuint64_t>(tokens)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(head_bytes),
                                 static_cast<cuuint64_t>(token_bytes)};
  const cuuint32_t box[3] = {64, static_cast<cuuint32_t>(box_heads),
                             static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUtensorMapDataType dtype = std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                              : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const CUresult res = encode(map, dtype, 3, const_cast<void*>(ptr), dims, strides, box,
                              element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                              CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                              CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (res != CUDA_SUCCESS) return fail(100 + static_cast<int>(res));
  return true;
}

}  // namespace sm90_host

constexpr int kSm90Stages = 2;

template <typename T, int kHeadDim>
bool run_attention_forward_sm90(const AttentionForwardParams& p, cudaStream_t stream) {
  static_assert(kHeadDim == 128, "the sm90 forward is instantiated for head dim 128 only");
  using Cfg = Sm90ForwardConfig<kHeadDim, kSm90Stages>;
  if (p.num_m_blocks == 0 || p.batch == 0) return true;  // nothing to write
  // One query head per CTA, or a GQA group's heads packed with whole tokens per tile.
  TORCH_CHECK(p.rows_per_query >= 1 && p.rows_per_query <= Cfg::kBlockM &&
                  p.head_ctas * p.rows_per_query == p.num_heads_q,
              "attention_forward (sm90): a tile's rows must be one head's or one group's");
  const int tokens_per_tile = Cfg::kBlockM / p.rows_per_query;
  TORCH_CHECK(p.scale_log2 > 0.f, "attention_forward (sm90): softmax_scale must be > 0");

  sm90_host::make_context_current();
  CUtensorMap map_q, map_k, map_v;
  if (!sm90_host::encode_token_map<T, kHeadDim>(&map_q, p.q, p.total_q, p.num_heads_q,
                                                p.q_token_stride, p.q_head_stride,
                                                tokens_per_tile, p.rows_per_query) ||
      !sm90_host::encode_token_map<T, kHeadDim>(&map_k, p.k, p.total_k, p.num_heads_k,
                                                p.k_token_stride, p.k_head_stride,
                                                Cfg::kBlockN) ||
      !sm90_host::encode_token_map<T, kHeadDim>(&map_v, p.v, p.total_k, p.num_heads_k,
                                                p.v_token_stride, p.v_head_stride,
                                                Cfg::kBlockN)) {
    return false;
  }

  auto kernel = attention_forward_sm90_kernel<T, kHeadDim, kSm90Stages>;
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
  const int64_t ctas =
      static_cast<int64_t>(p.num_m_blocks) * p.head_ctas * p.batch * p.num_splits;
  TORCH_CHECK(ctas <= 0x7fffffff, "attention_forward: grid too large (", ctas, " CTAs)");
  kernel<<<static_cast<unsigned>(ctas), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p, map_q, map_k,
                                                                                   map_v);
  CROSSLMM_CHECK_LAUNCH();

  if (p.num_splits > 1) launch_attention_forward_combine<T, kHeadDim>(p, stream);
  return true;
}

// Three stages: 112 KB, two CTAs per multiprocessor (attention_fwd_sm90_packed_kernel.cuh).
constexpr int kSm90PackedStages = 3;

// The packed kernel with its shared memory granted: two CTAs of 113 KB need the whole 228 KB
// carveout. Set on every use, since function attributes belong to the current device.
template <typename T, int kHeadDim>
auto sm90_packed_kernel_configured() {
  using Cfg = Sm90PackedConfig<kHeadDim, kSm90PackedStages>;
  auto kernel = attention_forward_sm90_packed_kernel<T, kHeadDim, kSm90PackedStages>;
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                      cudaSharedmemCarveoutMaxShared));
  return kernel;
}

template <typename T, int kHeadDim>
void run_attention_forward_sm90_packed(const AttentionForwardParams& p, cudaStream_t stream) {
  static_assert(kHeadDim == 128, "the packed sm90 forward is instantiated for head dim 128 only");
  using Cfg = Sm90PackedConfig<kHeadDim, kSm90PackedStages>;
  if (p.num_m_blocks == 0 || p.head_ctas == 0 || p.batch == 0) return;
  TORCH_CHECK(p.scale_log2 > 0.f, "attention_forward (sm90_packed): softmax_scale must be > 0");
  auto kernel = sm90_packed_kernel_configured<T, kHeadDim>();
  const int64_t ctas = static_cast<int64_t>(p.num_m_blocks) * p.head_ctas * p.batch * p.num_splits;
  TORCH_CHECK(ctas <= 0x7fffffff, "attention_forward: grid too large (", ctas, " CTAs)");
  kernel<<<static_cast<unsigned>(ctas), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  CROSSLMM_CHECK_LAUNCH();
  if (p.num_splits > 1) launch_attention_forward_combine<T, kHeadDim>(p, stream);
}

template <typename T, int kHeadDim>
int attention_forward_sm90_packed_ctas_per_sm() {
  using Cfg = Sm90PackedConfig<kHeadDim, kSm90PackedStages>;
  // Asked once per process (thread-safe static), as for the mma.sync kernel.
  static const int ctas = [] {
    auto kernel = sm90_packed_kernel_configured<T, kHeadDim>();
    int n = 0;
    C10_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, Cfg::kThreads, Cfg::kSmemBytes));
    return n > 0 ? n : 1;
  }();
  return ctas;
}

}  // namespace attention
}  // namespace crosslmm
