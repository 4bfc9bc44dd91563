// Stand-in for c10/cuda/CUDAException.h (shadows the CPU torch wheel's copy, which needs the
// real CUDA headers). Errors become c10::Error, i.e. a RuntimeError in Python, with the
// emulator's detail (kernel, block, thread, what went wrong) in the message.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define C10_CUDA_CHECK(EXPR)                                                              \
  do {                                                                                    \
    const cudaError_t emu_cuda_err_ = (EXPR);                                             \
    TORCH_CHECK(emu_cuda_err_ == cudaSuccess, "CUDA error: ", cudaGetErrorName(emu_cuda_err_), \
                ": ", cudaGetErrorString(emu_cuda_err_));                                 \
  } while (0)

#define C10_CUDA_CHECK_WARN(EXPR)                                                         \
  do {                                                                                    \
    const cudaError_t emu_cuda_err_ = (EXPR);                                             \
    if (emu_cuda_err_ != cudaSuccess) {                                                   \
      (void)cudaGetLastError();                                                           \
      TORCH_WARN("CUDA warning: ", cudaGetErrorString(emu_cuda_err_));                    \
    }                                                                                     \
  } while (0)

// After a launch: a refused or failed launch throws (and the sticky error is cleared).
#define C10_CUDA_KERNEL_LAUNCH_CHECK()                                                    \
  do {                                                                                    \
    const cudaError_t emu_cuda_err_ = cudaGetLastError();                                 \
    TORCH_CHECK(emu_cuda_err_ == cudaSuccess, "CUDA kernel launch failed: ",              \
                cudaGetErrorName(emu_cuda_err_), ": ", cudaGetErrorString(emu_cuda_err_)); \
  } while (0)

#define C10_CUDA_IGNORE_ERROR(EXPR)   \
  do {                                \
    (void)(EXPR);                     \
    (void)cudaGetLastError();         \
  } while (0)
#define C10_CUDA_CLEAR_ERROR() ((void)cudaGetLastError())
#define C10_CUDA_ERROR_HANDLED(EXPR) (EXPR)
