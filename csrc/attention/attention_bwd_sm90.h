// Hopper (sm_90a) attention backward: the entry point attention.cu calls (implemented once per T in
// attention_bwd_sm90_<dtype>_hd128.cu, see attention_bwd_sm90_launch.cuh). Plain C++ without
// torch headers, like attention_params.h.
#pragma once

#include <cuda_runtime_api.h>

#include "attention/attention_params.h"

namespace crosslmm {
namespace attention {

// Keys per CTA of the sm90 dK/dV kernel (2 consumer warpgroups x 64 keys).
constexpr int kSm90BwdBlockN = 128;

// Runs the Delta preprocess (the mma.sync file's kernel), the sm90 wgmma + TMA dK/dV kernel and
// the dQ pass on `stream`, head dim 128. The dQ pass is the sm90 wgmma + TMA dQ kernel with key
// splits into fp32 partials plus a fixed-order sum kernel when `wgmma_dq` (split count chosen for
// `num_sms` multiprocessors), else the mma.sync dQ kernel. Takes the parameters
// run_attention_backward takes (rows_per_query / head_ctas / num_m_blocks as for the mma.sync dQ
// kernel, num_n_blocks counted in kBlockN = 64-key tiles). Returns false, having launched nothing,
// when the tensors cannot be described by TMA tensor maps (the caller then runs
// run_attention_backward); throws (c10::Error) when a launch fails. The caller must have checked
// that the device is sm_90 and the build has sm_90a code (attention_forward_sm90_compiled()).
template <typename T, int kHeadDim>
bool run_attention_backward_sm90(const AttentionBackwardParams& p, bool wgmma_dq, int num_sms,
                                 cudaStream_t stream);

}  // namespace attention
}  // namespace crosslmm
