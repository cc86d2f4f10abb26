// Small device helpers shared by every kernel: warp-level MMA and shared-memory matrix loads
// (thin wrappers over CuTe's arch atoms, so the PTX strings are CUTLASS's, not ours), cp.async,
// named barriers and bf16 packing.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>

namespace tmla {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__host__ __device__ constexpr int cdiv(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t cdiv64(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t align_up(int64_t a, int64_t b) { return cdiv64(a, b) * b; }

// ---------------------------------------------------------------------------------------------
// warp-level tensor-core ops (sm_80+ instructions; fine inside an sm_90a build)
// ---------------------------------------------------------------------------------------------

// d += a * b for one m16n8k16 tile: a [16 x 16] bf16 row-major (4 regs), b [16 x 8] bf16
// "col-major" (2 regs), d [16 x 8] f32 (4 regs). Register layouts: PTX ISA, mma.m16n8k16.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4],
                                               uint32_t b0, uint32_t b1) {
  cute::SM80_16x8x16_F32BF16BF16F32_TN::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b0,
                                            b1, d[0], d[1], d[2], d[3]);
}

// ldmatrix.x4: lane l gives the address of row (l % 8) of 8x8 matrix (l / 8); register i
// receives, for lane l, row l / 4 and columns 2 (l % 4), 2 (l % 4) + 1 of matrix i.
__device__ __forceinline__ void ldsm_x4(const void* smem, uint32_t& r0, uint32_t& r1,
                                        uint32_t& r2, uint32_t& r3) {
  cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(smem), r0, r1, r2, r3);
}

// ldmatrix.x4.trans: as ldsm_x4, but lane l receives rows 2 (l % 4), 2 (l % 4) + 1 of column
// l / 4 of each stored matrix (the B operand of a row-major [k][n] tile).
__device__ __forceinline__ void ldsm_x4_trans(const void* smem, uint32_t& r0, uint32_t& r1,
                                              uint32_t& r2, uint32_t& r3) {
  cute::SM75_U16x8_LDSM_T::copy(*reinterpret_cast<const cute::uint128_t*>(smem), r0, r1, r2, r3);
}

// ---------------------------------------------------------------------------------------------
// asynchronous global -> shared copies
// ---------------------------------------------------------------------------------------------

// 16 bytes, bypassing L1 (gathered cache rows are read once per CTA).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  cute::SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>::copy(
      *reinterpret_cast<const cute::uint128_t*>(gmem), *reinterpret_cast<cute::uint128_t*>(smem));
}

// 8 bytes (MODEL1 per-token scale words are only 8-byte aligned).
__device__ __forceinline__ void cp_async_8(void* smem, const void* gmem) {
  cute::SM80_CP_ASYNC_CACHEALWAYS<uint64_t>::copy(*reinterpret_cast<const uint64_t*>(gmem),
                                                  *reinterpret_cast<uint64_t*>(smem));
}

__device__ __forceinline__ void cp_async_commit() { cute::cp_async_fence(); }
__device__ __forceinline__ void cp_async_wait_all() { cute::cp_async_wait<0>(); }

// ---------------------------------------------------------------------------------------------
// synchronization and packing
// ---------------------------------------------------------------------------------------------

// Barrier `id` (1..15; 0 is __syncthreads) over `count` threads (a multiple of 32).
__device__ __forceinline__ void named_barrier_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float warp_quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float warp_quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

}  // namespace tmla
