// Self-test kernels of the CUDA emulator, exported through a C ABI for ctypes
// (tests/test_cuda_emulator.py). Plain CUDA: this file also builds with nvcc.
//
// Every st_* launcher returns the launch's error code (cudaGetLastError(), which clears it);
// st_error_string() gives its text, with the emulator's detail.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <chrono>
#include <cstdint>

namespace {

// ---- warp reductions ---------------------------------------------------------------------------
template <typename T>
__global__ void warp_sum_down(const T* in, T* out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  T v = in[t];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if ((threadIdx.x & 31) == 0) out[t / 32] = v;
}

template <typename T>
__global__ void warp_sum_xor(const T* in, T* out) {  // every lane ends with the warp's total
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  T v = in[t];
  for (int mask = 16; mask > 0; mask >>= 1) v += __shfl_xor_sync(0xffffffffu, v, mask);
  out[t] = v;
}

// One shuffle of 64-bit values, as the caller asks: op 0 idx, 1 up, 2 down, 3 xor. Lanes outside
// `mask` skip the shuffle (and keep their value).
__global__ void shuffle_once(const long long* in, long long* out, int op, int param, int width, unsigned mask) {
  const int t = threadIdx.x;
  long long v = in[t];
  if (mask >> (t & 31) & 1u) {
    switch (op) {
      case 0: v = __shfl_sync(mask, v, param, width); break;
      case 1: v = __shfl_up_sync(mask, v, static_cast<unsigned>(param), width); break;
      case 2: v = __shfl_down_sync(mask, v, static_cast<unsigned>(param), width); break;
      default: v = __shfl_xor_sync(mask, v, param, width); break;
    }
  }
  out[t] = v;
}

__global__ void broadcast(const float* in, float* out, int src) {
  out[threadIdx.x] = __shfl_sync(0xffffffffu, in[threadIdx.x], src);
}

__global__ void vote(const int* pred, unsigned* ballot, int* any, int* all, unsigned* active) {
  const int t = threadIdx.x;
  ballot[t] = __ballot_sync(0xffffffffu, pred[t]);
  any[t] = __any_sync(0xffffffffu, pred[t]);
  all[t] = __all_sync(0xffffffffu, pred[t]);
  __syncwarp();
  active[t] = __activemask();
}

__global__ void match_reduce(const unsigned* in, unsigned* match, unsigned* sum, int* mn, unsigned* mx) {
  const int t = threadIdx.x;
  match[t] = __match_any_sync(0xffffffffu, in[t]);
  sum[t] = __reduce_add_sync(0xffffffffu, in[t]);
  mn[t] = __reduce_min_sync(0xffffffffu, static_cast<int>(in[t]) - 8);
  mx[t] = __reduce_max_sync(0xffffffffu, in[t]);
}

// ---- block-level ---------------------------------------------------------------------------------
// Grid-stride sum of squares then a two-level tree: warps by shuffle, warp sums in __shared__.
__global__ void block_sum(const float* in, float* out, int n) {
  float acc = 0.0f;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) acc += in[i];
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  __shared__ float warp_sums[32];
  const int warps = (blockDim.x + 31) / 32;
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < static_cast<unsigned>(warps) ? warp_sums[threadIdx.x] : 0.0f;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (threadIdx.x == 0) out[blockIdx.x] = v;
  }
}

__global__ void barrier_votes(const int* pred, int* count, int* all, int* any) {
  const int t = threadIdx.x;
  count[t] = __syncthreads_count(pred[t]);
  all[t] = __syncthreads_and(pred[t]);
  any[t] = __syncthreads_or(pred[t]);
}

// A partial last warp (blockDim.x not a multiple of 32): full-mask operations cover the lanes
// that exist.
__global__ void partial_warp(const float* in, float* sum, unsigned* ballot) {
  float v = in[threadIdx.x];
  for (int mask = 16; mask > 0; mask >>= 1) v += __shfl_xor_sync(0xffffffffu, v, mask);
  sum[threadIdx.x] = v;
  ballot[threadIdx.x] = __ballot_sync(0xffffffffu, 1);
}

// Index variables and block order: slot = linear block id * threads + linear thread id.
__global__ void indices(unsigned* out, unsigned* order, unsigned* counter) {
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  out[block * threads + tid] = block * threads + tid;
  if (tid == 0) order[block] = atomicAdd(counter, 1u);
}

__global__ void count_threads(unsigned* counter) { atomicAdd(counter, 1u); }

// Each thread modifies its by-value arguments; no other thread may see that.
struct Pod {
  int a;
  float b[3];
};
__global__ void by_value(int x, Pod p, int* out) {
  x += threadIdx.x;
  p.a += static_cast<int>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = x + p.a;
}

__global__ void dynamic_smem(float* out) {
  extern __shared__ float smem[];
  smem[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = smem[blockDim.x - 1 - threadIdx.x];
}

// Cache-hinted loads and stores on the types the project's kernels use.
__global__ void hinted_copy(const float4* a, float4* b, const uint2* c, uint2* d, const int64_t* e, int64_t* f,
                            const __nv_bfloat16* g, __nv_bfloat16* h, const float* x, float* y) {
  const int t = threadIdx.x;
  __stcg(b + t, __ldcg(a + t));
  __stcs(d + t, __ldg(c + t));
  __stwb(f + t, __ldcs(e + t));
  __stwt(h + t, __ldlu(g + t));
  __stcg(y + t, __ldcv(x + t) + __ldca(x + t) * (__isGlobal(x) ? 1.0f : 0.0f));
}

// ---- errors a GPU would hang or misbehave on ---------------------------------------------------
__global__ void divergent_barrier(int* out) {
  if (threadIdx.x & 1) return;  // odd threads skip the barrier
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void missing_lane(float* out) {
  float v = threadIdx.x;
  if (threadIdx.x == 5) return;  // lane 5 never reaches the full-mask shuffle
  v += __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void mismatched_shuffles(float* out) {
  float v = threadIdx.x;
  v += (threadIdx.x < 16) ? __shfl_down_sync(0xffffffffu, v, 1) : __shfl_down_sync(0xffffffffu, v, 2);
  out[threadIdx.x] = v;
}

__global__ void shuffle_vs_barrier(float* out) {
  float v = threadIdx.x;
  if (threadIdx.x == 3) __syncthreads();
  else v += __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void source_outside_mask(float* out) {
  float v = threadIdx.x;
  if (threadIdx.x < 16) v = __shfl_sync(0x0000ffffu, v, 20);  // lane 20 is not in the mask
  out[threadIdx.x] = v;
}

__global__ void traps(int* out) {
  if (threadIdx.x == 7) __trap();
  out[threadIdx.x] = 1;
}

__global__ void null_store(int* out) {
  if (blockIdx.x == 1 && threadIdx.x == 3) out = nullptr;
  out[threadIdx.x] = 1;
}

__device__ int deep(volatile char* prev, int n) {  // ~4 KiB of stack per level
  volatile char frame[4000];
  frame[0] = static_cast<char>(n);
  frame[3999] = prev ? prev[0] : 0;
  return n == 0 ? frame[3999] : deep(frame, n - 1) + frame[0];
}

__global__ void recursion(int* out, int depth) { out[threadIdx.x] = deep(nullptr, depth); }

// ---- conversions ---------------------------------------------------------------------------------
__global__ void f32_to_bf16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    out[i] = __bfloat16_as_ushort(__float2bfloat16_rn(in[i]));
}
__global__ void f32_to_f16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    out[i] = __half_as_ushort(__float2half_rn(in[i]));
}
__global__ void bf16_to_f32(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    out[i] = __bfloat162float(__ushort_as_bfloat16(in[i]));
}
__global__ void f16_to_f32(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    out[i] = __half2float(__ushort_as_half(in[i]));
}
__global__ void f64_to_16(const double* in, uint16_t* bf, uint16_t* hf, int64_t n) {
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    bf[i] = __bfloat16_as_ushort(__double2bfloat16(in[i]));
    hf[i] = __half_as_ushort(__double2half(in[i]));
  }
}

// ---- timing --------------------------------------------------------------------------------------
__global__ void with_barriers(float* out, int barriers) {
  __shared__ float s[1024];
  float v = threadIdx.x;
  for (int b = 0; b < barriers; ++b) {
    s[threadIdx.x] = v;
    __syncthreads();
    v = s[(threadIdx.x + 1) % blockDim.x];
  }
  out[threadIdx.x] = v;
}

__global__ void with_shuffles(float* out, int rounds) {
  float v = threadIdx.x;
  for (int r = 0; r < rounds; ++r) v += __shfl_xor_sync(0xffffffffu, v, 1 << (r % 5));
  out[threadIdx.x] = v;
}

int last() { return static_cast<int>(cudaGetLastError()); }

}  // namespace

extern "C" {

const char* st_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }
const char* st_error_name(int err) { return cudaGetErrorName(static_cast<cudaError_t>(err)); }
int st_peek_error() { return static_cast<int>(cudaPeekAtLastError()); }
int st_get_last_error() { return last(); }

#ifdef CUDA_EMULATOR
int st_set_fiber_backend(int backend) { return emu::set_fiber_backend(backend); }
#endif

int st_warp_sum_down_f32(const float* in, float* out, int blocks, int threads) {
  warp_sum_down<float><<<blocks, threads>>>(in, out);
  return last();
}
int st_warp_sum_down_f64(const double* in, double* out, int blocks, int threads) {
  warp_sum_down<double><<<blocks, threads>>>(in, out);
  return last();
}
int st_warp_sum_xor_f32(const float* in, float* out, int blocks, int threads) {
  warp_sum_xor<float><<<blocks, threads>>>(in, out);
  return last();
}
int st_warp_sum_xor_f64(const double* in, double* out, int blocks, int threads) {
  warp_sum_xor<double><<<blocks, threads>>>(in, out);
  return last();
}
int st_shuffle(const long long* in, long long* out, int threads, int op, int param, int width, unsigned mask) {
  shuffle_once<<<1, threads>>>(in, out, op, param, width, mask);
  return last();
}
int st_broadcast(const float* in, float* out, int src) {
  broadcast<<<1, 32>>>(in, out, src);
  return last();
}
int st_vote(const int* pred, unsigned* ballot, int* any, int* all, unsigned* active, int threads) {
  vote<<<1, threads>>>(pred, ballot, any, all, active);
  return last();
}
int st_match_reduce(const unsigned* in, unsigned* match, unsigned* sum, int* mn, unsigned* mx) {
  match_reduce<<<1, 32>>>(in, match, sum, mn, mx);
  return last();
}
int st_block_sum(const float* in, float* out, int n, int blocks, int threads) {
  block_sum<<<blocks, threads>>>(in, out, n);
  return last();
}
int st_barrier_votes(const int* pred, int* count, int* all, int* any, int threads) {
  barrier_votes<<<1, threads>>>(pred, count, all, any);
  return last();
}
int st_partial_warp(const float* in, float* sum, unsigned* ballot, int threads) {
  partial_warp<<<1, threads>>>(in, sum, ballot);
  return last();
}
int st_indices(unsigned* out, unsigned* order, unsigned* counter, unsigned gx, unsigned gy, unsigned gz,
               unsigned bx, unsigned by, unsigned bz) {
  indices<<<dim3(gx, gy, gz), dim3(bx, by, bz)>>>(out, order, counter);
  return last();
}
int st_launch(unsigned* counter, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
              size_t shmem) {
  count_threads<<<dim3(gx, gy, gz), dim3(bx, by, bz), shmem>>>(counter);
  return last();
}
// Launches without reading the error back (for cudaPeekAtLastError / cudaGetLastError tests).
void st_launch_only(unsigned* counter, unsigned threads) { count_threads<<<1, threads>>>(counter); }
int st_by_value(int* out, int threads) {
  Pod p{100, {1.0f, 2.0f, 3.0f}};
  by_value<<<1, threads>>>(7, p, out);
  return last();
}
int st_dynamic_smem(float* out, int threads, size_t shmem, int optin) {
  if (optin) {
    const cudaError_t e = cudaFuncSetAttribute(dynamic_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
    if (e != cudaSuccess) return last();
  }
  dynamic_smem<<<2, threads, shmem>>>(out);
  return last();
}
int st_hinted_copy(const void* a, void* b, const void* c, void* d, const int64_t* e, int64_t* f, const uint16_t* g,
                   uint16_t* h, const float* x, float* y, int threads) {
  hinted_copy<<<1, threads>>>(static_cast<const float4*>(a), static_cast<float4*>(b), static_cast<const uint2*>(c),
                              static_cast<uint2*>(d), e, f, reinterpret_cast<const __nv_bfloat16*>(g),
                              reinterpret_cast<__nv_bfloat16*>(h), x, y);
  return last();
}

int st_divergent_barrier(int* out, int threads) {
  divergent_barrier<<<1, threads>>>(out);
  return last();
}
int st_missing_lane(float* out) {
  missing_lane<<<1, 32>>>(out);
  return last();
}
int st_mismatched_shuffles(float* out) {
  mismatched_shuffles<<<1, 32>>>(out);
  return last();
}
int st_shuffle_vs_barrier(float* out) {
  shuffle_vs_barrier<<<1, 32>>>(out);
  return last();
}
int st_source_outside_mask(float* out) {
  source_outside_mask<<<1, 32>>>(out);
  return last();
}
int st_trap(int* out) {
  traps<<<2, 32>>>(out);
  return last();
}

// Crash on purpose (a null pointer, a stack overflow): the process dies with a report.
int st_null_store(int* out) {
  null_store<<<2, 32>>>(out);
  return last();
}
int st_recursion(int* out, int depth) {
  recursion<<<1, 4>>>(out, depth);
  return last();
}

int st_f32_to_bf16(const float* in, uint16_t* out, int64_t n) {
  f32_to_bf16<<<8, 256>>>(in, out, n);
  return last();
}
int st_f32_to_f16(const float* in, uint16_t* out, int64_t n) {
  f32_to_f16<<<8, 256>>>(in, out, n);
  return last();
}
int st_bf16_to_f32(const uint16_t* in, float* out, int64_t n) {
  bf16_to_f32<<<8, 256>>>(in, out, n);
  return last();
}
int st_f16_to_f32(const uint16_t* in, float* out, int64_t n) {
  f16_to_f32<<<8, 256>>>(in, out, n);
  return last();
}
int st_f64_to_16(const double* in, uint16_t* bf, uint16_t* hf, int64_t n) {
  f64_to_16<<<8, 256>>>(in, bf, hf, n);
  return last();
}

// Seconds per launch of one block of `threads` threads that passes `barriers` barriers (kind 0)
// or `barriers` full-warp shuffles (kind 1), averaged over `reps` launches.
double st_time_launch(int threads, int barriers, int kind, int reps, float* out) {
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; ++r) {
    if (kind == 0) with_barriers<<<1, threads>>>(out, barriers);
    else with_shuffles<<<1, threads>>>(out, barriers);
  }
  const auto t1 = std::chrono::steady_clock::now();
  if (cudaGetLastError() != cudaSuccess) return -1.0;
  return std::chrono::duration<double>(t1 - t0).count() / reps;
}

}  // extern "C"
