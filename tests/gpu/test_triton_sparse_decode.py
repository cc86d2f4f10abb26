"""Triton sparse_decode on CUDA against the reference backend: production shapes (small b where
the reference would be slow), corner cases of tests/test_triton_sparse_decode.py on the GPU,
outputs poisoned before the call (the impl's outputs come from torch.empty; the check asserts
every element equals the reference's), and CUDA-graph capture with a precomputed schedule.
"""

import math

import pytest
import torch

import torch_mla
from torch_mla.meta.layouts import LAYOUT_BY_D, block_view

from oracles import poison_cuda_allocator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytest.importorskip("triton")

DEV = "cuda"



def _poison_allocator():
    poison_cuda_allocator(256)


def make(d, b, s_q, h_q, topk, etopk=0, *, bs=64, ebs=64, lens=True, sink=True, seed=0,
         invalid_frac=0.1, tokens_per_b=2048):
    g = torch.Generator(device=DEV).manual_seed(seed)
    lay = LAYOUT_BY_D[d]
    nb = max(1, b * tokens_per_b // bs)
    kv = (torch.randn(nb, bs, 1, d, device=DEV, generator=g) * 0.5).to(torch.bfloat16)
    cache = torch_mla.quantize_kv_cache(kv, lay.name)
    q = torch.randn(b, s_q, h_q, d, device=DEV, generator=g).to(torch.bfloat16)

    def idx_for(n_slots, k):
        idx = torch.randint(0, n_slots, (b, s_q, k), device=DEV, generator=g, dtype=torch.int32)
        bad = torch.rand((b, s_q, k), device=DEV, generator=g) < invalid_frac
        junk = torch.where(torch.rand((b, s_q, k), device=DEV, generator=g) < 0.5,
                           torch.full_like(idx, -1), torch.full_like(idx, n_slots + 7))
        return torch.where(bad, junk, idx)

    kw = {"indices": idx_for(nb * bs, topk)}
    if lens:
        kw["topk_length"] = torch.randint(0, topk + 1, (b,), device=DEV, generator=g,
                                          dtype=torch.int32)
        kw["topk_length"][0] = topk
    if etopk:
        enb = max(1, b * 512 // ebs)
        ekv = (torch.randn(enb, ebs, 1, d, device=DEV, generator=g) * 0.5).to(torch.bfloat16)
        kw["extra_k_cache"] = torch_mla.quantize_kv_cache(ekv, lay.name)
        kw["extra_indices"] = idx_for(enb * ebs, etopk)
        if lens:
            kw["extra_topk_length"] = torch.randint(0, etopk + 1, (b,), device=DEV, generator=g,
                                                    dtype=torch.int32)
    if sink:
        kw["attn_sink"] = torch.randn(h_q, device=DEV, generator=g)
        kw["attn_sink"][0::5] = math.inf
        kw["attn_sink"][1::5] = -math.inf
    return q, cache, kw


def compare(q, cache, kw, schedule=None):
    kw = dict(kw)
    idx = kw.pop("indices")
    with torch_mla.use_backend("reference"):
        ref = torch_mla.sparse_decode(q, cache, idx, **kw)
    _poison_allocator()
    with torch_mla.use_backend("triton"):
        out, lse = torch_mla.sparse_decode(q, cache, idx, schedule=schedule, **kw)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref[1]))
    lonely = torch.isinf(ref[1]).transpose(1, 2)
    assert torch.all(out[lonely] == 0)
    err = (out.float() - ref[0].float()).norm() / ref[0].float().norm().clamp_min(1e-30)
    assert err < 1e-2, err
    fin = torch.isfinite(ref[1])
    torch.testing.assert_close(lse[fin], ref[1][fin], rtol=1e-4, atol=2e-3)
    return out, lse


# production shapes, with a batch small enough for the reference
@pytest.mark.parametrize("d,h_q,topk,etopk", [
    (576, 128, 2048, 0),  # V32 decode (DeepSeek-V3.2)
    (576, 128, 16384, 0),  # V32 long top-k
    (512, 64, 128, 512),  # MODEL1 + extra KV
    (512, 128, 128, 1024),
])
def test_production_shapes(d, h_q, topk, etopk):
    q, cache, kw = make(d, 4, 2, h_q, topk, etopk, seed=topk + h_q)
    compare(q, cache, kw)


@pytest.mark.parametrize("d", [576, 512])
@pytest.mark.parametrize("bs,ebs", [(2, 61), (61, 2), (64, 64), (576, 64)])
def test_block_sizes(d, bs, ebs):
    q, cache, kw = make(d, 3, 2, 64, 300, 100, bs=bs, ebs=ebs, tokens_per_b=600, seed=bs)
    compare(q, cache, kw)


@pytest.mark.parametrize("d", [576, 512])
def test_corner_cases(d):
    # all indices invalid; zero lengths; h_q 16/32 (smaller head blocks)
    q, cache, kw = make(d, 3, 2, 64, 256, 64, invalid_frac=1.0, seed=1)
    out, lse = compare(q, cache, kw)
    assert torch.all(out == 0) and torch.all(lse == math.inf)
    q, cache, kw = make(d, 3, 1, 128, 256, 64, seed=2)
    kw["topk_length"].zero_()
    kw["extra_topk_length"][1] = 0
    compare(q, cache, kw)
    for h_q in (16, 32):
        q, cache, kw = make(d, 2, 2, h_q, 200, 0, seed=h_q)
        compare(q, cache, kw)


@pytest.mark.parametrize("d", [576, 512])
def test_nan_bytes_in_unused_slots(d):
    q, cache, kw = make(d, 2, 2, 64, 256, 0, lens=True, seed=3)
    n = cache.shape[0] * cache.shape[1]
    used = torch.zeros(n, dtype=torch.bool, device=DEV)
    pos = torch.arange(256, device=DEV)
    live = kw["indices"].long()
    ok = (live >= 0) & (live < n) & (pos < kw["topk_length"].view(-1, 1, 1))
    used[live[ok]] = True
    lay = LAYOUT_BY_D[d]
    rows = block_view(cache, lay)  # honours stride(0)
    nb, bs = cache.shape[0], cache.shape[1]
    unused = ~used.view(nb, bs)
    if d == 576:
        rows.view(nb, bs, 656)[unused] = 0x7F
    else:
        rows[:, : bs * 576].view(nb, bs, 576)[unused] = 0x7F
        rows[:, bs * 576:].view(nb, bs, 8)[unused] = 0x7F
    compare(q, cache, kw)


@pytest.mark.parametrize("d,h_q,etopk", [(576, 128, 0), (512, 64, 512)])
def test_explicit_schedules(d, h_q, etopk):
    q, cache, kw = make(d, 5, 2, h_q, 1024, etopk, seed=4)
    lens = kw["topk_length"] + (kw.get("extra_topk_length", 0) if etopk else 0)
    for parts in (1, 3, 200):
        compare(q, cache, kw, torch_mla.decode_schedule(lens.to(torch.int32), num_parts=parts))


@pytest.mark.parametrize("d,h_q,etopk", [(576, 128, 0), (512, 128, 1024)])
def test_cuda_graph_capture(d, h_q, etopk):
    q, cache, kw = make(d, 8, 2, h_q, 2048 if etopk == 0 else 128, etopk, seed=5)
    kw = dict(kw)
    idx = kw.pop("indices")
    lens = kw["topk_length"] + (kw["extra_topk_length"] if etopk else 0)
    sched = torch_mla.decode_schedule(lens.to(torch.int32))

    def step():
        with torch_mla.use_backend("triton"):
            return torch_mla.sparse_decode(q, cache, idx, schedule=sched, **kw)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, lse = step()
    # new inputs in the same buffers, then replay
    q.copy_(torch.randn_like(q))
    out.fill_(float("nan"))
    lse.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    with torch_mla.use_backend("reference"):
        ref = torch_mla.sparse_decode(q, cache, idx, **kw)
    err = (out.float() - ref[0].float()).norm() / ref[0].float().norm()
    assert err < 1e-2, err
    fin = torch.isfinite(ref[1])
    assert torch.equal(torch.isinf(lse), torch.isinf(ref[1]))
    torch.testing.assert_close(lse[fin], ref[1][fin], rtol=1e-4, atol=2e-3)

    # the same without a schedule (computed on the device inside the graph)
    kw2 = dict(kw)

    def step2():
        with torch_mla.use_backend("triton"):
            return torch_mla.sparse_decode(q, cache, idx, **kw2)

    with torch.cuda.stream(s):
        step2()
    torch.cuda.current_stream().wait_stream(s)
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2):
        out2, lse2 = step2()
    out2.fill_(float("nan"))
    g2.replay()
    torch.cuda.synchronize()
    err = (out2.float() - ref[0].float()).norm() / ref[0].float().norm()
    assert err < 1e-2, err
