// Split-KV combine for the decode kernels. One CTA of 128 threads per (batch element, query
// token, head); each thread owns 4 of the 512 value columns. A batch element with exactly one
// split was finished by the main kernel (nothing to do here); one with none has no key: out 0,
// lse +inf; otherwise the partials (normalized outputs, log2-sum-exp) merge with weights
// exp2(lse_k - max) and the attention sink is applied to the merged result.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common/sparse_decode.h"
#include "common/utils.cuh"

namespace tmla {
namespace {

constexpr int kCombineThreads = kDecodeDvMax / 4;

__global__ void __launch_bounds__(kCombineThreads) decode_combine_kernel(const SparseDecodeArgs a) {
  const int row = blockIdx.x;  // i * s_q + s
  const int h = blockIdx.y;
  const int i = row / a.s_q;
  const int s = row - i * a.s_q;
  const int ns0 = __ldg(a.num_splits + i);
  const int ns1 = __ldg(a.num_splits + i + 1);
  if (ns1 - ns0 == 1) return;
  const int end = min(ns1, a.n_ws);  // a valid schedule never exceeds n_ws splits

  float mx = -INFINITY;
  for (int k = ns0; k < end; ++k) {
    mx = fmaxf(mx, a.ws_lse[(static_cast<int64_t>(k) * a.s_q + s) * a.h_q + h]);
  }
  const bool has = mx > -INFINITY;
  const int col = 4 * threadIdx.x;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  float wsum = 0.f;
  if (has) {
    for (int k = ns0; k < end; ++k) {
      const int64_t wrow = (static_cast<int64_t>(k) * a.s_q + s) * a.h_q + h;
      const float w = exp2f(a.ws_lse[wrow] - mx);  // an empty split: exp2(-inf) = 0
      wsum += w;
      const float4 o = *reinterpret_cast<const float4*>(a.ws_o + wrow * kDecodeDvMax + col);
      acc.x += w * o.x;
      acc.y += w * o.y;
      acc.z += w * o.z;
      acc.w += w * o.w;
    }
  }
  const float lse2 = has ? mx + log2f(wsum) : INFINITY;
  float inv = has ? 1.f / wsum : 0.f;
  if (has && a.attn_sink != nullptr) {
    inv = inv / (1.f + exp2f(__ldg(a.attn_sink + h) * kLog2e - lse2));
  }
  __nv_bfloat16* o = a.out + (static_cast<int64_t>(row) * a.h_q + h) * a.d_v;
  const float v[4] = {acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv};
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    if (col + c < a.d_v) o[col + c] = __float2bfloat16_rn(v[c]);
  }
  if (threadIdx.x == 0) {
    a.lse[(static_cast<int64_t>(i) * a.h_q + h) * a.s_q + s] = has ? lse2 * kLn2 : INFINITY;
  }
}

}  // namespace

cudaError_t launch_decode_combine(const SparseDecodeArgs& a, cudaStream_t stream) {
  const dim3 grid(a.b * a.s_q, a.h_q);
  decode_combine_kernel<<<grid, kCombineThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace tmla
