// Host side of TMA for the Hopper (sm_90a) kernels: the driver's cuTensorMapEncodeTiled, reached
// through the runtime (cudaGetDriverEntryPoint*) so the extension does not link libcuda, and the
// current context it needs. Shared by the attention and projected-attention launchers.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda.h>
#include <cuda_runtime.h>

namespace crosslmm {
namespace sm90_tma {

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                   const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                   const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                   CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled from the driver, or nullptr when the driver does not provide it.
inline EncodeTiledFn encode_tiled() {
  static const EncodeTiledFn fn = []() -> EncodeTiledFn {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000,
                                                             cudaEnableDefault, &status);
#else
    const cudaError_t err =
        cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &ptr, cudaEnableDefault, &status);
#endif
    if (err != cudaSuccess || status != cudaDriverEntryPointSuccess || ptr == nullptr) {
      (void)cudaGetLastError();  // not sticky, but leave no error behind for the next check
      return nullptr;
    }
    return reinterpret_cast<EncodeTiledFn>(ptr);
  }();
  return fn;
}

// cuTensorMapEncodeTiled is a driver call and needs a current context on the calling thread.
// A thread that has made no CUDA runtime call yet has none, and c10's device guard does not set one
// when the device already matches: autograd's device thread, running a backward whose buffers all
// came from the caching allocator, got CUDA_ERROR_INVALID_CONTEXT (201) and the backward fell back
// to mma.sync (tests/test_attention_bwd_sm90.py::test_through_public_api). cudaSetDevice makes
// the device's primary context current (CUDA >= 12); cheap, so called before every encode batch.
inline void make_context_current() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaSetDevice(device));
}

}  // namespace sm90_tma
}  // namespace crosslmm
