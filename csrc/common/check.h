// Argument checks and launch checks shared by every op.
//
// The Python layer validates user input and raises ValueError/TypeError with the argument's name;
// these checks are the second line, so that nothing reaches a kernel that could read or write out of
// bounds even when the extension is called directly.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include "common/host_math.h"

#define CROSSLMM_CHECK_CUDA(t) \
  TORCH_CHECK((t).is_cuda(), #t " must be a CUDA tensor, got one on ", (t).device())

#define CROSSLMM_CHECK_SAME_DEVICE(a, b)                                                   \
  TORCH_CHECK((a).device() == (b).device(), #a " and " #b " must be on the same device, got ", \
              (a).device(), " and ", (b).device())

#define CROSSLMM_CHECK_DTYPE(t, dt) \
  TORCH_CHECK((t).scalar_type() == (dt), #t " must have dtype ", (dt), ", got ", (t).scalar_type())

#define CROSSLMM_CHECK_DIM(t, n) \
  TORCH_CHECK((t).dim() == (n), #t " must have ", (n), " dimensions, got shape ", (t).sizes())

#define CROSSLMM_CHECK_CONTIGUOUS(t) TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")

// Every kernel launch is followed by this: it turns a failed launch (bad configuration, too much
// shared memory, no kernel image for this GPU) into a Python RuntimeError at the call site.
#define CROSSLMM_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()

namespace crosslmm {

// Multiprocessor count of the current device. (ATen/cuda/CUDAContext.h would give it too, but it
// pulls in cuSPARSE/cuBLAS headers that a minimal CUDA toolkit does not ship.)
inline int multiprocessor_count() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Whether `device` is an sm_90 GPU (Hopper: wgmma, TMA, clusters).
inline bool device_is_sm90(int device) {
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return major == 9 && minor == 0;
}

// cu_seqlens_q / cu_seqlens_k of a packed call (`name`) of op `op`: int32, 1-D with batch + 1
// entries, contiguous, on q's device.
inline void check_cu_seqlens(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), op, ": ", name, " must be on ", q.device(),
              " like q, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must have dtype int32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.numel() >= 1, op, ": ", name,
              " must be 1-D with batch + 1 entries, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

}  // namespace crosslmm
