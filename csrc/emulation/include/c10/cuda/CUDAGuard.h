// Stand-in for c10/cuda/CUDAGuard.h: there is one emulated device, so the guards only remember
// the device they were given (any device type is accepted, CPU tensors included).
#pragma once

#include <optional>

#include <c10/core/Device.h>
#include <c10/core/Stream.h>
#include <c10/cuda/CUDAStream.h>

namespace c10::cuda {

class CUDAGuard {
 public:
  explicit CUDAGuard(c10::Device device) : device_(device) {}
  explicit CUDAGuard(c10::DeviceIndex index) : device_(c10::DeviceType::CUDA, index) {}
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
  void set_device(c10::Device device) { device_ = device; }
  void reset_device(c10::Device device) { device_ = device; }
  void set_index(c10::DeviceIndex index) { device_ = c10::Device(device_.type(), index); }
  c10::Device original_device() const { return device_; }
  c10::Device current_device() const { return device_; }

 private:
  c10::Device device_;
};

class OptionalCUDAGuard {
 public:
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(std::optional<c10::Device> device) : device_(device) {}
  explicit OptionalCUDAGuard(std::optional<c10::DeviceIndex> index) {
    if (index) device_ = c10::Device(c10::DeviceType::CUDA, *index);
  }
  OptionalCUDAGuard(const OptionalCUDAGuard&) = delete;
  OptionalCUDAGuard& operator=(const OptionalCUDAGuard&) = delete;
  void set_device(c10::Device device) { device_ = device; }
  void reset_device(c10::Device device) { device_ = device; }
  void set_index(c10::DeviceIndex index) { device_ = c10::Device(c10::DeviceType::CUDA, index); }
  std::optional<c10::Device> original_device() const { return device_; }
  std::optional<c10::Device> current_device() const { return device_; }
  void reset() { device_.reset(); }

 private:
  std::optional<c10::Device> device_;
};

class CUDAStreamGuard {
 public:
  explicit CUDAStreamGuard(c10::Stream stream) : stream_(stream) {}
  CUDAStreamGuard(const CUDAStreamGuard&) = delete;
  CUDAStreamGuard& operator=(const CUDAStreamGuard&) = delete;
  void reset_stream(c10::Stream stream) { stream_ = stream; }
  CUDAStream original_stream() const { return CUDAStream(); }
  CUDAStream current_stream() const { return CUDAStream(); }

 private:
  c10::Stream stream_;
};

}  // namespace c10::cuda
