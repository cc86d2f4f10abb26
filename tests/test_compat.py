"""torch_mla.compat.flash_mla: FlashMLA's API on torch_mla's ops.

Each function must give exactly what the corresponding torch_mla op gives on the same inputs
(plus an independent float64 formula for the dense paths and the packed-input slicing), keep
FlashMLA's scheduling-metadata contract (first call records, later calls must match), and refuse
what it does not support with clear errors.
"""

import dataclasses
import math
import random

import pytest
import torch

import torch_mla
import torch_mla.compat.flash_mla as flash_mla
from torch_mla.compat.flash_mla import (FlashMLASchedMeta, flash_attn_varlen_func,
                                        flash_attn_varlen_kvpacked_func,
                                        flash_attn_varlen_qkvpacked_func, flash_mla_sparse_fwd,
                                        flash_mla_with_kvcache, get_mla_metadata)


def _gen():
    # Fresh inputs every run; the seed is printed (pytest shows it for a failing test).
    seed = random.SystemRandom().randrange(2**31)
    print("seed", seed)
    return torch.Generator().manual_seed(seed)


def _indices(shape, high, g, invalid=0.25):
    idx = torch.randint(0, high, shape, generator=g, dtype=torch.int32)
    bad = torch.rand(shape, generator=g) < invalid
    return torch.where(bad, torch.full_like(idx, -1), idx)


def _fp8_cache(layout, num_blocks, block_size, g):
    d = torch_mla.meta.layouts.LAYOUTS[layout].d
    kv = torch.randn(num_blocks, block_size, 1, d, generator=g).to(torch.bfloat16)
    return torch_mla.quantize_kv_cache(kv, layout)


def _sparse_decode_inputs(layout, g, extra=False, sink=False, lens=False):
    d = torch_mla.meta.layouts.LAYOUTS[layout].d
    b, s_q, h_q, topk = 2, 2, 4, 8
    cache = _fp8_cache(layout, 3, 4, g)
    q = torch.randn(b, s_q, h_q, d, generator=g).to(torch.bfloat16)
    kw = dict(indices=_indices((b, s_q, topk), 12, g))
    if sink:
        kw["attn_sink"] = torch.randn(h_q, generator=g)
    if lens:
        kw["topk_length"] = torch.randint(0, topk + 1, (b,), generator=g, dtype=torch.int32)
    if extra:
        kw["extra_k_cache"] = _fp8_cache(layout, 2, 2, g)
        kw["extra_indices_in_kvcache"] = _indices((b, s_q, 4), 4, g)
        kw["extra_topk_length"] = torch.randint(0, 5, (b,), generator=g, dtype=torch.int32)
    return q, cache, kw


def _op_sparse_decode(q, cache, kw, d_v=512, sm_scale=None):
    return torch_mla.sparse_decode(
        q, cache, kw["indices"], topk_length=kw.get("topk_length"),
        attn_sink=kw.get("attn_sink"), extra_k_cache=kw.get("extra_k_cache"),
        extra_indices=kw.get("extra_indices_in_kvcache"),
        extra_topk_length=kw.get("extra_topk_length"), d_v=d_v, sm_scale=sm_scale)


# ---------------------------------------------------------------------------------------------
# imports


def test_import_styles():
    import torch_mla.compat as compat
    from torch_mla.compat import flash_mla as fm

    assert fm is flash_mla is compat.flash_mla
    for name in flash_mla.__all__:
        assert callable(getattr(flash_mla, name))
    assert flash_mla.flash_mla_with_kvcache is flash_mla_with_kvcache


def test_get_mla_metadata_is_empty_and_ignores_arguments():
    meta, none = get_mla_metadata(torch.tensor([3, 4], dtype=torch.int32), 1, 1,
                                  num_heads_q=16, is_fp8_kvcache=True)
    assert none is None
    assert isinstance(meta, FlashMLASchedMeta)
    assert not meta.have_initialized and meta.config is None
    assert meta.tile_scheduler_metadata is None and meta.num_splits is None
    assert get_mla_metadata()[0] is not meta  # a fresh instance each time


# ---------------------------------------------------------------------------------------------
# flash_mla_with_kvcache, sparse


@pytest.mark.parametrize("layout,extra,sink,lens", [
    ("v32", False, False, False),
    ("v32", False, True, True),
    ("model1", True, True, True),
])
def test_sparse_decode_matches_op(layout, extra, sink, lens):
    g = _gen()
    q, cache, kw = _sparse_decode_inputs(layout, g, extra, sink, lens)
    meta, _ = get_mla_metadata()
    scale = 0.07
    out, lse = flash_mla_with_kvcache(q, cache, None, None, 512, meta, softmax_scale=scale,
                                      is_fp8_kvcache=True, **kw)
    want_out, want_lse = _op_sparse_decode(q, cache, kw, sm_scale=scale)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    assert out.shape == (2, 2, 4, 512) and lse.shape == (2, 4, 2)
    # default scale is d_qk ** -0.5, as in FlashMLA
    out2, _ = flash_mla_with_kvcache(q, cache, None, None, 512, get_mla_metadata()[0],
                                     is_fp8_kvcache=True, **kw)
    torch.testing.assert_close(out2, _op_sparse_decode(q, cache, kw)[0], rtol=0, atol=0)


def test_sparse_decode_against_float64_formula():
    """Independent of the op: dequantize the cache and do the softmax in float64."""
    g = _gen()
    q, cache, kw = _sparse_decode_inputs("v32", g, sink=True, lens=True)
    scale = 576 ** -0.5
    out, lse = flash_mla_with_kvcache(q, cache, None, None, 512, get_mla_metadata()[0],
                                      is_fp8_kvcache=True, **kw)
    keys = torch_mla.dequantize_kv_cache(cache, "v32").double().reshape(-1, 576)
    idx, lens, sink = kw["indices"], kw["topk_length"], kw["attn_sink"].double()
    b, s_q, h_q, _ = q.shape
    for i in range(b):
        for j in range(s_q):
            sel = [int(t) for p, t in enumerate(idx[i, j]) if t >= 0 and p < int(lens[i])]
            if not sel:
                assert torch.all(out[i, j] == 0) and torch.all(torch.isinf(lse[i, :, j]))
                continue
            k = keys[sel]
            logits = q[i, j].double() @ k.T * scale  # [h, n]
            want_lse = torch.logsumexp(logits, -1)
            o = torch.softmax(logits, -1) @ k[:, :512]
            o = o / (1 + torch.exp(sink - want_lse)).unsqueeze(-1)
            torch.testing.assert_close(lse[i, :, j].double(), want_lse, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out[i, j].double(), o, rtol=2e-2, atol=2e-2)


def test_sched_meta_records_first_call_and_schedule():
    g = _gen()
    q, cache, kw = _sparse_decode_inputs("v32", g, lens=True)
    meta, _ = get_mla_metadata()
    flash_mla_with_kvcache(q, cache, None, None, 512, meta, is_fp8_kvcache=True, **kw)
    assert meta.have_initialized
    assert meta.config == FlashMLASchedMeta.Config(
        b=2, s_q=2, h_q=4, page_block_size=4, h_k=1, causal=False, is_fp8_kvcache=True, topk=8,
        extra_page_block_size=None, extra_topk=None)
    want = torch_mla.decode_schedule(kw["topk_length"], h_q=q.shape[2], s_q=q.shape[1])
    assert torch.equal(meta.tile_scheduler_metadata, want.metadata)
    assert torch.equal(meta.num_splits, want.num_splits)
    # a consistent second call (another layer of the same step) reuses it and works
    sched = meta.tile_scheduler_metadata
    q2 = torch.randn(q.shape, generator=g).to(q.dtype)
    out, _ = flash_mla_with_kvcache(q2, cache, None, None, 512, meta, is_fp8_kvcache=True, **kw)
    assert meta.tile_scheduler_metadata is sched
    torch.testing.assert_close(out, _op_sparse_decode(q2, cache, kw)[0], rtol=0, atol=0)


@pytest.mark.parametrize("change,field", [
    ("batch", "b"), ("heads", "h_q"), ("topk", "topk"), ("block_size", "page_block_size"),
    ("extra", "extra_page_block_size"),
])
def test_sched_meta_inconsistent_call_asserts(change, field):
    g = _gen()
    q, cache, kw = _sparse_decode_inputs("v32", g)
    meta, _ = get_mla_metadata()
    flash_mla_with_kvcache(q, cache, None, None, 512, meta, is_fp8_kvcache=True, **kw)
    if change == "batch":
        q, kw["indices"] = q[:1], kw["indices"][:1]
    elif change == "heads":
        q = q[:, :, :2]
    elif change == "topk":
        kw["indices"] = kw["indices"][..., :4].contiguous()
    elif change == "block_size":
        cache = _fp8_cache("v32", 6, 2, g)
    elif change == "extra":
        kw["extra_k_cache"] = _fp8_cache("v32", 2, 2, g)
        kw["extra_indices_in_kvcache"] = _indices((2, 2, 4), 4, g)
    with pytest.raises(AssertionError, match=f"sched_meta.config.{field} must be equal"):
        flash_mla_with_kvcache(q, cache, None, None, 512, meta, is_fp8_kvcache=True, **kw)


def test_sched_meta_sparse_vs_dense_mismatch_asserts():
    g = _gen()
    q = torch.randn(2, 1, 4, 64, generator=g)
    cache = torch.randn(4, 4, 1, 64, generator=g)
    table = torch.arange(4, dtype=torch.int32).view(2, 2)
    lens = torch.tensor([5, 8], dtype=torch.int32)
    meta, _ = get_mla_metadata()
    flash_mla_with_kvcache(q, cache, table, lens, 32, meta)
    with pytest.raises(AssertionError, match="sched_meta.config.causal"):
        flash_mla_with_kvcache(q, cache, table, lens, 32, meta, causal=True)


def test_sparse_decode_argument_errors():
    g = _gen()
    q, cache, kw = _sparse_decode_inputs("v32", g)
    with pytest.raises(AssertionError, match="causal must be False"):
        flash_mla_with_kvcache(q, cache, None, None, 512, get_mla_metadata()[0], causal=True,
                               is_fp8_kvcache=True, **kw)
    with pytest.raises(AssertionError, match="is_fp8_kvcache must be True"):
        flash_mla_with_kvcache(q, cache, None, None, 512, get_mla_metadata()[0], **kw)
    with pytest.raises(AssertionError, match="num_splits must be None"):
        flash_mla_with_kvcache(q, cache, None, None, 512, get_mla_metadata()[0],
                               num_splits=torch.zeros(3, dtype=torch.int32),
                               is_fp8_kvcache=True, **kw)
    with pytest.raises(AssertionError, match="FlashMLASchedMeta"):
        flash_mla_with_kvcache(q, cache, None, None, 512, None, is_fp8_kvcache=True, **kw)


# ---------------------------------------------------------------------------------------------
# flash_mla_with_kvcache, dense


def _dense_decode_float64(q, cache, table, seqlens, d_v, scale, causal):
    b, s_q, h_q, d = q.shape
    bs, h_kv = cache.shape[1], cache.shape[2]
    out = torch.zeros(b, s_q, h_q, d_v, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float64)
    for i in range(b):
        n = int(seqlens[i])
        keys = cache[table[i].long()].reshape(-1, h_kv, d)[:n].double()  # [n, h_kv, d]
        for j in range(s_q):
            limit = n - s_q + j + 1 if causal else n
            if limit <= 0:
                continue
            for h in range(h_q):
                k = keys[:limit, h // (h_q // h_kv)]
                logits = k @ q[i, j, h].double() * scale
                lse[i, h, j] = torch.logsumexp(logits, 0)
                out[i, j, h] = torch.softmax(logits, 0) @ k[:, :d_v]
    return out, lse


@pytest.mark.parametrize("causal,h_kv,dtype", [(False, 1, torch.bfloat16),
                                                (True, 1, torch.float32),
                                                (True, 2, torch.float32)])
def test_dense_decode_matches_op_and_formula(causal, h_kv, dtype):
    g = _gen()
    b, s_q, h_q, d, d_v, bs = 3, 2, 4, 576, 512, 4
    q = torch.randn(b, s_q, h_q, d, generator=g).to(dtype)
    cache = torch.randn(9, bs, h_kv, d, generator=g).to(dtype)
    table = torch.randperm(9, generator=g).to(torch.int32).view(b, 3)
    seqlens = torch.tensor([0, 5, 12], dtype=torch.int32)[torch.randperm(3, generator=g)]
    meta, _ = get_mla_metadata()
    out, lse = flash_mla_with_kvcache(q, cache, table, seqlens, d_v, meta, causal=causal)
    want_out, want_lse = torch_mla.dense_decode(q, cache, table, seqlens, d_v=d_v, causal=causal)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    assert meta.config.is_fp8_kvcache is False and meta.config.topk is None
    assert torch.equal(meta.num_splits, torch_mla.decode_schedule(seqlens).num_splits)
    f_out, f_lse = _dense_decode_float64(q, cache, table, seqlens, d_v, d ** -0.5, causal)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), f_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), f_lse, rtol=1e-5, atol=1e-5)


def test_dense_decode_errors():
    g = _gen()
    q = torch.randn(1, 1, 2, 576, generator=g).to(torch.bfloat16)
    cache = torch.randn(2, 4, 1, 576, generator=g).to(torch.bfloat16)
    table = torch.arange(2, dtype=torch.int32).view(1, 2)
    lens = torch.tensor([7], dtype=torch.int32)
    fp8 = _fp8_cache("v32", 2, 4, g)
    with pytest.raises(NotImplementedError, match="dense decoding over an FP8"):
        flash_mla_with_kvcache(q, fp8, table, lens, 512, get_mla_metadata()[0],
                               is_fp8_kvcache=True)
    with pytest.raises(AssertionError, match="block_table and cache_seqlens must be provided"):
        flash_mla_with_kvcache(q, cache, None, lens, 512, get_mla_metadata()[0])
    with pytest.raises(AssertionError, match="must be None when dense attention"):
        flash_mla_with_kvcache(q, cache, table, lens, 512, get_mla_metadata()[0],
                               attn_sink=torch.zeros(2))


# ---------------------------------------------------------------------------------------------
# flash_mla_sparse_fwd


def test_sparse_fwd_matches_op_forward_and_backward():
    g = _gen()
    s_q, s_kv, h_q, d, d_v, topk = 6, 13, 4, 64, 48, 8
    q = torch.randn(s_q, h_q, d, generator=g, requires_grad=True)
    kv = torch.randn(s_kv, 1, d, generator=g, requires_grad=True)
    sink = torch.randn(h_q, generator=g, requires_grad=True)
    idx = _indices((s_q, 1, topk), s_kv + 2, g)  # some past s_kv: skipped
    lens = torch.randint(0, topk + 1, (s_q,), generator=g, dtype=torch.int32)
    scale = 0.1
    got = flash_mla_sparse_fwd(q, kv, idx, scale, d_v, sink, lens)
    want = torch_mla.sparse_prefill(q, kv, idx, scale, d_v, sink, lens)
    assert len(got) == 3
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_, rtol=0, atol=0)
    dout, dlse = torch.randn(got[0].shape, generator=g), torch.randn(got[2].shape, generator=g)
    fin = torch.isfinite(got[2])
    grads = torch.autograd.grad((got[0] * dout).sum() + (got[2][fin] * dlse[fin]).sum(),
                                (q, kv, sink))
    want_grads = torch.autograd.grad((want[0] * dout).sum() + (want[2][fin] * dlse[fin]).sum(),
                                     (q, kv, sink))
    for a, b_ in zip(grads, want_grads):
        torch.testing.assert_close(a, b_, rtol=0, atol=0)


def test_sparse_fwd_indexer_lse_is_lse_of_the_first_entries():
    g = _gen()
    s_q, s_kv, h_q, d, topk, itopk = 5, 20, 4, 32, 12, 5
    q = torch.randn(s_q, h_q, d, generator=g, dtype=torch.float64)
    kv = torch.randn(s_kv, 1, d, generator=g, dtype=torch.float64)
    idx = _indices((s_q, 1, topk), s_kv, g)
    lens = torch.randint(0, topk + 1, (s_q,), generator=g, dtype=torch.int32)
    out, max_logits, lse, lse_idx = flash_mla_sparse_fwd(q, kv, idx, 0.2, 16, None, lens,
                                                          indexer_topk=itopk)
    for i in range(s_q):
        sel = [int(t) for p, t in enumerate(idx[i, 0]) if t >= 0 and p < min(int(lens[i]), itopk)]
        want = (torch.logsumexp(q[i] @ kv[sel, 0].T * 0.2, -1) if sel
                else torch.full((h_q,), math.inf, dtype=torch.float64))
        torch.testing.assert_close(lse_idx[i], want, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# flash_attn_varlen_*


def _varlen_float64(q, k, v, cu_q, cu_k, scale, causal):
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64)
    lse = torch.full(q.shape[:2], math.inf, dtype=torch.float64)
    group = q.shape[1] // k.shape[1]
    for i in range(cu_q.shape[0] - 1):
        qs, qe, ks, ke = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        for a in range(qe - qs):
            limit = (ke - ks) if not causal else a + (ke - ks) - (qe - qs) + 1
            if limit <= 0:
                continue
            for h in range(q.shape[1]):
                kk = k[ks:ks + limit, h // group].double()
                logits = kk @ q[qs + a, h].double() * scale
                lse[qs + a, h] = torch.logsumexp(logits, 0)
                out[qs + a, h] = torch.softmax(logits, 0) @ v[ks:ks + limit, h // group].double()
    return out, lse


def _varlen_case(g, h_q=4, h_k=2, d=48, d_v=32):
    lens_q, lens_k = [3, 0, 5], [4, 2, 5]
    cu_q = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 11], dtype=torch.int32)
    q = torch.randn(sum(lens_q), h_q, d, generator=g)
    k = torch.randn(sum(lens_k), h_k, d, generator=g)
    v = torch.randn(sum(lens_k), h_k, d_v, generator=g)
    return q, k, v, cu_q, cu_k, max(lens_q), max(lens_k)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_func_matches_op_and_formula(causal):
    g = _gen()
    q, k, v, cu_q, cu_k, mq, mk = _varlen_case(g)
    out, lse = flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, causal=causal)
    want_out, want_lse = torch_mla.dense_prefill(q, k, v, cu_q, cu_k, mq, mk, causal=causal)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    f_out, f_lse = _varlen_float64(q, k, v, cu_q, cu_k, 48 ** -0.5, causal)
    torch.testing.assert_close(out.double(), f_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), f_lse, rtol=1e-5, atol=1e-5)
    out2, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, softmax_scale=0.3,
                                     causal=causal, is_varlen=False)
    torch.testing.assert_close(
        out2, torch_mla.dense_prefill(q, k, v, cu_q, cu_k, mq, mk, sm_scale=0.3,
                                      causal=causal)[0], rtol=0, atol=0)


def test_qkvpacked_slices_and_gradients():
    g = _gen()
    t, h, d, d_v = 9, 3, 40, 24
    qkv = torch.randn(t, h, 2 * d + d_v, generator=g, requires_grad=True)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    out, lse = flash_attn_varlen_qkvpacked_func(qkv, cu, 5, d, causal=True)
    q, k, v = (qkv.detach()[:, :, :d].clone().requires_grad_(),
               qkv.detach()[:, :, d:2 * d].clone().requires_grad_(),
               qkv.detach()[:, :, 2 * d:].clone().requires_grad_())
    want_out, want_lse = torch_mla.dense_prefill(q, k, v, cu, cu, 5, 5, causal=True)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    f_out, _ = _varlen_float64(q.detach(), k.detach(), v.detach(), cu, cu, d ** -0.5, True)
    torch.testing.assert_close(out.double(), f_out, rtol=1e-5, atol=1e-5)
    dout = torch.randn(out.shape, generator=g)
    (grad,) = torch.autograd.grad((out * dout).sum(), qkv)
    want = torch.autograd.grad((want_out * dout).sum(), (q, k, v))
    torch.testing.assert_close(grad, torch.cat(want, dim=-1), rtol=1e-6, atol=1e-6)


def test_kvpacked_slices_and_gradients():
    g = _gen()
    q, k, v, cu_q, cu_k, mq, mk = _varlen_case(g, h_q=4, h_k=4, d=32, d_v=16)
    kv = torch.cat((k, v), dim=-1).requires_grad_()
    out, lse = flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, mq, mk, 32, causal=False)
    k2 = k.clone().requires_grad_()
    v2 = v.clone().requires_grad_()
    want_out, want_lse = torch_mla.dense_prefill(q, k2, v2, cu_q, cu_k, mq, mk)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    dout = torch.randn(out.shape, generator=g)
    (grad,) = torch.autograd.grad((out * dout).sum(), kv)
    want = torch.autograd.grad((want_out * dout).sum(), (k2, v2))
    torch.testing.assert_close(grad, torch.cat(want, dim=-1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fn", ["varlen", "qkv", "kv"])
def test_dropout_and_deterministic_are_refused(fn):
    g = _gen()
    q, k, v, cu_q, cu_k, mq, mk = _varlen_case(g, h_q=2, h_k=2, d=16, d_v=16)
    call = {
        "varlen": lambda **kw: flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, **kw),
        "qkv": lambda **kw: flash_attn_varlen_qkvpacked_func(
            torch.cat((k, k, v), -1), cu_k, mk, 16, **kw),
        "kv": lambda **kw: flash_attn_varlen_kvpacked_func(
            q, torch.cat((k, v), -1), cu_q, cu_k, mq, mk, 16, **kw),
    }[fn]
    with pytest.raises(ValueError, match="dropout_p"):
        call(dropout_p=0.1)
    with pytest.raises(ValueError, match="deterministic"):
        call(deterministic=True)
    call(dropout_p=0.0, deterministic=False)  # the defaults are fine


def test_signatures_follow_flashmla():
    import inspect

    def params(f):
        return [(p.name, p.default) for p in inspect.signature(f).parameters.values()]

    E = inspect.Parameter.empty
    assert params(flash_mla_with_kvcache) == [
        ("q", E), ("k_cache", E), ("block_table", E), ("cache_seqlens", E), ("head_dim_v", E),
        ("tile_scheduler_metadata", E), ("num_splits", None), ("softmax_scale", None),
        ("causal", False), ("is_fp8_kvcache", False), ("indices", None), ("attn_sink", None),
        ("extra_k_cache", None), ("extra_indices_in_kvcache", None), ("topk_length", None),
        ("extra_topk_length", None)]
    assert params(flash_mla_sparse_fwd)[:7] == [
        ("q", E), ("kv", E), ("indices", E), ("sm_scale", E), ("d_v", 512), ("attn_sink", None),
        ("topk_length", None)]
    assert params(flash_attn_varlen_func) == [
        ("q", E), ("k", E), ("v", E), ("cu_seqlens_qo", E), ("cu_seqlens_kv", E),
        ("max_seqlen_qo", E), ("max_seqlen_kv", E), ("dropout_p", 0.0), ("softmax_scale", None),
        ("causal", False), ("deterministic", False), ("is_varlen", True)]
    assert params(flash_attn_varlen_qkvpacked_func) == [
        ("qkv", E), ("cu_seqlens", E), ("max_seqlen", E), ("head_dim_qk", E), ("dropout_p", 0.0),
        ("softmax_scale", None), ("causal", False), ("deterministic", False), ("is_varlen", True)]
    assert params(flash_attn_varlen_kvpacked_func) == [
        ("q", E), ("kv", E), ("cu_seqlens_qo", E), ("cu_seqlens_kv", E), ("max_seqlen_qo", E),
        ("max_seqlen_kv", E), ("head_dim_qk", E), ("dropout_p", 0.0), ("softmax_scale", None),
        ("causal", False), ("deterministic", False), ("is_varlen", True)]
    assert [f.name for f in dataclasses.fields(FlashMLASchedMeta.Config)] == [
        "b", "s_q", "h_q", "page_block_size", "h_k", "causal", "is_fp8_kvcache", "topk",
        "extra_page_block_size", "extra_topk"]


def test_sparse_decode_under_compile_fullgraph():
    """A decode step through the compat API traces as one graph (metadata made outside)."""
    g = _gen()
    q, cache, kw = _sparse_decode_inputs("model1", g, extra=True, sink=True, lens=True)
    meta, _ = get_mla_metadata()
    want = flash_mla_with_kvcache(q, cache, None, None, 512, meta, is_fp8_kvcache=True, **kw)

    def step(q):
        return flash_mla_with_kvcache(q, cache, None, None, 512, meta, is_fp8_kvcache=True, **kw)

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q)
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_, rtol=0, atol=0)
