"""Triton helpers shared by the DSA lightning-indexer kernels (torch_mla/triton/indexer.py and
_indexer_train.py): e4m3 encoding and decoding in integers, the in-register fast Walsh-Hadamard
transform, the row quantizer, and the order-preserving integer keys of f32 logits.

Everything that decides a byte is either integer arithmetic or an IEEE-exact f32 operation
performed in the reference's order, so the kernels write the reference's bytes on any device:

- The Hadamard rotation is the reference's butterfly network in the reference's order (stages of
  half-size d/2, d/4, ..., 1, each ``(a + b, a - b)`` in f32), then one f32 multiply by
  ``f32(1 / sqrt(d))``: every operation is a correctly rounded f32 add, subtract or multiply of
  the same operands, hence bit-identical results (no products feed an add, so FMA contraction
  cannot change anything either). A matmul with the d x d Hadamard matrix (tl.dot) would sum in
  another order and differ in the last bits.
- ``scale = max(amax, 1e-4) / 448`` and ``y / scale`` use ``tl.math.div_rn`` (IEEE division;
  plain ``/`` may be approximate on the GPU). ue8m0 rounds the f32 scale up to a power of two
  from its bits (the smallest power of two >= scale, what the reference's log2/ceil/exp2 chain
  computes, checked against it in the tests).
- f32 -> e4m3fn is an integer round-to-nearest-even (torch's conversion: subnormals by an integer
  shift, NaN -> 0x7F | sign), so neither the interpreter's nor the GPU's float8 conversion is
  involved (the interpreter also decodes code 0x7F as 480, not NaN, hence the integer decoder).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._jit import e4m3_decode, e4m3_encode, pow2  # noqa: F401  (used by the indexer modules)

FP8_MAX = 448.0
AMAX_FLOOR = 1e-4


@triton.jit
def fp8_operand(x, DOT_F32: tl.constexpr):
    """An FP8 tile as a dot operand: itself on the GPU (float8e4nv tensor cores), its exact f32
    values under the interpreter (decoded in integers)."""
    if DOT_F32:
        return e4m3_decode(x.to(tl.uint8, bitcast=True).to(tl.int32))
    else:
        return x


@triton.jit
def hadamard_rows(x, R: tl.constexpr, D: tl.constexpr, LOG2D: tl.constexpr):
    """The unnormalised Sylvester-Hadamard transform of each row of ``x [R, D]`` (f32), as the
    reference's butterflies: for h = D/2, D/4, ..., 1, element i (bit h of i clear) and i + h
    become (x_i + x_{i+h}, x_i - x_{i+h}). Each stage views a row as [D / 2h, 2, h], moves the
    pair axis last, splits it, and joins the sums and differences back in place."""
    for st in tl.static_range(LOG2D):
        x = _hadamard_stage(x, R, D, st)
    return x


@triton.jit
def _hadamard_stage(x, R: tl.constexpr, D: tl.constexpr, ST: tl.constexpr):
    # A function per stage: Triton 3.6 refuses a constexpr assigned again in an unrolled loop.
    HH: tl.constexpr = D >> (ST + 1)
    x4 = tl.permute(tl.reshape(x, [R, D // (2 * HH), 2, HH]), 0, 1, 3, 2)
    a, b = tl.split(x4)
    y = tl.permute(tl.join(a + b, a - b), 0, 1, 3, 2)
    return tl.reshape(y, [R, D])


@triton.jit
def round_scale_ue8m0(scale):
    """The smallest power of two >= scale (scale > 0 normal, or inf / NaN, which stay)."""
    bits = scale.to(tl.int32, bitcast=True)
    e = bits >> 23  # scale > 0: no sign bit
    up = ((bits & 0x7FFFFF) != 0) & (e < 255)
    return tl.where(up, (e + 1) << 23, bits).to(tl.float32, bitcast=True)


@triton.jit
def quantize_rows(x, inv_sqrt_d, R: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  LOG2D: tl.constexpr, HADAMARD: tl.constexpr, UE8M0: tl.constexpr,
                  HW_E4M3: tl.constexpr):
    """Rows ``x [R, BLOCK_D]`` f32 (columns >= D hold 0) -> (e4m3 codes int32 ``[R, BLOCK_D]``,
    f32 scales ``[R]``), the reference's ``_quantize_rows`` bit for bit. With HADAMARD,
    BLOCK_D == D (a power of two)."""
    if HADAMARD:
        x = hadamard_rows(x, R, D, LOG2D) * inv_sqrt_d
    # torch's amax propagates NaN; the GPU's max would drop it, so NaN is tracked apart.
    is_nan = x != x
    has_nan = tl.max(is_nan.to(tl.int32), axis=1) > 0
    amax = tl.max(tl.where(is_nan, 0.0, tl.abs(x)), axis=1)
    scale = tl.math.div_rn(tl.maximum(amax, 1e-4), 448.0)
    if UE8M0:
        scale = round_scale_ue8m0(scale)
    scale = tl.where(has_nan, float("nan"), scale)
    y = tl.math.div_rn(x, scale[:, None])
    # y / scale <= 448 up to one rounding; comparisons keep NaN (tl.minimum may drop it).
    y = tl.where(y > 448.0, 448.0, tl.where(y < -448.0, -448.0, y))
    if HW_E4M3:
        # SM89+: cvt.rn.satfinite to e4m3 (the same bytes for |y| <= 448; off by default).
        codes = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
    else:
        codes = e4m3_encode(y)
    return codes, scale


@triton.jit
def ordered_keys(x):
    """int32 keys of f32 logits whose signed order is the float order, with -0.0 and +0.0 equal
    (both 0), and a flag for the finite ones (the only selectable logits)."""
    bits = x.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    finite = mag < 0x7F800000
    bits = tl.where(mag == 0, 0, bits)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits), finite


@triton.jit
def sort_descending(x, N: tl.constexpr, LOG_N: tl.constexpr):
    """Bitonic sort of ``x [N]`` (N = 2**LOG_N; integers, all distinct or not) into descending
    order. Stage (merge size 2**kk, partner stride 2**jj) views x as [N / 2**(jj+1), 2, 2**jj]:
    the pairs are the two rows of the middle axis, and the merge direction is bit kk of the
    element index (descending where it is 0, so the last merge, kk = LOG_N, is descending)."""
    for kk in tl.static_range(1, LOG_N + 1):
        for t in tl.static_range(kk):
            x = _bitonic_stage(x, N, kk, t)
    return x


@triton.jit
def _bitonic_stage(x, N: tl.constexpr, KK: tl.constexpr, T: tl.constexpr):
    # A function per stage: Triton 3.6 refuses a constexpr assigned again in an unrolled loop.
    JJ: tl.constexpr = KK - 1 - T
    O: tl.constexpr = N >> (JJ + 1)
    J: tl.constexpr = 1 << JJ
    a, b = tl.split(tl.permute(tl.reshape(x, [O, 2, J]), 0, 2, 1))
    o = tl.arange(0, O)[:, None]
    down = ((o >> (KK - JJ - 1)) & 1) == 0
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return tl.reshape(tl.permute(tl.join(tl.where(down, hi, lo), tl.where(down, lo, hi)),
                                 0, 2, 1), [N])
