// Device helpers shared by the forward and backward attention kernels: segment bounds and the
// row -> (token, head) map (see attention_params.h for what a "row" is).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention/attention_params.h"

namespace crosslmm {
namespace attention {

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

// Row r of a segment's rows -> (query token, query head).
struct RowMap {
  int token_begin;     // first query token of the segment
  int first_head;      // query head of row 0
  int rows_per_query;  // 1, or the GQA group size when heads are packed

  __device__ __forceinline__ int token(int row) const { return token_begin + row / rows_per_query; }
  __device__ __forceinline__ int head(int row) const { return first_head + row % rows_per_query; }
};

__device__ __forceinline__ int ceil_div_int(int a, int b) { return (a + b - 1) / b; }

}  // namespace attention
}  // namespace crosslmm
