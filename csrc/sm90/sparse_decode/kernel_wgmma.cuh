// SM90 sparse_decode, warp-specialized wgmma kernel: the default (TORCH_MLA_NATIVE_DECODE_WGMMA=0
// selects the serial kernel of kernel.cuh instead); csrc/README.md has its measurements.
//
// One CTA = 384 threads = three warpgroups for one 64-head group; persistent: it walks jobs
// (schedule part, s_q token) with a stride of the grid, one wave of CTAs (the launcher sizes it
// from the occupancy), and within a job the same batch elements and 64-key tiles as the serial
// kernel (kernel.cuh). At h_q = 128, 256, ... two CTAs form a cluster and share each tile (the
// crossover, see the kernel). Per CTA:
// * warpgroup 2, the producer, gathers each tile's 64 tokens with 16-byte non-coherent loads
//   (a warp instruction reads whole 128-byte lines of one or two tokens; indices are read two
//   tiles ahead), dequantizes them (bit-exact with the reference, common/fp8.cuh) straight
//   into one of two bf16 K stages, and signals the stage's `full` mbarrier;
// * warpgroups 0 and 1, the consumers, own value columns 256 w .. 256 w + 255 of O
//   (64 heads x 256 f32 = 128 accumulators a thread). Per tile, warpgroup 0 computes all of
//   S = Q K^T (wgmma 64x64x16, both operands in shared memory) and the online softmax, and
//   writes P (bf16) and the rows' rescale factors to shared memory; each warpgroup then runs
//   O += P V for its 256 columns over all 64 keys (wgmma 64x256x16, V = the first 512 columns
//   of the same K stage read MN-major) and releases the stage through its `empty` mbarrier
//   (one_qk_consumers).
// So dequantization (producer) overlaps the tensor-core work (consumers) of the previous tile,
// and a warpgroup reads each wgmma B operand from shared memory once instead of once per warp.
//
// Shared memory (V32 225 KB, MODEL1 201 KB): Q, two K stages, all [64 x d_qk] bf16 in the
// 128-byte-swizzled K-major layout wgmma reads (Plan::LayoutQK; sw128() is the same map
// written out for the producer's stores), P [64 x 64], row statistics, validity flags.
//
// Synchronization (s = tile counter & 1, phase = (tile counter >> 1) & 1):
// * A stage fills in two column halves, 0..255 and the rest (RoPE included): full[s] and
//   full_hi[s] take the 128 producer threads' arrivals (full_hi also waits for their RoPE
//   cp.async copies); with the crossover, remote[s] / remote_hi[s] complete when the peer's
//   bulk copies of those halves have landed (one local arrival with the expected byte count).
//   Producer stores reach wgmma (the async proxy) through fence.proxy.async before the
//   arrivals; the validity flags ride on full's release.
// * empty[s]: the consumers' release of a stage (256 thread arrivals; crossover: one arrival a
//   consumer warp of both CTAs, 16, since both producers write into both stages). The
//   producer waits empty with the opposite parity, which a fresh barrier satisfies at once.
// * The consumers meet at named barriers (256 threads): kBarP (P and the rescale factors
//   written and fenced), kBarPFree (warpgroup 1 is done with them), kBarSum (row statistics
//   handed to warpgroup 1), kBarElem (before and after loading the next element's Q).
#pragma once

#include <cstdint>

#include <cute/arch/mma_sm90_gmma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "common/cluster.cuh"
#include "sm90/sparse_decode/kernel.cuh"

namespace tmla::sm90::sparse_decode_wgmma {

using namespace cute;
using sparse_decode::kBlockN;
using sparse_decode::Layout;
using sparse_decode::load_index;
using sparse_decode::Ranges;
using bf16 = __nv_bfloat16;
using cbf16 = cutlass::bfloat16_t;

constexpr int kThreads = 384;
constexpr int kConsumerThreads = 256;
constexpr int kStages = 2;
// setmaxnreg budgets. The pool is what the CTA got at launch, 384 x 168 (the launch-bounds cap)
// = 64512 registers. An allocation beyond the pool never completes (the consumers would wait
// forever). The producer holds 8 x 16 bytes of FP8 and their scales in flight; the consumers'
// budgets are at one_qk_consumers.
constexpr int kProducerRegs = 136;
// named barriers (0 is __syncthreads)
constexpr int kBarP = 2, kBarSum = 3, kBarElem = 4, kBarPFree = 5;

template <int LAYOUT>
struct Plan {
  static constexpr int kD = Layout<LAYOUT>::kDqk;
  using LayoutQK =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<cbf16>{}, Shape<_64, Int<kD>>{}));
  // V^T view of a K stage: (value column, key) -> the same element as K (key, column)
  using LayoutVt =
      decltype(composition(LayoutQK{}, make_layout(Shape<_512, _64>{}, Stride<_64, _1>{})));
  using LayoutP = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<cbf16>{}, Shape<_64, _64>{}));
  static constexpr int kTile = 64 * kD * 2;
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kTile;
  static constexpr int kP = kK + kStages * kTile;
  // f32 [2][64]: the rows' final maxima, this tile's rescale factors (one_qk_consumers)
  static constexpr int kRedMax = kP + 64 * 64 * 2;
  static constexpr int kRedSum = kRedMax + 2 * 64 * 4;  // f32 [2][64]: [0] the rows' final sums
  static constexpr int kValid = kRedSum + 2 * 64 * 4;   // u8 [stages][64]
  // u64 full[stages], empty[stages], remote[stages], full_hi[stages], remote_hi[stages]
  static constexpr int kBar = kValid + kStages * 64;
  static constexpr int kBytes = kBar + 5 * kStages * 8;
  // crossover: the NoPE bytes the peer copies into a stage (32 rows: 4 warps x 1 KB a 64 columns)
  static constexpr uint32_t kRemoteBytes = 32 * Layout<LAYOUT>::kDnope * 2;
  static_assert(Layout<LAYOUT>::kDnope % 64 == 0 && kRemoteBytes == Layout<LAYOUT>::kDnope / 64 * 4096,
                "the crossover copies whole 1 KB atoms of 64 columns");
  // A stage fills in two halves, columns 0..255 (`full`, `remote`) and the rest (`full_hi`,
  // `remote_hi`: NoPE 256.., RoPE), so S's first 16 k-blocks start before the rest is there.
  static constexpr int kLoCols = 256;
  static constexpr uint32_t kRemoteLo = 32 * kLoCols * 2, kRemoteHi = kRemoteBytes - kRemoteLo;
  static_assert(kTile % 1024 == 0, "swizzle atoms must stay 1024-byte aligned");
  static_assert(kBytes <= 227 * 1024, "shared memory plan exceeds the 227 KB of an SM90 CTA");
};

// Byte offset of element (row, col) of a [64 x d] bf16 tile in Plan::LayoutQK (8 x 64 atoms of
// 1024 bytes, atoms down the rows first; 16-byte unit u of row r stored at unit u ^ (r % 8)).
__host__ __device__ __forceinline__ int sw128(int row, int col) {
  return ((row >> 3) + 8 * (col >> 6)) * 1024 + (row & 7) * 128 +
         ((((col >> 3) & 7) ^ (row & 7)) << 4) + (col & 7) * 2;
}

__device__ __forceinline__ uint4 ldg_stream_16(const uint8_t* p) {
  uint4 v;
  // (.L2::256B, a prefetch of the rest of the token's lines into L2, measured no faster: V32
  // b=128 515 vs 518 us, MODEL1 h_q=128 + extra 1024 335 vs 336 us)
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// What one CTA does for batch element i: its tile ranges, and where its result goes.
struct ElementPlan {
  Ranges r;
  int split, nsp;
  bool run;
};

// The same rules as the serial kernel (and the Triton backend): the schedule part's key blocks
// of element i, rounded to 64-key tiles per key set.
__device__ __forceinline__ ElementPlan element_plan(const SparseDecodeArgs& a, int i, int b_begin,
                                                    int blk_begin, int b_end, int blk_end,
                                                    int first_split, int sched_bn) {
  const int lm = a.main.lengths ? min(max(__ldg(a.main.lengths + i), 0), a.main.topk) : a.main.topk;
  int le = 0;
  if (a.extra.indices != nullptr) {
    le = a.extra.lengths ? min(max(__ldg(a.extra.lengths + i), 0), a.extra.topk) : a.extra.topk;
  }
  const int nbm = cdiv(lm, kBlockN);
  const int nb = nbm + cdiv(le, kBlockN);
  const int ns0 = __ldg(a.num_splits + i);
  ElementPlan e;
  e.nsp = __ldg(a.num_splits + i + 1) - ns0;
  e.split = i == b_begin ? first_split : ns0;
  int lo = i == b_begin ? static_cast<int>(cdiv64(static_cast<int64_t>(blk_begin) * sched_bn, kBlockN)) : 0;
  int hi = i == b_end ? static_cast<int>(cdiv64(static_cast<int64_t>(blk_end) * sched_bn, kBlockN)) : nb;
  if (e.split - ns0 == e.nsp - 1) hi = nb;  // the last part of a batch element runs to its end
  hi = min(hi, nb);
  lo = max(min(lo, hi), 0);
  e.run = !(e.nsp <= 0 || e.split < 0 || e.split >= a.n_ws);
  e.r.lm = lm;
  e.r.le = le;
  e.r.m_lo = min(lo, nbm) * kBlockN;
  e.r.ntm = min(hi, nbm) - min(lo, nbm);
  e.r.e_lo = (max(lo, nbm) - nbm) * kBlockN;
  e.r.nte = max(hi, nbm) - max(lo, nbm);
  return e;
}

// Job j of the persistent grid: query token j % s_q of schedule part j / s_q, and that part's
// metadata row (an empty part has b_begin >= b, so its element loop does nothing).
struct JobPlan {
  int s, b_begin, blk_begin, b_end, blk_end, first_split, sched_bn, b_last;
};

__device__ __forceinline__ JobPlan job_plan(const SparseDecodeArgs& a, int job) {
  JobPlan p;
  p.s = job % a.s_q;
  const int* meta = a.sched + (job / a.s_q) * kScheduleWidth;
  p.b_begin = __ldg(meta + 0);
  p.blk_begin = __ldg(meta + 1);
  p.b_end = __ldg(meta + 2);
  p.blk_end = __ldg(meta + 3);
  p.first_split = __ldg(meta + 4);
  p.sched_bn = __ldg(meta + 5) > 0 ? __ldg(meta + 5) : kBlockN;
  p.b_last = min(p.b_end, a.b - 1);
  return p;
}

// Lane i < 16 of a producer warp: the row address (0 = invalid key) of the token whose index it
// holds, and, MODEL1, of its scale word. It writes nothing to shared memory, so the next tile's
// rows are resolved, and their loads issued, before that tile's stage is free.
struct TokenRow {
  uint64_t row, srow;
};

template <int LAYOUT>
__device__ __forceinline__ TokenRow resolve_token_row(const SparseDecodeArgs& a, const Ranges& r,
                                                      int k, int idx, int lane) {
  using L = Layout<LAYOUT>;
  TokenRow t{0, 0};
  const bool ex = k >= r.ntm;
  const int64_t slots = ex ? a.extra.num_slots : a.main.num_slots;
  if (lane < 16 && idx >= 0 && static_cast<int64_t>(idx) < slots) {
    const int bs = ex ? a.extra.block_size : a.main.block_size;
    const int blk = idx / bs;
    const int off = idx - blk * bs;
    const uint8_t* base = (ex ? a.extra.cache : a.main.cache) +
                          static_cast<int64_t>(blk) * (ex ? a.extra.stride_block : a.main.stride_block);
    t.row = reinterpret_cast<uint64_t>(base + static_cast<int64_t>(off) * L::kTokenBytes);
    if constexpr (L::kScaleBytes > 0) {
      t.srow = reinterpret_cast<uint64_t>(base + static_cast<int64_t>(bs) * L::kTokenBytes +
                                          static_cast<int64_t>(off) * L::kScaleBytes);
    }
  }
  return t;
}

// Lane src_lane's 64-bit value as a pointer (a full-warp shuffle: every lane must call it).
__device__ __forceinline__ const uint8_t* lane_ptr(uint64_t v, int src_lane) {
  const uint32_t lo = __shfl_sync(0xffffffffu, static_cast<uint32_t>(v), src_lane);
  const uint32_t hi = __shfl_sync(0xffffffffu, static_cast<uint32_t>(v >> 32), src_lane);
  return reinterpret_cast<const uint8_t*>((static_cast<uint64_t>(hi) << 32) | lo);
}

// One batch of a producer warp's NoPE loads, in registers from issue to store: 8 x 16 bytes of
// e4m3 a lane and their scales (V32: the f32 scale's bits; MODEL1: the ue8m0 byte). An invalid
// key loads nothing and keeps zero bytes, which dequantize to +0 under any finite scale.
struct RawBatch {
  uint4 raw[8];
  uint32_t scale[8];
};

// A producer warp owns two 8-row swizzle atoms of each tile (its 16 tokens: token i is row
// 8 atom(i / 8) + i % 8): atoms 2 wp, 2 wp + 1, or, crossover, 4 half + wp (in its CTA's half of
// the rows, whose NoPE it gathers and then copies on to the peer: one contiguous KB a 64-column
// block) and 4 (1 - half) + wp (in the peer's half: only its RoPE and validity flags).
__device__ __forceinline__ int warp_atom(int j, int wp, int half) {
  return half < 0 ? 2 * wp + j : 4 * (j == 0 ? half : 1 - half) + wp;
}

__device__ __forceinline__ int token_row(int i, int wp, int half) {
  return 8 * warp_atom(i >> 3, wp, half) + (i & 7);
}

// Where the producer's stores of a batch go: its K stage (crossover: the producer loop's bulk
// copy then sends this CTA's rows of the NoPE columns on to the peer).
struct StageDst {
  uint8_t* ktile;
  bool dequant;  // false: profiling probe 2
  bool local;    // false: profiling probe 256 (no stores)
};

__device__ __forceinline__ void store_16(const StageDst& d, int off, uint4 v) {
  if (d.local) *reinterpret_cast<uint4*>(d.ktile + off) = v;
}

// V32 producer (MODEL1 measured faster with the "single" mapping below), one warp: its 16 rows
// of a tile: the row pairs (tokens 2 q, 2 q + 1), q = 0..7, of its two atoms (token_row); lane
// i < 16 holds the index of the warp's token i and resolves its address (`row`); the other lanes
// get it by shuffles.
// NoPE: one load instruction covers 16-byte chunks 16 g .. 16 g + 15 of both rows of pair q
// (lane l: row bit b = (l / 4) % 2, chunk 16 g + l % 4 + 4 (l / 8)), i.e. whole 128-byte lines;
// a batch is the 4 pairs of one atom. The two rows of a pair differ in the lowest bit of
// row % 8, so the 8 lanes of each 16-byte store phase hit 8 different bank groups of the
// swizzled tile with no data shuffling. RoPE (128 bytes) goes by cp.async, lanes 8 j .. 8 j + 7
// one token.
// (Measured at V32 b=128: two threads a token with 16 consecutive loads each: 930 us; one
// token a load instruction with per-token address math and selects: 638 us; all 8 pairs in
// flight instead of two batches of 4: 624 vs 609 us.)
template <int LAYOUT>
__device__ __forceinline__ RawBatch gather_pairs(uint64_t row, int q0, int lane, bool no_loads) {
  static_assert(LAYOUT == TMLA_LAYOUT_V32, "MODEL1 uses the single mapping");
  using L = Layout<LAYOUT>;
  const int b = (lane >> 2) & 1;                // which row of the pair
  const int cl = (lane & 3) + 4 * (lane >> 3);  // chunk within the group of 16
  RawBatch x;
#pragma unroll
  for (int qq = 0; qq < 4; ++qq) {
    // (shuffles stay outside the branch below: every lane must take part)
    const uint8_t* src = lane_ptr(row, 2 * (q0 + qq) + b);
#pragma unroll
    for (int g = 0; g < 2; ++g) {
      const int u = 2 * qq + g;
      const int c = 16 * g + cl;
      x.raw[u] = make_uint4(0, 0, 0, 0);
      x.scale[u] = 0;
      if (src != nullptr && !no_loads) {
        x.raw[u] = ldg_stream_16(src + 16 * c);
        x.scale[u] = __ldg(reinterpret_cast<const uint32_t*>(src + L::kScaleOffset) + (c >> 3));
      }
    }
  }
  return x;
}

// The batch of atom `atom` (pairs q = 0..3 of it: rows 8 atom + 2 q, 8 atom + 2 q + 1), chunk
// group G (columns 256 G ..; -1: both).
template <int LAYOUT, int G = -1>
__device__ __forceinline__ void store_pairs(const RawBatch& x, int atom, int lane, const StageDst& d) {
  const int b = (lane >> 2) & 1;                // which row of the pair
  const int cl = (lane & 3) + 4 * (lane >> 3);  // chunk within the group of 16
  // sw128 of row 8 atom + 2 q + b, columns 16 cl (lo) and 16 cl + 8 (hi), without the row's
  // 16-byte unit XOR by 2 q (applied per pair below); group g adds 4 column blocks = 32768 g
  const int base = atom * 1024 + b * 128 + (cl >> 2) * 8192;
  const int unit_lo = ((2 * cl) & 7) ^ b, unit_hi = ((2 * cl + 1) & 7) ^ b;
#pragma unroll
  for (int u = 0; u < 8; ++u) {
    const int q = u >> 1, g = u & 1;
    if (G >= 0 && g != G) continue;
    uint4 lo = x.raw[u], hi = x.raw[u];
    if (d.dequant) dequant16(x.raw[u], __uint_as_float(x.scale[u]), lo, hi);
    const int row_off = base + 256 * q + 32768 * g;
    store_16(d, row_off + ((unit_lo ^ (2 * q)) << 4), lo);
    store_16(d, row_off + ((unit_hi ^ (2 * q)) << 4), hi);
  }
}

// The warp's 16 validity flags and RoPE copies (every CTA of a crossover pair copies all rows'
// RoPE itself: 128 bytes a token by cp.async, cheaper than sharing them).
template <int LAYOUT>
__device__ __forceinline__ void rope_tokens(uint64_t row, int wp, int half, int lane, uint8_t* ktile,
                                            uint8_t* flags, bool no_loads) {
  using L = Layout<LAYOUT>;
  if (lane < 16) flags[token_row(lane, wp, half)] = row != 0 ? 1 : 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int i = 4 * j + (lane >> 3);  // the warp's token i
    const uint8_t* src = lane_ptr(row, i);
    uint8_t* dst = ktile + sw128(token_row(i, wp, half), L::kDnope + 8 * (lane & 7));
    if (src != nullptr && !no_loads) {
      cp_async_16(dst, src + L::kRopeOffset + 16 * (lane & 7));
    } else if (src == nullptr) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    }
  }
}

// MODEL1 producer, one warp: its 16 tokens (token_row) of a tile. (The paired mapping
// above made MODEL1 slower, 185 vs 158 us at h_q=64 + extra 512 and 559 vs 458 us at h_q=128 +
// extra 1024, H100, 2026-11-25, while it sped up every V32 row; why was not measured.) Lane i
// (< 16) holds the index of token i and resolves its address; the other lanes get it by
// shuffles. Every load instruction of the warp reads whole 128-byte lines: for NoPE, lane l takes
// 16-byte chunk l of one token (V32: chunks 0..31 = 512 bytes; MODEL1: 0..27 = 448 bytes, lanes
// 28..31 idle), so one instruction moves a whole token, and a batch is tokens b8 .. b8 + 7; for
// RoPE (128 bytes), lanes 8 j .. 8 j + 7 copy one token's 8 pieces with cp.async. (A first version
// gave each thread half a token, 16 consecutive 16-byte loads: every warp instruction touched 32
// lines, and the producer took 2.6x as long as the consumers. 16 loads in flight do not fit the
// producer's registers.)
template <int LAYOUT>
__device__ __forceinline__ RawBatch gather_single(const TokenRow& t, int b8, int lane, bool no_loads) {
  using L = Layout<LAYOUT>;
  const bool nope_lane = lane < L::kDnope / 16;  // 32 or 28 lanes
  RawBatch x;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    // (shuffles stay outside the branch below: every lane must take part)
    const uint8_t* src = lane_ptr(t.row, b8 + i);
    const uint8_t* ssrc = L::kScaleBytes > 0 ? lane_ptr(t.srow, b8 + i) : nullptr;
    x.raw[i] = make_uint4(0, 0, 0, 0);
    x.scale[i] = 0;
    if (src != nullptr && nope_lane && !no_loads) {
      x.raw[i] = ldg_stream_16(src + 16 * lane);
      if constexpr (LAYOUT == TMLA_LAYOUT_V32) {
        x.scale[i] = __ldg(reinterpret_cast<const uint32_t*>(src + L::kScaleOffset) + (lane >> 3));
      } else {
        x.scale[i] = __ldg(ssrc + (lane >> 2));
      }
    }
  }
  return x;
}

// The batch of atom `atom` (its 8 rows, one token each).
template <int LAYOUT>
__device__ __forceinline__ void store_single(const RawBatch& x, int atom, int lane, const StageDst& d) {
  if (lane >= Layout<LAYOUT>::kDnope / 16) return;
  // 16-byte units 2 l, 2 l + 1 of the row; lanes whose atom index (l / 4) is odd store the high
  // unit first, so the 8 lanes of a store phase hit 8 different bank groups
  const bool swap = ((lane >> 2) & 1) != 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    uint4 lo = x.raw[i], hi = x.raw[i];
    // (An integer-op path for power-of-two scales, e4m3 bits re-biased into bf16 and one bf16
    // multiply, measured slower here: 735 vs 638 us at V32 b=128: the producer is bound by
    // integer issue slots, not by the conversion unit.)
    if (d.dequant) {
      dequant16(x.raw[i],
                LAYOUT == TMLA_LAYOUT_V32 ? __uint_as_float(x.scale[i]) : ue8m0_to_float(x.scale[i]),
                lo, hi);
    }
    const int t = 8 * atom + i;
    const int o0 = sw128(t, 16 * lane), o1 = sw128(t, 16 * lane + 8);
    store_16(d, swap ? o1 : o0, swap ? hi : lo);
    store_16(d, swap ? o0 : o1, swap ? lo : hi);
  }
}

// The consumers with one warpgroup computing S (FlashMLA's split of the work, our code): per
// tile, warpgroup 0 computes all of S = Q K^T [64 heads x 64 keys] (wgmma 64x64x16: Q and K
// each read once from shared memory, where two 64x32 halves read Q twice), runs the online
// softmax over whole rows (no row-max exchange), writes P and the rows' rescale factors to
// shared memory, signals warpgroup 1 (kBarP) and multiplies its value columns 0..255; warpgroup
// 1 only rescales and multiplies columns 256..511. Warpgroup 1's PV of a tile overlaps warpgroup
// 0's S of the next. Warpgroup 0 rewrites P and alpha only after warpgroup 1 has used them
// (kBarPFree, within an element; across elements kBarSum / kBarElem order them). Both
// hand-offs are bar.sync on both sides. Register budgets: 200
// (warpgroup 0: 128 O + 32 S), 168 (warpgroup 1, the launch's), 136 (producer):
// 128 x (200 + 168 + 136) = 384 x 168.
constexpr int kQk1Regs = 200;
static_assert(128 * (kQk1Regs + 168 + kProducerRegs) <= kThreads * 168,
              "register budgets exceed the CTA's pool");

// W: the warpgroup (a template argument, so that each warpgroup's code is its own and ptxas
// allocates it within that warpgroup's register budget).
template <int LAYOUT, bool CROSS, int W>
__device__ __forceinline__ void one_qk_consumers(const SparseDecodeArgs& a, uint8_t* smem,
                                                 uint64_t* full, uint64_t* remote, uint64_t* full_hi,
                                                 uint64_t* remote_hi, uint64_t* empty, int wt) {
  using P = Plan<LAYOUT>;
  constexpr int kD = Layout<LAYOUT>::kDqk;
  constexpr int w = W;
  using Barrier = cutlass::arch::ClusterBarrier;
  if constexpr (W == 0) cutlass::arch::warpgroup_reg_alloc<kQk1Regs>();
  const int tid = threadIdx.x;
  const int hg = blockIdx.x;
  const int num_jobs = a.s_q * a.num_parts;
  const uint8_t* sValid = smem + P::kValid;
  float* sM = reinterpret_cast<float*>(smem + P::kRedMax);  // [64] final row maxima
  float* sAlpha = sM + 64;                                     // [64] this tile's rescale
  float* sL = reinterpret_cast<float*>(smem + P::kRedSum);    // [64] final row sums
  const int lane = wt & 31;
  const int r0 = 16 * (wt >> 5) + (lane >> 2);  // accumulator rows r0, r0 + 8
  const int q2 = 2 * (lane & 3);                // accumulator column pair within 8
  auto mma_qk = make_tiled_mma(SM90_64x64x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>{});
  auto mma_pv = make_tiled_mma(SM90_64x256x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::MN>{});
  auto thr_qk = mma_qk.get_thread_slice(wt);
  auto thr_pv = mma_pv.get_thread_slice(wt);
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<cbf16*>(smem + P::kQ)), typename P::LayoutQK{});
  Tensor sP = make_tensor(make_smem_ptr(reinterpret_cast<cbf16*>(smem + P::kP)), typename P::LayoutP{});
  Tensor tSrQ = thr_qk.partition_fragment_A(sQ);
  Tensor tOrP = thr_pv.partition_fragment_A(sP);
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<_64, _256>{});
  uint8_t* sPb = smem + P::kP;
  const bool producer_alone = (a.probe & 1024) != 0;  // profiling: no math
  int it = 0;

#pragma unroll 1
  for (int job = blockIdx.y; job < num_jobs; job += gridDim.y) {
    const JobPlan jp = job_plan(a, job);
    const int s = jp.s;
#pragma unroll 1
    for (int i = jp.b_begin; i <= jp.b_last; ++i) {
      const ElementPlan e = element_plan(a, i, jp.b_begin, jp.blk_begin, jp.b_end, jp.blk_end,
                                         jp.first_split, jp.sched_bn);
      if (!e.run) continue;  // uniform over the CTA
      const int nt = e.r.ntm + e.r.nte;
      // both warpgroups are past the last element's reads of Q, P and the row statistics
      named_barrier_sync(kBarElem, kConsumerThreads);
      if (nt > 0) {
        // Q [64 heads x d_qk] -> shared (heads >= h_q as zeros: computed, never stored)
        const bf16* qb = a.q + i * a.q_stride_b + s * a.q_stride_s;
        constexpr int kChunks = kD / 8;
#pragma unroll 2
        for (int c = tid; c < 64 * kChunks; c += kConsumerThreads) {
          const int row = c / kChunks;
          const int ch = c - row * kChunks;
          const int head = 64 * hg + row;
          uint8_t* dst = smem + P::kQ + sw128(row, 8 * ch);
          if (head < a.h_q) {
            cp_async_16(dst, qb + head * a.q_stride_h + 8 * ch);
          } else {
            *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
          }
        }
        cp_async_commit();
        cp_async_wait_all();
        cutlass::arch::fence_view_async_shared();
        named_barrier_sync(kBarElem, kConsumerThreads);
      }

      clear(tOrO);
      float m0 = -INFINITY, m1 = -INFINITY;  // warpgroup 0: running max (log2) of rows r0, r0 + 8
      float l0 = 0.f, l1 = 0.f;              // warpgroup 0: this thread's share of the row sums

#pragma unroll 1
      for (int k = 0; k < nt; ++k, ++it) {
        const int st = it & 1;
        const uint32_t ph = (it >> 1) & 1;
        cbf16* kst = reinterpret_cast<cbf16*>(smem + P::kK + st * P::kTile);
        if (W == 1 || producer_alone) {
          if (W == 1 && !producer_alone) named_barrier_sync(kBarP, kConsumerThreads);
          // The stage is complete by now (warpgroup 0 waited for it before S); this warpgroup
          // waits on the same phases too, so its wgmma reads observe the stage directly.
          Barrier::wait(&full[st], ph);
          Barrier::wait(&full_hi[st], ph);
          if constexpr (CROSS) {
            Barrier::wait(&remote[st], ph);
            Barrier::wait(&remote_hi[st], ph);
          }
        }
        if (producer_alone) {
          if constexpr (CROSS) {
            __syncwarp();
            Barrier::arrive(&empty[st], 0u, lane == 0);
            Barrier::arrive(&empty[st], 1u, lane == 0);
          } else {
            Barrier::arrive(&empty[st]);
          }
          continue;
        }
        float alpha0, alpha1;
        if constexpr (W == 0) {
          // ---- S = Q K^T, 64 heads x 64 keys: columns 0..255 on the stage's first half ----
          Barrier::wait(&full[st], ph);
          if constexpr (CROSS) Barrier::wait(&remote[st], ph);
          Tensor sK = make_tensor(make_smem_ptr(kst), typename P::LayoutQK{});
          Tensor tSrK = thr_qk.partition_fragment_B(sK);
          Tensor tSrS = partition_fragment_C(mma_qk, Shape<_64, _64>{});
          warpgroup_fence_operand(tSrS);
          warpgroup_arrive();
          mma_qk.accumulate_ = GMMA::ScaleOut::Zero;
          constexpr int kLoK = P::kLoCols / 16;
          CUTE_UNROLL
          for (int kb = 0; kb < size<2>(tSrQ); ++kb) {
            if (kb == kLoK) {
              Barrier::wait(&full_hi[st], ph);
              if constexpr (CROSS) Barrier::wait(&remote_hi[st], ph);
            }
            cute::gemm(mma_qk, tSrQ(_, _, kb), tSrK(_, _, kb), tSrS);
            mma_qk.accumulate_ = GMMA::ScaleOut::One;
          }
          warpgroup_commit_batch();
          warpgroup_wait<0>();
          warpgroup_fence_operand(tSrS);

          // ---- online softmax over whole rows (log2 domain); S element 4 n + 2 h + e: row
          // r0 + 8 h, key 8 n + q2 + e
          const uint8_t* vflag = sValid + st * 64 + q2;
          float mx0 = -INFINITY, mx1 = -INFINITY;
          CUTE_UNROLL
          for (int n = 0; n < 8; ++n) {
            CUTE_UNROLL
            for (int e2 = 0; e2 < 2; ++e2) {
              const bool v = vflag[8 * n + e2] != 0;
              tSrS(4 * n + e2) = v ? tSrS(4 * n + e2) * a.scale_log2 : -INFINITY;
              tSrS(4 * n + 2 + e2) = v ? tSrS(4 * n + 2 + e2) * a.scale_log2 : -INFINITY;
              mx0 = fmaxf(mx0, tSrS(4 * n + e2));
              mx1 = fmaxf(mx1, tSrS(4 * n + 2 + e2));
            }
          }
          const float mn0 = fmaxf(m0, warp_quad_max(mx0));
          const float mn1 = fmaxf(m1, warp_quad_max(mx1));
          // A row that has seen no valid key keeps max -inf: shift by 0 there (no -inf - -inf).
          const float mu0 = mn0 == -INFINITY ? 0.f : mn0;
          const float mu1 = mn1 == -INFINITY ? 0.f : mn1;
          alpha0 = exp2f(m0 - mu0);
          alpha1 = exp2f(m1 - mu1);
          m0 = mn0;
          m1 = mn1;
          float ps0 = 0.f, ps1 = 0.f;
          CUTE_UNROLL
          for (int n = 0; n < 8; ++n) {
            tSrS(4 * n + 0) = exp2f(tSrS(4 * n + 0) - mu0);
            tSrS(4 * n + 1) = exp2f(tSrS(4 * n + 1) - mu0);
            tSrS(4 * n + 2) = exp2f(tSrS(4 * n + 2) - mu1);
            tSrS(4 * n + 3) = exp2f(tSrS(4 * n + 3) - mu1);
            ps0 += tSrS(4 * n + 0) + tSrS(4 * n + 1);
            ps1 += tSrS(4 * n + 2) + tSrS(4 * n + 3);
          }
          l0 = l0 * alpha0 + ps0;
          l1 = l1 * alpha1 + ps1;
          if (k > 0) named_barrier_sync(kBarPFree, kConsumerThreads);  // warpgroup 1 read P(k-1)
          CUTE_UNROLL
          for (int n = 0; n < 8; ++n) {
            const int key = 8 * n + q2;
            *reinterpret_cast<uint32_t*>(sPb + sw128(r0, key)) = pack_bf16x2(tSrS(4 * n), tSrS(4 * n + 1));
            *reinterpret_cast<uint32_t*>(sPb + sw128(r0 + 8, key)) =
                pack_bf16x2(tSrS(4 * n + 2), tSrS(4 * n + 3));
          }
          if ((lane & 3) == 0) {
            sAlpha[r0] = alpha0;
            sAlpha[r0 + 8] = alpha1;
          }
          cutlass::arch::fence_view_async_shared();  // P stores -> both warpgroups' wgmma reads
          named_barrier_sync(kBarP, kConsumerThreads);  // (warpgroup 1 is waiting there already)
        } else {
          alpha0 = sAlpha[r0];
          alpha1 = sAlpha[r0 + 8];
        }
        CUTE_UNROLL
        for (int j = 0; j < 32; ++j) {
          tOrO(4 * j + 0) *= alpha0;
          tOrO(4 * j + 1) *= alpha0;
          tOrO(4 * j + 2) *= alpha1;
          tOrO(4 * j + 3) *= alpha1;
        }
        // ---- O[64 heads x 256 columns of this warpgroup] += P V ----
        Tensor sVt = make_tensor(make_smem_ptr(kst), typename P::LayoutVt{});
        Tensor tOrV = thr_pv.partition_fragment_B(local_tile(sVt, Shape<_256, _64>{}, make_coord(w, _0{})));
        warpgroup_fence_operand(tOrO);
        warpgroup_arrive();
        CUTE_UNROLL
        for (int kb = 0; kb < size<2>(tOrP); ++kb) cute::gemm(mma_pv, tOrP(_, _, kb), tOrV(_, _, kb), tOrO);
        warpgroup_commit_batch();
        warpgroup_wait<0>();
        warpgroup_fence_operand(tOrO);
        if constexpr (CROSS) {
          __syncwarp();  // the warp's wgmma reads of the stage are done
          Barrier::arrive(&empty[st], 0u, lane == 0);
          Barrier::arrive(&empty[st], 1u, lane == 0);
        } else {
          Barrier::arrive(&empty[st]);
        }
        // warpgroup 1 is done with P and alpha of this tile: warpgroup 0 may write the next.
        // (A full sync on both sides: warpgroup 1 would wait at kBarP right after anyway, and
        // compute-sanitizer's racecheck does not take bar.arrive -> bar.sync as ordering this
        // read before that write.)
        if (W == 1 && k + 1 < nt) named_barrier_sync(kBarPFree, kConsumerThreads);
      }

      // ---- finish: warpgroup 0 holds the rows' statistics; warpgroup 1 reads them ----
      if constexpr (W == 0) {
        l0 = warp_quad_sum(l0);
        l1 = warp_quad_sum(l1);
        if ((lane & 3) == 0) {
          sM[r0] = m0;
          sM[r0 + 8] = m1;
          sL[r0] = l0;
          sL[r0 + 8] = l1;
        }
      }
      named_barrier_sync(kBarSum, kConsumerThreads);
      if constexpr (W == 1) {
        m0 = sM[r0];
        m1 = sM[r0 + 8];
        l0 = sL[r0];
        l1 = sL[r0 + 8];
      }
      write_decode_rows(a, i, s, e.nsp, e.split, 64 * hg + r0, 256 * w + q2, m0, m1, l0, l1,
                        w == 0 && (lane & 3) == 0,
                        [&](int j, int h, int c) { return tOrO(4 * j + 2 * h + c); });
    }
  }
}

// CROSS (the crossover): launched as clusters of two CTAs, head groups 2 j and 2 j + 1 of the
// same query token and schedule part, hence the same tiles. Each producer gathers and
// dequantizes the NoPE columns of half of every tile's rows (and all RoPE columns) into its own
// K stage, and bulk copies send that half on into the peer's. A stage is ready when `full`
// (this CTA's producer) and `remote` (one arrival with the peer's byte count, completed by its
// copy) have both completed; `empty` counts the consumer warps of both CTAs (each arrives on
// both), since each CTA's stage feeds both. (The first versions made the peer count on `full`
// with cluster-scope release / acquire: even with the producer idle the consumers then ran 1.34x
// slower, V32 b=128 446 vs 333 us; then st.async stores lane by lane: see the producer loop.)
//
// Persistent over jobs: job j = (schedule part j / s_q, query token j % s_q); the grid's y
// extent is at most what the GPU holds at once (the launcher), and CTA y walks jobs y, y +
// gridDim.y, ... so the producer runs ahead into the next job while the consumers finish one.
template <int LAYOUT, bool CROSS>
__global__ void __launch_bounds__(kThreads, 1) sparse_decode_wgmma_kernel(const SparseDecodeArgs a) {
  using P = Plan<LAYOUT>;
  using Barrier = cutlass::arch::ClusterBarrier;

  extern __shared__ __align__(1024) uint8_t smem[];
  uint8_t* sValid = smem + P::kValid;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + P::kBar);
  uint64_t* empty = full + kStages;
  uint64_t* remote = empty + kStages;
  uint64_t* full_hi = remote + kStages;
  uint64_t* remote_hi = full_hi + kStages;

  const int tid = threadIdx.x;
  const int wg = tid >> 7;   // 0, 1: consumers; 2: producer
  const int wt = tid & 127;  // thread within its warpgroup
  if (tid == 0) {
#pragma unroll
    for (int st = 0; st < kStages; ++st) {
      Barrier::init(&full[st], 128);
      Barrier::init(&empty[st], CROSS ? 2 * 8 : kConsumerThreads);
      Barrier::init(&remote[st], 1);
      Barrier::init(&full_hi[st], 128);
      Barrier::init(&remote_hi[st], 1);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
  // crossover: this CTA's half of each tile, and the peer's barriers are initialized
  const uint32_t rank = CROSS ? cluster_ctarank() : 0;
  const int half = CROSS ? static_cast<int>(rank) : -1;
  if constexpr (CROSS) cluster_sync_all();

  const bool has_extra = a.extra.indices != nullptr;
  const int num_jobs = a.s_q * a.num_parts;

  if (wg == 2) {
    // ======================================= producer =======================================
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    const int wp = wt >> 5;  // producer warp (which rows of a tile: see the fill functions)
    const int lane = wt & 31;
    // the tile row of the token whose index this lane holds (lanes 16.. repeat 0..15)
    const int tok = token_row(lane & 15, wp, half);
    // the NoPE batches: tokens 0..7 (atom 0 of the warp) first; 8..15 (atom 1) without crossover
    const int atom0 = warp_atom(0, wp, half), atom1 = warp_atom(1, wp, half);
    const bool no_loads = (a.probe & (1 | 16)) != 0;
    int it = 0;
#pragma unroll 1
    for (int job = blockIdx.y; job < num_jobs; job += gridDim.y) {
      const JobPlan jp = job_plan(a, job);
#pragma unroll 1
      for (int i = jp.b_begin; i <= jp.b_last; ++i) {
        const int s = jp.s;
        const ElementPlan e = element_plan(a, i, jp.b_begin, jp.blk_begin, jp.b_end, jp.blk_end,
                                           jp.first_split, jp.sched_bn);
        const int nt = e.r.ntm + e.r.nte;
        if (!e.run || nt == 0) continue;
        const int* row_m = a.main.indices + i * a.main.stride_b + s * a.main.stride_s;
        const int* row_e = has_extra ? a.extra.indices + i * a.extra.stride_b + s * a.extra.stride_s : row_m;
        // Indices are read two tiles ahead, so a gather never waits for its index. (An L2
        // prefetch of the rows two tiles ahead, cp.async.bulk.prefetch issued lane by lane, cost
        // the producer more issue slots than it saved: without it V32 b=128 570 vs 601 us,
        // b=148 topk=16384 4.37 vs 4.55 ms, MODEL1 h_q=64 + extra 512 147 vs 154 us; four tiles
        // ahead 596 us.)
        int idx0 = load_index(row_m, row_e, e.r, 0, tok);
        int idx1 = load_index(row_m, row_e, e.r, 1, tok);
        // Crossover: a CTA's share of each tile's NoPE loads (one batch) is issued one tile
        // ahead, before its stage is free, so the gather's latency overlaps the wait for the
        // consumers. Without the crossover a warp has two batches a tile; one more in flight
        // does not fit the producer's registers (MODEL1 spilled), so both follow the wait.
        auto gather_first = [&](const TokenRow& t) {
          if constexpr (LAYOUT == TMLA_LAYOUT_V32) return gather_pairs<LAYOUT>(t.row, 0, lane, no_loads);
          else return gather_single<LAYOUT>(t, 0, lane, no_loads);
        };
        TokenRow cur = resolve_token_row<LAYOUT>(a, e.r, 0, idx0, lane);
        RawBatch batch;
        if constexpr (CROSS) batch = gather_first(cur);
#pragma unroll 1
        for (int k = 0; k < nt; ++k, ++it) {
          const int idx2 = load_index(row_m, row_e, e.r, k + 2, tok);
          const TokenRow next = resolve_token_row<LAYOUT>(a, e.r, k + 1, idx1, lane);
          RawBatch next_batch;
          if constexpr (CROSS) next_batch = gather_first(next);  // (k + 1 = nt: index -1, no loads)
          const int st = it & 1;
          Barrier::wait(&empty[st], ((it >> 1) & 1) ^ 1);
          // crossover: this stage's `remote` phase ends once the peer's bytes have landed
          if (CROSS && wt == 0) {
            const bool none = (a.probe & (16 | 128)) != 0;
            cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&remote[st], none ? 0u : P::kRemoteLo);
            cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&remote_hi[st], none ? 0u : P::kRemoteHi);
          }
          // crossover: the warp's atom of NoPE rows -> the peer's stage, one bulk copy (1 KB,
          // contiguous) per 64-column block c0 .. c1 - 1, once the warp's lanes have stored (and
          // fenced) theirs. (Each lane's own st.async stores of 16 bytes, 8 half-covered
          // 128-byte rows a warp instruction, cost ~120 us at V32 b=128: 533 vs 416 us without
          // them; one copy of the CTA's 32 rows per block after a producer-wide barrier: 460 us.)
          auto copy_to_peer = [&](uint8_t* ktile, uint64_t* bar_local, int c0, int c1) {
            __syncwarp();
            if (lane == 0 && !(a.probe & (16 | 128))) {
              const uint32_t src = smem_u32(ktile) + 1024 * atom0;
              const uint32_t dst = peer_smem_u32(src, rank ^ 1);
              const uint32_t bar = peer_smem_u32(smem_u32(bar_local), rank ^ 1);
              for (int c = c0; c < c1; ++c) bulk_copy_to_peer(dst + 8192 * c, src + 8192 * c, 1024, bar);
            }
          };
          constexpr int kLoBlocks = P::kLoCols / 64, kBlocks = Layout<LAYOUT>::kDnope / 64;
          StageDst d;
          d.ktile = smem + P::kK + st * P::kTile;
          d.dequant = !(a.probe & 2);
          d.local = !(a.probe & 256);
          if (!(a.probe & 16)) {
            uint8_t* flags = sValid + st * 64;
            if constexpr (!CROSS) batch = gather_first(cur);  // (16 loads a tile: no room ahead)
            rope_tokens<LAYOUT>(cur.row, wp, half, lane, d.ktile, flags, no_loads);
            if constexpr (LAYOUT == TMLA_LAYOUT_V32 && CROSS) {
              // columns 0..255 first: that half of the stage is released before the rest is made
              store_pairs<LAYOUT, 0>(batch, atom0, lane, d);
              cutlass::arch::fence_view_async_shared();
              copy_to_peer(d.ktile, &remote[st], 0, kLoBlocks);
              Barrier::arrive(&full[st]);
              store_pairs<LAYOUT, 1>(batch, atom0, lane, d);
            } else if constexpr (LAYOUT == TMLA_LAYOUT_V32) {
              store_pairs<LAYOUT>(batch, atom0, lane, d);
              store_pairs<LAYOUT>(gather_pairs<LAYOUT>(cur.row, 4, lane, no_loads), atom1, lane, d);
            } else {
              store_single<LAYOUT>(batch, atom0, lane, d);
              if constexpr (!CROSS) {
                store_single<LAYOUT>(gather_single<LAYOUT>(cur, 8, lane, no_loads), atom1, lane, d);
              }
            }
          }
          // The stage's phase also waits for this thread's RoPE copies (cp.async.mbarrier.arrive:
          // a pending arrival that the copies' completion releases), so the producer goes on to
          // the next tile instead of waiting out their latency.
          cutlass::arch::cpasync_barrier_arrive(&full_hi[st]);
          cutlass::arch::fence_view_async_shared();  // generic-proxy stores -> wgmma's reads
          const bool split = LAYOUT == TMLA_LAYOUT_V32 && CROSS && !(a.probe & 16);
          if constexpr (CROSS) {
            if (!split) copy_to_peer(d.ktile, &remote[st], 0, kLoBlocks);
            copy_to_peer(d.ktile, &remote_hi[st], kLoBlocks, kBlocks);
          }
          if (!split) Barrier::arrive(&full[st]);
          Barrier::arrive(&full_hi[st]);
          cur = next;
          if constexpr (CROSS) batch = next_batch;
          idx0 = idx1;
          idx1 = idx2;
        }
      }
    }
    if constexpr (CROSS) cluster_sync_all();  // the peer no longer writes into this CTA
    return;
  }

  // ======================================= consumers ========================================
  if (wg == 0) {
    one_qk_consumers<LAYOUT, CROSS, 0>(a, smem, full, remote, full_hi, remote_hi, empty, wt);
  } else {
    one_qk_consumers<LAYOUT, CROSS, 1>(a, smem, full, remote, full_hi, remote_hi, empty, wt);
  }
  if constexpr (CROSS) cluster_sync_all();  // the peer no longer writes into this CTA
}

template <int LAYOUT, bool CROSS>
cudaError_t launch_variant(const SparseDecodeArgs& a, cudaStream_t stream) {
  constexpr int kSmem = Plan<LAYOUT>::kBytes;
  constexpr int kCluster = CROSS ? 2 : 1;
  auto kernel = sparse_decode_wgmma_kernel<LAYOUT, CROSS>;
  static std::atomic<uint64_t> configured{0};
  static std::atomic<int> resident[64];
  cudaError_t err = opt_in_dynamic_smem(kernel, kSmem, configured);
  if (err != cudaSuccess) return err;
  int clusters = 0;
  err = resident_clusters(kernel, kThreads, kSmem, kCluster, resident, &clusters);
  if (err != cudaSuccess) return err;
  // grid (64-head group, job slot): as many job slots as one wave holds (probe 64: one slot a
  // job, i.e. several waves)
  const int groups = cdiv(a.h_q, 64);
  const int jobs = a.s_q * a.num_parts;
  int slots = clusters * kCluster / groups;
  slots = (a.probe & 64) ? jobs : max(1, min(jobs, slots));
  return launch_clusters(kernel, dim3(groups, slots, 1), kThreads, kSmem, kCluster, a, stream);
}

// The crossover whenever the head groups pair up (h_q a multiple of 128); probe 32 turns it off
// (profiling).
template <int LAYOUT>
cudaError_t launch(const SparseDecodeArgs& a, cudaStream_t stream) {
  if (cdiv(a.h_q, 64) % 2 == 0 && !(a.probe & 32)) return launch_variant<LAYOUT, true>(a, stream);
  return launch_variant<LAYOUT, false>(a, stream);
}

}  // namespace tmla::sm90::sparse_decode_wgmma

namespace tmla::sm90 {
template <int LAYOUT>
cudaError_t launch_sparse_decode_wgmma(const SparseDecodeArgs& a, cudaStream_t stream) {
  return sparse_decode_wgmma::launch<LAYOUT>(a, stream);
}
}  // namespace tmla::sm90
