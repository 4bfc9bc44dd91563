// Torch glue of the StratOpt CUDA kernels: the argument checks shared with the CPU op
// (../common/op_checks.h), the current stream, the Python binding.
//
// The ops take the same tensor lists as the CPU op, which are checked here on the host, plus the
// device tables the kernels walk (pointer table, chunk rows, per-layer chunk lists), built from
// those same lists and cached by stratopt_ds/ops/dispatch.py. Nothing here reads device memory
// on the host, so a step needs no synchronisation and can be captured in a CUDA graph.
//
// STRATOPT_CUDA_DEVICE_TYPE is the device type the tensors must have: CUDA, except in the CPU
// emulation build (csrc/emulation), which runs this same file on CPU tensors.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <vector>

#include "../common/op_checks.h"
#include "stratopt_cuda.h"

#ifndef STRATOPT_CUDA_DEVICE_TYPE
#define STRATOPT_CUDA_DEVICE_TYPE c10::DeviceType::CUDA
#endif

namespace {

namespace checks = stratopt::checks;

void check_on_device(const c10::Device& dev) {
  TORCH_CHECK(dev.type() == STRATOPT_CUDA_DEVICE_TYPE, "stratopt cuda op: the tensors must be ",
              c10::DeviceTypeName(STRATOPT_CUDA_DEVICE_TYPE, /*lower_case=*/true), " tensors, got ", dev);
}

// The tables come from dispatch.py, not from users; still, a wrong one would make the kernels
// read wild addresses, so shape, dtype and device are checked (their contents match the lists
// by construction: dispatch builds both from the same tensors).
void check_table(const at::Tensor& t, const char* name, int64_t cols, int64_t rows, const c10::Device& dev) {
  TORCH_CHECK(t.defined() && t.device() == dev && t.scalar_type() == at::kLong && t.is_contiguous() &&
                  (cols == 0 ? t.dim() == 1 : (t.dim() == 2 && t.size(1) == cols)) && (rows < 0 || t.size(0) == rows),
              "stratopt cuda op: ", name, " must be a contiguous int64 table on ", dev, " with ",
              rows < 0 ? std::string("any number of") : std::to_string(rows), " rows",
              cols ? " of " + std::to_string(cols) : std::string(), ", got ",
              t.defined() ? c10::toString(t.scalar_type()) : "nothing", " of shape ",
              t.defined() ? t.sizes() : at::IntArrayRef{});
}

at::Tensor fragment_sumsq(const std::vector<at::Tensor>& grads, const at::Tensor& frags, int64_t num_layers,
                          const at::Tensor& ptrs, const at::Tensor& chunks, const at::Tensor& layer_ptr,
                          const at::Tensor& layer_chunks) {
  const checks::CheckedTensors c = checks::check_sumsq(grads, frags, num_layers);
  if (grads.empty()) return at::zeros({num_layers}, at::TensorOptions().dtype(at::kDouble));
  const c10::Device dev = c.device;
  check_on_device(dev);
  check_table(ptrs, "ptrs", stratopt_cuda::kPtrCols, static_cast<int64_t>(grads.size()), dev);
  check_table(chunks, "chunks", 4, -1, dev);
  check_table(layer_ptr, "layer_ptr", 0, num_layers + 1, dev);
  check_table(layer_chunks, "layer_chunks", 0, -1, dev);
  c10::cuda::CUDAGuard guard(dev);
  const int64_t n_chunks = chunks.size(0);
  const at::TensorOptions on_dev = at::TensorOptions().device(dev);
  at::Tensor partial = at::empty({std::max<int64_t>(n_chunks, 1)}, on_dev.dtype(at::kDouble));
  at::Tensor out = at::empty({num_layers}, on_dev.dtype(at::kDouble));
  stratopt_cuda::sumsq(ptrs.data_ptr<int64_t>(), chunks.data_ptr<int64_t>(), n_chunks, layer_ptr.data_ptr<int64_t>(),
                       layer_chunks.data_ptr<int64_t>(), num_layers, partial.data_ptr<double>(),
                       out.data_ptr<double>(), c10::cuda::getCurrentCUDAStream(dev.index()).stream());
  return out;
}

void fragment_update(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                     const std::vector<at::Tensor>& exp_avg_slows, const std::vector<at::Tensor>& steps,
                     const at::Tensor& frags, const at::Tensor& finite, const at::Tensor& clip_coef,
                     const at::Tensor& alpha, const std::optional<at::Tensor>& beta1_layer, double lr, double beta1,
                     double beta2, double eps, double weight_decay, double beta3, double mix_alpha,
                     int64_t t_alpha, int64_t t_beta3, const std::vector<std::optional<at::Tensor>>& half_out,
                     const at::Tensor& ptrs, const at::Tensor& chunks, const std::optional<at::Tensor>& lr_tensor) {
  const stratopt::UpdateHyper shared{beta2, eps, weight_decay, beta3, mix_alpha, t_alpha, t_beta3};
  const checks::CheckedTensors c = checks::check_update(params, grads, exp_avgs, exp_avg_sqs, exp_avg_slows, steps,
                                                        frags, finite, clip_coef, alpha, beta1_layer, half_out,
                                                        shared.has_m2());
  if (params.empty()) return;
  const c10::Device dev = c.device;
  check_on_device(dev);
  check_table(ptrs, "ptrs", stratopt_cuda::kPtrCols, static_cast<int64_t>(params.size()), dev);
  check_table(chunks, "chunks", 4, -1, dev);
  stratopt_cuda::Hyper h{shared, lr, beta1};
  if (lr_tensor.has_value() && lr_tensor->defined()) {
    TORCH_CHECK(lr_tensor->numel() == 1 && lr_tensor->scalar_type() == at::kDouble && lr_tensor->device() == dev,
                "stratopt op: lr_tensor must be one float64 value on ", dev, ", got ", lr_tensor->scalar_type(),
                " with ", lr_tensor->numel(), " element(s) on ", lr_tensor->device());
    h.lr_device = lr_tensor->data_ptr<double>();
  }
  c10::cuda::CUDAGuard guard(dev);
  const int64_t n_chunks = chunks.size(0);
  at::Tensor scalars = at::empty({std::max<int64_t>(n_chunks, 1) * static_cast<int64_t>(sizeof(stratopt::FragScalars))},
                                 at::TensorOptions().device(dev).dtype(at::kByte));
  stratopt_cuda::update(ptrs.data_ptr<int64_t>(), chunks.data_ptr<int64_t>(), n_chunks, finite.data_ptr<bool>(),
                        clip_coef.data_ptr<double>(), alpha.data_ptr<double>(),
                        beta1_layer.has_value() && beta1_layer->defined() ? beta1_layer->data_ptr<double>() : nullptr,
                        h, reinterpret_cast<stratopt::FragScalars*>(scalars.data_ptr()),
                        c10::cuda::getCurrentCUDAStream(dev.index()).stream());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "StratOpt native CUDA kernels (multi-tensor / flat-with-segments)";
  m.attr("KIND") = "cuda";  // the dispatcher calls an op by its kind (the emulation runs it on CPU tensors)
  m.attr("CHUNK") = stratopt_cuda::kChunk;
  m.attr("PTR_COLS") = static_cast<int64_t>(stratopt_cuda::kPtrCols);
  m.def("fragment_sumsq", &fragment_sumsq, py::arg("grads"), py::arg("frags"), py::arg("num_layers"), py::arg("ptrs"),
        py::arg("chunks"), py::arg("layer_ptr"), py::arg("layer_chunks"));
  m.def("fragment_update", &fragment_update, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
        py::arg("exp_avg_sqs"), py::arg("exp_avg_slows"), py::arg("steps"), py::arg("frags"), py::arg("finite"),
        py::arg("clip_coef"), py::arg("alpha"), py::arg("beta1_layer"), py::arg("lr"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("beta3"), py::arg("mix_alpha"),
        py::arg("t_alpha"), py::arg("t_beta3"), py::arg("half_out"), py::arg("ptrs"), py::arg("chunks"),
        py::arg("lr_tensor") = py::none());
}
