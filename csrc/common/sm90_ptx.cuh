// PTX wrappers for the Hopper (sm_90a) kernels: mbarriers, TMA tensor loads, clusters and
// distributed shared memory, wgmma (m64n128k16, m64n64k16, m64n32k16) and its shared-memory matrix
// descriptors, named barriers, setmaxnreg. Device code only; each wrapper is one instruction or a
// short fixed sequence, written from the PTX ISA (sections "mbarrier", "cp.async.bulk.tensor",
// "mapa", "barrier.cluster", "Asynchronous Warpgroup Level Matrix Multiply-Accumulate",
// "setmaxnreg"). Only the sm_90a pass of a kernel calls them, so nothing
// here is emitted for other targets.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace crosslmm {
namespace sm90 {

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// ---------------------------------------------------------------------------------------------
// mbarrier: a 64-bit shared-memory barrier with a phase bit. A phase completes when `count`
// arrivals have happened and every byte announced by expect_tx has landed (TMA completes bytes).
// Waiting is on the parity of a phase: try_wait.parity(p) succeeds once the phase with parity p
// has completed (for a freshly initialised barrier, parity 1 counts as completed, which is how a
// producer's first wait on an "empty" barrier passes at once).
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Makes the barrier initialisations visible to the async proxy (TMA) before first use.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile(
      "{\n.reg .b64 state;\n"
      "mbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n" ::"r"(bar),
      "r"(bytes)
      : "memory");
}

__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
  asm volatile(
      "{\n.reg .b64 state;\n"
      "mbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar)
      : "memory");
}

__device__ __forceinline__ bool mbarrier_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}

// Debugging aid: CROSSLMM_SM90_WAIT_TIMEOUT_S=N (> 0) makes a wait that lasts N seconds print its
// block, thread, barrier (shared address) and parity and trap (an error the host sees) instead of
// hanging the GPU; a legitimate wait here lasts microseconds, so only a protocol bug trips it. Off
// by default: a trap on the consumers' path makes ptxas drop their setmaxnreg register budget (the
// consumers then spill and their wgmmas are serialised).
#ifndef CROSSLMM_SM90_WAIT_TIMEOUT_S
#define CROSSLMM_SM90_WAIT_TIMEOUT_S 0
#endif

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  return t;
}

__device__ __forceinline__ void mbarrier_wait_slow(uint32_t bar, uint32_t parity) {
  auto ready = [&] { return mbarrier_try_wait(bar, parity); };
#if CROSSLMM_SM90_WAIT_TIMEOUT_S > 0
  const uint64_t start = global_timer_ns();
  while (!ready()) {
    if (global_timer_ns() - start > uint64_t{CROSSLMM_SM90_WAIT_TIMEOUT_S} * 1000000000ull) {
      printf("crosslmm sm90: mbarrier wait timed out after %d s: block %d thread %d barrier 0x%x "
             "parity %u\n",
             CROSSLMM_SM90_WAIT_TIMEOUT_S, static_cast<int>(blockIdx.x),
             static_cast<int>(threadIdx.x), bar, parity);
      __trap();
    }
  }
#else
  while (!ready()) {
  }
#endif
}

// Blocks until the phase with the given parity has completed. (try_wait itself suspends the
// thread for a while in hardware; the slow path only loops and watches the clock.)
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  if (!mbarrier_try_wait(bar, parity)) mbarrier_wait_slow(bar, parity);
}

// ---------------------------------------------------------------------------------------------
// Thread-block clusters and distributed shared memory (PTX ISA "mapa", "barrier.cluster",
// "st.async"). A shared::cluster address names a byte of any CTA of the cluster; mapa
// turns this CTA's shared::cta address into the same offset in CTA `rank`.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
  return rank;
}

__device__ __forceinline__ uint32_t map_to_cta(uint32_t smem_addr, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(smem_addr), "r"(rank));
  return remote;
}

// Stores 16 bytes into the shared memory of a CTA of the cluster (cluster_addr from map_to_cta)
// and, once they have landed, completes 16 bytes of transactions on that CTA's mbarrier
// (remote_bar, mapped the same way). The receiver announces the bytes (expect_tx) and waits on
// its barrier like on a TMA load: no fence and no remote arrival, which ptxas would compile into
// a GPU-scope memory barrier per arrival.
__device__ __forceinline__ void st_async_v4(uint32_t cluster_addr, const float (&v)[4],
                                            uint32_t remote_bar) {
  asm volatile(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, "
      "[%5];\n" ::"r"(cluster_addr),
      "r"(__float_as_uint(v[0])), "r"(__float_as_uint(v[1])), "r"(__float_as_uint(v[2])),
      "r"(__float_as_uint(v[3])), "r"(remote_bar)
      : "memory");
}

// Every thread of every CTA of the cluster: arrive (releasing its memory operations) and wait for
// all (acquiring theirs).
__device__ __forceinline__ void cluster_sync() {
  asm volatile(
      "barrier.cluster.arrive.release.aligned;\n"
      "barrier.cluster.wait.acquire.aligned;\n" ::
          : "memory");
}

// ---------------------------------------------------------------------------------------------
// TMA: one box of a 3-D tensor map, global -> shared, completing `bytes` on an mbarrier.
// Coordinates are innermost first (channel, head, token); boxes that stick out of the tensor are
// zero-filled (and still count their full size).
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void tma_prefetch_descriptor(const void* tensor_map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(tensor_map))
               : "memory");
}

__device__ __forceinline__ void tma_load_3d(uint32_t dst, const void* tensor_map, uint32_t bar,
                                            int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}

// One box of a 2-D tensor map (coordinates innermost first: channel, row).
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* tensor_map, uint32_t bar,
                                            int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

// Orders this thread's ordinary shared-memory writes before later reads by the async proxy
// (wgmma operands, TMA); a barrier among the writers must follow.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Zeroes rows [first_row, end_row) of a shared-memory tile of 128 channels kept as two 64-channel
// halves `half_bytes` apart, 128-byte rows (any 128-byte swizzle: a row's chunks stay in the row),
// with 16-byte stores spread over `threads` threads, this one `tid`; then fences them for the async
// proxy (wgmma, TMA). The caller's barrier over those threads must follow.
__device__ __forceinline__ void zero_tile_rows(uint32_t tile, uint32_t half_bytes, int first_row,
                                               int end_row, int tid, int threads) {
  const int chunks = (end_row - first_row) * 16;  // 16-byte chunks: 8 per row per half
  for (int idx = tid; idx < chunks; idx += threads) {
    const int row = first_row + idx / 16;
    const int chunk = idx % 16;
    const uint32_t addr = tile + (chunk / 8) * half_bytes + row * 128 + (chunk % 8) * 16;
    asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0u) : "memory");
  }
  fence_proxy_async_shared();
}

// ---------------------------------------------------------------------------------------------
// Named barriers (ids 1..15; 0 is __syncthreads). `threads` counts every thread that takes part,
// syncing or arriving; a multiple of 32, whole warps only.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void named_barrier_sync(uint32_t id, uint32_t threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ void named_barrier_arrive(uint32_t id, uint32_t threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---------------------------------------------------------------------------------------------
// Register reallocation between warpgroups (every thread of the warpgroup executes it).
// ---------------------------------------------------------------------------------------------

template <uint32_t kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

template <uint32_t kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// ---------------------------------------------------------------------------------------------
// wgmma shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format"):
//   bits  0-13  start address >> 4
//   bits 16-29  leading dimension byte offset >> 4
//   bits 32-45  stride dimension byte offset >> 4
//   bits 49-51  base offset (0: every swizzle atom here is 1024-byte aligned)
//   bits 62-63  swizzle mode: 1 = 128-byte swizzle
// With the 128-byte swizzle a tile is a sequence of 1024-byte atoms of 8 rows x 128 bytes, the 16-
// byte chunk c of row r stored at chunk c ^ (r % 8), exactly what TMA's CU_TENSOR_MAP_SWIZZLE_128B
// writes. For a K-major operand (rows = M or N, 64 contiguous K elements per row) the stride byte
// offset is the distance between 8-row groups (1024) and the leading byte offset is unused (one
// instruction's K = 16 elements stays inside a 128-byte row); stepping K by 16 elements moves the
// start address by 32 bytes inside the atom (the hardware applies the XOR to the final address).
// For an MN-major operand (rows = K, 64 contiguous MN elements per row) the leading byte offset is
// the distance between 64-element column blocks and the stride byte offset the distance between
// 8-row (8 K) groups.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ uint64_t make_smem_desc_sw128(uint32_t smem_addr, uint32_t leading_bytes,
                                                         uint32_t stride_bytes) {
  uint64_t desc = 0;
  desc |= static_cast<uint64_t>((smem_addr >> 4) & 0x3FFF);
  desc |= static_cast<uint64_t>((leading_bytes >> 4) & 0x3FFF) << 16;
  desc |= static_cast<uint64_t>((stride_bytes >> 4) & 0x3FFF) << 32;
  desc |= static_cast<uint64_t>(1) << 62;  // 128-byte swizzle
  return desc;
}

// ---------------------------------------------------------------------------------------------
// wgmma m64n128k16, fp32 accumulators: D[64 x 128] (+)= A[64 x 16] * B[16 x 128], issued by a whole
// warpgroup. Accumulator layout (per thread, 64 floats): d[4j + q] holds row
// 16 * warp + lane / 4 + 8 * (q / 2), column 8 j + 2 (lane % 4) + (q % 2), j = 0..15 (PTX ISA
// "Matrix Fragments for wgmma .m64nNk16": the mma.m16n8 C layout repeated over n-blocks, one
// 16-row slab per warp). A from registers has the mma.m16n8k16 A layout per warp: a[0] = (row g,
// k 2t..2t+1), a[1] = (row g+8, same k), a[2] = (row g, k 2t+8..), a[3] = (row g+8, k 2t+8..).
//
// The asm statements only issue the instruction: the accumulators (and a register A operand)
// belong to the tensor cores until wgmma_wait() covers them, and fence_operand() must be applied
// after that wait so the compiler neither reads them early nor reuses their registers meanwhile.
// scale_d = 0 ignores the accumulator's old contents (D = A B).
// ---------------------------------------------------------------------------------------------

#define CROSSLMM_WGMMA_D64                                                                \
  "{"                                                                                     \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "      \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "      \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"        \
  "}"

#define CROSSLMM_WGMMA_D64_OPERANDS(d)                                                      \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),     \
      "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),          \
      "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),       \
      "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),       \
      "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),       \
      "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),       \
      "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),       \
      "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),       \
      "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]),       \
      "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]),       \
      "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// A and B from shared memory, both K-major (S = Q K^T: Q rows and K rows each hold 64 contiguous
// channels per 128-byte swizzle row).
template <typename T>
__device__ __forceinline__ void wgmma_m64n128k16_ss(float (&d)[64], uint64_t desc_a,
                                                    uint64_t desc_b, int scale_d) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " CROSSLMM_WGMMA_D64
        ", %64, %65, p, 1, 1, 0, 0;\n}\n"
        : CROSSLMM_WGMMA_D64_OPERANDS(d)
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  } else {
    static_assert(std::is_same_v<T, __half>, "T must be __half or __nv_bfloat16");
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " CROSSLMM_WGMMA_D64
        ", %64, %65, p, 1, 1, 0, 0;\n}\n"
        : CROSSLMM_WGMMA_D64_OPERANDS(d)
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
}

// A from registers, B from shared memory MN-major (imm-trans-b = 1): O += P V with V stored
// [key][channel], channels contiguous.
template <typename T>
__device__ __forceinline__ void wgmma_m64n128k16_rs_tb(float (&d)[64], const uint32_t (&a)[4],
                                                       uint64_t desc_b) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " CROSSLMM_WGMMA_D64
        ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : CROSSLMM_WGMMA_D64_OPERANDS(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
  } else {
    static_assert(std::is_same_v<T, __half>, "T must be __half or __nv_bfloat16");
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " CROSSLMM_WGMMA_D64
        ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : CROSSLMM_WGMMA_D64_OPERANDS(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
  }
}

#undef CROSSLMM_WGMMA_D64
#undef CROSSLMM_WGMMA_D64_OPERANDS

// Orders this warpgroup's earlier register writes (accumulators, A operands) before the wgmmas
// issued after it. Required before the first wgmma of every batch.
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

// Closes the wgmmas issued since the previous commit into one group.
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

// Waits until at most kPending committed groups of this warpgroup are still running.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// Ends the current basic block unless `token` is 0 (the caller passes a value that is never 0 but
// that the compiler cannot prove so; the other path only sleeps for 0 ns). ptxas schedules within a
// basic block, and there a wgmma_wait goes as early as its (empty) data dependencies allow, which
// can be before independent work meant to overlap the wgmmas it waits for; a wait placed after this
// stays after everything the token depends on.
__device__ __forceinline__ void schedule_barrier(uint32_t token) {
  if (token == 0u) asm volatile("nanosleep.u32 0;\n" ::: "memory");
}

// Pins registers at this point of the program for the compiler (no instruction): used after a
// wgmma_wait so reads of the accumulators stay after the wait and registers the tensor cores still
// read are not reused before it.
__device__ __forceinline__ void fence_operand(float& x) { asm volatile("" : "+f"(x)::"memory"); }
__device__ __forceinline__ void fence_operand(uint32_t& x) {
  asm volatile("" : "+r"(x)::"memory");
}

template <int N>
__device__ __forceinline__ void fence_operands(float (&x)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) fence_operand(x[i]);
}

template <int N>
__device__ __forceinline__ void fence_operands(uint32_t (&x)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) fence_operand(x[i]);
}

// The 32 accumulator operands of the m64n64 wgmmas below.
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

// wgmma m64n64k16, fp32 accumulators, A and B from shared memory, both K-major:
// D[64 x 64] (+)= A[64 x 16] * B[16 x 64]. Accumulator layout (32 floats per thread): d[4j + q]
// holds row 16 * warp + lane / 4 + 8 * (q / 2), column 8 j + 2 (lane % 4) + (q % 2), j = 0..7 (the
// m64n128 layout above cut to 8 column blocks). scale_d = 0: D = A B.
template <typename T>
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[32], uint64_t desc_a,
                                                   uint64_t desc_b, int scale_d) {
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
}

// wgmma m64n64k16, fp32 accumulators, A from registers (the mma.m16n8k16 A layout per warp, as for
// wgmma_m64n128k16_rs_tb), B from shared memory MN-major (imm-trans-b = 1): O[64 x 64] += P V with V
// stored [key][channel], one 64-channel (128-byte) swizzle row per key.
template <typename T>
__device__ __forceinline__ void wgmma_m64n64k16_rs_tb(float (&d)[32], const uint32_t (&a)[4],
                                                      uint64_t desc_b) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " CROSSLMM_WGMMA_D32
        ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : CROSSLMM_WGMMA_D32_OPERANDS(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
  } else {
    static_assert(std::is_same_v<T, __half>, "T must be __half or __nv_bfloat16");
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " CROSSLMM_WGMMA_D32
        ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : CROSSLMM_WGMMA_D32_OPERANDS(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
  }
}

#undef CROSSLMM_WGMMA_D32
#undef CROSSLMM_WGMMA_D32_OPERANDS

// wgmma m64n32k16, fp32 accumulators, A and B from shared memory, both K-major:
// D[64 x 32] (+)= A[64 x 16] * B[16 x 32]. Accumulator layout (16 floats per thread): d[4j + q]
// holds row 16 * warp + lane / 4 + 8 * (q / 2), column 8 j + 2 (lane % 4) + (q % 2), j = 0..3.
template <typename T>
__device__ __forceinline__ void wgmma_m64n32k16_ss(float (&d)[16], uint64_t desc_a,
                                                   uint64_t desc_b, int scale_d) {
#define CROSSLMM_WGMMA_D16 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define CROSSLMM_WGMMA_D16_OPERANDS(d)                                                       \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),      \
      "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),           \
      "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 " CROSSLMM_WGMMA_D16
        ", %16, %17, p, 1, 1, 0, 0;\n}\n"
        : CROSSLMM_WGMMA_D16_OPERANDS(d)
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  } else {
    static_assert(std::is_same_v<T, __half>, "T must be __half or __nv_bfloat16");
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 " CROSSLMM_WGMMA_D16
        ", %16, %17, p, 1, 1, 0, 0;\n}\n"
        : CROSSLMM_WGMMA_D16_OPERANDS(d)
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
#undef CROSSLMM_WGMMA_D16
#undef CROSSLMM_WGMMA_D16_OPERANDS
}


}  // namespace sm90
}  // namespace crosslmm
