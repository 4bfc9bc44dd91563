// StratOpt native CPU op: per-layer sums of squares over fragments, and the fused update.
//
// Contract: identical maths to stratopt_ds/ops/reference.py (docs/ALGORITHMS.md section 9); see
// stratopt_ds/ops/dispatch.py for the Python signatures.
//
// * Work is cut into fixed-size blocks of one fragment each (a fragment is a run
//   [start, start+length) of one tensor belonging to one layer). One parallel region covers
//   every block of every tensor of the call; the split of blocks over threads cannot change a
//   result because the update is elementwise and the reductions are fixed per block.
// * Sums of squares: fp32 inside a block (64 fixed lanes, see the .inc), fp64 across the blocks
//   of a fragment and across the fragments of a layer, in table order: reruns, thread counts
//   and ISAs all give the same bits.
// * SIMD: the kernel bodies are compiled three times (AVX-512, AVX2+FMA+F16C, portable) and the
//   best one the running CPU supports is picked once at load time (STRATOPT_CPU_ISA=avx512|
//   avx2|scalar forces one). Built with -ffp-contract=off so no variant fuses an add into a
//   multiply where the reference does not.
// Narrow includes (not <torch/extension.h>) keep the JIT build short.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../common/op_checks.h"
#include "../common/update_scalars.h"

namespace stratopt_cpu {

namespace checks = stratopt::checks;

constexpr int kLanes = 64;              // fp32 lanes of one block reduction
constexpr int64_t kSumBlock = 4096;     // elements per sum-of-squares block
constexpr int64_t kUpdateBlock = 8192;  // elements per update block

static inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

static inline float half_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

// IEEE round to nearest even, overflow to inf: what float32 -> float16 conversion in torch does.
static inline uint16_t float_to_half(float f) { return c10::detail::fp16_ieee_from_fp32_value(f); }

// Round to nearest even, NaN -> 0x7FC0: what float32 -> bfloat16 conversion in torch does.
static inline uint16_t float_to_bf16(float f) {
  if (std::isnan(f)) return UINT16_C(0x7FC0);
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint32_t bias = ((bits >> 16) & 1u) + UINT32_C(0x7FFF);
  return static_cast<uint16_t>((bits + bias) >> 16);
}

// ---- work lists ----------------------------------------------------------------------------

struct BlockRef {
  int64_t tensor, frag, begin, length;
};

struct BlockList {
  int64_t block_size = 1;
  std::vector<int64_t> first_block{0};  // per fragment, prefix sum of block counts (F + 1)
  std::vector<int64_t> f_tensor, f_start, f_len;

  void add(int64_t tensor, int64_t start, int64_t len) {
    f_tensor.push_back(tensor);
    f_start.push_back(start);
    f_len.push_back(len);
    first_block.push_back(first_block.back() + (len + block_size - 1) / block_size);
  }
  int64_t num_blocks() const { return first_block.back(); }
  BlockRef block(int64_t b) const {
    const auto it = std::upper_bound(first_block.begin(), first_block.end(), b);
    const int64_t f = (it - first_block.begin()) - 1;  // skips empty fragments
    const int64_t off = (b - first_block[f]) * block_size;
    return {f_tensor[f], f, f_start[f] + off, std::min(block_size, f_len[f] - off)};
  }
};

struct TensorRef {
  const void* grad;
  int gtype;  // 0 float32, 1 bfloat16, 2 float16
};

struct SumsqPlan : BlockList {
  std::vector<TensorRef> tensors;
};

struct UpdateTensor {
  float* param;
  const void* grad;
  int gtype;
  float* m1;
  float* v;
  float* m2;          // nullptr: no slow momentum
  uint16_t* out16;    // nullptr: no 16-bit copy of the updated weights
  int out_type;       // of out16: 1 bfloat16, 2 float16
};

using stratopt::FragScalars;  // per-fragment scalars, derived in ../common/update_scalars.h

struct UpdatePlan : BlockList {
  std::vector<UpdateTensor> tensors;
  std::vector<FragScalars> scalars;  // per fragment
};

// ---- ISA variants ----------------------------------------------------------------------------

#if defined(__clang__)
#define STRATOPT_TARGET_BEGIN(x) \
  _Pragma("clang attribute push(__attribute__((target(" #x "))), apply_to = function)")
#define STRATOPT_TARGET_END _Pragma("clang attribute pop")
#else
#define STRATOPT_PRAGMA(x) _Pragma(#x)
#define STRATOPT_TARGET_BEGIN(x) STRATOPT_PRAGMA(GCC push_options) STRATOPT_PRAGMA(GCC target(x))
#define STRATOPT_TARGET_END STRATOPT_PRAGMA(GCC pop_options)
#endif

STRATOPT_TARGET_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace isa_avx512 {
struct V {
  using T = __m512;
  static constexpr int W = 16;
  static inline T zero() { return _mm512_setzero_ps(); }
  static inline T set1(float x) { return _mm512_set1_ps(x); }
  static inline T load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, T x) { _mm512_storeu_ps(p, x); }
  static inline T load_bf16(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static inline T load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline void store_bf16(uint16_t* p, T x) {
    const __m512i b = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    r = _mm512_srli_epi32(r, 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static inline void store_f16(uint16_t* p, T x) {  // F16C: IEEE RNE, overflow to inf
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static inline T add(T a, T b) { return _mm512_add_ps(a, b); }
  static inline T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static inline T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static inline T div(T a, T b) { return _mm512_div_ps(a, b); }
  static inline T sqrt(T a) { return _mm512_sqrt_ps(a); }
  static inline T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }    // a*b + c
  static inline T fnmadd(T a, T b, T c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a*b
};
#include "stratopt_cpu_kernels.inc"
}  // namespace isa_avx512
STRATOPT_TARGET_END

STRATOPT_TARGET_BEGIN("avx2,fma,f16c")
namespace isa_avx2 {
struct V {
  using T = __m256;
  static constexpr int W = 8;
  static inline T zero() { return _mm256_setzero_ps(); }
  static inline T set1(float x) { return _mm256_set1_ps(x); }
  static inline T load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, T x) { _mm256_storeu_ps(p, x); }
  static inline T load_bf16(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static inline T load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline void store_bf16(uint16_t* p, T x) {
    const __m256i b = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    r = _mm256_srli_epi32(r, 16);
    const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    r = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0)), nan));
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  static inline void store_f16(uint16_t* p, T x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static inline T add(T a, T b) { return _mm256_add_ps(a, b); }
  static inline T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static inline T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static inline T div(T a, T b) { return _mm256_div_ps(a, b); }
  static inline T sqrt(T a) { return _mm256_sqrt_ps(a); }
  static inline T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static inline T fnmadd(T a, T b, T c) { return _mm256_fnmadd_ps(a, b, c); }
};
#include "stratopt_cpu_kernels.inc"
}  // namespace isa_avx2
STRATOPT_TARGET_END

namespace isa_scalar {
struct V {  // one float per "vector": the portable fallback, same operation sequence
  using T = float;
  static constexpr int W = 1;
  static inline T zero() { return 0.0f; }
  static inline T set1(float x) { return x; }
  static inline T load(const float* p) { return *p; }
  static inline void store(float* p, T x) { *p = x; }
  static inline T load_bf16(const uint16_t* p) { return bf16_to_float(*p); }
  static inline T load_f16(const uint16_t* p) { return half_to_float(*p); }
  static inline void store_bf16(uint16_t* p, T x) { *p = float_to_bf16(x); }
  static inline void store_f16(uint16_t* p, T x) { *p = float_to_half(x); }
  static inline T add(T a, T b) { return a + b; }
  static inline T sub(T a, T b) { return a - b; }
  static inline T mul(T a, T b) { return a * b; }
  static inline T div(T a, T b) { return a / b; }
  static inline T sqrt(T a) { return std::sqrt(a); }
  static inline T fmadd(T a, T b, T c) { return std::fma(a, b, c); }
  static inline T fnmadd(T a, T b, T c) { return std::fma(-a, b, c); }
};
#include "stratopt_cpu_kernels.inc"
}  // namespace isa_scalar

// ---- ISA selection ---------------------------------------------------------------------------

enum class Isa { kScalar, kAvx2, kAvx512 };

static Isa detect_isa() {
  const char* forced = std::getenv("STRATOPT_CPU_ISA");
  __builtin_cpu_init();
  const bool has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("fma");
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (forced != nullptr && *forced != '\0') {
    const std::string f(forced);
    if (f == "scalar") return Isa::kScalar;
    if (f == "avx2") {
      TORCH_CHECK(has2, "STRATOPT_CPU_ISA=avx2 but this CPU lacks AVX2/FMA/F16C");
      return Isa::kAvx2;
    }
    if (f == "avx512") {
      TORCH_CHECK(has512, "STRATOPT_CPU_ISA=avx512 but this CPU lacks AVX-512 F/BW/VL/DQ");
      return Isa::kAvx512;
    }
    TORCH_CHECK(false, "STRATOPT_CPU_ISA must be avx512, avx2 or scalar, got '", f, "'");
  }
  return has512 ? Isa::kAvx512 : (has2 ? Isa::kAvx2 : Isa::kScalar);
}

static Isa isa() {
  static const Isa chosen = detect_isa();
  return chosen;
}

static std::string isa_name() {
  switch (isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

// ---- argument checks: ../common/op_checks.h (shared with the CUDA op) -------------------------

static void check_on_cpu(const c10::Device& dev) {
  TORCH_CHECK(dev.is_cpu(), "stratopt cpu op: the tensors must be CPU tensors, got ", dev);
}

// ---- sums of squares -------------------------------------------------------------------------

at::Tensor fragment_sumsq(const std::vector<at::Tensor>& grads, const at::Tensor& frags,
                          int64_t num_layers) {
  const checks::CheckedTensors c = checks::check_sumsq(grads, frags, num_layers);
  check_on_cpu(c.device);
  SumsqPlan plan;
  plan.block_size = kSumBlock;
  for (size_t i = 0; i < grads.size(); ++i) plan.tensors.push_back({grads[i].data_ptr(), c.grad_codes[i]});
  const int64_t* f = frags.data_ptr<int64_t>();
  const int64_t n_frags = frags.size(0);
  for (int64_t i = 0; i < n_frags; ++i) plan.add(f[4 * i], f[4 * i + 1], f[4 * i + 2]);

  std::vector<float> partial(static_cast<size_t>(plan.num_blocks()));
  switch (isa()) {
    case Isa::kAvx512: isa_avx512::sumsq_blocks(plan, partial.data()); break;
    case Isa::kAvx2: isa_avx2::sumsq_blocks(plan, partial.data()); break;
    default: isa_scalar::sumsq_blocks(plan, partial.data()); break;
  }
  at::Tensor out = at::zeros({num_layers}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t i = 0; i < n_frags; ++i) {  // fixed order: blocks of a fragment, then fragments
    double s = 0.0;
    for (int64_t b = plan.first_block[i]; b < plan.first_block[i + 1]; ++b) s += partial[b];
    o[f[4 * i + 3]] += s;
  }
  return out;
}

// ---- the fused update ------------------------------------------------------------------------

void fragment_update(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                     const std::vector<at::Tensor>& exp_avg_slows, const std::vector<at::Tensor>& steps,
                     const at::Tensor& frags, const at::Tensor& finite, const at::Tensor& clip_coef,
                     const at::Tensor& alpha, const std::optional<at::Tensor>& beta1_layer, double lr,
                     double beta1, double beta2, double eps, double weight_decay, double beta3,
                     double mix_alpha, int64_t t_alpha, int64_t t_beta3,
                     const std::vector<std::optional<at::Tensor>>& half_out) {
  const stratopt::UpdateHyper hyper{beta2, eps, weight_decay, beta3, mix_alpha, t_alpha, t_beta3};
  const bool has_m2 = hyper.has_m2();
  const checks::CheckedTensors c = checks::check_update(params, grads, exp_avgs, exp_avg_sqs, exp_avg_slows, steps,
                                                        frags, finite, clip_coef, alpha, beta1_layer, half_out,
                                                        has_m2);
  check_on_cpu(c.device);
  const bool is_finite = *finite.const_data_ptr<bool>();

  UpdatePlan plan;
  plan.block_size = kUpdateBlock;
  std::vector<double> t_of;
  for (size_t i = 0; i < params.size(); ++i) {
    UpdateTensor u{params[i].data_ptr<float>(), grads[i].data_ptr(), c.grad_codes[i],
                   exp_avgs[i].data_ptr<float>(), exp_avg_sqs[i].data_ptr<float>(), nullptr, nullptr, 0};
    if (has_m2) u.m2 = exp_avg_slows[i].data_ptr<float>();
    if (c.copy_codes[i] != 0) {
      u.out16 = static_cast<uint16_t*>(half_out[i]->data_ptr());
      u.out_type = c.copy_codes[i];
    }
    t_of.push_back(std::max(*steps[i].const_data_ptr<double>(), 1.0));
    plan.tensors.push_back(u);
  }
  const int64_t* f = frags.data_ptr<int64_t>();
  const double* coef = clip_coef.const_data_ptr<double>();
  const double* alph = alpha.const_data_ptr<double>();
  const double* b1l = beta1_layer.has_value() && beta1_layer->defined() ? beta1_layer->const_data_ptr<double>()
                                                                          : nullptr;
  for (int64_t i = 0; i < frags.size(0); ++i) {
    const int64_t tensor = f[4 * i], layer = f[4 * i + 3];
    plan.add(tensor, f[4 * i + 1], f[4 * i + 2]);
    plan.scalars.push_back(stratopt::frag_scalars(hyper, t_of[tensor], b1l ? b1l[layer] : beta1, lr,
                                                  coef[layer], alph[layer]));
  }
  switch (isa()) {
    case Isa::kAvx512: isa_avx512::update_blocks(plan, is_finite); break;
    case Isa::kAvx2: isa_avx2::update_blocks(plan, is_finite); break;
    default: isa_scalar::update_blocks(plan, is_finite); break;
  }
}

}  // namespace stratopt_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "StratOpt native CPU kernels (per-layer sums of squares, fused update)";
  m.attr("KIND") = "cpu";  // the dispatcher calls an op by its kind, whatever tensors it runs on
  m.def("fragment_sumsq", &stratopt_cpu::fragment_sumsq, "per-layer float64 sums of squares",
        py::arg("grads"), py::arg("frags"), py::arg("num_layers"));
  m.def("fragment_update", &stratopt_cpu::fragment_update, "fused StratOpt update",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("exp_avg_slows"), py::arg("steps"), py::arg("frags"), py::arg("finite"),
        py::arg("clip_coef"), py::arg("alpha"), py::arg("beta1_layer"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("beta3"), py::arg("mix_alpha"), py::arg("t_alpha"), py::arg("t_beta3"),
        py::arg("half_out"));
  m.def("isa", &stratopt_cpu::isa_name, "the SIMD variant in use (avx512, avx2, scalar)");
}
