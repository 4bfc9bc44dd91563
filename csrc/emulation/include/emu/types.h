// CUDA execution-space qualifiers and built-in vector types, with their host meaning.
// Part of the CPU emulation of CUDA device code (see csrc/emulation/README.md).
#pragma once

#include <cstddef>
#include <cstdint>

// Device code is compiled as ordinary host C++: the execution-space qualifiers vanish.
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __grid_constant__
#define __forceinline__ inline
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __cluster_dims__(...)
// Blocks run one after another on one OS thread, so one static instance per declaration is
// exactly one block's shared memory. (`extern __shared__` is rewritten by emulated_op.py.)
#define __shared__ static
// __restrict__ is a GCC keyword already. __noinline__ is left undefined: libstdc++ spells
// __attribute__((__noinline__)), which such a macro would break.

// Lets code detect the emulator (__CUDA_ARCH__ stays undefined: host code paths are taken).
#define CUDA_EMULATOR 1
#ifndef CUDART_VERSION
#define CUDART_VERSION 12040
#endif

#pragma GCC visibility push(hidden)

// The vector types, with CUDA's alignment (a float4 load must be a 16-byte access on the GPU,
// and kernels test pointer alignment before taking such paths).
#define EMU_VEC1(T, B)                                      \
  struct T##1 { B x; };                                      \
  inline constexpr T##1 make_##T##1(B x) { return T##1{x}; }
#define EMU_VEC2(T, B, A)                                                        \
  struct alignas(A) T##2 { B x, y; };                                             \
  inline constexpr T##2 make_##T##2(B x, B y) { return T##2{x, y}; }
#define EMU_VEC3(T, B)                                                            \
  struct T##3 { B x, y, z; };                                                      \
  inline constexpr T##3 make_##T##3(B x, B y, B z) { return T##3{x, y, z}; }
#define EMU_VEC4(T, B, A)                                                                    \
  struct alignas(A) T##4 { B x, y, z, w; };                                                   \
  inline constexpr T##4 make_##T##4(B x, B y, B z, B w) { return T##4{x, y, z, w}; }
#define EMU_VECS(T, B, A2, A4) EMU_VEC1(T, B) EMU_VEC2(T, B, A2) EMU_VEC3(T, B) EMU_VEC4(T, B, A4)

EMU_VECS(char, signed char, 2, 4)
EMU_VECS(uchar, unsigned char, 2, 4)
EMU_VECS(short, short, 4, 8)
EMU_VECS(ushort, unsigned short, 4, 8)
EMU_VECS(int, int, 8, 16)
EMU_VECS(uint, unsigned int, 8, 16)
EMU_VECS(long, long, 16, 16)
EMU_VECS(ulong, unsigned long, 16, 16)
EMU_VECS(longlong, long long, 16, 16)
EMU_VECS(ulonglong, unsigned long long, 16, 16)
EMU_VECS(float, float, 8, 16)
EMU_VECS(double, double, 16, 16)

#undef EMU_VECS
#undef EMU_VEC1
#undef EMU_VEC2
#undef EMU_VEC3
#undef EMU_VEC4

static_assert(sizeof(float4) == 16 && alignof(float4) == 16, "float4 layout");
static_assert(sizeof(uint2) == 8 && alignof(uint2) == 8, "uint2 layout");

// Launch dimensions: every component defaults to 1 and an integer converts implicitly, so
// `kernel<<<n, 256>>>` works as in CUDA.
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

// The built-in index variables. One emulated thread runs at a time, and the scheduler sets
// these before it resumes a thread, so plain globals suffice (and are cheap to read).
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
static constexpr int warpSize = 32;

#pragma GCC visibility pop
