// Test-only stand-in for ATen's CUDA context under the CUDA emulation (cuda_emulation.h): the
// current stream and the device properties the host code reads to choose launch shapes.
#pragma once

#include <c10/cuda/CUDAException.h>

#include "cuda_emulation.h"

namespace at::cuda {

struct EmulatedStream {
  operator cudaStream_t() const { return nullptr; }
};
inline EmulatedStream getCurrentCUDAStream() { return {}; }

struct EmulatedDeviceProperties {
  int multiProcessorCount;
};
inline const EmulatedDeviceProperties* getCurrentDeviceProperties() {
  static EmulatedDeviceProperties properties;
  properties.multiProcessorCount = cuda_emu::g_runtime.multiprocessors;
  return &properties;
}

}  // namespace at::cuda
