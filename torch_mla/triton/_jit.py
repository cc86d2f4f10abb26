"""Small pieces shared by the Triton kernel modules: the dot helpers, tile sizes, and exact
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
def mm0(a, b, gate, M: tl.constexpr, N: tl.constexpr, SPLIT: tl.constexpr,
        DOT_F32: tl.constexpr, TRANS_B: tl.constexpr = False):
    """a @ b ([M, N], fp32; a @ b^T with TRANS_B, the scores q @ k^T) from a zero accumulator;
    with SPLIT behind an always-true branch on ``gate`` so that Triton does not lay the dot out
    as one link of a chain.

    Why the branch: Triton 3.6 lays out a dot whose result reaches another dot (through any op:
    the scores reach the PV dots through P; a dot accumulating onto it counts too) with all
    warps along M, warpsPerCTA [8, 1] on 8 warps. With M = 64 rows both warp groups then compute
    the same 64 x N product, reading both operands from shared memory twice (the QK^T work, 53%
    of MLA's FLOPs at d_qk 576, done twice). Behind a branch the result reaches only the
    branch's yield: the dot gets [4, 2], each warp group half of the N columns (keys), and the
    consumer dot reads the result (P) through shared memory. One warp group (4 warps) has
    nothing to duplicate: the branch changes the layout on 8 warps only. ``gate`` must be a
    run-time value that is true wherever the call runs (a tile exists, the loop iterates): a
    constant condition would be folded away.

    Why both branches compute the dot: otherwise the layout pass may move the conversion of P
    into the cheap branch (it would convert the fp32 result instead). Parts of one product (value
    blocks, RoPE tail) each take their own mm0 from zero and are summed afterwards, since
    accumulating one into another's result would chain them again; their separate branches get
    merged into one by the canonicalizer, and a pipeline stage's copies share one barrier, so the
    dots cannot start on a part whose copy landed first. The transpose stays inside the branches
    (TRANS_B rather than a caller's tl.trans): hoisted above them, Triton 3.6 pipelines
    sparse_decode's and dense_decode's 64-column RoPE key tiles with one more shared-memory
    buffer (+8 KB), and sparse_prefill's split forward takes 8 KB more shared memory too
    (compile check, sm_90, 2026-11-25).

    Without SPLIT: a plain dot from zero. Users: dense_decode's paged kernel (which found the
    trick), sparse_decode's split variant, sparse_prefill's split forward and both phases of its
    backward (BWD_DS_SPLIT, BWD_DKV_SPLIT). Measured alone (H100, Triton 3.6, 2026-11-25;
    sparse_prefill's module docstring): dS^T q of the backward's second phase behind the branch,
    33.34 -> 29.54 ms for the whole backward at s_q 4096, h_q 128, topk 2048, s_kv 32768; the
    split variants of the other kernels change more than this and are timed in their module
    docstrings."""
    zero = tl.zeros([M, N], tl.float32)
    if SPLIT:
        if gate:
            r = mm(a, tl.trans(b) if TRANS_B else b, zero, DOT_F32)
        else:
            r = mm(a, tl.trans(b) if TRANS_B else b, zero, DOT_F32)
    else:
        r = mm(a, tl.trans(b) if TRANS_B else b, zero, DOT_F32)
    return r


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
