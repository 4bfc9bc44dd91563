// CUDA device intrinsics with their host meaning: barriers and warp operations (through the
// fiber scheduler), cache-hinted loads and stores, IEEE-rounded arithmetic, integer and bit
// intrinsics, atomics and the device math library.
//
// Rounding: the emulated code is compiled with -ffp-contract=off, so `a + b` rounds once, as
// __fadd_rn does; __fmaf_rn is a true fused multiply-add (std::fma).
#pragma once

#include <math.h>  // the C++ wrapper: puts the float overloads (sqrt(float), ...) in :: as CUDA does

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <time.h>
#include <type_traits>

#include "emu/runtime.h"

#pragma GCC visibility push(hidden)

namespace emu::detail {

template <class T> struct identity { using type = T; };
template <class T> using same_t = typename identity<T>::type;  // blocks deduction from this argument

// Size and kind of a warp operand: lanes passing different types are reported, and the
// min/max reductions need the signedness.
template <class T>
constexpr unsigned type_tag() {
  return static_cast<unsigned>(sizeof(T)) | (std::is_floating_point<T>::value ? 0x100u : 0u) |
         (std::is_signed<T>::value && std::is_integral<T>::value ? 0x200u : 0u);
}

template <class T>
inline uint64_t to_bits(const T& v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                "warp intrinsics take values of at most 8 bytes (as CUDA's overloads do)");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <class T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

template <class T>
inline T shfl(WarpOp op, unsigned mask, T v, int param, int width) {
  return from_bits<T>(warp_op(op, mask, to_bits(v), param, width, type_tag<T>()));
}

// A compiler-only memory barrier: values another emulated thread wrote (to __shared__ or
// global memory) before a barrier are re-read after it.
inline void compiler_fence() { asm volatile("" ::: "memory"); }

}  // namespace emu::detail

// ---- Barriers and fences --------------------------------------------------------------------
inline void __syncthreads() {
  ::emu::detail::compiler_fence();
  ::emu::detail::barrier(::emu::detail::BarrierOp::Sync, 0);
  ::emu::detail::compiler_fence();
}
inline int __syncthreads_count(int predicate) {
  ::emu::detail::compiler_fence();
  const int r = ::emu::detail::barrier(::emu::detail::BarrierOp::Count, predicate);
  ::emu::detail::compiler_fence();
  return r;
}
inline int __syncthreads_and(int predicate) {
  ::emu::detail::compiler_fence();
  const int r = ::emu::detail::barrier(::emu::detail::BarrierOp::And, predicate);
  ::emu::detail::compiler_fence();
  return r;
}
inline int __syncthreads_or(int predicate) {
  ::emu::detail::compiler_fence();
  const int r = ::emu::detail::barrier(::emu::detail::BarrierOp::Or, predicate);
  ::emu::detail::compiler_fence();
  return r;
}
inline void __threadfence() { ::emu::detail::compiler_fence(); }
inline void __threadfence_block() { ::emu::detail::compiler_fence(); }
inline void __threadfence_system() { ::emu::detail::compiler_fence(); }
[[noreturn]] inline void __trap() { ::emu::detail::trap("__trap() called"); }
inline void __nanosleep(unsigned) {}

// ---- Warp intrinsics (any value type of at most 8 bytes) ------------------------------------
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::emu::detail::compiler_fence();
  ::emu::detail::warp_op(::emu::detail::WarpOp::SyncWarp, mask, 0, 0, 32, 0);
  ::emu::detail::compiler_fence();
}
template <class T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize) {
  return ::emu::detail::shfl(::emu::detail::WarpOp::ShflIdx, mask, var, srcLane, width);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return ::emu::detail::shfl(::emu::detail::WarpOp::ShflUp, mask, var, static_cast<int>(delta), width);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return ::emu::detail::shfl(::emu::detail::WarpOp::ShflDown, mask, var, static_cast<int>(delta), width);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize) {
  return ::emu::detail::shfl(::emu::detail::WarpOp::ShflXor, mask, var, laneMask, width);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return static_cast<unsigned>(
      ::emu::detail::warp_op(::emu::detail::WarpOp::Ballot, mask, predicate != 0, 0, 32, 0));
}
inline int __any_sync(unsigned mask, int predicate) {
  return static_cast<int>(::emu::detail::warp_op(::emu::detail::WarpOp::Any, mask, predicate != 0, 0, 32, 0));
}
inline int __all_sync(unsigned mask, int predicate) {
  return static_cast<int>(::emu::detail::warp_op(::emu::detail::WarpOp::All, mask, predicate != 0, 0, 32, 0));
}
inline int __uni_sync(unsigned mask, int predicate) {
  const int any = __any_sync(mask, predicate);
  const int all = __all_sync(mask, predicate);
  return any == all;
}
template <class T>
inline unsigned __match_any_sync(unsigned mask, T value) {
  return static_cast<unsigned>(::emu::detail::warp_op(::emu::detail::WarpOp::MatchAny, mask,
                                                      ::emu::detail::to_bits(value), 0, 32,
                                                      ::emu::detail::type_tag<T>()));
}
template <class T>
inline unsigned __match_all_sync(unsigned mask, T value, int* pred) {
  const uint64_t r = ::emu::detail::warp_op(::emu::detail::WarpOp::MatchAll, mask, ::emu::detail::to_bits(value),
                                            0, 32, ::emu::detail::type_tag<T>());
  *pred = r != 0;
  return static_cast<unsigned>(r);
}
#define EMU_WARP_REDUCE(NAME, OP, T)                                                              \
  inline T NAME(unsigned mask, T value) {                                                           \
    return ::emu::detail::from_bits<T>(::emu::detail::warp_op(::emu::detail::WarpOp::OP, mask,     \
                                                              ::emu::detail::to_bits(value), 0, 32, \
                                                              ::emu::detail::type_tag<T>()));       \
  }
EMU_WARP_REDUCE(__reduce_add_sync, ReduceAdd, unsigned)
EMU_WARP_REDUCE(__reduce_add_sync, ReduceAdd, int)
EMU_WARP_REDUCE(__reduce_min_sync, ReduceMin, unsigned)
EMU_WARP_REDUCE(__reduce_min_sync, ReduceMin, int)
EMU_WARP_REDUCE(__reduce_max_sync, ReduceMax, unsigned)
EMU_WARP_REDUCE(__reduce_max_sync, ReduceMax, int)
EMU_WARP_REDUCE(__reduce_and_sync, ReduceAnd, unsigned)
EMU_WARP_REDUCE(__reduce_or_sync, ReduceOr, unsigned)
EMU_WARP_REDUCE(__reduce_xor_sync, ReduceXor, unsigned)
#undef EMU_WARP_REDUCE
inline unsigned __activemask() { return ::emu::detail::active_mask(); }

// ---- Cache-hinted loads and stores: plain accesses on the host, checked and counted ---------
#define EMU_LOAD(name) \
  template <class T> inline T name(const T* p) { ::emu::detail::access<sizeof(T)>(p, false); return *p; }
#define EMU_STORE(name)                                                    \
  template <class T> inline void name(T* p, ::emu::detail::same_t<T> v) { \
    ::emu::detail::access<sizeof(T)>(p, true);                             \
    *p = v;                                                                \
  }
EMU_LOAD(__ldg)
EMU_LOAD(__ldcg)
EMU_LOAD(__ldca)
EMU_LOAD(__ldcs)
EMU_LOAD(__ldlu)
EMU_LOAD(__ldcv)
EMU_STORE(__stwb)
EMU_STORE(__stcg)
EMU_STORE(__stcs)
EMU_STORE(__stwt)
#undef EMU_LOAD
#undef EMU_STORE
inline unsigned __isGlobal(const void*) { return 1; }
inline unsigned __isShared(const void*) { return 0; }
inline unsigned __isConstant(const void*) { return 0; }
inline unsigned __isLocal(const void*) { return 0; }

// ---- IEEE-rounded arithmetic (round to nearest even) ----------------------------------------
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fmaf_ieee_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline double __drcp_rn(double a) { return 1.0 / a; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }  // NaN -> 0
// The device's fast approximations have no host equivalent: these return the correctly
// rounded (libm) value, so results may differ from a GPU in the last bits.
inline float __fdividef(float a, float b) { return a / b; }
inline float fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }
inline float __expf(float a) { return std::exp(a); }
inline float __exp10f(float a) { return std::pow(10.0f, a); }
inline float __logf(float a) { return std::log(a); }
inline float __log2f(float a) { return std::log2(a); }
inline float __log10f(float a) { return std::log10(a); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __sinf(float a) { return std::sin(a); }
inline float __cosf(float a) { return std::cos(a); }
inline float __tanf(float a) { return std::tan(a); }

// ---- Bit reinterpretation and conversions ----------------------------------------------------
namespace emu::detail {
template <class To, class From>
inline To bit_cast(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast sizes differ");
  To t;
  std::memcpy(&t, &f, sizeof(To));
  return t;
}
// Float to integer as the GPU converts: NaN -> 0, out-of-range values saturate.
template <class I, class F>
inline I saturate_to(F x) {
  if (std::isnan(x)) return 0;
  if (x <= static_cast<F>(std::numeric_limits<I>::min())) return std::numeric_limits<I>::min();
  if (x >= static_cast<F>(std::numeric_limits<I>::max())) return std::numeric_limits<I>::max();
  return static_cast<I>(x);
}
}  // namespace emu::detail
inline int __float_as_int(float x) { return ::emu::detail::bit_cast<int>(x); }
inline unsigned __float_as_uint(float x) { return ::emu::detail::bit_cast<unsigned>(x); }
inline float __int_as_float(int x) { return ::emu::detail::bit_cast<float>(x); }
inline float __uint_as_float(unsigned x) { return ::emu::detail::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return ::emu::detail::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return ::emu::detail::bit_cast<double>(x); }
inline int __float2int_rz(float x) { return ::emu::detail::saturate_to<int>(std::trunc(x)); }
inline int __float2int_rn(float x) { return ::emu::detail::saturate_to<int>(std::nearbyint(x)); }
inline int __float2int_rd(float x) { return ::emu::detail::saturate_to<int>(std::floor(x)); }
inline int __float2int_ru(float x) { return ::emu::detail::saturate_to<int>(std::ceil(x)); }
inline unsigned __float2uint_rz(float x) { return ::emu::detail::saturate_to<unsigned>(std::trunc(x)); }
inline unsigned __float2uint_rn(float x) { return ::emu::detail::saturate_to<unsigned>(std::nearbyint(x)); }
inline long long __float2ll_rz(float x) { return ::emu::detail::saturate_to<long long>(std::trunc(x)); }
inline long long __float2ll_rn(float x) { return ::emu::detail::saturate_to<long long>(std::nearbyint(x)); }
inline int __double2int_rz(double x) { return ::emu::detail::saturate_to<int>(std::trunc(x)); }
inline int __double2int_rn(double x) { return ::emu::detail::saturate_to<int>(std::nearbyint(x)); }
inline long long __double2ll_rz(double x) { return ::emu::detail::saturate_to<long long>(std::trunc(x)); }
inline long long __double2ll_rn(double x) { return ::emu::detail::saturate_to<long long>(std::nearbyint(x)); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned x) { return static_cast<float>(x); }
inline float __ll2float_rn(long long x) { return static_cast<float>(x); }
inline float __double2float_rn(double x) { return static_cast<float>(x); }
inline double __int2double_rn(int x) { return static_cast<double>(x); }
inline double __ll2double_rn(long long x) { return static_cast<double>(x); }

// ---- Integer intrinsics ----------------------------------------------------------------------
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
  return __builtin_bswap32(x);
}
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<long long>(a) * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline long long __mul64hi(long long a, long long b) { return static_cast<long long>((static_cast<__int128>(a) * b) >> 64); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline long long clock64() {
#if defined(__x86_64__) || defined(__i386__)
  return static_cast<long long>(__builtin_ia32_rdtsc());
#else
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<long long>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
#endif
}

// ---- min / max, unqualified as in device code (CUDA's overload set) -------------------------
#define EMU_MINMAX(T)                                  \
  inline T min(T a, T b) { return b < a ? b : a; }     \
  inline T max(T a, T b) { return a < b ? b : a; }
EMU_MINMAX(int)
EMU_MINMAX(unsigned int)
EMU_MINMAX(long)
EMU_MINMAX(unsigned long)
EMU_MINMAX(long long)
EMU_MINMAX(unsigned long long)
#undef EMU_MINMAX
// Mixed signedness compares as unsigned, as CUDA's overloads do.
inline unsigned min(int a, unsigned b) { return min(static_cast<unsigned>(a), b); }
inline unsigned min(unsigned a, int b) { return min(a, static_cast<unsigned>(b)); }
inline unsigned max(int a, unsigned b) { return max(static_cast<unsigned>(a), b); }
inline unsigned max(unsigned a, int b) { return max(a, static_cast<unsigned>(b)); }
inline unsigned long long min(long long a, unsigned long long b) { return min(static_cast<unsigned long long>(a), b); }
inline unsigned long long min(unsigned long long a, long long b) { return min(a, static_cast<unsigned long long>(b)); }
inline unsigned long long max(long long a, unsigned long long b) { return max(static_cast<unsigned long long>(a), b); }
inline unsigned long long max(unsigned long long a, long long b) { return max(a, static_cast<unsigned long long>(b)); }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double min(double a, float b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double max(double a, float b) { return fmax(a, b); }
inline unsigned umin(unsigned a, unsigned b) { return min(a, b); }
inline unsigned umax(unsigned a, unsigned b) { return max(a, b); }
inline long long llmin(long long a, long long b) { return min(a, b); }
inline long long llmax(long long a, long long b) { return max(a, b); }
inline unsigned long long ullmin(unsigned long long a, unsigned long long b) { return min(a, b); }
inline unsigned long long ullmax(unsigned long long a, unsigned long long b) { return max(a, b); }

// ---- Atomics: one emulated thread runs at a time, so plain read-modify-writes are atomic ----
template <class T> inline T atomicAdd(T* p, ::emu::detail::same_t<T> v) { T old = *p; *p = old + v; return old; }
template <class T> inline T atomicSub(T* p, ::emu::detail::same_t<T> v) { T old = *p; *p = old - v; return old; }
template <class T> inline T atomicExch(T* p, ::emu::detail::same_t<T> v) { T old = *p; *p = v; return old; }
template <class T> inline T atomicMin(T* p, ::emu::detail::same_t<T> v) { T old = *p; *p = v < old ? v : old; return old; }
template <class T> inline T atomicMax(T* p, ::emu::detail::same_t<T> v) { T old = *p; *p = old < v ? v : old; return old; }
template <class T> inline T atomicAnd(T* p, ::emu::detail::same_t<T> v) { T old = *p; *p = old & v; return old; }
template <class T> inline T atomicOr(T* p, ::emu::detail::same_t<T> v) { T old = *p; *p = old | v; return old; }
template <class T> inline T atomicXor(T* p, ::emu::detail::same_t<T> v) { T old = *p; *p = old ^ v; return old; }
template <class T>
inline T atomicCAS(T* p, ::emu::detail::same_t<T> compare, ::emu::detail::same_t<T> v) {
  T old = *p;
  if (old == compare) *p = v;
  return old;
}
inline unsigned atomicInc(unsigned* p, unsigned limit) { unsigned old = *p; *p = old >= limit ? 0 : old + 1; return old; }
inline unsigned atomicDec(unsigned* p, unsigned limit) {
  unsigned old = *p;
  *p = (old == 0 || old > limit) ? limit : old - 1;
  return old;
}

#pragma GCC visibility pop
