// Host-side launch helpers shared by the kernels' launchers.
#pragma once

#include <atomic>
#include <cstdint>

#include <cuda_runtime.h>

namespace tmla {

// Opting in to > 48 KB of dynamic shared memory is a per-device function attribute: set it once
// per device (`configured`: one bit per device, static in the caller; the call is idempotent,
// so a race between threads only repeats it).
template <class Kernel>
cudaError_t opt_in_dynamic_smem(Kernel kernel, int bytes, std::atomic<uint64_t>& configured) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const uint64_t bit = dev < 64 ? (uint64_t{1} << dev) : 0;
  if (bit == 0 || !(configured.load(std::memory_order_relaxed) & bit)) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err != cudaSuccess) return err;
    configured.fetch_or(bit, std::memory_order_relaxed);
  }
  return cudaSuccess;
}

}  // namespace tmla
