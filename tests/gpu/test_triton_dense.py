"""Triton dense_decode / dense_prefill (+ backward) on a CUDA device against the reference backend
at production head dims and shapes, with fresh random inputs, NaN-poisoned unused cache slots and
padding tokens, no host sync, and CUDA-graph capture of a decode step. Skipped without CUDA."""

import math

import pytest
import torch

import torch_mla

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"


def _paged(lens, s_q, h_q, bs, d_qk=576, h_kv=1, dtype=torch.bfloat16, junk=-1):
    need = [-(-n // bs) for n in lens]
    max_blocks = max(need + [1]) + 2
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks).tolist()
    cache = torch.full((num_blocks, bs, h_kv, d_qk), math.nan, dtype=dtype, device=DEV)
    table = torch.full((len(lens), max_blocks), junk, dtype=torch.int32)
    for i, n in enumerate(lens):
        for c in range(need[i]):
            blk = perm.pop()
            table[i, c] = blk
            rows = min(bs, n - c * bs)
            cache[blk, :rows] = torch.randn(rows, h_kv, d_qk, device=DEV).to(dtype)
    q = torch.randn(len(lens), s_q, h_q, d_qk, device=DEV).to(dtype)
    return q, cache, table.to(DEV), torch.tensor(lens, dtype=torch.int32, device=DEV)


def _no_sync(fn):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _decode_both(q, cache, table, lens, causal, schedule=None, d_v=512):
    with torch_mla.use_backend("triton"):
        out, lse = _no_sync(lambda: torch_mla.dense_decode(q, cache, table, lens, d_v=d_v,
                                                           causal=causal, schedule=schedule))
    with torch_mla.use_backend("reference"):
        ref_out, ref_lse = torch_mla.dense_decode(q, cache, table, lens, d_v=d_v, causal=causal)
    assert not out.isnan().any() and not lse.isnan().any()
    none = ref_lse.isinf()
    assert torch.equal(lse.isinf(), none)
    assert (out.permute(0, 2, 1, 3)[none] == 0).all()
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse[~none], ref_lse[~none], atol=1e-3, rtol=1e-3)
    return out, lse


@pytest.mark.parametrize("h_q", [64, 128])
@pytest.mark.parametrize("s_q", [1, 2, 4])
def test_decode_production_heads(h_q, s_q):
    lens = [4096, 1, 0, 777, 2500, 64, 3, 8192]
    q, cache, table, seqlens = _paged(lens, s_q, h_q, 64)
    _decode_both(q, cache, table, seqlens, causal=s_q > 1)


@pytest.mark.parametrize("bs", [2, 61, 64, 576])
def test_decode_block_sizes_junk_tables(bs):
    q, cache, table, lens = _paged([300, 0, 1000, 5], 2, 128, bs, junk=10 ** 7)
    _decode_both(q, cache, table, lens, causal=True)


@pytest.mark.parametrize("num_parts", [1, 5, 132, 1000])
def test_decode_explicit_schedules(num_parts):
    q, cache, table, lens = _paged([5000, 0, 129, 64, 3000], 1, 128, 64)
    sched = torch_mla.decode_schedule(lens, num_parts=num_parts)
    _decode_both(q, cache, table, lens, causal=False, schedule=sched)


def test_decode_fp16_gqa():
    q, cache, table, lens = _paged([900, 33], 2, 32, 64, h_kv=2, dtype=torch.float16)
    _decode_both(q, cache, table, lens, causal=True)


def test_decode_large_batch_equal_lengths():
    q, cache, table, lens = _paged([2048] * 64, 1, 128, 64)
    _decode_both(q, cache, table, lens, causal=False)


def test_decode_captures_in_cuda_graph():
    q, cache, table, lens = _paged([1500, 20, 0, 700], 2, 128, 64)
    sched = torch_mla.decode_schedule(lens)
    res = {}

    def step():
        with torch_mla.use_backend("triton"):
            res["o"], res["l"] = torch_mla.dense_decode(q, cache, table, lens, causal=True,
                                                        schedule=sched)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    res["o"].fill_(math.nan)  # poisoned: the replay must rewrite every element
    res["l"].fill_(math.nan)
    q.copy_(torch.randn_like(q))
    g.replay()
    torch.cuda.synchronize()
    with torch_mla.use_backend("reference"):
        ref_out, ref_lse = torch_mla.dense_decode(q, cache, table, lens, causal=True)
    torch.testing.assert_close(res["o"].float(), ref_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(res["l"], ref_lse, atol=1e-3, rtol=1e-3)


def _varlen(lens_q, lens_k, h_q, h_k, d_qk, d_v, pad=7, dtype=torch.bfloat16):
    t_q, t_k = sum(lens_q) + pad, sum(lens_k) + pad
    q = torch.randn(t_q, h_q, d_qk, device=DEV).to(dtype)
    k = torch.randn(t_k, h_k, d_qk, device=DEV).to(dtype)
    v = torch.randn(t_k, h_k, d_v, device=DEV).to(dtype)
    q[sum(lens_q):] = math.nan  # padding: never read into a sequence
    k[sum(lens_k):] = math.nan
    v[sum(lens_k):] = math.nan
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(),
                                   dtype=torch.int32, device=DEV)
    return q, k, v, cu(lens_q), cu(lens_k)


def _prefill_both(lens_q, lens_k, h_q, h_k, d_qk, d_v, causal, dtype=torch.bfloat16):
    q, k, v, cu_q, cu_k = _varlen(lens_q, lens_k, h_q, h_k, d_qk, d_v, dtype=dtype)
    mq, mk = max(lens_q), max(lens_k)
    scale = d_qk ** -0.5
    args = (q, k, v, cu_q, cu_k, mq, mk, scale, causal)
    # The reference multiplies padding rows by an exact 0 (0 * NaN = NaN), so it gets copies
    # whose padding is 0; the Triton kernels get the NaN-poisoned tensors and must not read them.
    clean = [torch.nan_to_num(x, nan=0.0) for x in (q, k, v)]
    ref_args = (*clean, cu_q, cu_k, mq, mk, scale, causal)
    with torch_mla.use_backend("triton"):
        out, lse = _no_sync(lambda: torch.ops.mla.dense_prefill(*args))
    with torch_mla.use_backend("reference"):
        ref_out, ref_lse = torch.ops.mla.dense_prefill(*ref_args)
    none = ref_lse.isinf()
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(lse.isinf(), none) and (out[none] == 0).all()
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse[~none], ref_lse[~none], atol=1e-3, rtol=1e-3)

    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse)
    bargs = (dout, dlse, q, k, v, ref_out, ref_lse, cu_q, cu_k, mq, mk, scale, causal)
    with torch_mla.use_backend("triton"):
        grads = _no_sync(lambda: torch.ops.mla.dense_prefill_backward(*bargs))
    with torch_mla.use_backend("reference"):
        ref_grads = torch.ops.mla.dense_prefill_backward(
            dout, dlse, *clean, ref_out, ref_lse, cu_q, cu_k, mq, mk, scale, causal)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert not g.isnan().any(), name
        assert (g[r.abs().amax((1, 2)) == 0] == 0).all(), name  # padding / unseen: exact 0
        err = ((g.float() - r.float()).norm() / r.float().norm().clamp_min(1e-12)).item()
        assert err < 2e-2, (name, err)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d_qk", [192, 128])
def test_prefill_production_heads(causal, d_qk):
    _prefill_both([512, 512], [512, 512], 128, 128, d_qk, 128, causal)


def test_prefill_varlen_corner_cases():
    # empty query / key sequences, s_k < s_q (causal: early queries see nothing), odd lengths
    _prefill_both([300, 0, 77, 129, 5], [100, 20, 0, 300, 5], 16, 4, 192, 128, True)


def test_prefill_long_sequence_fp16_gqa():
    _prefill_both([4096], [4096], 16, 2, 192, 128, True, dtype=torch.float16)


def test_prefill_autograd_through_public_function():
    q, k, v, cu_q, cu_k = _varlen([200, 311], [200, 311], 8, 8, 192, 128, pad=0)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    with torch_mla.use_backend("triton"):
        out, lse = torch_mla.dense_prefill(*leaves, cu_q, cu_k, 311, 311, causal=True)
        (out.float().square().sum() + lse.sum()).backward()
    ref_leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    with torch_mla.use_backend("reference"):
        rout, rlse = torch_mla.dense_prefill(*ref_leaves, cu_q, cu_k, 311, 311, causal=True)
        (rout.float().square().sum() + rlse.sum()).backward()
    for a, b in zip(leaves, ref_leaves):
        err = ((a.grad.float() - b.grad.float()).norm() / b.grad.float().norm()).item()
        assert err < 2e-2
