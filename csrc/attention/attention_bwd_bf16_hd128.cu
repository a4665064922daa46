// Attention backward for __nv_bfloat16, head dim 128 (one file per instantiation so builds
// parallelise).
#include "attention/attention_bwd_launch.cuh"

namespace crosslmm {
namespace attention {
template void run_attention_backward<__nv_bfloat16, 128>(const AttentionBackwardParams&,
                                                         cudaStream_t);
}  // namespace attention
}  // namespace crosslmm
