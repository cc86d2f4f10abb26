"""Triton ``mla::quantize_kv_cache``, ``mla::dequantize_kv_cache`` and ``mla::write_kv_cache``:
the FP8 KV-cache formats of FlashMLA (V32 and MODEL1), byte for byte the reference's
(torch_mla/reference/kv_cache.py; layout facts in meta/layouts.py).

A program packs (or unpacks) ``_TOK`` tokens, each as a [tiles, tile] block of its NoPE values.
Everything that decides a byte is integer arithmetic on bit patterns (or exact f64 arithmetic), so
the result depends neither on the GPU's float conversions (Triton's e4m3 cast saturates, exists
only on SM89+, and the interpreter has its own) nor on fast-math division or flush-to-zero:

- amax of a tile is the integer max of the bf16 magnitudes' bits (for non-NaN magnitudes integer
  order is float order); NaN is tracked apart (a NaN tile gets a NaN scale, as torch's amax gives).
- scale_inv = 2 ** ceil(log2(max(amax / 448, 1e-4))). With amax = m * 2**E (bf16, m in [1, 2)):
  amax / 448 = (m / 1.75) * 2**(E - 8), so ceil(log2(.)) = E - 8 + (m > 1.75) exactly, and the
  clamp is max(., ceil(log2(f32(1e-4))) = -13) because ceil(log2(.)) is monotone. This equals the
  reference's f32 clamp/log2/ceil/pow chain on every input: for bf16 amax, amax / 448 is either
  an exact power of two or at least 1/224 (relative) away from one, so the reference's f32
  rounding never crosses an integer (its docstring makes the same argument); below the clamp
  both give -13, an inf amax gives an inf scale, a NaN tile a NaN scale.
- The stored value x / scale_inv is computed as x * 2**-e (2**-e built from bits, exact): a
  product by a power of two is exact unless it lands below f32's normal range, where every
  candidate result rounds to a signed e4m3 zero anyway.
- f32 -> e4m3 is torch's own algorithm (c10 ``fp8e4m3fn_from_fp32_value``) in integers:
  round-to-nearest-even, subnormals by an integer RNE shift, NaN -> 0x7F | sign, finite overflow
  and inf -> 0x7E | sign (torch 2.13 saturates; older releases wrote NaN there, but no finite
  input can reach either: |x| / scale_inv <= 448 by construction, and an inf input meets an inf
  scale, giving NaN, as in the reference).
- dequantize: e4m3 / ue8m0 / f32 scale bytes decoded in integers; the reference's f32 product
  rounded to bf16 is reproduced as the exact f64 product, rounded to f32 and then to bf16 (both
  round-to-nearest-even) in integers, so subnormal products (possible only with scales the
  quantizer never writes) match too. (On an H100 a plain f32 multiply did not: flush-to-zero.)

NaN bit patterns are the one platform-dependent corner, and only they may differ from the
reference: torch's own NaN bits differ between devices (its CPU bf16 conversion writes 0xFFFF, CUDA
0x7FFF; a NaN tile's V32 f32 scale is 0x7FC00000 on the CPU). Here a dequantized NaN is 0x7FFF and
a NaN tile's V32 scale 0x7FC00000; the sign of the e4m3 NaN code of an inf / inf element follows
the hardware's default NaN, as the reference's division does on the same device.

Addressing: the cache is taken as raw uint8 (float8 or uint8 caches alike) and a block is found
through ``stride(0)`` (padded caches work); MODEL1 scales live after the block's token data.
``quantize_kv_cache`` also zeroes MODEL1's end-of-block padding (as the reference does, for
determinism); ``write_kv_cache`` touches only the written slots' bytes (MODEL1: 576 data bytes and
8 scale bytes, the pad byte written 0).

Duplicate slots in ``write_kv_cache``: the last row naming a slot wins, deterministically, with
no host sync. For n <= ``SCAN_MAX_ROWS`` rows a program skips its row when a later row names the
same slot (an O(n) scan per row, from L2; one launch). For more rows, a stable device sort of
slot_mapping (int32 keys, skipped rows keyed past the cache) groups equal slots with the largest
row last, and only the last of each group writes.

Roof (H100 SXM, 3.35 TB/s; no FLOPs to speak of, so bandwidth alone limits): per token the write
reads 2 * d bytes of bf16 kv + 8 B of slot and writes 656 B (V32) or 584 B (MODEL1).
A decode step writing n = 128 V32 tokens moves 128 * (1152 + 8 + 656) = 232 KB: ~0.07 us of
bandwidth, so it is launch-bound (a few us); a 16384-token prefill chunk moves 29.8 MB: ~8.9 us.
Quantizing (dequantizing) a whole V32 cache moves 1152 + 656 B per token both ways: 1.8 KB, ~0.54
ns per token at peak (4.8 M tokens: ~2.6 ms).
Measured on an H100 (bench, CUDA-graph replay, integer e4m3 path, int64 sort keys): n = 128 V32
3.1 us; n = 16384 122 us for either layout (the reference: 382 us), 10 % of the copy roof, so the
large-n path (sort + per-token programs) is the one to speed up next.
"""

from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from . import register
from ._jit import e4m3_decode, e4m3_encode
from ._common import INTERPRET
from ..meta.layouts import MODEL1_DATA_BYTES, MODEL1_SCALE_STRIDE, V32, empty_cache, get_layout

# Rows of write_kv_cache up to which duplicates are found by an in-kernel scan (one launch, no
# sort); above it the O(n^2) total scan would cost more than a device sort.
SCAN_MAX_ROWS = 1024
_SCAN_BLOCK = 128
# Tokens per program: two on the GPU (1024 NoPE values over 4 warps); many under the
# interpreter, whose cost is per operation, not per element.
_TOK = 32 if INTERPRET else 2
_NUM_WARPS = 4
# The hardware f32 -> e4m3 conversion (cvt.rn.satfinite, SM89+) writes the same bytes as the
# integer path for every value quantize can produce (|y| <= 448 or NaN), and is cheaper; it is
# off until tests/gpu/test_triton_kv_cache.py::test_quantize_bytes[hw] has passed on a GPU.
USE_HW_E4M3 = False


# ---------------------------------------------------------------------------------------------
# bit-level helpers (integer arithmetic on int32 bit patterns)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _bf16_bits_to_f32(b16):
    """int16/int32 bf16 bit patterns -> float32 values (exact: bf16 is f32's top half)."""
    return ((b16.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _f32_bits_to_bf16_bits(b):
    """f32 bit patterns (int32) -> bf16 bit patterns (int32 0..0xFFFF), round to nearest even,
    NaN -> 0x7FFF (CUDA's canonical NaN, what torch writes there)."""
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
    return tl.where((b & 0x7FFFFFFF) > 0x7F800000, 0x7FFF, r)


@triton.jit
def _f32_to_bf16_bits(f):
    return _f32_bits_to_bf16_bits(f.to(tl.int32, bitcast=True))


@triton.jit
def _rne_shift64(m, sh):
    """round(m / 2**sh) to nearest even, m >= 0 int64, 1 <= sh <= 62."""
    q = m >> sh
    rem = m & ((tl.full(m.shape, 1, tl.int64) << sh) - 1)
    half = tl.full(m.shape, 1, tl.int64) << (sh - 1)
    return q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int64)


@triton.jit
def _f32_bits_to_f64(b):
    """f32 bit patterns (int32) -> float64, exactly, f32 subnormals included: built from
    integers, so no flush-to-zero can touch them."""
    b64 = b.to(tl.int64) & 0xFFFFFFFF
    sign = (b64 >> 31) << 63
    e = (b64 >> 23) & 0xFF
    m = b64 & 0x7FFFFF
    normal = sign | ((e + (1023 - 127)) << 52) | (m << 29)
    special = sign | (0x7FF << 52) | (m << 29)  # inf, NaN
    # subnormal m * 2**-149: m as a (normal) f64, exponent lowered by 149
    sub = (m.to(tl.float64).to(tl.int64, bitcast=True) - (149 << 52)) | sign
    sub = tl.where(m == 0, sign, sub)
    bits = tl.where(e == 0, sub, tl.where(e == 255, special, normal))
    return bits.to(tl.float64, bitcast=True)


@triton.jit
def _f64_to_f32_bits(p):
    """float64 -> f32 bit patterns (int32) as an IEEE round-to-nearest-even cast would give,
    f32 subnormals and overflow to inf included, in integers (the GPU's f32 arithmetic may
    flush subnormals; the reference's torch kernels do not)."""
    b = p.to(tl.int64, bitcast=True)
    sign = (b >> 32) & 0x80000000
    e = (b >> 52) & 0x7FF
    m = b & 0xFFFFFFFFFFFFF
    # normal f32 (e - 1023 >= -126): drop 29 mantissa bits; a carry runs into the exponent
    nrm = ((e - (1023 - 127)) << 23) + _rne_shift64(m, 29)
    nrm = tl.minimum(nrm, 0x7F800000)  # overflow -> inf
    # subnormal f32: (2**52 + m) * 2**(e - 1075) on the 2**-149 grid (0 stays 0)
    sig = tl.where(e == 0, m, m | (1 << 52))
    sh = tl.minimum(tl.maximum(926 - e, 1), 54)
    sub = _rne_shift64(sig, sh)
    r = tl.where(e >= 1023 - 126, nrm, sub)
    r = tl.where(e == 0x7FF, tl.where(m == 0, 0x7F800000, 0x7FC00000), r)
    return (r | sign).to(tl.int32)


@triton.jit
def _tile_scales(x_bits):
    """Per tile of bf16 bit patterns (int32 ``[T, tiles, tile]``, reduced over the last axis):
    the exponent e of scale_inv = 2**e, and flags for an inf amax and for a NaN in the tile."""
    mag = x_bits & 0x7FFF
    is_nan = mag > 0x7F80
    amax = tl.max(tl.where(is_nan, 0, mag), axis=2)  # bf16 bits of max |x| over non-NaN
    has_nan = tl.max(is_nan.to(tl.int32), axis=2) > 0
    ebits = amax >> 7  # biased exponent (bf16 and f32 share it)
    mant = amax & 0x7F
    # amax / 448 = (m / 1.75) * 2**(E - 8): ceil(log2) = E - 8 + (m > 1.75); clamp at -13
    ex = tl.maximum(ebits - 127 - 8 + (mant > 0x60).to(tl.int32), -13)
    return ex, ebits == 255, has_nan


@triton.jit
def _pack_tokens(x_rows, dst, scale_dst, write,
                 D_NOPE: tl.constexpr, TILE: tl.constexpr, NUM_TILES: tl.constexpr,
                 TILES_P2: tl.constexpr, D_ROPE: tl.constexpr, ROPE_OFF: tl.constexpr,
                 V32_FORMAT: tl.constexpr, SCALE_BYTES: tl.constexpr,
                 SCALE_STRIDE: tl.constexpr, HW_E4M3: tl.constexpr):
    """Pack ``[T]`` tokens: ``x_rows`` int16 pointers to their bf16 rows, ``dst`` uint8 pointers
    to their token bytes (NoPE e4m3 at 0, bf16 RoPE at ROPE_OFF), ``scale_dst`` to their scale
    bytes; ``write`` ``[T]`` int32 (0/1) gates each token's stores. (Masks are comparisons
    against integers: the interpreter mishandles ``tensor_bool & scalar_bool``.)"""
    t = tl.arange(0, TILES_P2)
    c = tl.arange(0, TILE)
    w3 = write[:, None, None]
    m3 = (t[None, :, None] < NUM_TILES * w3) & (c[None, None, :] < TILE)
    offs = t[None, :, None] * TILE + c[None, None, :]
    xb = tl.load(x_rows[:, None, None] + offs, mask=m3, other=0).to(tl.int32) & 0xFFFF
    ex, is_inf, has_nan = _tile_scales(xb)
    # 2**-ex exactly (ex in [-13, 120]); an inf scale divides finite values to 0 (and inf to
    # NaN), a NaN scale everything to NaN, as the reference's division does.
    inv = ((127 - ex) << 23).to(tl.float32, bitcast=True)
    inv = tl.where(is_inf, 0.0, inv)
    inv = tl.where(has_nan, float("nan"), inv)
    y = _bf16_bits_to_f32(xb) * inv[:, :, None]
    if HW_E4M3:
        # SM89+: cvt.rn.satfinite to e4m3, the same bytes as torch's cast for every value that
        # can reach here (|y| <= 448 or NaN; a NaN from the GPU's arithmetic is positive there)
        codes = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        codes = e4m3_encode(y).to(tl.uint8)
    tl.store(dst[:, None, None] + offs, codes, mask=m3)

    # bf16 RoPE: two bytes per value, little-endian (bytewise: a padded stride(0) may leave a
    # token at an odd address)
    r = tl.arange(0, D_ROPE)
    rmask = r[None, :] < D_ROPE * write[:, None]
    rb = tl.load(x_rows[:, None] + D_NOPE + r[None, :], mask=rmask, other=0).to(tl.int32)
    rope_dst = dst[:, None] + ROPE_OFF + 2 * r[None, :]
    tl.store(rope_dst, (rb & 0xFF).to(tl.uint8), mask=rmask)
    tl.store(rope_dst + 1, ((rb >> 8) & 0xFF).to(tl.uint8), mask=rmask)

    tmask = t[None, :] < NUM_TILES * write[:, None]
    if V32_FORMAT:
        # f32 scale_inv, little-endian, one per tile
        sbits = (ex + 127) << 23
        sbits = tl.where(is_inf, 0x7F800000, sbits)
        sbits = tl.where(has_nan, 0x7FC00000, sbits)
        for k in tl.static_range(SCALE_BYTES):
            tl.store(scale_dst[:, None] + t[None, :] * SCALE_BYTES + k,
                     ((sbits >> (8 * k)) & 0xFF).to(tl.uint8), mask=tmask)
    else:
        # ue8m0 bytes (exponent + 127; inf and NaN -> 0xFF as float8_e8m0fnu does), zero pad
        sb = tl.where(is_inf | has_nan, 255, ex + 127)
        sb = tl.where(t[None, :] < NUM_TILES, sb, 0)
        tl.store(scale_dst[:, None] + t[None, :], sb.to(tl.uint8),
                 mask=t[None, :] < SCALE_STRIDE * write[:, None])


@triton.jit
def _token_addresses(cache_ptr, slot, stride0, block_size, D_NOPE: tl.constexpr,
                     V32_FORMAT: tl.constexpr, SCALE_STRIDE: tl.constexpr,
                     TOKEN_BYTES: tl.constexpr):
    """uint8 pointers to the token bytes and the scale bytes of in-range slots ``[T]`` (int64)."""
    blk = slot // block_size
    off = slot % block_size
    base = cache_ptr + blk * stride0
    dst = base + off * TOKEN_BYTES
    if V32_FORMAT:
        scale_dst = dst + D_NOPE
    else:
        scale_dst = base + block_size * TOKEN_BYTES + off * SCALE_STRIDE
    return base, dst, scale_dst


# ---------------------------------------------------------------------------------------------
# kernels (TOK tokens per program)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _quantize_kernel(x_ptr, x_row_stride, num_tokens, cache_ptr, stride0, block_size,
                     pad_start, pad_len,
                     D_NOPE: tl.constexpr, TILE: tl.constexpr, NUM_TILES: tl.constexpr,
                     TILES_P2: tl.constexpr, D_ROPE: tl.constexpr, ROPE_OFF: tl.constexpr,
                     V32_FORMAT: tl.constexpr, SCALE_BYTES: tl.constexpr,
                     SCALE_STRIDE: tl.constexpr, TOKEN_BYTES: tl.constexpr,
                     TOK: tl.constexpr, PAD_P2: tl.constexpr, HW_E4M3: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64) * TOK + tl.arange(0, TOK)
    live = (tok < num_tokens).to(tl.int32)
    tok = tl.where(live != 0, tok, 0)
    base, dst, scale_dst = _token_addresses(cache_ptr, tok, stride0, block_size, D_NOPE,
                                            V32_FORMAT, SCALE_STRIDE, TOKEN_BYTES)
    _pack_tokens(x_ptr + tok * x_row_stride, dst, scale_dst, live, D_NOPE, TILE, NUM_TILES,
                 TILES_P2, D_ROPE, ROPE_OFF, V32_FORMAT, SCALE_BYTES, SCALE_STRIDE, HW_E4M3)
    if PAD_P2 > 0:
        # each block's first token zeroes the block's end padding
        first = live * ((tok % block_size) == 0).to(tl.int32)
        p = tl.arange(0, PAD_P2)
        tl.store(base[:, None] + pad_start + p[None, :],
                 tl.zeros([TOK, PAD_P2], dtype=tl.uint8),
                 mask=p[None, :] < pad_len * first[:, None])


@triton.jit
def _write_kernel(x_ptr, x_row_stride, slots_ptr, rows_ptr, n, num_slots, cache_ptr, stride0,
                  block_size,
                  D_NOPE: tl.constexpr, TILE: tl.constexpr, NUM_TILES: tl.constexpr,
                  TILES_P2: tl.constexpr, D_ROPE: tl.constexpr, ROPE_OFF: tl.constexpr,
                  V32_FORMAT: tl.constexpr, SCALE_BYTES: tl.constexpr,
                  SCALE_STRIDE: tl.constexpr, TOKEN_BYTES: tl.constexpr,
                  TOK: tl.constexpr, SORTED: tl.constexpr, SCAN_BLOCK: tl.constexpr,
                  HW_E4M3: tl.constexpr):
    p0 = tl.program_id(0).to(tl.int64) * TOK
    p = p0 + tl.arange(0, TOK)
    live = p < n
    slot = tl.load(slots_ptr + p, mask=live, other=-1).to(tl.int64)
    valid = live & (slot >= 0) & (slot < num_slots)
    if SORTED:
        # slots sorted stably: the last of a run of equal slots is the last row naming it
        row = tl.load(rows_ptr + p, mask=live, other=0)
        nxt = tl.load(slots_ptr + p + 1, mask=p + 1 < n, other=-1).to(tl.int64)
        winner = (p + 1 >= n) | (nxt != slot)
    else:
        # skip a row when a later row names the same slot
        row = p
        later = tl.zeros([TOK, SCAN_BLOCK], dtype=tl.int32)
        for j0 in range(p0 + 1, n, SCAN_BLOCK):
            j = j0 + tl.arange(0, SCAN_BLOCK)
            s = tl.load(slots_ptr + j, mask=j < n, other=-1)
            hit = (s[None, :] == slot[:, None]) & (j[None, :] > p[:, None]) & (j[None, :] < n)
            later = later | hit.to(tl.int32)
        winner = tl.max(later, axis=1) == 0
    write = (valid & winner).to(tl.int32)
    sl = tl.where(write != 0, slot, 0)
    row = tl.where(write != 0, row, 0)
    base, dst, scale_dst = _token_addresses(cache_ptr, sl, stride0, block_size, D_NOPE,
                                            V32_FORMAT, SCALE_STRIDE, TOKEN_BYTES)
    _pack_tokens(x_ptr + row * x_row_stride, dst, scale_dst, write, D_NOPE, TILE, NUM_TILES,
                 TILES_P2, D_ROPE, ROPE_OFF, V32_FORMAT, SCALE_BYTES, SCALE_STRIDE, HW_E4M3)


@triton.jit
def _dequantize_kernel(cache_ptr, stride0, block_size, num_tokens, out_ptr,
                       D: tl.constexpr, D_NOPE: tl.constexpr, TILE: tl.constexpr,
                       NUM_TILES: tl.constexpr, TILES_P2: tl.constexpr, D_ROPE: tl.constexpr,
                       ROPE_OFF: tl.constexpr, V32_FORMAT: tl.constexpr,
                       SCALE_BYTES: tl.constexpr, SCALE_STRIDE: tl.constexpr,
                       TOKEN_BYTES: tl.constexpr, TOK: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64) * TOK + tl.arange(0, TOK)
    live = (tok < num_tokens).to(tl.int32)
    tok = tl.where(live != 0, tok, 0)
    base, src, scale_src = _token_addresses(cache_ptr, tok, stride0, block_size, D_NOPE,
                                            V32_FORMAT, SCALE_STRIDE, TOKEN_BYTES)
    t = tl.arange(0, TILES_P2)
    c = tl.arange(0, TILE)
    m3 = (t[None, :, None] < NUM_TILES * live[:, None, None]) & (c[None, None, :] < TILE)
    offs = t[None, :, None] * TILE + c[None, None, :]
    codes = tl.load(src[:, None, None] + offs, mask=m3, other=0).to(tl.int32)
    v = e4m3_decode(codes & 0x7F)  # the magnitude; the sign is attached in integers below
    tmask = t[None, :] < NUM_TILES * live[:, None]
    if V32_FORMAT:
        # the tile's f32 scale from its 4 little-endian bytes; e4m3 * f32 in f32, then bf16
        sbits = tl.zeros([TOK, TILES_P2], dtype=tl.int32)
        for k in tl.static_range(SCALE_BYTES):
            b = tl.load(scale_src[:, None] + t[None, :] * SCALE_BYTES + k, mask=tmask, other=0)
            sbits = sbits | (b.to(tl.int32) << (8 * k))
        scale = _f32_bits_to_f64(sbits & 0x7FFFFFFF)
        scale_neg = (sbits >> 31) & 1
    else:
        # ue8m0 -> 2**(b - 127) (b = 0 is an f32 subnormal, 255 NaN). The reference multiplies
        # bf16 by bf16: the exact product (a power of two times e4m3, exact in f32 too) rounded
        # to bf16, the same as the path below.
        sb = tl.load(scale_src[:, None] + t[None, :], mask=tmask, other=127).to(tl.int64)
        scale = ((sb + (1023 - 127)) << 52).to(tl.float64, bitcast=True)  # 2**(b - 127) >= 2**-127
        scale = tl.where(sb == 255, float("nan"), scale)
        scale_neg = tl.zeros([TOK, TILES_P2], dtype=tl.int32)
    # The reference rounds the exact product to f32, then to bf16. The product of an e4m3 value
    # (4 significant bits) and an f32 scale (24) is exact in f64; both roundings are then done
    # in integers, so subnormal products (only arbitrary, non-quantizer scales make them) come
    # out as in the reference even where the GPU's f32 multiply would flush them.
    # The product's sign is the XOR of the factors' signs, attached to the f32 bits of the
    # product of the magnitudes: on the H100 the sign of a zero product came out wrong (-0 for
    # +0 and back) when the signed f64 product was rounded (seen 2026-11-25, random bytes).
    neg = ((codes >> 7) & 1) ^ scale_neg[:, :, None]
    mag = _f64_to_f32_bits(v.to(tl.float64) * scale[:, :, None])
    o = _f32_bits_to_bf16_bits(mag | (neg << 31))
    out_rows = out_ptr + tok * D
    tl.store(out_rows[:, None, None] + offs, o.to(tl.int16), mask=m3)
    r = tl.arange(0, D_ROPE)
    rmask = r[None, :] < D_ROPE * live[:, None]
    lo = tl.load(src[:, None] + ROPE_OFF + 2 * r[None, :], mask=rmask, other=0).to(tl.int32)
    hi = tl.load(src[:, None] + ROPE_OFF + 2 * r[None, :] + 1, mask=rmask, other=0).to(tl.int32)
    tl.store(out_rows[:, None] + D_NOPE + r[None, :], (lo | (hi << 8)).to(tl.int16), mask=rmask)


# ---------------------------------------------------------------------------------------------
# host wrappers (the schema's positional arguments)
# ---------------------------------------------------------------------------------------------

def _consts(lay):
    common = dict(D_NOPE=lay.d_nope, TILE=lay.tile, NUM_TILES=lay.num_tiles,
                  TILES_P2=triton.next_power_of_2(lay.num_tiles), D_ROPE=lay.d_rope,
                  TOK=_TOK, num_warps=_NUM_WARPS)
    if lay is V32:
        return dict(common, V32_FORMAT=True, ROPE_OFF=lay.d_nope + lay.num_tiles * lay.scale_bytes,
                    SCALE_BYTES=lay.scale_bytes, SCALE_STRIDE=lay.num_tiles * lay.scale_bytes,
                    TOKEN_BYTES=lay.bytes_per_token)
    return dict(common, V32_FORMAT=False, ROPE_OFF=lay.d_nope, SCALE_BYTES=1,
                SCALE_STRIDE=MODEL1_SCALE_STRIDE, TOKEN_BYTES=MODEL1_DATA_BYTES)


def _hw_e4m3(t: torch.Tensor) -> bool:
    """Whether to convert to e4m3 with the hardware instruction (needs SM89+; never under the
    interpreter). Off unless ``USE_HW_E4M3``: the integer path is the one verified on an H100."""
    return (USE_HW_E4M3 and not INTERPRET and t.device.type == "cuda"
            and torch.cuda.get_device_capability(t.device) >= (8, 9))


def _raw(cache: torch.Tensor, lay):
    """uint8 view of the cache and its block stride in bytes (as meta.layouts.block_view)."""
    raw = cache.view(torch.uint8)
    stride0 = raw.stride(0) if cache.shape[0] > 1 else lay.block_bytes(cache.shape[1])
    return raw, stride0


def _bf16_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows as bf16 (the reference casts first, with this same torch op) with unit last stride,
    viewed as int16 bit patterns."""
    if x.dtype != torch.bfloat16:
        x = x.to(torch.bfloat16)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.view(torch.int16)


def quantize_kv_cache(kv: torch.Tensor, layout: str) -> torch.Tensor:
    lay = get_layout(layout)
    nb, bs = kv.shape[0], kv.shape[1]
    cache = empty_cache(nb, bs, lay, device=kv.device)  # the fake impl's strides
    num_tokens = nb * bs
    if num_tokens == 0:
        return cache
    x = _bf16_rows(kv.reshape(num_tokens, lay.d))
    raw, stride0 = _raw(cache, lay)
    pad_start = bs * lay.bytes_per_token
    pad_len = lay.block_bytes(bs) - pad_start
    _quantize_kernel[(triton.cdiv(num_tokens, _TOK),)](
        x, x.stride(0), num_tokens, raw, stride0, bs, pad_start, pad_len,
        PAD_P2=triton.next_power_of_2(pad_len) if pad_len > 0 else 0, HW_E4M3=_hw_e4m3(kv),
        **_consts(lay))
    return cache


def dequantize_kv_cache(k_cache: torch.Tensor, layout: str) -> torch.Tensor:
    lay = get_layout(layout)
    nb, bs = k_cache.shape[0], k_cache.shape[1]
    out = torch.empty((nb, bs, 1, lay.d), dtype=torch.bfloat16, device=k_cache.device)
    num_tokens = nb * bs
    if num_tokens == 0:
        return out
    raw, stride0 = _raw(k_cache, lay)
    _dequantize_kernel[(triton.cdiv(num_tokens, _TOK),)](
        raw, stride0, bs, num_tokens, out.view(torch.int16), D=lay.d, **_consts(lay))
    return out


def write_kv_cache(k_cache: torch.Tensor, kv: torch.Tensor, slot_mapping: torch.Tensor,
                   layout: str) -> None:
    lay = get_layout(layout)
    nb, bs = k_cache.shape[0], k_cache.shape[1]
    n = kv.shape[0]
    if n == 0 or nb * bs == 0:
        return None
    x = _bf16_rows(kv)
    raw, stride0 = _raw(k_cache, lay)
    slots = slot_mapping.contiguous()
    num_slots = nb * bs
    if n <= SCAN_MAX_ROWS:
        rows, sorted_ = slots, False  # rows_ptr is not read
    else:
        if num_slots < 2 ** 31 - 1:
            # 32-bit keys sort in half the radix passes; skipped rows become one key past the
            # cache (never written)
            ok = (slots >= 0) & (slots < num_slots)
            slots = torch.where(ok, slots, num_slots).to(torch.int32)
        slots, rows = torch.sort(slots, stable=True)
        sorted_ = True
    _write_kernel[(triton.cdiv(n, _TOK),)](
        x, x.stride(0), slots, rows, n, num_slots, raw, stride0, bs, SORTED=sorted_,
        SCAN_BLOCK=_SCAN_BLOCK, HW_E4M3=_hw_e4m3(kv), **_consts(lay))
    return None


def _no_reasons(*args) -> List[str]:
    # Every input the contract accepts works: non-bf16 rows are cast to bf16 first with the
    # reference's own torch op, and stride(0) padding / uint8 caches are addressed bytewise.
    return []


register("quantize_kv_cache", quantize_kv_cache, _no_reasons)
register("dequantize_kv_cache", dequantize_kv_cache, _no_reasons)
register("write_kv_cache", write_kv_cache, _no_reasons)
