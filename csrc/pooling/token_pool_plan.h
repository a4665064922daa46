// Launch plan of token pooling's gather (token_pool.cu): which kernel, block and grid shape and how
// much shared memory a call gets. Plain C++ with no CUDA or torch headers, so that the plan each
// pooling mode gets can be checked on a machine without a GPU (tests/test_token_pool.py compiles
// tests/token_pool_plan_driver.cpp against it).
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/host_math.h"

namespace crosslmm {

enum MixKind : int {
  kWeightedSum = 0,  // avg, adaptive, bilinear forward, and their backward (transposed CSR)
  kMaxForward = 1,   // max over the CSR row; writes the winning input position to argmax
  kMaxBackward = 2,  // gradient of max: sum of grad_out over the rows whose winner is this token
};

// Source rows each thread has in flight per pipeline stage (token_mix_kernel). The max backward
// also stages each row's int32 winners, so it takes fewer to keep two blocks per multiprocessor.
constexpr int stage_rows(int kind) { return kind == kMaxBackward ? 4 : 8; }

// The most threads in a token_mix_kernel block (its __launch_bounds__). Only the weighted sum has
// blocks above 256 threads (see plan_mix); the max kernels keep 256, under which ptxas gives them
// their lean allocations (at 512 it spilled the max backward's).
constexpr int mix_max_threads(int kind) { return kind == kWeightedSum ? 512 : 256; }

// Rows that share source tokens are split over enough groups of threads that each thread's taps
// take at most this many pipeline stages (see plan_mix).
constexpr int kSharedRowStages = 4;

// Splits for split_row_sum_kernel: 1 (use token_mix_kernel) unless the rows are long and too few
// to fill the GPU with one block each; then enough splits for about 4 blocks per multiprocessor,
// each split at least 64 taps long.
inline int64_t row_splits(int kind, int64_t rows, int64_t chunks, int64_t max_taps, int sms) {
  if (kind != kWeightedSum || max_taps < 256 || rows * chunks >= 4LL * sms) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(4LL * sms, rows * chunks), max_taps / 64));
}

struct MixPlan {
  int64_t splits;  // > 1: split_row_sum_kernel takes the call, with `lanes`; the rest is unused
  int64_t lanes, groups, chunks;  // token_mix_kernel: block (lanes, groups), grid (rows, chunks)
  int64_t stage_slots;            // staged source rows per thread that shared memory holds
  int64_t smem;                   // dynamic shared memory of the launch, bytes
  int64_t most_smem;              // the most any launch of this kernel instantiation asks for
};

// rows: destination rows (B * T' * n); lanes_total: channels / vec; staged_bytes: shared memory
// per staged row and thread (vec elements, plus vec int32 winners for the max backward);
// max_taps: the longest row, frames included; taps_total: the CSR's entry count, and
// src_tokens: tokens per source frame (more entries than tokens: rows share source tokens).
inline MixPlan plan_mix(int kind, bool track_winner, int64_t rows, int64_t lanes_total, int vec,
                        int64_t staged_bytes, int64_t max_taps, int64_t taps_total,
                        int64_t src_tokens, int sms) {
  MixPlan plan{};
  // Split the channels over several blocks only when there are too few rows to fill the GPU.
  // A block covers at most 256 lanes of channels (2048 bf16 channels at 16 bytes a lane).
  int64_t chunks = ceil_div(lanes_total, 256);
  int64_t lanes = ceil_div(lanes_total, chunks);
  plan.lanes = lanes;
  plan.splits = row_splits(kind, rows, chunks, max_taps, sms);
  if (plan.splits > 1) return plan;
  while (rows * chunks < 8LL * sms && lanes > 16) {
    chunks *= 2;
    lanes = ceil_div(lanes_total, chunks);
  }
  plan.lanes = lanes;
  plan.chunks = ceil_div(lanes_total, lanes);

  // Then split each row's taps over groups of threads so long rows (27x27 -> 1) keep many loads in
  // flight; a block stays near 256 threads.
  const int64_t stage = stage_rows(kind);
  int64_t groups = std::max<int64_t>(1, std::min<int64_t>(256 / std::max<int64_t>(lanes, 1), max_taps));
  groups = std::min<int64_t>(groups, 32);
  // Rows that share source tokens (adaptive 27 -> 4: neighbouring windows both read the token row
  // where they meet) read them from DRAM once only if the second read still finds them in L2. A
  // window is scanned row by row, so the two reads lie about a block's lifetime apart, and L2
  // must hold the windows of every block resident meanwhile: for 27 -> 4 at 1152 channels in one
  // group, 792 blocks of 56 taps x 2304 bytes, about 100 MB against an H100's 50 MB. More groups
  // per row, at the same threads per multiprocessor, shorten each block's scan and shrink that
  // footprint in proportion. Only the weighted sum (see mix_max_threads).
  if (kind == kWeightedSum && taps_total > src_tokens) {
    const int64_t wanted = ceil_div(max_taps, kSharedRowStages * stage);
    groups = std::max(groups, std::min<int64_t>({wanted, mix_max_threads(kind) / lanes, 32}));
  }
  plan.groups = groups;

  // Shared memory: the pipeline's two stages, or one stage of only the slots used when a
  // thread's taps all fit in it (bilinear's 4-tap rows: a quarter of the two stages, so a
  // multiprocessor holds registers' worth of blocks rather than shared memory's); then, reusing
  // it, the groups' partial results.
  // The slot count is even because the max backward's winners follow the rows in shared memory
  // and a vector of winners is aligned to at most twice a row's size.
  const int64_t threads = lanes * groups;
  const int64_t per_thread = ceil_div(max_taps, groups);
  plan.stage_slots = per_thread <= stage ? ceil_div(per_thread, 2) * 2 : 2 * stage;
  const int64_t stage_bytes = plan.stage_slots * threads * staged_bytes;
  const int64_t combine_bytes =
      groups > 1 ? threads * vec * (sizeof(float) + (track_winner ? sizeof(int32_t) : 0)) : 0;
  plan.smem = std::max(stage_bytes, combine_bytes);
  plan.most_smem = 2 * stage * mix_max_threads(kind) * staged_bytes;
  return plan;
}

}  // namespace crosslmm
