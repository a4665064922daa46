// Launch-shape sweep for token pooling's gather, standalone (no torch, not part of the package):
// the same gather as csrc/pooling/token_pool.cu in its simplest form (contiguous [T, 729, 1152]
// bf16, int32 indexing, one frame per row, loads held in registers) at several loads-in-flight
// counts (U), register budgets (__launch_bounds__) and rows per block (R), for 3x3 average and max
// pooling and the mean over a frame, plus the mean as a two-pass split reduction; each as a share
// of the device copy bandwidth measured in the same run. It answers "what launch shape should the
// library's kernel take" without a rebuild of the extension:
//
//     nvcc -O3 -gencode arch=compute_90a,code=sm_90a -std=c++17 tools/pool_sweep.cu -o /tmp/pool_sweep
//     /tmp/pool_sweep
#include <cuda_bf16.h>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <cmath>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1);} } while (0)

constexpr int C = 1152, N = 729, VEC = 8;
struct P {
  const __nv_bfloat16* src; __nv_bfloat16* dst; const int* row_ptr; const int* col; const float* w;
  int dst_tokens, rows; float* partial; int splits;
};
struct alignas(16) Pk { __nv_bfloat16 v[8]; };
__device__ __forceinline__ float f(__nv_bfloat16 v) { return __uint_as_float(((uint32_t)*(unsigned short*)&v) << 16); }
__device__ __forceinline__ bool improves(float v, float b) { return v > b || (isnan(v) && !isnan(b)); }

// KIND 0 weighted sum, 1 max. block (lanes, groups, rows_per_block); grid (ceil(rows/R), chunks)
template <int KIND, int UNROLL, int MAXT, int MINB>
__global__ void __launch_bounds__(MAXT, MINB) gather(P p) {
  extern __shared__ float sm[];
  const int lane = threadIdx.x, g = threadIdx.y, groups = blockDim.y, r = threadIdx.z;
  const int lanes = blockDim.x;
  const int row = blockIdx.x * blockDim.z + r;
  const int c0 = blockIdx.y * lanes * VEC + lane * VEC;
  const bool active = c0 < C && row < p.rows;
  float acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = KIND == 1 ? -INFINITY : 0.f;
  int o = row % p.dst_tokens, t = row / p.dst_tokens;
  if (active) {
    const int rb = p.row_ptr[o], len = p.row_ptr[o + 1] - rb;
    const __nv_bfloat16* fr = p.src + (size_t)t * N * C + c0;
    for (int j0 = g; j0 < len; j0 += groups * UNROLL) {
      int tok[UNROLL]; Pk raw[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) { int j = j0 + u * groups; tok[u] = j < len ? p.col[rb + j] : -1; }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) if (tok[u] >= 0) *(uint4*)&raw[u] = __ldg((const uint4*)(fr + (size_t)tok[u] * C));
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        if (tok[u] < 0) continue;
        if (KIND == 0) { float w = p.w[rb + j0 + u * groups];
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] = fmaf(w, f(raw[u].v[k]), acc[k]); }
        else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) { float v = f(raw[u].v[k]); acc[k] = improves(v, acc[k]) ? v : acc[k]; } }
      }
    }
  }
  if (groups > 1) {
    float* s = sm + r * groups * lanes * VEC;
    for (int k = 0; k < VEC; ++k) s[(g * lanes + lane) * VEC + k] = acc[k];
    __syncthreads();
    if (g) return;
    for (int gg = 1; gg < groups; ++gg)
      for (int k = 0; k < VEC; ++k) { float v = s[(gg * lanes + lane) * VEC + k]; acc[k] = KIND == 1 ? (improves(v, acc[k]) ? v : acc[k]) : acc[k] + v; }
  }
  if (!active) return;
  Pk out; for (int k = 0; k < VEC; ++k) out.v[k] = __float2bfloat16(acc[k]);
  *(Pk*)(p.dst + (size_t)row * C + c0) = out;
}

// mean-to-1 in two passes: grid (frames, splits), block (144, groups); partial fp32 [T, splits, C].
template <int UNROLL>
__global__ void __launch_bounds__(1024) mean_split(P p) {
  extern __shared__ float sm[];
  const int lane = threadIdx.x, g = threadIdx.y, groups = blockDim.y, lanes = blockDim.x;
  const int t = blockIdx.x, s = blockIdx.y;
  const int c0 = lane * VEC;
  const int per = (N + p.splits - 1) / p.splits, b = s * per, e = min(N, b + per);
  float acc[VEC] = {};
  const __nv_bfloat16* fr = p.src + (size_t)t * N * C + c0;
  for (int j0 = b + g; j0 < e; j0 += groups * UNROLL) {
    Pk raw[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) { int j = j0 + u * groups; if (j < e) *(uint4*)&raw[u] = __ldg((const uint4*)(fr + (size_t)j * C)); }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) { int j = j0 + u * groups; if (j < e) for (int k = 0; k < VEC; ++k) acc[k] += f(raw[u].v[k]); }
  }
  for (int k = 0; k < VEC; ++k) sm[(g * lanes + lane) * VEC + k] = acc[k];
  __syncthreads();
  if (g) return;
  for (int gg = 1; gg < groups; ++gg) for (int k = 0; k < VEC; ++k) acc[k] += sm[(gg * lanes + lane) * VEC + k];
  for (int k = 0; k < VEC; ++k) p.partial[((size_t)t * p.splits + s) * C + c0 + k] = acc[k];
}
__global__ void mean_finish(P p) {
  int i = blockIdx.x * blockDim.x + threadIdx.x; if (i >= p.rows * C) return;
  int t = i / C, c = i % C; float a = 0; for (int s = 0; s < p.splits; ++s) a += p.partial[((size_t)t * p.splits + s) * C + c];
  p.dst[i] = __float2bfloat16(a / N);
}
__global__ void read_all(const uint4* x, size_t n, uint4* sink) {
  uint32_t a = 0;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) { uint4 v = __ldg(x + i); a ^= v.x ^ v.y ^ v.z ^ v.w; }
  if (a == 0x12345678) sink[0] = make_uint4(a, a, a, a);
}

template <class F> float timeit(F fn) {
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  for (int i = 0; i < 5; ++i) fn();
  std::vector<float> v;
  for (int i = 0; i < 30; ++i) { cudaEventRecord(a); fn(); cudaEventRecord(b); cudaEventSynchronize(b); float ms; cudaEventElapsedTime(&ms, a, b); v.push_back(ms); }
  CK(cudaGetLastError());
  std::sort(v.begin(), v.end()); return v[v.size() / 2];
}

int main() {
  const int T = 256;
  size_t nx = (size_t)T * N * C;
  std::vector<__nv_bfloat16> hx(nx);
  uint32_t s = 1; for (size_t i = 0; i < nx; ++i) { s = s * 1664525u + 1013904223u; hx[i] = __float2bfloat16(((s >> 8) & 0xffff) / 65536.f - 0.5f); }
  __nv_bfloat16 *x, *y; CK(cudaMalloc(&x, nx * 2)); CK(cudaMalloc(&y, (size_t)T * N * C * 2));
  CK(cudaMemcpy(x, hx.data(), nx * 2, cudaMemcpyHostToDevice));
  float* partial; CK(cudaMalloc(&partial, (size_t)T * 64 * C * 4));
  uint4* sink; CK(cudaMalloc(&sink, 64));
  float copy = timeit([&] { cudaMemcpyAsync(y, x, nx * 2, cudaMemcpyDeviceToDevice); });
  float copy_tbs = 2.0 * nx * 2 / copy / 1e9;
  float rd = timeit([&] { read_all<<<132 * 16, 256>>>((const uint4*)x, nx / 8, sink); });
  printf("copy %.3f ms = %.2f TB/s; read-only %.3f ms = %.2f TB/s\n", copy, copy_tbs, rd, nx * 2 / rd / 1e9);
  // 3x3 stride 3 CSR and mean1 CSR
  std::vector<int> rp3{0}, c3; std::vector<float> w3;
  for (int oy = 0; oy < 9; ++oy) for (int ox = 0; ox < 9; ++ox) { for (int dy = 0; dy < 3; ++dy) for (int dx = 0; dx < 3; ++dx) { c3.push_back((oy * 3 + dy) * 27 + ox * 3 + dx); w3.push_back(1.f / 9); } rp3.push_back(c3.size()); }
  std::vector<int> rp1{0, N}, c1(N); std::vector<float> w1(N, 1.f / N); for (int i = 0; i < N; ++i) c1[i] = i;
  auto up = [](auto& v) { void* d; cudaMalloc(&d, v.size() * sizeof(v[0])); cudaMemcpy(d, v.data(), v.size() * sizeof(v[0]), cudaMemcpyHostToDevice); return d; };
  P p3{x, y, (int*)up(rp3), (int*)up(c3), (float*)up(w3), 81, T * 81, partial, 1};
  P p1{x, y, (int*)up(rp1), (int*)up(c1), (float*)up(w1), 1, T, partial, 1};
  auto rep = [&](const char* name, float ms, int dst_tokens) {
    double bytes = nx * 2.0 + (double)T * dst_tokens * C * 2; printf("%-44s %.4f ms  %.2f TB/s  %4.0f%% of copy\n", name, ms, bytes / ms / 1e9, bytes / ms / 1e9 / copy_tbs * 100);
  };
  // 3x3: lanes 144, groups 1, rows-per-block R, unroll U, min blocks MB
#define G3(KIND, U, MT, MB, R) { P p = p3; dim3 blk(144, 1, R), grd((p.rows + R - 1) / R, 1); \
    float ms = timeit([&] { gather<KIND, U, MT, MB><<<grd, blk, 0>>>(p); }); char nm[80]; snprintf(nm, 80, "%s3x3 U=%d bounds=(%d,%d) R=%d", KIND ? "max" : "avg", U, MT, MB, R); rep(nm, ms, 81); }
  for (int kind = 0; kind < 2; ++kind) {
    if (kind == 0) { G3(0, 8, 256, 2, 1) G3(0, 16, 256, 2, 1) G3(0, 9, 256, 2, 1) G3(0, 9, 256, 4, 1) G3(0, 9, 512, 2, 2) G3(0, 16, 512, 1, 2) G3(0, 9, 576, 2, 4) G3(0, 9, 576, 1, 4) }
    else { G3(1, 8, 256, 2, 1) G3(1, 16, 256, 2, 1) G3(1, 9, 256, 2, 1) G3(1, 9, 256, 4, 1) G3(1, 9, 512, 2, 2) G3(1, 16, 512, 1, 2) G3(1, 9, 576, 2, 4) G3(1, 9, 576, 1, 4) }
  }
  // mean1, current shape: lanes 36, chunks 4, groups 7, unroll 8
#define G1(U, MT, MB, LANES, GROUPS) { P p = p1; int chunks = 144 / LANES; dim3 blk(LANES, GROUPS, 1), grd(T, chunks); size_t sh = GROUPS * LANES * VEC * 4; \
    cudaFuncSetAttribute(gather<0, U, MT, MB>, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024); \
    float ms = timeit([&] { gather<0, U, MT, MB><<<grd, blk, sh>>>(p); }); char nm[80]; snprintf(nm, 80, "mean1 U=%d bounds=(%d,%d) lanes=%d groups=%d", U, MT, MB, LANES, GROUPS); rep(nm, ms, 1); }
  G1(8, 256, 2, 36, 7) G1(16, 256, 2, 36, 7) G1(8, 256, 2, 72, 3) G1(8, 256, 4, 36, 7) G1(8, 256, 2, 16, 16) G1(8, 1024, 1, 144, 7) G1(4, 1024, 1, 144, 7)
#define GS(U, SPL, GROUPS) { P p = p1; p.splits = SPL; dim3 blk(144, GROUPS), grd(T, SPL); size_t sh = GROUPS * 144 * VEC * 4; \
    cudaFuncSetAttribute(mean_split<U>, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024); \
    float ms = timeit([&] { mean_split<U><<<grd, blk, sh>>>(p); mean_finish<<<(T * C + 255) / 256, 256>>>(p); }); char nm[80]; snprintf(nm, 80, "mean1 split U=%d splits=%d groups=%d", U, SPL, GROUPS); rep(nm, ms, 1); }
  GS(8, 4, 2) GS(8, 8, 1) GS(4, 8, 2) GS(8, 16, 1) GS(4, 4, 4) GS(8, 3, 3) GS(4, 16, 2)
  return 0;
}
