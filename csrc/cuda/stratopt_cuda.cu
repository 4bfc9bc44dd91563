// StratOpt CUDA kernels (see stratopt_cuda.h). Compiled without --use_fast_math and with
// --fmad=false; the lerps use explicit __fmaf_rn as ATen's lerp does, every other operation
// rounds once, like the PyTorch reference.
#include "stratopt_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace stratopt_cuda {
namespace {

template <typename G> __device__ __forceinline__ float to_f(G x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }

// A group of 4 gradient elements in one aligned load (16 B for fp32, 8 B for 16-bit types).
template <typename G> struct alignas(4 * sizeof(G)) Vec4 { G x[4]; };

using stratopt::FragScalars;  // per-fragment scalars, derived in ../common/update_scalars.h

__device__ __forceinline__ float lerp_f(float self, float end, float w, float omw, bool small) {
  const float d = __fsub_rn(end, self);
  return small ? __fmaf_rn(w, d, self) : __fmaf_rn(-d, omw, end);
}

// One element of the update: the same sequence as stratopt_ds/ops/reference.py.
template <bool M2>
__device__ __forceinline__ float update_one(const FragScalars& s, float graw, float& p, float& m1, float& v,
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
  return p;
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// OUT: 0 no copy of the updated weights, 1 bfloat16, 2 float16 (round to nearest even).
template <int OUT> struct OutT { using T = __nv_bfloat16; };
template <> struct OutT<2> { using T = __half; };
template <int OUT> __device__ __forceinline__ typename OutT<OUT>::T round_out(float x);
template <> __device__ __forceinline__ __nv_bfloat16 round_out<1>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half round_out<2>(float x) { return __float2half_rn(x); }

template <typename G, bool M2, int OUT>
__global__ void __launch_bounds__(kThreads) update_kernel(const int64_t* __restrict__ ptrs,
                                                          const int64_t* __restrict__ chunks,
                                                          const bool* __restrict__ finite,
                                                          const double* __restrict__ clip_coef,
                                                          const double* __restrict__ alpha,
                                                          const double* __restrict__ beta1_layer,
                                                          Hyper h) {
  __shared__ FragScalars s;
  __shared__ bool skip;
  const int64_t* row = chunks + 4 * static_cast<int64_t>(blockIdx.x);
  const int64_t tensor = row[0], begin = row[1], n = row[2], layer = row[3];
  const int64_t* tp = ptrs + kPtrCols * tensor;
  if (threadIdx.x == 0) {  // per-chunk scalars in float64, from device memory
    const bool ok = *finite;
    const double t = fmax(*reinterpret_cast<const double*>(tp[kStep]), 1.0);
    s = stratopt::frag_scalars(h.shared, t, beta1_layer ? beta1_layer[layer] : h.beta1,
                               h.lr_device ? *h.lr_device : h.lr, clip_coef[layer], alpha[layer]);
    skip = !ok;
  }
  __syncthreads();
  float* p = reinterpret_cast<float*>(tp[kParam]) + begin;
  const G* g = reinterpret_cast<const G*>(tp[kGrad]) + begin;
  float* m1 = reinterpret_cast<float*>(tp[kM1]) + begin;
  float* v = reinterpret_cast<float*>(tp[kV]) + begin;
  float* m2 = M2 ? reinterpret_cast<float*>(tp[kM2]) + begin : nullptr;
  using O = typename OutT<OUT>::T;
  O* out = OUT ? reinterpret_cast<O*>(tp[kOut]) + begin : nullptr;
  const FragScalars sc = s;

  if (skip) {  // skipped step: weights and states untouched; the 16-bit copy stays exact
    if constexpr (OUT != 0)
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) out[i] = round_out<OUT>(p[i]);
    return;
  }
  bool vec = aligned16(p) && aligned16(m1) && aligned16(v) &&
             (reinterpret_cast<uintptr_t>(g) % (4 * sizeof(G))) == 0;
  if (M2) vec = vec && aligned16(m2);
  if (OUT) vec = vec && (reinterpret_cast<uintptr_t>(out) & 7u) == 0;
  int64_t done = 0;
  if (vec) {  // 16-byte loads and stores of p, m1, v, m2; 4 gradient elements per load
    const int64_t n4 = n / 4;
    for (int64_t j = threadIdx.x; j < n4; j += blockDim.x) {
      float4 pv = reinterpret_cast<float4*>(p)[j];
      float4 m1v = reinterpret_cast<float4*>(m1)[j];
      float4 vv = reinterpret_cast<float4*>(v)[j];
      float4 m2v = M2 ? reinterpret_cast<float4*>(m2)[j] : make_float4(0.f, 0.f, 0.f, 0.f);
      const Vec4<G> gv = reinterpret_cast<const Vec4<G>*>(g)[j];
      update_one<M2>(sc, to_f(gv.x[0]), pv.x, m1v.x, vv.x, m2v.x);
      update_one<M2>(sc, to_f(gv.x[1]), pv.y, m1v.y, vv.y, m2v.y);
      update_one<M2>(sc, to_f(gv.x[2]), pv.z, m1v.z, vv.z, m2v.z);
      update_one<M2>(sc, to_f(gv.x[3]), pv.w, m1v.w, vv.w, m2v.w);
      reinterpret_cast<float4*>(p)[j] = pv;
      reinterpret_cast<float4*>(m1)[j] = m1v;
      reinterpret_cast<float4*>(v)[j] = vv;
      if (M2) reinterpret_cast<float4*>(m2)[j] = m2v;
      if constexpr (OUT != 0) {
        Vec4<O> o;
        o.x[0] = round_out<OUT>(pv.x);
        o.x[1] = round_out<OUT>(pv.y);
        o.x[2] = round_out<OUT>(pv.z);
        o.x[3] = round_out<OUT>(pv.w);
        reinterpret_cast<Vec4<O>*>(out)[j] = o;
      }
    }
    done = n4 * 4;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += blockDim.x) {  // misaligned data and the tail
    float pv = p[i], m1v = m1[i], vv = v[i], m2v = M2 ? m2[i] : 0.0f;
    update_one<M2>(sc, to_f(g[i]), pv, m1v, vv, m2v);
    p[i] = pv;
    m1[i] = m1v;
    v[i] = vv;
    if (M2) m2[i] = m2v;
    if constexpr (OUT != 0) out[i] = round_out<OUT>(pv);
  }
}

// Stage 1: one fp32 partial per chunk. Thread k of the block always handles the same elements of
// the chunk and the block tree is fixed, so the partial is deterministic.
template <typename G>
__global__ void __launch_bounds__(kThreads) sumsq_partial_kernel(const int64_t* __restrict__ ptrs,
                                                                 const int64_t* __restrict__ chunks,
                                                                 float* __restrict__ partial) {
  const int64_t* row = chunks + 4 * static_cast<int64_t>(blockIdx.x);
  const int64_t tensor = row[0], begin = row[1], n = row[2];
  const G* g = reinterpret_cast<const G*>(ptrs[kPtrCols * tensor + kGrad]) + begin;
  float acc = 0.0f;
  int64_t done = 0;
  if ((reinterpret_cast<uintptr_t>(g) % (4 * sizeof(G))) == 0) {
    const int64_t n4 = n / 4;
    for (int64_t j = threadIdx.x; j < n4; j += blockDim.x) {
      const Vec4<G> x = reinterpret_cast<const Vec4<G>*>(g)[j];
      for (int k = 0; k < 4; ++k) {
        const float f = to_f(x.x[k]);
        acc = __fmaf_rn(f, f, acc);
      }
    }
    done = n4 * 4;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += blockDim.x) {
    const float f = to_f(g[i]);
    acc = __fmaf_rn(f, f, acc);
  }
  for (int off = 16; off > 0; off >>= 1) acc = __fadd_rn(acc, __shfl_down_sync(0xffffffffu, acc, off));
  __shared__ float warp_sums[kThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) total = __fadd_rn(total, warp_sums[w]);
    partial[blockIdx.x] = total;
  }
}

// Stage 2: one warp per layer; lane k adds chunks k, k+32, ... in fp64, then a fixed tree.
__global__ void sumsq_finalize_kernel(const float* __restrict__ partial,
                                      const int64_t* __restrict__ layer_ptr,
                                      const int64_t* __restrict__ layer_chunks, int64_t num_layers,
                                      double* __restrict__ out) {
  const int64_t layer = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (layer >= num_layers) return;  // whole warps exit together
  double acc = 0.0;
  for (int64_t k = layer_ptr[layer] + lane; k < layer_ptr[layer + 1]; k += 32)
    acc += static_cast<double>(partial[layer_chunks[k]]);
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if (lane == 0) out[layer] = acc;
}

template <bool M2, int OUT>
void launch_update(int grad_dtype, dim3 grid, cudaStream_t st, const int64_t* ptrs,
                   const int64_t* chunks, const bool* finite, const double* coef,
                   const double* alpha, const double* b1, const Hyper& h) {
  switch (grad_dtype) {
    case 0: update_kernel<float, M2, OUT><<<grid, kThreads, 0, st>>>(ptrs, chunks, finite, coef, alpha, b1, h); break;
    case 1: update_kernel<__nv_bfloat16, M2, OUT><<<grid, kThreads, 0, st>>>(ptrs, chunks, finite, coef, alpha, b1, h); break;
    default: update_kernel<__half, M2, OUT><<<grid, kThreads, 0, st>>>(ptrs, chunks, finite, coef, alpha, b1, h); break;
  }
}

}  // namespace

cudaError_t sumsq(const int64_t* ptrs, int grad_dtype, const int64_t* chunks, int64_t num_chunks,
                  const int64_t* layer_ptr, const int64_t* layer_chunks, int64_t num_layers,
                  float* partial, double* out, cudaStream_t stream) {
  if (num_layers <= 0) return cudaSuccess;
  if (num_chunks > 0) {
    const dim3 grid(static_cast<unsigned>(num_chunks));
    switch (grad_dtype) {
      case 0: sumsq_partial_kernel<float><<<grid, kThreads, 0, stream>>>(ptrs, chunks, partial); break;
      case 1: sumsq_partial_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(ptrs, chunks, partial); break;
      default: sumsq_partial_kernel<__half><<<grid, kThreads, 0, stream>>>(ptrs, chunks, partial); break;
    }
  }
  constexpr int kWarps = 8;
  const dim3 grid(static_cast<unsigned>((num_layers + kWarps - 1) / kWarps));
  sumsq_finalize_kernel<<<grid, 32 * kWarps, 0, stream>>>(partial, layer_ptr, layer_chunks, num_layers, out);
  return cudaGetLastError();
}

cudaError_t update(const int64_t* ptrs, int grad_dtype, const int64_t* chunks, int64_t num_chunks,
                   const bool* finite, const double* clip_coef, const double* alpha,
                   const double* beta1_layer, const Hyper& h, cudaStream_t stream) {
  if (num_chunks <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(num_chunks));
  const auto with_args = [&](auto launch) {  // one instantiation per (m2, copy dtype)
    launch(grad_dtype, grid, stream, ptrs, chunks, finite, clip_coef, alpha, beta1_layer, h);
  };
  switch ((h.shared.has_m2() ? 3 : 0) + h.out_type) {
    case 0: with_args(launch_update<false, 0>); break;
    case 1: with_args(launch_update<false, 1>); break;
    case 2: with_args(launch_update<false, 2>); break;
    case 3: with_args(launch_update<true, 0>); break;
    case 4: with_args(launch_update<true, 1>); break;
    default: with_args(launch_update<true, 2>); break;
  }
  return cudaGetLastError();
}

}  // namespace stratopt_cuda
