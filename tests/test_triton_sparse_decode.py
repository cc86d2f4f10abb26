"""Triton sparse_decode (under TRITON_INTERPRET=1 on the CPU) against an independent float64
formula written here, and against the reference backend.

The formula dequantizes the whole cache once (``torch_mla.dequantize_kv_cache``, tested in
test_reference_kv_cache.py), lists each query row's valid keys on the host (index range,
topk_length, both sets), and runs a plain float64 softmax. Unused cache slots hold 0x7F bytes
(e4m3 NaN, NaN f32 scales) and invalid index entries often point at them; caches are padded
between blocks (stride(0) larger than the block) with NaN bytes too.
"""

import importlib
import math

import pytest
import torch

import torch_mla
from torch_mla.meta.layouts import LAYOUT_BY_D, block_view

triton = pytest.importorskip("triton")
TSD = importlib.import_module("torch_mla.triton.sparse_decode")
INTERPRET = importlib.import_module("torch_mla.triton._common").INTERPRET
NAN_BYTE = 0x7F

# CPU tensors: Triton runs them only under the interpreter (tests/conftest.py sets it without CUDA)
pytestmark = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (no CUDA)")


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

class KeySet:
    """A quantized cache, padded between blocks, whose unused slots hold NaN bytes.

    ``deq`` is the float64 dequantized cache taken before poisoning; ``used`` the slots that
    index generators may make valid."""

    def __init__(self, lay, nb, bs, gen, pad_tokens=1):
        self.lay, self.nb, self.bs, self.num_slots = lay, nb, bs, nb * bs
        kv = (torch.randn(nb, bs, 1, lay.d, generator=gen) * 0.7).to(torch.bfloat16)
        dense = torch_mla.quantize_kv_cache(kv, lay.name)
        self.deq = torch_mla.dequantize_kv_cache(dense, lay.name).view(-1, lay.d).double()
        # a cache whose blocks sit further apart than needed (NaN bytes in the gap)
        row = lay.block_bytes(bs) + pad_tokens * (656 if lay.name == "v32" else 576)
        store = torch.full((nb, row), NAN_BYTE, dtype=torch.uint8)
        store[:, : bs * lay.bytes_per_token] = block_view(dense, lay)
        cache = store[:, : bs * lay.bytes_per_token].view(nb, bs, 1, lay.bytes_per_token)
        self.cache = cache.view(torch.float8_e4m3fn)
        assert nb == 1 or self.cache.stride(0) > bs * lay.bytes_per_token
        perm = torch.randperm(self.num_slots, generator=gen)
        n_used = max(1, self.num_slots // 2)
        self.used = perm[:n_used]
        self.unused = perm[n_used:]
        rows = block_view(self.cache, lay)
        for s in self.unused.tolist():
            blk, off = divmod(s, bs)
            if lay.name == "v32":
                rows[blk, off * 656:(off + 1) * 656] = NAN_BYTE
            else:
                rows[blk, off * 576:(off + 1) * 576] = NAN_BYTE
                rows[blk, bs * 576 + off * 8: bs * 576 + off * 8 + 8] = NAN_BYTE

    def indices(self, b, s_q, topk, lengths, gen, invalid_frac=0.25):
        """[b, s_q, topk] int32: below the length mostly used slots (with duplicates) and some
        out-of-range junk; at and past it anything, poisoned slots included."""
        shape = (b, s_q, topk)
        junk = torch.tensor([-1, -2, -(2 ** 31), self.num_slots, self.num_slots + 5, 2 ** 31 - 1],
                            dtype=torch.int64)
        pick_used = self.used[torch.randint(len(self.used), shape, generator=gen)]
        pick_junk = junk[torch.randint(len(junk), shape, generator=gen)]
        pick_any = torch.randint(0, self.num_slots, shape, generator=gen)
        if len(self.unused):
            pick_any = torch.where(torch.rand(shape, generator=gen) < 0.5,
                                   self.unused[torch.randint(len(self.unused), shape,
                                                             generator=gen)], pick_any)
        r = torch.rand(shape, generator=gen)
        idx = torch.where(r < invalid_frac, pick_junk, pick_used)
        dup = (r > 1 - 0.15) & (torch.arange(topk) > 0)
        idx = torch.where(dup, torch.roll(idx, 1, dims=2), idx)  # duplicates of a neighbour
        n = torch.full((b,), topk) if lengths is None else torch.tensor(lengths)
        past = torch.arange(topk).view(1, 1, -1) >= n.view(-1, 1, 1)
        idx = torch.where(past, torch.where(r < 0.3, pick_junk, pick_any), idx)
        return idx.to(torch.int32)


def formula(q, sets, attn_sink, d_v, sm_scale):
    """float64 out [b, s_q, h_q, d_v], lse [b, h_q, s_q]; sets: [(KeySet, idx, lengths)]."""
    b, s_q, h_q, _ = q.shape
    out = torch.zeros(b, s_q, h_q, d_v, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float64)
    for i in range(b):
        for j in range(s_q):
            rows = []
            for ks, idx, lengths in sets:
                n = idx.shape[-1] if lengths is None else max(0, min(lengths[i], idx.shape[-1]))
                sel = idx[i, j, :n].long()
                sel = sel[(sel >= 0) & (sel < ks.num_slots)]
                assert torch.isin(sel, ks.used).all()  # never a poisoned slot
                rows.append(ks.deq[sel])
            keys = torch.cat(rows)
            if keys.shape[0] == 0:
                continue
            logits = (q[i, j].double() @ keys.T) * sm_scale
            l_ = torch.logsumexp(logits, dim=1)
            o = torch.softmax(logits, dim=1) @ keys[:, :d_v]
            if attn_sink is not None:
                o = o / (1.0 + torch.exp(attn_sink.double() - l_))[:, None]
            out[i, j] = o
            lse[i, :, j] = l_
    return out, lse


def run_case(layout, *, b=2, s_q=2, h_q=16, topk=64, bs=61, nb=3, lengths=None, extra=None,
             sink=None, d_v=512, q_dtype=torch.bfloat16, schedule=None, invalid_frac=0.25,
             uint8=False, seed=0):
    """extra: (nb, bs, etopk, elengths) or None; sink: None/"finite"/"mixed";
    schedule: None, "parts3" (num_parts=3 over per-set-rounded counts), "sum" (counts
    topk_length + extra_topk_length, as torch_mla.compat passes), "topk" (the full topks),
    "bn40" (block_n 40: not a multiple of the kernel's tile), "legacy" (block_n column 0)."""
    lay = LAYOUT_BY_D[576 if layout == "v32" else 512]
    gen = torch.Generator().manual_seed(seed)
    main = KeySet(lay, nb, bs, gen)
    q = torch.randn(b, s_q, h_q, lay.d, generator=gen).to(q_dtype)
    idx = main.indices(b, s_q, topk, lengths, gen, invalid_frac)
    sets = [(main, idx, lengths)]
    kw = {}
    if lengths is not None:
        kw["topk_length"] = torch.tensor(lengths, dtype=torch.int32)
    etopk, elengths = 0, None
    if extra is not None:
        enb, ebs, etopk, elengths = extra
        ext = KeySet(lay, enb, ebs, gen, pad_tokens=2)
        eidx = ext.indices(b, s_q, etopk, elengths, gen, invalid_frac)
        sets.append((ext, eidx, elengths))
        kw.update(extra_k_cache=ext.cache, extra_indices=eidx)
        if elengths is not None:
            kw["extra_topk_length"] = torch.tensor(elengths, dtype=torch.int32)
    attn_sink = None
    if sink is not None:
        attn_sink = torch.randn(h_q, generator=gen)
        if sink == "mixed":
            attn_sink[0::3] = math.inf
            attn_sink[1::3] = -math.inf
        kw["attn_sink"] = attn_sink
    if schedule is not None:
        n_main = torch.tensor(lengths if lengths is not None else [topk] * b).clamp(0, topk)
        n_ext = (torch.tensor(elengths if elengths is not None else [etopk] * b).clamp(0, etopk)
                 if extra is not None else torch.zeros(b, dtype=torch.int64))
        block_n = 40 if schedule == "bn40" else 64
        if schedule in ("parts3", "legacy"):
            seq = (n_main + 63) // 64 * 64 + (n_ext + 63) // 64 * 64
        elif schedule in ("sum", "bn40"):
            seq = n_main + n_ext
        else:
            seq = torch.full((b,), topk + etopk)
        sched = torch_mla.decode_schedule(seq.to(torch.int32), num_parts=3, block_n=block_n)
        if schedule == "legacy":  # made before metadata recorded block_n: read as 64
            sched.metadata[:, 5] = 0
        kw["schedule"] = sched
    sm_scale = lay.d ** -0.5 * 1.3
    cache = main.cache
    if uint8:  # the same bytes as a uint8 tensor
        cache = cache.view(torch.uint8)
        if extra is not None:
            kw["extra_k_cache"] = kw["extra_k_cache"].view(torch.uint8)

    want_out, want_lse = formula(q, sets, attn_sink, d_v, sm_scale)
    with torch_mla.use_backend("triton"):
        out, lse = torch_mla.sparse_decode(q, cache, idx, d_v=d_v, sm_scale=sm_scale, **kw)
    ref_out, ref_lse = torch_mla.sparse_decode(q, cache, idx, d_v=d_v, sm_scale=sm_scale, **kw)

    assert out.shape == (b, s_q, h_q, d_v) and out.dtype == q_dtype and out.is_contiguous()
    assert lse.shape == (b, h_q, s_q) and lse.dtype == torch.float32 and lse.is_contiguous()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    lonely = torch.isinf(want_lse).transpose(1, 2)  # [b, s_q, h_q]: no valid key
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse.float()))
    assert torch.all(lse[torch.isinf(lse)] > 0)
    assert torch.all(out[lonely] == 0)
    # bf16 key/probability operands and a bf16 output: relative errors of a few 1e-3
    for got, want in ((out, want_out), (ref_out, want_out)):
        err = (got.double() - want).norm() / want.norm().clamp_min(1e-30)
        assert err < 1.5e-2, err
    torch.testing.assert_close(out.double(), want_out, rtol=0, atol=3e-2)
    fin = torch.isfinite(want_lse)
    torch.testing.assert_close(lse.double()[fin], want_lse[fin], rtol=1e-4, atol=2e-3)
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=0, atol=3e-2)
    return out, lse, lonely


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["v32", "model1"])
@pytest.mark.parametrize("bs,nb", [(2, 40), (61, 3), (64, 2)])
def test_block_sizes_with_tail(layout, bs, nb):
    # topk 100 = one full block of 64 plus a tail; batch 1 keeps only its first 37
    run_case(layout, topk=100, bs=bs, nb=nb, lengths=[100, 37], sink="finite", seed=bs)


@pytest.mark.parametrize("layout", ["v32", "model1"])
@pytest.mark.parametrize("schedule", [None, "parts3", "sum", "topk", "bn40", "legacy"])
def test_extra_kv_and_schedules(layout, schedule):
    # Extra set with its own block size; batch 1 has no main keys, batch 2 no key at all.
    # num_parts=3 splits batch elements across parts (combine); "sum" has one block fewer
    # than the per-set-rounded list (the last part runs to the end); "topk" has extra blocks;
    # "bn40" cuts parts inside the kernel's tiles (positions past a part's end must be masked).
    # Any consistent block unit partitions each batch element's keys, so the unit only
    # changes the balance, never the result.
    out, lse, lonely = run_case(layout, b=3, s_q=2, topk=128, bs=64, nb=3, lengths=[128, 0, 0],
                                extra=(5, 2, 70, [70, 9, 0]), sink="mixed", schedule=schedule,
                                seed=7)
    assert torch.all(lonely[2]) and not lonely[0].any()


@pytest.mark.parametrize("layout", ["v32", "model1"])
def test_extra_without_lengths_s_q_1_uint8(layout):
    run_case(layout, b=2, s_q=1, topk=64, bs=64, nb=2, extra=(2, 61, 64, None),
             schedule="parts3", uint8=True, seed=8)


@pytest.mark.parametrize("layout", ["v32", "model1"])
def test_all_indices_invalid(layout):
    out, lse, lonely = run_case(layout, topk=64, bs=4, nb=4, invalid_frac=1.0, sink="finite",
                                extra=(2, 3, 64, None), schedule="parts3", seed=9)
    assert torch.all(lonely) and torch.all(out == 0) and torch.all(lse == math.inf)


def test_zero_lengths_everywhere_and_sinks():
    out, lse, _ = run_case("model1", b=2, s_q=1, topk=64, bs=61, nb=2, lengths=[0, 0],
                           extra=(2, 2, 64, [0, 0]), sink="mixed", seed=10)
    assert torch.all(out == 0) and torch.all(lse == math.inf)


@pytest.mark.parametrize("h_q", [32, 64])
def test_head_blocks(h_q):
    run_case("v32", b=1, s_q=2, h_q=h_q, topk=64, bs=64, nb=2, lengths=[50], sink="finite",
             seed=h_q)


def test_fp16_q_and_smaller_d_v():
    run_case("v32", topk=64, bs=61, nb=2, d_v=256, q_dtype=torch.float16, lengths=[64, 20],
             schedule="parts3", seed=11)
    run_case("model1", topk=64, bs=61, nb=2, d_v=448, extra=(2, 2, 64, [3, 64]), seed=12)


def test_supports_reasons():
    lay = LAYOUT_BY_D[576]
    gen = torch.Generator().manual_seed(13)
    ks = KeySet(lay, 2, 4, gen)
    q = torch.randn(1, 1, 16, 576, generator=gen, dtype=torch.bfloat16)
    idx = ks.indices(1, 1, 8, None, gen)
    args = [q, ks.cache, idx, None, None, None, None, None, 512, 0.1, None, None]
    assert TSD.supports(*args) == []
    bad = list(args)
    bad[0] = q.float()
    assert any("bf16/fp16" in r for r in TSD.supports(*bad))
    bad = list(args)
    bad[0] = torch.randn(1, 1, 8, 576, dtype=torch.bfloat16)
    assert any("multiple of 16" in r for r in TSD.supports(*bad))
    bad = list(args)
    bad[8] = 576
    assert any("d_v" in r for r in TSD.supports(*bad))
    store = torch.zeros(2, 4 * 656 + 8, dtype=torch.uint8)
    odd = store[:, : 4 * 656].view(2, 4, 1, 656)
    bad = list(args)
    bad[1] = odd
    assert any("stride(0)" in r for r in TSD.supports(*bad))
    # the forced backend says why it refuses
    with torch_mla.use_backend("triton"), pytest.raises(RuntimeError, match="bf16/fp16"):
        torch_mla.sparse_decode(q.float(), ks.cache, idx)


# ---------------------------------------------------------------------------------------------
# the split-scores variant (VARIANT a dict, the default: _tile_split, 256-column value blocks,
# split scores, deferred row sums) and the chunked kernel (VARIANT None, still selectable) on the
# corner cases above
# ---------------------------------------------------------------------------------------------

_SPLIT_CASES = {
    # a tail block, pads between cache blocks, a short length, sinks
    "v32-tail": dict(layout="v32", topk=100, bs=61, nb=3, lengths=[100, 37], sink="finite",
                     seed=61),
    "model1-tail": dict(layout="model1", topk=100, bs=2, nb=40, lengths=[100, 37],
                        sink="finite", seed=2),
    # extra set, empty main / empty batch elements, mixed +-inf sinks, splits + combine, and
    # parts cut inside the kernel's tiles
    "v32-extra-parts3": dict(layout="v32", b=3, s_q=2, topk=128, bs=64, nb=3,
                             lengths=[128, 0, 0], extra=(5, 2, 70, [70, 9, 0]), sink="mixed",
                             schedule="parts3", seed=7),
    "model1-extra-bn40": dict(layout="model1", b=3, s_q=2, topk=128, bs=64, nb=3,
                              lengths=[128, 0, 0], extra=(5, 2, 70, [70, 9, 0]), sink="mixed",
                              schedule="bn40", seed=7),
    "model1-extra-uint8": dict(layout="model1", b=2, s_q=1, topk=64, bs=64, nb=2,
                               extra=(2, 61, 64, None), schedule="parts3", uint8=True, seed=8),
    "v32-all-invalid": dict(layout="v32", topk=64, bs=4, nb=4, invalid_frac=1.0, sink="finite",
                            extra=(2, 3, 64, None), schedule="parts3", seed=9),
    "model1-zero-lengths": dict(layout="model1", b=2, s_q=1, topk=64, bs=61, nb=2,
                                lengths=[0, 0], extra=(2, 2, 64, [0, 0]), sink="mixed", seed=10),
    # BLOCK_H 32 (4 warps, 32-key tiles) and 64 (8 warps, 64-key tiles)
    "v32-h32": dict(layout="v32", b=1, s_q=2, h_q=32, topk=64, bs=64, nb=2, lengths=[50],
                    sink="finite", seed=32),
    "v32-h64": dict(layout="v32", b=1, s_q=2, h_q=64, topk=64, bs=64, nb=2, lengths=[50],
                    sink="finite", seed=64),
    # fp16 q; d_v inside value block a (256) and inside block b (448: MODEL1's RoPE not stored)
    "v32-fp16-dv256": dict(layout="v32", topk=64, bs=61, nb=2, d_v=256, q_dtype=torch.float16,
                           lengths=[64, 20], schedule="parts3", seed=11),
    "model1-dv448": dict(layout="model1", topk=64, bs=61, nb=2, d_v=448,
                         extra=(2, 2, 64, [3, 64]), seed=12),
}


# the split variant's defaults and the chunked kernel on every case; the split variant's other
# settings (scores chained into the PV dots, per-tile row sums) on a few
_SPLIT_RUNS = ([(name, {}) for name in _SPLIT_CASES]
               + [(name, None) for name in _SPLIT_CASES]
               + [(name, {"split_s": False, "defer_sum": False, "num_stages": 2})
                  for name in ("model1-tail", "v32-extra-parts3", "model1-extra-bn40")])


def _run_id(name, variant):
    kind = "chunks" if variant is None else ("split" if not variant else "chained-rowsum")
    return f"{name}-{kind}"


@pytest.mark.parametrize("name,variant", _SPLIT_RUNS, ids=[_run_id(*r) for r in _SPLIT_RUNS])
def test_split_variant(monkeypatch, name, variant):
    monkeypatch.setattr(TSD, "VARIANT", variant)
    for layout_id in (0, 1):
        block_n, _, stages, kw = TSD._config(64, layout_id)  # noqa: SLF001
        assert kw["SPLIT"] == (variant is not None)
        if variant:  # a stage count the variant names wins over the per-layout default
            assert stages == variant.get("num_stages", TSD.SPLIT_STAGES[layout_id])
    out, lse, lonely = run_case(**_SPLIT_CASES[name])
    if name in ("v32-all-invalid", "model1-zero-lengths"):
        assert torch.all(lonely) and torch.all(out == 0) and torch.all(lse == math.inf)
    if name.endswith("extra-parts3") or name.endswith("extra-bn40"):
        assert torch.all(lonely[2]) and not lonely[0].any()
