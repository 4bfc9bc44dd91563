// Runtime of the CUDA-on-CPU emulator: runs a kernel launch block after block (blockIdx order,
// x fastest), each CUDA thread of a block as a fiber with its own stack, one fiber at a time.
//
// A fiber runs until it reaches __syncthreads(), a warp intrinsic, or the end of the kernel,
// then switches back to the scheduler (round robin over the block's threads). A barrier
// releases when every thread of the block waits at it; a warp operation completes when every
// lane named in its mask has deposited its value. What CUDA leaves undefined and a GPU may
// hang or corrupt on (a barrier some threads skip, a shuffle a lane of the mask never
// reaches, lanes at mismatched warp operations, deadlock) stops the launch with
// cudaErrorLaunchFailure and a message naming the kernel, block and thread: never an abort.
//
// Context switches: ucontext (glibc's swapcontext), the portable and default backend. It makes
// a sigprocmask system call per switch (about 0.2 us here); on x86-64 EMU_CUDA_FIBERS=fast (or
// set_fiber_backend(0)) switches with a callee-saved-register swap instead (a few ns), about
// twice as fast over the emulated test suite.
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <unordered_map>
#include <vector>

#include "emu/api.h"
#include "emu/intrinsics.h"

#pragma GCC visibility push(hidden)

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

// ---- Fast context switch (x86-64 System V) ---------------------------------------------------
#if defined(__x86_64__) && defined(__linux__)
#define EMU_HAVE_FAST_SWITCH 1
extern "C" {
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores
// the stack pointer in *save_sp, and resumes the context whose stack pointer is load_sp.
void emu_fiber_switch(void** save_sp, void* load_sp);
// First instruction of a new fiber: calls r13(r12), which never returns.
void emu_fiber_start();
}
asm(R"(
  .text
  .p2align 4
  .globl emu_fiber_switch
  .hidden emu_fiber_switch
  .type emu_fiber_switch, @function
emu_fiber_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_fiber_switch, .-emu_fiber_switch

  .p2align 4
  .globl emu_fiber_start
  .hidden emu_fiber_start
  .type emu_fiber_start, @function
emu_fiber_start:
  .cfi_startproc
  .cfi_undefined rip
  movq %r12, %rdi
  callq *%r13
  ud2
  .cfi_endproc
  .size emu_fiber_start, .-emu_fiber_start
)");
#else
#define EMU_HAVE_FAST_SWITCH 0
#endif

namespace emu {
namespace {

using detail::BarrierOp;
using detail::WarpOp;

// ---- Per-host-thread error state (CUDA's last error is per host thread) -----------------------
struct ErrorState {
  cudaError_t last = cudaSuccess;         // what cudaGetLastError() returns next
  cudaError_t detail_code = cudaSuccess;  // the error `detail` describes (survives the clear)
  std::string detail;
  std::string message;                    // buffer behind cudaGetErrorString()
};
thread_local ErrorState t_err;
thread_local bool t_in_launch = false;

cudaError_t record_error(cudaError_t err, std::string detail) {
  t_err.last = err;
  t_err.detail_code = err;
  t_err.detail = std::move(detail);
  return err;
}

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  va_list ap, again;
  va_start(ap, fmt);
  va_copy(again, ap);
  const int n = vsnprintf(nullptr, 0, fmt, ap);
  va_end(ap);
  std::string s(n > 0 ? static_cast<size_t>(n) : 0, '\0');
  if (n > 0) vsnprintf(&s[0], s.size() + 1, fmt, again);
  va_end(again);
  return s;
}

// ---- Fibers -------------------------------------------------------------------------------------
constexpr size_t kStackSize = 128 * 1024;
// Below each stack, so that an overflow faults (and is reported) instead of silently writing
// into the neighbouring fiber's stack; large frames probe it (-fstack-clash-protection).
constexpr size_t kGuardSize = 64 * 1024;

struct Fiber {
  char* mem = nullptr;   // mapping: guard area, then the stack
  size_t guard = 0;
  void* sp = nullptr;    // saved stack pointer (fast backend)
  ucontext_t uc;         // saved context (ucontext backend); holds pointers into itself: never moved
  bool ready = false;    // context set up, idle at the top of fiber_main's loop
  bool in_body = false;  // inside the kernel: abandoned (needs a new context) if its block fails
};

enum State : uint8_t { kRunnable, kBarrier, kWarp, kExited, kFaulted };

// What one CUDA thread of the running block is doing, and its pending request.
struct Lane {
  State state;
  WarpOp op;
  BarrierOp bop;
  unsigned type;
  int param, width;
  unsigned mask;
  uint64_t value, result;
};

// Lanes of one warp by state, so that the per-arrival checks cost O(1).
struct WarpMasks {
  unsigned exist;    // lanes that exist (a last partial warp has fewer than 32)
  unsigned waiting;  // at a warp operation
  unsigned barrier;  // at __syncthreads()
  unsigned exited;
};

// Scheduler state; only touched with g_mutex held, by the launching host thread.
std::mutex g_mutex;
std::vector<std::unique_ptr<Fiber>> g_fibers;  // grows to the largest block seen; reused
std::vector<Lane> g_lanes;
std::vector<WarpMasks> g_warps;
std::vector<uint3> g_coords;                    // threadIdx of each linear thread id
int g_nthreads = 0;
int g_cur = -1;                                 // linear id of the running thread
Fiber* g_cur_fiber = nullptr;                   // null outside a kernel
void* g_sched_sp = nullptr;
ucontext_t g_sched_uc;
void (*g_body)(void*) = nullptr;
void* g_ctx = nullptr;
const LaunchConfig* g_cfg = nullptr;
std::string g_error;                            // why the running block failed
int g_backend = -1;                             // 0 fast switch, 1 ucontext (default); -1 not chosen yet
char* g_dyn_smem = nullptr;
size_t g_dyn_smem_cap = 0;
std::unordered_map<const void*, int> g_max_dyn_smem;  // cudaFuncSetAttribute opt-ins

constexpr size_t kDefaultDynSmem = 48 * 1024;
constexpr size_t kMaxDynSmemOptin = 227 * 1024;      // H100 / H200

int backend() {
  if (g_backend < 0) {
    const char* env = std::getenv("EMU_CUDA_FIBERS");
    g_backend = (EMU_HAVE_FAST_SWITCH && env && std::strcmp(env, "fast") == 0) ? 0 : 1;
  }
  return g_backend;
}

void fiber_main(Fiber* f);
void ucontext_entry() { fiber_main(g_cur_fiber); }

inline void resume(Fiber* f) {
#if EMU_HAVE_FAST_SWITCH
  if (g_backend == 0) return emu_fiber_switch(&g_sched_sp, f->sp);
#endif
  swapcontext(&g_sched_uc, &f->uc);
}

inline void yield(Fiber* f) {
#if EMU_HAVE_FAST_SWITCH
  if (g_backend == 0) return emu_fiber_switch(&f->sp, g_sched_sp);
#endif
  swapcontext(&f->uc, &g_sched_uc);
}

// Each fiber runs thread bodies forever: one per block it takes part in, across launches.
void fiber_main(Fiber* f) {
  for (;;) {
    f->in_body = true;
    try {
      g_body(g_ctx);
      g_lanes[g_cur].state = kExited;
    } catch (const std::exception& e) {
      g_lanes[g_cur].state = kFaulted;
      g_error = e.what();
    } catch (...) {
      g_lanes[g_cur].state = kFaulted;
      g_error = "a C++ exception of unknown type escaped the kernel";
    }
    f->in_body = false;
    yield(f);
  }
}

// `index` staggers the stack tops: page-aligned tops would all map to the same L1 cache sets,
// and the scheduler touches every fiber's top frames on each round.
void init_context(Fiber* f, int index) {
  const size_t color = static_cast<size_t>(index % 61) * 64;
  char* top = f->mem + f->guard + kStackSize - color;  // 64-byte aligned
#if EMU_HAVE_FAST_SWITCH
  if (g_backend == 0) {
    // The frame emu_fiber_switch pops: control word/MXCSR, r15, r14, r13, r12, rbx, rbp, then
    // `ret` into emu_fiber_start with rsp = top (16-byte aligned, as a call site needs).
    uint64_t* sp = reinterpret_cast<uint64_t*>(top);
    *--sp = reinterpret_cast<uint64_t>(&emu_fiber_start);
    *--sp = 0;                                          // rbp
    *--sp = 0;                                          // rbx
    *--sp = reinterpret_cast<uint64_t>(f);              // r12: argument
    *--sp = reinterpret_cast<uint64_t>(&fiber_main);    // r13: entry
    *--sp = 0;                                          // r14
    *--sp = 0;                                          // r15
    uint32_t mxcsr = 0;
    uint16_t fpucw = 0;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    *--sp = mxcsr | (uint64_t{fpucw} << 32);            // the creator's FP environment
    f->sp = sp;
    f->ready = true;
    return;
  }
#endif
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->mem + f->guard;
  f->uc.uc_stack.ss_size = kStackSize - color;
  f->uc.uc_link = nullptr;
  makecontext(&f->uc, &ucontext_entry, 0);
  f->ready = true;
}

void ensure_fibers(int n) {
  while (static_cast<int>(g_fibers.size()) < n) {
    auto f = std::make_unique<Fiber>();
    void* m = mmap(nullptr, kGuardSize + kStackSize, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (m == MAP_FAILED) throw std::bad_alloc();
    mprotect(m, kGuardSize, PROT_NONE);
    f->mem = static_cast<char*>(m);
    f->guard = kGuardSize;
    g_fibers.push_back(std::move(f));
  }
  for (int t = 0; t < n; ++t)
    if (!g_fibers[t]->ready) init_context(g_fibers[t].get(), t);
}

// ---- Diagnostics ------------------------------------------------------------------------------
const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::ShflIdx: return "__shfl_sync";
    case WarpOp::ShflUp: return "__shfl_up_sync";
    case WarpOp::ShflDown: return "__shfl_down_sync";
    case WarpOp::ShflXor: return "__shfl_xor_sync";
    case WarpOp::Ballot: return "__ballot_sync";
    case WarpOp::Any: return "__any_sync";
    case WarpOp::All: return "__all_sync";
    case WarpOp::SyncWarp: return "__syncwarp";
    case WarpOp::MatchAny: return "__match_any_sync";
    case WarpOp::MatchAll: return "__match_all_sync";
    case WarpOp::ReduceAdd: return "__reduce_add_sync";
    case WarpOp::ReduceMin: return "__reduce_min_sync";
    case WarpOp::ReduceMax: return "__reduce_max_sync";
    case WarpOp::ReduceAnd: return "__reduce_and_sync";
    case WarpOp::ReduceOr: return "__reduce_or_sync";
    case WarpOp::ReduceXor: return "__reduce_xor_sync";
  }
  return "?";
}

const char* barrier_name(BarrierOp op) {
  switch (op) {
    case BarrierOp::Sync: return "__syncthreads()";
    case BarrierOp::Count: return "__syncthreads_count()";
    case BarrierOp::And: return "__syncthreads_and()";
    case BarrierOp::Or: return "__syncthreads_or()";
  }
  return "?";
}

bool is_shuffle(WarpOp op) { return op <= WarpOp::ShflXor; }

std::string thread_name(int t) {
  const uint3 c = g_coords[t];
  return format("thread (%u,%u,%u) = lane %d of warp %d", c.x, c.y, c.z, t % 32, t / 32);
}

std::string describe_op(const Lane& l) {
  std::string s = format("%s with mask 0x%08x", op_name(l.op), l.mask);
  if (l.op == WarpOp::ShflUp || l.op == WarpOp::ShflDown) s += format(", delta %d", l.param);
  if (l.op == WarpOp::ShflXor) s += format(", laneMask %d", l.param);
  if (is_shuffle(l.op)) s += format(", width %d", l.width);
  return s;
}

std::string describe_wait(const Lane& l) {
  switch (l.state) {
    case kRunnable: return "is running";
    case kBarrier: return std::string("waits at ") + barrier_name(l.bop);
    case kWarp: return "waits at " + describe_op(l);
    case kExited: return "has exited";
    case kFaulted: return "failed";
  }
  return "?";
}

// ---- Warp operations --------------------------------------------------------------------------
// A lane of t's warp that waits at a warp operation whose mask names t, or -1.
int waiter_needing(int t) {
  const int base = t & ~31;
  const unsigned bit = 1u << (t & 31);
  for (unsigned m = g_warps[t >> 5].waiting & ~bit; m; m &= m - 1) {
    const int o = base + __builtin_ctz(m);
    if (g_lanes[o].mask & bit) return o;
  }
  return -1;
}

bool same_request(const Lane& a, const Lane& b) {
  if (a.op != b.op || a.mask != b.mask || a.type != b.type) return false;
  if (is_shuffle(a.op) && a.width != b.width) return false;
  // __shfl_sync's source lane is per lane by design; delta and laneMask must agree.
  if (a.op == WarpOp::ShflUp || a.op == WarpOp::ShflDown || a.op == WarpOp::ShflXor) return a.param == b.param;
  return true;
}

// Source lane of a shuffle per the PTX definition of shfl.sync (segments of `width` lanes).
// Returns -1 where the lane keeps its own value.
int shuffle_source(WarpOp op, int lane, int param, int width) {
  const int seg = 32 - width;            // the lane bits that select the segment
  const int min_lane = lane & seg;
  const int max_lane = min_lane | (31 & ~seg);
  const int b = param & 31;
  int j = 0;
  switch (op) {
    case WarpOp::ShflUp: j = lane - b; return j >= min_lane ? j : -1;
    case WarpOp::ShflDown: j = lane + b; return j <= max_lane ? j : -1;
    case WarpOp::ShflXor: j = lane ^ b; return j <= max_lane ? j : -1;
    default: return min_lane | (b & ~seg);  // __shfl_sync: srcLane modulo width
  }
}

int64_t as_signed(uint64_t v, unsigned type) {
  return (type & 0xff) == 4 ? static_cast<int64_t>(static_cast<int32_t>(v)) : static_cast<int64_t>(v);
}

// Every lane of `eff` (relative to `base`) has deposited the same request: compute the results.
bool complete_warp_op(int base, unsigned eff) {
  const Lane& first = g_lanes[base + __builtin_ctz(eff)];
  const WarpOp op = first.op;
  uint64_t acc = 0;
  bool acc_set = false;
  unsigned ballot = 0;
  for (unsigned m = eff; m; m &= m - 1) {
    const int i = __builtin_ctz(m);
    const Lane& l = g_lanes[base + i];
    if (l.value) ballot |= 1u << i;
    const uint64_t v = l.value;
    switch (op) {
      case WarpOp::ReduceAdd: acc = static_cast<uint32_t>(acc + v); break;
      case WarpOp::ReduceAnd: acc = acc_set ? (acc & v) : v; break;
      case WarpOp::ReduceOr: acc |= v; break;
      case WarpOp::ReduceXor: acc ^= v; break;
      case WarpOp::ReduceMin:
      case WarpOp::ReduceMax: {
        const bool sgn = (l.type & 0x200u) != 0;
        const bool less = sgn ? as_signed(v, l.type) < as_signed(acc, l.type) : v < acc;
        if (!acc_set || (op == WarpOp::ReduceMin ? less : (!less && v != acc))) acc = v;
        break;
      }
      default: break;
    }
    acc_set = true;
  }
  for (unsigned m = eff; m; m &= m - 1) {
    const int i = __builtin_ctz(m);
    Lane& l = g_lanes[base + i];
    switch (op) {
      case WarpOp::ShflIdx:
      case WarpOp::ShflUp:
      case WarpOp::ShflDown:
      case WarpOp::ShflXor: {
        const int j = shuffle_source(op, i, l.param, l.width);
        if (j >= 0 && (eff >> j & 1u)) {
          l.result = g_lanes[base + j].value;
        } else if (op == WarpOp::ShflIdx) {
          g_error = format("%s reads lane %d, which is not in its mask 0x%08x (active lanes 0x%08x): %s",
                           op_name(op), j, l.mask, eff, thread_name(base + i).c_str());
          return false;
        } else {
          l.result = l.value;  // source outside the segment or the mask: own value, as CUDA
        }
        break;
      }
      case WarpOp::Ballot: l.result = ballot; break;
      case WarpOp::Any: l.result = ballot != 0; break;
      case WarpOp::All: l.result = ballot == eff; break;
      case WarpOp::SyncWarp: l.result = 0; break;
      case WarpOp::MatchAny: {
        unsigned same = 0;
        for (unsigned k = eff; k; k &= k - 1)
          if (g_lanes[base + __builtin_ctz(k)].value == l.value) same |= 1u << __builtin_ctz(k);
        l.result = same;
        break;
      }
      case WarpOp::MatchAll: {
        bool all = true;
        for (unsigned k = eff; k; k &= k - 1) all = all && g_lanes[base + __builtin_ctz(k)].value == l.value;
        l.result = all ? eff : 0;
        break;
      }
      default: l.result = acc; break;
    }
    l.state = kRunnable;
  }
  return true;
}

std::string missing_lane(int o, const Lane& me, int t) {
  return format("lane %d of warp %d missing from %s: it %s (%s is waiting for it)", o & 31, o / 32,
                describe_op(me).c_str(), describe_wait(g_lanes[o]).c_str(), thread_name(t).c_str());
}

std::string different_ops(int t, int o) {
  return format("lanes of warp %d wait at different warp operations: %s %s, %s %s", t / 32, thread_name(t).c_str(),
                describe_wait(g_lanes[t]).c_str(), thread_name(o).c_str(), describe_wait(g_lanes[o]).c_str());
}

// Thread t has just deposited a warp request: check it, and complete it if t was the last lane.
bool on_warp_arrival(int t) {
  const Lane& me = g_lanes[t];
  const int base = t & ~31, lane = t & 31;
  WarpMasks& wm = g_warps[t >> 5];
  const unsigned bit = 1u << lane;
  wm.waiting |= bit;
  const unsigned eff = me.mask & wm.exist;
  if (!(eff & bit)) {
    g_error = format("%s: the mask does not include the calling lane: %s", describe_op(me).c_str(),
                     thread_name(t).c_str());
    return false;
  }
  if (is_shuffle(me.op) && (me.width < 1 || me.width > 32 || (me.width & (me.width - 1)))) {
    g_error = format("%s: width must be a power of 2 from 1 to 32: %s", describe_op(me).c_str(),
                     thread_name(t).c_str());
    return false;
  }
  if (const unsigned gone = eff & (wm.exited | wm.barrier)) {  // can never arrive
    g_error = missing_lane(base + __builtin_ctz(gone), me, t);
    return false;
  }
  if (const unsigned others = eff & wm.waiting & ~bit) {  // compare with one lane already there
    const int o = base + __builtin_ctz(others);
    if (!same_request(g_lanes[o], me)) {
      g_error = different_ops(t, o);
      return false;
    }
  }
  if (eff & ~wm.waiting) return true;  // lanes of the mask still running
  for (unsigned m = eff; m; m &= m - 1) {
    const int o = base + __builtin_ctz(m);
    if (!same_request(g_lanes[o], me)) {
      g_error = different_ops(t, o);
      return false;
    }
  }
  wm.waiting &= ~eff;
  return complete_warp_op(base, eff);
}

// ---- Block scheduler --------------------------------------------------------------------------
int first_in_state(State s) {
  for (int t = 0; t < g_nthreads; ++t)
    if (g_lanes[t].state == s) return t;
  return -1;
}

bool on_exit(int t, int at_barrier) {
  if (at_barrier > 0) {
    const int w = first_in_state(kBarrier);
    g_error = format("divergent %s: %s exited while %s waits at it", barrier_name(g_lanes[w].bop),
                     thread_name(t).c_str(), thread_name(w).c_str());
    return false;
  }
  const int w = waiter_needing(t);
  if (w >= 0) {
    g_error = format("lane %d of warp %d missing from %s: it has exited (%s is waiting for it)", t & 31, t / 32,
                     describe_op(g_lanes[w]).c_str(), thread_name(w).c_str());
    return false;
  }
  return true;
}

bool on_barrier_arrival(int t, int exited) {
  if (exited > 0) {
    const int e = first_in_state(kExited);
    g_error = format("divergent %s: %s waits at it but %s has exited", barrier_name(g_lanes[t].bop),
                     thread_name(t).c_str(), thread_name(e).c_str());
    return false;
  }
  const int w = waiter_needing(t);
  if (w >= 0) {
    g_error = format("lane %d of warp %d missing from %s: it waits at %s (%s is waiting for it)", t & 31,
                     t / 32, describe_op(g_lanes[w]).c_str(), barrier_name(g_lanes[t].bop),
                     thread_name(w).c_str());
    return false;
  }
  return true;
}

void release_barrier() {
  for (WarpMasks& wm : g_warps) wm.barrier = 0;
  int count = 0;
  for (int t = 0; t < g_nthreads; ++t) count += g_lanes[t].value != 0;
  for (int t = 0; t < g_nthreads; ++t) {
    Lane& l = g_lanes[t];
    switch (l.bop) {
      case BarrierOp::Sync: l.result = 0; break;
      case BarrierOp::Count: l.result = static_cast<uint64_t>(count); break;
      case BarrierOp::And: l.result = count == g_nthreads; break;
      case BarrierOp::Or: l.result = count != 0; break;
    }
    l.state = kRunnable;
  }
}

std::string describe_deadlock() {
  std::string s = "deadlock: no thread can proceed";
  int shown = 0;
  for (int t = 0; t < g_nthreads && shown < 4; ++t) {
    if (g_lanes[t].state == kExited) continue;
    s += "; " + thread_name(t) + " " + describe_wait(g_lanes[t]);
    ++shown;
  }
  return s;
}

// Runs the current block to completion; false (with g_error set) if it cannot complete.
bool run_block() {
  const int n = g_nthreads;
  for (int t = 0; t < n; ++t) g_lanes[t].state = kRunnable;
  for (WarpMasks& wm : g_warps) wm.waiting = wm.barrier = wm.exited = 0;
  int exited = 0, at_barrier = 0;
  while (exited < n) {
    bool progressed = false;
    for (int t = 0; t < n; ++t) {
      Lane& l = g_lanes[t];
      if (l.state != kRunnable) continue;
      progressed = true;
      threadIdx = g_coords[t];
      g_cur = t;
      g_cur_fiber = g_fibers[t].get();
      resume(g_cur_fiber);
      g_cur_fiber = nullptr;  // back in the scheduler (a crash here is not the thread's)
      bool ok = true;
      switch (l.state) {
        case kExited:
          ++exited;
          g_warps[t >> 5].exited |= 1u << (t & 31);
          ok = on_exit(t, at_barrier);
          break;
        case kBarrier:
          g_warps[t >> 5].barrier |= 1u << (t & 31);
          ok = on_barrier_arrival(t, exited);
          if (ok && ++at_barrier == n) {
            release_barrier();
            at_barrier = 0;
          }
          break;
        case kWarp: ok = on_warp_arrival(t); break;
        case kFaulted: g_error = thread_name(t) + ": " + g_error; ok = false; break;
        case kRunnable: g_error = "internal error: a thread yielded without a request"; ok = false; break;
      }
      if (!ok) return false;
    }
    if (!progressed) {
      g_error = describe_deadlock();
      return false;
    }
  }
  return true;
}

// The calling emulated thread's lane, or an exception when called outside a kernel.
Lane& current_lane(const char* what) {
  if (!g_cur_fiber) throw std::logic_error(std::string(what) + " called outside an emulated kernel");
  return g_lanes[g_cur];
}

// ---- Crash report: a fault inside a kernel names the kernel, block and thread ------------------
struct sigaction g_old_segv, g_old_bus;
bool g_handlers_installed = false;

void crash_handler(int sig, siginfo_t* info, void*) {
  if (t_in_launch && g_cur_fiber && g_cfg) {
    const char* addr = static_cast<const char*>(info->si_addr);
    const bool overflow = addr >= g_cur_fiber->mem && addr < g_cur_fiber->mem + g_cur_fiber->guard;
    char buf[640];
    const uint3 c = g_coords[g_cur];
    const int len = snprintf(buf, sizeof buf,
                             "\nCUDA emulator: %s in kernel %s, block (%u,%u,%u), thread (%u,%u,%u)%s\n",
                             sig == SIGSEGV ? "SIGSEGV" : "SIGBUS", g_cfg->kernel, blockIdx.x, blockIdx.y,
                             blockIdx.z, c.x, c.y, c.z,
                             overflow ? ": stack overflow (each emulated thread has a 128 KiB stack)" : "");
    if (len > 0) (void)!write(2, buf, static_cast<size_t>(len) < sizeof buf ? len : sizeof buf - 1);
  }
  // Hand the fault to whoever handled it before (e.g. Python's faulthandler), then re-fault.
  sigaction(SIGSEGV, &g_old_segv, nullptr);
  sigaction(SIGBUS, &g_old_bus, nullptr);
}

thread_local bool t_altstack_checked = false;

void install_crash_handlers() {
  // An alternate signal stack, so a fiber stack overflow can still be reported.
  stack_t cur;
  if (!t_altstack_checked && sigaltstack(nullptr, &cur) == 0 && (cur.ss_flags & SS_DISABLE)) {
    stack_t ss{};
    ss.ss_sp = new char[64 * 1024];  // per host thread, kept for the thread's life
    ss.ss_size = 64 * 1024;
    sigaltstack(&ss, nullptr);
  }
  t_altstack_checked = true;
  if (g_handlers_installed) return;
  struct sigaction sa {};
  sa.sa_sigaction = &crash_handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_old_segv);
  sigaction(SIGBUS, &sa, &g_old_bus);
  g_handlers_installed = true;
}

// ---- Launch -----------------------------------------------------------------------------------
std::string check_config(const LaunchConfig& c) {
  const dim3 g = c.grid, b = c.block;
  if (!g.x || !g.y || !g.z) return format("grid (%u,%u,%u) has a zero dimension", g.x, g.y, g.z);
  if (!b.x || !b.y || !b.z) return format("block (%u,%u,%u) has a zero dimension", b.x, b.y, b.z);
  if (g.x > 2147483647u) return format("grid.x = %u exceeds 2147483647", g.x);
  if (g.y > 65535u) return format("grid.y = %u exceeds 65535", g.y);
  if (g.z > 65535u) return format("grid.z = %u exceeds 65535", g.z);
  if (b.x > 1024u) return format("block.x = %u exceeds 1024", b.x);
  if (b.y > 1024u) return format("block.y = %u exceeds 1024", b.y);
  if (b.z > 64u) return format("block.z = %u exceeds 64", b.z);
  const uint64_t threads = uint64_t{b.x} * b.y * b.z;
  if (threads > 1024u)
    return format("block (%u,%u,%u) has %llu threads; the limit is 1024 per block", b.x, b.y, b.z,
                  static_cast<unsigned long long>(threads));
  auto it = g_max_dyn_smem.find(c.func);
  const size_t limit = it == g_max_dyn_smem.end() ? kDefaultDynSmem : static_cast<size_t>(it->second);
  if (c.shmem > limit)
    return format("%zu bytes of dynamic shared memory exceed this kernel's limit of %zu (raise it up to %zu "
                  "with cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes))",
                  c.shmem, limit, kMaxDynSmemOptin);
  return {};
}

void prepare_launch(const LaunchConfig& cfg) {
  const dim3 b = cfg.block;
  g_nthreads = static_cast<int>(b.x * b.y * b.z);
  backend();
  ensure_fibers(g_nthreads);
  g_lanes.assign(static_cast<size_t>(g_nthreads), Lane{});
  g_warps.assign(static_cast<size_t>((g_nthreads + 31) / 32), WarpMasks{0xffffffffu, 0, 0, 0});
  if (g_nthreads % 32) g_warps.back().exist = (1u << (g_nthreads % 32)) - 1u;
  g_coords.resize(static_cast<size_t>(g_nthreads));
  for (int t = 0; t < g_nthreads; ++t) {
    const unsigned u = static_cast<unsigned>(t);
    g_coords[t] = uint3{u % b.x, (u / b.x) % b.y, u / (b.x * b.y)};
  }
  if (cfg.shmem > g_dyn_smem_cap) {
    std::free(g_dyn_smem);
    g_dyn_smem = static_cast<char*>(std::aligned_alloc(128, (cfg.shmem + 127) & ~size_t{127}));
    if (!g_dyn_smem) {
      g_dyn_smem_cap = 0;
      throw std::bad_alloc();
    }
    g_dyn_smem_cap = cfg.shmem;
  }
  // Shared memory starts uninitialised on a GPU: a NaN pattern makes reads before writes visible.
  if (cfg.shmem) std::memset(g_dyn_smem, 0xff, cfg.shmem);
}

struct InLaunch {
  InLaunch() { t_in_launch = true; }
  ~InLaunch() {
    t_in_launch = false;
    g_cur_fiber = nullptr;
    g_cfg = nullptr;
  }
};

}  // namespace

cudaError_t launch(const LaunchConfig& cfg, void (*body)(void*), void* ctx) {
  const char* name = cfg.kernel ? cfg.kernel : "?";
  if (t_in_launch)
    return record_error(cudaErrorNotSupported,
                        format("kernel %s: device-side launches are not supported by the emulator", name));
  std::lock_guard<std::mutex> lock(g_mutex);
  const std::string bad = check_config(cfg);
  if (!bad.empty()) return record_error(cudaErrorInvalidConfiguration, format("kernel %s: %s", name, bad.c_str()));
  try {
    prepare_launch(cfg);
  } catch (const std::bad_alloc&) {
    return record_error(cudaErrorMemoryAllocation, format("kernel %s: out of memory for thread stacks", name));
  }
  install_crash_handlers();
  InLaunch in_launch;
  g_cfg = &cfg;
  g_body = body;
  g_ctx = ctx;
  gridDim = cfg.grid;
  blockDim = cfg.block;
  for (unsigned z = 0; z < cfg.grid.z; ++z)
    for (unsigned y = 0; y < cfg.grid.y; ++y)
      for (unsigned x = 0; x < cfg.grid.x; ++x) {
        blockIdx = uint3{x, y, z};
        if (run_block()) continue;
        // Abandon the threads still inside the kernel: their fibers get fresh contexts.
        for (int t = 0; t < g_nthreads; ++t)
          if (g_fibers[t]->in_body) g_fibers[t]->ready = false;
        return record_error(cudaErrorLaunchFailure,
                            format("kernel %s, block (%u,%u,%u): ", name, x, y, z) + g_error);
      }
  return cudaSuccess;
}

const char* error_detail(cudaError_t err) {
  return err != cudaSuccess && err == t_err.detail_code ? t_err.detail.c_str() : "";
}

int set_fiber_backend(int b) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const int old = backend();
  const int want = (b == 0 && EMU_HAVE_FAST_SWITCH) ? 0 : 1;
  if (want != old) {
    for (auto& f : g_fibers) f->ready = false;  // contexts are backend specific
    g_backend = want;
  }
  return old;
}

void* dynamic_shared_memory() { return g_dyn_smem; }

namespace detail {

uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int param, int width, unsigned type) {
  Lane& l = current_lane(op_name(op));
  const int me = g_cur;
  l.op = op;
  l.mask = mask;
  l.value = value;
  l.param = param;
  l.width = width;
  l.type = type;
  l.state = kWarp;
  yield(g_cur_fiber);
  return g_lanes[me].result;
}

int barrier(BarrierOp op, int predicate) {
  Lane& l = current_lane(barrier_name(op));
  const int me = g_cur;
  l.bop = op;
  l.value = predicate != 0;
  l.state = kBarrier;
  yield(g_cur_fiber);
  return static_cast<int>(g_lanes[me].result);
}

unsigned active_mask() {
  current_lane("__activemask()");
  const WarpMasks& wm = g_warps[g_cur >> 5];
  return wm.exist & ~wm.exited;
}

void trap(const char* what) { throw std::runtime_error(what); }

uint64_t g_access_counts[2][5] = {};

void misaligned(const void* p, size_t width, bool store) {
  throw std::runtime_error(format("misaligned address: a %zu-byte %s at %p", width, store ? "store" : "load", p));
}

cudaError_t set_func_attribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || static_cast<size_t>(value) > kMaxDynSmemOptin)
    return record_error(cudaErrorInvalidValue,
                        format("cudaFuncSetAttribute: %d bytes of dynamic shared memory exceed the "
                               "opt-in limit of %zu", value, kMaxDynSmemOptin));
  std::lock_guard<std::mutex> lock(g_mutex);
  g_max_dyn_smem[func] = value;
  return cudaSuccess;
}

}  // namespace detail
}  // namespace emu

// ---- Runtime API ------------------------------------------------------------------------------
cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::t_err.last;
  emu::t_err.last = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return emu::t_err.last; }

const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInitializationError: return "cudaErrorInitializationError";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorLaunchTimeout: return "cudaErrorLaunchTimeout";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    case cudaErrorUnknown: return "cudaErrorUnknown";
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t err) {
  const char* base = "unknown error";
  switch (err) {
    case cudaSuccess: base = "no error"; break;
    case cudaErrorInvalidValue: base = "invalid argument"; break;
    case cudaErrorMemoryAllocation: base = "out of memory"; break;
    case cudaErrorInitializationError: base = "initialization error"; break;
    case cudaErrorLaunchFailure: base = "unspecified launch failure"; break;
    case cudaErrorLaunchTimeout: base = "the launch timed out and was terminated"; break;
    case cudaErrorLaunchOutOfResources: base = "too many resources requested for launch"; break;
    case cudaErrorInvalidDeviceFunction: base = "invalid device function"; break;
    case cudaErrorInvalidConfiguration: base = "invalid configuration argument"; break;
    case cudaErrorInvalidDevice: base = "invalid device ordinal"; break;
    case cudaErrorInvalidMemcpyDirection: base = "invalid copy direction for memcpy"; break;
    case cudaErrorNotSupported: base = "operation not supported"; break;
    case cudaErrorUnknown: break;
  }
  const char* detail = emu::error_detail(err);
  if (!*detail) return base;
  emu::t_err.message = std::string(base) + " [CUDA emulator: " + detail + "]";
  return emu::t_err.message.c_str();
}

cudaError_t cudaMalloc(void** ptr, size_t size) {
  // 256-byte alignment, as cudaMalloc guarantees (kernels take vector paths on it).
  *ptr = size ? std::aligned_alloc(256, (size + 255) & ~size_t{255}) : nullptr;
  return (*ptr || !size) ? cudaSuccess : emu::record_error(cudaErrorMemoryAllocation, "cudaMalloc failed");
}
cudaError_t cudaMallocHost(void** ptr, size_t size) { return cudaMalloc(ptr, size); }
cudaError_t cudaFree(void* ptr) {
  std::free(ptr);
  return cudaSuccess;
}
cudaError_t cudaFreeHost(void* ptr) { return cudaFree(ptr); }

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = static_cast<int>(emu::kDefaultDynSmem); return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = 132; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(emu::kMaxDynSmemOptin); return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

#pragma GCC visibility pop

// For tests (ctypes on the loaded module): the intrinsic accesses counted since the last reset,
// out[0..4] loads and out[5..9] stores of 1, 2, 4, 8 and 16 bytes.
extern "C" __attribute__((visibility("default"))) void emu_access_counts(uint64_t* out) {
  std::memcpy(out, emu::detail::g_access_counts, sizeof emu::detail::g_access_counts);
}

extern "C" __attribute__((visibility("default"))) void emu_reset_access_counts() {
  std::memset(emu::detail::g_access_counts, 0, sizeof emu::detail::g_access_counts);
}
