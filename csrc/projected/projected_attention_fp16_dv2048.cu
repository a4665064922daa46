// Projection-fused attention forward for __half, Dv bucket 2048 (one file per
// instantiation so builds parallelise).
#include "projected/projected_attention_launch.cuh"

namespace crosslmm {
namespace projected {
template void run_projected_forward<__half, 2048>(const ProjectedForwardParams&, int,
                                                       cudaStream_t);
template int projected_forward_ctas_per_sm<__half, 2048>(int, int, int);
}  // namespace projected
}  // namespace crosslmm
