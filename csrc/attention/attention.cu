// Host entry points of the cross-attention kernels: argument checks, the launch plan (tile height,
// GQA packing, key splits), scratch buffers, and dispatch to the per-(dtype, head dim) kernel
// files.
//
//   attention_forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
//                     softmax_scale, num_splits, kernel) -> the kernel that ran
//   attention_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
//                      max_seqlen_q, max_seqlen_k, softmax_scale, deterministic, kernel)
//                      -> the kernel that ran
//
// Layout: packed varlen as in flash-attn's varlen API. q, out, dout, dq: [total_q, Hq, D];
// k, v, dk, dv: [total_k, Hk, D]; channel stride 1, token and head strides any multiple of 8
// elements (so slices of a fused qkv tensor are read in place); lse: fp32 [Hq, total_q], natural
// log. cu_seqlens_q / cu_seqlens_k: int32 [B + 1] on the device; segment b's queries attend only to
// segment b's keys. max_seqlen_q / max_seqlen_k must bound the segment lengths (as in flash-attn
// they are trusted, not recomputed: a segment longer than max_seqlen_q is not fully computed).
// Hq must be a multiple of Hk (GQA: query head h reads kv head h / (Hq / Hk)). dtypes fp16 and
// bf16, head dims 64 and 128.
//
// The backward is deterministic whatever `deterministic` says: no kernel uses atomics (see
// attention_bwd_kernel.cuh), so repeated calls give bitwise-equal gradients.
//
// Which kernel runs is the caller's choice, the `kernel` argument (crosslmm_ops/planner.py decides
// it, with the environment overrides CROSSLMM_ATTENTION_SM90 / CROSSLMM_ATTENTION_BWD_SM90, and
// passes it here; nothing in this file reads the environment):
//   forward   "mma_sync": the mma.sync kernel (attention_fwd_kernel.cuh), every GPU;
//             "sm90": the wgmma + TMA kernel (attention_fwd_sm90_kernel.cuh) where it can run (an
//             sm_90 GPU, a 90a build, head dim 128, softmax_scale > 0, tensors TMA can describe),
//             else the mma.sync kernel; "sm90_packed": wgmma over a cp.async ring with the mma.sync
//             kernel's GQA-packed 64-row plan (attention_fwd_sm90_packed_kernel.cuh), for short
//             query sets, where it can run (sm_90, 90a build, head dim 128, fp16/bf16, scale > 0),
//             else the mma.sync kernel;
//   backward  "mma_sync"; "sm90": the wgmma + TMA dK/dV and dQ kernels (attention_bwd_sm90_kernel.cuh)
//             where they can run (sm_90, 90a build, head dim 128), else mma.sync; "sm90_dkdv": the
//             sm90 dK/dV kernel with the mma.sync dQ kernel (a diagnostic).
// Each entry point returns the name of the kernel that ran ("sm90_wgmma", "sm90_packed",
// "sm90_dkdv", "mma_sync", or "none": nothing to compute). attention_forward_kernel_name() / attention_backward_kernel_name()
// repeat the last one for callers that cannot see the return value.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <atomic>
#include <limits>
#include <string>
#include <string_view>

#include "attention/attention_bwd_sm90.h"
#include "attention/attention_params.h"
#include "common/check.h"

namespace crosslmm {
namespace {

using attention::AttentionBackwardParams;
using attention::AttentionForwardParams;
using attention::kBlockN;

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
// Key splits: never more than this many (scratch memory and the combine's loop stay small), and
// each split keeps at least kMinKeyTilesPerSplit key tiles (its fixed costs, loading Q and writing
// a partial result, stay small against its main loop).
constexpr int64_t kMaxSplits = 128;
constexpr int64_t kMinKeyTilesPerSplit = 4;

// Calls fn.template operator()<T, kHeadDim>() for the tensor's dtype and head dim.
template <typename Fn>
void dispatch_dtype_head_dim(const char* op, at::ScalarType dtype, int64_t head_dim, Fn&& fn) {
  if (dtype == at::kHalf) {
    if (head_dim == 64) return fn.template operator()<__half, 64>();
    if (head_dim == 128) return fn.template operator()<__half, 128>();
  } else if (dtype == at::kBFloat16) {
    if (head_dim == 64) return fn.template operator()<__nv_bfloat16, 64>();
    if (head_dim == 128) return fn.template operator()<__nv_bfloat16, 128>();
  }
  TORCH_CHECK(false, op, ": unsupported dtype ", dtype, " / head dim ", head_dim);
}

// A [tokens, heads, head_dim] tensor the kernels read or write: on q's device, q's dtype, channel
// stride 1, token and head strides multiples of 8 elements and a 16-byte aligned base (the kernels
// move 16 bytes at a time). `expected` is its required shape.
void check_token_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q,
                        at::IntArrayRef expected) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on ", q.device(), " like q, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have dtype ",
              q.scalar_type(), " like q, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 3, op, ": ", name,
              " must have 3 dimensions [tokens, heads, head_dim], got shape ", t.sizes());
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ",
              t.sizes());
  TORCH_CHECK(t.stride(2) == 1, op, ": ", name,
              " must have channel (last-dim) stride 1, got strides ", t.strides());
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(t.size(d) <= 1 || t.stride(d) % 8 == 0, op, ": ", name,
                " must have token and head strides that are multiples of 8 elements, got strides ",
                t.strides());
  }
  TORCH_CHECK(t.numel() == 0 || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", name,
              " must start at a 16-byte aligned address");
}

// Outputs must not alias themselves (a zero or too-small stride would make CTAs race).
void check_no_self_overlap(const char* op, const char* name, const at::Tensor& t) {
  const int64_t tokens = t.size(0), heads = t.size(1), head_dim = t.size(2);
  const int64_t ts = t.stride(0), hs = t.stride(1);
  bool ok = true;
  if (heads > 1) ok = ok && hs >= head_dim;
  if (tokens > 1) ok = ok && ts >= head_dim;
  if (tokens > 1 && heads > 1) ok = ok && (ts >= hs * heads || hs >= ts * tokens);
  TORCH_CHECK(ok, op, ": ", name, " must not overlap itself, got shape ", t.sizes(),
              " and strides ", t.strides());
}

void check_lse(const char* op, const at::Tensor& lse, const at::Tensor& q) {
  TORCH_CHECK(lse.is_cuda() && lse.device() == q.device(), op, ": lse must be on ", q.device(),
              " like q, got ", lse.device());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, op, ": lse must have dtype float32, got ",
              lse.scalar_type());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q.size(1) && lse.size(1) == q.size(0), op,
              ": lse must have shape [num_heads_q, total_q] = [", q.size(1), ", ", q.size(0),
              "], got ", lse.sizes());
  TORCH_CHECK(lse.is_contiguous(), op, ": lse must be contiguous");
}

// Checks shared by forward and backward: q, k, v and the segments. Returns nothing; throws.
void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
               int64_t max_seqlen_k, double softmax_scale) {
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got one on ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": q must have dtype float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.dim() == 3, op,
              ": q must have 3 dimensions [total_q, num_heads_q, head_dim], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 3, op,
              ": k must have 3 dimensions [total_k, num_heads_k, head_dim], got shape ", k.sizes());
  const int64_t head_dim = q.size(2);
  TORCH_CHECK(head_dim == 64 || head_dim == 128, op,
              ": head dim (q.size(2)) must be 64 or 128, got ", head_dim);
  TORCH_CHECK(k.size(2) == head_dim, op, ": k must have q's head dim ", head_dim, ", got ",
              k.size(2));
  const int64_t heads_q = q.size(1), heads_k = k.size(1);
  TORCH_CHECK(heads_k >= 1 && heads_q >= 1 && heads_q % heads_k == 0, op,
              ": num_heads_q (q.size(1) = ", heads_q,
              ") must be a positive multiple of num_heads_k (k.size(1) = ", heads_k, ")");
  check_token_tensor(op, "q", q, q, q.sizes());
  check_token_tensor(op, "k", k, q, k.sizes());
  check_token_tensor(op, "v", v, q, k.sizes());
  check_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, q);
  check_cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, q);
  TORCH_CHECK(cu_seqlens_q.numel() == cu_seqlens_k.numel(), op,
              ": cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got ",
              cu_seqlens_q.numel(), " and ", cu_seqlens_k.numel());
  TORCH_CHECK(q.size(0) <= kInt32Max && k.size(0) <= kInt32Max && q.size(0) * heads_q <= kInt32Max,
              op, ": too many tokens (total_q = ", q.size(0), ", total_k = ", k.size(0), ")");
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, op,
              ": max_seqlen_q and max_seqlen_k must be >= 0, got ", max_seqlen_q, " and ",
              max_seqlen_k);
  TORCH_CHECK(std::isfinite(softmax_scale), op, ": softmax_scale must be finite, got ",
              softmax_scale);
}

// ---------------------------------------------------------------------------------------------
// The Hopper (sm_90a) forward: when to use it and its launch plan.
// ---------------------------------------------------------------------------------------------

// The caller's kernel choice (see the file comment). When to prefer the sm90 kernels is decided
// in crosslmm_ops/planner.py; here only whether they can run.
enum class KernelChoice { kMmaSync, kSm90, kSm90DkDv, kSm90Packed };

KernelChoice kernel_choice(const char* op, const std::string& kernel, bool backward) {
  if (kernel == "mma_sync") return KernelChoice::kMmaSync;
  if (kernel == "sm90") return KernelChoice::kSm90;
  if (backward && kernel == "sm90_dkdv") return KernelChoice::kSm90DkDv;
  if (!backward && kernel == "sm90_packed") return KernelChoice::kSm90Packed;
  TORCH_CHECK(false, op, ": kernel must be ",
              backward ? "'mma_sync', 'sm90' or 'sm90_dkdv'" : "'mma_sync', 'sm90' or 'sm90_packed'",
              ", got '", kernel, "'");
  return KernelChoice::kMmaSync;
}

// Key splits for the sm90 kernel (num_splits == 0): the count that minimises a simple time model
// in units of one CTA's work on one 128-key tile (about 2 us on an H100): full waves of
// ceil(key_tiles / s) + 1 tiles each (the + 1: loading Q, the epilogue), plus for s > 1 the fp32
// partial results written and merged (128 KB per CTA and split at ~3 TB/s, ~0.02 tile) and the
// combine launch (~1.5 tiles). Wave quantisation matters here: V2V at T = 128 is 108 CTAs of
// 729 key tiles, one wave 82% full on 132 multiprocessors; 6 splits give 648 CTAs in 4.9 waves.
int64_t sm90_key_splits(int64_t ctas, int64_t key_tiles, int64_t sms) {
  const int64_t max_splits = std::min<int64_t>(kMaxSplits, std::max<int64_t>(1, key_tiles / 2));
  int64_t best = 1;
  double best_cost = 0.0;
  for (int64_t s = 1; s <= max_splits; ++s) {
    const double waves = static_cast<double>(ceil_div(ctas * s, sms));
    double cost = waves * static_cast<double>(ceil_div(key_tiles, s) + 1);
    if (s > 1) cost += 1.5 + 0.0225 * static_cast<double>(ctas * s);
    if (s == 1 || cost < best_cost * 0.98) {  // a new split count must win by 2%
      best = s;
      best_cost = cost;
    }
  }
  return best;
}

// The forward parameters both forward kernels share, and the split-KV scratch they write when
// `splits` > 1, allocated into `scratch` (the caller keeps it until the launches are queued). The
// caller sets the tiling: rows_per_query, head_ctas, num_m_blocks.
AttentionForwardParams forward_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      at::Tensor& out, at::Tensor& lse,
                                      const at::Tensor& cu_seqlens_q,
                                      const at::Tensor& cu_seqlens_k, int64_t batch,
                                      int64_t max_seqlen_q, int64_t splits, float scale_log2,
                                      at::Tensor (&scratch)[2]) {
  const int64_t heads_q = q.size(1), total_q = q.size(0);
  if (splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    scratch[0] = at::empty({splits, heads_q, total_q, q.size(2)}, f32);
    scratch[1] = at::empty({splits, heads_q, total_q}, f32);
  }
  AttentionForwardParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.out_partial = splits > 1 ? scratch[0].data_ptr<float>() : nullptr;
  p.lse_partial = splits > 1 ? scratch[1].data_ptr<float>() : nullptr;
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  p.q_token_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.k_token_stride = k.stride(0);
  p.k_head_stride = k.stride(1);
  p.v_token_stride = v.stride(0);
  p.v_head_stride = v.stride(1);
  p.out_token_stride = out.stride(0);
  p.out_head_stride = out.stride(1);
  p.batch = static_cast<int>(batch);
  p.num_heads_q = static_cast<int>(heads_q);
  p.num_heads_k = static_cast<int>(k.size(1));
  p.total_q = static_cast<int>(total_q);
  p.total_k = static_cast<int>(k.size(0));
  p.max_seqlen_q = static_cast<int>(max_seqlen_q);
  p.num_splits = static_cast<int>(splits);
  p.scale_log2 = scale_log2;
  return p;
}

thread_local const char* last_forward_kernel = "none";
// Query heads per tile row of the last forward on this thread: 1 (one head per tile) or the GQA
// group (its heads packed); 0 when nothing ran.
thread_local int last_forward_rows_per_query = 0;

// Process-wide, not per thread like the forward's: autograd runs a CUDA backward on its own device
// thread, so the caller could never read a thread-local value.
std::atomic<const char*> last_backward_kernel{"none"};
// -1: the last backward did not try the sm90 path or took it; else the encode failure code.
std::atomic<int> last_backward_sm90_declined{-1};

}  // namespace

std::string attention_forward_kernel_name() { return last_forward_kernel; }

int64_t attention_forward_rows_per_query() { return last_forward_rows_per_query; }

std::string attention_backward_kernel_name() { return last_backward_kernel.load(); }

std::string attention_backward_sm90_declined() {
  const int why = last_backward_sm90_declined.load();
  if (why < 0) return "";
  return "the sm90 backward was asked for but TMA could not describe the tensors (encode failure " +
         std::to_string(why) + ", see attention_params.h)";
}

std::string attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              at::Tensor& out, at::Tensor& lse, const at::Tensor& cu_seqlens_q,
                              const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                              int64_t max_seqlen_k, double softmax_scale, int64_t num_splits,
                              const std::string& kernel) {
  constexpr const char* op = "attention_forward";
  const KernelChoice choice = kernel_choice(op, kernel, /*backward=*/false);
  check_qkv(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale);
  check_token_tensor(op, "out", out, q, q.sizes());
  check_no_self_overlap(op, "out", out);
  check_lse(op, lse, q);
  TORCH_CHECK(num_splits >= 0, op, ": num_splits must be >= 0 (0 = heuristic), got ", num_splits);

  const int64_t batch = cu_seqlens_q.numel() - 1;
  const int64_t total_q = q.size(0), total_k = k.size(0);
  const int64_t heads_q = q.size(1), heads_k = k.size(1), head_dim = q.size(2);
  // A bound larger than the whole packed dimension is allowed (as in flash-attn) but means no more.
  max_seqlen_q = std::min(max_seqlen_q, total_q);
  max_seqlen_k = std::min(max_seqlen_k, total_k);
  last_forward_kernel = "none";
  last_forward_rows_per_query = 0;
  if (batch == 0 || total_q == 0 || max_seqlen_q == 0) return "none";  // no query rows to write

  const c10::cuda::CUDAGuard guard(q.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // Hopper: wgmma + TMA kernel, 128-row CTAs of one query head or of a GQA group. It returns
  // false (launching nothing) when TMA cannot describe the tensors; the mma.sync kernel below
  // then runs.
  // (Its softmax takes the row max of the unscaled scores, which needs a positive scale.)
  const float scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  // Where the Hopper kernels can run (check_qkv already allows fp16/bf16 only).
  const bool sm90_runs = attention::attention_forward_sm90_compiled() && head_dim == 128 &&
                         scale_log2 > 0.f && std::isfinite(scale_log2) &&
                         device_is_sm90(q.get_device());
  if (choice == KernelChoice::kSm90 && sm90_runs) {
    // Tiles of one query head's 128 tokens, or the GQA group's heads packed (whole tokens per
    // tile) where that gives fewer tiles: V2V at T = 32 (288 queries, groups of 6) is 3 tiles per
    // head at 75%, 36 in all, against 14 of 126 rows per group, 28 in all.
    const int64_t group = heads_q / heads_k;
    const int64_t packed_tokens = attention::kSm90BlockM / group;  // 0 for a group over 128
    const int64_t head_tiles = ceil_div(max_seqlen_q, attention::kSm90BlockM) * heads_q;
    const bool pack = group > 1 && packed_tokens > 0 &&
                      ceil_div(max_seqlen_q, packed_tokens) * heads_k < head_tiles;
    const int64_t rows_per_query = pack ? group : 1;
    const int64_t m_blocks = ceil_div(max_seqlen_q, attention::kSm90BlockM / rows_per_query);
    const int64_t head_ctas = heads_q / rows_per_query;
    const int64_t ctas = m_blocks * head_ctas * batch;
    const int64_t key_tiles = ceil_div(max_seqlen_k, attention::kSm90BlockN);
    const int64_t splits =
        num_splits == 0
            ? sm90_key_splits(ctas, key_tiles, multiprocessor_count())
            : std::min({num_splits, std::max<int64_t>(1, key_tiles), kMaxSplits});
    at::Tensor scratch[2];
    AttentionForwardParams p = forward_params(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                              batch, max_seqlen_q, splits, scale_log2, scratch);
    p.rows_per_query = static_cast<int>(rows_per_query);
    p.head_ctas = static_cast<int>(head_ctas);
    p.num_m_blocks = static_cast<int>(m_blocks);
    bool launched = false;
    if (q.scalar_type() == at::kHalf) {
      launched = attention::run_attention_forward_sm90<__half, 128>(p, stream);
    } else {
      launched = attention::run_attention_forward_sm90<__nv_bfloat16, 128>(p, stream);
    }
    if (launched) {
      last_forward_kernel = "sm90_wgmma";
      last_forward_rows_per_query = static_cast<int>(rows_per_query);
      return last_forward_kernel;
    }
  }
  // The packed sm90 kernel takes the mma.sync kernel's plan with 64-row tiles (it has no other).
  const bool packed_sm90 = choice == KernelChoice::kSm90Packed && sm90_runs;
  last_forward_kernel = packed_sm90 ? "sm90_packed" : "mma_sync";

  // GQA packing: the query heads of a group share one CTA (rows = (token, head in group) pairs), so
  // K/V are read once per group and short query sets (decode, 9 queries per frame) fill the tile.
  const int64_t group = heads_q / heads_k;
  const int64_t rows_per_query = group;
  const int64_t head_ctas = heads_q / rows_per_query;
  const int64_t rows = max_seqlen_q * rows_per_query;
  TORCH_CHECK(rows <= kInt32Max, op, ": too many rows per segment (", rows, ")");
  const int64_t key_tiles = ceil_div(max_seqlen_k, kBlockN);
  const int64_t useful_splits = std::max<int64_t>(1, key_tiles / kMinKeyTilesPerSplit);
  const int sms = multiprocessor_count();

  // Tile height: 128 rows (8 warps) halves the K/V traffic per row against 64 rows (4 warps), but
  // gives fewer CTAs; use 64 when the rows fit in one 64-row tile, or when even splitting the keys
  // could not give 128-row tiles one CTA per multiprocessor.
  auto ctas_for = [&](int64_t block_m) { return ceil_div(rows, block_m) * head_ctas * batch; };
  int block_m = rows > 64 && !packed_sm90 ? 128 : 64;
  if (block_m == 128 && ctas_for(128) * useful_splits < sms) block_m = 64;
  const int64_t ctas = ctas_for(block_m);

  // Key splits: when the grid does not fill one wave of the GPU, split the keys into enough CTAs
  // for about two waves, each split keeping at least kMinKeyTilesPerSplit key tiles.
  int64_t splits = 1;
  if (num_splits == 0) {
    int ctas_per_sm = 1;
    if (packed_sm90) {
      ctas_per_sm = q.scalar_type() == at::kHalf
                        ? attention::attention_forward_sm90_packed_ctas_per_sm<__half, 128>()
                        : attention::attention_forward_sm90_packed_ctas_per_sm<__nv_bfloat16, 128>();
    } else {
      dispatch_dtype_head_dim(op, q.scalar_type(), head_dim, [&]<typename T, int kHeadDim>() {
        ctas_per_sm = attention::attention_forward_ctas_per_sm<T, kHeadDim>(block_m);
      });
    }
    const int64_t wave = static_cast<int64_t>(sms) * ctas_per_sm;
    if (ctas < wave) splits = ceil_div(2 * wave, ctas);
    splits = std::min({splits, useful_splits, kMaxSplits});
  } else {
    splits = std::min({num_splits, std::max<int64_t>(1, key_tiles), kMaxSplits});
  }

  at::Tensor scratch[2];
  AttentionForwardParams p = forward_params(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, batch,
                                            max_seqlen_q, splits, scale_log2, scratch);
  p.rows_per_query = static_cast<int>(rows_per_query);
  p.head_ctas = static_cast<int>(head_ctas);
  p.num_m_blocks = static_cast<int>(ceil_div(rows, block_m));
  last_forward_rows_per_query = static_cast<int>(rows_per_query);

  if (packed_sm90) {
    if (q.scalar_type() == at::kHalf) {
      attention::run_attention_forward_sm90_packed<__half, 128>(p, stream);
    } else {
      attention::run_attention_forward_sm90_packed<__nv_bfloat16, 128>(p, stream);
    }
    return last_forward_kernel;
  }
  dispatch_dtype_head_dim(op, q.scalar_type(), head_dim, [&]<typename T, int kHeadDim>() {
    attention::run_attention_forward<T, kHeadDim>(p, block_m, stream);
  });
  return last_forward_kernel;
}

std::string attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                               at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                               const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                               int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                               bool deterministic, const std::string& kernel) {
  constexpr const char* op = "attention_backward";
  const KernelChoice choice = kernel_choice(op, kernel, /*backward=*/true);
  (void)deterministic;  // always deterministic: no atomics anywhere (see the file comment)
  check_qkv(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale);
  check_token_tensor(op, "dout", dout, q, q.sizes());
  check_token_tensor(op, "out", out, q, q.sizes());
  check_token_tensor(op, "dq", dq, q, q.sizes());
  check_token_tensor(op, "dk", dk, q, k.sizes());
  check_token_tensor(op, "dv", dv, q, k.sizes());
  check_no_self_overlap(op, "dq", dq);
  check_no_self_overlap(op, "dk", dk);
  check_no_self_overlap(op, "dv", dv);
  check_lse(op, lse, q);

  const int64_t batch = cu_seqlens_q.numel() - 1;
  const int64_t total_q = q.size(0), total_k = k.size(0);
  const int64_t heads_q = q.size(1), heads_k = k.size(1), head_dim = q.size(2);
  // A bound larger than the whole packed dimension is allowed (as in flash-attn) but means no more.
  max_seqlen_q = std::min(max_seqlen_q, total_q);
  max_seqlen_k = std::min(max_seqlen_k, total_k);
  last_backward_kernel = "none";
  last_backward_sm90_declined = -1;
  if (batch == 0) return "none";

  const c10::cuda::CUDAGuard guard(q.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const int64_t group = heads_q / heads_k;
  const int64_t rows_per_query = group;  // GQA packing in the dQ kernel, as in the forward
  const int64_t rows = max_seqlen_q * rows_per_query;
  TORCH_CHECK(rows <= kInt32Max, op, ": too many rows per segment (", rows, ")");
  at::Tensor delta = at::empty({heads_q, total_q}, q.options().dtype(at::kFloat));

  AttentionBackwardParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.dout = dout.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  p.q_token_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.k_token_stride = k.stride(0);
  p.k_head_stride = k.stride(1);
  p.v_token_stride = v.stride(0);
  p.v_head_stride = v.stride(1);
  p.out_token_stride = out.stride(0);
  p.out_head_stride = out.stride(1);
  p.dout_token_stride = dout.stride(0);
  p.dout_head_stride = dout.stride(1);
  p.dq_token_stride = dq.stride(0);
  p.dq_head_stride = dq.stride(1);
  p.dk_token_stride = dk.stride(0);
  p.dk_head_stride = dk.stride(1);
  p.dv_token_stride = dv.stride(0);
  p.dv_head_stride = dv.stride(1);
  p.batch = static_cast<int>(batch);
  p.num_heads_q = static_cast<int>(heads_q);
  p.num_heads_k = static_cast<int>(heads_k);
  p.total_q = static_cast<int>(total_q);
  p.total_k = static_cast<int>(total_k);
  p.rows_per_query = static_cast<int>(rows_per_query);
  p.head_ctas = static_cast<int>(heads_q / rows_per_query);
  p.num_m_blocks = static_cast<int>(ceil_div(rows, attention::kBackwardBlockM));
  p.num_n_blocks = static_cast<int>(ceil_div(max_seqlen_k, kBlockN));
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);

  // Hopper: wgmma + TMA dK/dV and dQ kernels (after the mma.sync Delta kernel; "dkdv": the
  // mma.sync dQ kernel instead). It returns false, launching nothing, when TMA cannot describe the
  // tensors; the mma.sync backward then runs.
  if (attention::attention_forward_sm90_compiled() && head_dim == 128) {
    if (choice != KernelChoice::kMmaSync && device_is_sm90(q.get_device())) {
      const bool wgmma_dq = choice != KernelChoice::kSm90DkDv;
      const int sms = multiprocessor_count();
      attention::sm90_last_encode_failure = 0;
      const bool launched =
          q.scalar_type() == at::kHalf
              ? attention::run_attention_backward_sm90<__half, 128>(p, wgmma_dq, sms, stream)
              : attention::run_attention_backward_sm90<__nv_bfloat16, 128>(p, wgmma_dq, sms,
                                                                           stream);
      if (launched) {
        last_backward_kernel = wgmma_dq ? "sm90_wgmma" : "sm90_dkdv";
        last_backward_sm90_declined = -1;
        return wgmma_dq ? "sm90_wgmma" : "sm90_dkdv";
      }
      last_backward_sm90_declined = attention::sm90_last_encode_failure.load();
    }
  }
  last_backward_kernel = "mma_sync";

  dispatch_dtype_head_dim(op, q.scalar_type(), head_dim, [&]<typename T, int kHeadDim>() {
    attention::run_attention_backward<T, kHeadDim>(p, stream);
  });
  return "mma_sync";
}

}  // namespace crosslmm
