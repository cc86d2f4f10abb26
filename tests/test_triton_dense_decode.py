"""Triton dense_decode (under TRITON_INTERPRET on CPU) against a float64 formula written here.

The formula walks each sequence's keys one at a time through the block table on the host, so it
shares nothing with the kernel's tiling, split-KV schedule or masks. Caches are NaN everywhere
a sequence does not own a slot, and block-table entries past a sequence are -1 or out of range.
"""


import pytest
import torch

import torch_mla
from oracles import dense_decode64, paged_dense_inputs
from torch_mla.triton import dense_decode as TD

pytestmark = pytest.mark.skipif(not TD.INTERPRET and not torch.cuda.is_available(),
                                reason="Triton kernels run on CUDA or under TRITON_INTERPRET")

DEV = "cuda" if torch.cuda.is_available() else "cpu"


formula = dense_decode64


def make(seqlens, s_q, h_q, h_kv, bs, d_qk, dtype=torch.bfloat16, junk=-1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, cache, table, lens = paged_dense_inputs(seqlens, s_q, h_q, h_kv, bs, d_qk, dtype, gen, junk)
    return q.to(DEV), cache.to(DEV), table.to(DEV), lens.to(DEV)


def run_check(q, cache, table, seqlens, d_v, causal, schedule=None, tol=2e-2):
    scale = q.shape[-1] ** -0.5
    with torch_mla.use_backend("triton"):
        out, lse = torch_mla.dense_decode(q, cache, table, seqlens, d_v=d_v, sm_scale=scale,
                                          causal=causal, schedule=schedule)
    b, s_q, h_q, _ = q.shape
    assert out.shape == (b, s_q, h_q, d_v) and out.dtype == q.dtype
    assert lse.shape == (b, h_q, s_q) and lse.dtype == torch.float32
    ref_out, ref_lse = formula(q, cache, table, seqlens, d_v, scale, causal)
    out, lse = out.double().cpu(), lse.double().cpu()
    assert not out.isnan().any() and not lse.isnan().any()
    none = ref_lse.isinf()
    assert torch.equal(lse.isinf(), none) and (lse[none] > 0).all()
    assert (out[none.permute(0, 2, 1)] == 0).all()
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse[~none], ref_lse[~none], atol=1e-4, rtol=1e-4)
    return out, lse


@pytest.mark.parametrize("bs", [2, 61, 64])
@pytest.mark.parametrize("s_q,causal", [(1, False), (2, True), (4, True), (3, False)])
def test_small_dims_block_sizes_mtp(bs, s_q, causal):
    # 0: empty sequence; 3 < s_q for causal: early MTP queries see nothing; 150: several blocks
    q, cache, table, lens = make([3, 0, 150, 64], s_q, 16, 1, bs, 48, seed=bs * 10 + s_q)
    run_check(q, cache, table, lens, 32, causal)


def test_gqa_and_out_of_range_junk():
    # h_kv 2: query heads 0-7 read kv head 0, 8-15 kv head 1; junk table entries 10**6
    q, cache, table, lens = make([37, 100], 2, 16, 2, 16, 40, junk=10 ** 6, seed=1)
    run_check(q, cache, table, lens, 32, True)


def test_deepseek_head_dims():
    # the production d_qk 576 = 512 + 64 RoPE and d_v 512, at small lengths
    q, cache, table, lens = make([70, 1, 0], 2, 16, 1, 64, 576, seed=2)
    run_check(q, cache, table, lens, 512, True)


def test_fp16_and_strided_q():
    q, cache, table, lens = make([90, 33], 1, 16, 1, 61, 64, dtype=torch.float16, seed=3)
    # a q view whose rows are not packed (only the last dim must be contiguous)
    wide = torch.randn(2, 1, 16, 80, device=DEV).to(torch.float16)
    wide[..., :64] = q
    run_check(wide[..., :64], cache, table, lens, 48, False)


@pytest.mark.parametrize("num_parts", [1, 3, 7, 40])
def test_explicit_schedules(num_parts):
    # few parts: several batch elements per part; many parts: several splits per batch element
    # (a 300-key sequence is 5 schedule blocks) and empty parts
    q, cache, table, lens = make([300, 0, 65, 129], 2, 16, 1, 61, 48, seed=4 + num_parts)
    sched = torch_mla.decode_schedule(lens, num_parts=num_parts)
    if num_parts == 40:
        assert int(sched.num_splits[1]) > 1  # the kernel's combine path is exercised
        assert (sched.metadata[:, 0] == len(lens)).any()  # and empty parts
    run_check(q, cache, table, lens, 32, True, schedule=sched)


def test_schedule_reuse_across_calls():
    # one schedule, two "layers" with different q and caches of the same lengths
    lens_list = [130, 17]
    sched = None
    for seed in (5, 6):
        q, cache, table, lens = make(lens_list, 1, 16, 1, 64, 48, seed=seed)
        sched = sched or torch_mla.decode_schedule(lens, num_parts=5)
        run_check(q, cache, table, lens, 32, False, schedule=sched)


def test_no_keys_anywhere():
    q, cache, table, lens = make([0, 0], 2, 16, 1, 64, 48, seed=7)
    out, lse = run_check(q, cache, table, lens, 32, True)
    assert (out == 0).all() and lse.isinf().all()


def test_seqlen_beyond_table_reads_no_slot_past_it():
    # cache_seqlens larger than the table holds: keys exist only in the table's slots, as in
    # the reference; nothing past the table row is read (no fault, no garbage)
    q, cache, table, lens = make([32], 1, 16, 1, 16, 48, seed=8)
    table = table[:, :2].contiguous()  # 32 slots, all holding keys
    lens = torch.tensor([40], dtype=torch.int32, device=DEV)
    with torch_mla.use_backend("triton"):
        out, lse = torch_mla.dense_decode(q, cache, table, lens, d_v=32)
    with torch_mla.use_backend("reference"):
        ref_out, ref_lse = torch_mla.dense_decode(q, cache, table, lens, d_v=32)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def test_supports_says_why_not():
    q, cache, table, lens = make([5], 1, 16, 1, 64, 48, seed=9)
    reasons = TD.supports(q.float(), cache.float(), table, lens, 32)
    assert any("float32" in r for r in reasons)
    assert TD.supports(q, cache, table, lens, 32) == []
    text = torch_mla.explain("dense_decode", q.float(), cache.float(), table, lens, d_v=32)
    assert "float32" in text or "reference" in text
