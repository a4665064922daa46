// Host entry of the projection-fused core's backward: argument checks, the launch plan (Dv bucket,
// pipeline depths, splits), scratch, and dispatch to the per-(dtype, Dv bucket) kernel files.
//
//   projected_attention_core_backward(dout, q, x, out, lse, cu_seqlens_q, cu_seqlens_k,
//                                     max_seqlen_q, max_seqlen_k, softmax_scale, num_splits,
//                                     dlse = None) -> (dq, dx)
//
// The gradients of projected_attention_core_forward (projected_attention.cu): for every segment b
// and head h, with P = exp(scale q x^T - lse),
//
//   dq = scale dS x     dx = P^T dO + scale dS^T q     dS = P o (dO x^T - delta)
//   delta = rowsum(dO o out) - dlse
//
// summed over every query token and head of the segment for dx. Deterministic: no atomics, and
// split partials are added in a fixed order, so equal inputs give bitwise equal gradients.
//
// dout, q, out: [total_q, H, Dv] fp16/bf16, one dtype, channel stride 1, any token/head strides (as
// the forward: strides that are not multiples of 8 elements cost one copy); x: [total_k, Dv]; lse:
// fp32 [H, total_q] (the forward's); dlse: None or fp32 [H, total_q]. dq: new, contiguous [total_q,
// H, Dv]; dx: new, contiguous [total_k, Dv]. Query tokens without keys get dq = 0, keys without
// queries dx = 0; tokens outside every segment are left unwritten. max_seqlen_q / max_seqlen_k are
// trusted bounds, as in the forward. num_splits: 0 = heuristic, else the number of key ranges of
// the dq kernel and of row ranges of the dx kernel (each at most 256 and at most its tile count).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "common/check.h"
#include "projected/projected_backward_params.h"
#include "projected/projected_host.h"

namespace crosslmm {
namespace {

using projected::kBwdBlockM;
using projected::kBwdBlockN;
using projected::kBwdMaxStages;
using projected::kBwdMinStages;
using projected::kDvLarge;
using projected::ProjectedBackwardParams;
using projected::ProjectedBackwardTile;

constexpr const char* kOp = "projected_attention_core_backward";
constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

struct BackwardStages {
  int dq;
  int dx;
};

// Pipeline depths that fit in `smem_limit` bytes per block, at most kBwdMaxStages (0 when not even
// one stage fits).
template <int kDvMax>
BackwardStages stages_that_fit(int smem_limit) {
  using Tile = ProjectedBackwardTile<kDvMax>;
  auto fit = [&](int fixed, int stage) {
    const int stages = std::min<int>(kBwdMaxStages, (smem_limit - fixed) / stage);
    return stages >= kBwdMinStages ? stages : 0;
  };
  return {fit(Tile::kDqFixedBytes, Tile::kDqStageBytes),
          fit(Tile::kDxFixedBytes, Tile::kDxStageBytes)};
}

// A [total_q, H, Dv] operand: same dtype, device and shape as q, channel stride 1.
void check_like_q(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), kOp, ": ", name, " must be on ", q.device(),
              " like q, got ", t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), kOp, ": ", name, " must have q's dtype ",
              q.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == q.sizes(), kOp, ": ", name, " must have q's shape ", q.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1, kOp, ": ", name,
              " must have channel (last-dim) stride 1, got strides ", t.strides());
}

// An fp32 [H, total_q] per-row statistic (lse, dlse) on q's device.
void check_row_stat(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), kOp, ": ", name, " must be on ", q.device(),
              " like q, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, kOp, ": ", name, " must have dtype float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == q.size(1) && t.size(1) == q.size(0), kOp, ": ", name,
              " must have shape [num_heads, total_q] = [", q.size(1), ", ", q.size(0), "], got ",
              t.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> projected_attention_core_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& x, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, int64_t num_splits,
    const c10::optional<at::Tensor>& dlse) {
  // ---- checks -------------------------------------------------------------------------------
  projected::check_core_inputs(kOp, q, x, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale, num_splits);
  const int64_t total_q = q.size(0), heads = q.size(1), dv = q.size(2);
  const int64_t total_k = x.size(0);
  check_like_q("dout", dout, q);
  check_like_q("out", out, q);
  check_row_stat("lse", lse, q);
  if (dlse.has_value()) check_row_stat("dlse", *dlse, q);

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty({total_q, heads, dv}, q.options());
  at::Tensor dx = at::empty({total_k, dv}, x.options());
  const int64_t batch = cu_seqlens_q.numel() - 1;
  max_seqlen_q = std::min(max_seqlen_q, total_q);
  max_seqlen_k = std::min(max_seqlen_k, total_k);
  if (batch == 0 || (total_q == 0 && total_k == 0)) return {dq, dx};

  const at::Tensor q_read = projected::readable_16_byte(q);
  const at::Tensor x_read = projected::readable_16_byte(x);
  const at::Tensor dout_read = projected::readable_16_byte(dout);
  const at::Tensor out_read = projected::readable_16_byte(out);
  const at::Tensor lse_read = lse.contiguous();
  const at::Tensor dlse_read = dlse.has_value() ? dlse->contiguous() : at::Tensor();

  // ---- launch plan --------------------------------------------------------------------------
  const projected::ColumnSplit columns = projected::column_split(dv);
  const int smem_limit = projected::max_smem_per_block();
  BackwardStages stages{0, 0};
  projected::dispatch_dtype_dv(kOp, q.scalar_type(), columns.dv_max,
                               [&]<typename T, int kDvMax>() {
                                 stages = stages_that_fit<kDvMax>(smem_limit);
                               });
  TORCH_CHECK(stages.dq > 0 && stages.dx > 0, kOp, ": Dv = ", dv, " needs ",
              std::max(ProjectedBackwardTile<kDvLarge>::dq_smem_bytes(kBwdMinStages),
                       ProjectedBackwardTile<kDvLarge>::dx_smem_bytes(kBwdMinStages)),
              " bytes of shared memory per block, this GPU allows ", smem_limit, " (Dv <= ",
              projected::kDvSmall, " needs ",
              std::max(ProjectedBackwardTile<projected::kDvSmall>::dq_smem_bytes(kBwdMinStages),
                       ProjectedBackwardTile<projected::kDvSmall>::dx_smem_bytes(kBwdMinStages)),
              ")");

  const int64_t num_m_blocks = ceil_div(max_seqlen_q * heads, kBwdBlockM);
  const int64_t num_n_blocks = ceil_div(max_seqlen_k, kBwdBlockN);
  // Splits: the dq kernel's loop runs over a row tile's key tiles, the dx kernel's over a key
  // tile's row tiles; each is cut where its CTAs alone would leave the GPU idle (global segments:
  // few row tiles against thousands of key tiles, or the reverse).
  int dq_ctas_per_sm = 1, dx_ctas_per_sm = 1;
  if (num_splits == 0) {
    projected::dispatch_dtype_dv(kOp, q.scalar_type(), columns.dv_max,
                                 [&]<typename T, int kDvMax>() {
                                   projected::projected_backward_ctas_per_sm<T, kDvMax>(
                                       stages.dq, stages.dx, &dq_ctas_per_sm, &dx_ctas_per_sm);
                                 });
  }
  const int64_t sms = multiprocessor_count();
  const int64_t dq_splits = projected::choose_splits(num_splits, num_m_blocks * batch,
                                                     num_n_blocks, sms * dq_ctas_per_sm);
  const int64_t dx_splits = projected::choose_splits(num_splits, num_n_blocks * batch,
                                                     num_m_blocks, sms * dx_ctas_per_sm);
  TORCH_CHECK(num_m_blocks * batch * dq_splits <= kInt32Max &&
                  num_n_blocks * batch * dx_splits <= kInt32Max,
              kOp, ": grid too large (", num_m_blocks * batch * dq_splits, " dq CTAs, ",
              num_n_blocks * batch * dx_splits, " dx CTAs)");

  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor delta = at::empty({total_q * heads}, f32);
  at::Tensor dq_partial, dx_partial;
  if (dq_splits > 1 && num_m_blocks > 0) dq_partial = at::empty({dq_splits, total_q * heads, dv}, f32);
  if (dx_splits > 1 && num_n_blocks > 0) dx_partial = at::empty({dx_splits, total_k, dv}, f32);

  ProjectedBackwardParams p{};
  p.q = q_read.data_ptr();
  p.x = x_read.data_ptr();
  p.dout = dout_read.data_ptr();
  p.out = out_read.data_ptr();
  p.lse = lse_read.data_ptr<float>();
  p.dlse = dlse_read.defined() ? dlse_read.data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dx = dx.data_ptr();
  p.dq_partial = dq_partial.defined() ? dq_partial.data_ptr<float>() : nullptr;
  p.dx_partial = dx_partial.defined() ? dx_partial.data_ptr<float>() : nullptr;
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  p.q_token_stride = q_read.stride(0);
  p.q_head_stride = q_read.stride(1);
  p.dout_token_stride = dout_read.stride(0);
  p.dout_head_stride = dout_read.stride(1);
  p.out_token_stride = out_read.stride(0);
  p.out_head_stride = out_read.stride(1);
  p.x_token_stride = x_read.stride(0);
  p.batch = static_cast<int>(batch);  // <= the grid sizes, checked above
  p.num_heads = static_cast<int>(heads);
  p.head_dim = static_cast<int>(dv);
  p.total_q = static_cast<int>(total_q);
  p.total_k = static_cast<int>(total_k);
  p.cols_per_warp = columns.cols_per_warp;
  p.active_warps = columns.active_warps;
  p.dq_stages = stages.dq;
  p.dx_stages = stages.dx;
  p.num_m_blocks = static_cast<int>(num_m_blocks);
  p.num_n_blocks = static_cast<int>(num_n_blocks);
  p.dq_splits = dq_partial.defined() ? static_cast<int>(dq_splits) : 1;
  p.dx_splits = dx_partial.defined() ? static_cast<int>(dx_splits) : 1;
  p.max_seqlen_q = static_cast<int>(max_seqlen_q);
  p.max_seqlen_k = static_cast<int>(max_seqlen_k);
  p.scale = static_cast<float>(softmax_scale);
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  projected::dispatch_dtype_dv(kOp, q.scalar_type(), columns.dv_max,
                               [&]<typename T, int kDvMax>() {
                                 projected::run_projected_backward<T, kDvMax>(p, stream);
                               });
  return {dq, dx};
}

}  // namespace crosslmm
