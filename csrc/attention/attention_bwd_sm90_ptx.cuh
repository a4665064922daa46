// Extra wgmma wrapper for the Hopper (sm_90a) attention backward (attention_bwd_sm90_kernel.cuh),
// next to those of the forward (attention_fwd_sm90_ptx.cuh, which this reuses for mbarriers, TMA,
// descriptors, fences, named barriers and setmaxnreg). Written from the PTX ISA ("Asynchronous
// Warpgroup Level Matrix Multiply-Accumulate").
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention/attention_fwd_sm90_ptx.cuh"

namespace crosslmm {
namespace attention {
namespace sm90 {

// wgmma m64n64k16, fp32 accumulators, A and B from shared memory, both K-major:
// D[64 x 64] (+)= A[64 x 16] * B[16 x 64]. Accumulator layout (32 floats per thread): d[4j + q]
// holds row 16 * warp + lane / 4 + 8 * (q / 2), column 8 j + 2 (lane % 4) + (q % 2), j = 0..7 (the
// m64n128 layout of attention_fwd_sm90_ptx.cuh cut to 8 column blocks). scale_d = 0: D = A B.
template <typename T>
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[32], uint64_t desc_a,
                                                   uint64_t desc_b, int scale_d) {
#define CROSSLMM_WGMMA_D32                                                                   \
  "{"                                                                                        \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                   \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"           \
  "}"
#define CROSSLMM_WGMMA_D32_OPERANDS(d)                                                       \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),      \
      "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),           \
      "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),        \
      "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),        \
      "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),        \
      "+f"(d[31])
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " CROSSLMM_WGMMA_D32
        ", %32, %33, p, 1, 1, 0, 0;\n}\n"
        : CROSSLMM_WGMMA_D32_OPERANDS(d)
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  } else {
    static_assert(std::is_same_v<T, __half>, "T must be __half or __nv_bfloat16");
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " CROSSLMM_WGMMA_D32
        ", %32, %33, p, 1, 1, 0, 0;\n}\n"
        : CROSSLMM_WGMMA_D32_OPERANDS(d)
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
#undef CROSSLMM_WGMMA_D32
#undef CROSSLMM_WGMMA_D32_OPERANDS
}

}  // namespace sm90
}  // namespace attention
}  // namespace crosslmm
