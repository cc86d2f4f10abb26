// SM90 sparse_decode: tile shapes, per-layout byte facts, and the shared-memory plan.
//
// One CTA = 256 threads (8 warps) = one (64-head group, s_q token, schedule part). It walks the
// batch elements and 64-key tiles of its part; per tile it
//   1. gathers the 64 tokens' FP8 bytes into a staging buffer with cp.async (issued one tile
//      ahead, so the gather of tile k+1 overlaps the math of tile k),
//   2. dequantizes staging -> K [64 keys x d_qk] bf16 in shared memory (invalid keys -> 0),
//   3. S = Q K^T with mma.sync m16n8k16 (warp (wm, wn): heads 16 wm.., keys 32 wn..),
//   4. online softmax in fp32 (log2 domain), the two warps of a head group exchanging row maxima,
//   5. O += P V with V = the first 512 columns of the same K tile (warp (wm, wn): heads 16 wm..,
//      value columns 256 wn..; 128 f32 accumulators per thread).
#pragma once

#include "torch_mla_native.h"

namespace tmla::sm90::sparse_decode {

constexpr int kThreads = 256;
constexpr int kBlockM = 64;  // heads per CTA
constexpr int kBlockN = 64;  // keys per tile (= schedule block_n)
constexpr int kDv = 512;     // value columns accumulated

template <int LAYOUT>
struct Layout;

// V32: per token 656 contiguous bytes: 512 e4m3 NoPE | 4 f32 scales | 64 bf16 RoPE.
template <>
struct Layout<TMLA_LAYOUT_V32> {
  static constexpr int kDqk = 576;
  static constexpr int kDnope = 512;
  static constexpr int kNopeChunks = 8;   // 64-column chunks of NoPE
  static constexpr int kTokenBytes = 656;  // bytes gathered per token (one contiguous row)
  static constexpr int kScaleOffset = 512;  // f32 scale of NoPE column c at 512 + 4 (c / 128)
  static constexpr int kRopeOffset = 528;
  static constexpr int kScaleBytes = 0;  // no separate scale section
};

// MODEL1: per token 576 data bytes (448 e4m3 NoPE | 64 bf16 RoPE) at block + t * 576, and 8
// scale bytes (7 ue8m0, one per 64 NoPE columns, + pad) at block + block_size * 576 + t * 8.
template <>
struct Layout<TMLA_LAYOUT_MODEL1> {
  static constexpr int kDqk = 512;
  static constexpr int kDnope = 448;
  static constexpr int kNopeChunks = 7;
  static constexpr int kTokenBytes = 576;
  static constexpr int kScaleOffset = -1;  // unused
  static constexpr int kRopeOffset = 448;
  static constexpr int kScaleBytes = 8;
};

// Shared memory, in bytes from the dynamic smem base (all offsets multiples of 128).
template <int LAYOUT>
struct SmemPlan {
  using L = Layout<LAYOUT>;
  // Row strides in bf16 elements. +8 elements (16 B) per row: consecutive rows start 16 B
  // apart modulo 128 B, so the 8 row addresses of one ldmatrix hit 8 distinct bank groups.
  static constexpr int kQStride = L::kDqk + 8;
  static constexpr int kPStride = kBlockN + 8;

  static constexpr int a128(int x) { return (x + 127) / 128 * 128; }
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + a128(kBlockM * kQStride * 2);
  static constexpr int kRaw = kK + a128(kBlockN * kQStride * 2);
  static constexpr int kRawScale = kRaw + a128(kBlockN * L::kTokenBytes);
  static constexpr int kP = kRawScale + a128(kBlockN * L::kScaleBytes);
  static constexpr int kRedMax = kP + a128(kBlockM * kPStride * 2);  // f32 [2][64]
  static constexpr int kRedSum = kRedMax + a128(2 * kBlockM * 4);    // f32 [2][64]
  static constexpr int kValid = kRedSum + a128(2 * kBlockM * 4);     // u8 [2 bufs][64 keys]
  static constexpr int kBytes = kValid + a128(2 * kBlockN);
  static_assert(kBytes <= 227 * 1024, "shared memory plan exceeds the 227 KB of an SM90 CTA");
};

}  // namespace tmla::sm90::sparse_decode
