"""Triton DSA-indexer kernels on CUDA against the reference backend on the same device, at
production shapes (DeepSeek-V3.2's indexer: h 64, d 128, top-k 2048; smaller s_q / s_k where the
reference would be slow) and the corner cases of tests/test_triton_indexer.py: FP8 bytes and
scales bit for bit, write_indexer_cache over the cache's whole storage (poisoned with 0xFF, NaN in
e4m3 and f32) with duplicates on both duplicate-resolution paths, repeated (a race would show as a
varying winner), logits within the FP8 tensor cores' accumulation error, top-k exactly, outputs
poisoned through the caching allocator (the impls allocate with torch.empty), CUDA-graph capture
of a decode step. Skipped without CUDA.

These kernels have not run on a GPU yet: the lead runs this file on the H100 (forcing the backend,
since they are not in torch_mla.triton.GPU_VERIFIED).
"""

import pytest
import torch

import torch_mla

from oracles import bit_mismatches, poison_cuda_allocator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytest.importorskip("triton")

DEV = "cuda"
NEG_INF = float("-inf")


def _gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)



def _poison_allocator():
    poison_cuda_allocator(512)


def both(fn, *args, **kwargs):
    with torch_mla.use_backend("reference"):
        want = fn(*args, **kwargs)
    _poison_allocator()
    with torch_mla.use_backend("triton"):
        got = fn(*args, **kwargs)
    torch.cuda.synchronize()
    return got, want


def _storage(t):
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


# ---------------------------------------------------------------------------------------------
# indexer_quantize / write_indexer_cache: bytes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["fp32", "ue8m0"])
@pytest.mark.parametrize("hadamard", [True, False])
def test_quantize_bytes_production(fmt, hadamard):
    g = _gen(0)
    x = torch.randn(4096, 64, 128, device=DEV, generator=g)
    x *= torch.exp2(torch.randint(-20, 20, (4096, 64, 1), device=DEV, generator=g).float())
    x[0] = 0
    x = x.to(torch.bfloat16)
    (q8, scale), (q8_ref, scale_ref) = both(torch_mla.indexer_quantize, x, hadamard=hadamard,
                                           scale_format=fmt)
    # the reference on the CPU is the oracle: the CUDA reference must give its bytes too
    with torch_mla.use_backend("reference"):
        q8_cpu, scale_cpu = torch_mla.indexer_quantize(x.cpu(), hadamard=hadamard,
                                                       scale_format=fmt)
    assert torch.equal(scale_ref.cpu().view(torch.int32), scale_cpu.view(torch.int32)), (
        "reference: CUDA vs CPU scales\n" + bit_mismatches(scale_ref.cpu(), scale_cpu))
    assert torch.equal(q8_ref.cpu().view(torch.uint8), q8_cpu.view(torch.uint8)), (
        "reference: CUDA vs CPU codes\n" + bit_mismatches(q8_ref.cpu(), q8_cpu, x=x.cpu().float()))
    # the row's scale beside each element, to tell a wrong scale from a wrong rounding
    row_scale = scale_ref.view(scale_ref.shape + (1,)).expand(q8_ref.shape)
    assert torch.equal(scale.view(torch.int32), scale_ref.view(torch.int32)), (
        bit_mismatches(scale, scale_ref))
    assert torch.equal(q8.view(torch.uint8), q8_ref.view(torch.uint8)), bit_mismatches(
        q8, q8_ref, x=x.float(), scale=row_scale)


@pytest.mark.parametrize("d,dtype", [(32, torch.float32), (256, torch.float16),
                                     (64, torch.float64)])
def test_quantize_bytes_other_shapes(d, dtype):
    x = torch.randn(3000, d, device=DEV, generator=_gen(d)).to(dtype)
    (q8, scale), (q8_ref, scale_ref) = both(torch_mla.indexer_quantize, x)
    assert torch.equal(q8.view(torch.uint8), q8_ref.view(torch.uint8))
    assert torch.equal(scale, scale_ref)


@pytest.mark.parametrize("n", [128, 16384])  # decode (in-kernel scan) and prefill (device sort)
@pytest.mark.parametrize("bs,pad,offset", [(64, 0, 0), (61, 12, 0), (2, 3, 1)])
def test_write_cache_bytes_repeated(n, bs, pad, offset):
    g = _gen(n + bs)
    d = 128
    nb = max(2, 2 * n // bs)
    stride0 = bs * (d + 4) + pad
    for rep in range(3):
        flat = torch.full((offset + nb * stride0 + 5,), 0xFF, dtype=torch.uint8, device=DEV)
        ref_flat = flat.clone()

        def view(f):
            return f[offset: offset + nb * stride0].view(nb, stride0)[:, : bs * (d + 4)].view(
                nb, bs, 1, d + 4)

        k = torch.randn(n, d, device=DEV, generator=g).to(torch.bfloat16)
        slots = torch.randint(-3, nb * bs + 3, (n,), device=DEV, generator=g)
        slots[: n // 4] = slots[n // 4: n // 2]  # many duplicates
        fmt = "ue8m0" if rep else "fp32"
        with torch_mla.use_backend("triton"):
            torch_mla.write_indexer_cache(view(flat), k, slots, scale_format=fmt)
        with torch_mla.use_backend("reference"):
            torch_mla.write_indexer_cache(view(ref_flat), k, slots, scale_format=fmt)
        torch.cuda.synchronize()
        assert torch.equal(flat, ref_flat)


# ---------------------------------------------------------------------------------------------
# logits
# ---------------------------------------------------------------------------------------------

def _fp8_inputs(s_q, s_k, h, d, g, lead=()):
    q8, q_scale = torch_mla.indexer_quantize(torch.randn(*lead, s_q, h, d, device=DEV, generator=g))
    k8, k_scale = torch_mla.indexer_quantize(torch.randn(s_k, d, device=DEV, generator=g))
    w = torch.randn(*lead, s_q, h, device=DEV, generator=g) * q_scale
    return q8, q_scale, k8, k_scale, w


def _bound(q8, w, k8, k_scale):
    """sum_h |w| * (|q| . |k|) * k_scale: what an accumulation error is relative to."""
    return torch.einsum("th,ths->ts", w.abs(),
                        torch.einsum("thd,sd->ths", q8.float().abs(), k8.float().abs())) * k_scale


def check_close(out, ref, bound):
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref))
    assert not torch.isnan(out).any()
    fin = torch.isfinite(ref)
    # the tensor cores accumulate the 128-long FP8 dots with reduced precision
    assert torch.all((out[fin] - ref[fin]).abs() <= 2e-3 * bound[fin] + 1e-6)


def test_logits_causal_chunk():
    g = _gen(1)
    s_q, s_k, h, d = 1024, 16384, 64, 128
    q8, _, k8, k_scale, w = _fp8_inputs(s_q, s_k, h, d, g)
    k_start = torch.zeros(s_q, dtype=torch.int32, device=DEV)
    k_end = torch.arange(s_k - s_q + 1, s_k + 1, dtype=torch.int32, device=DEV)
    k_start[::7] = 3000  # ragged starts
    k_end[5] = k_start[5]  # empty
    out, ref = both(torch_mla.indexer_logits, q8, k8, k_scale, w, k_start, k_end)
    check_close(out, ref, _bound(q8, w, k8, k_scale))


def test_logits_production_shape_sampled_rows():
    g = _gen(2)
    s_q, s_k, h, d = 4096, 32768, 64, 128
    q8, _, k8, k_scale, w = _fp8_inputs(s_q, s_k, h, d, g)
    k_start = torch.zeros(s_q, dtype=torch.int32, device=DEV)
    k_end = torch.arange(s_k - s_q + 1, s_k + 1, dtype=torch.int32, device=DEV)
    _poison_allocator()
    with torch_mla.use_backend("triton"):
        out = torch_mla.indexer_logits(q8, k8, k_scale, w, k_start, k_end)
    cols = torch.arange(s_k, device=DEV)
    allowed = cols[None] < k_end[:, None]
    assert torch.equal(torch.isneginf(out), ~allowed)
    assert torch.isfinite(out[allowed]).all()
    rows = torch.randint(0, s_q, (16,), device=DEV, generator=g)
    s = torch.einsum("thd,sd->ths", q8[rows].double(), k8.double())
    want = torch.einsum("th,ths->ts", w[rows].double(), s.clamp_min(0)) * k_scale.double()
    bound = _bound(q8[rows], w[rows], k8, k_scale).double()
    m = allowed[rows]
    assert torch.all((out[rows].double()[m] - want[m]).abs() <= 2e-3 * bound[m] + 1e-6)


def _paged_case(b, next_n, ctx_max, h, d, bs, g):
    ctx = torch.randint(1, ctx_max + 1, (b,), device=DEV, generator=g, dtype=torch.int32)
    ctx[0] = ctx_max
    ctx[1] = 1  # shorter than next_n
    max_blocks = -(-ctx_max // bs) + 1
    per = (ctx + bs - 1) // bs
    nb = int(per.sum()) + 8
    cache = torch.full((nb, bs, 1, d + 4), 0xFF, dtype=torch.uint8, device=DEV)  # NaN garbage
    perm = torch.randperm(nb, device=DEV, generator=g)
    table = torch.full((b, max_blocks), -1, dtype=torch.int32, device=DEV)
    starts = torch.cumsum(per, 0) - per
    j = torch.arange(max_blocks, device=DEV)
    used = j[None] < per[:, None]
    table = torch.where(used, perm[(starts[:, None] + j[None]).clamp(max=nb - 1)].int(), table)
    table[:, -1] = nb + 100  # garbage past every context
    pos = torch.arange(ctx_max, device=DEV)
    live = pos[None] < ctx[:, None]
    slots = table[:, (pos // bs)].long() * bs + pos % bs
    k = torch.randn(int(live.sum()), d, device=DEV, generator=g)
    with torch_mla.use_backend("reference"):
        torch_mla.write_indexer_cache(cache, k, slots[live])
    q8, q_scale = torch_mla.indexer_quantize(torch.randn(b, next_n, h, d, device=DEV, generator=g))
    w = (torch.randn(b, next_n, h, device=DEV, generator=g) * q_scale).reshape(b * next_n, h)
    return q8, cache, w, ctx, table


@pytest.mark.parametrize("b,next_n,ctx_max,bs", [(128, 2, 8192, 64), (16, 1, 32768, 64),
                                                 (8, 3, 3000, 61), (4, 4, 500, 2)])
def test_paged_logits(b, next_n, ctx_max, bs):
    g = _gen(b + next_n)
    h, d = 64, 128
    q8, cache, w, ctx, table = _paged_case(b, next_n, ctx_max, h, d, bs, g)
    max_len = ctx_max + 77
    out, ref = both(torch_mla.indexer_logits_paged, q8, cache, w, ctx, table, max_len)
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref))
    assert not torch.isnan(out).any()
    fin = torch.isfinite(ref)
    err = (out[fin] - ref[fin]).abs().max() / ref[fin].abs().max()
    assert err < 2e-3, err


def test_paged_logits_production_shape_and_cuda_graph():
    g = _gen(3)
    b, next_n, ctx_max, h, d, bs = 128, 2, 32768, 64, 128, 64
    q8, cache, w, ctx, table = _paged_case(b, next_n, ctx_max, h, d, bs, g)
    with torch_mla.use_backend("triton"):
        eager = torch_mla.indexer_logits_paged(q8, cache, w, ctx, table, ctx_max)
        eager_idx = torch_mla.indexer_topk(eager, 2048)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up on a side stream, then capture
            warm = torch_mla.indexer_logits_paged(q8, cache, w, ctx, table, ctx_max)
            torch_mla.indexer_topk(warm, 2048)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(graph):
            logits = torch_mla.indexer_logits_paged(q8, cache, w, ctx, table, ctx_max)
            idx = torch_mla.indexer_topk(logits, 2048)
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(logits, eager) and torch.equal(idx, eager_idx)
    limit = (ctx[:, None] - next_n + torch.arange(next_n, device=DEV)[None] + 1).reshape(-1)
    allowed = torch.arange(ctx_max, device=DEV)[None] < limit[:, None]
    assert torch.equal(torch.isneginf(eager), ~allowed)


# ---------------------------------------------------------------------------------------------
# top-k
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("s_q,s_k,k,windows", [
    (4096, 32768, 2048, False), (2048, 32768, 2048, True), (512, 3000, 2048, True),
    (256, 70000, 4096, False), (64, 100, 7, True)])
def test_topk_exact(s_q, s_k, k, windows):
    g = _gen(s_k + k)
    x = torch.randn(s_q, s_k, device=DEV, generator=g)
    x = torch.where(torch.rand(s_q, s_k, device=DEV, generator=g) < 0.3, (x * 8).round() / 8, x)
    x[torch.rand(s_q, s_k, device=DEV, generator=g) < 0.02] = NEG_INF
    x[torch.rand(s_q, s_k, device=DEV, generator=g) < 0.01] = float("nan")
    x[1] = NEG_INF
    kw = {}
    if windows:  # causal-chunk windows, some empty
        kw["k_end"] = (torch.arange(s_q, device=DEV, dtype=torch.int32) * (s_k // s_q) + 1)
        kw["k_start"] = torch.zeros(s_q, dtype=torch.int32, device=DEV)
        kw["k_start"][::5] = kw["k_end"][::5]
    out, ref = both(torch_mla.indexer_topk, x, k, **kw)
    assert torch.equal(out, ref)


# ---------------------------------------------------------------------------------------------
# training ops
# ---------------------------------------------------------------------------------------------

def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_indexer_scores_forward_backward(dtype):
    g = _gen(4)
    s_q, s_k, h, d, topk = 512, 4096, 64, 128, 2048
    q = torch.randn(s_q, h, d, device=DEV, generator=g).to(dtype)
    k = torch.randn(s_k, d, device=DEV, generator=g).to(dtype)
    w = torch.randn(s_q, h, device=DEV, generator=g)
    idx = torch.randint(-50, s_k + 50, (s_q, topk), device=DEV, generator=g, dtype=torch.int32)
    idx[0] = -1
    out, ref = both(torch_mla.indexer_scores, q, k, w, idx)
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert _rel(out[fin], ref[fin]) < 1e-5
    grad = torch.randn(s_q, topk, device=DEV, generator=g)
    grad[~fin] = float("nan")
    got, want = both(torch.ops.mla.indexer_scores_backward, grad, q, k, w, idx)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for a, b_ in zip(got, want):
        assert torch.isfinite(a).all()
        assert _rel(a, b_) < tol


def _lse(q, kv, sm_scale):
    s = torch.einsum("thd,sd->ths", q.float(), kv[:, 0].float()) * sm_scale
    return torch.logsumexp(s, -1)


def test_sparse_attn_scores_mla_shape():
    g = _gen(5)
    s_q, s_kv, h, d, topk = 256, 8192, 128, 576, 2048
    q = torch.randn(s_q, h, d, device=DEV, generator=g).to(torch.bfloat16)
    kv = torch.randn(s_kv, 1, d, device=DEV, generator=g).to(torch.bfloat16)
    idx = torch.randint(-10, s_kv + 10, (s_q, 1, topk), device=DEV, generator=g, dtype=torch.int32)
    lens = torch.randint(0, topk + 1, (s_q,), device=DEV, generator=g, dtype=torch.int32)
    lse = _lse(q, kv, d ** -0.5)
    out, ref = both(torch_mla.sparse_attn_scores, q, kv, idx, lse, d ** -0.5, lens)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < 1e-4


def test_dense_attn_scores_windows():
    g = _gen(6)
    s_q, s_k, h, d = 256, 4096, 128, 576
    q = torch.randn(s_q, h, d, device=DEV, generator=g).to(torch.bfloat16)
    kv = torch.randn(s_k, 1, d, device=DEV, generator=g).to(torch.bfloat16)
    lse = _lse(q, kv, d ** -0.5)
    k_end = torch.arange(s_k - s_q + 1, s_k + 1, device=DEV, dtype=torch.int32)
    k_start = torch.zeros(s_q, dtype=torch.int32, device=DEV)
    k_start[3] = k_end[3]
    out, ref = both(torch_mla.dense_attn_scores, q, kv, lse, d ** -0.5, k_start, k_end)
    assert torch.isfinite(out).all() and (out[3] == 0).all()
    assert _rel(out, ref) < 1e-4
