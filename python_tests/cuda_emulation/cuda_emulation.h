// Test-only CPU emulation of the CUDA execution model, so that csrc/*_cuda.cu run in CI
// without a GPU. The kernels' source compiles against this header unchanged (harness.cpp
// includes the .cu files; shim/ replaces the three ATen/c10 CUDA headers they include).
//
// Model:
//  * A grid runs block by block, in a shuffled order (seeded), so results that depend on the
//    order of blocks show up. One fiber (ucontext) per CUDA thread of the block; a fiber runs
//    until it reaches a barrier, a warp collective or __activemask, or exits.
//  * When every fiber waits, the scheduler releases: a warp collective once every lane named
//    in its mask waits at the same call site with the same mask; then __activemask(), as the
//    set of the warp's lanes waiting at that same call site (lanes at one program point are
//    the converged ones); then __syncthreads() once every live thread waits at the same
//    barrier. Anything else is reported as an error: barriers at different call sites, masks
//    that omit the calling lane or name an exited / elsewhere-waiting lane, deadlocks,
//    shuffles that read a lane outside the mask, device asserts.
//  * Memory: harness.cpp is compiled with -fsanitize=kernel-address in "outline" mode, so every
//    load and store calls the hooks at the bottom of this file. Inside a kernel an access is
//    local (the fiber's stack), shared (a __shared__ variable: static storage of this module),
//    or global (anything else). Global bytes read / written are counted per buffer the harness
//    registered (the bandwidth floor is checked by counting, since it cannot be timed here).
//    Shared memory is poisoned before each block (the harness finds the kernels' __shared__
//    variables in the module's symbol table), and reading a shared byte that the block has not
//    written is an error. GCC does not instrument accesses at constant offsets into a static
//    (`sh.field`, `sh.array[3]`): those reads go unchecked, and a byte stored that way counts
//    as written once it no longer holds the poison.
//
// What it cannot show: the memory model and races between blocks or between threads between
// barriers (fibers switch only at synchronisation points, so unsynchronised accesses look
// ordered); warp-synchronous code that relies on implicit lock-step without sync masks;
// timing, occupancy and register spills; the precision of the GPU's approximate intrinsics
// (rsqrtf is computed exactly here; CUDA's is within 2 ulp).
#pragma once

#include <dlfcn.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_set>
#include <vector>

namespace cuda_emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
  Dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum class State { Runnable, Barrier, Collective, ActiveMask, Done };
enum class Op { ShflXor, MatchAny };

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  State state = State::Done;
  const void* site = nullptr;  // call site of the barrier / collective it waits at
  Op op = Op::ShflXor;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int lane_arg = 0;
};

struct Buffer {
  std::string name;
  uintptr_t begin, end;
  uint64_t read = 0, written = 0;
};

struct Launch {
  std::string kernel;
  unsigned grid, block;
  std::vector<Buffer> buffers;
  uint64_t other_read = 0, other_written = 0;
};

constexpr size_t kStackBytes = 128 * 1024;
constexpr unsigned char kPoison = 0xA5;  // fills shared memory before each block

struct Runtime {
  Dim3 thread_idx, block_idx, block_dim, grid_dim;  // what threadIdx etc. read
  // Device the host code sees (launch configuration choices).
  int multiprocessors = 132, ctas_per_sm = 8;
  uint64_t block_order_seed = 0;
  // Execution state.
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = -1;
  bool in_kernel = false;
  int runtime_depth = 0;  // > 0 while the emulator's own code runs: its accesses are not kernel's
  std::function<void()> body;
  std::string error;
  // Memory classification and counting.
  uintptr_t shared_begin = 0, shared_end = 0;  // this module's static storage
  // The kernels' __shared__ variables (address, bytes), poisoned before each block.
  std::vector<std::pair<uintptr_t, size_t>> shared_variables;
  std::vector<Buffer> buffers;                 // registered by the harness for the next launch
  std::vector<Launch> launches;
  std::unordered_set<uintptr_t> shared_written;
};

inline Runtime g_runtime;

// RAII marker for the emulator's own code (its loads and stores are not the kernel's).
struct InRuntime {
  InRuntime() { ++g_runtime.runtime_depth; }
  ~InRuntime() { --g_runtime.runtime_depth; }
};

[[noreturn]] inline void fail_in_fiber(const std::string& message) {
  Runtime& r = g_runtime;
  if (r.error.empty()) {
    r.error = message + " (block " + std::to_string(r.block_idx.x) + ", thread " +
              std::to_string(r.thread_idx.x) + ")";
  }
  r.fibers[r.current].state = State::Done;
  swapcontext(&r.fibers[r.current].context, &r.scheduler);
  __builtin_unreachable();  // the scheduler never resumes a failed fiber
}

// Suspends the current fiber. runtime_depth is the running fiber's own: the scheduler starts
// every fiber at 0, and a resumed fiber restores what it had.
inline void yield(State state, const void* site) {
  Runtime& r = g_runtime;
  Fiber& f = r.fibers[r.current];
  f.state = state;
  f.site = site;
  const int depth = r.runtime_depth;
  swapcontext(&f.context, &r.scheduler);
  r.runtime_depth = depth;
}

inline int lane() { return static_cast<int>(g_runtime.thread_idx.x % 32); }

__attribute__((noinline)) inline void syncthreads() {
  InRuntime guard;
  yield(State::Barrier, __builtin_return_address(0));
}

__attribute__((noinline)) inline unsigned activemask() {
  InRuntime guard;
  yield(State::ActiveMask, __builtin_return_address(0));
  return static_cast<unsigned>(g_runtime.fibers[g_runtime.current].result);
}

inline uint64_t collective(Op op, unsigned mask, uint64_t value, int lane_arg, const void* site) {
  InRuntime guard;
  if (!((mask >> lane()) & 1u)) fail_in_fiber("warp collective: the mask omits the calling lane");
  Fiber& f = g_runtime.fibers[g_runtime.current];
  f.op = op;
  f.mask = mask;
  f.value = value;
  f.lane_arg = lane_arg;
  yield(State::Collective, site);
  return g_runtime.fibers[g_runtime.current].result;
}

template <typename T>
uint64_t to_bits(T x) {
  static_assert(sizeof(T) <= 8, "warp collectives move at most 8 bytes here");
  uint64_t bits = 0;
  std::memcpy(&bits, &x, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T x;
  std::memcpy(&x, &bits, sizeof(T));
  return x;
}

// One step of the scheduler when every fiber waits: release what can be released.
inline void release_waiting(int threads) {
  Runtime& r = g_runtime;
  const int warps = (threads + 31) / 32;
  auto fiber = [&](int w, int l) -> Fiber* {
    const int t = w * 32 + l;
    return t < threads ? &r.fibers[t] : nullptr;
  };
  bool released = false;
  for (int w = 0; w < warps; ++w) {
    for (int l = 0; l < 32; ++l) {
      Fiber* f = fiber(w, l);
      if (!f || f->state != State::Collective) continue;
      bool ready = true;
      for (int m = 0; m < 32; ++m) {
        if (!((f->mask >> m) & 1u)) continue;
        Fiber* g = fiber(w, m);
        if (!g || g->state != State::Collective || g->site != f->site || g->mask != f->mask) {
          ready = false;
          break;
        }
      }
      if (!ready) continue;
      for (int m = 0; m < 32; ++m) {
        if (!((f->mask >> m) & 1u)) continue;
        Fiber* g = fiber(w, m);
        if (g->op == Op::ShflXor) {
          const int src = m ^ g->lane_arg;
          if (src >= 32 || !((f->mask >> src) & 1u)) {
            r.error = "__shfl_xor_sync reads lane " + std::to_string(src) + " outside the mask";
            return;
          }
          g->result = fiber(w, src)->value;
        } else {
          unsigned peers = 0;
          for (int p = 0; p < 32; ++p) {
            if (((f->mask >> p) & 1u) && fiber(w, p)->value == g->value) peers |= 1u << p;
          }
          g->result = peers;
        }
      }
      for (int m = 0; m < 32; ++m) {
        if ((f->mask >> m) & 1u) fiber(w, m)->state = State::Runnable;
      }
      released = true;
    }
  }
  if (released) return;
  for (int w = 0; w < warps; ++w) {
    for (int l = 0; l < 32; ++l) {
      Fiber* f = fiber(w, l);
      if (!f || f->state != State::ActiveMask) continue;
      unsigned converged = 0;
      for (int m = 0; m < 32; ++m) {
        Fiber* g = fiber(w, m);
        if (g && g->state == State::ActiveMask && g->site == f->site) converged |= 1u << m;
      }
      for (int m = 0; m < 32; ++m) {
        if ((converged >> m) & 1u) {
          fiber(w, m)->result = converged;
          fiber(w, m)->state = State::Runnable;
        }
      }
      released = true;
    }
  }
  if (released) return;
  const void* barrier = nullptr;
  for (int t = 0; t < threads; ++t) {
    const Fiber& f = r.fibers[t];
    if (f.state == State::Done) continue;
    if (f.state != State::Barrier) {
      r.error = "deadlock: thread " + std::to_string(t) +
                " waits at a warp collective whose mask names a lane that exited or waits "
                "elsewhere";
      return;
    }
    if (barrier && f.site != barrier) {
      r.error = "divergent __syncthreads: threads wait at different barriers";
      return;
    }
    barrier = f.site;
  }
  for (int t = 0; t < threads; ++t) {
    if (r.fibers[t].state == State::Barrier) r.fibers[t].state = State::Runnable;
  }
}

inline void fiber_entry() {
  g_runtime.body();
  g_runtime.fibers[g_runtime.current].state = State::Done;
  // Returning resumes uc_link: the scheduler.
}

inline void run_block(unsigned threads) {
  Runtime& r = g_runtime;
  for (const auto& [begin, bytes] : r.shared_variables) {
    std::memset(reinterpret_cast<void*>(begin), kPoison, bytes);
  }
  r.shared_written.clear();
  if (r.fibers.size() < threads) r.fibers.resize(threads);
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = r.fibers[t];
    if (f.stack.empty()) f.stack.resize(kStackBytes);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = &r.scheduler;
    makecontext(&f.context, fiber_entry, 0);
    f.state = State::Runnable;
  }
  for (;;) {
    bool ran = false, live = false;
    for (unsigned t = 0; t < threads && r.error.empty(); ++t) {
      Fiber& f = r.fibers[t];
      if (f.state != State::Runnable) continue;
      ran = true;
      r.current = static_cast<int>(t);
      r.thread_idx = Dim3(t);
      r.in_kernel = true;
      r.runtime_depth = 0;
      swapcontext(&r.scheduler, &f.context);
      r.in_kernel = false;
      r.runtime_depth = 0;
    }
    if (!r.error.empty()) return;
    for (unsigned t = 0; t < threads; ++t) live |= r.fibers[t].state != State::Done;
    if (!live) return;
    if (!ran) {
      release_waiting(static_cast<int>(threads));
      if (!r.error.empty()) return;
    }
  }
}

// Runs kernel(args...) on a grid of `grid` blocks of `block` threads (1-D, as the kernels use).
template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), unsigned grid, unsigned block,
            Args&&... args) {
  Runtime& r = g_runtime;
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  r.body = [&] {
    std::tuple<std::decay_t<Params>...> local;
    void (*entry)(Params...);
    {
      InRuntime guard;  // the copies read the host's frame; the kernel reads its own
      local = params;
      entry = kernel;
    }
    std::apply(entry, local);
  };
  r.block_dim = Dim3(block);
  r.grid_dim = Dim3(grid);
  r.error.clear();
  Launch record{name, grid, block, r.buffers, 0, 0};
  for (Buffer& b : record.buffers) b.read = b.written = 0;
  r.launches.push_back(record);
  std::vector<unsigned> order(grid);
  for (unsigned b = 0; b < grid; ++b) order[b] = b;
  std::shuffle(order.begin(), order.end(), std::mt19937_64(r.block_order_seed));
  for (unsigned b : order) {
    r.block_idx = Dim3(b);
    run_block(block);
    if (!r.error.empty()) {
      r.body = nullptr;
      throw std::runtime_error(std::string("CUDA emulation: ") + name + ": " + r.error);
    }
  }
  r.body = nullptr;
}

// " at <module>+0x<offset>" of an instruction, for addr2line -f -C -e <module> 0x<offset>.
inline std::string code_location(const void* site) {
  Dl_info info;
  if (!dladdr(site, &info) || !info.dli_fname) return "";
  char offset[32];
  std::snprintf(offset, sizeof(offset), "+0x%zx",
                static_cast<size_t>(reinterpret_cast<uintptr_t>(site) -
                                    reinterpret_cast<uintptr_t>(info.dli_fbase)));
  return std::string(" at ") + info.dli_fname + offset;
}

// Called for every load and store of the instrumented code. Not instrumented itself, and it
// raises runtime_depth before touching any container (whose code is instrumented).
__attribute__((no_sanitize_address)) inline void on_access(uintptr_t address, size_t size,
                                                             bool write, const void* site) {
  Runtime& r = g_runtime;
  if (!r.in_kernel || r.runtime_depth > 0) return;
  const uintptr_t self = reinterpret_cast<uintptr_t>(&g_runtime);
  if (address >= self && address < self + sizeof(Runtime)) return;  // threadIdx & co.
  InRuntime guard;
  const Fiber& f = r.fibers[r.current];
  const uintptr_t stack = reinterpret_cast<uintptr_t>(f.stack.data());
  if (address >= stack && address < stack + f.stack.size()) return;  // local memory
  if (address >= r.shared_begin && address < r.shared_end) {
    if (write) {
      for (uintptr_t a = address; a < address + size; ++a) r.shared_written.insert(a);
      return;
    }
    // Unwritten: no instrumented store reached it, and it still holds the poison (stores at
    // constant offsets into a __shared__ variable are not instrumented, see the header).
    bool unwritten = true;
    for (uintptr_t a = address; a < address + size && unwritten; ++a) {
      unwritten = !r.shared_written.count(a) && *reinterpret_cast<unsigned char*>(a) == kPoison;
    }
    if (unwritten) {
      fail_in_fiber("reads shared memory this block has not written" + code_location(site));
    }
    return;
  }
  Launch& launch = r.launches.back();
  for (Buffer& b : launch.buffers) {
    if (address >= b.begin && address < b.end) {
      (write ? b.written : b.read) += size;
      return;
    }
  }
  (write ? launch.other_written : launch.other_read) += size;
}

}  // namespace cuda_emu

// The -fsanitize=kernel-address hooks (outline instrumentation; no sanitizer runtime is linked).
#define CUDA_EMU_HOOKS(n)                                                          \
  extern "C" __attribute__((no_sanitize_address)) void __asan_load##n##_noabort(  \
      uintptr_t a) {                                                               \
    cuda_emu::on_access(a, n, false, __builtin_return_address(0));                 \
  }                                                                                \
  extern "C" __attribute__((no_sanitize_address)) void __asan_store##n##_noabort( \
      uintptr_t a) {                                                               \
    cuda_emu::on_access(a, n, true, __builtin_return_address(0));                  \
  }
CUDA_EMU_HOOKS(1)
CUDA_EMU_HOOKS(2)
CUDA_EMU_HOOKS(4)
CUDA_EMU_HOOKS(8)
CUDA_EMU_HOOKS(16)
#undef CUDA_EMU_HOOKS
extern "C" __attribute__((no_sanitize_address)) void __asan_loadN_noabort(uintptr_t a, size_t n) {
  cuda_emu::on_access(a, n, false, __builtin_return_address(0));
}
extern "C" __attribute__((no_sanitize_address)) void __asan_storeN_noabort(uintptr_t a, size_t n) {
  cuda_emu::on_access(a, n, true, __builtin_return_address(0));
}
extern "C" void __asan_handle_no_return() {}
extern "C" void __asan_before_dynamic_init(const char*) {}
extern "C" void __asan_after_dynamic_init() {}

// ---- CUDA's names, as the kernels use them ----
using dim3 = cuda_emu::Dim3;
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define threadIdx (cuda_emu::g_runtime.thread_idx)
#define blockIdx (cuda_emu::g_runtime.block_idx)
#define blockDim (cuda_emu::g_runtime.block_dim)
#define gridDim (cuda_emu::g_runtime.grid_dim)
// Static storage of this module is what the emulator treats as shared memory.
#define __shared__ static

#undef CUDA_KERNEL_ASSERT_MSG
#define CUDA_KERNEL_ASSERT_MSG(cond, msg) \
  if (!(cond)) cuda_emu::fail_in_fiber(std::string("device assert: ") + (msg))

#define DFLARE_LAUNCH(kernel, grid, threads, stream, ...) \
  cuda_emu::launch(#kernel, kernel, grid, threads, __VA_ARGS__)

inline void __syncthreads() { cuda_emu::syncthreads(); }
inline void __threadfence() {}  // fibers switch only at synchronisation points
inline unsigned __activemask() { return cuda_emu::activemask(); }

template <typename T>
__attribute__((noinline)) T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  return cuda_emu::from_bits<T>(cuda_emu::collective(
      cuda_emu::Op::ShflXor, mask, cuda_emu::to_bits(value), lane_mask,
      __builtin_return_address(0)));
}

template <typename T>
__attribute__((noinline)) unsigned __match_any_sync(unsigned mask, T value) {
  return static_cast<unsigned>(cuda_emu::collective(
      cuda_emu::Op::MatchAny, mask, cuda_emu::to_bits(value), 0, __builtin_return_address(0)));
}

// Fibers switch only at synchronisation points, so a read-modify-write is atomic here.
template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

template <typename T>
T __ldg(const T* p) {
  return *p;
}
template <typename T>
T __ldcg(const T* p) {
  return *p;
}
template <typename T>
T min(T a, T b) {
  return b < a ? b : a;
}
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline unsigned __float_as_uint(float f) {
  return cuda_emu::from_bits<unsigned>(cuda_emu::to_bits(f));
}
inline float __uint_as_float(unsigned u) {
  return cuda_emu::from_bits<float>(cuda_emu::to_bits(u));
}

inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* ctas, const void*, int,
                                                                 size_t) {
  *ctas = cuda_emu::g_runtime.ctas_per_sm;
  return cudaSuccess;
}
template <typename... P>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* ctas, void (*)(P...), int threads,
                                                          size_t smem) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(ctas, nullptr, threads, smem);
}
