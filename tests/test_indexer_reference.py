"""Reference DSA lightning indexer (inference ops) against independent float64 formulas.

Everything expected is computed here: the Hadamard matrix built explicitly (Sylvester recursion,
float64), e4m3 codes from a table of all 256 codes, the paged cache's bytes placed at the offsets
meta/indexer.py documents, top-k by a full stable sort.
"""

import struct

import numpy as np
import pytest
import torch

import torch_mla
from torch_mla.reference import indexer as ref_indexer
import oracles
from oracles import E4M3, fp8_to64, hadamard64  # noqa: F401

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------
# independent helpers
# ---------------------------------------------------------------------------------------------

def encode_e4m3(v):
    """The quantizer's codes: a value that rounds to zero is stored as +0."""
    return oracles.encode_e4m3(v, zero_sign=False)


topk_by_full_sort = oracles.topk_by_sort


def rotate64(x):
    d = x.shape[-1]
    return x.double() @ hadamard64(d) / d ** 0.5


def quantize_inputs(x, hadamard=True):
    """(fp8, scale) from the op; the op itself is checked in the quantize tests."""
    return torch_mla.indexer_quantize(x, hadamard=hadamard)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(ref_indexer, "CHUNK_BYTES", 3000)


# ---------------------------------------------------------------------------------------------
# indexer_quantize
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d,dtype", [(128, torch.bfloat16), (16, torch.float32), (1, torch.float16)])
def test_quantize_matches_float64_hadamard_and_e4m3(d, dtype):
    g = torch.Generator().manual_seed(d)
    x = (torch.randn(3, 5, d, generator=g) * torch.rand(3, 5, 1, generator=g) * 4).to(dtype)
    x_fp8, scale = torch_mla.indexer_quantize(x)
    assert x_fp8.dtype == torch.float8_e4m3fn and x_fp8.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    y = rotate64(x)
    scale64 = y.abs().amax(-1).clamp_min(1e-4) / 448
    torch.testing.assert_close(scale.double(), scale64, rtol=2e-6, atol=0)
    # e4m3 codes of y / scale (the op's own scale): equal except where the fp32 rotation moved
    # a value across a rounding boundary, and then only to the neighbouring code.
    codes = x_fp8.view(torch.uint8).numpy().astype(np.int64)
    want = encode_e4m3((y / scale.double()[..., None]).clamp(-448, 448).numpy()).astype(np.int64)
    assert (codes == want).mean() > 0.99
    assert np.all(np.abs(E4M3[codes] - E4M3[want]) <= np.abs(E4M3[want]) / 8 + 2.0 ** -9)
    # y ~= x_fp8 * scale within half an e4m3 step
    deq = fp8_to64(x_fp8) * scale.double()[..., None]
    assert torch.all((deq - y).abs() <= y.abs() / 16 * 1.001 + 2.0 ** -10 * scale.double()[..., None])


def test_quantize_without_hadamard_is_exact_f32_formula_any_d():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 12, generator=g).to(torch.bfloat16)
    x_fp8, scale = torch_mla.indexer_quantize(x, hadamard=False)
    xf = x.float().numpy()
    s32 = np.maximum(np.abs(xf).max(-1), np.float32(1e-4)) / np.float32(448)
    np.testing.assert_array_equal(scale.numpy(), s32)
    # the f32 quotient may exceed 448 by an ulp: clamped, as documented
    want = encode_e4m3(np.clip((xf / s32[:, None]).astype(np.float32), -448, 448).astype(np.float64))
    np.testing.assert_array_equal(x_fp8.view(torch.uint8).numpy(), want)


@pytest.mark.parametrize("hadamard", [True, False])
def test_quantize_ue8m0_scales_are_powers_of_two_rounded_up(hadamard):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 32, generator=g) * torch.logspace(-3, 3, 64)[:, None]
    x[5] = 0
    x[7, :] = 448 * 2.0 ** -3  # amax / 448 exactly a power of two: stays
    x_fp8, scale = torch_mla.indexer_quantize(x, hadamard=hadamard, scale_format="ue8m0")
    mant, _ = np.frexp(scale.double().numpy())
    assert np.all(mant == 0.5), "ue8m0 scales must be powers of two"
    y = rotate64(x) if hadamard else x.double()
    need = y.abs().amax(-1).clamp_min(1e-4) / 448
    assert torch.all(scale.double() >= need * (1 - 1e-6))
    assert torch.all(scale.double() < 2 * need * (1 + 1e-6))
    if not hadamard:
        assert scale[7].item() == 2.0 ** -3
    deq = fp8_to64(x_fp8) * scale.double()[:, None]
    assert torch.all((deq - y).abs() <= y.abs() / 16 * 1.001 + 2.0 ** -10 * scale.double()[:, None])


@pytest.mark.parametrize("fmt", ["fp32", "ue8m0"])
def test_quantize_zero_rows_get_a_safe_scale(fmt):
    x = torch.zeros(3, 2, 64, dtype=torch.bfloat16)
    x[1, 1, 3] = 1.0
    x_fp8, scale = torch_mla.indexer_quantize(x, scale_format=fmt)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    zero_rows = torch.ones(3, 2, dtype=torch.bool)
    zero_rows[1, 1] = False
    want = 1e-4 / 448 if fmt == "fp32" else 2.0 ** -22  # 2**-22 = smallest power >= 1e-4/448
    torch.testing.assert_close(scale[zero_rows], torch.full((5,), want), rtol=1e-6, atol=0)
    assert torch.all(x_fp8.view(torch.uint8)[zero_rows] == 0)
    assert not torch.isnan(x_fp8.float()).any()


def test_quantize_chunked_equals_unchunked(small_chunks):
    x = torch.randn(40, 3, 32, generator=torch.Generator().manual_seed(3))
    a = torch_mla.indexer_quantize(x)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ref_indexer, "CHUNK_BYTES", 256 << 20)
        b = torch_mla.indexer_quantize(x)
    assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8))
    assert torch.equal(a[1], b[1])


# ---------------------------------------------------------------------------------------------
# indexer_logits (ragged)
# ---------------------------------------------------------------------------------------------

def logits64(q_fp8, q_extra_w, k_fp8, k_scale, allowed):
    """sum_h w * ReLU(q . k) * k_scale in float64, -inf where not allowed."""
    s = torch.einsum("thd,sd->ths", fp8_to64(q_fp8), fp8_to64(k_fp8))
    val = torch.einsum("th,ths->ts", q_extra_w.double(), s.clamp_min(0)) * k_scale.double()
    return torch.where(allowed, val, torch.full_like(val, NEG_INF))


@pytest.mark.parametrize("as_bytes", [False, True])
@pytest.mark.parametrize("chunked", [False, True])
def test_logits_ragged_windows_match_float64(as_bytes, chunked, monkeypatch):
    if chunked:
        monkeypatch.setattr(ref_indexer, "CHUNK_BYTES", 1500)  # key and query chunks
    g = torch.Generator().manual_seed(4)
    h, d = 4, 32
    lens = [5, 0, 9, 3]  # packed sequences (one empty), causal
    s_k = sum(lens)
    starts = np.cumsum([0] + lens[:-1])
    k_start = torch.tensor([st for st, n in zip(starts, lens) for _ in range(n)], dtype=torch.int32)
    k_end = torch.tensor([st + i + 1 for st, n in zip(starts, lens) for i in range(n)],
                         dtype=torch.int32)
    # windows reaching outside [0, s_k) are clipped; an empty and an inverted window give -inf
    k_start = torch.cat([k_start, torch.tensor([-3, 4, 6], dtype=torch.int32)])
    k_end = torch.cat([k_end, torch.tensor([s_k + 5, 4, 2], dtype=torch.int32)])
    s_q = k_start.shape[0]
    q_fp8, q_scale = quantize_inputs(torch.randn(s_q, h, d, generator=g).to(torch.bfloat16))
    k_fp8, k_scale = quantize_inputs(torch.randn(s_k, d, generator=g).to(torch.bfloat16))
    w = torch.randn(s_q, h, generator=g) * q_scale
    if as_bytes:
        q_fp8, k_fp8 = q_fp8.view(torch.uint8), k_fp8.view(torch.uint8)
    out = torch_mla.indexer_logits(q_fp8, k_fp8, k_scale, w, k_start, k_end)
    cols = torch.arange(s_k)
    allowed = (cols >= k_start[:, None].long()) & (cols < k_end[:, None].long())
    want = logits64(q_fp8, w, k_fp8, k_scale, allowed)
    assert out.dtype == torch.float32 and out.shape == (s_q, s_k)
    assert torch.equal(torch.isinf(out), ~allowed)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_logits_approximate_the_unquantized_score():
    """The rotation is orthogonal (q.k unchanged) and q's scale goes into the weights, so the
    FP8 logits track sum_h w * ReLU(q . k) of the original bf16 vectors."""
    g = torch.Generator().manual_seed(5)
    s_q, s_k, h, d = 16, 24, 8, 128
    q = torch.randn(s_q, h, d, generator=g)
    k = torch.randn(s_k, d, generator=g)
    w = torch.randn(s_q, h, generator=g)
    q_fp8, q_scale = torch_mla.indexer_quantize(q)
    k_fp8, k_scale = torch_mla.indexer_quantize(k)
    zeros = torch.zeros(s_q, dtype=torch.int32)
    out = torch_mla.indexer_logits(q_fp8, k_fp8, k_scale, w * q_scale, zeros, zeros + s_k)
    exact = torch.einsum("th,ths->ts", w.double(),
                         torch.einsum("thd,sd->ths", q.double(), k.double()).clamp_min(0))
    assert ((out.double() - exact).norm() / exact.norm()).item() < 0.05


# ---------------------------------------------------------------------------------------------
# write_indexer_cache: bytes at the documented offsets
# ---------------------------------------------------------------------------------------------

def expected_cache_bytes(store, stride0, bs, d, slots, q_fp8, scale):
    """Place each written row at the documented offsets of a copy of the raw storage: token t of
    block b: values at b * stride0 + t * d, f32 scale at b * stride0 + bs * d + 4 * t. The last
    row naming a slot wins; invalid slots are skipped."""
    out = bytearray(store.numpy().tobytes())
    nslots = store.numel() // stride0 * bs if stride0 else 0
    for i, s in enumerate(slots.tolist()):
        if s < 0 or s >= nslots:
            continue
        blk, t = divmod(s, bs)
        base = blk * stride0
        out[base + t * d: base + (t + 1) * d] = q_fp8[i].view(torch.uint8).numpy().tobytes()
        out[base + bs * d + 4 * t: base + bs * d + 4 * t + 4] = struct.pack("<f", scale[i].item())
    return np.frombuffer(bytes(out), dtype=np.uint8)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float8_e4m3fn])
@pytest.mark.parametrize("hadamard,fmt", [(True, "fp32"), (False, "ue8m0")])
@pytest.mark.parametrize("bs,pad", [(2, 0), (5, 12)])
def test_write_cache_bytes_follow_the_documented_order(dtype, hadamard, fmt, bs, pad):
    g = torch.Generator().manual_seed(bs + pad)
    nb, d = 4, 32
    stride0 = bs * (d + 4) + pad
    store = torch.randint(0, 256, (nb * stride0,), generator=g, dtype=torch.uint8)
    cache = store.view(nb, stride0)[:, : bs * (d + 4)].view(dtype).view(nb, bs, 1, d + 4)
    assert cache.stride(0) == stride0
    k = torch.randn(9, d, generator=g).to(torch.bfloat16)
    nslots = nb * bs
    slots = torch.tensor([3, -1, 0, nslots, nslots - 1, 3, -7, 1, 0], dtype=torch.int64)
    before = store.clone()
    torch_mla.write_indexer_cache(cache, k, slots, hadamard=hadamard, scale_format=fmt)
    q_fp8, scale = torch_mla.indexer_quantize(k, hadamard=hadamard, scale_format=fmt)
    want = expected_cache_bytes(before, stride0, bs, d, slots, q_fp8, scale)
    np.testing.assert_array_equal(store.numpy(), want)


def test_write_cache_skipped_rows_touch_nothing_even_slot_zero():
    nb, bs, d = 2, 3, 8
    cache = torch.randint(0, 256, (nb, bs, 1, d + 4), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(6))
    before = cache.clone()
    k = torch.randn(3, d)
    torch_mla.write_indexer_cache(cache, k, torch.tensor([-1, nb * bs, -5]))
    assert torch.equal(cache, before)


def test_write_then_read_back_dequantizes_to_the_rotated_keys():
    nb, bs, d = 3, 4, 64
    cache = torch_mla.new_indexer_cache(nb, bs, d)
    k = torch.randn(nb * bs, d, generator=torch.Generator().manual_seed(7))
    slots = torch.randperm(nb * bs, generator=torch.Generator().manual_seed(8))
    torch_mla.write_indexer_cache(cache, k, slots)
    raw = cache.view(nb, bs * (d + 4))
    vals = raw[:, : bs * d].reshape(nb * bs, d)
    scales = raw[:, bs * d:].contiguous().view(torch.float32).reshape(nb * bs)
    deq = fp8_to64(vals) * scales.double()[:, None]
    y = rotate64(k)[torch.argsort(slots)]  # slot s holds row argsort(slots)[s]
    assert torch.all((deq - y).abs() <= y.abs() / 16 * 1.001 + 2.0 ** -10 * scales.double()[:, None])


# ---------------------------------------------------------------------------------------------
# indexer_logits_paged
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("next_n", [1, 2, 3])
@pytest.mark.parametrize("chunked", [False, True])
def test_paged_logits_match_float64_with_mtp_causal_lengths(next_n, chunked, monkeypatch):
    if chunked:
        monkeypatch.setattr(ref_indexer, "CHUNK_BYTES", 1500)  # position and batch chunks
    g = torch.Generator().manual_seed(10 * next_n)
    h, d, bs, nb, max_blocks = 4, 32, 4, 12, 4
    ctx = [9, next_n, 16, 5]  # a sequence of exactly next_n tokens; a full table (16 = 4 x 4)
    b = len(ctx)
    # NaN garbage everywhere (e4m3 0xFF and f32 0xFFFFFFFF are NaN): unused slots must not leak
    cache = torch.full((nb, bs, 1, d + 4), 0xFF, dtype=torch.uint8)
    perm = torch.randperm(nb, generator=g).tolist()
    table = torch.full((b, max_blocks), -1, dtype=torch.int32)
    keys = []
    for i, n_tok in enumerate(ctx):
        used = (n_tok + bs - 1) // bs
        blocks = [perm.pop() for _ in range(used)]
        table[i, :used] = torch.tensor(blocks, dtype=torch.int32)
        if used < max_blocks:
            table[i, used] = 10_000 if i % 2 else -1  # garbage past the context
        k_i = torch.randn(n_tok, d, generator=g).to(torch.bfloat16)
        slots = torch.tensor([blocks[p // bs] * bs + p % bs for p in range(n_tok)])
        torch_mla.write_indexer_cache(cache, k_i, slots)
        keys.append(torch_mla.indexer_quantize(k_i))
    q_fp8, q_scale = quantize_inputs(torch.randn(b, next_n, h, d, generator=g))
    w = (torch.randn(b, next_n, h, generator=g) * q_scale).reshape(b * next_n, h)
    max_len = 18  # past every context and past the block table (16 positions)
    out = torch_mla.indexer_logits_paged(q_fp8, cache, w, torch.tensor(ctx, dtype=torch.int32),
                                         table, max_len)
    assert out.shape == (b * next_n, max_len) and out.dtype == torch.float32
    want = torch.full((b * next_n, max_len), NEG_INF, dtype=torch.float64)
    for i, n_tok in enumerate(ctx):
        k_fp8, k_scale = keys[i]
        for j in range(next_n):
            visible = n_tok - next_n + j + 1
            row = i * next_n + j
            allowed = torch.arange(n_tok) < visible
            want[row, :n_tok] = logits64(q_fp8[i, j][None], w[row][None], k_fp8, k_scale,
                                         allowed[None])[0]
    assert torch.equal(torch.isinf(out), torch.isinf(want))
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_paged_logits_agree_with_ragged_logits_on_the_same_keys():
    g = torch.Generator().manual_seed(11)
    h, d, bs, n_tok = 2, 16, 3, 10
    cache = torch_mla.new_indexer_cache(5, bs, d, dtype=torch.float8_e4m3fn)
    table = torch.tensor([[4, 0, 2, 1]], dtype=torch.int32)
    k = torch.randn(n_tok, d, generator=g)
    slots = table[0, torch.arange(n_tok) // bs].long() * bs + torch.arange(n_tok) % bs
    torch_mla.write_indexer_cache(cache, k, slots)
    q_fp8, q_scale = torch_mla.indexer_quantize(torch.randn(1, 1, h, d, generator=g))
    w = torch.randn(1, h, generator=g) * q_scale[0]
    paged = torch_mla.indexer_logits_paged(q_fp8, cache, w, torch.tensor([n_tok], dtype=torch.int32),
                                           table, n_tok)
    k_fp8, k_scale = torch_mla.indexer_quantize(k)
    ragged = torch_mla.indexer_logits(q_fp8[0], k_fp8, k_scale, w, torch.tensor([0], dtype=torch.int32),
                                      torch.tensor([n_tok], dtype=torch.int32))
    torch.testing.assert_close(paged, ragged, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# indexer_topk
# ---------------------------------------------------------------------------------------------

def test_topk_ties_specials_and_windows():
    logits = torch.tensor([
        [1.0, 3.0, 3.0, -0.0, 0.0, float("nan"), float("inf"), 3.0, -1.0, 0.0],
        [NEG_INF] * 10,
        [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0],
        [-5.0, -1e30, -0.0, 7.0, NEG_INF, 1e-30, -1e-30, 0.0, 7.0, -3e38],
    ])
    out = torch_mla.indexer_topk(logits, 5)
    assert out.tolist() == [[1, 2, 7, 0, 3], [-1] * 5, [0, 1, 2, 3, 4], [3, 8, 5, 2, 7]]
    k_start = torch.tensor([2, 0, 7, -4], dtype=torch.int32)
    k_end = torch.tensor([5, 10, 100, 2], dtype=torch.int32)
    out = torch_mla.indexer_topk(logits, 4, k_start=k_start, k_end=k_end)
    assert out.tolist() == [[2, 3, 4, -1], [-1] * 4, [7, 8, 9, -1], [0, 1, -1, -1]]
    assert torch.equal(out, topk_by_full_sort(logits, 4, k_start, k_end))


@pytest.mark.parametrize("s_q,s_k,k,windows", [(6, 50, 7, True), (5, 9, 12, True), (3, 20, 0, False),
                                               (4, 3000, 2048, False), (7, 40, 40, True)])
def test_topk_matches_full_sort(s_q, s_k, k, windows, small_chunks):
    g = torch.Generator().manual_seed(s_k + k)
    logits = (torch.randn(s_q, s_k, generator=g) * 4).round() / 4  # many ties
    logits[torch.rand(s_q, s_k, generator=g) < 0.1] = NEG_INF
    k_start = k_end = None
    if windows:
        k_start = torch.randint(-2, s_k // 2, (s_q,), generator=g, dtype=torch.int32)
        k_end = torch.randint(0, s_k + 3, (s_q,), generator=g, dtype=torch.int32)
    out = torch_mla.indexer_topk(logits, k, k_start=k_start, k_end=k_end)
    assert out.dtype == torch.int32 and out.shape == (s_q, k)
    assert torch.equal(out, topk_by_full_sort(logits, k, k_start, k_end))


def test_topk_to_cache_indices():
    g = torch.Generator().manual_seed(12)
    bs = 4
    table = torch.tensor([[5, 2, -1], [0, 7, 3]], dtype=torch.int32)
    pos = torch.randint(-1, 14, (2, 3, 6), generator=g, dtype=torch.int32)

    def expected(p, bt):
        if p < 0 or p // bs >= table.shape[1] or table[bt, p // bs] < 0:
            return -1
        return int(table[bt, p // bs]) * bs + p % bs

    out = torch_mla.indexer_topk_to_cache_indices(pos, table, bs)
    want = [[[expected(p, bi) for p in row] for row in pos[bi].tolist()] for bi in range(2)]
    assert out.dtype == torch.int32 and out.tolist() == want
    # packed rows with an explicit batch mapping
    flat = pos.reshape(6, 6)
    batch_ids = torch.tensor([0, 0, 0, 1, 1, 1])
    out = torch_mla.indexer_topk_to_cache_indices(flat, table, bs, batch_ids=batch_ids)
    assert out.tolist() == [x for blk in want for x in blk]


# ---------------------------------------------------------------------------------------------
# compile, explain, bad inputs
# ---------------------------------------------------------------------------------------------

def test_inference_pipeline_compiles_fullgraph_and_matches_eager():
    g = torch.Generator().manual_seed(13)
    s, h, d = 12, 4, 32
    x_q = torch.randn(s, h, d, generator=g)
    x_k = torch.randn(s, d, generator=g)
    w = torch.randn(s, h, generator=g)
    k_start = torch.zeros(s, dtype=torch.int32)
    k_end = torch.arange(1, s + 1, dtype=torch.int32)

    def select(x_q, x_k, w):
        q_fp8, q_scale = torch_mla.indexer_quantize(x_q)
        k_fp8, k_scale = torch_mla.indexer_quantize(x_k, scale_format="ue8m0")
        logits = torch_mla.indexer_logits(q_fp8, k_fp8, k_scale, w * q_scale, k_start, k_end)
        return logits, torch_mla.indexer_topk(logits, 5)

    eager = select(x_q, x_k, w)
    compiled = torch.compile(select, backend="aot_eager", fullgraph=True)(x_q, x_k, w)
    torch.testing.assert_close(compiled[0], eager[0])
    assert torch.equal(compiled[1], eager[1])
    assert (eager[1][0, 1:] == -1).all() and eager[1][0, 0] == 0  # causal: first query sees 1 key


def test_explain_knows_the_indexer_ops():
    logits = torch.randn(2, 5)
    assert "reference" in torch_mla.explain("indexer_topk", logits, 3)
    x = torch.randn(2, 8)
    assert "mla::indexer_quantize" in torch_mla.explain("indexer_quantize", x, scale_format="ue8m0")


def _bad_cases():
    q8 = torch.zeros(3, 2, 16, dtype=torch.uint8)
    k8 = torch.zeros(5, 16, dtype=torch.uint8)
    ks, w = torch.ones(5), torch.ones(3, 2)
    win = torch.zeros(3, dtype=torch.int32)
    lg = (q8, k8, ks, w, win, win)
    yield "indexer_quantize", (torch.randn(4, 12), True, "fp32"), "must be a power of two"
    yield "indexer_quantize", (torch.randn(4, 16), True, "e8m0"), "scale_format must be one of"
    yield "indexer_quantize", (torch.zeros(4, 16, dtype=torch.int32), True, "fp32"), "x must have dtype"
    yield "indexer_logits", (q8.to(torch.int8), *lg[1:]), "q_fp8 must have dtype"
    yield "indexer_logits", (q8, k8[:, :8], *lg[2:]), "k_fp8.shape[1]"
    yield "indexer_logits", (q8, k8, ks[:4], *lg[3:]), "k_scale must have shape"
    yield "indexer_logits", (q8, k8, ks, w.double(), win, win), "weights must have dtype float32"
    yield "indexer_logits", (q8, k8, ks, w, win.long(), win), "k_start must have dtype int32"
    yield "indexer_logits", (q8, k8, ks, w, win, win[:2]), "k_end must have shape"
    cache = torch.zeros(2, 4, 1, 20, dtype=torch.uint8)
    k = torch.randn(3, 16)
    slots = torch.zeros(3, dtype=torch.int64)
    yield "write_indexer_cache", (cache[..., :19], k, slots, True, "fp32"), "cache.shape[3] must be d + 4"
    yield "write_indexer_cache", (cache, k, slots.int(), True, "fp32"), "slot_mapping must have dtype int64"
    yield "write_indexer_cache", (cache, k[:2], slots, True, "fp32"), "slot_mapping.shape[0]"
    yield "write_indexer_cache", (cache.transpose(0, 1), k, slots, True, "fp32"), "must be packed"
    overlapping = torch.zeros(200, dtype=torch.uint8).as_strided((2, 4, 1, 20), (40, 20, 20, 1))
    yield "write_indexer_cache", (overlapping, k, slots, True, "fp32"), "cache.stride(0) must be at least 80"
    qp = torch.zeros(2, 2, 3, 16, dtype=torch.uint8)
    wp = torch.ones(4, 3)
    lens = torch.ones(2, dtype=torch.int32)
    table = torch.zeros(2, 3, dtype=torch.int32)
    yield "indexer_logits_paged", (qp, cache, wp[:2], lens, table, 8), "weights must have shape"
    yield "indexer_logits_paged", (qp, cache, wp, lens, table.long(), 8), "block_table must have dtype int32"
    yield "indexer_logits_paged", (qp, cache, wp, lens[:1], table, 8), "context_lens must have shape"
    yield "indexer_logits_paged", (qp[..., :8], cache, wp, lens, table, 8), "cache.shape[3] must be d + 4"
    yield "indexer_logits_paged", (qp, cache, wp, lens, table, -1), "max_context_len must be >= 0"
    lo = torch.randn(3, 6)
    yield "indexer_topk", (lo.double(), 2, None, None), "logits must have dtype float32"
    yield "indexer_topk", (lo, -1, None, None), "k must be >= 0"
    yield "indexer_topk", (lo, 2, win[:2], None), "k_start must have shape"
    q = torch.randn(3, 2, 8)
    kk = torch.randn(5, 8)
    idx = torch.zeros(3, 4, dtype=torch.int32)
    yield "indexer_scores", (q, kk.double(), w, idx), "k must have the dtype of q"
    yield "indexer_scores", (q, kk, w[:, :1], idx), "weights must have shape"
    yield "indexer_scores", (q, kk, w, idx[None]), "indices must be 2-D"
    yield "indexer_scores", (q, kk, w, idx.long()), "indices must have dtype int32"
    kv = torch.randn(5, 1, 8)
    lse = torch.randn(3, 2)
    idx3 = idx[:, None]
    yield "sparse_attn_scores", (q, kv.expand(5, 2, 8), idx3, lse, 1.0, None), "kv.shape[1] (h_kv) must be 1"
    yield "sparse_attn_scores", (q, kv, idx, lse, 1.0, None), "indices must be 3-D"
    yield "sparse_attn_scores", (q, kv, idx3, lse[:, :1], 1.0, None), "lse must have shape"
    yield "sparse_attn_scores", (q, kv, idx3, lse, float("inf"), None), "sm_scale must be a finite"
    yield "dense_attn_scores", (q, kv, lse.half(), 1.0, None, None), "lse must have dtype"
    yield "dense_attn_scores", (q, kv, lse, 1.0, win.float(), None), "k_start must have dtype int32"


@pytest.mark.parametrize("op,args,message", list(_bad_cases()),
                         ids=lambda x: x if isinstance(x, str) and " " not in x else "")
def test_bad_input_names_the_argument(op, args, message):
    with pytest.raises(RuntimeError) as info:
        getattr(torch.ops.mla, op)(*args)
    assert message in str(info.value), str(info.value)


def test_topk_to_cache_indices_needs_batch_ids_or_batch_leading_dim():
    with pytest.raises(RuntimeError, match="positions.shape\\[0\\] must be the batch size"):
        torch_mla.indexer_topk_to_cache_indices(torch.zeros(3, 4, dtype=torch.int32),
                                                torch.zeros(2, 5, dtype=torch.int32), 4)


def test_topk_to_cache_indices_compiles_fullgraph_without_batch_ids():
    pos = torch.tensor([[0, 5, -1], [3, 2, 9]], dtype=torch.int32)
    table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    fn = lambda p, t: torch_mla.indexer_topk_to_cache_indices(p, t, 4)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    expected = torch.tensor([[8, 1, -1], [7, 6, -1]], dtype=torch.int32)
    assert torch.equal(fn(pos, table), expected)
    assert torch.equal(compiled(pos, table), expected)


def test_quantize_rejects_empty_rows():
    with pytest.raises(RuntimeError, match=r"x.shape\[-1\] \(d\) must be at least 1"):
        torch_mla.indexer_quantize(torch.randn(3, 0), hadamard=False)
