// StratOpt CUDA kernels: a plain C++ interface on raw device pointers (the kernels need no torch
// types), so that stratopt_cuda.cu compiles against the CUDA runtime alone, or for the host
// under the CPU emulation of csrc/emulation. stratopt_cuda_binding.cpp is the torch glue.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "../common/update_scalars.h"

namespace stratopt_cuda {

// Elements per chunk: a chunk is one CUDA block's work, a piece of one fragment.
constexpr int64_t kChunk = 16384;
constexpr int kThreads = 256;

// Pointer table columns (int64 device array of shape (num_tensors, kPtrCols)): the addresses of
// one tensor's parameter, gradient, states, 16-bit copy (0: none), step counter (float64), and
// the dtype codes of its gradient (0 float32, 1 bfloat16, 2 float16) and copy (0 none, 1
// bfloat16, 2 float16). Per tensor, so one launch serves any mix of dtypes and copies.
enum PtrCol {
  kParam = 0, kGrad = 1, kM1 = 2, kV = 3, kM2 = 4, kOut = 5, kStep = 6, kGradType = 7, kOutType = 8,
  kPtrCols = 9
};

// Chunk rows (int64 device array of shape (num_chunks, 4)): tensor, begin, length, layer.

struct Hyper {
  stratopt::UpdateHyper shared;  // what the per-fragment scalars need besides lr and beta1
  double lr, beta1;
  // When set, the learning rate is read from this device scalar instead of `lr`, so a captured
  // CUDA graph replays with the value a scheduler last wrote there.
  const double* lr_device = nullptr;
};

// Launch errors throw (C10_CUDA_KERNEL_LAUNCH_CHECK).
//
// Sums of squares, in float64 throughout: stage 1 writes one partial per chunk; stage 2 (one
// warp per layer) adds the partials of layer l, listed in layer_chunks[layer_ptr[l] ..
// layer_ptr[l+1]), in a fixed order. No atomics: reruns are bitwise identical. partial:
// num_chunks doubles of scratch.
void sumsq(const int64_t* ptrs, const int64_t* chunks, int64_t num_chunks, const int64_t* layer_ptr,
           const int64_t* layer_chunks, int64_t num_layers, double* partial, double* out, cudaStream_t stream);

// The fused update. finite (bool), the per-tensor step counters (via ptrs), clip_coef, alpha and
// beta1_layer (nullable: hyper.beta1 for every layer) are read from device memory: no host
// synchronisation, CUDA-graph capturable. scalars: num_chunks entries of scratch, where a first
// kernel derives each chunk's scalars (fp64 pow/log, one thread per chunk) for the update kernel.
void update(const int64_t* ptrs, const int64_t* chunks, int64_t num_chunks, const bool* finite,
            const double* clip_coef, const double* alpha, const double* beta1_layer, const Hyper& hyper,
            stratopt::FragScalars* scalars, cudaStream_t stream);

}  // namespace stratopt_cuda
