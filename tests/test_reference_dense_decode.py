"""Reference dense_decode against an independent float64 formula written here.

The formula walks each sequence's keys one position at a time through the block table (reading
the table on the host, which the test may do), so it shares no gather, mask or chunking logic
with the reference.
"""

import importlib
import math
import zlib

import pytest
import torch

import torch_mla
from oracles import dense_decode64, paged_dense_inputs

REF = importlib.import_module("torch_mla.reference.dense_decode")


formula = dense_decode64


def make_inputs(seqlens, s_q, h_q, h_kv, block_size, d_qk, d_v, dtype, gen, junk=-1,
                extra_blocks=2):
    return paged_dense_inputs(seqlens, s_q, h_q, h_kv, block_size, d_qk, dtype, gen, junk,
                              extra_blocks)


def check(q, k_cache, block_table, cache_seqlens, d_v, causal, atol, rtol, sm_scale=None):
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    out, lse = torch_mla.dense_decode(q, k_cache, block_table, cache_seqlens, d_v=d_v,
                                      sm_scale=scale, causal=causal)
    b, s_q, h_q, _ = q.shape
    assert out.shape == (b, s_q, h_q, d_v) and out.dtype == q.dtype
    assert lse.shape == (b, h_q, s_q)
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    ref_out, ref_lse = formula(q, k_cache, block_table, cache_seqlens, d_v, scale, causal)
    assert not out.isnan().any() and not lse.isnan().any()
    # +inf exactly where the formula has no key, and out exactly 0 there
    assert torch.equal(lse.isinf(), ref_lse.isinf())
    assert (out.double()[ref_lse.isinf().permute(0, 2, 1)] == 0).all()
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=atol, rtol=rtol)
    return out, lse


CASES = {
    # name: (seqlens, s_q, h_q, h_kv, block_size, block-table entry past the end)
    "mqa64_bs64": ([70, 1, 128], 1, 64, 1, 64, -1),
    "mqa128_bs61_mtp2": ([130, 5], 2, 128, 1, 61, 10**6),
    "bs2_mtp3_seq0": ([0, 7, 2], 3, 64, 1, 2, -1),
    "gqa2_bs61_mtp4": ([3, 64, 125], 4, 64, 2, 61, 10**6),
    "bs64_mtp4_short": ([2, 0, 66], 4, 128, 1, 64, -1),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", list(CASES))
def test_against_formula_fp32(case, causal):
    seqlens, s_q, h_q, h_kv, bs, junk = CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case}{causal}".encode()))
    args = make_inputs(seqlens, s_q, h_q, h_kv, bs, 576, 512, torch.float32, gen, junk=junk)
    check(*args, d_v=512, causal=causal, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    gen = torch.Generator().manual_seed(7)
    args = make_inputs([45, 3], 2, 64, 1, 64, 576, 512, dtype, gen)
    # inputs are exactly representable in f64, so only the output rounding (and fp32 math) differs
    out, lse = check(*args, d_v=512, causal=True, atol=1e-2, rtol=1e-2)
    assert out.dtype == dtype and lse.dtype == torch.float32


def test_float64_tight():
    gen = torch.Generator().manual_seed(3)
    args = make_inputs([9, 0, 4], 3, 8, 2, 2, 40, 24, torch.float64, gen)
    check(*args, d_v=24, causal=True, atol=1e-12, rtol=1e-12, sm_scale=0.37)


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_equals_unchunked(monkeypatch, causal):
    """A tiny budget forces one batch element at a time and several block chunks merged by the
    online softmax; the result must still match the formula."""
    gen = torch.Generator().manual_seed(11)
    args = make_inputs([50, 0, 17, 33], 3, 16, 2, 4, 64, 48, torch.float32, gen, junk=-1)
    monkeypatch.setattr(REF, "_BUDGET", 300)
    check(*args, d_v=48, causal=causal, atol=2e-5, rtol=2e-5)


def test_all_empty():
    gen = torch.Generator().manual_seed(5)
    q, k_cache, block_table, _ = make_inputs([0, 0], 2, 4, 1, 8, 32, 16, torch.float32, gen)
    seqlens = torch.zeros(2, dtype=torch.int32)
    out, lse = torch_mla.dense_decode(q, k_cache, block_table, seqlens, d_v=16, causal=True)
    assert (out == 0).all() and (lse == math.inf).all()


def test_schedule_is_ignored():
    gen = torch.Generator().manual_seed(9)
    q, k_cache, block_table, seqlens = make_inputs([20, 9], 1, 8, 1, 4, 32, 16, torch.float32,
                                                   gen)
    sched = torch_mla.decode_schedule(seqlens, num_parts=3, block_n=4)
    a = torch_mla.dense_decode(q, k_cache, block_table, seqlens, d_v=16, schedule=sched)
    b = torch_mla.dense_decode(q, k_cache, block_table, seqlens, d_v=16)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_strided_inputs():
    """q and k_cache contiguous only in their last dimension (the contract's requirement)."""
    gen = torch.Generator().manual_seed(13)
    q, k_cache, block_table, seqlens = make_inputs([10, 6], 2, 8, 2, 4, 32, 16, torch.float32,
                                                   gen)
    qs = torch.empty(2, 8, 2, 32).transpose(1, 2)  # [b, s_q, h_q, d] with s_q, h_q swapped
    qs.copy_(q)
    ks = torch.empty(*k_cache.shape[:3], 48)[..., 5:37]
    ks.copy_(k_cache)
    got = torch_mla.dense_decode(qs, ks, block_table, seqlens, d_v=16, causal=True)
    want = torch_mla.dense_decode(q, k_cache, block_table, seqlens, d_v=16, causal=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_reads_no_value_on_host():
    """On meta tensors any .item()/.tolist()/bool() of data would raise: the reference must
    compute from shapes and tensor ops only (no host sync on a GPU)."""
    q = torch.empty(2, 2, 8, 32, device="meta")
    k_cache = torch.empty(5, 4, 2, 32, device="meta")
    block_table = torch.empty(2, 3, dtype=torch.int32, device="meta")
    seqlens = torch.empty(2, dtype=torch.int32, device="meta")
    out, lse = REF.dense_decode(q, k_cache, block_table, seqlens, 16, 0.5, True)
    assert out.shape == (2, 2, 8, 16) and lse.shape == (2, 8, 2)
