// Device-side decode schedule for sparse_decode calls that pass none (meta/schedule.py has the
// layout; torch_mla/reference/schedule.py the same arithmetic as tensor ops). Work units are
// 64-key blocks counted per key set (cdiv(Lm, 64) + cdiv(Le, 64)), so no block mixes the main
// and the extra cache. One CTA of 1024 threads: two block-wide scans and a binary search per
// part; any batch size (each thread owns a contiguous run of batch elements).
#include <cstdint>

#include <cuda_runtime.h>

#include "common/sparse_decode.h"
#include "common/utils.cuh"

namespace tmla {
namespace {

constexpr int kSchedThreads = 1024;

__device__ __forceinline__ int batch_blocks(const SparseDecodeArgs& a, int i) {
  const int lm =
      a.main.lengths ? min(max(__ldg(a.main.lengths + i), 0), a.main.topk) : a.main.topk;
  int le = 0;
  if (a.extra.indices != nullptr) {
    le = a.extra.lengths ? min(max(__ldg(a.extra.lengths + i), 0), a.extra.topk) : a.extra.topk;
  }
  return cdiv(lm, kDecodeBlockN) + cdiv(le, kDecodeBlockN);
}

// Exclusive prefix sum of v over the CTA; `total` receives the sum of all. Ends with a
// barrier, so `scratch` (32 ints of shared memory) can be reused right away.
__device__ int block_exclusive_scan(int v, int* scratch, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int t = lane < nwarps ? scratch[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, t, o);
      if (lane >= o) t += y;
    }
    scratch[lane] = t;  // inclusive sums of warp totals (each lane rewrites its own entry)
  }
  __syncthreads();
  const int before = warp > 0 ? scratch[warp - 1] : 0;
  total = scratch[nwarps - 1];
  __syncthreads();
  return before + x - v;
}

// First i in [0, n) with ends[i] > x (ends is non-decreasing and ends[n - 1] > x).
__device__ __forceinline__ int upper_bound(const int* ends, int n, int64_t x) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (static_cast<int64_t>(ends[mid]) > x) hi = mid; else lo = mid + 1;
  }
  return lo;
}

__global__ void __launch_bounds__(kSchedThreads)
    decode_schedule_kernel(const SparseDecodeArgs a, int* metadata, int* num_splits, int* ends) {
  __shared__ int scratch[32];
  const int b = a.b;
  const int parts = a.num_parts;
  const int chunk = cdiv(b, kSchedThreads);
  const int i0 = min(static_cast<int>(threadIdx.x) * chunk, b);
  const int i1 = min(i0 + chunk, b);

  // ends[i]: exclusive end of batch i in the global (batch-major) block list
  int local = 0;
  for (int i = i0; i < i1; ++i) local += batch_blocks(a, i);
  int total = 0;
  int run = block_exclusive_scan(local, scratch, total);
  for (int i = i0; i < i1; ++i) {
    run += batch_blocks(a, i);
    ends[i] = run;
  }
  const int per = max(cdiv(total, parts), 1);  // blocks per part

  // num_splits: exclusive prefix sum of the number of parts touching each batch element
  int local_splits = 0;
  for (int i = i0; i < i1; ++i) {
    const int nb = batch_blocks(a, i);
    const int start = ends[i] - nb;
    local_splits += nb > 0 ? (ends[i] - 1) / per - start / per + 1 : 0;
  }
  int total_splits = 0;
  run = block_exclusive_scan(local_splits, scratch, total_splits);
  for (int i = i0; i < i1; ++i) {
    num_splits[i] = run;
    const int nb = batch_blocks(a, i);
    const int start = ends[i] - nb;
    run += nb > 0 ? (ends[i] - 1) / per - start / per + 1 : 0;
  }
  if (threadIdx.x == 0) num_splits[b] = total_splits;
  __syncthreads();  // ends and num_splits (global memory) visible to the whole CTA

  for (int p = threadIdx.x; p < parts; p += kSchedThreads) {
    const int64_t g_begin = min(static_cast<int64_t>(p) * per, static_cast<int64_t>(total));
    const int64_t g_end = min(g_begin + per, static_cast<int64_t>(total));
    int row[kScheduleWidth] = {b, 0, b, 0, total_splits, kDecodeBlockN, 0, 0};  // empty part
    if (g_begin < g_end) {
      const int bb = upper_bound(ends, b, g_begin);
      const int lb = upper_bound(ends, b, g_end - 1);
      const int start_b = ends[bb] - batch_blocks(a, bb);
      const int start_l = ends[lb] - batch_blocks(a, lb);
      row[0] = bb;
      row[1] = static_cast<int>(g_begin - start_b);
      row[2] = lb;
      row[3] = static_cast<int>(g_end - start_l);
      row[4] = num_splits[bb] + (p - start_b / per);
    }
#pragma unroll
    for (int c = 0; c < kScheduleWidth; ++c) metadata[p * kScheduleWidth + c] = row[c];
  }
}

}  // namespace

cudaError_t launch_decode_schedule(const SparseDecodeArgs& a, int* metadata, int* num_splits,
                                   int* scratch, cudaStream_t stream) {
  decode_schedule_kernel<<<1, kSchedThreads, 0, stream>>>(a, metadata, num_splits, scratch);
  return cudaGetLastError();
}

}  // namespace tmla
