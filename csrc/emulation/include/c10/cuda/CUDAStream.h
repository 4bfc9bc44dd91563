// Stand-in for c10/cuda/CUDAStream.h: the emulator has one in-order stream, the null stream.
// Tensors of an emulated op live on the CPU, so the stream's device is the CPU.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/Stream.h>
#include <cuda_runtime.h>

namespace c10::cuda {

class CUDAStream {
 public:
  explicit CUDAStream(c10::DeviceIndex device_index = 0) : index_(device_index) {}
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return stream(); }
  c10::DeviceIndex device_index() const { return index_; }
  c10::Device device() const { return c10::Device(c10::DeviceType::CPU); }
  c10::StreamId id() const { return 0; }
  int priority() const { return 0; }
  bool query() const { return true; }    // every launch has completed when it returns
  void synchronize() const {}
  c10::Stream unwrap() const { return c10::Stream(c10::Stream::DEFAULT, device()); }
  operator c10::Stream() const { return unwrap(); }
  bool operator==(const CUDAStream& other) const { return index_ == other.index_; }
  bool operator!=(const CUDAStream& other) const { return !(*this == other); }

 private:
  c10::DeviceIndex index_;
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex device_index = -1) {
  return CUDAStream(device_index < 0 ? 0 : device_index);
}
inline CUDAStream getDefaultCUDAStream(c10::DeviceIndex device_index = -1) {
  return getCurrentCUDAStream(device_index);
}
inline CUDAStream getStreamFromPool(bool /*is_high_priority*/ = false, c10::DeviceIndex device_index = -1) {
  return getCurrentCUDAStream(device_index);
}
inline void setCurrentCUDAStream(CUDAStream) {}

}  // namespace c10::cuda
