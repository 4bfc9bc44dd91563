// __half and __nv_bfloat16: 16-bit storage types with CUDA's conversions.
//
// Conversions from float round to nearest even, bit for bit as the GPU does (and as torch's
// c10::Half / c10::BFloat16 conversions do, which the CPU op uses): overflow goes to infinity,
// fp16 subnormals are exact, a NaN becomes CUDA's canonical 0x7FFF. Conversions from double
// round once (through round-to-odd), as CUDA's __double2half / __double2bfloat16 do.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "emu/types.h"

#pragma GCC visibility push(hidden)

namespace emu::fp {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
  // Adding 0x7FFF plus the lowest kept bit, then truncating, rounds to nearest even; a carry
  // out of the mantissa correctly bumps the exponent (up to infinity).
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline uint16_t float_to_bf16_rz(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
  return static_cast<uint16_t>(u >> 16);
}

inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fff;                 // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;        // >= 65520 rounds to infinity
  if (a >= 0x38800000u) {                             // normal fp16: >= 2^-14
    uint32_t r = a - 0x38000000u;                     // exponent bias 127 -> 15
    r += 0xfffu + ((r >> 13) & 1u);                   // round the 13 dropped bits to even
    return static_cast<uint16_t>(sign | (r >> 13));
  }
  const uint32_t e = a >> 23;
  if (e < 102) return sign;                           // below 2^-25: rounds to zero
  // Subnormal fp16, in units of 2^-24: the 24-bit significand shifted right by 126 - e.
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;
  const uint32_t s = 126 - e;                         // 14 .. 24
  uint32_t q = m >> s;
  const uint32_t rem = m & ((1u << s) - 1u), half = 1u << (s - 1);
  if (rem > half || (rem == half && (q & 1u))) ++q;   // may carry into the smallest normal: fine
  return static_cast<uint16_t>(sign | q);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) return bits_float(float_bits(static_cast<float>(m) * 5.9604644775390625e-8f) | sign);  // m * 2^-24
  if (e == 31) return bits_float(sign | 0x7f800000u | (m << 13));
  return bits_float(sign | ((e + 112u) << 23) | (m << 13));
}

// Double to float rounded to odd: a later rounding to a format with at most 22 significand bits
// then gives the correctly rounded result (no double-rounding error).
inline float double_to_float_odd(double d) {
  const float f = static_cast<float>(d);
  if (d != d || static_cast<double>(f) == d) return f;
  uint32_t u = float_bits(f);
  if (__builtin_fabs(static_cast<double>(f)) > __builtin_fabs(d)) --u;  // truncate toward zero
  return bits_float(u | 1u);
}

// a * b + c for 16-bit inputs, rounded to odd in float: the product is exact in double and
// TwoSum recovers the addition's rounding error, which decides the odd neighbour.
inline float fma_to_float_odd(float a, float b, float c) {
  const double p = static_cast<double>(a) * b;
  double s = p + c;
  const double bb = s - p;
  const double err = (p - (s - bb)) + (c - bb);
  uint64_t u;
  std::memcpy(&u, &s, 8);
  if (err != 0 && (u & 1u) == 0) s = __builtin_nextafter(s, err > 0 ? __builtin_inf() : -__builtin_inf());
  return double_to_float_odd(s);
}

}  // namespace emu::fp

struct __half_raw { unsigned short x; };
struct __nv_bfloat16_raw { unsigned short x; };

// Trivial default constructor: __shared__ arrays and memcpy work as on the GPU.
#define EMU_HALF_TYPE(T, RAW, FROM_FLOAT, TO_FLOAT)                                                \
  struct alignas(2) T {                                                                             \
    unsigned short __x;                                                                             \
    T() = default;                                                                                  \
    constexpr T(const RAW& r) : __x(r.x) {}                                                         \
    T(float f) : __x(FROM_FLOAT(f)) {}                                                              \
    T(double d) : __x(FROM_FLOAT(::emu::fp::double_to_float_odd(d))) {}                            \
    template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>                      \
    T(I i) : T(static_cast<double>(i)) {}                                                           \
    operator RAW() const { return RAW{__x}; }                                                       \
    operator float() const { return TO_FLOAT(__x); }                                                \
  };                                                                                                \
  static_assert(sizeof(T) == 2 && alignof(T) == 2, #T " layout");
EMU_HALF_TYPE(__half, __half_raw, ::emu::fp::float_to_half, ::emu::fp::half_to_float)
EMU_HALF_TYPE(__nv_bfloat16, __nv_bfloat16_raw, ::emu::fp::float_to_bf16, ::emu::fp::bf16_to_float)
#undef EMU_HALF_TYPE
using half = __half;
using nv_bfloat16 = __nv_bfloat16;

struct alignas(4) __half2 { __half x, y; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
using half2 = __half2;
using nv_bfloat162 = __nv_bfloat162;

namespace emu::fp {
inline __half make_half(uint16_t b) { return __half(__half_raw{b}); }
inline __nv_bfloat16 make_bf16(uint16_t b) { return __nv_bfloat16(__nv_bfloat16_raw{b}); }
}  // namespace emu::fp

// ---- Conversions ------------------------------------------------------------------------------
inline float __bfloat162float(__nv_bfloat16 h) { return ::emu::fp::bf16_to_float(h.__x); }
inline __nv_bfloat16 __float2bfloat16(float f) { return ::emu::fp::make_bf16(::emu::fp::float_to_bf16(f)); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rz(float f) { return ::emu::fp::make_bf16(::emu::fp::float_to_bf16_rz(f)); }
inline __nv_bfloat16 __double2bfloat16(double d) { return __float2bfloat16(::emu::fp::double_to_float_odd(d)); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline short __bfloat16_as_short(__nv_bfloat16 h) { return static_cast<short>(h.__x); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return ::emu::fp::make_bf16(b); }
inline __nv_bfloat16 __short_as_bfloat16(short b) { return ::emu::fp::make_bf16(static_cast<uint16_t>(b)); }

inline float __half2float(__half h) { return ::emu::fp::half_to_float(h.__x); }
inline __half __float2half(float f) { return ::emu::fp::make_half(::emu::fp::float_to_half(f)); }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline __half __double2half(double d) { return __float2half(::emu::fp::double_to_float_odd(d)); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline short __half_as_short(__half h) { return static_cast<short>(h.__x); }
inline __half __ushort_as_half(unsigned short b) { return ::emu::fp::make_half(b); }
inline __half __short_as_half(short b) { return ::emu::fp::make_half(static_cast<uint16_t>(b)); }

inline __half2 __halves2half2(__half lo, __half hi) { return __half2{lo, hi}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__float2half(lo), __float2half(hi)}; }
inline __half2 __float2half2_rn(float f) { return __floats2half2_rn(f, f); }
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }

inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 lo, __nv_bfloat16 hi) { return __nv_bfloat162{lo, hi}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return __nv_bfloat162{__float2bfloat16(lo), __float2bfloat16(hi)};
}
inline __nv_bfloat162 __float2bfloat162_rn(float f) { return __floats2bfloat162_rn(f, f); }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return float2{__bfloat162float(h.x), __bfloat162float(h.y)}; }
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 h) { return h.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 h) { return h.y; }

// ---- Arithmetic: computed in float and rounded once (exact for +, -, *, / and sqrt, since
// float carries more than twice the 16-bit significand); fma rounded once, via round-to-odd. ----
#define EMU_HALF_MATH(T, TO_F, FROM_F)                                                     \
  inline T __hadd(T a, T b) { return FROM_F(TO_F(a) + TO_F(b)); }                                  \
  inline T __hsub(T a, T b) { return FROM_F(TO_F(a) - TO_F(b)); }                                  \
  inline T __hmul(T a, T b) { return FROM_F(TO_F(a) * TO_F(b)); }                                  \
  inline T __hdiv(T a, T b) { return FROM_F(TO_F(a) / TO_F(b)); }                                  \
  inline T __hfma(T a, T b, T c) { return FROM_F(::emu::fp::fma_to_float_odd(TO_F(a), TO_F(b), TO_F(c))); } \
  inline T __hneg(T a) { T r = a; r.__x ^= 0x8000u; return r; }                                    \
  inline T __habs(T a) { T r = a; r.__x &= 0x7fffu; return r; }                                    \
  inline bool __hisnan(T a) { return TO_F(a) != TO_F(a); }                                         \
  inline int __hisinf(T a) { const float f = TO_F(a); return f == __builtin_inff() ? 1 : (f == -__builtin_inff() ? -1 : 0); } \
  inline bool __heq(T a, T b) { return TO_F(a) == TO_F(b); }                                       \
  inline bool __hne(T a, T b) { return TO_F(a) != TO_F(b); }                                       \
  inline bool __hlt(T a, T b) { return TO_F(a) < TO_F(b); }                                        \
  inline bool __hle(T a, T b) { return TO_F(a) <= TO_F(b); }                                       \
  inline bool __hgt(T a, T b) { return TO_F(a) > TO_F(b); }                                        \
  inline bool __hge(T a, T b) { return TO_F(a) >= TO_F(b); }                                       \
  inline T __hmax(T a, T b) { return FROM_F(__builtin_fmaxf(TO_F(a), TO_F(b))); }                  \
  inline T __hmin(T a, T b) { return FROM_F(__builtin_fminf(TO_F(a), TO_F(b))); }                  \
  inline T operator+(const T& a, const T& b) { return __hadd(a, b); }                              \
  inline T operator-(const T& a, const T& b) { return __hsub(a, b); }                              \
  inline T operator*(const T& a, const T& b) { return __hmul(a, b); }                              \
  inline T operator/(const T& a, const T& b) { return __hdiv(a, b); }                              \
  inline T& operator+=(T& a, const T& b) { return a = __hadd(a, b); }                              \
  inline T& operator-=(T& a, const T& b) { return a = __hsub(a, b); }                              \
  inline T& operator*=(T& a, const T& b) { return a = __hmul(a, b); }                              \
  inline T& operator/=(T& a, const T& b) { return a = __hdiv(a, b); }                              \
  inline T operator-(const T& a) { return __hneg(a); }                                             \
  inline T operator+(const T& a) { return a; }                                                     \
  inline bool operator==(const T& a, const T& b) { return __heq(a, b); }                           \
  inline bool operator!=(const T& a, const T& b) { return __hne(a, b); }                           \
  inline bool operator<(const T& a, const T& b) { return __hlt(a, b); }                            \
  inline bool operator<=(const T& a, const T& b) { return __hle(a, b); }                           \
  inline bool operator>(const T& a, const T& b) { return __hgt(a, b); }                            \
  inline bool operator>=(const T& a, const T& b) { return __hge(a, b); }
EMU_HALF_MATH(__half, __half2float, __float2half)
EMU_HALF_MATH(__nv_bfloat16, __bfloat162float, __float2bfloat16)
#undef EMU_HALF_MATH

#pragma GCC visibility pop
