// The Python module crosslmm_ops._C: one pybind11 entry per kernel family.
//
// These are low-level entry points: the Python layer (crosslmm_ops/ops/*.py) validates user input,
// allocates outputs and registers each op with torch.library (custom op + fake + autograd). The
// checks inside each entry point are a second line of defence, not the user-facing errors.
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include <string>

namespace crosslmm {
void token_pool_mix(const at::Tensor& src, at::Tensor& dst, const at::Tensor& row_ptr,
                    const at::Tensor& col_idx, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& argmax, int64_t kind,
                    int64_t temporal_stride, int64_t frames_in, int64_t tokens_in,
                    bool time_transposed, int64_t max_row_len);
}  // namespace crosslmm

#ifndef CROSSLMM_CUDA_ARCHS
#define CROSSLMM_CUDA_ARCHS ""
#endif
#ifndef CROSSLMM_VERSION
#define CROSSLMM_VERSION "unknown"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "crosslmm-ops CUDA kernels (see crosslmm_ops/ops for the Python interface)";
  m.def("cuda_archs", [] { return std::string(CROSSLMM_CUDA_ARCHS); },
        "Comma-separated GPU architectures this module was compiled for, e.g. '80,90a'.");
  m.def("version", [] { return std::string(CROSSLMM_VERSION); },
        "The crosslmm-ops version this module was built from.");
  m.def("cuda_version", [] { return CUDART_VERSION; }, "CUDART_VERSION at build time.");
  m.def("token_pool_mix", &crosslmm::token_pool_mix, "Gather-pool tokens along a CSR plan.",
        pybind11::arg("src"), pybind11::arg("dst"), pybind11::arg("row_ptr"),
        pybind11::arg("col_idx"), pybind11::arg("weight"), pybind11::arg("argmax"),
        pybind11::arg("kind"), pybind11::arg("temporal_stride"), pybind11::arg("frames_in"),
        pybind11::arg("tokens_in"), pybind11::arg("time_transposed"), pybind11::arg("max_row_len"));
}
