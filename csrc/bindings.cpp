// The Python module crosslmm_ops._C: one pybind11 entry per kernel family.
//
// These are low-level entry points: the Python layer (crosslmm_ops/ops/*.py) validates user input,
// allocates outputs and registers each op with torch.library (custom op + fake + autograd). The
// checks inside each entry point are a second line of defence, not the user-facing errors.
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include <string>
#include <tuple>

namespace crosslmm {
void token_pool_mix(const at::Tensor& src, at::Tensor& dst, const at::Tensor& row_ptr,
                    const at::Tensor& col_idx, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& argmax, int64_t kind,
                    int64_t temporal_stride, int64_t frames_in, int64_t tokens_in,
                    bool time_transposed, int64_t max_row_len);
std::string attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              at::Tensor& out, at::Tensor& lse, const at::Tensor& cu_seqlens_q,
                              const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                              int64_t max_seqlen_k, double softmax_scale, int64_t num_splits,
                              const std::string& kernel);
std::string attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                               at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                               const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                               int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                               bool deterministic, const std::string& kernel);
std::tuple<at::Tensor, at::Tensor> projected_attention_core_forward(
    const at::Tensor& q, const at::Tensor& x, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double softmax_scale, int64_t num_splits, const std::string& kernel);
std::tuple<at::Tensor, at::Tensor> projected_attention_core_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& x, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, int64_t num_splits,
    const c10::optional<at::Tensor>& dlse);
std::string projected_attention_core_forward_kernel_name();
std::string attention_forward_kernel_name();
int64_t attention_forward_rows_per_query();
std::string attention_backward_kernel_name();
std::string attention_backward_sm90_declined();
}  // namespace crosslmm

#ifndef CROSSLMM_CUDA_ARCHS
#define CROSSLMM_CUDA_ARCHS ""
#endif
#ifndef CROSSLMM_VERSION
#define CROSSLMM_VERSION "unknown"
#endif

namespace {

// Every entry point reports a failed check (TORCH_CHECK, a failed launch) as a Python RuntimeError
// raised here, rather than through pybind11's exception translators: those live in pybind11's
// internals, which this module may not share with torch's own build (a mismatch crashed the
// interpreter on the first failed check).
[[noreturn]] void raise_runtime_error(const char* message) {
  PyErr_SetString(PyExc_RuntimeError, message);
  throw pybind11::error_already_set();
}

template <typename R, typename... Args>
auto guarded(R (*fn)(Args...)) {
  return [fn](Args... args) -> R {
    try {
      return fn(std::forward<Args>(args)...);
    } catch (const c10::Error& e) {
      raise_runtime_error(e.what_without_backtrace());
    } catch (const pybind11::error_already_set&) {
      throw;
    } catch (const std::exception& e) {
      raise_runtime_error(e.what());
    }
  };
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "crosslmm-ops CUDA kernels (see crosslmm_ops/ops for the Python interface)";
  m.def("cuda_archs", [] { return std::string(CROSSLMM_CUDA_ARCHS); },
        "Comma-separated GPU architectures this module was compiled for, e.g. '80,90a'.");
  m.def("version", [] { return std::string(CROSSLMM_VERSION); },
        "The crosslmm-ops version this module was built from.");
  m.def("cuda_version", [] { return CUDART_VERSION; }, "CUDART_VERSION at build time.");
  m.def("token_pool_mix", guarded(&crosslmm::token_pool_mix), "Gather-pool tokens along a CSR plan.",
        pybind11::arg("src"), pybind11::arg("dst"), pybind11::arg("row_ptr"),
        pybind11::arg("col_idx"), pybind11::arg("weight"), pybind11::arg("argmax"),
        pybind11::arg("kind"), pybind11::arg("temporal_stride"), pybind11::arg("frames_in"),
        pybind11::arg("tokens_in"), pybind11::arg("time_transposed"), pybind11::arg("max_row_len"));
  m.def("attention_forward", guarded(&crosslmm::attention_forward),
        "Varlen cross-attention forward: writes out = softmax(q k^T * scale) v and lse (natural "
        "log, [Hq, total_q]); num_splits 0 = heuristic key split. kernel: 'mma_sync' or 'sm90' "
        "(where it can run; crosslmm_ops.planner chooses). Returns the kernel that ran.",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("out"),
        pybind11::arg("lse"), pybind11::arg("cu_seqlens_q"), pybind11::arg("cu_seqlens_k"),
        pybind11::arg("max_seqlen_q"), pybind11::arg("max_seqlen_k"),
        pybind11::arg("softmax_scale"), pybind11::arg("num_splits"),
        pybind11::arg("kernel") = std::string("mma_sync"));
  m.def("attention_forward_kernel_name", &crosslmm::attention_forward_kernel_name,
        "Which forward kernel the last attention_forward call on this thread ran (what it "
        "returned): 'sm90_wgmma', 'mma_sync', or 'none' (nothing to compute).");
  m.def("attention_forward_rows_per_query", &crosslmm::attention_forward_rows_per_query,
        "Query heads per tile row of the last attention_forward call on this thread: 1 (a tile "
        "holds one query head's tokens) or the GQA group size (its heads packed into the rows); "
        "0 when nothing ran.");
  m.def("attention_backward_kernel_name", &crosslmm::attention_backward_kernel_name,
        "Which backward the last attention_backward call on this thread ran: 'sm90_wgmma' (wgmma "
        "dK/dV and dQ kernels), 'sm90_dkdv' (wgmma dK/dV, mma.sync dQ), 'mma_sync', or 'none' "
        "(nothing to compute).");
  m.def("attention_backward_sm90_declined", &crosslmm::attention_backward_sm90_declined,
        "Empty, or why the last attention_backward call that asked for the sm90 backward ran the "
        "mma.sync one instead (a TMA tensor map that could not be encoded).");
  m.def("attention_backward", guarded(&crosslmm::attention_backward),
        "Varlen cross-attention backward: writes dq, dk, dv (always deterministic). kernel: "
        "'mma_sync', 'sm90' or 'sm90_dkdv' (where they can run; crosslmm_ops.planner chooses). "
        "Returns the kernel that ran.",
        pybind11::arg("dout"), pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"),
        pybind11::arg("out"), pybind11::arg("lse"), pybind11::arg("dq"), pybind11::arg("dk"),
        pybind11::arg("dv"), pybind11::arg("cu_seqlens_q"), pybind11::arg("cu_seqlens_k"),
        pybind11::arg("max_seqlen_q"), pybind11::arg("max_seqlen_k"),
        pybind11::arg("softmax_scale"), pybind11::arg("deterministic"),
        pybind11::arg("kernel") = std::string("mma_sync"));
  m.def("projected_attention_core_forward", guarded(&crosslmm::projected_attention_core_forward),
        "Projection-fused attention core (csrc/projected/): per segment and head, "
        "out = softmax(q x^T * scale) x with q [total_q, H, Dv] and x [total_k, Dv] (keys = values "
        "= x); returns (out [total_q, H, Dv], lse [H, total_q] fp32, natural log); num_splits 0 = "
        "heuristic key split. kernel: 'auto' (the mma.sync kernels, the decode kernel for one-tile "
        "calls where it fits), 'mma_sync' (the general kernels), 'decode' / 'decode_bulk' (the "
        "decode kernel with cp.async / bulk-copy loads), 'sm90_cluster' (the Hopper kernel), each "
        "where it can run; crosslmm_ops.planner chooses.",
        pybind11::arg("q"), pybind11::arg("x"), pybind11::arg("cu_seqlens_q"),
        pybind11::arg("cu_seqlens_k"), pybind11::arg("max_seqlen_q"),
        pybind11::arg("max_seqlen_k"), pybind11::arg("softmax_scale"),
        pybind11::arg("num_splits"), pybind11::arg("kernel") = std::string("auto"));
  m.def("projected_attention_core_backward",
        guarded(&crosslmm::projected_attention_core_backward),
        "Backward of projected_attention_core_forward (csrc/projected/): returns (dq [total_q, H, "
        "Dv], dx [total_k, Dv]) from dout, q, x, out, lse (and dlse [H, total_q], optional); "
        "deterministic; num_splits 0 = heuristic key/row split.",
        pybind11::arg("dout"), pybind11::arg("q"), pybind11::arg("x"), pybind11::arg("out"),
        pybind11::arg("lse"), pybind11::arg("cu_seqlens_q"), pybind11::arg("cu_seqlens_k"),
        pybind11::arg("max_seqlen_q"), pybind11::arg("max_seqlen_k"),
        pybind11::arg("softmax_scale"), pybind11::arg("num_splits"),
        pybind11::arg("dlse") = pybind11::none());
  m.def("projected_attention_core_forward_kernel_name",
        &crosslmm::projected_attention_core_forward_kernel_name,
        "Which kernel the last projected_attention_core_forward call on this thread ran: "
        "'sm90_cluster', 'decode', 'decode_bulk', 'mma_sync', or 'none' (nothing to compute).");
}
