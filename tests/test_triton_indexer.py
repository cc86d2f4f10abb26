"""The Triton DSA-indexer kernels (torch_mla/triton/indexer.py, _indexer_train.py) under the Triton
interpreter on the CPU, through the public functions inside ``torch_mla.use_backend("triton")``:
against independent float64 formulas written here (Hadamard matrix built explicitly, e4m3 codes
from a table of all 256 codes, cache bytes placed at the documented offsets, top-k by a full
stable sort) and against the reference backend on the same inputs (FP8 bytes and scales: bit for
bit). Small shapes (the interpreter is slow) plus DeepSeek's indexer shape (h 64, d 128) and the
MLA head dim 576 once each. Inputs are fresh random draws each run (the seed is printed)."""

import math
import random
import struct

import numpy as np
import pytest
import torch

import torch_mla

tri = pytest.importorskip("torch_mla.triton")
if "indexer_topk" not in tri.IMPLS:  # pragma: no cover - Triton missing
    pytest.skip("Triton backend not available", allow_module_level=True)
if not tri._common.INTERPRET:  # pragma: no cover - a CUDA machine: tests/gpu covers the kernels
    pytest.skip("CPU tensors run Triton only under TRITON_INTERPRET=1", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from torch_mla.triton import indexer as tri_indexer  # noqa: E402
from torch_mla.triton._indexer_common import e4m3_encode  # noqa: E402
from oracles import E4M3, POS, encode_e4m3, fp8_to64, hadamard64, topk_by_sort  # noqa: F401

NEG_INF = float("-inf")


@pytest.fixture
def gen():
    seed = random.SystemRandom().randrange(2 ** 31)
    print("seed", seed)
    return torch.Generator().manual_seed(seed)


def both(fn, *args, **kwargs):
    with torch_mla.use_backend("triton"):
        got = fn(*args, **kwargs)
    with torch_mla.use_backend("reference"):
        want = fn(*args, **kwargs)
    return got, want


# ---------------------------------------------------------------------------------------------
# independent float64 helpers
# ---------------------------------------------------------------------------------------------

def encode64(v):
    """e4m3 codes (int64) of float64 values, the sign bit kept as a float conversion keeps it."""
    return encode_e4m3(v).astype(np.int64)


def codes(t):
    return t.view(torch.uint8).numpy().astype(np.int64)


def logits64(q8, w, k8, k_scale, allowed):
    """(sum_h w * ReLU(q . k) * k_scale in float64 from the FP8 bytes, -inf where not allowed;
    the same sum over the absolute values of every product, 0 where not allowed: the scale of the
    float32 rounding errors of a kernel's sums, which cancellation in the first can hide)."""
    qf, kf = fp8_to64(q8), fp8_to64(k8)
    s = torch.einsum("thd,sd->ths", qf, kf)
    val = torch.einsum("th,ths->ts", w.double(), s.clamp_min(0)) * k_scale.double()
    mag = (torch.einsum("th,ths->ts", w.double().abs(), torch.einsum("thd,sd->ths", qf.abs(), kf.abs()))
           * k_scale.double().abs())
    return (torch.where(allowed, val, torch.full_like(val, NEG_INF)),
            torch.where(allowed, mag, torch.zeros_like(mag)))


def check_logits(out, want):
    """``want`` = logits64(...): out within 1e-5 (absolute and relative) of the exact value, plus
    one float32 unit roundoff (2**-24) of the sum of absolute terms: a value near 0 made of terms
    near 100 carries float32 rounding errors of ~1e-5 in any summation order (seen: 1.2e-5 at a
    logit of 0.21; over 25 random seeds the errors stayed under 1/10 of this tolerance)."""
    want, mag = want
    assert out.dtype == torch.float32 and out.shape == want.shape
    assert torch.equal(torch.isneginf(out), torch.isneginf(want))
    assert not torch.isnan(out).any()
    fin = torch.isfinite(want)
    err = (out.double() - want)[fin].abs()
    tol = 1e-5 + 1e-5 * want[fin].abs() + 2.0 ** -24 * mag[fin]
    assert bool((err <= tol).all()), \
        f"max error {err.max().item():.3g}, worst error / tolerance {(err / tol).max().item():.3g}"


# ---------------------------------------------------------------------------------------------
# indexer_quantize
# ---------------------------------------------------------------------------------------------

def quant_input(shape, dtype, gen):
    d = shape[-1]
    x = torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-12, 12, shape[:-1] + (1,),
                                                                     generator=gen).float())
    flat = x.view(-1, d)
    flat[0] = 0  # all-zero row: scale 1e-4 / 448
    if flat.shape[0] > 2:
        flat[1] = 0
        flat[1, 0] = 448 * 2.0 ** -5 * math.sqrt(d)  # one spike: |y| = 448 * 2**-5 everywhere
        flat[2] *= 1e-30  # below the amax floor
    return x.to(dtype)


@pytest.mark.parametrize("d,dtype,hadamard,fmt", [
    (128, torch.bfloat16, True, "fp32"), (128, torch.bfloat16, True, "ue8m0"),
    (32, torch.float32, True, "fp32"), (64, torch.float16, False, "ue8m0"),
    (48, torch.bfloat16, False, "fp32"), (1, torch.float64, True, "ue8m0")])
def test_quantize_bytes_equal_reference_and_match_float64(d, dtype, hadamard, fmt, gen):
    x = quant_input((3, 7, d), dtype, gen)
    (q8, scale), (q8_ref, scale_ref) = both(torch_mla.indexer_quantize, x, hadamard=hadamard,
                                           scale_format=fmt)
    assert q8.dtype == torch.float8_e4m3fn and q8.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    assert torch.equal(q8.view(torch.uint8), q8_ref.view(torch.uint8))
    assert torch.equal(scale.view(torch.int32), scale_ref.view(torch.int32))
    # float64: y = x H / sqrt(d); scale = max(amax, 1e-4) / 448 (ue8m0: next power of two)
    y = x.double() @ hadamard64(d) / math.sqrt(d) if hadamard else x.double()
    need = y.abs().amax(-1).clamp_min(1e-4) / 448
    if fmt == "fp32":
        torch.testing.assert_close(scale.double(), need, rtol=2e-7, atol=0)
    else:
        assert torch.equal(scale.double(), torch.exp2(torch.ceil(torch.log2(need * (1 - 1e-9)))))
    # codes: RNE of y / scale, except where the f32 rotation moved a value across a rounding
    # boundary (then the neighbouring code, never further)
    got = codes(q8)
    want = encode64((y / scale.double()[..., None]).clamp(-448, 448).numpy())
    assert (got == want).mean() > 0.99
    assert np.all(np.abs(E4M3[got] - E4M3[want]) <= np.abs(E4M3[want]) / 8 + 2.0 ** -9)
    if not hadamard:
        # no rotation: exactly RNE(e4m3) of the f32 quotient (numpy's IEEE f32 division)
        xf = x.float().numpy()
        quot = np.clip(xf / scale.numpy()[..., None], -448, 448).astype(np.float64)
        assert np.array_equal(got, encode64(quot))


def test_quantize_empty_rows():
    with torch_mla.use_backend("triton"):
        with pytest.raises(RuntimeError, match="must be at least 1"):  # d = 0: the contract
            torch_mla.indexer_quantize(torch.zeros(3, 0), hadamard=False)
        q8, scale = torch_mla.indexer_quantize(torch.zeros(0, 4, 16))
    assert q8.shape == (0, 4, 16) and scale.shape == (0, 4)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_quantize_nan_row_and_strided_input(gen):
    x = torch.randn(6, 2, 64, generator=gen)
    x[1, 0, 5] = float("nan")
    x[2, 1, 7] = float("inf")
    xt = x.transpose(0, 1)  # rows not contiguous
    (q8, scale), (q8_ref, scale_ref) = both(torch_mla.indexer_quantize, xt)
    finite = torch.isfinite(x).all(-1).transpose(0, 1)
    assert torch.equal(q8.view(torch.uint8)[finite], q8_ref.view(torch.uint8)[finite])
    assert torch.equal(scale[finite], scale_ref[finite])
    assert torch.isnan(scale[0, 1]) and torch.isnan(q8.float()[0, 1]).all()
    assert torch.isinf(scale[1, 2])  # inf amax: inf scale; the butterflies made every value
    assert torch.equal(torch.isnan(q8.float()[1, 2]), torch.isnan(q8_ref.float()[1, 2]))


@triton.jit
def _encode_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n, other=0.0)
    tl.store(out_ptr + i, e4m3_encode(x), mask=i < n)


def test_e4m3_encoder_matches_the_table_on_every_boundary(gen):
    """The kernels' integer f32 -> e4m3 rounding against encode64 (a search in the code table):
    every code, every midpoint between neighbours (ties to even) and its f32 neighbours, the
    subnormal range, f32 subnormals, and random values, both signs."""
    mids = (POS[1:] + POS[:-1]) / 2
    base = torch.from_numpy(np.concatenate([POS, mids])).float()
    up = torch.nextafter(base, torch.full_like(base, 1e9))
    down = torch.nextafter(base, torch.zeros_like(base))
    rnd = torch.rand(20000, generator=gen) * 448
    tiny = torch.exp2(-torch.rand(2000, generator=gen) * 140)  # down to f32 subnormals
    x = torch.cat([base, up, down, rnd, tiny, torch.tensor([0.0, 1e-45, 2.0 ** -10])])
    x = torch.cat([x, -x]).clamp(-448, 448)
    out = torch.empty(x.shape, dtype=torch.int32)
    _encode_kernel[(triton.cdiv(x.numel(), 4096),)](x, out, x.numel(), BLOCK=4096)
    want = encode64(x.double().numpy())
    np.testing.assert_array_equal(out.numpy(), want)
    # and torch's own conversion agrees
    np.testing.assert_array_equal(out.numpy(), codes(x.to(torch.float8_e4m3fn)))


# ---------------------------------------------------------------------------------------------
# indexer_logits
# ---------------------------------------------------------------------------------------------

def packed_windows(starts, lens, extra_start, extra_end):
    """Causal windows of packed sequences, then extra (clipped, empty, inverted) windows."""
    ks = [st for st, n in zip(starts, lens) for _ in range(n)] + extra_start
    ke = [st + i + 1 for st, n in zip(starts, lens) for i in range(n)] + extra_end
    return torch.tensor(ks, dtype=torch.int32), torch.tensor(ke, dtype=torch.int32)


@pytest.mark.parametrize("h,d,as_bytes", [(4, 32, False), (8, 128, True), (6, 40, False)])
def test_logits_windows_match_float64(h, d, as_bytes, gen, monkeypatch):
    if d == 40:  # one query per program, 32-key tiles
        monkeypatch.setattr(tri_indexer, "LOGITS_CONFIG", (32, 16, 4, 1))
    # packed sequences (one empty) with a gap of 20 keys [70, 90) that no window reaches: those
    # keys hold NaN bytes and NaN scales and must come out -inf, never NaN
    starts, lens = [0, 70, 90, 95], [70, 0, 5, 150]
    s_k = 245
    # windows clipped at both ends (not reaching the gap), empty, inverted, past the end
    k_start, k_end = packed_windows(starts, lens, [-30, 100, 200, 500, -9, 120],
                                    [50, 100, 3, 600, 0, s_k + 40])
    s_q = k_start.shape[0]
    had = d & (d - 1) == 0  # d = 40: no rotation (a power of two is needed for it)
    q8, q_scale = torch_mla.indexer_quantize(torch.randn(s_q, h, d, generator=gen), hadamard=had)
    k8, k_scale = torch_mla.indexer_quantize(torch.randn(s_k, d, generator=gen), hadamard=had)
    k8.view(torch.uint8)[70:90] = 0x7F
    k_scale[70:90] = float("nan")
    w = torch.randn(s_q, h, generator=gen) * q_scale
    if as_bytes:
        q8, k8 = q8.view(torch.uint8), k8.view(torch.uint8)
    out, ref = both(torch_mla.indexer_logits, q8, k8, k_scale, w, k_start, k_end)
    cols = torch.arange(s_k)
    allowed = (cols >= k_start[:, None].long()) & (cols < k_end[:, None].long())
    assert not allowed[:, 70:90].any()
    want = logits64(q8, w, k8, k_scale, allowed)
    check_logits(out, want)
    check_logits(ref, want)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)


def test_logits_deepseek_head_shape_and_strided_inputs(gen):
    s_q, s_k, h, d = 6, 140, 64, 128
    q8, q_scale = torch_mla.indexer_quantize(torch.randn(h, s_q, d, generator=gen))
    q8, q_scale = q8.transpose(0, 1), q_scale.t()  # [s_q, h, d] with strided heads
    k8, k_scale = torch_mla.indexer_quantize(torch.randn(s_k, 2, d, generator=gen))
    k8, k_scale = k8[:, 1], k_scale[:, 1]  # row stride 2d, scale stride 2
    w = (torch.randn(h, s_q, generator=gen) * q_scale.t()).t()
    k_start = torch.tensor([0, 0, 10, 70, 139, 0], dtype=torch.int32)
    k_end = torch.tensor([140, 1, 80, 71, 140, 0], dtype=torch.int32)
    out = torch.empty(0)
    with torch_mla.use_backend("triton"):
        out = torch_mla.indexer_logits(q8, k8, k_scale, w, k_start, k_end)
    cols = torch.arange(s_k)
    allowed = (cols >= k_start[:, None].long()) & (cols < k_end[:, None].long())
    check_logits(out, logits64(q8, w, k8, k_scale, allowed))


# ---------------------------------------------------------------------------------------------
# write_indexer_cache + indexer_logits_paged
# ---------------------------------------------------------------------------------------------

def cache_in(store, nb, bs, d, pad, offset, dtype):
    """A cache view over ``store`` starting at byte ``offset`` with stride(0) = block + pad."""
    stride0 = bs * (d + 4) + pad
    view = store[offset: offset + nb * stride0].view(nb, stride0)[:, : bs * (d + 4)]
    return view.view(dtype).view(nb, bs, 1, d + 4)


def expected_bytes(store, offset, stride0, bs, d, nslots, slots, q8, scale):
    """Each written row at the documented offsets (values at base + t d, f32 scale at
    base + bs d + 4 t), the last row naming a slot winning, invalid slots skipped."""
    out = bytearray(store.numpy().tobytes())
    for i, s in enumerate(slots.tolist()):
        if 0 <= s < nslots:
            blk, t = divmod(s, bs)
            base = offset + blk * stride0
            out[base + t * d: base + (t + 1) * d] = q8[i].view(torch.uint8).numpy().tobytes()
            at = base + bs * d + 4 * t
            out[at: at + 4] = struct.pack("<f", scale[i].item())
    return np.frombuffer(bytes(out), dtype=np.uint8)


@pytest.mark.parametrize("n,scan_max", [(11, 1024), (40, 4)])  # in-kernel scan; device sort
@pytest.mark.parametrize("bs,pad,offset,dtype,fmt", [
    (4, 0, 0, torch.uint8, "fp32"), (5, 12, 0, torch.float8_e4m3fn, "ue8m0"),
    (3, 3, 1, torch.uint8, "fp32")])  # the last: scales not 4-byte aligned
def test_write_cache_bytes(n, scan_max, bs, pad, offset, dtype, fmt, gen, monkeypatch):
    monkeypatch.setattr(tri_indexer, "SCAN_MAX_ROWS", scan_max)
    nb, d = 4, 32
    stride0 = bs * (d + 4) + pad
    store = torch.randint(0, 256, (offset + nb * stride0 + 5,), generator=gen, dtype=torch.uint8)
    nslots = nb * bs
    k = torch.randn(n, d, generator=gen).to(torch.bfloat16)
    slots = torch.randint(-2, nslots + 2, (n,), generator=gen)
    slots[:4] = torch.tensor([0, 3, 0, -5])  # slot 0 twice (the later row wins), a skip
    slots[-1] = 3
    before = store.clone()
    ref_store = store.clone()
    with torch_mla.use_backend("triton"):
        torch_mla.write_indexer_cache(cache_in(store, nb, bs, d, pad, offset, dtype), k, slots,
                                      scale_format=fmt)
    with torch_mla.use_backend("reference"):
        torch_mla.write_indexer_cache(cache_in(ref_store, nb, bs, d, pad, offset, dtype), k,
                                      slots, scale_format=fmt)
        q8, scale = torch_mla.indexer_quantize(k, scale_format=fmt)
    assert torch.equal(store, ref_store)
    want = expected_bytes(before, offset, stride0, bs, d, nslots, slots, q8, scale)
    np.testing.assert_array_equal(store.numpy(), want)


def test_write_cache_only_skipped_rows_touch_nothing(gen):
    cache = torch.randint(0, 256, (2, 3, 1, 20), generator=gen, dtype=torch.uint8)
    before = cache.clone()
    with torch_mla.use_backend("triton"):
        torch_mla.write_indexer_cache(cache, torch.randn(3, 16, generator=gen),
                                      torch.tensor([-1, 6, -9]))
    assert torch.equal(cache, before)


def build_paged(gen, ctx, next_n, h, d, bs, nb, max_blocks, pad, offset, dtype):
    """A cache full of NaN bytes (0xFF: e4m3 NaN, f32 NaN scale) whose used slots hold each
    sequence's keys; block tables with garbage (-1, past the cache) past each context."""
    b = len(ctx)
    stride0 = bs * (d + 4) + pad
    store = torch.full((offset + nb * stride0 + 3,), 0xFF, dtype=torch.uint8)
    cache = cache_in(store, nb, bs, d, pad, offset, dtype)
    perm = torch.randperm(nb, generator=gen).tolist()
    table = torch.full((b, max_blocks), -1, dtype=torch.int32)
    keys = []
    for i, n_tok in enumerate(ctx):
        used = -(-n_tok // bs)
        blocks = [perm.pop() for _ in range(used)]
        table[i, :used] = torch.tensor(blocks, dtype=torch.int32)
        table[i, used:] = torch.tensor([-1, nb + 5, 10 ** 6])[torch.arange(max_blocks - used) % 3]
        k = torch.randn(n_tok, d, generator=gen)
        slots = torch.tensor([blocks[p // bs] * bs + p % bs for p in range(n_tok)],
                             dtype=torch.int64)
        with torch_mla.use_backend("triton"):
            torch_mla.write_indexer_cache(cache, k, slots)
        keys.append(torch_mla.indexer_quantize(k))
    q8, q_scale = torch_mla.indexer_quantize(torch.randn(b, next_n, h, d, generator=gen))
    w = (torch.randn(b, next_n, h, generator=gen) * q_scale).reshape(b * next_n, h)
    return cache, table, keys, q8, w


@pytest.mark.parametrize("next_n,bs,pad,offset,dtype,chunks", [
    (1, 4, 0, 0, torch.uint8, 1), (2, 16, 8, 0, torch.float8_e4m3fn, 3),
    (3, 3, 5, 2, torch.uint8, 2)])  # the last: scales not 4-byte aligned
def test_paged_logits_match_float64(next_n, bs, pad, offset, dtype, chunks, gen, monkeypatch):
    # chunks > 1: each sequence's positions are split over programs (the GPU's choice)
    monkeypatch.setattr(tri_indexer, "_paged_chunks", lambda programs, device: chunks)
    if next_n == 3:  # 16 positions per tile, 2 queries per program (two query groups)
        monkeypatch.setattr(tri_indexer, "PAGED_CONFIG", (16, 32, 4, 1))
    h, d = 6, 32
    ctx = [9, next_n, 40, 1, 0]  # a context of exactly next_n tokens; shorter than next_n; empty
    max_blocks = -(-40 // bs) + 1
    nb = sum(-(-c // bs) for c in ctx) + 2
    cache, table, keys, q8, w = build_paged(gen, ctx, next_n, h, d, bs, nb, max_blocks, pad,
                                            offset, dtype)
    max_len = max_blocks * bs + 5  # past every context and past the block table
    lens = torch.tensor(ctx, dtype=torch.int32)
    if chunks == 3:
        table = table.t().contiguous().t()  # block table with stride (1, b)
    out, ref = both(torch_mla.indexer_logits_paged, q8, cache, w, lens, table, max_len)
    want = torch.full((len(ctx) * next_n, max_len), NEG_INF, dtype=torch.float64)
    mag = torch.zeros_like(want)
    for i, n_tok in enumerate(ctx):
        k8, k_scale = keys[i]
        for j in range(next_n):
            row = i * next_n + j
            allowed = torch.arange(n_tok) < n_tok - next_n + j + 1
            val, m = logits64(q8[i, j][None], w[row][None], k8, k_scale, allowed[None])
            want[row, :n_tok], mag[row, :n_tok] = val[0], m[0]
    check_logits(out, (want, mag))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_paged_logits_deepseek_head_shape_match_ragged(gen):
    h, d, bs, n_tok = 64, 128, 64, 150
    cache, table, keys, q8, w = build_paged(gen, [n_tok], 2, h, d, bs, 4, 4, 0, 0, torch.uint8)
    k8, k_scale = keys[0]
    with torch_mla.use_backend("triton"):
        paged = torch_mla.indexer_logits_paged(q8, cache, w,
                                               torch.tensor([n_tok], dtype=torch.int32), table, 200)
        ragged = torch_mla.indexer_logits(q8[0], k8, k_scale, w, torch.zeros(2, dtype=torch.int32),
                                          torch.tensor([n_tok - 1, n_tok], dtype=torch.int32))
    assert torch.isneginf(paged[:, n_tok:]).all()
    torch.testing.assert_close(paged[:, :n_tok], ragged, rtol=1e-5, atol=1e-4)
    allowed = torch.arange(n_tok)[None] < torch.tensor([[n_tok - 1], [n_tok]])
    check_logits(ragged, logits64(q8[0], w, k8, k_scale, allowed))


# ---------------------------------------------------------------------------------------------
# indexer_topk
# ---------------------------------------------------------------------------------------------

def test_topk_ties_specials_windows():
    logits = torch.tensor([
        [1.0, 3.0, 3.0, -0.0, 0.0, float("nan"), float("inf"), 3.0, -1.0, 0.0],
        [NEG_INF] * 10,
        [2.0] * 10,
        [-5.0, -1e30, -0.0, 7.0, NEG_INF, 1e-30, -1e-30, 0.0, 7.0, -3e38],
        [float("nan")] * 5 + [float("inf")] * 5,
    ])
    with torch_mla.use_backend("triton"):
        out = torch_mla.indexer_topk(logits, 5)
        assert out.tolist() == [[1, 2, 7, 0, 3], [-1] * 5, [0, 1, 2, 3, 4], [3, 8, 5, 2, 7],
                                [-1] * 5]
        k_start = torch.tensor([2, 0, 7, -4, 0], dtype=torch.int32)
        k_end = torch.tensor([5, 10, 100, 2, 10], dtype=torch.int32)
        out = torch_mla.indexer_topk(logits, 4, k_start=k_start, k_end=k_end)
        assert out.tolist() == [[2, 3, 4, -1], [-1] * 4, [7, 8, 9, -1], [0, 1, -1, -1], [-1] * 4]
        assert torch.equal(torch_mla.indexer_topk(logits, 0), torch.empty(5, 0, dtype=torch.int32))


def radix_logits(s_q, s_k, gen):
    """Rows built to need every radix pass: many ties, values a few ulps apart (equal top
    bytes), negatives, -0.0, specials, out-of-window garbage."""
    base = torch.randn(s_q, s_k, generator=gen)
    coarse = (base * 4).round() / 4  # ties
    near = 1.0 + torch.randint(0, 40, (s_q, s_k), generator=gen).float() * 2.0 ** -23  # ulps
    pick = torch.randint(0, 3, (s_q, s_k), generator=gen)
    x = torch.where(pick == 0, coarse, torch.where(pick == 1, near, -near))
    x[torch.rand(s_q, s_k, generator=gen) < 0.05] = -0.0
    x[torch.rand(s_q, s_k, generator=gen) < 0.05] = NEG_INF
    x[torch.rand(s_q, s_k, generator=gen) < 0.03] = float("nan")
    x[torch.rand(s_q, s_k, generator=gen) < 0.03] = float("inf")
    return x


@pytest.mark.parametrize("s_q,s_k,k,windows,block", [
    (6, 300, 37, True, 64), (8, 300, 37, True, 1024), (5, 9, 12, True, 1024),
    (4, 200, 200, False, 1024), (4, 250, 1, True, 32), (2, 2100, 2048, False, 1024),
    (3, 9, 40, False, 16)])  # k past the next power of two of s_k: a -1 tail
@pytest.mark.parametrize("digit_bits,hist_cmp,fast", [
    (8, False, False), (4, False, False), (4, True, False), (8, False, True)])
def test_topk_matches_full_sort(s_q, s_k, k, windows, block, digit_bits, hist_cmp, fast, gen,
                                monkeypatch):
    monkeypatch.setattr(tri_indexer, "TOPK_BLOCK", block)  # logits per chunk of each pass
    monkeypatch.setattr(tri_indexer, "TOPK_DIGIT_BITS", digit_bits)  # 4 or 8 radix passes
    monkeypatch.setattr(tri_indexer, "TOPK_HIST_CMP", hist_cmp)
    monkeypatch.setattr(tri_indexer, "TOPK_FAST", fast)  # False: the radix path for every row
    # fast: small samples and capacity, so these tie-heavy rows go either way
    monkeypatch.setattr(tri_indexer, "TOPK_SAMPLE_MIN", 16)
    monkeypatch.setattr(tri_indexer, "TOPK_SAMPLE_MAX", 64)
    monkeypatch.setattr(tri_indexer, "TOPK_CAP_MIN", 32)
    paths = []
    monkeypatch.setattr(tri_indexer, "_topk_paths", paths)
    logits = radix_logits(s_q, s_k, gen)
    logits[0] = NEG_INF  # all invalid
    k_start = k_end = None
    if windows:
        k_start = torch.randint(-3, s_k // 2, (s_q,), generator=gen, dtype=torch.int32)
        k_end = torch.randint(0, s_k + 5, (s_q,), generator=gen, dtype=torch.int32)
        k_start[1], k_end[1] = 5, 5  # empty window
    out, ref = both(torch_mla.indexer_topk, logits, k, k_start=k_start, k_end=k_end)
    want = topk_by_sort(logits, k, k_start, k_end)
    assert out.dtype == torch.int32 and out.shape == (s_q, k)
    assert torch.equal(out, want)
    assert torch.equal(ref, want)
    assert len(paths) == 1 and (paths[0].any() if fast else not paths[0].any())


def small_fast_path(monkeypatch, block=256):
    """Interpreter-sized fast-path settings; returns the list that collects each call's per-row
    path flags (1: fast path)."""
    monkeypatch.setattr(tri_indexer, "TOPK_BLOCK", block)
    monkeypatch.setattr(tri_indexer, "TOPK_SAMPLE_MIN", 64)
    monkeypatch.setattr(tri_indexer, "TOPK_SAMPLE_MAX", 1024)
    monkeypatch.setattr(tri_indexer, "TOPK_CAP_MIN", 64)
    paths = []
    monkeypatch.setattr(tri_indexer, "_topk_paths", paths)
    return paths


@pytest.mark.parametrize("s_q,s_k,k,windows", [
    (16, 3000, 150, False), (12, 2500, 100, True), (8, 2100, 2048, False), (6, 700, 77, True),
    (4, 300, 500, True)])  # k > s_k: a -1 tail
def test_topk_fast_path_random_rows(s_q, s_k, k, windows, gen, monkeypatch):
    """Plain random rows take the fast path (the sample's estimate lands in [k, CAP]) and give
    the exact answer; with the fast path off the same rows give the same answer."""
    paths = small_fast_path(monkeypatch)
    logits = torch.randn(s_q, s_k, generator=gen)
    k_start = k_end = None
    if windows:
        k_start = torch.randint(-3, s_k // 4, (s_q,), generator=gen, dtype=torch.int32)
        k_end = torch.randint(s_k // 2, s_k + 5, (s_q,), generator=gen, dtype=torch.int32)
    want = topk_by_sort(logits, k, k_start, k_end)
    out, ref = both(torch_mla.indexer_topk, logits, k, k_start=k_start, k_end=k_end)
    assert torch.equal(out, want) and torch.equal(ref, want)
    # the sample misses [k, CAP] for a few per cent of such small rows at most
    assert paths[0].sum().item() >= 0.75 * s_q, paths[0].tolist()
    monkeypatch.setattr(tri_indexer, "TOPK_FAST", False)
    with torch_mla.use_backend("triton"):
        slow = torch_mla.indexer_topk(logits, k, k_start=k_start, k_end=k_end)
    assert torch.equal(slow, want) and not paths[1].any()


def sample_positions(s_k, k):
    """The positions the fast path samples in a full row [0, s_k) (n > S)."""
    s = tri_indexer._topk_sample(s_k, min(k, s_k))
    assert s < s_k
    return (torch.arange(s) * s_k) // s


def test_topk_fast_path_estimate_failures_fall_back(gen, monkeypatch):
    """Rows built so that the sampled threshold is too high (the sampled positions hold the
    largest logits: fewer than k candidates) or too low (the sampled positions are -inf, or all
    logits tie: more than CAP candidates) take the radix path, exactly; rows with few valid
    logits (all collected) and tiny windows (the sample is the window) stay on the fast path."""
    paths = small_fast_path(monkeypatch)
    s_k, k = 3000, 150
    pos = sample_positions(s_k, k)
    x = torch.randn(12, s_k, generator=gen)
    x[0, pos] += 100.0  # too high: only ~r < k keys >= t
    x[1, pos] = NEG_INF  # too low: t = INT32_MIN, every valid key a candidate (> CAP)
    x[2] = 0.5  # too low: all tie
    x[3] = torch.where(torch.rand(s_k, generator=gen) < 0.5, 1.0, -0.0)  # heavy ties, +-0
    x[4] = torch.arange(s_k, dtype=torch.float32)  # ascending
    x[5] = -torch.arange(s_k, dtype=torch.float32)  # descending
    x[6] = NEG_INF
    x[6, torch.randperm(s_k, generator=gen)[:40]] = 1.0 + torch.rand(40, generator=gen)
    x[7] = float("nan")
    x[7, ::97] = torch.randn(x[7, ::97].shape, generator=gen)  # 31 valid < k: all taken
    x[8, torch.rand(s_k, generator=gen) < 0.9] = float("nan")  # ~300 valid >= k
    x[9] = float("inf")
    k_start = torch.tensor([0] * 10 + [100, 2990], dtype=torch.int32)
    k_end = torch.tensor([s_k] * 10 + [130, 4000], dtype=torch.int32)  # tiny windows, < k
    want = topk_by_sort(x, k, k_start, k_end)
    out, ref = both(torch_mla.indexer_topk, x, k, k_start=k_start, k_end=k_end)
    assert torch.equal(out, want) and torch.equal(ref, want)
    took = paths[0].tolist()
    assert took[:4] == [0, 0, 0, 0], took  # the estimate failed: radix path
    assert took[4:8] == [1, 1, 1, 1] and took[9:] == [1, 1, 1], took
    assert (want[10:, 30:] == -1).all() and (want[11, :10] >= 0).all()


@pytest.mark.parametrize("n,m", [(64, 64), (64, 16), (128, 32), (32, 4), (16, 1)])
def test_top_sorted_keeps_the_m_largest_in_order(n, m, gen):
    @triton.jit
    def kernel(x_ptr, out_ptr, N: tl.constexpr, LOG_N: tl.constexpr, M: tl.constexpr,
               LOG_M: tl.constexpr):
        x = tl.load(x_ptr + tl.arange(0, N))
        tl.store(out_ptr + tl.arange(0, M), tri_indexer._top_sorted(x, N, LOG_N, M, LOG_M))

    x = torch.randint(-2 ** 62, 2 ** 62, (n,), generator=gen, dtype=torch.int64)
    x[: n // 4] = x[n // 4: n // 2]  # duplicates
    out = torch.empty(m, dtype=torch.int64)
    kernel[(1,)](x, out, n, n.bit_length() - 1, m, m.bit_length() - 1)
    assert torch.equal(out, x.sort(descending=True).values[:m])


def test_topk_strided_logits(gen):
    logits = radix_logits(40, 6, gen).t()  # [6, 40], column stride 6
    with torch_mla.use_backend("triton"):
        out = torch_mla.indexer_topk(logits, 9)
    assert torch.equal(out, topk_by_sort(logits, 9))


def test_topk_too_large_k_is_explained():
    logits = torch.zeros(2, tri_indexer.MAX_TOPK + 1)
    with torch_mla.use_backend("triton"):
        text = torch_mla.explain("indexer_topk", logits, tri_indexer.MAX_TOPK + 1)
    assert "sorted in registers" in text


# ---------------------------------------------------------------------------------------------
# training ops
# ---------------------------------------------------------------------------------------------

def _indices(shape, high, gen):
    idx = torch.randint(0, high, shape, generator=gen, dtype=torch.int32)
    bad = torch.rand(shape, generator=gen) < 0.25
    junk = torch.where(torch.rand(shape, generator=gen) < 0.5, -1, high + 2).to(torch.int32)
    return torch.where(bad, junk, idx)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_indexer_scores_forward_backward_match_float64(dtype, tol, gen):
    s_q, h, d, s_k, topk = 7, 5, 40, 30, 70
    q = torch.randn(s_q, h, d, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(s_k, d, generator=gen).to(dtype)
    w = torch.randn(s_q, h, generator=gen).requires_grad_()
    idx = _indices((s_q, topk), s_k, gen)
    idx = torch.where((idx >= s_k - 2) & (idx < s_k), idx - 2, idx)  # rows s_k - 2.. unused
    idx[2] = -1  # nothing valid
    idx[3, :4] = 5  # duplicates: dk adds up
    k[s_k - 2:] = float("nan")  # never read
    k.requires_grad_()
    with torch_mla.use_backend("triton"):
        out = torch_mla.indexer_scores(q, k, w, idx)
    valid = (idx >= 0) & (idx < s_k)
    grad = torch.randn(s_q, topk, generator=gen)
    grad[~valid] = float("nan")  # gradients at -inf entries are ignored
    with torch_mla.use_backend("triton"):
        dq, dk, dw = torch.autograd.grad(out, (q, k, w), grad)
    # float64 formula and its autograd
    q64, w64 = q.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    k64 = torch.nan_to_num(k.detach().double()).requires_grad_()
    rows = k64[idx.long().clamp(0, s_k - 1)]
    val = torch.einsum("th,thj->tj", w64, torch.einsum("thd,tjd->thj", q64, rows).clamp_min(0))
    want = torch.where(valid, val, NEG_INF)
    assert torch.equal(torch.isinf(out), ~valid)
    torch.testing.assert_close(out.double()[valid], want[valid], rtol=1e-5, atol=1e-4)
    g64 = torch.autograd.grad(torch.where(valid, val, 0.0), (q64, k64, w64),
                              torch.where(valid, grad.double(), 0.0))
    for got, exp in zip((dq, dk, dw), g64):
        assert torch.isfinite(got).all()
        err = ((got.double() - exp).norm() / exp.norm()).item()
        assert err < tol, err


def test_indexer_scores_backward_alerts_in_deterministic_mode(gen):
    # dk sums with atomics: raise under torch.use_deterministic_algorithms(True), as PyTorch's
    # own nondeterministic ops do; the forward (no atomics) runs
    q = torch.randn(3, 4, 32, generator=gen).requires_grad_()
    k = torch.randn(10, 32, generator=gen).requires_grad_()
    w = torch.randn(3, 4, generator=gen)
    idx = _indices((3, 16), 10, gen)
    torch.use_deterministic_algorithms(True)
    try:
        with torch_mla.use_backend("triton"):
            out = torch_mla.indexer_scores(q, k, w, idx)
            with pytest.raises(RuntimeError, match="not bitwise reproducible"):
                torch.autograd.grad(torch.where(torch.isinf(out), 0.0, out).sum(), (q, k))
    finally:
        torch.use_deterministic_algorithms(False)


def attn64(q, kv, idx, lse, sm_scale, valid):
    rows = kv[:, 0].double()[idx.long().clamp(0, kv.shape[0] - 1)]  # [s_q, n, d]
    s = torch.einsum("thd,tnd->thn", q.double(), rows) * sm_scale - lse.double()[..., None]
    p = torch.where(valid, torch.exp(s).sum(1), 0.0)
    tot = p.sum(-1, keepdim=True)
    return p / torch.where(tot > 0, tot, 1.0)


def lse_of(q, kv, valid, sm_scale):
    """lse over the valid keys in float64 (+inf for a query without any)."""
    s = torch.einsum("thd,sd->ths", q.double(), kv[:, 0].double()) * sm_scale
    s = torch.where(valid[:, None, :], s, NEG_INF)
    lse = torch.logsumexp(s, -1)
    return torch.where(valid.any(-1)[:, None], lse, float("inf")).float()


@pytest.mark.parametrize("d,h,dtype", [(576, 4, torch.bfloat16), (40, 8, torch.float32)])
def test_sparse_attn_scores_match_float64(d, h, dtype, gen):
    s_q, s_kv, topk = 5, 40, 50
    q = torch.randn(s_q, h, d, generator=gen).to(dtype)
    kv = torch.randn(s_kv, 1, d, generator=gen).to(dtype)
    idx = _indices((s_q, 1, topk), s_kv, gen)
    idx[1] = -1  # nothing valid
    idx[2, 0, :3] = 7  # duplicates count once per occurrence
    lens = torch.tensor([topk, topk, 20, 0, topk + 9], dtype=torch.int32)
    valid = (idx[:, 0] >= 0) & (idx[:, 0] < s_kv) & (torch.arange(topk) < lens[:, None].long())
    used = torch.zeros(s_kv, dtype=torch.bool)
    used[idx[:, 0][valid].long()] = True
    kv[~used] = float("nan")  # rows no valid entry points at
    # lse of the attention over the query's own (valid, deduplicated) keys: any lse works for
    # the formula; this one makes rows sum to ~1 before the renormalisation
    vmask = torch.zeros(s_q, s_kv, dtype=torch.bool)
    vmask.scatter_(1, idx[:, 0].long().clamp(0, s_kv - 1), valid)
    lse = lse_of(q, torch.nan_to_num(kv), vmask, d ** -0.5)
    out, ref = both(torch_mla.sparse_attn_scores, q, kv, idx, lse, d ** -0.5, lens)
    want = attn64(q, torch.nan_to_num(kv), idx[:, 0], lse, d ** -0.5, valid)
    assert torch.isfinite(out).all() and (out[~valid] == 0).all() and (out[1] == 0).all()
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)


def test_dense_attn_scores_windows_match_float64(gen):
    s_q, s_k, h, d = 6, 90, 4, 48
    q = torch.randn(s_q, h, d, generator=gen)
    kv = torch.randn(s_k, 1, d, generator=gen)
    k_start = torch.tensor([0, 10, 50, -5, 80, 30], dtype=torch.int32)
    k_end = torch.tensor([1, 70, 50, 100, 90, 20], dtype=torch.int32)  # empty, inverted
    cols = torch.arange(s_k)
    valid = (cols >= k_start[:, None].long()) & (cols < k_end[:, None].long())
    lse = lse_of(q, kv, valid, d ** -0.5)
    out, ref = both(torch_mla.dense_attn_scores, q, kv, lse, d ** -0.5, k_start, k_end)
    want = attn64(q, kv, cols.expand(s_q, s_k), lse, d ** -0.5, valid)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
    assert (out[2] == 0).all() and (out[5] == 0).all()
    with torch_mla.use_backend("triton"):
        whole = torch_mla.dense_attn_scores(q, kv, lse_of(q, kv, torch.ones_like(valid), 0.1), 0.1)
    torch.testing.assert_close(whole.sum(-1), torch.ones(s_q), rtol=1e-5, atol=0)


def test_training_ops_refuse_float64_with_a_reason():
    q = torch.randn(2, 2, 8, dtype=torch.float64)
    with torch_mla.use_backend("triton"):
        text = torch_mla.explain("indexer_scores", q, torch.randn(3, 8, dtype=torch.float64),
                                 torch.randn(2, 2), torch.zeros(2, 3, dtype=torch.int32))
    assert "take bf16/fp16/fp32" in text


# ---------------------------------------------------------------------------------------------
# the inference pipeline, compiled
# ---------------------------------------------------------------------------------------------

def test_compiled_inference_pipeline_on_triton_matches_reference(gen):
    """Prefill selection (quantize -> logits -> top-k) and a decode step (write the new keys ->
    paged logits -> top-k -> cache indices) under torch.compile(fullgraph=True), run by the Triton
    kernels, equal the eager reference."""
    s, h, d, bs, topk = 20, 4, 32, 8, 5
    x_q = torch.randn(s, h, d, generator=gen)
    x_k = torch.randn(s, d, generator=gen)
    w = torch.randn(s, h, generator=gen)
    k_start = torch.zeros(s, dtype=torch.int32)
    k_end = torch.arange(1, s + 1, dtype=torch.int32)
    table = torch.tensor([[2, 0, 3], [1, 4, 5]], dtype=torch.int32)

    def pipeline(x_q, x_k, w, cache):
        q8, q_scale = torch_mla.indexer_quantize(x_q)
        k8, k_scale = torch_mla.indexer_quantize(x_k, scale_format="ue8m0")
        logits = torch_mla.indexer_logits(q8, k8, k_scale, w * q_scale, k_start, k_end)
        chosen = torch_mla.indexer_topk(logits, topk, k_start=k_start, k_end=k_end)
        # decode: both sequences hold the s keys; queries are the last two tokens (next_n 2)
        pos = torch.arange(s)
        slots = table[:, pos // bs].long() * bs + pos % bs  # [2, s]
        torch_mla.write_indexer_cache(cache, x_k.repeat(2, 1), slots.reshape(-1))
        paged = torch_mla.indexer_logits_paged(q8[-2:].unsqueeze(0).expand(2, 2, h, d), cache,
                                               (w * q_scale)[-2:].repeat(2, 1),
                                               torch.full((2,), s, dtype=torch.int32), table, 24)
        pos_k = torch_mla.indexer_topk(paged, topk)
        return chosen, paged, torch_mla.indexer_topk_to_cache_indices(
            pos_k.view(2, 2, topk), table, bs, batch_ids=torch.arange(2)[:, None])

    compiled = torch.compile(pipeline, backend="aot_eager", fullgraph=True)
    c_tri, c_ref = torch_mla.new_indexer_cache(6, bs, d), torch_mla.new_indexer_cache(6, bs, d)
    with torch_mla.use_backend("triton"):
        got = compiled(x_q, x_k, w, c_tri)
    with torch_mla.use_backend("reference"):
        want = pipeline(x_q, x_k, w, c_ref)
    assert torch.equal(c_tri, c_ref)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-5)
    assert torch.isneginf(got[1][:, s:]).all() and torch.isneginf(got[1][0::2, s - 1]).all()
