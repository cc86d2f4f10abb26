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

// Launch `kernel` (argument struct `args`) with `bytes` of dynamic shared memory, opting in once
// per device (`configured`: static in the caller).
template <class Kernel, class Args>
cudaError_t launch_with_smem(Kernel kernel, dim3 grid, int threads, int bytes,
                             std::atomic<uint64_t>& configured, const Args& args,
                             cudaStream_t stream) {
  const cudaError_t err = opt_in_dynamic_smem(kernel, bytes, configured);
  if (err != cudaSuccess) return err;
  kernel<<<grid, threads, bytes, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace tmla
