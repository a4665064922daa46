// Projection-fused core backward for __half, Dv bucket 1152 (one file per instantiation so
// builds parallelise).
#include "projected/projected_backward_launch.cuh"

namespace crosslmm {
namespace projected {
template void run_projected_backward<__half, 1152>(const ProjectedBackwardParams&, cudaStream_t);
template void projected_backward_ctas_per_sm<__half, 1152>(int, int, int*, int*);
}  // namespace projected
}  // namespace crosslmm
