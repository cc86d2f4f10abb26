"""Reference FP8 KV-cache ops against an independent byte assembly written here.

The expected bytes are built with numpy and float64 arithmetic: scales from ``frexp`` (an exact
ceil(log2)), e4m3 codes from a table of all 256 codes (nearest value, ties to the even code),
bf16 RoPE bits by truncating the (bf16-exact) float32 bits, f32 scales with ``<f4`` and ue8m0 as
exponent + 127. Addresses (token t of block k at k * stride0 + ..., MODEL1 scale section after
the block's data) are computed here too, on the raw storage of the cache.
"""


import numpy as np
import pytest
import torch

import torch_mla
from oracles import E4M3, POS, encode_e4m3  # noqa: F401
from torch_mla.meta.layouts import MODEL1, V32

LAYOUTS = {"v32": V32, "model1": MODEL1}
BLOCK_SIZES = (2, 61, 64, 576)


# ---------------------------------------------------------------------------------------------
# independent FP8 helpers (numpy, float64)
# ---------------------------------------------------------------------------------------------

def scale_exponent(amax):
    """e with 2**e = 2 ** ceil(log2(max(amax / 448, 1e-4))), exactly (frexp, no log2)."""
    r = np.maximum(np.asarray(amax, dtype=np.float64) / 448.0, 1e-4)
    m, ex = np.frexp(r)  # r = m * 2**ex, 0.5 <= m < 1
    return np.where(m == 0.5, ex - 1, ex).astype(np.int64)


def bf16_bytes(x):
    """Little-endian bytes of bf16-exact float64 values: the high half of their f32 bits."""
    bits = (np.asarray(x, dtype=np.float32).view(np.uint32) >> 16).astype("<u2")
    return bits.view(np.uint8).reshape(*np.shape(x)[:-1], -1)


def expected_tokens(x, lay):
    """float64 bf16-exact ``[n, d]`` -> (data bytes, scale bytes) of each token:
    V32: ([n, 656], None); MODEL1: ([n, 576], [n, 8])."""
    n = x.shape[0]
    nope = x[:, : lay.d_nope].reshape(n, lay.num_tiles, lay.tile)
    e = scale_exponent(np.abs(nope).max(axis=-1))  # [n, tiles]
    scale = np.ldexp(1.0, e)
    codes = encode_e4m3(nope / scale[..., None]).reshape(n, lay.d_nope)
    rope = bf16_bytes(x[:, lay.d_nope:])
    if lay is V32:
        sbytes = scale.astype("<f4").view(np.uint8).reshape(n, 4 * lay.num_tiles)
        return np.concatenate([codes, sbytes, rope], axis=1), None
    sbytes = np.concatenate([(e + 127).astype(np.uint8), np.zeros((n, 1), np.uint8)], axis=1)
    return np.concatenate([codes, rope], axis=1), sbytes


def decode_tokens(data, scales, lay):
    """The test's own dequantization of token bytes -> float64 ``[n, d]``."""
    n = data.shape[0]
    nope = E4M3[data[:, : lay.d_nope]].reshape(n, lay.num_tiles, lay.tile)
    if lay is V32:
        s_end = lay.d_nope + 4 * lay.num_tiles
        scale = np.ascontiguousarray(data[:, lay.d_nope:s_end]).view("<f4").astype(np.float64)
        rope_b = np.ascontiguousarray(data[:, s_end:])
    else:
        scale = np.ldexp(1.0, scales[:, : lay.num_tiles].astype(np.int64) - 127)
        rope_b = np.ascontiguousarray(data[:, lay.d_nope:])
    rope = (rope_b.view("<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return np.concatenate([(nope * scale[..., None]).reshape(n, lay.d_nope), rope], axis=1)


# ---------------------------------------------------------------------------------------------
# raw storage addressing (the test's own)
# ---------------------------------------------------------------------------------------------

def token_spans(lay, bs, stride0, slot):
    """[(byte offset, length)] of slot's bytes in the cache's flat storage."""
    blk, off = divmod(slot, bs)
    base = blk * stride0
    if lay is V32:
        return [(base + off * 656, 656)]
    return [(base + off * 576, 576), (base + bs * 576 + off * 8, 8)]


def put_token(flat, lay, bs, stride0, slot, data, scales):
    spans = token_spans(lay, bs, stride0, slot)
    for (start, length), src in zip(spans, (data, scales)):
        flat[start:start + length] = src


def read_tokens(flat, lay, bs, stride0, num_slots):
    data, scales = [], []
    for s in range(num_slots):
        spans = token_spans(lay, bs, stride0, s)
        data.append(flat[spans[0][0]:spans[0][0] + spans[0][1]])
        if lay is MODEL1:
            scales.append(flat[spans[1][0]:spans[1][0] + 8])
    return np.stack(data), (np.stack(scales) if scales else None)


def make_store(lay, nb, bs, extra_bytes, gen, dtype=torch.float8_e4m3fn):
    """A cache over random bytes whose blocks are ``block_bytes + extra_bytes`` apart:
    returns (flat uint8 storage tensor, cache view [nb, bs, 1, bytes], stride0)."""
    stride0 = lay.block_bytes(bs) + extra_bytes
    flat = torch.randint(0, 256, (nb * stride0,), dtype=torch.uint8, generator=gen)
    cache = flat.view(nb, stride0)[:, : bs * lay.bytes_per_token]
    cache = cache.view(nb, bs, 1, lay.bytes_per_token)
    if dtype != torch.uint8:
        cache = cache.view(dtype)
    return flat, cache, stride0


def random_kv(n, d, gen, d_nope, tile):
    """bf16 rows with per-tile magnitudes from 2**-30 to 2**30, zero tiles, exact 448 * 2**k
    maxima (amax / 448 a power of two) and negative zeros."""
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    mags = torch.randint(-30, 31, (n, d_nope // tile), generator=gen).double().exp2()
    x[:, :d_nope] *= mags.repeat_interleave(tile, dim=1)
    x[:, d_nope:] *= 4
    if n > 2:
        x[0, :tile] = 0.0  # all-zero tile: the 1e-4 floor
        x[1, :tile] = -0.0
        x[2, :tile] = 448.0 * 2.0 ** -5  # amax / 448 exactly a power of two
        x[2, 3] = -448.0 * 2.0 ** -5
    if n > 3:
        x[3, :] *= 1e-9  # tiny: far below the floor
    return x.to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# helpers self-check
# ---------------------------------------------------------------------------------------------

def test_e4m3_table_helpers():
    assert POS[-1] == 448.0 and POS[1] == 2.0 ** -9
    # The table encoder rounds a few hand-picked values as e4m3 RNE must.
    assert encode_e4m3([0.0, 1.0, 1.0625, 1.1875, 448.0, -2.0 ** -10, -0.0]).tolist() == \
        [0x00, 0x38, 0x38, 0x3A, 0x7E, 0x80, 0x80]
    assert scale_exponent([0.0, 448.0, 449.0, 448.0 * 2 ** -20]).tolist() == [-13, 0, 1, -13]


# ---------------------------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["v32", "model1"])
@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_quantize_bytes(layout, bs):
    lay = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(bs * 7 + len(layout))
    nb = 2 if bs < 576 else 1
    kv = random_kv(nb * bs, lay.d, gen, lay.d_nope, lay.tile)
    cache = torch_mla.quantize_kv_cache(kv.view(nb, bs, 1, lay.d), layout)
    assert cache.dtype == torch.float8_e4m3fn
    assert cache.shape == (nb, bs, 1, lay.bytes_per_token)
    row = lay.block_bytes(bs)
    assert nb == 1 or cache.stride(0) == row

    data, scales = expected_tokens(kv.double().numpy(), lay)
    blocks = []
    for k in range(nb):
        tok = slice(k * bs, (k + 1) * bs)
        if lay is V32:
            blocks.append(data[tok].reshape(-1))
        else:
            pad = np.zeros(row - bs * lay.bytes_per_token, np.uint8)  # zeroed for determinism
            blocks.append(np.concatenate([data[tok].reshape(-1), scales[tok].reshape(-1), pad]))
    expected = np.stack(blocks)
    raw = cache.view(torch.uint8)
    got = raw.as_strided((nb, row), (row, 1), raw.storage_offset()).numpy()
    mism = np.argwhere(got != expected)
    assert mism.size == 0, f"{len(mism)} bytes differ, first at {mism[:5].tolist()}"


@pytest.mark.parametrize("layout", ["v32", "model1"])
def test_quantize_casts_to_bf16_first(layout):
    lay = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 1, lay.d, generator=gen, dtype=torch.float32) * 3
    a = torch_mla.quantize_kv_cache(x, layout).view(torch.uint8)
    b = torch_mla.quantize_kv_cache(x.to(torch.bfloat16), layout).view(torch.uint8)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# dequantize
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["v32", "model1"])
@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_roundtrip_error(layout, bs):
    lay = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(100 + bs)
    nb = 2 if bs < 576 else 1
    x = random_kv(nb * bs, lay.d, gen, lay.d_nope, lay.tile)
    y = torch_mla.dequantize_kv_cache(torch_mla.quantize_kv_cache(x.view(nb, bs, 1, lay.d), layout),
                                      layout)
    assert y.dtype == torch.bfloat16 and y.shape == (nb, bs, 1, lay.d)
    y = y.view(-1, lay.d)
    assert torch.equal(y[:, lay.d_nope:].view(torch.int16), x[:, lay.d_nope:].view(torch.int16))
    xt = x[:, : lay.d_nope].double().view(-1, lay.num_tiles, lay.tile)
    yt = y[:, : lay.d_nope].double().view(-1, lay.num_tiles, lay.tile)
    amax = xt.abs().amax(-1, keepdim=True)
    # e4m3 keeps 3 mantissa bits: half an ulp is 1/16 relative; values below the smallest
    # normal of a floored scale (2**-13) lose at most half a subnormal step 2**-10 * 2**-13.
    bound = torch.maximum(amax / 16, torch.full_like(amax, 2.0 ** -23))
    assert torch.all((yt - xt).abs() <= bound)
    # and the normal-range tiles are much better than that on average
    big = amax.squeeze(-1) > 1e-2
    rel = ((yt - xt).norm(dim=-1) / xt.norm(dim=-1).clamp_min(1e-300))[big]
    assert rel.max() < 0.06


def test_zeros_and_tiny_values():
    for layout, lay in LAYOUTS.items():
        x = torch.zeros(1, 2, 1, lay.d, dtype=torch.bfloat16)
        x[0, 1, 0, : lay.d_nope] = 3e-7  # amax/448 far below 1e-4: scale 2**-13
        c = torch_mla.quantize_kv_cache(x, layout)
        y = torch_mla.dequantize_kv_cache(c, layout)
        assert torch.equal(y[0, 0], x[0, 0])  # zeros stay zeros, no NaN from 0 / 0
        assert torch.all(torch.isfinite(y.float()))
        assert (y[0, 1, 0, : lay.d_nope].double() - 3e-7).abs().max() <= 2.0 ** -23
        data, scales = expected_tokens(x.view(-1, lay.d).double().numpy(), lay)
        if lay is V32:
            sc = np.ascontiguousarray(data[:, 512:528]).view("<f4")
            assert np.all(sc == 2.0 ** -13)
        else:
            assert np.all(scales[:, :7] == 127 - 13) and np.all(scales[:, 7] == 0)


@pytest.mark.parametrize("layout", ["v32", "model1"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.uint8])
def test_dequantize_against_own_decoder(layout, dtype):
    """Dequantize of a padded cache (stride(0) > minimum) written by the test itself."""
    lay = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(5)
    nb, bs = 3, 61
    flat, cache, stride0 = make_store(lay, nb, bs, 3 * 576, gen, dtype)
    x = random_kv(nb * bs, lay.d, gen, lay.d_nope, lay.tile)
    data, scales = expected_tokens(x.double().numpy(), lay)
    fl = flat.numpy()
    for s in range(nb * bs):
        put_token(fl, lay, bs, stride0, s, data[s], None if scales is None else scales[s])
    y = torch_mla.dequantize_kv_cache(cache, layout).view(-1, lay.d).double().numpy()
    want = decode_tokens(data, scales, lay)
    np.testing.assert_array_equal(y, want)


# ---------------------------------------------------------------------------------------------
# write_kv_cache
# ---------------------------------------------------------------------------------------------

def _check_write(layout, nb, bs, extra_bytes, slots, dtype=torch.float8_e4m3fn,
                 kv_dtype=torch.bfloat16, seed=0):
    lay = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)
    flat, cache, stride0 = make_store(lay, nb, bs, extra_bytes, gen, dtype)
    before = flat.clone()
    n = len(slots)
    kv = random_kv(n, lay.d, gen, lay.d_nope, lay.tile).to(kv_dtype)
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    assert torch_mla.write_kv_cache(cache, kv, slot_mapping, layout) is None

    data, scales = expected_tokens(kv.to(torch.bfloat16).double().numpy(), lay)
    want = before.numpy().copy()
    for i, s in enumerate(slots):  # in order: the last writer of a slot wins
        if 0 <= s < nb * bs:
            put_token(want, lay, bs, stride0, s, data[i], None if scales is None else scales[i])
    got = flat.numpy()
    mism = np.flatnonzero(got != want)
    assert mism.size == 0, f"{mism.size} bytes differ, first at {mism[:8].tolist()}"
    return flat, cache


@pytest.mark.parametrize("layout", ["v32", "model1"])
@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_write_skips_and_leaves_other_bytes(layout, bs):
    nb = 3 if bs < 576 else 2
    n_slots = nb * bs
    gen = torch.Generator().manual_seed(bs)
    picks = torch.randperm(n_slots, generator=gen)[:5].tolist()
    slots = [picks[0], -1, picks[1], n_slots, picks[2], -7, n_slots + 100, picks[3],
             n_slots - 1, picks[4]]
    _check_write(layout, nb, bs, 0, slots, seed=bs)


@pytest.mark.parametrize("layout", ["v32", "model1"])
def test_write_padded_stride_and_uint8(layout):
    # stride(0) above the minimum: FlashMLA's V32 quantizer allocates block_size + 1 tokens.
    lay = LAYOUTS[layout]
    extra = lay.bytes_per_token if lay is V32 else 2 * 576
    _check_write(layout, 3, 5, extra, [14, 0, -1, 7, 15, 3], seed=1)
    _check_write(layout, 3, 5, extra, [2, 9, -1, 13], dtype=torch.uint8, seed=2)
    _check_write(layout, 2, 64, extra + 17, [127, 64, 63, 1, 200], dtype=torch.uint8, seed=3)


@pytest.mark.parametrize("layout", ["v32", "model1"])
def test_write_slot_zero_and_duplicates(layout):
    # Skipped rows are routed to slot 0 internally: slot 0 must end up exactly as the last
    # valid writer of slot 0 left it, or unchanged when none writes it.
    _check_write(layout, 2, 4, 0, [-1, 0, 5, -1, 0, 3, 8, 5, -2], seed=4)
    _check_write(layout, 2, 4, 0, [-1, 5, 9, -3], seed=5)  # slot 0 untouched
    _check_write(layout, 2, 4, 0, [-1, -1, 100], seed=6)  # nothing valid at all
    _check_write(layout, 2, 4, 0, [6, 6, 6, 2, 6], seed=7)  # last writer wins
    _check_write(layout, 1, 2, 0, [1, 0, 1, 0], seed=8)  # single block


@pytest.mark.parametrize("layout", ["v32", "model1"])
def test_write_float32_rows_quantize_as_bf16(layout):
    _check_write(layout, 2, 3, 0, [4, 1, -1], kv_dtype=torch.float32, seed=9)


@pytest.mark.parametrize("layout", ["v32", "model1"])
@pytest.mark.parametrize("bs", [2, 61])
def test_write_all_slots_equals_quantize(layout, bs):
    lay = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(11 + bs)
    nb = 2
    kv = random_kv(nb * bs, lay.d, gen, lay.d_nope, lay.tile)
    flat, cache, stride0 = make_store(lay, nb, bs, 576, gen)
    torch_mla.write_kv_cache(cache, kv, torch.randperm(nb * bs, generator=gen).sort().values,
                             layout)
    q = torch_mla.quantize_kv_cache(kv.view(nb, bs, 1, lay.d), layout)
    assert torch.equal(cache.view(torch.uint8), q.view(torch.uint8))


def test_write_empty_rows_is_noop():
    for layout, lay in LAYOUTS.items():
        gen = torch.Generator().manual_seed(0)
        flat, cache, _ = make_store(lay, 2, 3, 0, gen)
        before = flat.clone()
        torch_mla.write_kv_cache(cache, torch.empty(0, lay.d, dtype=torch.bfloat16),
                                 torch.empty(0, dtype=torch.int64), layout)
        assert torch.equal(flat, before)
