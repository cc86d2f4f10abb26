// The end of a sparse_decode tile, shared by the SM90 kernels: one thread's share of a finished
// (batch element i, query token s, 64-head group) result goes to out / lse, or, when the schedule
// split the batch element, to the split-KV workspace for the combine kernel.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>

#include "common/sparse_decode.h"
#include "common/utils.cuh"

namespace tmla {

// Rows head0 and head0 + 8, value columns col0 + 8 j and col0 + 8 j + 1 (j < 32); acc(j, h, e)
// is the accumulator of row head0 + 8 h, column col0 + 8 j + e. m0 / m1: the rows' running
// maxima (log2 domain); lt0 / lt1: their total sums of exp2 (0: no valid key). write_lse: this
// thread writes its rows' lse. nsp == 1 (the only part of element i): normalize, apply the
// sink (out *= 1 / (1 + exp(sink - lse)); +inf sink -> 0, -inf sink -> 1), write out and the
// natural-log lse (+inf without a key). Otherwise: the normalized partial and its log2-sum-exp
// (-inf without a key) go to workspace row `split`.
template <class Acc>
__device__ __forceinline__ void write_decode_rows(const SparseDecodeArgs& a, int i, int s, int nsp,
                                                  int split, int head0, int col0, float m0, float m1,
                                                  float lt0, float lt1, bool write_lse, Acc acc) {
  const int head1 = head0 + 8;
  const bool has0 = lt0 > 0.f, has1 = lt1 > 0.f;
  const float lse2_0 = has0 ? m0 + log2f(lt0) : -INFINITY;
  const float lse2_1 = has1 ? m1 + log2f(lt1) : -INFINITY;
  float inv0 = has0 ? 1.f / lt0 : 0.f;
  float inv1 = has1 ? 1.f / lt1 : 0.f;

  if (nsp == 1) {
    if (a.attn_sink != nullptr) {
      if (has0 && head0 < a.h_q) inv0 = inv0 / (1.f + exp2f(__ldg(a.attn_sink + head0) * kLog2e - lse2_0));
      if (has1 && head1 < a.h_q) inv1 = inv1 / (1.f + exp2f(__ldg(a.attn_sink + head1) * kLog2e - lse2_1));
    }
    const int d_v = a.d_v;
    const bool pairs = (d_v & 1) == 0;  // 4-byte aligned bf16 pairs
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int head = h ? head1 : head0;
      const float inv = h ? inv1 : inv0;
      if (head < a.h_q) {
        __nv_bfloat16* o = a.out + (static_cast<int64_t>(i) * a.s_q + s) * a.h_q * d_v +
                           static_cast<int64_t>(head) * d_v;
#pragma unroll
        for (int j = 0; j < 32; ++j) {
          const int col = col0 + 8 * j;
          const float v0 = acc(j, h, 0) * inv, v1 = acc(j, h, 1) * inv;
          if (col + 1 < d_v) {
            if (pairs) {
              *reinterpret_cast<uint32_t*>(o + col) = pack_bf16x2(v0, v1);
            } else {
              o[col] = __float2bfloat16_rn(v0);
              o[col + 1] = __float2bfloat16_rn(v1);
            }
          } else if (col < d_v) {
            o[col] = __float2bfloat16_rn(v0);
          }
        }
      }
    }
    if (write_lse) {
      if (head0 < a.h_q) a.lse[(static_cast<int64_t>(i) * a.h_q + head0) * a.s_q + s] = has0 ? lse2_0 * kLn2 : INFINITY;
      if (head1 < a.h_q) a.lse[(static_cast<int64_t>(i) * a.h_q + head1) * a.s_q + s] = has1 ? lse2_1 * kLn2 : INFINITY;
    }
  } else {
    const int64_t wrow = (static_cast<int64_t>(split) * a.s_q + s) * a.h_q;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int head = h ? head1 : head0;
      const float inv = h ? inv1 : inv0;
      if (head < a.h_q) {
        float* w = a.ws_o + (wrow + head) * kDecodeDvMax + col0;
#pragma unroll
        for (int j = 0; j < 32; ++j) {
          *reinterpret_cast<float2*>(w + 8 * j) = make_float2(acc(j, h, 0) * inv, acc(j, h, 1) * inv);
        }
      }
    }
    if (write_lse) {
      if (head0 < a.h_q) a.ws_lse[wrow + head0] = lse2_0;
      if (head1 < a.h_q) a.ws_lse[wrow + head1] = lse2_1;
    }
  }
}

}  // namespace tmla
