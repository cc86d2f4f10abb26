// FP8 KV-cache dequantization, bit-exact with torch_mla.reference.kv_cache:
//   V32:    bf16(f32(e4m3) * f32 scale)            (one f32 scale per 128 NoPE values)
//   MODEL1: bf16(bf16(e4m3) * bf16(2^(e - 127)))  (one ue8m0 byte per 64 NoPE values)
// Both reduce to "exact f32 product, then one round-to-nearest-even to bf16": e4m3 -> f16 -> f32
// is exact, and for MODEL1 bf16(e4m3) and the power-of-two scale are exact in f32 and the
// reference's bf16 multiply is an f32 multiply rounded to bf16. (Compiled without fast-math, so
// subnormal products are not flushed, as in PyTorch.)
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace tmla {

// Two e4m3 values (low byte first) -> f32x2, exactly.
__device__ __forceinline__ float2 e4m3x2_to_float2(uint32_t two_bytes) {
  __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two_bytes & 0xffffu),
                                             __NV_E4M3);
  return __half22float2(*reinterpret_cast<__half2*>(&h));
}

// A ue8m0 byte as the f32 power of two it stores: 2^(e - 127); 0xFF is NaN. e = 0 is 2^-127,
// an f32 subnormal (what PyTorch's float8_e8m0fnu -> float gives), not 0.
__device__ __forceinline__ float ue8m0_to_float(uint32_t e) {
  if (e == 0xffu) return __int_as_float(0x7fc00000);
  if (e == 0u) return __int_as_float(0x00400000);
  return __int_as_float(static_cast<int>(e << 23));
}

// 16 e4m3 values (one 16-byte word) times `scale` -> 16 bf16 (two 16-byte words).
__device__ __forceinline__ void dequant16(const uint4 raw, float scale, uint4& lo, uint4& hi) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
  uint32_t o[8];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 a = e4m3x2_to_float2(w[i]);
    float2 b = e4m3x2_to_float2(w[i] >> 16);
    __nv_bfloat162 pa = __floats2bfloat162_rn(a.x * scale, a.y * scale);
    __nv_bfloat162 pb = __floats2bfloat162_rn(b.x * scale, b.y * scale);
    o[2 * i] = *reinterpret_cast<uint32_t*>(&pa);
    o[2 * i + 1] = *reinterpret_cast<uint32_t*>(&pb);
  }
  lo = make_uint4(o[0], o[1], o[2], o[3]);
  hi = make_uint4(o[4], o[5], o[6], o[7]);
}

}  // namespace tmla
