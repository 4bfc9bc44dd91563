// StratOpt CUDA kernels: plain C++ interface on raw device pointers (no torch headers), so the
// .cu file compiles against the CUDA runtime alone; stratopt_cuda_binding.cpp is the torch glue.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "../common/update_scalars.h"

namespace stratopt_cuda {

// Elements per chunk: a chunk is one CUDA block's work, a piece of one fragment.
constexpr int64_t kChunk = 16384;
constexpr int kThreads = 256;

// Pointer table columns (int64 device array of shape (num_tensors, kPtrCols)).
enum PtrCol { kParam = 0, kGrad = 1, kM1 = 2, kV = 3, kM2 = 4, kOut = 5, kStep = 6, kPtrCols = 7 };

// Chunk rows (int64 device array of shape (num_chunks, 4)): tensor, begin, length, layer.

struct Hyper {
  stratopt::UpdateHyper shared;  // what the per-fragment scalars need besides lr and beta1
  double lr, beta1;
  int out_type;  // the copy of the updated weights (kOut column): 0 none, 1 bfloat16, 2 float16
  // When set, the learning rate is read from this device scalar instead of `lr`, so a captured
  // CUDA graph replays with the value a scheduler last wrote there.
  const double* lr_device = nullptr;
};

// grad_dtype: 0 float32, 1 bfloat16, 2 float16. Returns the launch error, if any.
//
// Sums of squares: stage 1 writes one fp32 partial per chunk; stage 2 (one warp per layer) adds
// the partials of layer l, listed in layer_chunks[layer_ptr[l] .. layer_ptr[l+1]), in fp64 in a
// fixed order. No atomics: reruns are bitwise identical.
cudaError_t sumsq(const int64_t* ptrs, int grad_dtype, const int64_t* chunks, int64_t num_chunks,
                  const int64_t* layer_ptr, const int64_t* layer_chunks, int64_t num_layers,
                  float* partial, double* out, cudaStream_t stream);

// The fused update. finite (bool), the per-tensor step counters (via ptrs), clip_coef, alpha and
// beta1_layer (nullable: hyper.beta1 for every layer) are read from device memory inside the
// kernel: no host synchronisation, CUDA-graph capturable.
cudaError_t update(const int64_t* ptrs, int grad_dtype, const int64_t* chunks, int64_t num_chunks,
                   const bool* finite, const double* clip_coef, const double* alpha,
                   const double* beta1_layer, const Hyper& hyper, cudaStream_t stream);

}  // namespace stratopt_cuda
