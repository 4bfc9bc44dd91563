// Self-test of the c10 stand-ins (c10/cuda/*.h, ATen/cuda/CUDAContext.h): the torch glue's view
// of the emulator, without pybind. Built against torch's headers and libc10 (ctypes).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdio>

namespace {

__global__ void fill(int* out, int value) { out[threadIdx.x] = value; }

// Runs f; on a c10::Error returns 1 with its message (without backtrace) in msg.
template <typename F>
int catching(F f, char* msg, int cap) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    snprintf(msg, static_cast<size_t>(cap), "%s", e.what_without_backtrace());
    return 1;
  }
}

}  // namespace

extern "C" {

// A launch of `threads` threads on the current stream, checked as the project's kernels are.
int st_c10_launch(int* out, unsigned threads, char* msg, int cap) {
  return catching(
      [&] {
        c10::cuda::CUDAGuard guard(c10::Device(c10::DeviceType::CPU));
        const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
        fill<<<1, threads, 0, stream.stream()>>>(out, 7);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        fill<<<1, threads, 0, at::cuda::getCurrentCUDAStream()>>>(out, 8);  // converts to cudaStream_t
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      },
      msg, cap);
}

int st_c10_check(int err, char* msg, int cap) {
  return catching([&] { C10_CUDA_CHECK(static_cast<cudaError_t>(err)); }, msg, cap);
}

}  // extern "C"
