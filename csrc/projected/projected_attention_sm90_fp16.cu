// sm90_cluster projected-attention core for __half (one file per instantiation so builds
// parallelise). Other targets of the same build compile an empty kernel that is never launched.
#include "projected/projected_attention_sm90_launch.cuh"

namespace crosslmm {
namespace projected {
template bool run_projected_forward_sm90<__half>(const ProjectedForwardParams&, cudaStream_t);
}  // namespace projected
}  // namespace crosslmm
