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

// A launch configuration with clusters of `cluster_x` CTAs along x (the attribute lives beside
// the configuration that points at it).
struct ClusterLaunch {
  cudaLaunchConfig_t cfg{};
  cudaLaunchAttribute attr{};
  ClusterLaunch(dim3 grid, int threads, int bytes, int cluster_x, cudaStream_t stream) {
    cfg.gridDim = grid;
    cfg.blockDim = dim3(threads, 1, 1);
    cfg.dynamicSmemBytes = bytes;
    cfg.stream = stream;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = cluster_x;
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;  // cfg.attrs points into this object
  ClusterLaunch& operator=(const ClusterLaunch&) = delete;
};

// How many clusters of `cluster_x` CTAs of `kernel` (`threads`, `bytes` of dynamic shared memory,
// already opted in) the current device holds at once (cluster_x = 1: CTAs). A persistent kernel
// sizes its grid by it: a grid of clusters beyond it runs as extra waves, and a cluster of the
// next wave starts only where all its CTAs fit at once. Cached per device in `cache` (64 slots,
// static in the caller; 0 = not asked yet).
template <class Kernel>
cudaError_t resident_clusters(Kernel kernel, int threads, int bytes, int cluster_x,
                              std::atomic<int>* cache, int* out) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 64 && (*out = cache[dev].load(std::memory_order_relaxed)) > 0) return cudaSuccess;
  int n = 0;
  if (cluster_x > 1) {
    ClusterLaunch l(dim3(cluster_x, 1, 1), threads, bytes, cluster_x, nullptr);
    err = cudaOccupancyMaxActiveClusters(&n, kernel, &l.cfg);
  } else {
    int per_sm = 0, sms = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, bytes);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    n = per_sm * sms;
  }
  if (err != cudaSuccess) return err;
  n = n > 0 ? n : 1;
  if (dev < 64) cache[dev].store(n, std::memory_order_relaxed);
  *out = n;
  return cudaSuccess;
}

// Launch `kernel` as clusters of `cluster_x` CTAs along x (grid.x a multiple of it; 1: no
// clusters) with `bytes` of dynamic shared memory (already opted in).
template <class Kernel, class Args>
cudaError_t launch_clusters(Kernel kernel, dim3 grid, int threads, int bytes, int cluster_x,
                            const Args& args, cudaStream_t stream) {
  ClusterLaunch l(grid, threads, bytes, cluster_x, stream);
  const cudaError_t err = cudaLaunchKernelEx(&l.cfg, kernel, args);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

}  // namespace tmla
