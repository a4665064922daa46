// Device helpers shared by the forward and backward attention kernels: the row -> (token, head)
// map (see attention_params.h for what a "row" is). Segment bounds and the softmax constants are
// common/segments.cuh's.
#pragma once

#include <cuda_runtime.h>

#include "attention/attention_params.h"
#include "common/segments.cuh"

namespace crosslmm {
namespace attention {

// Row r of a segment's rows -> (query token, query head).
struct RowMap {
  int token_begin;     // first query token of the segment
  int first_head;      // query head of row 0
  int rows_per_query;  // 1, or the GQA group size when heads are packed

  __device__ __forceinline__ int token(int row) const { return token_begin + row / rows_per_query; }
  __device__ __forceinline__ int head(int row) const { return first_head + row % rows_per_query; }
};

}  // namespace attention
}  // namespace crosslmm
