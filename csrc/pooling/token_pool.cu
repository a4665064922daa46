// Token pooling on token-major [B, T, N, D] tensors, forward and backward, in one kernel.
//
// Every spatial pooling mode of token_pool is a map from the N tokens of a frame to n output tokens
// in which each output token reads a short list of input tokens:
//   avg / adaptive / bilinear : out[o] = sum_j w_j * x[idx_j]          (a sparse matrix, CSR)
//   max                       : out[o] = max_j x[idx_j], remembering which j won
// The Python side (crosslmm_ops/ops/token_pool.py, `pool_plan`) builds that CSR once per pooling
// spec and also its transpose. The backward of a linear mode is the same weighted sum over the
// transposed CSR, and the backward of max is a sum over the transposed CSR of the gradients whose
// recorded winner is this token. So a single gather kernel serves forward and backward of every
// mode, and the backward needs no atomics: each input token's gradient is written by one thread,
// in a fixed order, so it is deterministic.
//
// Temporal pooling (stride s over frames, the last group possibly shorter) is folded in: an output
// frame t reads input frames [t*s, min(t*s+s, T)); in the backward ("time transposed") an input frame
// f reads output frame f/s.
//
// Long weighted rows too few to fill the GPU one block each (the mean over a frame) take a second
// path: each row's taps split over several blocks, their fp32 partial sums added in a fixed order
// by a small kernel (split_row_sum_kernel), so that path is deterministic too.
//
// Layout: the channel dimension D is innermost with stride 1, so a thread owns VEC consecutive
// channels (16 bytes when alignment allows) of one output token; the B, T, N dimensions may have any
// strides, so sliced and non-contiguous inputs are read in place without a copy.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>
#include <cstdint>
#include <limits>

#include "common/check.h"
#include "common/ptx.cuh"
#include "pooling/token_pool_plan.h"

namespace crosslmm {
namespace {

struct TokenMixParams {
  const void* src;           // [B, Ts, Ns, D], channel stride 1
  void* dst;                 // [B, Td, Nd, D], channel stride 1
  const int32_t* argmax_in;  // kMaxBackward: [B, Ts, Ns, D] winners of the forward (contiguous)
  int32_t* argmax_out;       // kMaxForward: [B, Td, Nd, D] (contiguous)
  const int32_t* row_ptr;    // [Nd + 1]
  const int32_t* col_idx;    // [nnz], token indices into the Ns source tokens
  const float* weight;       // [nnz] (kWeightedSum only)
  int64_t batch, src_frames, src_tokens, dst_frames, dst_tokens, channels;
  int64_t src_sb, src_st, src_sn;  // element strides of src
  int64_t dst_sb, dst_st, dst_sn;  // element strides of dst
  int64_t temporal_stride;         // s >= 1
  int64_t frames_in;               // frame count before temporal pooling (sizes the last group)
  int64_t tokens_in;               // token count per input frame (argmax encoding: f * N + i)
  bool time_transposed;            // backward direction over frames
  int chunk_channels;              // channels covered by one block (lanes * VEC)
  int stage_slots;                 // staged rows per thread that shared memory holds (MixPlan)
};

template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
// bf16 -> float is a 16-bit shift of the bits; spelled out, it keeps the registers of a packed
// load down (c10's conversion operator costs the compiler more of them).
template <>
__device__ __forceinline__ float to_float<c10::BFloat16>(c10::BFloat16 v) {
  return __uint_as_float(static_cast<uint32_t>(v.x) << 16);
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Packed {
  T v[VEC];
};

// Read-only loads (ld.global.nc) of 2 to 32 bytes: the sources are never written by this kernel.
template <typename P>
__device__ __forceinline__ P load_readonly(const void* p) {
  static_assert(sizeof(P) % 16 == 0 || sizeof(P) == 8 || sizeof(P) == 4 || sizeof(P) == 2,
                "unsupported vector size");
  P out;
  if constexpr (sizeof(P) % 16 == 0) {
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(P) / 16); ++i) {
      reinterpret_cast<uint4*>(&out)[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
    }
  } else if constexpr (sizeof(P) == 8) {
    *reinterpret_cast<uint2*>(&out) = __ldg(reinterpret_cast<const uint2*>(p));
  } else if constexpr (sizeof(P) == 4) {
    *reinterpret_cast<unsigned int*>(&out) = __ldg(reinterpret_cast<const unsigned int*>(p));
  } else {
    *reinterpret_cast<unsigned short*>(&out) = __ldg(reinterpret_cast<const unsigned short*>(p));
  }
  return out;
}

template <typename T, int VEC>
__device__ __forceinline__ void store_packed(T* p, const float (&in)[VEC]) {
  Packed<T, VEC> pk;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pk.v[k] = static_cast<T>(in[k]);
  *reinterpret_cast<Packed<T, VEC>*>(p) = pk;
}

// Frames of the source that feed destination frame `t`, and the weight of each (1/count for the
// averaging modes; the max modes ignore it).
struct FrameRange {
  int64_t first, last;  // [first, last)
  float weight;
};

__device__ __forceinline__ FrameRange frames_for(const TokenMixParams& p, int64_t t) {
  const int64_t s = p.temporal_stride;
  if (!p.time_transposed) {
    const int64_t first = t * s;
    const int64_t last = min(first + s, p.src_frames);
    return {first, last, 1.0f / static_cast<float>(last - first)};
  }
  const int64_t group = t / s;  // the output frame that input frame t was pooled into
  const int64_t count = min(s, p.frames_in - group * s);
  return {group, group + 1, 1.0f / static_cast<float>(count)};
}

// Max with a fixed tie-break: the larger value wins; equal values go to the earlier position in
// scan order (frames, then the CSR row); NaN wins over numbers so it propagates, as in torch. A
// thread scans its taps in increasing order, so within a thread "strictly better" is enough
// (`improves`); `beats` compares two threads' winners by their rank when their results meet.
__device__ __forceinline__ bool improves(float v, float best) {
  return v > best || (isnan(v) && !isnan(best));
}
// The larger of a and b, NaN if either is NaN: one instruction (max.NaN) from sm_80 on. Without
// winners to track, equal values need no tie-break (+0 and -0 may come out either way).
__device__ __forceinline__ float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float d;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
#else
  return improves(b, a) ? b : a;
#endif
}
__device__ __forceinline__ bool beats(float v, int32_t rank, float best, int32_t best_rank) {
  if (best_rank < 0) return true;
  const bool v_nan = isnan(v), b_nan = isnan(best);
  if (v_nan != b_nan) return v_nan;
  if (v_nan) return rank < best_rank;
  return v > best || (v == best && rank < best_rank);
}

// Copies one packed vector from global to shared memory without holding it in registers: cp.async
// for 4, 8 and multiples of 16 bytes (the addresses are aligned to the vector size by pick_vec);
// a 2-byte vector (one half/bf16 channel) goes through a register.
template <typename P>
__device__ __forceinline__ void copy_to_shared(P* smem, const void* gmem) {
  if constexpr (sizeof(P) % 16 == 0) {
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(P) / 16); ++i) {
      cp_async_16(reinterpret_cast<char*>(smem) + 16 * i, static_cast<const char*>(gmem) + 16 * i, true);
    }
  } else if constexpr (sizeof(P) == 8) {
    cp_async_8(smem, gmem, true);
  } else if constexpr (sizeof(P) == 4) {
    cp_async_4(smem, gmem, true);
  } else {
    *smem = load_readonly<P>(gmem);
  }
}

// Position of one of a thread's taps in its row's scan order: frame f (from the row's first frame)
// and index j into the CSR row. A thread takes taps group, group + groups, ... of the flattened
// (frame, j) order, so its scan rank is f * row_len + j.
struct Tap {
  int32_t f, j;
  __device__ __forceinline__ void advance(int32_t step, int32_t row_len) {
    j += step;
    while (j >= row_len) {
      j -= row_len;
      ++f;
    }
  }
};

// kTrackWinner (kMaxForward only): record each element's winning input position, which the max
// backward needs; without it the max is a plain running maximum with no per-element rank state.
//
// Source rows reach registers through shared memory: each thread copies its next kStage rows with
// cp.async while it combines the kStage rows it copied before (two stages). Loads in flight cost
// shared memory rather than registers, so short rows (a 3x3 window: 9 taps) have all their loads
// in flight at once and long rows (27x27 -> 1: 729 taps) keep 2 * kStage in flight per thread, at
// an occupancy that registers would not allow. Rows whose taps all fit in one stage are given
// only the slots they fill (p.stage_slots; see plan_mix). A thread reads back only the slots it
// wrote, so the stages need no barrier between threads.
template <typename T, int VEC, int KIND, bool kTrackWinner>
__global__ void __launch_bounds__(mix_max_threads(KIND)) token_mix_kernel(const TokenMixParams p) {
  static_assert(!kTrackWinner || KIND == kMaxForward, "only the max forward records winners");
  constexpr bool kMaxBackwardOnly = KIND == kMaxBackward;
  constexpr int kStage = stage_rows(KIND);
  using Row = Packed<T, VEC>;
  using Won = Packed<int32_t, VEC>;
  extern __shared__ __align__(16) unsigned char smem[];

  const int lane = threadIdx.x;
  const int group = threadIdx.y;
  const int groups = blockDim.y;
  const int threads = blockDim.x * blockDim.y;
  const int tid = group * blockDim.x + lane;
  // [2][kStage][threads], of which the first p.stage_slots * threads are allocated; the max
  // backward's winners follow, in the same layout.
  Row* s_rows = reinterpret_cast<Row*>(smem);
  Won* s_won = reinterpret_cast<Won*>(smem + p.stage_slots * threads * sizeof(Row));
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * p.chunk_channels +
                     static_cast<int64_t>(lane) * VEC;
  const bool active = c0 < p.channels;

  // (b, t, o) of the destination token; the launcher checks that rows fit in 32 bits, so these
  // divisions are the cheap 32-bit kind (a short row's block does little else).
  const int32_t row = static_cast<int32_t>(blockIdx.x);
  const int32_t dst_tokens = static_cast<int32_t>(p.dst_tokens);
  const int32_t dst_frames = static_cast<int32_t>(p.dst_frames);
  const int64_t o = row % dst_tokens;
  const int32_t bt = row / dst_tokens;
  const int64_t t = bt % dst_frames;
  const int64_t b = bt / dst_frames;

  const int32_t row_begin = p.row_ptr[o];
  const int32_t row_len = p.row_ptr[o + 1] - row_begin;
  const FrameRange fr = frames_for(p, t);
  const int32_t taps = static_cast<int32_t>(fr.last - fr.first) * row_len;
  const int32_t mine = active && group < taps ? (taps - group + groups - 1) / groups : 0;
  const int32_t batches = (mine + kStage - 1) / kStage;

  const T* __restrict__ src = static_cast<const T*>(p.src) + b * p.src_sb + fr.first * p.src_st + c0;
  // kMaxBackward: the forward position that this destination token (input frame t, token o) has.
  const int32_t my_pos = static_cast<int32_t>(t * p.tokens_in + o);

  auto first_tap = [&](int32_t batch) {
    const int32_t q = group + batch * kStage * groups;
    return Tap{q / max(row_len, 1), q % max(row_len, 1)};
  };
  auto issue = [&](int32_t batch) {
    const int stage = batch & 1;
    Tap tap = first_tap(batch);
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
      if (batch * kStage + u < mine) {
        const int64_t tok = p.col_idx[row_begin + tap.j];
        const int slot = (stage * kStage + u) * threads + tid;
        copy_to_shared(&s_rows[slot], src + tap.f * p.src_st + tok * p.src_sn);
        if constexpr (kMaxBackwardOnly) {
          copy_to_shared(&s_won[slot], p.argmax_in + ((b * p.src_frames + fr.first + tap.f) * p.src_tokens + tok) *
                                                         p.channels + c0);
        }
      }
      tap.advance(groups, row_len);
    }
    cp_async_commit();
  };

  // Max: acc starts at -inf, so an empty window (impossible for valid specs) yields -inf. With
  // kTrackWinner, best_rank is the scan rank of the winner, -1 until the first tap, so a first tap
  // equal to -inf still wins.
  float acc[VEC];
  int32_t best_rank[kTrackWinner ? VEC : 1];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    acc[k] = KIND == kMaxForward ? -std::numeric_limits<float>::infinity() : 0.f;
  }
#pragma unroll
  for (int k = 0; k < (kTrackWinner ? VEC : 1); ++k) best_rank[k] = -1;

  if (batches > 0) issue(0);
  for (int32_t batch = 0; batch < batches; ++batch) {
    if (batch + 1 < batches) {
      issue(batch + 1);
    } else {
      cp_async_commit();  // an empty group, so that "all but the newest group" is this batch
    }
    cp_async_wait<1>();
    const int stage = batch & 1;
    Tap tap = first_tap(batch);
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
      if (batch * kStage + u < mine) {
        const int slot = (stage * kStage + u) * threads + tid;
        const Row raw = s_rows[slot];
        if constexpr (KIND == kWeightedSum) {
          const float w = p.weight[row_begin + tap.j] * fr.weight;
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] = fmaf(w, to_float(raw.v[k]), acc[k]);
        } else if constexpr (KIND == kMaxBackward) {
          const Won won = s_won[slot];
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] += won.v[k] == my_pos ? to_float(raw.v[k]) : 0.f;
        } else if constexpr (kTrackWinner) {
          const int32_t rank = tap.f * row_len + tap.j;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const float v = to_float(raw.v[k]);
            if (best_rank[k] < 0 || improves(v, acc[k])) {
              acc[k] = v;
              best_rank[k] = rank;
            }
          }
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            acc[k] = max_nan(acc[k], to_float(raw.v[k]));
          }
        }
      }
      tap.advance(groups, row_len);
    }
  }
  cp_async_wait<0>();

  // Combine the partial results of the groups that split this row's taps between them, in the
  // shared memory the stages used once every thread is done with its stages.
  if (groups > 1) {
    const int lanes = blockDim.x;
    __syncthreads();
    float* s_acc = reinterpret_cast<float*>(smem);                           // [groups][lanes][VEC]
    int32_t* s_rank = reinterpret_cast<int32_t*>(s_acc + groups * lanes * VEC);  // kTrackWinner
    const int slot = (group * lanes + lane) * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      s_acc[slot + k] = acc[k];
      if constexpr (kTrackWinner) s_rank[slot + k] = best_rank[k];
    }
    __syncthreads();
    if (group != 0) return;
    for (int g = 1; g < groups; ++g) {
      const int other = (g * lanes + lane) * VEC;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        if constexpr (kTrackWinner) {
          const int32_t r = s_rank[other + k];
          if (r >= 0 && beats(s_acc[other + k], r, acc[k], best_rank[k])) {
            acc[k] = s_acc[other + k];
            best_rank[k] = r;
          }
        } else if constexpr (KIND == kMaxForward) {
          acc[k] = max_nan(acc[k], s_acc[other + k]);
        } else {
          acc[k] += s_acc[other + k];
        }
      }
    }
  }
  if (!active) return;

  if constexpr (kTrackWinner) {
    // The winner's input position f * N + token, from its scan rank (-1: an empty window).
    int32_t* am = p.argmax_out + ((b * p.dst_frames + t) * p.dst_tokens + o) * p.channels + c0;
    Packed<int32_t, VEC> pk;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int32_t r = best_rank[k];
      pk.v[k] = r < 0 ? -1
                      : static_cast<int32_t>((fr.first + r / row_len) * p.tokens_in +
                                             p.col_idx[row_begin + r % row_len]);
    }
    *reinterpret_cast<Packed<int32_t, VEC>*>(am) = pk;
  }
  T* dst = static_cast<T*>(p.dst) + b * p.dst_sb + t * p.dst_st + o * p.dst_sn + c0;
  store_packed<T, VEC>(dst, acc);
}

// The widest vector (up to 16 bytes) that every access can use: channel count, the strides of
// both tensors and their base addresses must all be multiples of it.
int pick_vec(int64_t elem_size, const at::Tensor& src, const at::Tensor& dst,
             const c10::optional<at::Tensor>& argmax) {
  int vec = static_cast<int>(16 / elem_size);
  auto fits = [&](int v) {
    const int64_t bytes = v * elem_size;
    if (src.size(3) % v) return false;
    for (int d = 0; d < 3; ++d) {
      if (src.stride(d) % v || dst.stride(d) % v) return false;
    }
    if (reinterpret_cast<uintptr_t>(src.data_ptr()) % bytes) return false;
    if (reinterpret_cast<uintptr_t>(dst.data_ptr()) % bytes) return false;
    if (argmax && reinterpret_cast<uintptr_t>(argmax->data_ptr()) % (v * 4)) return false;
    return true;
  };
  while (vec > 1 && !fits(vec)) vec /= 2;
  return vec;
}

// Long weighted rows, few of them (the mean over a frame, 27x27 -> 1: 729 taps a row, one row per
// frame): one block per row cannot fill the GPU, so each row's taps are split over `splits` blocks
// whose fp32 partial sums a second kernel adds in split order (deterministic). Loads stay in
// registers, kSplitUnroll in flight per thread, and the rows need no shared-memory staging.
constexpr int kSplitUnroll = 4;

template <typename T, int VEC>
__global__ void __launch_bounds__(512, 2) split_row_sum_kernel(const TokenMixParams p, float* partial,
                                                            int32_t splits) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x;
  const int group = threadIdx.y;
  const int groups = blockDim.y;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * p.chunk_channels +
                     static_cast<int64_t>(lane) * VEC;
  const bool active = c0 < p.channels;
  const int32_t row = static_cast<int32_t>(blockIdx.x);
  const int32_t split = static_cast<int32_t>(blockIdx.z);
  const int64_t o = row % static_cast<int32_t>(p.dst_tokens);
  const int32_t bt = row / static_cast<int32_t>(p.dst_tokens);
  const int64_t t = bt % static_cast<int32_t>(p.dst_frames);
  const int64_t b = bt / static_cast<int32_t>(p.dst_frames);

  const int32_t row_begin = p.row_ptr[o];
  const int32_t row_len = p.row_ptr[o + 1] - row_begin;
  const FrameRange fr = frames_for(p, t);
  const int32_t taps = static_cast<int32_t>(fr.last - fr.first) * row_len;
  const int32_t per_split = (taps + splits - 1) / splits;
  const int32_t q_end = min(taps, (split + 1) * per_split);
  const T* __restrict__ src = static_cast<const T*>(p.src) + b * p.src_sb + fr.first * p.src_st + c0;

  float acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
  if (active) {
    // This thread's taps: split * per_split + group, then every `groups`-th up to q_end.
    for (int32_t q0 = split * per_split + group; q0 < q_end; q0 += groups * kSplitUnroll) {
      Packed<T, VEC> raw[kSplitUnroll];
      float w[kSplitUnroll];
      Tap tap{q0 / row_len, q0 % row_len};
#pragma unroll
      for (int u = 0; u < kSplitUnroll; ++u) {
        if (q0 + u * groups < q_end) {
          const int64_t tok = p.col_idx[row_begin + tap.j];
          raw[u] = load_readonly<Packed<T, VEC>>(src + tap.f * p.src_st + tok * p.src_sn);
          w[u] = p.weight[row_begin + tap.j] * fr.weight;
        }
        tap.advance(groups, row_len);
      }
#pragma unroll
      for (int u = 0; u < kSplitUnroll; ++u) {
        if (q0 + u * groups < q_end) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] = fmaf(w[u], to_float(raw[u].v[k]), acc[k]);
        }
      }
    }
  }
  if (groups > 1) {  // the groups' sums, added in group order
    const int lanes = blockDim.x;
    float* s_acc = reinterpret_cast<float*>(smem);  // [groups][lanes][VEC]
    const int slot = (group * lanes + lane) * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k) s_acc[slot + k] = acc[k];
    __syncthreads();
    if (group != 0) return;
    for (int g = 1; g < groups; ++g) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] += s_acc[(g * lanes + lane) * VEC + k];
    }
  }
  if (!active) return;
  float* out = partial + (static_cast<int64_t>(split) * gridDim.x + row) * p.channels + c0;
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = acc[k];
}

// dst[row] = the sum over splits, in split order, of split_row_sum_kernel's partial sums.
template <typename T, int VEC>
__global__ void split_row_finish_kernel(const TokenMixParams p, const float* partial, int32_t splits,
                                        int64_t rows) {
  const int64_t lanes_total = p.channels / VEC;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * lanes_total) return;
  const int64_t row = i / lanes_total;
  const int64_t c0 = (i - row * lanes_total) * VEC;
  const int64_t o = row % p.dst_tokens;
  const int64_t bt = row / p.dst_tokens;
  const int64_t t = bt % p.dst_frames;
  const int64_t b = bt / p.dst_frames;
  float acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
  for (int32_t s = 0; s < splits; ++s) {
    const float* in = partial + (s * rows + row) * p.channels + c0;
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] += in[k];
  }
  T* dst = static_cast<T*>(p.dst) + b * p.dst_sb + t * p.dst_st + o * p.dst_sn + c0;
  store_packed<T, VEC>(dst, acc);
}

// The split path of a weighted gather (see split_row_sum_kernel): `splits` blocks per row and
// channel chunk, then their sum.
template <typename T, int VEC>
void launch_split_rows(TokenMixParams p, int64_t rows, int64_t lanes, int64_t splits,
                       int64_t max_taps, cudaStream_t stream) {
  const int64_t lanes_total = ceil_div(p.channels, VEC);
  const int64_t chunks = ceil_div(lanes_total, lanes);
  const int64_t groups =
      std::max<int64_t>(1, std::min<int64_t>(512 / lanes, ceil_div(max_taps, splits)));
  TORCH_CHECK(chunks <= 65535 && splits <= 65535, "token_pool: too many blocks per row: ", chunks,
              " channel chunks x ", splits, " splits");
  p.chunk_channels = static_cast<int>(lanes * VEC);
  at::Tensor partial = at::empty({splits, rows, p.channels},
                                 at::device(at::kCUDA).dtype(at::kFloat));  // current device
  const dim3 block(static_cast<unsigned>(lanes), static_cast<unsigned>(groups));
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(chunks),
                  static_cast<unsigned>(splits));
  const size_t smem = groups > 1 ? groups * lanes * VEC * sizeof(float) : 0;
  split_row_sum_kernel<T, VEC><<<grid, block, smem, stream>>>(p, partial.data_ptr<float>(),
                                                              static_cast<int32_t>(splits));
  CROSSLMM_CHECK_LAUNCH();
  const int64_t items = rows * lanes_total;
  split_row_finish_kernel<T, VEC><<<static_cast<unsigned>(ceil_div(items, 256)), 256, 0, stream>>>(
      p, partial.data_ptr<float>(), static_cast<int32_t>(splits), rows);
  CROSSLMM_CHECK_LAUNCH();
}

// Launches kKernel with `smem` bytes of dynamic shared memory. Above 48 KB a kernel must opt in,
// per device: each instantiation opts in once per device for the most it can ask (`most_smem`).
template <auto kKernel>
void launch_opted_in(dim3 grid, dim3 block, size_t smem, int most_smem, cudaStream_t stream,
                     const TokenMixParams& p) {
  static std::atomic<uint64_t> opted_in_devices{0};
  const int device = c10::cuda::current_device();
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (!bit || !(opted_in_devices.load(std::memory_order_relaxed) & bit)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, most_smem));
    opted_in_devices.fetch_or(bit);
  }
  kKernel<<<grid, block, smem, stream>>>(p);
}

// The rows' extent for the launch plan: destination rows, the longest row (frames included) and
// the CSR's entry count.
struct MixRows {
  int64_t rows, max_taps, taps_total;
};

template <typename T, int VEC, int KIND>
void launch(TokenMixParams p, const MixRows& r, cudaStream_t stream) {
  const bool track_winner = KIND == kMaxForward && p.argmax_out != nullptr;
  const int64_t lanes_total = ceil_div(p.channels, VEC);
  const int64_t staged_bytes = sizeof(T) * VEC + (KIND == kMaxBackward ? sizeof(int32_t) * VEC : 0);
  const MixPlan plan = plan_mix(KIND, track_winner, r.rows, lanes_total, VEC, staged_bytes, r.max_taps,
                                r.taps_total, p.src_tokens, multiprocessor_count());
  if (plan.splits > 1) {
    return launch_split_rows<T, VEC>(p, r.rows, plan.lanes, plan.splits, r.max_taps, stream);
  }
  TORCH_CHECK(r.rows <= std::numeric_limits<int32_t>::max(), "token_pool: too many output rows: ",
              r.rows);
  TORCH_CHECK(plan.chunks <= 65535, "token_pool: too many channel chunks: ", plan.chunks);
  p.chunk_channels = static_cast<int>(plan.lanes * VEC);
  p.stage_slots = static_cast<int>(plan.stage_slots);
  const dim3 block(static_cast<unsigned>(plan.lanes), static_cast<unsigned>(plan.groups));
  const dim3 grid(static_cast<unsigned>(r.rows), static_cast<unsigned>(plan.chunks));
  const size_t smem = static_cast<size_t>(plan.smem);
  const int most_smem = static_cast<int>(plan.most_smem);
  if constexpr (KIND == kMaxForward) {
    if (track_winner) {
      launch_opted_in<token_mix_kernel<T, VEC, KIND, true>>(grid, block, smem, most_smem, stream, p);
    } else {
      launch_opted_in<token_mix_kernel<T, VEC, KIND, false>>(grid, block, smem, most_smem, stream, p);
    }
  } else {
    launch_opted_in<token_mix_kernel<T, VEC, KIND, false>>(grid, block, smem, most_smem, stream, p);
  }
  CROSSLMM_CHECK_LAUNCH();
}

template <typename T, int KIND>
void launch_vec(int vec, const TokenMixParams& p, const MixRows& r, cudaStream_t s) {
  switch (vec) {
    case 8:
      if constexpr (sizeof(T) <= 2) return launch<T, 8, KIND>(p, r, s);
      break;
    case 4: return launch<T, 4, KIND>(p, r, s);
    case 2: return launch<T, 2, KIND>(p, r, s);
    case 1: return launch<T, 1, KIND>(p, r, s);
  }
  TORCH_CHECK(false, "token_pool: unsupported vector width ", vec);
}

}  // namespace

// dst[b, t, o, :] = combine over frames f of t and CSR row o of src[b, f, col_idx[j], :].
// See the file comment for `kind`. `argmax` is written (kind 1) or read (kind 2), unused otherwise.
// max_row_len must be the CSR's longest row (pool_plan's, as row_ptr is): it sizes the kernel's
// shared memory.
void token_pool_mix(const at::Tensor& src, at::Tensor& dst, const at::Tensor& row_ptr,
                    const at::Tensor& col_idx, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& argmax, int64_t kind,
                    int64_t temporal_stride, int64_t frames_in, int64_t tokens_in,
                    bool time_transposed, int64_t max_row_len) {
  CROSSLMM_CHECK_CUDA(src);
  CROSSLMM_CHECK_SAME_DEVICE(src, dst);
  CROSSLMM_CHECK_SAME_DEVICE(src, row_ptr);
  CROSSLMM_CHECK_SAME_DEVICE(src, col_idx);
  CROSSLMM_CHECK_DIM(src, 4);
  CROSSLMM_CHECK_DIM(dst, 4);
  TORCH_CHECK(src.scalar_type() == dst.scalar_type(), "src and dst must have the same dtype, got ",
              src.scalar_type(), " and ", dst.scalar_type());
  TORCH_CHECK(src.stride(3) == 1 && dst.stride(3) == 1,
              "src and dst must have channel stride 1, got ", src.strides(), " and ", dst.strides());
  TORCH_CHECK(src.size(0) == dst.size(0) && src.size(3) == dst.size(3),
              "src and dst must agree in batch and channels, got ", src.sizes(), " and ", dst.sizes());
  CROSSLMM_CHECK_DTYPE(row_ptr, at::kInt);
  CROSSLMM_CHECK_DTYPE(col_idx, at::kInt);
  CROSSLMM_CHECK_CONTIGUOUS(row_ptr);
  CROSSLMM_CHECK_CONTIGUOUS(col_idx);
  TORCH_CHECK(row_ptr.numel() == dst.size(2) + 1, "row_ptr must have ", dst.size(2) + 1,
              " entries, got ", row_ptr.numel());
  TORCH_CHECK(kind >= 0 && kind <= 2, "kind must be 0, 1 or 2, got ", kind);
  TORCH_CHECK(temporal_stride >= 1, "temporal_stride must be >= 1, got ", temporal_stride);
  if (kind == kWeightedSum) {
    CROSSLMM_CHECK_SAME_DEVICE(src, weight);
    CROSSLMM_CHECK_DTYPE(weight, at::kFloat);
    CROSSLMM_CHECK_CONTIGUOUS(weight);
    TORCH_CHECK(weight.numel() == col_idx.numel(), "weight and col_idx must have equal length");
  } else if (argmax.has_value()) {  // required by the max backward, optional in the forward
    CROSSLMM_CHECK_SAME_DEVICE(src, (*argmax));
    CROSSLMM_CHECK_DTYPE((*argmax), at::kInt);
    CROSSLMM_CHECK_CONTIGUOUS((*argmax));
    const auto& shaped = kind == kMaxForward ? dst : src;
    TORCH_CHECK(argmax->sizes() == shaped.sizes(), "argmax must have shape ", shaped.sizes(),
                ", got ", argmax->sizes());
  }
  TORCH_CHECK(kind != kMaxBackward || argmax.has_value(), "the max backward needs argmax");
  if (time_transposed) {
    TORCH_CHECK(ceil_div(dst.size(1), temporal_stride) == src.size(1),
                "frame counts do not match the temporal stride");
  } else {
    TORCH_CHECK(ceil_div(src.size(1), temporal_stride) == dst.size(1),
                "frame counts do not match the temporal stride");
  }
  if (dst.numel() == 0) return;

  const c10::cuda::CUDAGuard guard(src.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  TokenMixParams p{};
  p.src = src.data_ptr();
  p.dst = dst.data_ptr();
  p.argmax_in = kind == kMaxBackward ? argmax->data_ptr<int32_t>() : nullptr;
  p.argmax_out = kind == kMaxForward && argmax ? argmax->data_ptr<int32_t>() : nullptr;
  p.row_ptr = row_ptr.data_ptr<int32_t>();
  p.col_idx = col_idx.data_ptr<int32_t>();
  p.weight = kind == kWeightedSum ? weight.data_ptr<float>() : nullptr;
  p.batch = src.size(0);
  p.src_frames = src.size(1);
  p.src_tokens = src.size(2);
  p.dst_frames = dst.size(1);
  p.dst_tokens = dst.size(2);
  p.channels = src.size(3);
  p.src_sb = src.stride(0);
  p.src_st = src.stride(1);
  p.src_sn = src.stride(2);
  p.dst_sb = dst.stride(0);
  p.dst_st = dst.stride(1);
  p.dst_sn = dst.stride(2);
  p.temporal_stride = temporal_stride;
  p.frames_in = frames_in;
  p.tokens_in = tokens_in;
  p.time_transposed = time_transposed;

  const int64_t frames_per_row = time_transposed ? 1 : temporal_stride;
  const MixRows extent{dst.size(0) * dst.size(1) * dst.size(2),
                     std::max<int64_t>(1, max_row_len * frames_per_row), col_idx.numel()};
  const int vec = pick_vec(src.element_size(), src, dst, argmax);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "token_pool_mix", [&] {
    switch (kind) {
      case kWeightedSum: launch_vec<scalar_t, kWeightedSum>(vec, p, extent, stream); break;
      case kMaxForward: launch_vec<scalar_t, kMaxForward>(vec, p, extent, stream); break;
      case kMaxBackward: launch_vec<scalar_t, kMaxBackward>(vec, p, extent, stream); break;
    }
  });
}

}  // namespace crosslmm
