// Hopper (sm_90a) attention backward for __half, head dim 128 (one file per instantiation so
// builds parallelise). Other targets of the same build compile empty sm90 kernels that are never
// launched.
#include "attention/attention_bwd_sm90_launch.cuh"

namespace crosslmm {
namespace attention {
template bool run_attention_backward_sm90<__half, 128>(const AttentionBackwardParams&, bool,
                                                     int, cudaStream_t);
}  // namespace attention
}  // namespace crosslmm
