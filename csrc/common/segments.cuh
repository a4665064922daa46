// Device helpers shared by every kernel that works on packed variable-length segments
// (cu_seqlens, as in flash-attn's varlen API), and the log/exp constants of the online softmax.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace crosslmm {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// [begin, begin + length) of segment b in one of the packed token dimensions. The bounds are
// clamped to [0, total] so that a malformed cu_seqlens can never make a kernel read or write out of
// bounds (it gives wrong results instead; the Python layer validates cu_seqlens).
struct Segment {
  int begin;
  int length;
};

__device__ __forceinline__ Segment segment_bounds(const int32_t* cu_seqlens, int b, int total) {
  const int begin = min(max(cu_seqlens[b], 0), total);
  const int end = min(max(cu_seqlens[b + 1], begin), total);
  return {begin, end - begin};
}

__device__ __forceinline__ int ceil_div_int(int a, int b) { return (a + b - 1) / b; }

}  // namespace crosslmm
