"""Small pieces shared by the Triton kernel modules: the dot helper, tile sizes, and exact
e4m3fn encoding/decoding in integer arithmetic (torch's conversion, so bytes match the reference
on any device and under the interpreter, whose own float8 conversion decodes 0x7F as 480)."""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # kernels run the softmax in exp2 with log2(e) folded into the scale


def pow2(n: int, lo: int = 16) -> int:
    """Smallest power of two >= n (and >= lo): tl.arange and tl.dot tile sizes."""
    return max(lo, triton.next_power_of_2(max(1, n)))


@triton.jit
def mm(a, b, acc, DOT_F32: tl.constexpr):
    # The interpreter multiplies 16-bit dot operands as raw bits: upcast there, never on the GPU.
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def e4m3_encode(f):
    """float32 -> e4m3fn codes (int32 in 0..255), round to nearest even; NaN -> 0x7F | sign;
    finite values past 448 (and inf) saturate to 0x7E | sign (callers clamp first anyway)."""
    bits = f.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF
    # e4m3 normal range (|f| >= 2**-6, f32 exponent field >= 121): rebias the exponent by
    # 127 - 7 = 120 and keep 3 mantissa bits, rounding the 20 dropped bits to nearest even (a
    # carry runs into the exponent, as it should).
    lsb = (a >> 20) & 1
    normal = (a - (120 << 23) + 0x7FFFF + lsb) >> 20
    normal = tl.minimum(normal, 0x7E)
    # subnormal range: code = RNE(|f| * 2**9) computed on the significand: |f| = sig * 2**(e - 150)
    # so |f| * 2**9 = sig >> (141 - e); shifts past 25 leave 0 for a 24-bit significand. (The
    # clamp at 1 only keeps the shifts defined for normal values, whose result is not used.)
    e = a >> 23
    sig = (a & 0x7FFFFF) | tl.where(e > 0, 0x800000, 0)
    sh = tl.minimum(tl.maximum(141 - tl.maximum(e, 1), 1), 25)
    q = sig >> sh
    rem = sig & ((1 << sh) - 1)
    half = 1 << (sh - 1)
    q = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
    code = tl.where(a < (121 << 23), q, normal)
    code = tl.where(a > 0x7F800000, 0x7F, code)
    return code | sign


@triton.jit
def e4m3_decode(c):
    """e4m3fn codes (int32 0..255) -> float32 (exact; NaN for 0x7F / 0xFF)."""
    sign = (c & 0x80) << 24
    e = (c >> 3) & 0xF
    m = c & 0x7
    normal = (sign | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125  # m * 2**-9, exact
    sub = tl.where(sign != 0, -sub, sub)
    v = tl.where(e == 0, sub, normal)
    return tl.where((c & 0x7F) == 0x7F, float("nan"), v)
