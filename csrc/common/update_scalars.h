// The per-fragment scalars of the fused update, derived in one place for both kernels: host
// code in the CPU op, device code in the CUDA kernel (whose inputs live in device memory, so
// the derivation runs on the device and a captured CUDA graph stays valid).
//
// Float64 maths, as the reference computes its 0-dim float64 tensors (stratopt_ds/ops/
// reference.py), then one rounding to float32, as torch does where such a scalar meets a
// float32 tensor. Plain C++ and <cmath> only: no torch and no CUDA headers.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define STRATOPT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define STRATOPT_HOST_DEVICE inline
#endif

namespace stratopt {

// What the elementwise update reads per fragment. A lerp weight w comes with 1 - w (rounded in
// float32, as ATen's lerp computes it) and with which of ATen's two lerp formulas applies.
struct FragScalars {
  float coef;          // clipping factor of the layer
  float w1, omw1;      // m1 lerp weight 1 - b1
  float w2, omw2;      // v lerp weight 1 - b2
  float w3, omw3;      // m2 lerp weight 1 - b3(t)
  float bc1, bc2;      // bias corrections 1 - b1^t, 1 - b2^t
  float a;             // slow-momentum weight a(t)
  float decay;         // 1 - lr * wd
  float step;          // -lr * alpha_l
  float eps;
  bool small1, small2, small3;
};

// The hyperparameters all fragments of one call share.
struct UpdateHyper {
  double beta2, eps, weight_decay, beta3, mix_alpha;
  int64_t t_alpha, t_beta3;
  // The slow momentum m2 exists only with mix_alpha > 0 (docs/ALGORITHMS.md section 4: no m2 is allocated).
  STRATOPT_HOST_DEVICE bool has_m2() const { return mix_alpha > 0.0; }
};

// b3(t) of docs/ALGORITHMS.md section 2: linear in half-life space from b1 to b3 over t_beta3 steps.
STRATOPT_HOST_DEVICE double beta3_at(double t, double b1, double b3, int64_t t_beta3) {
  if (t_beta3 <= 0) return b3;
  const double s = fmin(t / static_cast<double>(t_beta3), 1.0);
  const double ln_half = log(0.5);
  const double h = (1.0 - s) * (ln_half / log(b1) - 1.0) + s * (ln_half / log(b3) - 1.0);
  return pow(0.5, 1.0 / (h + 1.0));
}

STRATOPT_HOST_DEVICE void set_lerp_weight(double w, float& wf, float& omw, bool& small) {
  wf = static_cast<float>(w);
  omw = 1.0f - wf;  // one IEEE subtraction (the kernels build without FMA contraction)
  small = fabsf(wf) < 0.5f;
}

// t: the step counter (>= 1); b1: this layer's beta1; lr: the learning rate; coef, alpha: the
// layer's clipping factor and scale. (A skipped step never reads these: both kernels then leave
// p, m1, v, m2 untouched and only refresh the 16-bit copy.)
STRATOPT_HOST_DEVICE FragScalars frag_scalars(const UpdateHyper& h, double t, double b1, double lr,
                                              double coef, double alpha) {
  FragScalars s{};
  s.coef = static_cast<float>(coef);
  set_lerp_weight(1.0 - b1, s.w1, s.omw1, s.small1);
  set_lerp_weight(1.0 - h.beta2, s.w2, s.omw2, s.small2);
  s.bc1 = static_cast<float>(1.0 - pow(b1, t));
  s.bc2 = static_cast<float>(1.0 - pow(h.beta2, t));
  s.small3 = true;
  if (h.has_m2()) {
    s.a = static_cast<float>(h.t_alpha <= 0 ? h.mix_alpha
                                            : h.mix_alpha * fmin(t / static_cast<double>(h.t_alpha), 1.0));
    set_lerp_weight(1.0 - beta3_at(t, b1, h.beta3, h.t_beta3), s.w3, s.omw3, s.small3);
  }
  s.decay = static_cast<float>(1.0 - lr * h.weight_decay);
  s.step = static_cast<float>(-lr * alpha);
  s.eps = static_cast<float>(h.eps);
  return s;
}

}  // namespace stratopt
