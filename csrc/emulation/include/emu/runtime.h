// The emulator's runtime interface: error codes, the launcher that the source rewrite of
// `kernel<<<...>>>(args)` calls, and the scheduler entry points behind __syncthreads() and
// the warp intrinsics. Implemented in csrc/emulation/emu_runtime.cpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

#include "emu/types.h"

#pragma GCC visibility push(hidden)

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInitializationError = 3,
  cudaErrorLaunchFailure = 4,
  cudaErrorLaunchTimeout = 6,
  cudaErrorLaunchOutOfResources = 7,
  cudaErrorInvalidDeviceFunction = 8,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 10,
  cudaErrorInvalidMemcpyDirection = 21,
  cudaErrorNotSupported = 801,
  cudaErrorUnknown = 999,
};
using cudaError = cudaError_t;

struct CUstream_st;
using cudaStream_t = CUstream_st*;
#define cudaStreamLegacy ((cudaStream_t)0x1)
#define cudaStreamPerThread ((cudaStream_t)0x2)

namespace emu {

// Where and how a kernel runs; `kernel` is the kernel's source text, for error messages.
struct LaunchConfig {
  const char* kernel;
  const void* func;
  dim3 grid, block;
  size_t shmem;
};

// Runs body(ctx) once for every thread of every block, serialised with other launches.
// Returns the launch's error (cudaSuccess, cudaErrorInvalidConfiguration, ...) and records it
// as the calling host thread's last error, as a CUDA launch does.
cudaError_t launch(const LaunchConfig& cfg, void (*body)(void*), void* ctx);

// Text describing the most recent error recorded on this host thread if its code is `err`
// (the launch's kernel, block, thread and what went wrong), else "".
const char* error_detail(cudaError_t err);

// Fiber implementation: 0 = hand-written context switch where available (the default),
// 1 = ucontext swapcontext everywhere. Returns the previous choice. For self-tests.
int set_fiber_backend(int backend);

// The dynamic shared memory of the running block (`extern __shared__` arrays point here).
void* dynamic_shared_memory();

// What `kernel<<<grid, block, shmem, stream>>>(args...)` becomes (csrc/emulation/emulated_op.py):
//   ::emu::Launcher("kernel", grid, block, shmem, stream).run(kernel, args...)
class Launcher {
 public:
  Launcher(const char* kernel, dim3 grid, dim3 block, size_t shmem = 0, cudaStream_t stream = nullptr)
      : cfg_{kernel, nullptr, grid, block, shmem} {
    (void)stream;  // one in-order "device": every launch completes before run() returns
  }

  template <class... P, class... A>
  void run(void (*kernel)(P...), A&&... args) {
    static_assert(sizeof...(P) == sizeof...(A), "kernel launch: wrong number of arguments");
    // The arguments are converted to the parameter types once, on the host, as CUDA does;
    // each thread's call then receives its own copies (parameters are passed by value).
    using Args = std::tuple<std::decay_t<P>...>;
    struct Ctx {
      void (*kernel)(P...);
      Args args;
      static void call(void* self) {
        Ctx* c = static_cast<Ctx*>(self);
        std::apply(c->kernel, c->args);
      }
    } ctx{kernel, Args(std::forward<A>(args)...)};
    cfg_.func = reinterpret_cast<const void*>(kernel);
    launch(cfg_, &Ctx::call, &ctx);
  }

 private:
  LaunchConfig cfg_;
};

namespace detail {

// The warp-level rendezvous operations (one per intrinsic family).
enum class WarpOp : uint8_t {
  ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All, SyncWarp, MatchAny, MatchAll,
  ReduceAdd, ReduceMin, ReduceMax, ReduceAnd, ReduceOr, ReduceXor,
};

// The calling thread's lane deposits `value` (raw bits) and waits until every lane of `mask`
// has arrived at the same operation; returns the operation's result for this lane. `type`
// distinguishes the value types (size and kind), so mismatched calls are reported.
uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int param, int width, unsigned type);

enum class BarrierOp : uint8_t { Sync, Count, And, Or };
// __syncthreads() and its counting variants: wait until every thread of the block arrives.
int barrier(BarrierOp op, int predicate);

// Lanes of the calling thread's warp that have not exited (__activemask()).
unsigned active_mask();

// __trap() and device-side failures: stop the launch with an error naming `what`.
[[noreturn]] void trap(const char* what);

// Accesses through the cache-hinted intrinsics (__ldg, __ldcg, __stcg, ...), the ones kernels
// use for vector loads: checked for natural alignment, since a GPU faults on a misaligned one
// ("misaligned address") where x86 would silently load, and counted by width, so that a test
// can see which path a kernel took (emu_access_counts() in emu_runtime.cpp).
extern uint64_t g_access_counts[2][5];  // [load 0, store 1][width 1, 2, 4, 8, 16 bytes]
[[noreturn]] void misaligned(const void* p, size_t width, bool store);

template <size_t W>
inline void access(const void* p, bool store) {
  if constexpr (W == 1 || W == 2 || W == 4 || W == 8 || W == 16) {
    if (reinterpret_cast<uintptr_t>(p) & (W - 1)) misaligned(p, W, store);
    ++g_access_counts[store ? 1 : 0][W == 1 ? 0 : W == 2 ? 1 : W == 4 ? 2 : W == 8 ? 3 : 4];
  }
}

}  // namespace detail
}  // namespace emu

#pragma GCC visibility pop
