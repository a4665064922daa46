// Projection-fused core backward for __nv_bfloat16, Dv bucket 2048 (one file per instantiation so
// builds parallelise).
#include "projected/projected_backward_launch.cuh"

namespace crosslmm {
namespace projected {
template void run_projected_backward<__nv_bfloat16, 2048>(const ProjectedBackwardParams&, cudaStream_t);
template void projected_backward_ctas_per_sm<__nv_bfloat16, 2048>(int, int, int*, int*);
}  // namespace projected
}  // namespace crosslmm
