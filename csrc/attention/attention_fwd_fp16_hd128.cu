// Attention forward for __half, head dim 128 (one file per instantiation so builds parallelise).
#include "attention/attention_fwd_launch.cuh"

namespace crosslmm {
namespace attention {
template void run_attention_forward<__half, 128>(const AttentionForwardParams&, int, cudaStream_t);
template int attention_forward_ctas_per_sm<__half, 128>(int);
}  // namespace attention
}  // namespace crosslmm
