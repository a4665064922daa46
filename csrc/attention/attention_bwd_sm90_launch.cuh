// Host side of the Hopper (sm_90a) attention backward: TMA tensor maps, the dQ key-split plan and
// the launches. Included by the per-dtype attention_bwd_sm90_<dtype>_hd128.cu files.
//
// Order on the stream: Delta = rowsum(dout * out) (the mma.sync preprocess kernel), the sm90 dK/dV
// kernel, then dQ: the sm90 dQ kernel (+ the split sum kernel when the keys are split), or the
// mma.sync dQ kernel (attention_bwd_kernel.cuh) when wgmma_dq is false. The tensor maps are those
// of the forward (sm90_host::encode_token_map): 3-D over [tokens, heads, 128] with the tensors' own
// strides, boxes of 64 channels x 1 head x box rows in the 128-byte swizzle. dK/dV: q, dout with
// 64-row boxes, k, v with 128-row boxes; dQ: q, dout with 128-row boxes, k, v with 64-row boxes.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "attention/attention_bwd_kernel.cuh"  // the Delta and mma.sync dQ kernels
#include "attention/attention_bwd_sm90.h"
#include "attention/attention_bwd_sm90_kernel.cuh"
#include "attention/attention_fwd_sm90_launch.cuh"  // sm90_host::encode_token_map
#include "attention/attention_params.h"
#include "common/check.h"

namespace crosslmm {
namespace attention {

constexpr int kSm90BwdStages = 2;    // query-tile ring of the dK/dV kernel
constexpr int kSm90DqStages = 3;     // K/V ring of the dQ kernel
constexpr int kSm90DqMaxSplits = 64;

namespace sm90_host {

// Key splits of the sm90 dQ kernel: the count that minimises a time model in units of one CTA's
// work on one 64-key tile (about 1.5 us on an H100): full waves of ceil(key_tiles / s) + 2 tiles
// each (+ 2: loading Q and dO, the epilogue), plus for s > 1 the fp32 partials written and summed
// (64 KB per CTA and split, written and read, ~43 ns of the whole GPU's ~3 TB/s: ~0.03 tile) and
// the sum kernel's launch (~2 tiles). Each split keeps at least 4 key tiles.
inline int dq_key_splits(int64_t ctas, int64_t key_tiles, int64_t sms) {
  const int64_t max_splits =
      std::min<int64_t>(kSm90DqMaxSplits, std::max<int64_t>(1, key_tiles / 4));
  int64_t best = 1;
  double best_cost = 0.0;
  for (int64_t s = 1; s <= max_splits; ++s) {
    const double waves = static_cast<double>((ctas * s + sms - 1) / sms);
    double cost = waves * static_cast<double>((key_tiles + s - 1) / s + 2);
    if (s > 1) cost += 2.0 + 0.03 * static_cast<double>(ctas * s);
    if (s == 1 || cost < best_cost * 0.98) {  // a new split count must win by 2%
      best = s;
      best_cost = cost;
    }
  }
  return static_cast<int>(best);
}

}  // namespace sm90_host

template <typename T, int kHeadDim>
bool run_attention_backward_sm90(const AttentionBackwardParams& p, bool wgmma_dq, int num_sms,
                                 cudaStream_t stream) {
  static_assert(kHeadDim == 128, "the sm90 backward is instantiated for head dim 128 only");
  using KvCfg = Sm90BackwardDkDvConfig<kHeadDim, kSm90BwdStages>;
  using DqCfg = Sm90BackwardDqConfig<kHeadDim, kSm90DqStages>;
  using Tile = BackwardTile<kHeadDim>;
  static_assert(KvCfg::kBlockN == kSm90BwdBlockN && KvCfg::kBlockN == 2 * kBlockN,
                "num_n_blocks counts 64-key tiles; two make one sm90 dK/dV key tile");
  static_assert(DqCfg::kBlockN == kBlockN, "the sm90 dQ kernel walks 64-key tiles");
  if (p.batch == 0) return true;

  // The maps first: nothing may be launched before we know the sm90 path can run. Without query
  // tokens (or keys) no kernel issues a load through the missing maps, but a map must be passed.
  CUtensorMap kv_map_q, kv_map_dout, kv_map_k, kv_map_v;  // dK/dV kernel's boxes
  CUtensorMap dq_map_q, dq_map_dout, dq_map_k, dq_map_v;  // dQ kernel's boxes
  for (CUtensorMap* m : {&kv_map_q, &kv_map_dout, &kv_map_k, &kv_map_v, &dq_map_q, &dq_map_dout,
                         &dq_map_k, &dq_map_v}) {
    memset(m, 0, sizeof(*m));
  }
  auto encode = [](CUtensorMap* map, const void* ptr, int tokens, int heads, int64_t token_stride,
                   int64_t head_stride, int box_rows) {
    return sm90_host::encode_token_map<T, kHeadDim>(map, ptr, tokens, heads, token_stride,
                                                    head_stride, box_rows);
  };
  const bool have_q = p.total_q > 0;
  const bool have_k = p.total_k > 0 && p.num_n_blocks > 0;
  if (have_q && have_k) {
    sm90_host::make_context_current();  // autograd's thread may have none (see the function)
    if (!encode(&kv_map_q, p.q, p.total_q, p.num_heads_q, p.q_token_stride, p.q_head_stride,
                KvCfg::kBlockM) ||
        !encode(&kv_map_dout, p.dout, p.total_q, p.num_heads_q, p.dout_token_stride,
                p.dout_head_stride, KvCfg::kBlockM) ||
        !encode(&kv_map_k, p.k, p.total_k, p.num_heads_k, p.k_token_stride, p.k_head_stride,
                KvCfg::kBlockN) ||
        !encode(&kv_map_v, p.v, p.total_k, p.num_heads_k, p.v_token_stride, p.v_head_stride,
                KvCfg::kBlockN)) {
      return false;
    }
    if (wgmma_dq &&
        (!encode(&dq_map_q, p.q, p.total_q, p.num_heads_q, p.q_token_stride, p.q_head_stride,
                 DqCfg::kBlockM) ||
         !encode(&dq_map_dout, p.dout, p.total_q, p.num_heads_q, p.dout_token_stride,
                 p.dout_head_stride, DqCfg::kBlockM) ||
         !encode(&dq_map_k, p.k, p.total_k, p.num_heads_k, p.k_token_stride, p.k_head_stride,
                 DqCfg::kBlockN) ||
         !encode(&dq_map_v, p.v, p.total_k, p.num_heads_k, p.v_token_stride, p.v_head_stride,
                 DqCfg::kBlockN))) {
      return false;
    }
  }

  const int64_t delta_rows = static_cast<int64_t>(p.total_q) * p.num_heads_q;
  if (delta_rows > 0) {
    constexpr int kRowsPerCta = kDeltaThreads / (kHeadDim / 8);
    const int64_t ctas = (delta_rows + kRowsPerCta - 1) / kRowsPerCta;
    TORCH_CHECK(ctas <= 0x7fffffff, "attention_backward: Delta grid too large (", ctas, " CTAs)");
    attention_backward_delta_kernel<T, kHeadDim>
        <<<static_cast<unsigned>(ctas), kDeltaThreads, 0, stream>>>(p);
    CROSSLMM_CHECK_LAUNCH();
  }

  // dK / dV: one CTA per (128-key tile, kv head, segment); it writes its keys' rows (zeros for a
  // segment without queries).
  if (have_k) {
    const int key_tiles = (p.num_n_blocks + 1) / 2;  // 128-key tiles of the longest segment
    const int64_t ctas = static_cast<int64_t>(key_tiles) * p.num_heads_k * p.batch;
    TORCH_CHECK(ctas <= 0x7fffffff, "attention_backward: dK/dV grid too large (", ctas, " CTAs)");
    auto kernel = attention_backward_dkdv_sm90_kernel<T, kHeadDim, kSm90BwdStages>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        KvCfg::kSmemBytes));
    kernel<<<static_cast<unsigned>(ctas), KvCfg::kThreads, KvCfg::kSmemBytes, stream>>>(
        p, kv_map_q, kv_map_dout, kv_map_k, kv_map_v, key_tiles);
    CROSSLMM_CHECK_LAUNCH();
  }

  if (!wgmma_dq) {
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
    return true;
  }

  // sm90 dQ: one CTA per (128-row tile of one query head, head, key split, segment). p carries the
  // mma.sync plan (num_m_blocks = ceil(max_seqlen_q * rows_per_query / 64)), from which a bound
  // rows_bound >= max_seqlen_q follows; an extra m-block from the rounding exits at once.
  if (!have_q) return true;
  const int rows_bound = static_cast<int>(
      std::min<int64_t>(static_cast<int64_t>(p.num_m_blocks) * kBackwardBlockM / p.rows_per_query,
                        p.total_q));
  if (rows_bound == 0) return true;
  const int m_blocks = (rows_bound + DqCfg::kBlockM - 1) / DqCfg::kBlockM;
  const int64_t base_ctas = static_cast<int64_t>(m_blocks) * p.num_heads_q * p.batch;
  const int splits = have_k ? sm90_host::dq_key_splits(base_ctas, p.num_n_blocks, num_sms) : 1;
  const int64_t ctas = base_ctas * splits;
  TORCH_CHECK(ctas <= 0x7fffffff, "attention_backward: dQ grid too large (", ctas, " CTAs)");
  at::Tensor partial;  // from PyTorch's caching allocator, on the current stream
  float* partial_ptr = nullptr;
  if (splits > 1) {
    partial = at::empty({static_cast<int64_t>(splits) * p.num_heads_q * p.total_q, kHeadDim},
                        at::TensorOptions().dtype(at::kFloat).device(at::kCUDA));
    partial_ptr = partial.data_ptr<float>();
  }
  auto kernel = attention_backward_dq_sm90_kernel<T, kHeadDim, kSm90DqStages>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      DqCfg::kSmemBytes));
  kernel<<<static_cast<unsigned>(ctas), DqCfg::kThreads, DqCfg::kSmemBytes, stream>>>(
      p, dq_map_q, dq_map_dout, dq_map_k, dq_map_v, m_blocks, splits, partial_ptr);
  CROSSLMM_CHECK_LAUNCH();
  if (splits > 1) {
    const int64_t threads_per_segment =
        static_cast<int64_t>(rows_bound) * p.num_heads_q * (kHeadDim / 8);
    const int64_t ctas_per_segment = (threads_per_segment + 255) / 256;
    const int64_t sum_ctas = ctas_per_segment * p.batch;
    TORCH_CHECK(sum_ctas <= 0x7fffffff, "attention_backward: dQ sum grid too large (", sum_ctas,
                " CTAs)");
    attention_backward_dq_sum_kernel<T, kHeadDim><<<static_cast<unsigned>(sum_ctas), 256, 0,
                                                    stream>>>(
        p, splits, partial_ptr, rows_bound, static_cast<int>(ctas_per_segment));
    CROSSLMM_CHECK_LAUNCH();
  }
  return true;
}

}  // namespace attention
}  // namespace crosslmm
