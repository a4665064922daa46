// Attention forward for __nv_bfloat16, head dim 64 (one file per instantiation so builds
// parallelise).
#include "attention/attention_fwd_launch.cuh"

namespace crosslmm {
namespace attention {
template void run_attention_forward<__nv_bfloat16, 64>(const AttentionForwardParams&, int,
                                                       cudaStream_t);
template int attention_forward_ctas_per_sm<__nv_bfloat16, 64>(int);
}  // namespace attention
}  // namespace crosslmm
