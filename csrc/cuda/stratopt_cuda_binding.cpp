// Torch glue of the StratOpt CUDA kernels: argument checks, the current stream, Python binding.
// The tables (pointer table, chunk rows, per-layer chunk lists) are built and cached by
// stratopt_ds/ops/dispatch.py; nothing here reads device memory on the host.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>

#include "stratopt_cuda.h"

namespace {

void check_dev(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Device& dev) {
  TORCH_CHECK(t.defined(), "stratopt cuda op: ", name, " is undefined");
  TORCH_CHECK(t.device() == dev, "stratopt cuda op: ", name, " must be on ", dev, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "stratopt cuda op: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "stratopt cuda op: ", name, " must be contiguous");
}

void check_table(const at::Tensor& t, const char* name, int64_t cols, const at::Device& dev) {
  check_dev(t, name, at::kLong, dev);
  TORCH_CHECK(t.dim() == 2 && t.size(1) == cols, "stratopt cuda op: ", name, " must have shape (n, ",
              cols, "), got ", t.sizes());
}

at::Tensor sumsq(const at::Tensor& ptrs, int64_t grad_dtype, const at::Tensor& chunks,
                 const at::Tensor& layer_ptr, const at::Tensor& layer_chunks, int64_t num_layers) {
  const at::Device dev = ptrs.device();
  TORCH_CHECK(dev.is_cuda(), "stratopt cuda op: ptrs must be a CUDA tensor");
  check_table(ptrs, "ptrs", stratopt_cuda::kPtrCols, dev);
  check_table(chunks, "chunks", 4, dev);
  check_dev(layer_ptr, "layer_ptr", at::kLong, dev);
  check_dev(layer_chunks, "layer_chunks", at::kLong, dev);
  TORCH_CHECK(layer_ptr.numel() == num_layers + 1, "stratopt cuda op: layer_ptr needs num_layers + 1 entries");
  TORCH_CHECK(grad_dtype >= 0 && grad_dtype <= 2, "stratopt cuda op: grad_dtype must be 0, 1 or 2");
  c10::cuda::CUDAGuard guard(dev);
  const int64_t n_chunks = chunks.size(0);
  at::Tensor partial = at::empty({std::max<int64_t>(n_chunks, 1)}, ptrs.options().dtype(at::kFloat));
  at::Tensor out = at::empty({num_layers}, ptrs.options().dtype(at::kDouble));
  const cudaError_t err = stratopt_cuda::sumsq(
      ptrs.data_ptr<int64_t>(), static_cast<int>(grad_dtype), chunks.data_ptr<int64_t>(), n_chunks,
      layer_ptr.data_ptr<int64_t>(), layer_chunks.data_ptr<int64_t>(), num_layers,
      partial.data_ptr<float>(), out.data_ptr<double>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "stratopt cuda op: sumsq launch failed: ", cudaGetErrorString(err));
  return out;
}

void update(const at::Tensor& ptrs, int64_t grad_dtype, const at::Tensor& chunks, const at::Tensor& finite,
            const at::Tensor& clip_coef, const at::Tensor& alpha,
            const std::optional<at::Tensor>& beta1_layer, double lr, double beta1, double beta2,
            double eps, double weight_decay, double beta3, double mix_alpha, int64_t t_alpha,
            int64_t t_beta3, int64_t out_type, const std::optional<at::Tensor>& lr_tensor) {
  const at::Device dev = ptrs.device();
  TORCH_CHECK(dev.is_cuda(), "stratopt cuda op: ptrs must be a CUDA tensor");
  check_table(ptrs, "ptrs", stratopt_cuda::kPtrCols, dev);
  check_table(chunks, "chunks", 4, dev);
  check_dev(finite, "finite", at::kBool, dev);
  TORCH_CHECK(finite.numel() == 1, "stratopt cuda op: finite must hold one flag");
  check_dev(clip_coef, "clip_coef", at::kDouble, dev);
  check_dev(alpha, "alpha", at::kDouble, dev);
  TORCH_CHECK(alpha.numel() == clip_coef.numel(), "stratopt cuda op: alpha and clip_coef lengths differ");
  const double* b1 = nullptr;
  if (beta1_layer.has_value() && beta1_layer->defined()) {
    check_dev(*beta1_layer, "beta1_layer", at::kDouble, dev);
    TORCH_CHECK(beta1_layer->numel() == clip_coef.numel(), "stratopt cuda op: beta1_layer length differs");
    b1 = beta1_layer->data_ptr<double>();
  }
  TORCH_CHECK(grad_dtype >= 0 && grad_dtype <= 2, "stratopt cuda op: grad_dtype must be 0, 1 or 2");
  c10::cuda::CUDAGuard guard(dev);
  TORCH_CHECK(out_type >= 0 && out_type <= 2, "stratopt cuda op: out_type must be 0, 1 or 2");
  stratopt_cuda::Hyper h{{beta2, eps, weight_decay, beta3, mix_alpha, t_alpha, t_beta3}, lr, beta1,
                         static_cast<int>(out_type)};
  if (lr_tensor.has_value() && lr_tensor->defined()) {
    check_dev(*lr_tensor, "lr_tensor", at::kDouble, dev);
    TORCH_CHECK(lr_tensor->numel() == 1, "stratopt cuda op: lr_tensor must hold one value");
    h.lr_device = lr_tensor->data_ptr<double>();
  }
  const cudaError_t err = stratopt_cuda::update(
      ptrs.data_ptr<int64_t>(), static_cast<int>(grad_dtype), chunks.data_ptr<int64_t>(), chunks.size(0),
      finite.data_ptr<bool>(), clip_coef.data_ptr<double>(), alpha.data_ptr<double>(), b1, h,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "stratopt cuda op: update launch failed: ", cudaGetErrorString(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "StratOpt native CUDA kernels (multi-tensor / flat-with-segments)";
  m.attr("CHUNK") = stratopt_cuda::kChunk;
  m.def("sumsq", &sumsq, py::arg("ptrs"), py::arg("grad_dtype"), py::arg("chunks"),
        py::arg("layer_ptr"), py::arg("layer_chunks"), py::arg("num_layers"));
  m.def("update", &update, py::arg("ptrs"), py::arg("grad_dtype"), py::arg("chunks"), py::arg("finite"),
        py::arg("clip_coef"), py::arg("alpha"), py::arg("beta1_layer"), py::arg("lr"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("beta3"), py::arg("mix_alpha"),
        py::arg("t_alpha"), py::arg("t_beta3"), py::arg("out_type"),
        py::arg("lr_tensor") = py::none());
}
