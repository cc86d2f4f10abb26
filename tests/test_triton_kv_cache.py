"""Triton FP8 KV-cache kernels (under TRITON_INTERPRET on the CPU) against the reference, byte for
byte, over the cache's whole raw storage: both layouts, block sizes 2/61/64, padded stride(0),
uint8 and float8 caches, skipped / out-of-range / duplicated slots, non-bf16 rows, inf and NaN.
One case also checks the bytes against the independent numpy encoder of the reference's tests.

Every comparison covers every byte of the storage the cache lives in (so "untouched bytes stay
unchanged" is checked too). The one allowed difference is the sign/payload of a NaN, which torch
itself does not fix across platforms (libm, CPU vector vs scalar paths, CUDA): with NaN inputs, a
byte may differ only where both sides hold a NaN's top byte (0x7F or 0xFF: an e4m3 NaN code or the
high byte of an f32 NaN scale), and a dequantized NaN need only be a NaN.
"""

import numpy as np
import pytest
import torch

import torch_mla
from torch_mla.meta.layouts import MODEL1, V32
from torch_mla.reference import kv_cache as ref_kv
from torch_mla.triton import kv_cache as tri_kv

pytestmark = pytest.mark.skipif(not torch_mla.triton.AVAILABLE, reason="needs Triton")

LAYOUTS = {"v32": V32, "model1": MODEL1}


def _storage(t: torch.Tensor) -> torch.Tensor:
    """All bytes of the storage ``t`` views (pads and neighbouring blocks included)."""
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())


def _random_kv(n, lay, gen, dtype=torch.bfloat16):
    """Rows whose tiles span magnitudes 2**-40 .. 2**40, with an all-zero tile, a -0 tile, a tile
    whose amax / 448 is an exact power of two, a tile just above one, and a tiny row."""
    x = torch.randn(n, lay.d, generator=gen, dtype=torch.float64)
    mags = torch.randint(-40, 41, (n, lay.num_tiles), generator=gen).double().exp2()
    x[:, : lay.d_nope] *= mags.repeat_interleave(lay.tile, dim=1)
    x[:, lay.d_nope:] *= 3
    if n > 4:
        x[0, : lay.tile] = 0.0
        x[1, : lay.tile] = -0.0
        x[2, : lay.tile] = 1.0
        x[2, 5] = -448.0 * 2.0 ** -7  # amax / 448 == 2**-7 exactly
        x[3, lay.tile: 2 * lay.tile] = 0.5
        x[3, lay.tile + 1] = 449.0 * 2.0 ** 3  # just above a power of two (bf16: 448 * 2**3 + ulp)
        x[4] *= 1e-30
    return x.to(dtype)


def _make_store(lay, nb, bs, extra, gen, dtype=torch.float8_e4m3fn):
    """A cache over random bytes, blocks ``block_bytes + extra`` apart (padded stride(0))."""
    stride0 = lay.block_bytes(bs) + extra
    flat = torch.randint(0, 256, (nb * stride0 + 7,), dtype=torch.uint8, generator=gen)
    cache = flat[:nb * stride0].view(nb, stride0)[:, : bs * lay.bytes_per_token]
    cache = cache.view(nb, bs, 1, lay.bytes_per_token)
    return flat, (cache if dtype == torch.uint8 else cache.view(dtype))


def _assert_equal_up_to_nan_sign(got, want):
    bad = (got != want).nonzero().flatten()
    nan_top = lambda b: (b == 0x7F) | (b == 0xFF)  # noqa: E731
    ok = nan_top(got[bad]) & nan_top(want[bad])
    assert bool(ok.all()), f"bytes differ at {bad[~ok][:8].tolist()}"


def _triton(fn, *args):
    with torch_mla.use_backend("triton"):  # forced: raises instead of falling back
        return fn(*args)


# ---------------------------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["v32", "model1"])
@pytest.mark.parametrize("bs", [2, 61, 64])
def test_quantize_matches_reference_bytes(layout, bs):
    lay = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(17 * bs + len(layout))
    nb = 2
    kv = _random_kv(nb * bs, lay, gen).view(nb, bs, 1, lay.d)
    got = _triton(torch_mla.quantize_kv_cache, kv, layout)
    want = ref_kv.quantize_kv_cache(kv, layout)
    assert got.dtype == torch.float8_e4m3fn and got.shape == want.shape
    assert got.stride() == want.stride()
    # whole storage: MODEL1's end-of-block padding must be zeroed as the reference does
    g, w = _storage(got), _storage(want)
    assert g.numel() == w.numel() == nb * lay.block_bytes(bs)
    bad = (g != w).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} bytes differ, first at {bad[:8].tolist()}"


def test_quantize_matches_independent_encoder():
    # the numpy/float64 byte assembly of the reference tests (frexp scales, e4m3 table RNE)
    from test_reference_kv_cache import expected_tokens

    gen = torch.Generator().manual_seed(5)
    for layout, lay in LAYOUTS.items():
        bs = 5
        kv = _random_kv(2 * bs, lay, gen)
        got = _triton(torch_mla.quantize_kv_cache, kv.view(2, bs, 1, lay.d), layout)
        data, scales = expected_tokens(kv.double().numpy(), lay)
        rows = _storage(got).numpy().reshape(2, lay.block_bytes(bs))
        for k in range(2):
            tok = slice(k * bs, (k + 1) * bs)
            if lay is V32:
                want = data[tok].reshape(-1)
            else:
                want = np.concatenate([data[tok].reshape(-1), scales[tok].reshape(-1)])
            np.testing.assert_array_equal(rows[k, : want.size], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_non_bf16_rows(dtype):
    gen = torch.Generator().manual_seed(7)
    for layout, lay in LAYOUTS.items():
        kv = (torch.randn(2, 3, 1, lay.d, generator=gen) * 5).to(dtype)
        got = _triton(torch_mla.quantize_kv_cache, kv, layout)
        want = ref_kv.quantize_kv_cache(kv, layout)
        assert torch.equal(_storage(got), _storage(want))


def test_quantize_strided_input_and_single_block():
    gen = torch.Generator().manual_seed(8)
    for layout, lay in LAYOUTS.items():
        big = _random_kv(2 * 4 * 2, lay, gen).view(2, 4, 2, lay.d)
        kv = big[:, :, 1:]  # non-contiguous rows
        got = _triton(torch_mla.quantize_kv_cache, kv, layout)
        assert torch.equal(_storage(got), _storage(ref_kv.quantize_kv_cache(kv, layout)))
        one = kv[:1]  # nb == 1
        got = _triton(torch_mla.quantize_kv_cache, one, layout)
        assert torch.equal(_storage(got), _storage(ref_kv.quantize_kv_cache(one, layout)))


def test_quantize_inf_and_nan_tiles():
    gen = torch.Generator().manual_seed(9)
    for layout, lay in LAYOUTS.items():
        kv = _random_kv(6, lay, gen)
        kv[0, 3] = float("nan")
        kv[0, lay.tile + 9] = -float("nan")
        kv[1, 5] = float("inf")
        kv[2, 7] = -float("inf")
        kv[3, lay.tile + 1] = float("inf")
        kv[3, lay.tile + 2] = float("nan")
        kv[4, -1] = float("nan")  # RoPE NaN passes through
        kv[5, lay.d_nope - 1] = -float("inf")
        for src in (kv, kv.double()):  # bf16 NaN bits 0x7FC0, and whatever f64 -> bf16 gives
            src = src.view(2, 3, 1, lay.d)
            got = _storage(_triton(torch_mla.quantize_kv_cache, src, layout))
            want = _storage(ref_kv.quantize_kv_cache(src, layout))
            _assert_equal_up_to_nan_sign(got, want)
        # a NaN tile is all NaN codes; an inf tile holds 0s and a NaN code (inf / inf)
        t = _triton(torch_mla.quantize_kv_cache, kv.view(2, 3, 1, lay.d), layout)
        rows = _storage(t).view(2, lay.block_bytes(3))
        step = 656 if lay is V32 else 576  # token data stride within a block
        assert torch.all((rows[0, : lay.tile] & 0x7F) == 0x7F)  # token 0, tile 0
        assert set((rows[0, step: step + lay.tile] & 0x7F).tolist()) == {0, 0x7F}  # token 1


def test_quantize_empty():
    for layout, lay in LAYOUTS.items():
        got = _triton(torch_mla.quantize_kv_cache, torch.empty(0, 4, 1, lay.d), layout)
        assert got.shape == (0, 4, 1, lay.bytes_per_token)


# ---------------------------------------------------------------------------------------------
# dequantize
# ---------------------------------------------------------------------------------------------

def _assert_bf16_equal(got, want):
    """Bitwise equal, except that a NaN need only be a NaN."""
    gn, wn = torch.isnan(got.float()), torch.isnan(want.float())
    assert torch.equal(gn, wn)
    assert torch.equal(got.view(torch.int16)[~gn], want.view(torch.int16)[~wn])


@pytest.mark.parametrize("layout", ["v32", "model1"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.uint8])
def test_dequantize_random_bytes_padded_stride(layout, dtype):
    # Every byte random: all e4m3 codes (NaN included), arbitrary f32 / ue8m0 scales (inf, NaN,
    # subnormal), blocks 3 * 576 + 5 bytes apart beyond the minimum.
    lay = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(11)
    flat, cache = _make_store(lay, 3, 61, 3 * 576 + 5, gen, dtype)
    before = flat.clone()
    got = _triton(torch_mla.dequantize_kv_cache, cache, layout)
    want = ref_kv.dequantize_kv_cache(cache, layout)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 61, 1, lay.d)
    _assert_bf16_equal(got, want)
    assert torch.equal(flat, before)


@pytest.mark.parametrize("layout", ["v32", "model1"])
def test_dequantize_of_quantize(layout):
    lay = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(12)
    kv = _random_kv(2 * 64, lay, gen).view(2, 64, 1, lay.d)
    cache = ref_kv.quantize_kv_cache(kv, layout)
    got = _triton(torch_mla.dequantize_kv_cache, cache, layout)
    want = ref_kv.dequantize_kv_cache(cache, layout)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    # and it is close to the input: e4m3 keeps 3 mantissa bits (half an ulp: 1/16 of amax)
    x = kv.view(-1, lay.d)[:, : lay.d_nope].double().view(-1, lay.num_tiles, lay.tile)
    y = got.view(-1, lay.d)[:, : lay.d_nope].double().view(-1, lay.num_tiles, lay.tile)
    amax = x.abs().amax(-1, keepdim=True)
    assert torch.all((y - x).abs() <= torch.maximum(amax / 16, torch.full_like(amax, 2.0 ** -22)))


# ---------------------------------------------------------------------------------------------
# write_kv_cache
# ---------------------------------------------------------------------------------------------

def _check_write(layout, nb, bs, extra, slots, dtype=torch.float8_e4m3fn, kv_dtype=torch.bfloat16,
                 seed=0, kv=None, nan_ok=False):
    lay = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)
    flat, cache = _make_store(lay, nb, bs, extra, gen, dtype)
    flat_ref = flat.clone()
    cache_ref = torch.empty(0, dtype=flat.dtype).set_(flat_ref.untyped_storage(),
                                                      cache.storage_offset(), cache.shape,
                                                      cache.stride()).view(cache.dtype)
    if kv is None:
        kv = _random_kv(len(slots), lay, gen, kv_dtype)
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    assert _triton(torch_mla.write_kv_cache, cache, kv, slot_mapping, layout) is None
    ref_kv.write_kv_cache(cache_ref, kv, slot_mapping, layout)
    if nan_ok:
        _assert_equal_up_to_nan_sign(flat, flat_ref)
        return flat
    bad = (flat != flat_ref).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} bytes differ, first at {bad[:8].tolist()}"
    return flat


@pytest.fixture(params=["scan", "sort"])
def dedup_path(request, monkeypatch):
    """Run write tests through both duplicate-resolution paths: the in-kernel scan (with a small
    scan block so the scan loop runs several times) and the device sort."""
    if request.param == "scan":
        monkeypatch.setattr(tri_kv, "_SCAN_BLOCK", 4)
    else:
        monkeypatch.setattr(tri_kv, "SCAN_MAX_ROWS", 0)
    return request.param


@pytest.mark.parametrize("layout", ["v32", "model1"])
@pytest.mark.parametrize("bs", [2, 61, 64])
def test_write_skips_out_of_range_and_duplicates(layout, bs, dedup_path):
    nb = 3
    n_slots = nb * bs
    gen = torch.Generator().manual_seed(bs)
    picks = torch.randperm(n_slots, generator=gen)[:6].tolist()
    slots = [picks[0], -1, picks[1], n_slots, picks[2], -7, n_slots + 100, picks[3],
             n_slots - 1, picks[4], picks[1], 0, -1, picks[5], picks[1], 0, 2 ** 40]
    _check_write(layout, nb, bs, 0, slots, seed=bs)


@pytest.mark.parametrize("layout", ["v32", "model1"])
def test_write_padded_stride_and_uint8(layout, dedup_path):
    lay = LAYOUTS[layout]
    extra = lay.bytes_per_token if lay is V32 else 2 * 576
    _check_write(layout, 3, 5, extra, [14, 0, -1, 7, 15, 3], seed=1)
    _check_write(layout, 3, 5, extra + 17, [2, 9, -1, 13, 9], dtype=torch.uint8, seed=2)  # odd
    _check_write(layout, 1, 2, 5, [1, 0, 1, -1], seed=3)  # a single block


@pytest.mark.parametrize("layout", ["v32", "model1"])
def test_write_many_rows_across_programs(layout, dedup_path):
    # more rows than one program holds (32 under the interpreter), duplicates across programs
    gen = torch.Generator().manual_seed(4)
    slots = torch.randint(-3, 2 * 4 + 2, (70,), generator=gen).tolist()
    _check_write(layout, 2, 4, 0, slots, seed=4)


@pytest.mark.parametrize("layout", ["v32", "model1"])
def test_write_rows_float32_strided(layout):
    lay = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(6)
    big = _random_kv(4, lay, gen, torch.float32)
    wide = torch.zeros(4, lay.d + 32)
    wide[:, : lay.d] = big
    _check_write(layout, 2, 3, 0, [4, 1, -1, 4], kv=wide[:, : lay.d], seed=6)


def test_write_inf_nan_rows():
    for layout, lay in LAYOUTS.items():
        gen = torch.Generator().manual_seed(13)
        kv = _random_kv(3, lay, gen)
        kv[0, 1] = float("nan")
        kv[1, lay.tile] = -float("inf")
        _check_write(layout, 2, 3, 0, [5, 0, 2], kv=kv, seed=13, nan_ok=True)


def test_write_all_slots_equals_quantize():
    gen = torch.Generator().manual_seed(14)
    for layout, lay in LAYOUTS.items():
        nb, bs = 2, 5
        kv = _random_kv(nb * bs, lay, gen)
        flat, cache = _make_store(lay, nb, bs, 0, gen)
        _triton(torch_mla.write_kv_cache, cache, kv, torch.randperm(nb * bs, generator=gen).sort()
                .values, layout)
        q = ref_kv.quantize_kv_cache(kv.view(nb, bs, 1, lay.d), layout)
        assert torch.equal(cache.view(torch.uint8), q.view(torch.uint8))


def test_write_empty_is_noop():
    for layout, lay in LAYOUTS.items():
        gen = torch.Generator().manual_seed(0)
        flat, cache = _make_store(lay, 2, 3, 0, gen)
        before = flat.clone()
        _triton(torch_mla.write_kv_cache, cache, torch.empty(0, lay.d, dtype=torch.bfloat16),
                torch.empty(0, dtype=torch.int64), layout)
        assert torch.equal(flat, before)


def test_triton_is_chosen_for_every_kv_cache_op():
    cache = ref_kv.quantize_kv_cache(torch.zeros(1, 2, 1, 576), "v32")
    with torch_mla.use_backend("triton"):
        text = torch_mla.explain("dequantize_kv_cache", cache, "v32")
    assert "triton" in text.splitlines()[0]
    for op in ("quantize_kv_cache", "dequantize_kv_cache", "write_kv_cache"):
        assert op in torch_mla.triton.IMPLS


# ---------------------------------------------------------------------------------------------
# the bit-level conversions, directly against torch's own casts
# ---------------------------------------------------------------------------------------------

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import torch_mla.triton._jit as tri_jit  # noqa: E402


@triton.jit
def _convert_kernel(f_ptr, code_ptr, back_ptr, bf_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    f = tl.load(f_ptr + i, mask=m, other=0.0)
    tl.store(code_ptr + i, tri_jit.e4m3_encode(f), mask=m)
    c = (i & 0xFF).to(tl.int32)
    tl.store(back_ptr + i, tri_jit.e4m3_decode(c), mask=m)
    tl.store(bf_ptr + i, tri_kv._f32_to_bf16_bits(f), mask=m)


def test_bit_conversions_match_torch_casts():
    e4m3 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    finite = e4m3[~torch.isnan(e4m3)].unique()
    mids = (finite[1:] + finite[:-1]) / 2  # exact ties: round half to even
    gen = torch.Generator().manual_seed(21)
    rnd = (torch.rand(4000, generator=gen) * 2 - 1) * 448
    tiny = torch.randn(1000, generator=gen) * 2.0 ** -8  # subnormal e4m3 range
    specials = torch.tensor([0.0, -0.0, 2.0 ** -10, -2.0 ** -10, 3 * 2.0 ** -11, 1e-45, -1e-40,
                             448.0, -448.0, 2.0 ** -6, 2.0 ** -6 * (1 - 2.0 ** -20),
                             float("nan"), -float("nan")])
    f = torch.cat([finite, -finite, mids, mids.nextafter(torch.tensor(1e9)),
                   mids.nextafter(torch.tensor(-1e9)), rnd, tiny, specials]).float()
    n = f.numel()
    code = torch.empty(n, dtype=torch.int32)
    back = torch.empty(n, dtype=torch.float32)
    bf = torch.empty(n, dtype=torch.int32)
    _convert_kernel[(triton.cdiv(n, 1024),)](f, code, back, bf, n, BLOCK=1024)
    want = f.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
    nan = torch.isnan(f)
    assert torch.equal(code[~nan], want[~nan])
    assert torch.all((code[nan] & 0x7F) == 0x7F)
    dec = torch.arange(n).remainder(256).to(torch.uint8).view(torch.float8_e4m3fn).float()
    assert torch.equal(torch.isnan(back), torch.isnan(dec))
    ok = ~torch.isnan(dec)
    assert torch.equal(back[ok].view(torch.int32), dec[ok].view(torch.int32))  # -0 too
    # f32 -> bf16, round to nearest even, on values of every magnitude (and the ties)
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (n,), generator=gen, dtype=torch.int64)
    g = bits.to(torch.int32).view(torch.float32)
    g[:200] = (g[:200].view(torch.int32) & ~0xFFFF | 0x8000).view(torch.float32)  # exact ties
    _convert_kernel[(triton.cdiv(n, 1024),)](g, code, back, bf, n, BLOCK=1024)
    nan = torch.isnan(g)
    want_bf = g.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    assert torch.equal(bf[~nan], want_bf[~nan])
    assert torch.all(bf[nan] == 0x7FFF)


def test_e4m3_overflow_saturates_like_torch_2_13():
    # unreachable from quantize (|x| / scale_inv <= 448), pinned anyway: finite overflow and inf
    # give +-448 (0x7E | sign), as torch 2.13's cast does
    f = torch.tensor([464.0, 470.0, 480.0, 1e30, float("inf"), -500.0, -float("inf")])
    code = torch.empty(7, dtype=torch.int32)
    scratch_f = torch.empty(7)
    scratch_i = torch.empty(7, dtype=torch.int32)
    _convert_kernel[(1,)](f, code, scratch_f, scratch_i, 7, BLOCK=8)
    assert code.tolist() == [0x7E] * 5 + [0xFE] * 2


@triton.jit
def _f64_kernel(d_ptr, f32_out, bits_ptr, f64_out, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(f32_out + i, tri_kv._f64_to_f32_bits(tl.load(d_ptr + i, mask=m, other=0.0)), mask=m)
    b = tl.load(bits_ptr + i, mask=m, other=0)
    tl.store(f64_out + i, tri_kv._f32_bits_to_f64(b), mask=m)


def test_f64_f32_integer_roundings_match_ieee_casts():
    # dequantize's exact product path: f64 -> f32 (RNE, subnormals, overflow) and f32 bits -> f64
    gen = torch.Generator().manual_seed(22)
    n = 6000
    mant = torch.rand(n, generator=gen, dtype=torch.float64) + 1
    expo = torch.randint(-170, 140, (n,), generator=gen).double()
    d = mant * torch.exp2(expo) * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    # exact ties and near-ties of the f32 grid, normal and subnormal
    base = torch.randint(1, 2 ** 23, (500,), generator=gen).double()
    d[:500] = (base + 0.5) * 2.0 ** -149  # subnormal ties
    d[500:1000] = (base + 2 ** 23 + 0.5) * 2.0 ** -30  # normal ties
    d[1000:1010] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"),
                                 3.4028235677973366e38, 3.5e38, 2.0 ** -150, 2.0 ** -151 * 3,
                                 -2.0 ** -149 * 0.75])
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (n,), generator=gen, dtype=torch.int64)
    bits = bits.to(torch.int32)
    bits[:300] &= 0x807FFFFF  # f32 subnormals
    f32 = torch.empty(n, dtype=torch.int32)
    f64 = torch.empty(n, dtype=torch.float64)
    _f64_kernel[(triton.cdiv(n, 1024),)](d, f32, bits, f64, n, BLOCK=1024)
    want = d.to(torch.float32)
    nan = torch.isnan(want)
    assert torch.equal(f32[~nan], want.view(torch.int32)[~nan])
    assert torch.isnan(f32.view(torch.float32)[nan]).all()
    want64 = bits.view(torch.float32).double()
    nan = torch.isnan(want64)
    assert torch.equal(f64[~nan].view(torch.int64), want64[~nan].view(torch.int64))
    assert torch.isnan(f64[nan]).all()
