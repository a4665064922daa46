// Parameters of the attention kernels, shared by the host entry points (attention.cu) and the
// per-(dtype, head dim) kernel files. Plain C++ without torch headers, like the kernel headers, so
// the kernels can be compiled on their own.
//
// Layout (see attention.cu for the checks): packed varlen, q [total_q, Hq, D],
// k/v [total_k, Hk, D], channel stride 1, token and head strides in elements. Segment b holds
// queries [cu_seqlens_q[b], cu_seqlens_q[b+1]) and keys [cu_seqlens_k[b], cu_seqlens_k[b+1]);
// query head h reads kv head h / group, group = Hq / Hk.
//
// Rows. A kernel tile is a block of "rows", each row one (query token, query head) pair. With
// rows_per_query = 1 a CTA works on one query head and row r is query token r of the segment. With
// rows_per_query = group ("GQA packing") a CTA works on the whole group of query heads that share
// one kv head and row r is (token r / group, head first_head + r % group): a short query set (9
// queries, 1 decode query) then fills a tile with group times more useful rows, and K/V are read
// once for the whole group instead of once per query head.
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdint>

namespace crosslmm {
namespace attention {

constexpr int kBlockN = 64;  // keys per K/V tile, every kernel

struct AttentionForwardParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;          // [Hq, total_q], natural log
  float* out_partial;  // num_splits > 1: [num_splits, Hq, total_q, D] fp32, each split's O / l
  float* lse_partial;  // num_splits > 1: [num_splits, Hq, total_q]
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int64_t q_token_stride, q_head_stride;
  int64_t k_token_stride, k_head_stride;
  int64_t v_token_stride, v_head_stride;
  int64_t out_token_stride, out_head_stride;
  int batch;
  int num_heads_q;
  int num_heads_k;
  int total_q;
  int total_k;
  int rows_per_query;  // 1, or the GQA group size when query heads are packed into rows
  int head_ctas;       // CTAs along heads: num_heads_q / rows_per_query
  int max_seqlen_q;    // query tokens of the longest segment
  int num_m_blocks;    // row tiles per segment, for the longest segment
  int num_splits;      // key splits; 1 writes out/lse directly
  float scale_log2;    // softmax_scale * log2(e): scores go through exp2
};

struct AttentionBackwardParams {
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* dout;
  void* dq;
  void* dk;
  void* dv;
  const float* lse;  // [Hq, total_q], natural log (from the forward)
  float* delta;      // [Hq, total_q] scratch: rowsum(dout * out)
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int64_t q_token_stride, q_head_stride;
  int64_t k_token_stride, k_head_stride;
  int64_t v_token_stride, v_head_stride;
  int64_t out_token_stride, out_head_stride;
  int64_t dout_token_stride, dout_head_stride;
  int64_t dq_token_stride, dq_head_stride;
  int64_t dk_token_stride, dk_head_stride;
  int64_t dv_token_stride, dv_head_stride;
  int batch;
  int num_heads_q;
  int num_heads_k;
  int total_q;
  int total_k;
  int rows_per_query;  // dQ kernel: 1 or the group size (see above); the dK/dV kernel always packs
  int head_ctas;       // dQ kernel: CTAs along heads, num_heads_q / rows_per_query
  int num_m_blocks;    // dQ kernel: row tiles per segment, for the longest segment
  int num_n_blocks;    // dK/dV kernel: key tiles per segment, for the longest segment
  float softmax_scale;
  float scale_log2;
};

// Implemented once per (T, kHeadDim) in attention_fwd_<dtype>_hd<D>.cu; T is __half or
// __nv_bfloat16. block_m is 64 or 128 (rows per CTA). Launches the forward kernel and, when
// p.num_splits > 1, the combine kernel. Throws (c10::Error) when a launch fails.
template <typename T, int kHeadDim>
void run_attention_forward(const AttentionForwardParams& p, int block_m, cudaStream_t stream);

// CTAs of the forward kernel that fit on one multiprocessor at a time (for the split heuristic).
template <typename T, int kHeadDim>
int attention_forward_ctas_per_sm(int block_m);

// Implemented once per (T, kHeadDim) in attention_bwd_<dtype>_hd<D>.cu: the Delta preprocess, the
// dK/dV kernel and the dQ kernel, in that order, on `stream`.
template <typename T, int kHeadDim>
void run_attention_backward(const AttentionBackwardParams& p, cudaStream_t stream);

// Query rows per dQ-kernel CTA and per dK/dV-kernel inner step (fixed, not a heuristic).
constexpr int kBackwardBlockM = 64;

// Hopper (sm_90a) forward, wgmma + TMA (attention_fwd_sm90_kernel.cuh), implemented once per T in
// attention_fwd_sm90_<dtype>_hd128.cu for head dim 128. Takes the same parameters as
// run_attention_forward, with kSm90BlockM rows per CTA: one query head per CTA (rows_per_query =
// 1, head_ctas = num_heads_q, num_m_blocks counted in kSm90BlockM tokens) or a GQA group per CTA
// (rows_per_query = group, head_ctas = num_heads_k, num_m_blocks counted in kSm90BlockM / group
// whole tokens), and key splits over kSm90BlockN-key tiles (out_partial / lse_partial when
// num_splits > 1; the mma.sync combine kernel merges them).
// Returns false, having launched nothing, when the tensors cannot be described by TMA tensor maps
// (the caller then runs the mma.sync kernel); throws (c10::Error) when a launch fails. The caller
// must have checked that the device is sm_90 and the build has sm_90a code
// (attention_forward_sm90_compiled()), and that softmax_scale > 0.
// Why the last TMA tensor-map encoding of an sm90 kernel failed (0: it did not): 1 no
// cuTensorMapEncodeTiled in the driver, 2 no tokens or heads, 3 base not 16-byte aligned, 4 a
// stride TMA cannot take, 100 + CUresult from the driver. Process-wide, for diagnostics
// (attention_backward_sm90_declined()).
inline std::atomic<int> sm90_last_encode_failure{0};

constexpr int kSm90BlockM = 128;
constexpr int kSm90BlockN = 128;

template <typename T, int kHeadDim>
bool run_attention_forward_sm90(const AttentionForwardParams& p, cudaStream_t stream);

// Hopper (sm_90a) forward for GQA-packed short query sets, wgmma over a cp.async ring
// (attention_fwd_sm90_packed_kernel.cuh), implemented beside the one above. Takes exactly the
// mma.sync kernel's parameters with 64-row tiles (block_m = 64: num_m_blocks, head_ctas,
// rows_per_query and the key splits as run_attention_forward takes them), launches the combine when
// num_splits > 1, and never declines. Same preconditions as the kernel above (sm_90 device, sm_90a
// build, softmax_scale > 0); head dim 128.
template <typename T, int kHeadDim>
void run_attention_forward_sm90_packed(const AttentionForwardParams& p, cudaStream_t stream);

// CTAs of that kernel one multiprocessor holds (for the split plan).
template <typename T, int kHeadDim>
int attention_forward_sm90_packed_ctas_per_sm();

// Whether this build holds sm_90a code for the kernels above (CROSSLMM_CUDA_ARCHS names 90a).
constexpr bool attention_forward_sm90_compiled() {
#ifdef CROSSLMM_CUDA_ARCHS
  for (const char* a = CROSSLMM_CUDA_ARCHS; a[0] != '\0'; ++a) {
    if (a[0] == '9' && a[1] == '0' && a[2] == 'a') return true;
  }
#endif
  return false;
}

}  // namespace attention
}  // namespace crosslmm
