// Test-only: kernels with the defects the CUDA emulation must report (tests of the emulator
// itself, python_tests/test_cuda_emulation.py), and one whose result depends on block order.
#pragma once

#include <string>

#include "cuda_emulation.h"

namespace faulty {

// Two distinct barriers (different functions, different work after: no code folding).
__attribute__((noinline)) void barrier_a(int* out) {
  __syncthreads();
  out[0] = 1;
}
__attribute__((noinline)) void barrier_b(int* out) {
  __syncthreads();
  out[1] = 2;
}
__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 32) {
    barrier_a(out);
  } else {
    barrier_b(out);
  }
}

__global__ void mask_omits_lane(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000FFFFu, static_cast<int>(threadIdx.x), 1);
}

__global__ void mask_names_exited_lane(int* out) {
  if (threadIdx.x % 32 == 31) return;
  out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, static_cast<int>(threadIdx.x), 1);
}

__global__ void shuffle_outside_mask(int* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0x0000FFFFu, static_cast<int>(threadIdx.x), 16);
}

__global__ void uninitialised_shared(int* out) {
  __shared__ int s[32];
  if (threadIdx.x == 0) s[0] = 1;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x % 32];
}

__global__ void device_assert(int* out) {
  CUDA_KERNEL_ASSERT_MSG(threadIdx.x < 40, "thread index too large");
  out[threadIdx.x] = 1;
}

// Correct, but order-dependent: the last block to run wins.
__global__ void last_block_wins(int* out) {
  if (threadIdx.x == 0) out[0] = static_cast<int>(blockIdx.x);
}

// Correct: a warp reduction, a match over __activemask() inside a divergent branch, and a
// block barrier; out[t] = warp sum, out[blockDim + t] = peers with the same (t % 3) among
// the active (even) lanes of the warp.
__global__ void collectives(int* out) {
  int x = static_cast<int>(threadIdx.x);
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xFFFFFFFFu, x, offset);
  out[threadIdx.x] = x;
  __syncthreads();
  if (threadIdx.x % 2 == 0) {
    const unsigned peers = __match_any_sync(__activemask(), threadIdx.x % 3);
    out[blockDim.x + threadIdx.x] = static_cast<int>(peers);
  }
}

inline void run(const std::string& name, int* out, unsigned grid, unsigned threads) {
  using Kernel = void (*)(int*);
  const std::pair<const char*, Kernel> kernels[] = {
      {"divergent_barrier", divergent_barrier},
      {"mask_omits_lane", mask_omits_lane},
      {"mask_names_exited_lane", mask_names_exited_lane},
      {"shuffle_outside_mask", shuffle_outside_mask},
      {"uninitialised_shared", uninitialised_shared},
      {"device_assert", device_assert},
      {"last_block_wins", last_block_wins},
      {"collectives", collectives},
  };
  for (const auto& [kernel_name, kernel] : kernels) {
    if (name == kernel_name) {
      cuda_emu::launch(kernel_name, kernel, grid, threads, out);
      return;
    }
  }
  throw std::invalid_argument("no test kernel named " + name);
}

}  // namespace faulty
