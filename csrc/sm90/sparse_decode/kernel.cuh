// SM90 sparse_decode main kernel (split-KV over the decode schedule). The design is described
// in config.h and csrc/README.md; this file is included by one translation unit per layout
// (instantiations/*.cu).
//
// Invariants the code relies on (each is what makes a step safe without extra barriers):
// * Every CTA-wide __syncthreads() separates "all warps finished reading buffer X" from "some
//   thread overwrites X". Per tile: [wait cp.async, sync] dequant -> K [sync] issue next gather
//   into staging + compute on K. K is rewritten only after the next top-of-tile sync, staging
//   only after the post-dequant sync.
// * The two warps sharing 16 heads (wm, wn = 0/1) meet at named barrier 1 + wm (64 threads)
//   to exchange row maxima, P, and finally row sums; both compute bit-identical running maxima.
// * Invalid keys (index < 0, >= num_blocks * block_size, or position >= length) are never
//   loaded: their K rows are written as zeros and their logits set to -inf, so garbage or NaN
//   in unused cache slots cannot reach the result (p = 0 multiplies a zero row, not NaN).
#pragma once

#include <atomic>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common/decode_epilogue.cuh"
#include "common/fp8.cuh"
#include "common/launch.h"
#include "common/sparse_decode.h"
#include "common/utils.cuh"
#include "sm90/sparse_decode/config.h"

namespace tmla::sm90::sparse_decode {

using bf16 = __nv_bfloat16;

// The tiles one CTA runs for one batch element: ntm tiles of main keys starting at position
// m_lo, then nte tiles of extra keys starting at e_lo. lm / le: valid-position bounds.
struct Ranges {
  int ntm, nte, m_lo, e_lo, lm, le;
};

// Index of token `tok` of tile k (-1 when the position is past its set's length or k >= nt).
__device__ __forceinline__ int load_index(const int* row_m, const int* row_e, const Ranges& r,
                                          int k, int tok) {
  if (k >= r.ntm + r.nte) return -1;
  const bool ex = k >= r.ntm;
  const int pos = ex ? r.e_lo + (k - r.ntm) * kBlockN + tok : r.m_lo + k * kBlockN + tok;
  if (pos >= (ex ? r.le : r.lm)) return -1;
  return __ldg((ex ? row_e : row_m) + pos);
}

template <int LAYOUT>
__global__ void __launch_bounds__(kThreads, 1) sparse_decode_kernel(const SparseDecodeArgs a) {
  using L = Layout<LAYOUT>;
  using Plan = SmemPlan<LAYOUT>;
  constexpr int kQS = Plan::kQStride;
  constexpr int kPS = Plan::kPStride;
  constexpr int kKSteps = L::kDqk / 16;

  extern __shared__ __align__(128) uint8_t smem[];
  bf16* sQ = reinterpret_cast<bf16*>(smem + Plan::kQ);
  bf16* sK = reinterpret_cast<bf16*>(smem + Plan::kK);
  uint8_t* sRaw = smem + Plan::kRaw;
  uint8_t* sRawScale = smem + Plan::kRawScale;
  bf16* sP = reinterpret_cast<bf16*>(smem + Plan::kP);
  float* sRedMax = reinterpret_cast<float*>(smem + Plan::kRedMax);
  float* sRedSum = reinterpret_cast<float*>(smem + Plan::kRedSum);
  uint8_t* sValid = smem + Plan::kValid;

  const int hg = blockIdx.x;    // 64-head group
  const int s = blockIdx.y;     // query token
  const int part = blockIdx.z;  // schedule part
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp & 3;  // heads 16 wm .. 16 wm + 15
  const int wn = warp >> 2;  // QK: keys 32 wn ..; PV: value columns 256 wn ..
  const int g = lane >> 2;   // mma fragment row
  const int tig = lane & 3;  // mma fragment column pair
  const int tok = tid >> 2;  // gather / dequant: token of the tile
  const int q4 = tid & 3;    // gather / dequant: quarter of the token

  const int* meta = a.sched + part * kScheduleWidth;
  const int b_begin = __ldg(meta + 0);
  const int blk_begin = __ldg(meta + 1);
  const int b_end = __ldg(meta + 2);
  const int blk_end = __ldg(meta + 3);
  const int first_split = __ldg(meta + 4);
  // Schedule blocks are of meta[5] keys (0 in older schedules: 64). A part's blocks [lo, hi)
  // are keys [lo * bn, hi * bn) of its batch element; it runs the 64-key tiles whose first key
  // lies there, so consecutive parts still split a batch element's tiles exactly.
  const int sched_bn = __ldg(meta + 5) > 0 ? __ldg(meta + 5) : kBlockN;
  if (b_begin >= a.b) return;  // empty part (uniform over the CTA)
  const int b_last = min(b_end, a.b - 1);
  const bool has_extra = a.extra.indices != nullptr;

  // ------------------------------------------------------------------------------------------
  // per-tile stages
  // ------------------------------------------------------------------------------------------

  // Gather tile k's bytes for this thread's token quarter into staging, record validity.
  auto issue = [&](const Ranges& r, int k, int idx, int buf) {
    const bool ex = k >= r.ntm;
    const int64_t slots = ex ? a.extra.num_slots : a.main.num_slots;
    const bool valid = idx >= 0 && static_cast<int64_t>(idx) < slots;
    if (q4 == 0) sValid[buf * kBlockN + tok] = valid ? 1 : 0;
    if (valid) {
      const int bs = ex ? a.extra.block_size : a.main.block_size;
      const int blk = idx / bs;
      const int off = idx - blk * bs;
      const uint8_t* base =
          (ex ? a.extra.cache : a.main.cache) + static_cast<int64_t>(blk) *
                                                    (ex ? a.extra.stride_block : a.main.stride_block);
      const uint8_t* src = base + static_cast<int64_t>(off) * L::kTokenBytes;
      uint8_t* dst = sRaw + tok * L::kTokenBytes;
#pragma unroll
      for (int c = q4; c < L::kTokenBytes / 16; c += 4) cp_async_16(dst + 16 * c, src + 16 * c);
      if constexpr (L::kScaleBytes > 0) {
        if (q4 == 0) {
          cp_async_8(sRawScale + tok * L::kScaleBytes,
                     base + static_cast<int64_t>(bs) * L::kTokenBytes +
                         static_cast<int64_t>(off) * L::kScaleBytes);
        }
      }
    }
  };

  // Staging -> K tile (bf16, row = key), zeros for invalid keys.
  auto dequant = [&](int buf) {
    const bool v = sValid[buf * kBlockN + tok] != 0;
    const uint8_t* raw = sRaw + tok * L::kTokenBytes;
    bf16* krow = sK + tok * kQS;
#pragma unroll
    for (int cc = 0; cc < 2; ++cc) {
      const int c = q4 + 4 * cc;  // 64-column NoPE chunk
      if (c < L::kNopeChunks) {
        float scale = 0.f;
        if (v) {
          if constexpr (LAYOUT == TMLA_LAYOUT_V32) {
            scale = *reinterpret_cast<const float*>(raw + L::kScaleOffset + 4 * (c >> 1));
          } else {
            scale = ue8m0_to_float(sRawScale[tok * L::kScaleBytes + c]);
          }
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          uint4 lo = make_uint4(0, 0, 0, 0), hi = lo;
          if (v) dequant16(*reinterpret_cast<const uint4*>(raw + 64 * c + 16 * u), scale, lo, hi);
          *reinterpret_cast<uint4*>(krow + 64 * c + 16 * u) = lo;
          *reinterpret_cast<uint4*>(krow + 64 * c + 16 * u + 8) = hi;
        }
      }
    }
    // RoPE: 64 bf16 stored as is; 16 per thread.
    const uint4* rsrc = reinterpret_cast<const uint4*>(raw + L::kRopeOffset + 32 * q4);
    uint4* rdst = reinterpret_cast<uint4*>(krow + L::kDnope + 16 * q4);
    const uint4 zero = make_uint4(0, 0, 0, 0);
    rdst[0] = v ? rsrc[0] : zero;
    rdst[1] = v ? rsrc[1] : zero;
  };

  // ------------------------------------------------------------------------------------------
  // fragment addresses (fixed per thread)
  // ------------------------------------------------------------------------------------------
  // A operand rows (Q or P): matrix i = lane / 8 covers rows 8 (i & 1).., columns 8 (i >> 1)..
  const int a_row = 16 * wm + (lane & 7) + 8 * ((lane >> 3) & 1);
  const int a_col = 8 * (lane >> 4);
  const bf16* q_frag = sQ + a_row * kQS + a_col;
  const bf16* p_frag = sP + a_row * kPS + a_col;
  // QK B operand from K [key][dim]: matrix i covers keys 8 (i >> 1).., dims 8 (i & 1)..
  const bf16* k_frag = sK + (32 * wn + (lane & 7) + 8 * (lane >> 4)) * kQS + 8 * ((lane >> 3) & 1);
  // PV B operand from the same K [key][dim] (transposed load): matrix i covers keys 8 (i & 1)..,
  // value columns 8 (i >> 1)..
  const bf16* v_frag = sK + ((lane & 7) + 8 * ((lane >> 3) & 1)) * kQS + 256 * wn + 8 * (lane >> 4);
  const int r0 = 16 * wm + g;  // this thread's accumulator rows r0 and r0 + 8
  const int bar_id = 1 + wm;

#pragma unroll 1
  for (int i = b_begin; i <= b_last; ++i) {
    // ---- this part's share of batch element i (same rules as the Triton backend) ----
    const int lm = a.main.lengths ? min(max(__ldg(a.main.lengths + i), 0), a.main.topk) : a.main.topk;
    int le = 0;
    if (has_extra) {
      le = a.extra.lengths ? min(max(__ldg(a.extra.lengths + i), 0), a.extra.topk) : a.extra.topk;
    }
    const int nbm = cdiv(lm, kBlockN);
    const int nb = nbm + cdiv(le, kBlockN);
    const int ns0 = __ldg(a.num_splits + i);
    const int nsp = __ldg(a.num_splits + i + 1) - ns0;
    const int split = i == b_begin ? first_split : ns0;
    int lo = i == b_begin ? static_cast<int>(cdiv64(static_cast<int64_t>(blk_begin) * sched_bn, kBlockN)) : 0;
    int hi = i == b_end ? static_cast<int>(cdiv64(static_cast<int64_t>(blk_end) * sched_bn, kBlockN)) : nb;
    if (split - ns0 == nsp - 1) hi = nb;  // the last part of a batch element runs to its end
    hi = min(hi, nb);
    lo = max(min(lo, hi), 0);
    if (nsp <= 0 || split < 0 || split >= a.n_ws) continue;  // uniform over the CTA
    Ranges r;
    r.lm = lm;
    r.le = le;
    r.m_lo = min(lo, nbm) * kBlockN;
    r.ntm = min(hi, nbm) - min(lo, nbm);
    r.e_lo = (max(lo, nbm) - nbm) * kBlockN;
    r.nte = max(hi, nbm) - max(lo, nbm);
    const int nt = r.ntm + r.nte;

    const int* row_m = a.main.indices + i * a.main.stride_b + s * a.main.stride_s;
    const int* row_e = has_extra ? a.extra.indices + i * a.extra.stride_b + s * a.extra.stride_s
                                 : row_m;

    __syncthreads();  // the previous batch element is done with every shared buffer

    int idx_next = -1;
    if (nt > 0) {
      // Q [64 heads x d_qk] -> shared (heads >= h_q as zeros: their rows are computed, never stored)
      const bf16* qb = a.q + i * a.q_stride_b + s * a.q_stride_s;
      constexpr int kChunks = L::kDqk / 8;
#pragma unroll 2
      for (int c = tid; c < kBlockM * kChunks; c += kThreads) {
        const int row = c / kChunks;
        const int ch = c - row * kChunks;
        const int head = kBlockM * hg + row;
        bf16* dst = sQ + row * kQS + 8 * ch;
        if (head < a.h_q) {
          cp_async_16(dst, qb + head * a.q_stride_h + 8 * ch);
        } else {
          *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
        }
      }
      issue(r, 0, load_index(row_m, row_e, r, 0, tok), 0);
      cp_async_commit();
      idx_next = load_index(row_m, row_e, r, 1, tok);
    }

    float acc[32][4];
#pragma unroll
    for (int j = 0; j < 32; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY;  // running max (log2 domain) of rows r0, r0 + 8
    float l0 = 0.f, l1 = 0.f;              // this thread's share of the running sums

#pragma unroll 1
    for (int k = 0; k < nt; ++k) {
      const int buf = k & 1;
      cp_async_wait_all();
      __syncthreads();  // tile k (and Q) landed for every thread; K is free
      dequant(buf);
      __syncthreads();  // K ready; staging free
      if (k + 1 < nt) {
        issue(r, k + 1, idx_next, buf ^ 1);
        cp_async_commit();
        idx_next = load_index(row_m, row_e, r, k + 2, tok);  // consumed one tile later
      }

      // ---- S = Q K^T for 16 heads x 32 keys ----
      float sacc[4][4];
#pragma unroll
      for (int t = 0; t < 4; ++t) sacc[t][0] = sacc[t][1] = sacc[t][2] = sacc[t][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        uint32_t af[4], bfr[4][2];
        ldsm_x4(q_frag + 16 * kk, af[0], af[1], af[2], af[3]);
        ldsm_x4(k_frag + 16 * kk, bfr[0][0], bfr[0][1], bfr[1][0], bfr[1][1]);
        ldsm_x4(k_frag + 16 * kQS + 16 * kk, bfr[2][0], bfr[2][1], bfr[3][0], bfr[3][1]);
#pragma unroll
        for (int t = 0; t < 4; ++t) mma_bf16_16816(sacc[t], af, bfr[t][0], bfr[t][1]);
      }

      // ---- online softmax (log2 domain) ----
      const uint8_t* vflag = sValid + buf * kBlockN + 32 * wn + 2 * tig;
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int t = 0; t < 4; ++t) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const bool v = vflag[8 * t + e] != 0;
          sacc[t][e] = v ? sacc[t][e] * a.scale_log2 : -INFINITY;
          sacc[t][2 + e] = v ? sacc[t][2 + e] * a.scale_log2 : -INFINITY;
          mx0 = fmaxf(mx0, sacc[t][e]);
          mx1 = fmaxf(mx1, sacc[t][2 + e]);
        }
      }
      mx0 = warp_quad_max(mx0);
      mx1 = warp_quad_max(mx1);
      if (tig == 0) {
        sRedMax[wn * kBlockM + r0] = mx0;
        sRedMax[wn * kBlockM + r0 + 8] = mx1;
      }
      named_barrier_sync(bar_id, 64);
      const float mn0 = fmaxf(m0, fmaxf(mx0, sRedMax[(wn ^ 1) * kBlockM + r0]));
      const float mn1 = fmaxf(m1, fmaxf(mx1, sRedMax[(wn ^ 1) * kBlockM + r0 + 8]));
      // A row that has seen no valid key keeps max -inf: shift by 0 there, so that every
      // exp2 below is exp2(-inf) = 0 instead of exp2(-inf - -inf) = NaN.
      const float mu0 = mn0 == -INFINITY ? 0.f : mn0;
      const float mu1 = mn1 == -INFINITY ? 0.f : mn1;
      const float alpha0 = exp2f(m0 - mu0);
      const float alpha1 = exp2f(m1 - mu1);
      m0 = mn0;
      m1 = mn1;
      float ps0 = 0.f, ps1 = 0.f;
      bf16* p_out = sP + r0 * kPS + 32 * wn + 2 * tig;
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const float p0 = exp2f(sacc[t][0] - mu0), p1 = exp2f(sacc[t][1] - mu0);
        const float p2 = exp2f(sacc[t][2] - mu1), p3 = exp2f(sacc[t][3] - mu1);
        ps0 += p0 + p1;
        ps1 += p2 + p3;
        *reinterpret_cast<uint32_t*>(p_out + 8 * t) = pack_bf16x2(p0, p1);
        *reinterpret_cast<uint32_t*>(p_out + 8 * kPS + 8 * t) = pack_bf16x2(p2, p3);
      }
      l0 = l0 * alpha0 + ps0;
      l1 = l1 * alpha1 + ps1;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        acc[j][0] *= alpha0;
        acc[j][1] *= alpha0;
        acc[j][2] *= alpha1;
        acc[j][3] *= alpha1;
      }
      named_barrier_sync(bar_id, 64);  // P [16 heads x 64 keys] of both warps in shared

      // ---- O[16 heads x 256 columns] += P V ----
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        uint32_t af[4];
        ldsm_x4(p_frag + 16 * kk, af[0], af[1], af[2], af[3]);
#pragma unroll
        for (int jj = 0; jj < 16; ++jj) {
          uint32_t b0, b1, b2, b3;
          ldsm_x4_trans(v_frag + 16 * kk * kQS + 16 * jj, b0, b1, b2, b3);
          mma_bf16_16816(acc[2 * jj], af, b0, b1);
          mma_bf16_16816(acc[2 * jj + 1], af, b2, b3);
        }
      }
    }

    // ---- finish: total row sums, then out / lse (only part) or a split-KV partial ----
    l0 = warp_quad_sum(l0);
    l1 = warp_quad_sum(l1);
    if (tig == 0) {
      sRedSum[wn * kBlockM + r0] = l0;
      sRedSum[wn * kBlockM + r0 + 8] = l1;
    }
    named_barrier_sync(bar_id, 64);
    const float lt0 = sRedSum[r0] + sRedSum[kBlockM + r0];  // same order in both warps
    const float lt1 = sRedSum[r0 + 8] + sRedSum[kBlockM + r0 + 8];
    write_decode_rows(a, i, s, nsp, split, kBlockM * hg + r0, 256 * wn + 2 * tig, m0, m1, lt0, lt1,
                      wn == 0 && tig == 0, [&](int j, int h, int c) { return acc[j][2 * h + c]; });
  }
}

template <int LAYOUT>
cudaError_t launch(const SparseDecodeArgs& a, cudaStream_t stream) {
  constexpr int kSmem = SmemPlan<LAYOUT>::kBytes;
  static std::atomic<uint64_t> configured{0};
  const dim3 grid(cdiv(a.h_q, 64), a.s_q, a.num_parts);  // (64-head group, query, part)
  return launch_with_smem(sparse_decode_kernel<LAYOUT>, grid, kThreads, kSmem, configured, a,
                          stream);
}

}  // namespace tmla::sm90::sparse_decode

namespace tmla::sm90 {
template <int LAYOUT>
cudaError_t launch_sparse_decode(const SparseDecodeArgs& a, cudaStream_t stream) {
  return sparse_decode::launch<LAYOUT>(a, stream);
}
}  // namespace tmla::sm90
