// Attention backward for __half, head dim 64 (one file per instantiation so builds parallelise).
#include "attention/attention_bwd_launch.cuh"

namespace crosslmm {
namespace attention {
template void run_attention_backward<__half, 64>(const AttentionBackwardParams&, cudaStream_t);
}  // namespace attention
}  // namespace crosslmm
