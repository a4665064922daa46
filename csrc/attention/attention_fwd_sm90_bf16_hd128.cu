// Hopper (sm_90a) attention forward for __nv_bfloat16, head dim 128 (one file per instantiation so
// builds parallelise). Other targets of the same build compile an empty kernel that is never
// launched.
#include "attention/attention_fwd_sm90_launch.cuh"

namespace crosslmm {
namespace attention {
template bool run_attention_forward_sm90<__nv_bfloat16, 128>(const AttentionForwardParams&,
                                                            cudaStream_t);
template void run_attention_forward_sm90_packed<__nv_bfloat16, 128>(const AttentionForwardParams&,
                                                            cudaStream_t);
template int attention_forward_sm90_packed_ctas_per_sm<__nv_bfloat16, 128>();
}  // namespace attention
}  // namespace crosslmm
