// Argument checks of the StratOpt ops, shared by the CPU op (csrc/cpu) and the CUDA op's glue
// (csrc/cuda/stratopt_cuda_binding.cpp): one set of rules and one set of messages, so a bad call
// fails the same way on every device, on the host, before any kernel touches memory.
//
// Every tensor of a call must be on one device (that of the first parameter or gradient),
// contiguous (the kernels walk tensors as flat memory from their address) and of the dtype the
// kernels read: params and states float32, gradients float32/bfloat16/float16, 16-bit copies
// bfloat16/float16, step counters one float64 value, per-layer vectors float64 of length L, the
// finite flag one bool. Fragment rows live on the host and are checked against the tensors.
// Nothing is converted here: a conversion would hide a caller's bug, cost a copy per step and
// give a CUDA graph a tensor it does not own.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

namespace stratopt {
namespace checks {

// Names an argument in error messages ("grads[3]"). Formatted only when a check fails: building
// strings for every tensor of every call costs tens of microseconds per step.
struct ArgName {
  const char* name;
  int64_t index = -1;  // -1: not an element of a list
};

inline std::ostream& operator<<(std::ostream& os, const ArgName& a) {
  os << a.name;
  if (a.index >= 0) os << "[" << a.index << "]";
  return os;
}

inline void check_tensor(const at::Tensor& t, const ArgName& name, const c10::Device& dev) {
  TORCH_CHECK(t.defined(), "stratopt op: ", name, " is undefined");
  TORCH_CHECK(t.device() == dev, "stratopt op: ", name, " is on ", t.device(),
              " but the call's tensors are on ", dev, "; every tensor of one call must be on one device");
  TORCH_CHECK(t.is_contiguous(), "stratopt op: ", name, " must be contiguous (got strides ", t.strides(),
              "); call .contiguous() first");
}

inline void check_numel(const at::Tensor& t, const ArgName& name, int64_t numel) {
  TORCH_CHECK(t.numel() == numel, "stratopt op: ", name, " has ", t.numel(), " elements, the parameter has ",
              numel);
}

// The kernels' gradient dtype code: 0 float32, 1 bfloat16, 2 float16.
inline int grad_code(const at::Tensor& g, const ArgName& name) {
  switch (g.scalar_type()) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default:
      TORCH_CHECK(false, "stratopt op: ", name, " must be float32, bfloat16 or float16, got ", g.scalar_type());
  }
  return 0;
}

// The kernels' copy dtype code: 1 bfloat16, 2 float16.
inline int copy_code(const at::Tensor& o, const ArgName& name) {
  TORCH_CHECK(o.scalar_type() == at::kBFloat16 || o.scalar_type() == at::kHalf, "stratopt op: ", name,
              " must be bfloat16 or float16, got ", o.scalar_type());
  return o.scalar_type() == at::kBFloat16 ? 1 : 2;
}

inline void check_f32(const at::Tensor& t, const ArgName& name, const c10::Device& dev, int64_t numel) {
  check_tensor(t, name, dev);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "stratopt op: ", name, " must be float32, got ", t.scalar_type());
  check_numel(t, name, numel);
}

// A step counter is read on the device by the CUDA kernel (no host sync, graph-replayable) as a
// double: a float32 counter would be misread and a host one unreadable, so both are refused.
inline void check_step(const at::Tensor& t, const ArgName& name, const c10::Device& dev) {
  TORCH_CHECK(t.defined(), "stratopt op: ", name, " is undefined");
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kDouble && t.device() == dev, "stratopt op: ", name,
              " must be a one-element float64 step counter on ", dev, ", got ", t.scalar_type(), " with ",
              t.numel(), " element(s) on ", t.device());
}

inline void check_layer_vector(const at::Tensor& t, const char* name, int64_t num_layers, const c10::Device& dev) {
  TORCH_CHECK(t.defined(), "stratopt op: ", name, " is undefined");
  TORCH_CHECK(t.dim() == 1 && t.numel() == num_layers && t.scalar_type() == at::kDouble && t.device() == dev &&
                  t.is_contiguous(),
              "stratopt op: ", name, " must be a contiguous float64 vector of length ", num_layers,
              " (one per layer) on ", dev, ", got ", t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
}

inline void check_flag(const at::Tensor& t, const c10::Device& dev) {
  TORCH_CHECK(t.defined() && t.numel() == 1 && t.scalar_type() == at::kBool && t.device() == dev,
              "stratopt op: finite must be one bool on ", dev, ", got ",
              t.defined() ? c10::toString(t.scalar_type()) : "nothing", " with ", t.defined() ? t.numel() : 0,
              " element(s)", t.defined() ? " on " : "", t.defined() ? t.device().str() : std::string());
}

// frags: host int64 (F, 4) rows (tensor, start, length, layer), each checked against the tensors.
inline const int64_t* checked_frags(const at::Tensor& frags, const std::vector<int64_t>& numels, int64_t num_layers) {
  TORCH_CHECK(frags.defined() && frags.device().is_cpu() && frags.scalar_type() == at::kLong && frags.dim() == 2 &&
                  frags.size(1) == 4 && frags.is_contiguous(),
              "stratopt op: frags must be a contiguous int64 CPU tensor of shape (F, 4) with rows "
              "(tensor, start, length, layer)");
  const int64_t* f = frags.data_ptr<int64_t>();
  const int64_t n_t = static_cast<int64_t>(numels.size());
  for (int64_t i = 0; i < frags.size(0); ++i) {
    const int64_t t = f[4 * i], s = f[4 * i + 1], l = f[4 * i + 2], layer = f[4 * i + 3];
    TORCH_CHECK(t >= 0 && t < n_t, "stratopt op: frags row ", i, " names tensor ", t, " of ", n_t);
    int64_t end = 0;
    const bool overflows = __builtin_add_overflow(s, l, &end);  // a bogus length must not wrap around
    TORCH_CHECK(s >= 0 && l >= 0 && !overflows && end <= numels[t], "stratopt op: frags row ", i, " [", s, ", ",
                overflows ? std::string("overflow") : std::to_string(end), ") is outside tensor ", t, " of ",
                numels[t], " elements");
    TORCH_CHECK(layer >= 0 && layer < num_layers, "stratopt op: frags row ", i, " layer ", layer,
                " is outside [0, ", num_layers, ")");
  }
  return f;
}

// What a checked call tells the kernels about each tensor.
struct CheckedTensors {
  c10::Device device{c10::kCPU};
  std::vector<int64_t> numels;
  std::vector<int> grad_codes;  // 0 float32, 1 bfloat16, 2 float16
  std::vector<int> copy_codes;  // 0 no 16-bit copy, 1 bfloat16, 2 float16 (update only)
};

inline CheckedTensors check_sumsq(const std::vector<at::Tensor>& grads, const at::Tensor& frags,
                                  int64_t num_layers) {
  TORCH_CHECK(num_layers >= 0, "stratopt op: num_layers must be >= 0, got ", num_layers);
  CheckedTensors c;
  if (!grads.empty() && grads[0].defined()) c.device = grads[0].device();
  for (size_t i = 0; i < grads.size(); ++i) {
    const ArgName name{"grads", static_cast<int64_t>(i)};
    check_tensor(grads[i], name, c.device);
    c.grad_codes.push_back(grad_code(grads[i], name));
    c.numels.push_back(grads[i].numel());
  }
  checked_frags(frags, c.numels, num_layers);
  return c;
}

inline CheckedTensors check_update(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                                   const std::vector<at::Tensor>& exp_avgs,
                                   const std::vector<at::Tensor>& exp_avg_sqs,
                                   const std::vector<at::Tensor>& exp_avg_slows,
                                   const std::vector<at::Tensor>& steps, const at::Tensor& frags,
                                   const at::Tensor& finite, const at::Tensor& clip_coef, const at::Tensor& alpha,
                                   const std::optional<at::Tensor>& beta1_layer,
                                   const std::vector<std::optional<at::Tensor>>& half_out, bool has_m2) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
              "stratopt op: params, grads, exp_avgs, exp_avg_sqs and steps must have the same length (", n, ", ",
              grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", steps.size(), ")");
  TORCH_CHECK(!has_m2 || exp_avg_slows.size() == n, "stratopt op: mix_alpha > 0 needs one exp_avg_slow per "
              "parameter, got ", exp_avg_slows.size(), " for ", n);
  TORCH_CHECK(half_out.empty() || half_out.size() == n, "stratopt op: half_out must be empty or have one entry "
              "(tensor or None) per parameter, got ", half_out.size(), " for ", n);
  CheckedTensors c;
  if (n > 0 && params[0].defined()) c.device = params[0].device();
  const c10::Device dev = c.device;
  for (size_t i = 0; i < n; ++i) {
    const int64_t k = static_cast<int64_t>(i);
    TORCH_CHECK(params[i].defined(), "stratopt op: ", ArgName{"params", k}, " is undefined");
    const int64_t numel = params[i].numel();
    check_f32(params[i], {"params", k}, dev, numel);
    check_tensor(grads[i], {"grads", k}, dev);
    check_numel(grads[i], {"grads", k}, numel);
    c.grad_codes.push_back(grad_code(grads[i], {"grads", k}));
    check_f32(exp_avgs[i], {"exp_avgs", k}, dev, numel);
    check_f32(exp_avg_sqs[i], {"exp_avg_sqs", k}, dev, numel);
    if (has_m2) check_f32(exp_avg_slows[i], {"exp_avg_slows", k}, dev, numel);
    check_step(steps[i], {"steps", k}, dev);
    int copy = 0;
    if (!half_out.empty() && half_out[i].has_value() && half_out[i]->defined()) {
      const at::Tensor& o = *half_out[i];
      check_tensor(o, {"half_out", k}, dev);
      copy = copy_code(o, {"half_out", k});
      check_numel(o, {"half_out", k}, numel);
    }
    c.copy_codes.push_back(copy);
    c.numels.push_back(numel);
  }
  const int64_t num_layers = clip_coef.defined() ? clip_coef.numel() : 0;
  check_layer_vector(clip_coef, "clip_coef", num_layers, dev);
  check_layer_vector(alpha, "alpha", num_layers, dev);
  if (beta1_layer.has_value() && beta1_layer->defined()) check_layer_vector(*beta1_layer, "beta1_layer", num_layers, dev);
  check_flag(finite, dev);
  checked_frags(frags, c.numels, num_layers);
  return c;
}

}  // namespace checks
}  // namespace stratopt
