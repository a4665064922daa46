// Host entry of the projection-fused attention core: argument checks, the launch plan (Dv bucket,
// row tile height, pipeline depth, key splits), scratch, and dispatch to the per-(dtype, Dv bucket)
// kernel files.
//
//   projected_attention_core_forward(q, x, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
//                               softmax_scale, num_splits, kernel = "auto") -> (out, lse)
//
// For every segment b (queries cu_seqlens_q[b] .. cu_seqlens_q[b+1], keys cu_seqlens_k[b] ..
// cu_seqlens_k[b+1]) and head h:
//
//   out[i, h] = softmax_j(q[i, h] . x[j] * softmax_scale) x[j]       lse[h, i] = log sum_j exp(...)
//
// i.e. cross_attention(q, x[:, None], x[:, None]) with head dim Dv: multi-query attention whose
// keys and values are the same tensor (DESIGN.md, "Projection-fused attention").
//
// q: [total_q, H, Dv] fp16/bf16, channel stride 1, any token/head strides; x: [total_k, Dv], same
// dtype, channel stride 1, any token stride (strides that are not multiples of 8 elements, or a
// base that is not 16-byte aligned, cost one copy: the kernel moves 16 bytes at a time). Dv a
// multiple of 8, at most 2048. cu_seqlens_*: int32 [B + 1] on q's device. out: new, contiguous,
// q's dtype; lse: new, fp32 [H, total_q], natural log. A segment without keys gives out = 0 and
// lse = -inf; a segment without queries is skipped; query tokens outside every segment are left
// unwritten. max_seqlen_q / max_seqlen_k are trusted bounds on the segment lengths, as in
// flash-attn (a longer segment is not fully computed; the Python layer computes them).
// num_splits: 0 = heuristic, else that many key splits per segment (at most 256).
//
// kernel (crosslmm_ops/planner.py's projected_core_kernel decides; nothing here reads the
// environment); every choice computes the same function:
// * "sm90_cluster": the Hopper kernel of projected_attention_sm90_kernel.cuh where it can run (an
//   sm_90 GPU, a 90a build, Dv a multiple of 64 up to 1152, at least one key, tensors TMA can
//   describe), else as "auto";
// * "auto": the mma.sync kernels, with the decode kernel (projected_decode_kernel.cuh, cp.async
//   loads) for one-tile calls where it fits (the launch plan below);
// * "mma_sync": the general mma.sync kernels only; "decode" / "decode_bulk": the decode kernel with
//   cp.async / bulk-copy loads where it can run, else the general kernels.
// projected_attention_core_forward_kernel_name() says which kernel ran.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>

#include "attention/attention_params.h"  // attention_forward_sm90_compiled: the build has 90a
#include "common/check.h"
#include "projected/projected_host.h"
#include "projected/projected_params.h"
#include "projected/projected_sm90.h"

namespace crosslmm {
namespace {

using projected::kBlockN;
using projected::kBlockNWide;
using projected::kDvLarge;
using projected::kDvSmall;
using projected::kMaxStages;
using projected::kMinStages;
using projected::ProjectedForwardParams;
using projected::ProjectedTile;
using projected::choose_splits;
using projected::max_smem_per_block;

constexpr const char* kOp = "projected_attention_core_forward";
constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// Shared memory of the kernel instantiations (keys: kBlockN, or kBlockNWide for Dv bucket
// kDvSmall with one m16 tile, the only wide instantiation).
int fixed_smem_bytes(int dv_max, int m_tiles, int keys) {
  if (dv_max == kDvSmall) {
    if (m_tiles == 2) return ProjectedTile<kDvSmall, 2>::kFixedBytes;
    return keys == kBlockNWide ? ProjectedTile<kDvSmall, 1, kBlockNWide>::kFixedBytes
                               : ProjectedTile<kDvSmall, 1>::kFixedBytes;
  }
  return ProjectedTile<kDvLarge, 1>::kFixedBytes;
}

int stage_smem_bytes(int dv_max, int keys) {
  if (dv_max == kDvSmall) {
    return keys == kBlockNWide ? ProjectedTile<kDvSmall, 1, kBlockNWide>::kStageBytes
                               : ProjectedTile<kDvSmall, 1>::kStageBytes;
  }
  return ProjectedTile<kDvLarge, 1>::kStageBytes;
}

// x tiles that fit in the shared memory a CTA may use, at most kMaxStages (0 when fewer than
// kMinStages fit).
int stages_that_fit(int dv_max, int m_tiles, int keys, int smem_limit) {
  const int stages =
      std::min<int>(kMaxStages, (smem_limit - fixed_smem_bytes(dv_max, m_tiles, keys)) /
                                    stage_smem_bytes(dv_max, keys));
  return stages >= kMinStages ? stages : 0;
}

// The decode kernel's load path for the binding's `kernel` argument where the decode kernel can
// run: "auto", "decode" and "sm90_cluster" (where that kernel cannot run) cp.async, "decode_bulk"
// bulk copies, "mma_sync" none (the general kernels).
int decode_kernel_for(const std::string& kernel) {
  if (kernel == "auto" || kernel == "decode" || kernel == "sm90_cluster") {
    return projected::kDecodeCpAsync;
  }
  if (kernel == "decode_bulk") return projected::kDecodeBulk;
  TORCH_CHECK(kernel == "mma_sync", kOp,
              ": kernel must be 'auto', 'mma_sync', 'decode', 'decode_bulk' or 'sm90_cluster', got '",
              kernel, "'");
  return projected::kDecodeNone;
}

// The parameters both kernels share, and the split-KV scratch they write when `splits` > 1,
// allocated into `scratch` (the caller keeps it until the launches are queued). The caller adds
// its kernel's own fields (the mma.sync kernel's column split and stages).
ProjectedForwardParams forward_params(const at::Tensor& q, const at::Tensor& x, at::Tensor& out,
                                      at::Tensor& lse, const at::Tensor& cu_seqlens_q,
                                      const at::Tensor& cu_seqlens_k, int64_t batch,
                                      int64_t max_seqlen_q, int64_t num_m_blocks, int64_t splits,
                                      int keys, double softmax_scale,
                                      at::Tensor (&scratch)[2]) {
  const int64_t total_q = q.size(0), heads = q.size(1), dv = q.size(2);
  if (splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    scratch[0] = at::empty({splits, total_q * heads, dv}, f32);
    scratch[1] = at::empty({splits, total_q * heads}, f32);
  }
  ProjectedForwardParams p{};
  p.q = q.data_ptr();
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.out_partial = splits > 1 ? scratch[0].data_ptr<float>() : nullptr;
  p.lse_partial = splits > 1 ? scratch[1].data_ptr<float>() : nullptr;
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  p.q_token_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.x_token_stride = x.stride(0);
  p.batch = static_cast<int>(batch);  // <= the grid size, checked by the caller
  p.num_heads = static_cast<int>(heads);
  p.head_dim = static_cast<int>(dv);
  p.total_q = static_cast<int>(total_q);
  p.total_k = static_cast<int>(x.size(0));
  p.max_seqlen_q = static_cast<int>(max_seqlen_q);
  p.num_m_blocks = static_cast<int>(num_m_blocks);
  p.num_splits = static_cast<int>(splits);
  p.keys_per_tile = keys;
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  return p;
}

// The sm90_cluster launch plan: 64-row tiles of (query, head) rows, 32-key x tiles, key splits by
// choose_splits with one 2-CTA cluster per two multiprocessors per wave. q is made row-flat (one
// stride between consecutive (token, head) rows: the kernel reads a tile as one TMA box). False
// when TMA cannot describe the tensors (nothing launched; the caller runs mma_sync).
bool run_sm90_cluster(const at::Tensor& q, const at::Tensor& x, at::Tensor& out, at::Tensor& lse,
                      const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                      int64_t batch, int64_t max_seqlen_q, int64_t max_seqlen_k,
                      double softmax_scale, int64_t num_splits) {
  using Cfg = projected::Sm90Cluster;
  const int64_t total_q = q.size(0), heads = q.size(1);
  const bool row_flat = heads == 1 || total_q <= 1 || q.stride(0) == heads * q.stride(1);
  const at::Tensor q_rows = row_flat ? q : q.contiguous();
  const int64_t rows = max_seqlen_q * heads;
  const int64_t num_m_blocks = ceil_div(rows, Cfg::kBlockM);
  const int64_t key_tiles = ceil_div(max_seqlen_k, Cfg::kKeys);
  const int64_t wave = std::max<int64_t>(1, multiprocessor_count() / Cfg::kClusterSize);
  const int64_t splits = choose_splits(num_splits, num_m_blocks * batch, key_tiles, wave);
  TORCH_CHECK(num_m_blocks * batch * splits * Cfg::kClusterSize <= kInt32Max, kOp,
              ": grid too large (", num_m_blocks * batch * splits, " clusters)");
  at::Tensor scratch[2];
  const ProjectedForwardParams p =
      forward_params(q_rows, x, out, lse, cu_seqlens_q, cu_seqlens_k, batch, max_seqlen_q,
                     num_m_blocks, splits, Cfg::kKeys, softmax_scale, scratch);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  return q.scalar_type() == at::kHalf
             ? projected::run_projected_forward_sm90<__half>(p, stream)
             : projected::run_projected_forward_sm90<__nv_bfloat16>(p, stream);
}

// The kernel the last call on this thread ran: "sm90_cluster", "decode", "decode_bulk", "mma_sync"
// or "none".
thread_local const char* last_kernel = "none";

}  // namespace

std::string projected_attention_core_forward_kernel_name() { return last_kernel; }

std::tuple<at::Tensor, at::Tensor> projected_attention_core_forward(
    const at::Tensor& q, const at::Tensor& x, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double softmax_scale, int64_t num_splits, const std::string& kernel) {
  last_kernel = "none";
  // ---- checks -------------------------------------------------------------------------------
  projected::check_core_inputs(kOp, q, x, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale, num_splits);
  const int64_t total_q = q.size(0), heads = q.size(1), dv = q.size(2);
  const int64_t total_k = x.size(0);
  const int decode_load_path = decode_kernel_for(kernel);

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({total_q, heads, dv}, q.options());
  at::Tensor lse = at::empty({heads, total_q}, q.options().dtype(at::kFloat));
  const int64_t batch = cu_seqlens_q.numel() - 1;
  // A bound larger than the whole packed dimension is allowed (as in flash-attn) but means no more.
  max_seqlen_q = std::min(max_seqlen_q, total_q);
  max_seqlen_k = std::min(max_seqlen_k, total_k);
  if (batch == 0 || total_q == 0 || max_seqlen_q == 0) return {out, lse};  // no rows to write

  // Strides the 16-byte loads cannot follow: one contiguous copy (the common callers pass
  // contiguous tensors, and slices at multiples of 8 elements are read in place).
  const at::Tensor q_read = projected::readable_16_byte(q);
  const at::Tensor x_read = projected::readable_16_byte(x);

  // (Without any key, every row is out 0 / lse -inf: the mma.sync kernel writes that, and TMA
  // cannot describe an x without rows.)
  if (kernel == "sm90_cluster" && attention::attention_forward_sm90_compiled() && dv % 64 == 0 &&
      dv <= projected::Sm90Cluster::kDvMax && total_k > 0 && max_seqlen_k > 0 &&
      device_is_sm90(q.get_device())) {
    if (run_sm90_cluster(q_read, x_read, out, lse, cu_seqlens_q, cu_seqlens_k, batch,
                         max_seqlen_q, max_seqlen_k, softmax_scale, num_splits)) {
      last_kernel = "sm90_cluster";
      return {out, lse};
    }
  }

  // ---- launch plan --------------------------------------------------------------------------
  const projected::ColumnSplit columns = projected::column_split(dv);
  const int dv_max = columns.dv_max;

  // Row tile: one m16 tile when a segment has at most 16 rows (decode: 1 token x 12 heads), else
  // two (32 rows: half the re-reads of each frame's x against 16-row tiles) where the registers
  // (Dv <= 1152) and this GPU's shared memory allow.
  const int smem_limit = max_smem_per_block();
  const int64_t rows = max_seqlen_q * heads;
  int m_tiles = 1;
  int keys = kBlockN;
  int stages = stages_that_fit(dv_max, 1, kBlockN, smem_limit);
  if (rows > 16 && dv_max == kDvSmall) {
    const int stages2 = stages_that_fit(dv_max, 2, kBlockN, smem_limit);
    if (stages2 > 0) {
      m_tiles = 2;
      stages = stages2;
    }
  }
  // One m16 tile (decode: 1 token x 12 heads against all of x): 32-key x tiles where two stages
  // of them fit (208 KB of the H100's 227; not an A100's 163), half the per-tile barriers and
  // cross-warp score sums of 16-key tiles.
  if (m_tiles == 1 && dv_max == kDvSmall) {
    const int stages_wide = stages_that_fit(dv_max, 1, kBlockNWide, smem_limit);
    if (stages_wide > 0) {
      keys = kBlockNWide;
      stages = stages_wide;
    }
  }
  // The decode kernel (projected_decode_kernel.cuh) replaces the 32-key one-tile launch wherever
  // its ring of kDecodeSlots 16-key slots fits (207.6 KB: H100/H200, not an A100, which keeps the
  // general kernel with 16-key tiles): same tiles and results, but q in registers and a 5-slot ring
  // keep x's loads in flight across tile boundaries, which the 2-stage 32-key kernel cannot (it is
  // bound by reading x: decode). Its load path: cp.async unless the call's `kernel` asks for bulk
  // copies; kernel = "mma_sync" keeps the general kernel (decode_kernel_for).
  int decode_kernel = projected::kDecodeNone;
  if (m_tiles == 1 && dv_max == kDvSmall && keys == kBlockNWide &&
      projected::DecodeTile::kSmemBytes <= smem_limit) {
    decode_kernel = decode_load_path;
  }
  TORCH_CHECK(stages > 0, kOp, ": Dv = ", dv, " needs ",
              ProjectedTile<kDvLarge, 1>::smem_bytes(kMinStages),
              " bytes of shared memory per block, this GPU allows ", smem_limit,
              " (Dv <= ", kDvSmall, " needs ", ProjectedTile<kDvSmall, 1>::smem_bytes(kMinStages),
              ")");
  const int64_t num_m_blocks = ceil_div(rows, 16 * m_tiles);

  // Split units: key tiles, or the decode kernel's 16-key slots (it cuts splits at 16 keys, so
  // they differ by at most 16 keys: 88 or 89 slots each at T = 256 on 132 SMs, not 44 or 45 tiles).
  const int64_t units_per_tile = decode_kernel != projected::kDecodeNone ? 2 : 1;
  const int64_t key_tiles = ceil_div(max_seqlen_k, keys / units_per_tile);
  int ctas_per_sm = 1;  // the decode kernel: one CTA per SM (DecodeTile's static_assert)
  if (num_splits == 0 && decode_kernel == projected::kDecodeNone) {
    projected::dispatch_dtype_dv(kOp, q.scalar_type(), dv_max, [&]<typename T, int kDvMax>() {
      ctas_per_sm = projected::projected_forward_ctas_per_sm<T, kDvMax>(m_tiles, keys, stages);
    });
  }
  const int64_t wave = static_cast<int64_t>(multiprocessor_count()) * ctas_per_sm;
  const int64_t splits =
      choose_splits(num_splits, num_m_blocks * batch, key_tiles, wave, units_per_tile);
  TORCH_CHECK(num_m_blocks * batch * splits <= kInt32Max, kOp, ": grid too large (",
              num_m_blocks * batch * splits, " CTAs)");

  at::Tensor scratch[2];
  ProjectedForwardParams p = forward_params(q_read, x_read, out, lse, cu_seqlens_q, cu_seqlens_k,
                                            batch, max_seqlen_q, num_m_blocks, splits, keys,
                                            softmax_scale, scratch);
  p.cols_per_warp = columns.cols_per_warp;
  p.active_warps = columns.active_warps;
  p.stages = stages;
  p.decode_kernel = decode_kernel;
  last_kernel = decode_kernel == projected::kDecodeNone   ? "mma_sync"
                : decode_kernel == projected::kDecodeBulk ? "decode_bulk"
                                                          : "decode";

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  projected::dispatch_dtype_dv(kOp, q.scalar_type(), dv_max, [&]<typename T, int kDvMax>() {
    projected::run_projected_forward<T, kDvMax>(p, m_tiles, stream);
  });
  return {out, lse};
}

}  // namespace crosslmm
