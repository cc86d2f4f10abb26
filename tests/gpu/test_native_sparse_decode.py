"""Native (SM90) sparse_decode against the reference backend on an H100/H200.

Production shapes (V32 b=64 s_q=2 h_q=128 topk=2048; MODEL1 with extra keys), with the
reference computed on a subset of the batch (batch elements are independent) and every element
of the full outputs checked for the no-key pattern; corner cases (all indices invalid, zero
topk_length, +-inf sinks, NaN bytes in every unused slot, block sizes 2/61/64/576, topk not a
multiple of 64, h_q not a multiple of 64, odd d_v); caller schedules (the library's own
device-side schedule must equal torch_mla.decode_schedule bit for bit); CUDA-graph capture and
replay with new inputs. Outputs are allocated by the impl, so the caching allocator is filled
with NaN before each call: an element the kernels forget to write shows up as NaN.

Inputs are fresh random numbers on every run (the seed is in each failure message; set
TORCH_MLA_TEST_SEED to replay one).
"""

import math
import os
import random

import pytest
import torch

import torch_mla
from torch_mla.meta.layouts import LAYOUT_BY_D, block_view

from oracles import poison_cuda_allocator

DEV = "cuda"
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
    reason="needs an SM90 (Hopper) GPU")

SEED = int(os.environ.get("TORCH_MLA_TEST_SEED", random.randrange(2 ** 31)))


@pytest.fixture(scope="module", autouse=True)
def native_library():
    import torch_mla.native as native

    lib = native.library()  # loads $TORCH_MLA_NATIVE_LIB or the cache, or builds (nvcc)
    if lib is None:
        pytest.fail(f"the native library is not available on this Hopper machine: "
                    f"{native.reason()}")
    return lib


# Every test runs on both kernels (the serial mma.sync one and the warp-specialized wgmma one,
# csrc/sm90/sparse_decode/), the wgmma one also without its crossover (clusters of two CTAs
# sharing each tile at h_q 128, 256, ...: probe bit 32 turns it off and leaves results exact):
# the library reads TORCH_MLA_NATIVE_DECODE_WGMMA and _PROBE at every call.
_PROBES = {"wgmma": None, "wgmma-nocross": "32"}


@pytest.fixture(params=["serial", *_PROBES], autouse=True)
def kernel_variant(request, monkeypatch):
    # the wgmma kernel is the default: the variable unset must select it
    monkeypatch.delenv("TORCH_MLA_NATIVE_DECODE_PROBE", raising=False)
    if request.param.startswith("wgmma"):
        monkeypatch.delenv("TORCH_MLA_NATIVE_DECODE_WGMMA", raising=False)
        if _PROBES[request.param] is not None:
            monkeypatch.setenv("TORCH_MLA_NATIVE_DECODE_PROBE", _PROBES[request.param])
    else:
        monkeypatch.setenv("TORCH_MLA_NATIVE_DECODE_WGMMA", "0")
    return request.param


def _poison_allocator():
    poison_cuda_allocator(384)


def _idx(g, b, s_q, k, n_slots, lo=0, invalid_frac=0.1):
    idx = torch.randint(lo, max(n_slots, lo + 1), (b, s_q, k), device=DEV, generator=g,
                        dtype=torch.int32)
    bad = torch.rand((b, s_q, k), device=DEV, generator=g) < invalid_frac
    junk = torch.where(torch.rand((b, s_q, k), device=DEV, generator=g) < 0.5,
                       torch.full_like(idx, -1), torch.full_like(idx, n_slots + 7))
    return torch.where(bad, junk, idx)


def make(d, b, s_q, h_q, topk, etopk=0, *, bs=64, ebs=64, lens=True, sink=True, seed=0,
         invalid_frac=0.1, tokens_per_b=2048, etokens_per_b=512):
    g = torch.Generator(device=DEV).manual_seed(SEED + seed)
    lay = LAYOUT_BY_D[d]
    nb = max(1, b * tokens_per_b // bs)
    kv = (torch.randn(nb, bs, 1, d, device=DEV, generator=g) * 0.5).to(torch.bfloat16)
    cache = torch_mla.quantize_kv_cache(kv, lay.name)
    q = torch.randn(b, s_q, h_q, d, device=DEV, generator=g).to(torch.bfloat16)
    kw = {"indices": _idx(g, b, s_q, topk, nb * bs, invalid_frac=invalid_frac)}
    if lens:
        kw["topk_length"] = torch.randint(0, topk + 1, (b,), device=DEV, generator=g,
                                          dtype=torch.int32)
        kw["topk_length"][0] = topk
    if etopk:
        enb = max(1, b * etokens_per_b // ebs)
        ekv = (torch.randn(enb, ebs, 1, d, device=DEV, generator=g) * 0.5).to(torch.bfloat16)
        kw["extra_k_cache"] = torch_mla.quantize_kv_cache(ekv, lay.name)
        kw["extra_indices"] = _idx(g, b, s_q, etopk, enb * ebs, invalid_frac=invalid_frac)
        if lens:
            kw["extra_topk_length"] = torch.randint(0, etopk + 1, (b,), device=DEV, generator=g,
                                                    dtype=torch.int32)
    if sink:
        kw["attn_sink"] = torch.randn(h_q, device=DEV, generator=g)
        kw["attn_sink"][0::5] = math.inf
        kw["attn_sink"][1::5] = -math.inf
    return q, cache, kw


def has_key(cache, kw):
    """[b, s_q] bool: some index of the row is valid (independent of the code under test)."""
    def one(c, idx, length):
        ok = (idx >= 0) & (idx < c.shape[0] * c.shape[1])
        if length is not None:
            pos = torch.arange(idx.shape[-1], device=DEV)
            ok &= pos.view(1, 1, -1) < length.view(-1, 1, 1)
        return ok.any(-1)

    h = one(cache, kw["indices"], kw.get("topk_length"))
    if "extra_k_cache" in kw:
        h |= one(kw["extra_k_cache"], kw["extra_indices"], kw.get("extra_topk_length"))
    return h


def run_native(q, cache, kw, schedule=None, d_v=512):
    _poison_allocator()
    with torch_mla.use_backend("native"):
        out, lse = torch_mla.sparse_decode(q, cache, schedule=schedule, d_v=d_v, **kw)
    torch.cuda.synchronize()
    return out, lse


def reference(q, cache, kw, sel=None, d_v=512):
    if sel is not None:
        per_b = ("indices", "topk_length", "extra_indices", "extra_topk_length")
        kw = {k: (v[sel] if k in per_b else v) for k, v in kw.items()}
        q = q[sel]
    with torch_mla.use_backend("reference"):
        return torch_mla.sparse_decode(q, cache, d_v=d_v, **kw)


def check(out, lse, q, cache, kw, sel=None, d_v=512, ref=None):
    msg = f"seed {SEED}"
    b, s_q, h_q, _ = q.shape
    assert out.shape == (b, s_q, h_q, d_v) and lse.shape == (b, h_q, s_q)
    assert not torch.isnan(out).any(), msg
    assert not torch.isnan(lse).any(), msg
    # every element: rows without a valid key are exactly out 0, lse +inf, the others finite
    lonely = ~has_key(cache, kw)  # [b, s_q]
    assert torch.equal(torch.isinf(lse), lonely.unsqueeze(1).expand(b, h_q, s_q)), msg
    assert bool((lse[torch.isinf(lse)] > 0).all()), msg
    assert bool((out[lonely] == 0).all()), msg
    # values against the reference (on `sel` batch elements)
    ro, rl = ref if ref is not None else reference(q, cache, kw, sel, d_v)
    o = (out if sel is None else out[sel]).float()
    lo = lse if sel is None else lse[sel]
    r = ro.float()
    rn = r.norm()
    if rn > 0:
        err = ((o - r).norm() / rn).item()
        assert err < 1e-2, f"relative error {err} ({msg})"
    torch.testing.assert_close(o, r, atol=3e-2, rtol=3e-2, msg=lambda m: f"{m} ({msg})")
    fin = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(lo), fin), msg
    torch.testing.assert_close(lo[fin], rl[fin], atol=1e-3, rtol=1e-4,
                               msg=lambda m: f"{m} ({msg})")


def _subset(b, n=8):
    g = torch.Generator().manual_seed(SEED)
    rest = torch.randperm(b - 2, generator=g)[: n - 2] + 1
    return torch.cat([torch.tensor([0, b - 1]), rest]).sort().values.to(DEV)


# ---------------------------------------------------------------------------------------------
# production shapes
# ---------------------------------------------------------------------------------------------

def test_native_is_chosen():
    import torch_mla.native as native

    q, cache, kw = make(576, 2, 1, 128, 128)
    idx = kw.pop("indices")
    text = torch_mla.explain("sparse_decode", q, cache, idx, **kw)
    if "sparse_decode" in native.GPU_VERIFIED:
        assert text.splitlines()[0].endswith("native"), text
    else:  # chosen only when forced until this suite has passed on a GPU
        assert "skipped native: the native sparse_decode kernel has not passed" in text, text
    with torch_mla.use_backend("native"):
        text = torch_mla.explain("sparse_decode", q, cache, idx, **kw)
    assert text.splitlines()[0].startswith("mla::sparse_decode on cuda") and \
        "native (forced" in text.splitlines()[0], text


@pytest.mark.parametrize("lens,sink", [(True, True), (False, False)])
def test_v32_production(lens, sink):
    q, cache, kw = make(576, 64, 2, 128, 2048, lens=lens, sink=sink)
    out, lse = run_native(q, cache, kw)
    check(out, lse, q, cache, kw, sel=_subset(64))


@pytest.mark.parametrize("h_q,topk,etopk", [(64, 512, 128), (128, 1024, 128)])
def test_model1_production_with_extra(h_q, topk, etopk):
    q, cache, kw = make(512, 64, 2, h_q, topk, etopk, ebs=64)
    out, lse = run_native(q, cache, kw)
    check(out, lse, q, cache, kw, sel=_subset(64))


# ---------------------------------------------------------------------------------------------
# corner cases
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [576, 512])
@pytest.mark.parametrize("bs", [2, 61, 64, 576])
def test_block_sizes(d, bs):
    etopk = 70 if d == 512 else 0
    q, cache, kw = make(d, 3, 2, 64, 200, etopk, bs=bs, ebs=61 if bs != 61 else 2,
                        tokens_per_b=600, etokens_per_b=130)
    out, lse = run_native(q, cache, kw)
    check(out, lse, q, cache, kw)


@pytest.mark.parametrize("d", [576, 512])
def test_all_invalid_and_zero_lengths(d):
    etopk = 64 if d == 512 else 0
    q, cache, kw = make(d, 4, 2, 64, 128, etopk, tokens_per_b=256)
    # batch 0: every index invalid; batch 1: zero lengths; batch 2: valid; batch 3: lengths 0,
    # but valid indices (still no key)
    kw["indices"][0] = -1
    kw["topk_length"][1] = 0
    kw["topk_length"][2] = 128
    kw["topk_length"][3] = 0
    if etopk:
        kw["extra_indices"][0] = 10 ** 9
        kw["extra_topk_length"][1] = 0
        kw["extra_topk_length"][3] = 0
    out, lse = run_native(q, cache, kw)
    check(out, lse, q, cache, kw)
    assert torch.isinf(lse[[0, 1, 3]]).all() and (out[[0, 1, 3]] == 0).all()
    # everything invalid, every batch element
    kw["indices"].fill_(-1)
    if etopk:
        kw["extra_indices"].fill_(-5)
    out, lse = run_native(q, cache, kw)
    assert (out == 0).all() and torch.isinf(lse).all() and (lse > 0).all()
    # topk = 0
    kw2 = {"indices": kw["indices"][..., :0]}
    out, lse = run_native(q, cache, kw2)
    assert (out == 0).all() and torch.isinf(lse).all() and (lse > 0).all()


@pytest.mark.parametrize("d", [576, 512])
def test_nan_in_unused_slots(d):
    """Every byte of every slot that no valid index names is 0xFF (NaN in e4m3, f32 and bf16):
    indices past topk_length, negative or out of range point there or nowhere."""
    lay = LAYOUT_BY_D[d]
    g = torch.Generator(device=DEV).manual_seed(SEED)
    b, s_q, h_q, topk, bs, nb = 4, 2, 64, 192, 16, 64
    half = nb // 2
    kv = (torch.randn(nb, bs, 1, d, device=DEV, generator=g) * 0.5).to(torch.bfloat16)
    cache = torch_mla.quantize_kv_cache(kv, lay.name)
    block_view(cache, lay)[half:].fill_(255)  # the second half of the blocks is garbage
    q = torch.randn(b, s_q, h_q, d, device=DEV, generator=g).to(torch.bfloat16)
    lens = torch.tensor([192, 100, 1, 0], device=DEV, dtype=torch.int32)
    idx = torch.randint(half * bs, nb * bs, (b, s_q, topk), device=DEV, generator=g,
                        dtype=torch.int32)  # garbage slots, in range
    good = _idx(g, b, s_q, topk, half * bs, invalid_frac=0.2)  # clean slots, -1, or >= half
    good = torch.where(good >= half * bs, torch.full_like(good, nb * bs), good)  # out of range
    pos = torch.arange(topk, device=DEV).view(1, 1, -1)
    idx = torch.where(pos < lens.view(-1, 1, 1), good, idx)
    kw = {"indices": idx, "topk_length": lens,
          "attn_sink": torch.randn(h_q, device=DEV, generator=g)}
    if d == 512:
        ekv = (torch.randn(8, 61, 1, d, device=DEV, generator=g) * 0.5).to(torch.bfloat16)
        ecache = torch_mla.quantize_kv_cache(ekv, lay.name)
        block_view(ecache, lay)[4:].fill_(255)
        elens = torch.tensor([0, 50, 64, 7], device=DEV, dtype=torch.int32)
        eidx = torch.randint(4 * 61, 8 * 61, (b, s_q, 64), device=DEV, generator=g,
                             dtype=torch.int32)
        egood = torch.randint(0, 4 * 61, (b, s_q, 64), device=DEV, generator=g,
                              dtype=torch.int32)
        epos = torch.arange(64, device=DEV).view(1, 1, -1)
        kw.update(extra_k_cache=ecache, extra_topk_length=elens,
                  extra_indices=torch.where(epos < elens.view(-1, 1, 1), egood, eidx))
    out, lse = run_native(q, cache, kw)
    check(out, lse, q, cache, kw)


def test_sinks_pm_inf():
    q, cache, kw = make(576, 3, 1, 64, 256, tokens_per_b=512)
    kw["attn_sink"] = torch.full((64,), math.inf, device=DEV)
    out, lse = run_native(q, cache, kw)
    check(out, lse, q, cache, kw)
    assert (out == 0).all()
    kw["attn_sink"].fill_(-math.inf)
    out_m, lse_m = run_native(q, cache, kw)
    kw.pop("attn_sink")
    out_n, lse_n = run_native(q, cache, kw)
    assert torch.equal(out_m, out_n) and torch.equal(lse_m, lse_n)


@pytest.mark.parametrize("h_q,s_q,d_v,d", [(16, 1, 511, 512), (96, 3, 256, 576),
                                           (128, 1, 448, 512), (64, 2, 1, 576)])
def test_odd_shapes(h_q, s_q, d_v, d):
    etopk = 100 if d == 512 else 0
    q, cache, kw = make(d, 5, s_q, h_q, 300, etopk, tokens_per_b=700)
    out, lse = run_native(q, cache, kw, d_v=d_v)
    check(out, lse, q, cache, kw, d_v=d_v)


def test_strided_q_uint8_cache_duplicates():
    q, cache, kw = make(576, 4, 2, 64, 256, tokens_per_b=300)
    big = torch.zeros(4, 2, 64, 640, device=DEV, dtype=torch.bfloat16)
    big[..., :576] = q
    qs = big[..., :576]  # row stride 640 elements
    kw["indices"][:, :, 128:] = kw["indices"][:, :, :128]  # each index twice
    cache_u8 = cache.view(torch.uint8)
    out, lse = run_native(qs, cache_u8, kw)
    check(out, lse, q, cache, kw)


# ---------------------------------------------------------------------------------------------
# schedules and graphs
# ---------------------------------------------------------------------------------------------

def _rounded_counts(kw, topk, etopk):
    n = (kw["topk_length"].clamp(0, topk) + 63) // 64 * 64
    if etopk:
        n = n + (kw["extra_topk_length"].clamp(0, etopk) + 63) // 64 * 64
    return n.to(torch.int32)


@pytest.mark.parametrize("d,etopk", [(576, 0), (512, 128)])
def test_library_schedule_matches_decode_schedule(d, etopk):
    from torch_mla._device import decode_parts

    b, s_q, h_q, topk = 16, 2, 128, 1024
    q, cache, kw = make(d, b, s_q, h_q, topk, etopk, tokens_per_b=1024)
    sched = torch_mla.decode_schedule(_rounded_counts(kw, topk, etopk),
                                      num_parts=decode_parts(q.device, h_q, s_q))
    out1, lse1 = run_native(q, cache, kw)
    out2, lse2 = run_native(q, cache, kw, schedule=sched)
    # same parts -> same splits -> the same arithmetic, bit for bit
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2), f"seed {SEED}"
    check(out1, lse1, q, cache, kw)


@pytest.mark.parametrize("h_q", [64, 128])
@pytest.mark.parametrize("num_parts,block_n", [(1, 64), (7, 64), (132, 64), (600, 64), (7, 32),
                                               (50, 128)])
def test_caller_schedules(num_parts, block_n, h_q):
    # (the wgmma kernel walks s_q x num_parts jobs with at most one wave of CTAs: 600 parts are
    # many jobs a CTA, 1 part leaves most of the grid without a job)
    b, topk, etopk = 6, 512, 128
    q, cache, kw = make(512, b, 2, h_q, topk, etopk, tokens_per_b=600)
    # what torch_mla.compat passes: the unrounded sum of both lengths
    seq = (kw["topk_length"] + kw["extra_topk_length"]).to(torch.int32)
    sched = torch_mla.decode_schedule(seq, num_parts=num_parts, block_n=block_n)
    out, lse = run_native(q, cache, kw, schedule=sched)
    ref = reference(q, cache, kw)
    check(out, lse, q, cache, kw, ref=ref)
    sched = torch_mla.decode_schedule(_rounded_counts(kw, topk, etopk), num_parts=num_parts,
                                      block_n=block_n)
    out, lse = run_native(q, cache, kw, schedule=sched)
    check(out, lse, q, cache, kw, ref=ref)


def test_many_splits_small_batch():
    # b=2 over a whole GPU: every batch element is split across tens of parts (combine path)
    q, cache, kw = make(576, 2, 1, 64, 2048, lens=False)
    out, lse = run_native(q, cache, kw)
    check(out, lse, q, cache, kw)


@pytest.mark.parametrize("with_schedule", [False, True])
def test_cuda_graph_capture(with_schedule):
    b, s_q, h_q, topk, etopk = 8, 2, 128, 512, 64
    q, cache, kw = make(512, b, s_q, h_q, topk, etopk, tokens_per_b=600)
    schedule = None
    if with_schedule:
        schedule = torch_mla.decode_schedule(_rounded_counts(kw, topk, etopk), num_parts=40)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch_mla.use_backend("native"):
        for _ in range(2):  # warm up (one-time kernel attribute setup) outside the capture
            torch_mla.sparse_decode(q, cache, schedule=schedule, **kw)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch_mla.use_backend("native"):
        out, lse = torch_mla.sparse_decode(q, cache, schedule=schedule, **kw)
    # new inputs in the captured buffers (same cache sizes, so the new indices fit), then replay
    q2, _, kw2 = make(512, b, s_q, h_q, topk, etopk, tokens_per_b=600, seed=1)
    q.copy_(q2)
    for k in ("indices", "extra_indices", "attn_sink"):
        kw[k].copy_(kw2[k])
    if not with_schedule:  # the graph computes its own schedule from the new lengths
        kw["topk_length"].copy_(kw2["topk_length"])
        kw["extra_topk_length"].copy_(kw2["extra_topk_length"])
    _poison_allocator()
    graph.replay()
    torch.cuda.synchronize()
    check(out, lse, q, cache, kw)
