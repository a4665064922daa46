// The tensor-core building blocks of the attention kernels: the shared-memory tile layout, operand
// fragment loads, and packing accumulators into operands. Works on sm_80 and sm_90 alike
// (Ampere-style warp-level MMA). The instructions, wrapped in ptx.cuh:
//
//   cp.async        16-byte global -> shared copies that run in the background (double buffering);
//                   a source size of 0 writes zeros, which is how rows past the end of a
//                   segment are loaded: zeros keep every product finite; the kernels also mask
//                   them explicitly.
//   ldmatrix(.trans) loads four 8x8 tiles of 16-bit elements from shared memory straight into the
//                   register fragments of mma.sync (.trans for operands stored K-major).
//   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}:
//                   D[16x8] += A[16x16] * B[16x8], fp32 accumulate.
//
// Fragment layouts of m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with
// g = lane / 4 (the "group") and t = lane % 4 (the thread in the group):
//   A (4 regs, 2 elements each): a0 = (row g,   cols 2t, 2t+1)   a1 = (row g+8, cols 2t, 2t+1)
//                                a2 = (row g,   cols 2t+8, +9)   a3 = (row g+8, cols 2t+8, +9)
//   B (2 regs):                  b0 = (k 2t, 2t+1; col g)         b1 = (k 2t+8, 2t+9; col g)
//   C (4 floats):                c0, c1 = (row g, cols 2t, 2t+1)  c2, c3 = (row g+8, cols 2t, 2t+1)
// So the accumulator of two adjacent 16x8 tiles (n-blocks 2j, 2j+1) is, element for element, the A
// fragment of one 16x16 tile (k-step j): that is how P = softmax(S) feeds P V without going through
// shared memory (pack_a_from_accumulators).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/ptx.cuh"

namespace crosslmm {

// ---------------------------------------------------------------------------------------------
// Shared-memory tiles: [rows][kHeadDim] 16-bit elements, each row padded by 16 bytes
// (kSmemRowStride elements apart). ldmatrix reads one 16-byte chunk from each of 8 consecutive
// rows; with rows 128 or 256 bytes long those 8 chunks would all fall in the same 4 banks, while
// with the 16-byte pad row r starts r 16-byte bank groups further on and the 8 chunks cover all 32
// banks: conflict-free. The cp.async writes (8 consecutive threads write 8 consecutive chunks of
// one row) are conflict-free either way. Padding rather than an XOR swizzle keeps every fragment
// address a plain affine function of (row, chunk), easy to read and to check, for 16 bytes of
// shared memory per row.
// ---------------------------------------------------------------------------------------------

template <int kHeadDim>
constexpr int kSmemRowStride = kHeadDim + 8;  // elements

template <int kHeadDim>
__device__ __forceinline__ int tile_offset(int row, int chunk) {
  return row * kSmemRowStride<kHeadDim> + chunk * 8;
}

// Two floats -> two 16-bit values in one register, `lo` in the low half (the lower column).
// (memcpy rather than a pointer cast: reading a __half2 through a uint32_t lvalue breaks the
// aliasing rules; the copy compiles to nothing.)
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t bits;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    memcpy(&bits, &h, sizeof(bits));
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&bits, &h, sizeof(bits));
  }
  return bits;
}

// 2, 4 or 8 16-bit elements moved as one 4-, 8- or 16-byte access. Accessing T memory through these
// (aggregates of T) is allowed by the aliasing rules, unlike a cast to uint32_t* or uint4*.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};
template <typename T>
using Vec8 = Vec<T, 8>;

// dst[0], dst[1] = lo, hi rounded to T, in one 4-byte store (dst 4-byte aligned).
template <typename T>
__device__ __forceinline__ void store2(T* dst, float lo, float hi) {
  const uint32_t bits = pack2<T>(lo, hi);
  Vec<T, 2> pair;
  memcpy(&pair, &bits, sizeof(bits));
  *reinterpret_cast<Vec<T, 2>*>(dst) = pair;
}

// dst[0..3] = x[0..3] rounded to T, in one 8-byte store (dst 8-byte aligned).
template <typename T>
__device__ __forceinline__ void store4(T* dst, const float (&x)[4]) {
  const uint32_t bits[2] = {pack2<T>(x[0], x[1]), pack2<T>(x[2], x[3])};
  Vec<T, 4> quad;
  memcpy(&quad, bits, sizeof(bits));
  *reinterpret_cast<Vec<T, 4>*>(dst) = quad;
}

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(x);
  } else {
    return __bfloat162float(x);
  }
}

// ---------------------------------------------------------------------------------------------
// Operand fragments from shared-memory tiles. Every helper is called by all 32 lanes of a warp.
// ---------------------------------------------------------------------------------------------

// A fragment of the 16x16 block at (row0, k0) of a row-major [rows][k] tile.
// Lanes 0-15 address rows row0..row0+15 at k0 (matrices a0, a1), lanes 16-31 the same rows at k0+8
// (a2, a3).
template <int kHeadDim>
__device__ __forceinline__ void load_a_fragment(uint32_t (&a)[4], const void* tile, int row0,
                                                int k0) {
  const int lane = threadIdx.x % 32;
  const int row = row0 + (lane % 16);
  const int chunk = k0 / 8 + lane / 16;
  ldmatrix_x4(a, static_cast<const uint16_t*>(tile) + tile_offset<kHeadDim>(row, chunk));
}

// B fragments of two adjacent n-blocks (n0..n0+7 and n0+8..n0+15) over k0..k0+15, where the tile is
// stored [n][k] (B = tile^T; e.g. K in S = Q K^T). b[j][0], b[j][1] are b0, b1 of n-block j.
// Lanes 0-7: rows n0.. at k0 (b[0][0]); 8-15: rows n0.. at k0+8 (b[0][1]);
// 16-23: rows n0+8.. at k0 (b[1][0]); 24-31: rows n0+8.. at k0+8 (b[1][1]).
template <int kHeadDim>
__device__ __forceinline__ void load_b_fragments_nk(uint32_t (&b)[2][2], const void* tile, int n0,
                                                    int k0) {
  const int lane = threadIdx.x % 32;
  const int row = n0 + (lane % 8) + (lane / 16) * 8;
  const int chunk = k0 / 8 + (lane / 8) % 2;
  uint32_t r[4];
  ldmatrix_x4(r, static_cast<const uint16_t*>(tile) + tile_offset<kHeadDim>(row, chunk));
  b[0][0] = r[0];
  b[0][1] = r[1];
  b[1][0] = r[2];
  b[1][1] = r[3];
}

// B fragments of two adjacent n-blocks (n0.., n0+8..) over k0..k0+15, where the tile is stored
// [k][n] (B = tile; e.g. V in O = P V), through ldmatrix.trans.
// Lanes 0-7: rows k0.. at n0 (b[0][0]); 8-15: rows k0+8.. at n0 (b[0][1]);
// 16-23: rows k0.. at n0+8 (b[1][0]); 24-31: rows k0+8.. at n0+8 (b[1][1]).
template <int kHeadDim>
__device__ __forceinline__ void load_b_fragments_kn(uint32_t (&b)[2][2], const void* tile, int k0,
                                                    int n0) {
  const int lane = threadIdx.x % 32;
  const int row = k0 + (lane % 8) + ((lane / 8) % 2) * 8;
  const int chunk = n0 / 8 + lane / 16;
  uint32_t r[4];
  ldmatrix_x4_trans(r, static_cast<const uint16_t*>(tile) + tile_offset<kHeadDim>(row, chunk));
  b[0][0] = r[0];
  b[0][1] = r[1];
  b[1][0] = r[2];
  b[1][1] = r[3];
}

// The A fragment of k-step j (16 columns) from the fp32 accumulators of n-blocks 2j and 2j+1.
template <typename T>
__device__ __forceinline__ void pack_a_from_accumulators(uint32_t (&a)[4], const float (&left)[4],
                                                         const float (&right)[4]) {
  a[0] = pack2<T>(left[0], left[1]);
  a[1] = pack2<T>(left[2], left[3]);
  a[2] = pack2<T>(right[0], right[1]);
  a[3] = pack2<T>(right[2], right[3]);
}

// ---------------------------------------------------------------------------------------------
// Tile loads: kRows rows of kHeadDim elements, global -> (padded) shared, by all kThreads threads.
// `row_address(r)` gives the global address of row r (only called for r < valid_rows); rows at or
// past valid_rows are zero-filled. The caller commits the cp.async group.
// ---------------------------------------------------------------------------------------------

template <int kRows, int kHeadDim, int kThreads, typename T, typename RowAddress>
__device__ __forceinline__ void load_tile_async(T* smem_tile, int valid_rows, const T* fallback,
                                                RowAddress row_address) {
  constexpr int kChunksPerRow = kHeadDim / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "tile chunks must divide evenly over the threads");
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int c = static_cast<int>(threadIdx.x) + i * kThreads;
    const int row = c / kChunksPerRow;
    const int chunk = c % kChunksPerRow;
    const bool valid = row < valid_rows;
    const T* src = valid ? row_address(row) + chunk * 8 : fallback;
    cp_async_16(smem_tile + tile_offset<kHeadDim>(row, chunk), src, valid);
  }
}

// ---------------------------------------------------------------------------------------------
// Small warp helpers
// ---------------------------------------------------------------------------------------------

// Reductions over the 4 lanes of a quad (the lanes that hold one accumulator row).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

}  // namespace crosslmm
