// Stand-in for ATen/cuda/CUDAContext.h: the stream accessors of the emulator's one device.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

namespace at::cuda {
using c10::cuda::CUDAStream;
using c10::cuda::getCurrentCUDAStream;
using c10::cuda::getDefaultCUDAStream;
using c10::cuda::getStreamFromPool;
using c10::cuda::setCurrentCUDAStream;
inline int warp_size() { return 32; }
}  // namespace at::cuda
