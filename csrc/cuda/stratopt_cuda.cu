// StratOpt CUDA kernels (see stratopt_cuda.h). Compiled without --use_fast_math and with
// --fmad=false; the lerps use explicit __fmaf_rn as ATen's lerp does, every other operation
// rounds once, like the PyTorch reference and the CPU op (bit-identical results).
//
// Memory access: the tensors' addresses come from an int64 table, so the compiler cannot tell
// they are global memory; the loads and stores go through __ldg (read-only: gradients, tables)
// and __ldcg/__stcg (states, read once and written once) to get global rather than generic
// instructions. Each chunk first peels the elements before its first 16-byte boundary, so the
// 16-byte path covers every fragment whatever its start (a ZeRO flat buffer after an odd-sized
// tensor starts most fragments off a boundary).
#include "stratopt_cuda.h"

#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>

namespace stratopt_cuda {
namespace {

using stratopt::FragScalars;  // per-fragment scalars, derived in ../common/update_scalars.h

template <typename To, typename From>
__device__ __forceinline__ To bits_as(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To y;
  memcpy(&y, &x, sizeof y);
  return y;
}

// ---- element access --------------------------------------------------------------------------

template <typename G> __device__ __forceinline__ float to_f(G x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }

template <typename G> __device__ __forceinline__ float load_grad(const G* g, int64_t i) { return to_f(__ldg(g + i)); }

// 4 consecutive gradient elements in one aligned load: 16 B for fp32, 8 B for 16-bit types.
template <typename G> struct Vec4 { G x[4]; };
template <typename G> struct Raw4 { using T = uint2; };
template <> struct Raw4<float> { using T = float4; };

template <typename G>
__device__ __forceinline__ Vec4<G> load_grad4(const G* g, int64_t j) {
  using R = typename Raw4<G>::T;
  return bits_as<Vec4<G>>(__ldg(reinterpret_cast<const R*>(g) + j));
}

// True when p is aligned to `bytes` (a power of two).
__device__ __forceinline__ bool aligned(const void* p, unsigned bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1u)) == 0;
}

// Elements of type T before the first `bytes`-aligned address at or after p (p is T-aligned).
template <typename T>
__device__ __forceinline__ int64_t head_to(const T* p, unsigned bytes) {
  return static_cast<int64_t>(((bytes - (reinterpret_cast<uintptr_t>(p) & (bytes - 1u))) & (bytes - 1u)) / sizeof(T));
}

// ---- the update ------------------------------------------------------------------------------

__device__ __forceinline__ float lerp_f(float self, float end, float w, float omw, bool small) {
  const float d = __fsub_rn(end, self);
  return small ? __fmaf_rn(w, d, self) : __fmaf_rn(-d, omw, end);
}

// One element of the update: the same sequence as stratopt_ds/ops/reference.py.
template <bool M2>
__device__ __forceinline__ void update_one(const FragScalars& s, float graw, float& p, float& m1, float& v,
                                           float& m2) {
  const float g = __fmul_rn(graw, s.coef);
  m1 = lerp_f(m1, g, s.w1, s.omw1, s.small1);
  const float gg = __fmul_rn(g, g);
  v = lerp_f(v, gg, s.w2, s.omw2, s.small2);
  float numer = __fdiv_rn(m1, s.bc1);
  if (M2) {
    m2 = lerp_f(m2, g, s.w3, s.omw3, s.small3);
    numer = __fadd_rn(numer, __fmul_rn(s.a, m2));
  }
  const float denom = __fadd_rn(__fsqrt_rn(__fdiv_rn(v, s.bc2)), s.eps);
  p = __fadd_rn(__fmul_rn(p, s.decay), __fmul_rn(__fdiv_rn(numer, denom), s.step));
}

// OUT: 0 no copy of the updated weights, 1 bfloat16, 2 float16 (round to nearest even).
template <int OUT> struct OutT { using T = __nv_bfloat16; };
template <> struct OutT<2> { using T = __half; };
template <int OUT> __device__ __forceinline__ typename OutT<OUT>::T round_out(float x);
template <> __device__ __forceinline__ __nv_bfloat16 round_out<1>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half round_out<2>(float x) { return __float2half_rn(x); }

// The addresses of one chunk's elements.
struct ChunkPtrs {
  float* p;
  const void* g;
  float* m1;
  float* v;
  float* m2;
  void* out;
};

template <typename G, bool M2, int OUT>
__device__ __forceinline__ void update_elem(const FragScalars& s, const ChunkPtrs& c, int64_t i) {
  using O = typename OutT<OUT>::T;
  float pv = __ldcg(c.p + i), m1v = __ldcg(c.m1 + i), vv = __ldcg(c.v + i), m2v = M2 ? __ldcg(c.m2 + i) : 0.0f;
  update_one<M2>(s, load_grad(static_cast<const G*>(c.g), i), pv, m1v, vv, m2v);
  __stcg(c.p + i, pv);
  __stcg(c.m1 + i, m1v);
  __stcg(c.v + i, vv);
  if (M2) __stcg(c.m2 + i, m2v);
  if constexpr (OUT != 0) __stcg(static_cast<O*>(c.out) + i, round_out<OUT>(pv));
}

template <typename G, bool M2, int OUT>
__device__ void update_chunk(const FragScalars& s, const ChunkPtrs& c, int64_t n) {
  using O = typename OutT<OUT>::T;
  const G* g = static_cast<const G*>(c.g);
  // The first 0-3 elements up to p's 16-byte boundary one by one; from there 16-byte accesses,
  // when every array is on a boundary at the same element (true for torch's allocations).
  const int64_t head = head_to(c.p, 16) < n ? head_to(c.p, 16) : n;
  bool vec = aligned(c.m1 + head, 16) && aligned(c.v + head, 16) && aligned(g + head, 4 * sizeof(G));
  if (M2) vec = vec && aligned(c.m2 + head, 16);
  if (OUT) vec = vec && aligned(static_cast<O*>(c.out) + head, 8);
  if (!vec) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) update_elem<G, M2, OUT>(s, c, i);
    return;
  }
  if (threadIdx.x < head) update_elem<G, M2, OUT>(s, c, threadIdx.x);
  const int64_t n4 = (n - head) / 4;
  float4* p4 = reinterpret_cast<float4*>(c.p + head);
  float4* m14 = reinterpret_cast<float4*>(c.m1 + head);
  float4* v4 = reinterpret_cast<float4*>(c.v + head);
  float4* m24 = M2 ? reinterpret_cast<float4*>(c.m2 + head) : nullptr;
  for (int64_t j = threadIdx.x; j < n4; j += blockDim.x) {
    float4 pv = __ldcg(p4 + j), m1v = __ldcg(m14 + j), vv = __ldcg(v4 + j);
    float4 m2v = M2 ? __ldcg(m24 + j) : make_float4(0.f, 0.f, 0.f, 0.f);
    const Vec4<G> gv = load_grad4(g + head, j);
    update_one<M2>(s, to_f(gv.x[0]), pv.x, m1v.x, vv.x, m2v.x);
    update_one<M2>(s, to_f(gv.x[1]), pv.y, m1v.y, vv.y, m2v.y);
    update_one<M2>(s, to_f(gv.x[2]), pv.z, m1v.z, vv.z, m2v.z);
    update_one<M2>(s, to_f(gv.x[3]), pv.w, m1v.w, vv.w, m2v.w);
    __stcg(p4 + j, pv);
    __stcg(m14 + j, m1v);
    __stcg(v4 + j, vv);
    if (M2) __stcg(m24 + j, m2v);
    if constexpr (OUT != 0) {
      Vec4<O> o;
      o.x[0] = round_out<OUT>(pv.x);
      o.x[1] = round_out<OUT>(pv.y);
      o.x[2] = round_out<OUT>(pv.z);
      o.x[3] = round_out<OUT>(pv.w);
      __stcg(reinterpret_cast<uint2*>(static_cast<O*>(c.out) + head) + j, bits_as<uint2>(o));
    }
  }
  for (int64_t i = head + 4 * n4 + threadIdx.x; i < n; i += blockDim.x) update_elem<G, M2, OUT>(s, c, i);
}

// A skipped step: weights and states untouched; the 16-bit copy is refreshed, so it stays exact.
template <int OUT>
__device__ void copy_chunk(const ChunkPtrs& c, int64_t n) {
  using O = typename OutT<OUT>::T;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) __stcg(static_cast<O*>(c.out) + i, round_out<OUT>(__ldcg(c.p + i)));
}

// One thread per chunk: the chunk's scalars in float64 (spec maths in ../common/update_scalars.h).
// In its own kernel so that no update block idles while one thread computes pow and log.
__global__ void scalars_kernel(const int64_t* __restrict__ ptrs, const int64_t* __restrict__ chunks,
                               int64_t num_chunks, const double* __restrict__ clip_coef,
                               const double* __restrict__ alpha, const double* __restrict__ beta1_layer, Hyper h,
                               FragScalars* __restrict__ out) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= num_chunks) return;
  const int64_t tensor = __ldg(chunks + 4 * k), layer = __ldg(chunks + 4 * k + 3);
  const double* step = reinterpret_cast<const double*>(__ldg(ptrs + kPtrCols * tensor + kStep));
  const double t = fmax(__ldg(step), 1.0);
  out[k] = stratopt::frag_scalars(h.shared, t, beta1_layer ? beta1_layer[layer] : h.beta1,
                                  h.lr_device ? *h.lr_device : h.lr, clip_coef[layer], alpha[layer]);
}

// Resident blocks per SM asked of the register allocator: 4 (64 registers) without m2, where it
// fits without spilling (uncapped: 68 registers, 3 blocks); 3 with m2, which spills at 64. Each
// thread has 4-5 16-byte loads in flight per iteration, so 3 blocks already cover the memory
// latency (Little's law: ~15 KB in flight per SM at 3 TB/s).
template <bool M2>
__global__ void __launch_bounds__(kThreads, M2 ? 3 : 4) update_kernel(const int64_t* __restrict__ ptrs,
                                                          const int64_t* __restrict__ chunks,
                                                          const bool* __restrict__ finite,
                                                          const FragScalars* __restrict__ scalars) {
  const int64_t* row = chunks + 4 * static_cast<int64_t>(blockIdx.x);
  const int64_t tensor = __ldg(row), begin = __ldg(row + 1), n = __ldg(row + 2);
  const int64_t* tp = ptrs + kPtrCols * tensor;
  const int gtype = static_cast<int>(__ldg(tp + kGradType)), otype = static_cast<int>(__ldg(tp + kOutType));
  const int64_t gsize = gtype == 0 ? 4 : 2;
  const int64_t osize = 2;
  ChunkPtrs c;
  c.p = reinterpret_cast<float*>(__ldg(tp + kParam)) + begin;
  c.g = reinterpret_cast<const char*>(__ldg(tp + kGrad)) + gsize * begin;
  c.m1 = reinterpret_cast<float*>(__ldg(tp + kM1)) + begin;
  c.v = reinterpret_cast<float*>(__ldg(tp + kV)) + begin;
  c.m2 = M2 ? reinterpret_cast<float*>(__ldg(tp + kM2)) + begin : nullptr;
  c.out = otype ? reinterpret_cast<char*>(__ldg(tp + kOut)) + osize * begin : nullptr;  // none: no copy
  if (!*finite) {
    if (otype == 1) copy_chunk<1>(c, n);
    else if (otype == 2) copy_chunk<2>(c, n);
    return;
  }
  const FragScalars s = scalars[blockIdx.x];
  switch (3 * gtype + otype) {  // the same for every thread of the block: no divergence
    case 0: update_chunk<float, M2, 0>(s, c, n); break;
    case 1: update_chunk<float, M2, 1>(s, c, n); break;
    case 2: update_chunk<float, M2, 2>(s, c, n); break;
    case 3: update_chunk<__nv_bfloat16, M2, 0>(s, c, n); break;
    case 4: update_chunk<__nv_bfloat16, M2, 1>(s, c, n); break;
    case 5: update_chunk<__nv_bfloat16, M2, 2>(s, c, n); break;
    case 6: update_chunk<__half, M2, 0>(s, c, n); break;
    case 7: update_chunk<__half, M2, 1>(s, c, n); break;
    default: update_chunk<__half, M2, 2>(s, c, n); break;
  }
}

// ---- sums of squares -------------------------------------------------------------------------

// acc + x^2 in float64: a float's square is exact in a double, so each step rounds once.
__device__ __forceinline__ double add_sq(double acc, float f) {
  const double d = static_cast<double>(f);
  return __fma_rn(d, d, acc);
}

// This thread's fp64 sum of squares of its elements of one chunk: element head+4j..head+4j+3 for
// j = threadIdx.x + k*blockDim.x, its head element and its tail elements. The assignment of
// elements to threads is fixed, so the result is deterministic. Float64 throughout: an fp32
// accumulator drifts past 1e-7 relative on long bf16 fragments, and the pass is bound by memory,
// not by the FMAs.
template <typename G>
__device__ double chunk_sumsq(const G* g, int64_t n) {
  double acc = 0.0;
  const int64_t head = head_to(g, 4 * sizeof(G)) < n ? head_to(g, 4 * sizeof(G)) : n;
  if (threadIdx.x < head) acc = add_sq(acc, load_grad(g, threadIdx.x));
  const int64_t n4 = (n - head) / 4;
  for (int64_t j = threadIdx.x; j < n4; j += blockDim.x) {
    const Vec4<G> x = load_grad4(g + head, j);
    for (int k = 0; k < 4; ++k) acc = add_sq(acc, to_f(x.x[k]));
  }
  for (int64_t i = head + 4 * n4 + threadIdx.x; i < n; i += blockDim.x) acc = add_sq(acc, load_grad(g, i));
  return acc;
}

// Stage 1: one fp64 partial per chunk: per-thread sums, a fixed warp tree, warps in order.
__global__ void __launch_bounds__(kThreads) sumsq_partial_kernel(const int64_t* __restrict__ ptrs,
                                                                 const int64_t* __restrict__ chunks,
                                                                 double* __restrict__ partial) {
  const int64_t* row = chunks + 4 * static_cast<int64_t>(blockIdx.x);
  const int64_t tensor = __ldg(row), begin = __ldg(row + 1), n = __ldg(row + 2);
  const int64_t* tp = ptrs + kPtrCols * tensor;
  const int gtype = static_cast<int>(__ldg(tp + kGradType));
  const char* base = reinterpret_cast<const char*>(__ldg(tp + kGrad));
  double acc;
  if (gtype == 0) acc = chunk_sumsq(reinterpret_cast<const float*>(base) + begin, n);
  else if (gtype == 1) acc = chunk_sumsq(reinterpret_cast<const __nv_bfloat16*>(base) + begin, n);
  else acc = chunk_sumsq(reinterpret_cast<const __half*>(base) + begin, n);
  for (int off = 16; off > 0; off >>= 1) acc = __dadd_rn(acc, __shfl_down_sync(0xffffffffu, acc, off));
  __shared__ double warp_sums[kThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) total = __dadd_rn(total, warp_sums[w]);
    partial[blockIdx.x] = total;
  }
}

// Stage 2: one warp per layer; lane k adds chunks k, k+32, ... in fp64, then a fixed tree.
__global__ void sumsq_finalize_kernel(const double* __restrict__ partial, const int64_t* __restrict__ layer_ptr,
                                      const int64_t* __restrict__ layer_chunks, int64_t num_layers,
                                      double* __restrict__ out) {
  const int64_t layer = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (layer >= num_layers) return;  // whole warps exit together
  double acc = 0.0;
  for (int64_t k = __ldg(layer_ptr + layer) + lane; k < __ldg(layer_ptr + layer + 1); k += 32)
    acc += __ldg(partial + __ldg(layer_chunks + k));
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if (lane == 0) out[layer] = acc;
}

}  // namespace

void sumsq(const int64_t* ptrs, const int64_t* chunks, int64_t num_chunks, const int64_t* layer_ptr,
           const int64_t* layer_chunks, int64_t num_layers, double* partial, double* out, cudaStream_t stream) {
  if (num_layers <= 0) return;
  if (num_chunks > 0) {
    sumsq_partial_kernel<<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(ptrs, chunks, partial);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  constexpr int kWarps = 8;
  const unsigned blocks = static_cast<unsigned>((num_layers + kWarps - 1) / kWarps);
  sumsq_finalize_kernel<<<blocks, 32 * kWarps, 0, stream>>>(partial, layer_ptr, layer_chunks, num_layers, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void update(const int64_t* ptrs, const int64_t* chunks, int64_t num_chunks, const bool* finite,
            const double* clip_coef, const double* alpha, const double* beta1_layer, const Hyper& h,
            FragScalars* scalars, cudaStream_t stream) {
  if (num_chunks <= 0) return;
  const unsigned scalar_blocks = static_cast<unsigned>((num_chunks + kThreads - 1) / kThreads);
  scalars_kernel<<<scalar_blocks, kThreads, 0, stream>>>(ptrs, chunks, num_chunks, clip_coef, alpha, beta1_layer, h,
                                                         scalars);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const unsigned blocks = static_cast<unsigned>(num_chunks);
  if (h.shared.has_m2())
    update_kernel<true><<<blocks, kThreads, 0, stream>>>(ptrs, chunks, finite, scalars);
  else
    update_kernel<false><<<blocks, kThreads, 0, stream>>>(ptrs, chunks, finite, scalars);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace stratopt_cuda
