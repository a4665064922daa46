// The epilogue shared by the Hopper (sm_90a) attention kernels: one consumer warpgroup's 64 x 128
// fp32 accumulator tile (the forward's O, the backward's dQ) written to global memory, either as
// fp32 partial results (a split-KV CTA) or rounded to T through shared memory.
//
// Accumulator layout (wgmma m64n128, see common/sm90_ptx.cuh): acc[4 j + q] of thread
// (warp, lane) holds row 16 warp + g + 8 (q / 2), column 8 j + 2 t + (q % 2), with g = lane / 4
// and t = lane % 4. Each of the thread's two rows i (g, g + 8) is multiplied by row_scale[i].
// Where each row goes is the caller's: a row-pointer function (GQA-packed rows map to (token,
// head) pairs) or one row stride, with rows at or past `valid_rows` (past the segment's end) not
// written.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "common/mma.cuh"
#include "common/sm90_ptx.cuh"

namespace crosslmm {
namespace attention {

// Thread coordinates in a warpgroup's m64n128 accumulator tile.
struct AccumulatorLane {
  int wg_tid;    // 0..127 within the warpgroup
  int warp;      // 16-row slab of the warpgroup's 64 rows
  int quad_row;  // g: rows g and g + 8 of the slab
  int quad_col;  // t: columns 2t, 2t+1 of each 8-column block
};

// fp32 straight from the registers: row i at row_ptr(i), which is nullptr for a row not to be
// written (8-byte stores, 32-byte row pieces).
template <typename RowPtr>
__device__ __forceinline__ void store_accumulator_fp32_rows(RowPtr row_ptr,
                                                            const float (&acc)[64],
                                                            const float (&row_scale)[2],
                                                            const AccumulatorLane& at) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float* const dst = row_ptr(at.warp * 16 + at.quad_row + 8 * r);
    if (dst == nullptr) continue;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      *reinterpret_cast<float2*>(dst + 8 * j + 2 * at.quad_col) =
          make_float2(acc[4 * j + 2 * r] * row_scale[r], acc[4 * j + 2 * r + 1] * row_scale[r]);
    }
  }
}

// The same for rows of one tensor: row i at partial + i * 128, rows from valid_rows on skipped.
__device__ __forceinline__ void store_accumulator_fp32(float* partial, const float (&acc)[64],
                                                       const float (&row_scale)[2],
                                                       const AccumulatorLane& at, int valid_rows) {
  store_accumulator_fp32_rows(
      [&](int row) -> float* {
        return row < valid_rows ? partial + static_cast<int64_t>(row) * 128 : nullptr;
      },
      acc, row_scale, at);
}

// Rounded to T and staged through `stage`: this warpgroup's 64 rows of a [rows][128 channels]
// tile kept as two 64-channel halves `half_bytes` apart, 128-byte rows in the 128-byte swizzle
// (element (row r, channel 8j + 2t) at half j / 8, chunk (j % 8) ^ (r % 8); r % 8 = g here, so a
// warp's 32 4-byte stores hit 32 different banks). The caller must be done with those rows (their
// wgmma reads complete). Then 16-byte stores, 16 consecutive threads per 256-byte row: row i at
// row_ptr(i), nullptr for a row not to be written. `barrier` is a named barrier of this
// warpgroup's 128 threads.
template <typename T, typename RowPtr>
__device__ __forceinline__ void store_accumulator_staged_rows(RowPtr row_ptr, uint32_t stage,
                                                              uint32_t half_bytes,
                                                              const float (&acc)[64],
                                                              const float (&row_scale)[2],
                                                              const AccumulatorLane& at,
                                                              uint32_t barrier) {
  // Order the wgmmas' (async-proxy) reads of these rows before the ordinary stores below.
  sm90::fence_proxy_async_shared();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = at.warp * 16 + at.quad_row + 8 * r;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const uint32_t addr = stage + (j / 8) * half_bytes + row * 128 +
                            (((j % 8) ^ at.quad_row) << 4) + 4 * at.quad_col;
      const uint32_t bits =
          pack2<T>(acc[4 * j + 2 * r] * row_scale[r], acc[4 * j + 2 * r + 1] * row_scale[r]);
      asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(bits) : "memory");
    }
  }
  sm90::named_barrier_sync(barrier, 128);
#pragma unroll
  for (int it = 0; it < (64 * 16) / 128; ++it) {
    const int idx = it * 128 + at.wg_tid;
    const int row = idx / 16;
    const int chunk = idx % 16;
    T* const dst = row_ptr(row);
    if (dst == nullptr) continue;
    const uint32_t addr =
        stage + (chunk / 8) * half_bytes + row * 128 + (((chunk % 8) ^ (row % 8)) << 4);
    uint32_t v[4];
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3])
                 : "r"(addr)
                 : "memory");
    Vec8<T> value;
    memcpy(&value, v, sizeof(value));
    *reinterpret_cast<Vec8<T>*>(dst + chunk * 8) = value;
  }
}

// The same for rows of one tensor: row i at out + i * row_stride, rows from valid_rows on skipped.
template <typename T>
__device__ __forceinline__ void store_accumulator_staged(T* out, int64_t row_stride,
                                                         uint32_t stage, uint32_t half_bytes,
                                                         const float (&acc)[64],
                                                         const float (&row_scale)[2],
                                                         const AccumulatorLane& at, int valid_rows,
                                                         uint32_t barrier) {
  store_accumulator_staged_rows<T>(
      [&](int row) -> T* { return row < valid_rows ? out + row * row_stride : nullptr; }, stage,
      half_bytes, acc, row_scale, at, barrier);
}

}  // namespace attention
}  // namespace crosslmm
