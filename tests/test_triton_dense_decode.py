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
def test_small_dims_block_sizes_mtp(bs, s_q, causal, monkeypatch):
    # 0: empty sequence; 3 < s_q for causal: early MTP queries see nothing; 150: several blocks.
    # Block size 64 runs the gather kernel here (VARIANT None); the paged kernel's own tests are
    # below.
    monkeypatch.setattr(TD, "VARIANT", None)
    q, cache, table, lens = make([3, 0, 150, 64], s_q, 16, 1, bs, 48, seed=bs * 10 + s_q)
    run_check(q, cache, table, lens, 32, causal)


def test_gqa_and_out_of_range_junk():
    # h_kv 2: query heads 0-7 read kv head 0, 8-15 kv head 1; junk table entries 10**6
    q, cache, table, lens = make([37, 100], 2, 16, 2, 16, 40, junk=10 ** 6, seed=1)
    run_check(q, cache, table, lens, 32, True)


@pytest.mark.parametrize("variant", ["default", "gather"])
def test_deepseek_head_dims(variant, monkeypatch):
    # the production d_qk 576 = 512 + 64 RoPE and d_v 512, at small lengths; block size 64:
    # the default runs the paged kernel, VARIANT None the gather kernel
    if variant == "gather":
        monkeypatch.setattr(TD, "VARIANT", None)
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


# ---------------------------------------------------------------------------------------------
# The paged kernel (TD.VARIANT, the default): every knob, with small tiles so that the
# interpreter sees many of them. Its tile split needs block_size % block_n == 0 (other block
# sizes run the gather kernel); TMA copies need d_v and d_qk - d_v powers of two (48 / 32: a
# 16-column tail). L2 prefetch (GPU only: PTX) never runs here; tools/triton_compile_check.py
# compiles it.
# ---------------------------------------------------------------------------------------------

PAGED = {
    "defaults": dict(block_n=16),  # value blocks 2, deferred sums, TMA, split scores
    "vblocks1": dict(block_n=16, vblocks=1, defer_sum=False),
    "vblocks1_defer_sum": dict(block_n=16, vblocks=1),
    "pointers+prefetch_knob": dict(block_n=16, tma=False, prefetch=3),
    "chained_scores": dict(block_n=16, split_s=False, vblocks=1, defer_sum=False),
    "vblocks2_chained_pointers": dict(block_n=16, split_s=False, tma=False),
    "dv_split2_h128": dict(block_n=16, block_h=128, dv_split=2, split_s=False),
    "dv_split2_tma": dict(block_n=16, block_h=32, dv_split=2),
    "part_group2": dict(block_n=16, part_group=2),  # two schedule parts per program
}


class _Spy:
    """Wraps a kernel: records the constexpr keywords of each launch."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(dict(kwargs, grid=grid))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture(params=sorted(PAGED))
def paged(request, monkeypatch):
    monkeypatch.setattr(TD, "VARIANT", PAGED[request.param])
    spy = _Spy(TD._decode_paged_kernel)
    monkeypatch.setattr(TD, "_decode_paged_kernel", spy)
    return PAGED[request.param], spy


@pytest.mark.parametrize("s_q,causal", [(1, False), (2, True), (3, True), (4, False)])
def test_paged_variants(paged, s_q, causal):
    cfg, spy = paged
    # 0: empty; 3 < s_q: early MTP queries see nothing; 16: exactly one tile; 90, 150: full
    # tiles, a partial last tile and (causal) the masked fast tiles at the end
    q, cache, table, lens = make([3, 0, 150, 16, 90], s_q, 16, 1, 16, 48, seed=20 + s_q)
    run_check(q, cache, table, lens, 32, causal)
    assert spy.calls, "the paged kernel did not run"
    kw = spy.calls[-1]
    assert kw["USE_TMA"] == cfg.get("tma", True)
    assert kw["DV_SPLIT"] == cfg.get("dv_split", 1) and kw["BLOCK_N"] == 16
    assert kw["VBLOCKS"] == max(cfg.get("vblocks", 2), cfg.get("dv_split", 1))
    assert kw["DEFER_SUM"] == cfg.get("defer_sum", True)
    assert kw["SPLIT_S"] == cfg.get("split_s", True)
    assert kw["PREFETCH"] == 0  # never under the interpreter (no PTX to run)
    assert kw["PART_GROUP"] == cfg.get("part_group", 1)
    # programs of a part next to each other on axis 0: kv heads x row blocks x value halves
    rows = 16 * s_q
    assert kw["grid"][0] == -(-rows // kw["BLOCK_H"]) * cfg.get("dv_split", 1)


@pytest.mark.parametrize("num_parts,block_n", [(3, 64), (11, 8), (40, 24)])
def test_paged_unaligned_schedules(paged, num_parts, block_n):
    # schedule blocks of 8 or 24 keys: parts begin and end inside 16-key tiles (the edge loop's
    # head tile); many parts: several splits per sequence, empty parts, the combine pass
    q, cache, table, lens = make([300, 0, 65, 129, 17], 2, 16, 1, 64, 48, seed=30 + num_parts)
    sched = torch_mla.decode_schedule(lens, num_parts=num_parts, block_n=block_n)
    run_check(q, cache, table, lens, 32, True, schedule=sched)
    assert spy_ran(paged)


def spy_ran(paged):
    return bool(paged[1].calls)


def test_paged_gqa_fp16_odd_dv_and_fallback(paged):
    cfg, spy = paged
    # h_kv 2 through the TMA view's column offset (kv head h at column h * stride(2))
    q, cache, table, lens = make([37, 100, 64], 2, 16, 2, 16, 48, junk=10 ** 6, seed=41)
    run_check(q, cache, table, lens, 32, True)
    assert spy.calls[-1]["USE_TMA"] == cfg.get("tma", True)
    # fp16, d_v 40 (not a power of two: pointer copies, masked columns), s_q 1
    q, cache, table, lens = make([90, 33, 200], 1, 16, 1, 64, 64, dtype=torch.float16, seed=42)
    run_check(q, cache, table, lens, 40, False)
    assert spy.calls[-1]["USE_TMA"] is False
    # a block size that 16-key tiles do not divide: the gather kernel runs instead
    n = len(spy.calls)
    q, cache, table, lens = make([50, 7], 2, 16, 1, 61, 48, seed=43)
    run_check(q, cache, table, lens, 32, True)
    assert len(spy.calls) == n


def test_paged_deepseek_dims(paged):
    # d_qk 576 = 512 + 64, d_v 512: the production tiles' shapes (64-key tiles here)
    cfg, spy = paged
    q, cache, table, lens = make([70, 1, 0, 130], 2, 16, 1, 64, 576, seed=44)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TD, "VARIANT", dict(cfg, block_n=64))
        run_check(q, cache, table, lens, 512, True)
    assert spy.calls[-1]["USE_TMA"] == cfg.get("tma", True)


def test_variant_from_environment():
    import subprocess
    import sys
    code = ("import torch_mla.triton.dense_decode as TD; print(TD.VARIANT)")
    env = dict(__import__("os").environ, TORCH_MLA_DENSE_DECODE_VARIANT='{"vblocks": 1}')
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "{'vblocks': 1}", out.stderr[-2000:]
    env["TORCH_MLA_DENSE_DECODE_VARIANT"] = "gather"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "None", out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Grouped parts (part_group): a program takes several consecutive schedule parts as one run of
# keys. An element all of whose splits fall in one group is written straight to out (its first
# workspace slot's lse set to +inf for the combine to skip it); one spread over several groups
# gets one partial per group (the group's other slots: lse -inf, o never written).
# ---------------------------------------------------------------------------------------------


def _group_cover(sched, group):
    """(elements with several splits all in one group, elements spread over several groups
    with at least two splits in one): the two cases the grouped kernel handles specially."""
    meta, ns = sched.metadata.tolist(), sched.num_splits.tolist()
    b, per = len(ns) - 1, {}
    for p, row in enumerate(meta):
        for e in range(row[0], row[2] + 1) if row[0] < b else ():
            if ns[e + 1] > ns[e]:
                groups = per.setdefault(e, {})
                groups[p // group] = groups.get(p // group, 0) + 1
    whole = sum(len(g) == 1 and ns[e + 1] - ns[e] > 1 for e, g in per.items())
    spread = sum(len(g) > 1 and max(g.values()) > 1 for e, g in per.items())
    return whole, spread


class _NaNEmpty:
    """Stands in for the torch module inside dense_decode: floating tensors from torch.empty
    (out, lse, the split workspace) start as NaN, so a slot read before it is written shows."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t


@pytest.mark.parametrize("group,s_q,causal,num_parts,block_n,bs", [
    (2, 1, False, 11, 16, 16),
    (2, 2, True, 40, 8, 64),
    (3, 3, True, 11, 24, 16),
    (3, 4, True, 16, 16, 32),
    (0, 2, True, 40, 16, 16),  # auto: ceil(40 parts x 1 program / 8 CPU "SMs") = 5
])
def test_paged_part_groups(group, s_q, causal, num_parts, block_n, bs, monkeypatch):
    monkeypatch.setattr(TD, "VARIANT", dict(block_n=16, part_group=group))
    monkeypatch.setattr(TD, "torch", _NaNEmpty())
    spy = _Spy(TD._decode_paged_kernel)
    monkeypatch.setattr(TD, "_decode_paged_kernel", spy)
    # 0: no keys; 1 (< s_q): early MTP queries see nothing; 300: many splits
    q, cache, table, lens = make([300, 0, 65, 129, 1, 17], s_q, 16, 1, bs, 48,
                                 seed=50 + s_q + num_parts)
    sched = torch_mla.decode_schedule(lens, num_parts=num_parts, block_n=block_n)
    run_check(q, cache, table, lens, 32, causal, schedule=sched)
    kw = spy.calls[-1]
    want = group or 5
    assert kw["PART_GROUP"] == want and kw["grid"][1] == -(-num_parts // want)
    if group:
        whole, spread = _group_cover(sched, group)
        assert whole >= 1 and spread >= 1, (whole, spread)
