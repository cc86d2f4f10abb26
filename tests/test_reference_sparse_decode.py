"""Reference sparse_decode against an independent float64 formula written here.

The formula walks every (batch, query) pair on the host: it lists the valid keys of the main and
extra sets one position at a time (index range, topk_length), stacks their dequantized rows
(``torch_mla.dequantize_kv_cache``, tested in test_reference_kv_cache.py) in float64 and runs a
plain softmax. It shares no gather, mask, chunking or sink logic with the reference.

Unused cache slots are poisoned with 0x7F bytes (e4m3 NaN, and NaN f32 scales), and invalid
index entries (negative, out of range, past topk_length) often point right at them.

The reference is called directly (``torch_mla.reference.sparse_decode.sparse_decode``) because
the public op's input check currently rejects d_v = 512 for MODEL1 (see
``test_op_matches_reference``).
"""

import importlib
import math

import pytest
import torch

import torch_mla
from torch_mla.meta.layouts import LAYOUT_BY_D, block_view

REF = importlib.import_module("torch_mla.reference.sparse_decode")
KV = importlib.import_module("torch_mla.reference.kv_cache")
NAN_BYTE = 0x7F


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

class KeySet:
    """A quantized cache with a set of used slots; every other slot is poisoned with NaN bytes.
    ``deq`` holds the float64 dequantized used slots (taken before poisoning)."""

    def __init__(self, lay, nb, bs, n_used, gen):
        self.lay, self.nb, self.bs = lay, nb, bs
        self.num_slots = nb * bs
        kv = (torch.randn(nb, bs, 1, lay.d, generator=gen) * 0.5).to(torch.bfloat16)
        self.cache = torch_mla.quantize_kv_cache(kv, lay.name)
        self.deq = torch_mla.dequantize_kv_cache(self.cache, lay.name).view(-1, lay.d).double()
        perm = torch.randperm(self.num_slots, generator=gen)
        self.used = perm[:n_used].tolist()
        self.unused = perm[n_used:].tolist()
        rows = block_view(self.cache, lay)  # the whole token, both MODEL1 sections
        for s in self.unused:
            blk, off = divmod(s, bs)
            if lay.name == "v32":
                rows[blk, off * 656:(off + 1) * 656] = NAN_BYTE
            else:
                rows[blk, off * 576:(off + 1) * 576] = NAN_BYTE
                rows[blk, bs * 576 + off * 8: bs * 576 + off * 8 + 8] = NAN_BYTE
        assert torch.isnan(torch_mla.dequantize_kv_cache(self.cache, lay.name).float()).any() \
            or not self.unused

    def indices(self, b, s_q, topk, lengths, gen, invalid_frac=0.3, dup_frac=0.2):
        """[b, s_q, topk] int32: positions < lengths[i] mostly hold used slots (some negative or
        out of range, some duplicated); positions past the length point at poisoned slots,
        used slots or junk."""
        idx = torch.empty(b, s_q, topk, dtype=torch.int32)
        junk = [-1, -2, -(2 ** 31), self.num_slots, self.num_slots + 5, 2 ** 31 - 1]
        pool_after = self.unused + self.used + junk
        for i in range(b):
            n = topk if lengths is None else lengths[i]
            for j in range(s_q):
                for t in range(topk):
                    r = torch.rand((), generator=gen).item()
                    if t >= n:
                        pick = pool_after[torch.randint(len(pool_after), (), generator=gen)]
                    elif r < invalid_frac or not self.used:
                        pick = junk[torch.randint(len(junk), (), generator=gen)]
                    elif t > 0 and r < invalid_frac + dup_frac:
                        pick = int(idx[i, j, t - 1])  # duplicate the previous entry
                    else:
                        pick = self.used[torch.randint(len(self.used), (), generator=gen)]
                    idx[i, j, t] = pick
        return idx


# ---------------------------------------------------------------------------------------------
# the formula
# ---------------------------------------------------------------------------------------------

def formula(q, sets, attn_sink, d_v, sm_scale):
    """float64 out [b, s_q, h_q, d_v], lse [b, h_q, s_q].

    sets: [(KeySet, indices [b, s_q, topk], lengths list or None)]."""
    b, s_q, h_q, _ = q.shape
    out = torch.zeros(b, s_q, h_q, d_v, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float64)
    for i in range(b):
        for j in range(s_q):
            rows = []
            for ks, idx, lengths in sets:
                n = idx.shape[-1] if lengths is None else lengths[i]
                for t in range(idx.shape[-1]):
                    s = int(idx[i, j, t])
                    if t < n and 0 <= s < ks.num_slots:
                        assert s in ks.used  # the generator never makes a poisoned slot valid
                        rows.append(ks.deq[s])
            if not rows:
                continue
            keys = torch.stack(rows)  # [n_keys, d]
            logits = (q[i, j].double() @ keys.T) * sm_scale  # [h_q, n_keys]
            m = logits.max(dim=1, keepdim=True).values
            e = torch.exp(logits - m)
            denom = e.sum(dim=1)
            o = (e / denom[:, None]) @ keys[:, :d_v]
            l_ = m.squeeze(1) + torch.log(denom)
            if attn_sink is not None:
                sink = attn_sink.double()
                # finite lse: exp(+inf) -> factor 0, exp(-inf) -> factor 1, no NaN possible
                o = o / (1.0 + torch.exp(sink - l_))[:, None]
            out[i, j] = o
            lse[i, :, j] = l_
    return out, lse


def run_case(layout, b, s_q, h_q, topk, bs, nb, *, lengths=None, extra=None, sink=None,
             q_dtype=torch.float32, d_v=512, seed=0, invalid_frac=0.3):
    """extra: (nb, bs, etopk, elengths) or None; lengths/elengths: python lists or None;
    sink: None, "finite", "+inf", "-inf" or "mixed"."""
    lay = LAYOUT_BY_D[576 if layout == "v32" else 512]
    gen = torch.Generator().manual_seed(seed)
    main = KeySet(lay, nb, bs, max(1, nb * bs // 2), gen)
    q = torch.randn(b, s_q, h_q, lay.d, generator=gen).to(q_dtype)
    idx = main.indices(b, s_q, topk, lengths, gen, invalid_frac)
    sets = [(main, idx, lengths)]
    ecache = eidx = elen_t = None
    if extra is not None:
        enb, ebs, etopk, elengths = extra
        ext = KeySet(lay, enb, ebs, max(1, enb * ebs // 2), gen)
        eidx = ext.indices(b, s_q, etopk, elengths, gen, invalid_frac)
        sets.append((ext, eidx, elengths))
        ecache = ext.cache
        elen_t = None if elengths is None else torch.tensor(elengths, dtype=torch.int32)
    attn_sink = None
    if sink is not None:
        attn_sink = torch.randn(h_q, generator=gen)
        if sink == "+inf":
            attn_sink[:] = math.inf
        elif sink == "-inf":
            attn_sink[:] = -math.inf
        elif sink == "mixed":
            attn_sink[0::3] = math.inf
            attn_sink[1::3] = -math.inf
    len_t = None if lengths is None else torch.tensor(lengths, dtype=torch.int32)
    sm_scale = lay.d ** -0.5 * 1.3
    out, lse = REF.sparse_decode(q, main.cache, idx, len_t, attn_sink, ecache, eidx, elen_t, d_v,
                                 sm_scale, None, None)
    want_out, want_lse = formula(q, sets, attn_sink, d_v, sm_scale)

    assert out.shape == (b, s_q, h_q, d_v) and out.dtype == q_dtype
    assert lse.shape == (b, h_q, s_q)
    assert lse.dtype == (torch.float64 if q_dtype == torch.float64 else torch.float32)
    assert lse.is_contiguous() and out.is_contiguous()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    # queries without a valid key: exactly 0 and +inf
    lonely = torch.isinf(want_lse).transpose(1, 2)  # [b, s_q, h_q]
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    assert torch.all(lse[torch.isinf(lse)] > 0)
    assert torch.all(out[lonely] == 0)
    tol = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2}[q_dtype]
    torch.testing.assert_close(out.double(), want_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), want_lse, rtol=max(tol, 1e-6), atol=max(tol, 1e-5))
    return out, lse, lonely


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["v32", "model1"])
@pytest.mark.parametrize("bs", [2, 61, 64, 576])
def test_block_sizes(layout, bs):
    nb = 1 if bs == 576 else 3
    run_case(layout, 2, 2, 64, 16, bs, nb, seed=bs)


@pytest.mark.parametrize("layout", ["v32", "model1"])
@pytest.mark.parametrize("s_q,h_q", [(1, 128), (2, 64), (3, 64), (4, 128)])
def test_shapes_lengths_sinks(layout, s_q, h_q):
    b = 3
    run_case(layout, b, s_q, h_q, 12, 61, 2, lengths=[12, 0, 5], sink="finite",
             seed=s_q * 10 + h_q)


@pytest.mark.parametrize("layout", ["v32", "model1"])
@pytest.mark.parametrize("sink", ["finite", "+inf", "-inf", "mixed"])
def test_extra_kv(layout, sink):
    # Extra set with its own block size and lengths; batch 1 has no main keys, batch 2 none at all.
    out, lse, lonely = run_case(layout, 3, 2, 64, 10, 64, 2, lengths=[10, 0, 0],
                                extra=(3, 2, 6, [4, 6, 0]), sink=sink, seed=7)
    if sink == "+inf":
        assert torch.all(out == 0)
    assert torch.all(lonely[2])


@pytest.mark.parametrize("layout", ["v32", "model1"])
def test_extra_kv_without_lengths(layout):
    run_case(layout, 2, 3, 128, 8, 2, 5, extra=(1, 61, 9, None), seed=8)


@pytest.mark.parametrize("layout", ["v32", "model1"])
def test_all_indices_invalid(layout):
    out, lse, lonely = run_case(layout, 2, 2, 64, 8, 4, 2, invalid_frac=1.0, sink="finite",
                                extra=(2, 3, 4, None), seed=9)
    assert torch.all(lonely) and torch.all(out == 0) and torch.all(lse == math.inf)


@pytest.mark.parametrize("layout", ["v32", "model1"])
def test_sinks_without_valid_keys_never_nan(layout):
    for sink in ["finite", "+inf", "-inf", "mixed"]:
        out, lse, _ = run_case(layout, 2, 1, 64, 6, 4, 2, lengths=[0, 3], sink=sink, seed=10)
        assert torch.all(out[0] == 0) and torch.all(lse[0] == math.inf)


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float64])
def test_q_dtypes(q_dtype):
    run_case("v32", 2, 2, 64, 8, 61, 2, lengths=[8, 3], sink="finite", q_dtype=q_dtype, seed=11)
    run_case("model1", 2, 1, 64, 8, 64, 2, extra=(2, 2, 3, [3, 1]), q_dtype=q_dtype, seed=12)


def test_smaller_d_v():
    run_case("v32", 2, 2, 64, 8, 4, 3, d_v=128, sink="finite", seed=13)
    run_case("model1", 2, 2, 64, 8, 4, 3, d_v=448, seed=14)


def test_chunking(monkeypatch):
    """Chunks of a few query rows give the same result as one chunk (and still match)."""
    args = dict(lengths=[9, 4, 0], extra=(2, 3, 5, [5, 0, 2]), sink="mixed", seed=15)
    full = run_case("model1", 3, 4, 64, 9, 61, 2, **args)
    monkeypatch.setattr(REF, "_CHUNK_BYTES", 1)  # one query row per chunk
    one = run_case("model1", 3, 4, 64, 9, 61, 2, **args)
    monkeypatch.setattr(REF, "_CHUNK_BYTES", 3 * 3 * 64 * 600 * 14)  # a few rows per chunk
    few = run_case("model1", 3, 4, 64, 9, 61, 2, **args)
    for a, b in ((full, one), (full, few)):
        torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-6)


def test_schedule_arguments_are_ignored():
    lay = LAYOUT_BY_D[576]
    gen = torch.Generator().manual_seed(16)
    ks = KeySet(lay, 2, 4, 6, gen)
    q = torch.randn(2, 1, 64, 576, generator=gen)
    idx = ks.indices(2, 1, 5, None, gen)
    a = REF.sparse_decode(q, ks.cache, idx, None, None, None, None, None, 512, 0.1, None, None)
    meta = torch.zeros(4, 8, dtype=torch.int32)
    splits = torch.zeros(3, dtype=torch.int32)
    b = REF.sparse_decode(q, ks.cache, idx, None, None, None, None, None, 512, 0.1, meta, splits)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_uint8_and_padded_cache():
    """A uint8 cache whose blocks are further apart than the minimum reads the same."""
    lay = LAYOUT_BY_D[512]
    gen = torch.Generator().manual_seed(17)
    ks = KeySet(lay, 3, 5, 9, gen)
    nb, bs = 3, 5
    stride0 = lay.block_bytes(bs) + 2 * 576
    store = torch.full((nb, stride0), NAN_BYTE, dtype=torch.uint8)
    store[:, : bs * lay.bytes_per_token] = block_view(ks.cache, lay)
    padded = store[:, : bs * lay.bytes_per_token].view(nb, bs, 1, lay.bytes_per_token)
    q = torch.randn(2, 2, 64, 512, generator=gen)
    idx = ks.indices(2, 2, 7, [7, 2], gen)
    lens = torch.tensor([7, 2], dtype=torch.int32)
    a = REF.sparse_decode(q, ks.cache, idx, lens, None, None, None, None, 512, 0.05, None, None)
    b = REF.sparse_decode(q, padded, idx, lens, None, None, None, None, 512, 0.05, None, None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("layout,d_v", [("v32", 512), ("model1", 448)])
def test_op_matches_reference(layout, d_v):
    """The public op (input check, dispatch to the CPU reference) gives the reference's result.

    MODEL1 runs with d_v 448 here: meta.sparse_decode.check_sparse_decode caps d_v at d_nope
    (448), although MODEL1 values are all 512 columns in FlashMLA."""
    lay = LAYOUT_BY_D[576 if layout == "v32" else 512]
    gen = torch.Generator().manual_seed(18)
    ks = KeySet(lay, 2, 4, 6, gen)
    eks = KeySet(lay, 3, 2, 4, gen)
    q = torch.randn(2, 2, 64, lay.d, generator=gen).to(torch.bfloat16)
    idx = ks.indices(2, 2, 6, [6, 1], gen)
    eidx = eks.indices(2, 2, 3, [0, 3], gen)
    lens = torch.tensor([6, 1], dtype=torch.int32)
    elens = torch.tensor([0, 3], dtype=torch.int32)
    sink = torch.randn(64, generator=gen)
    a = torch_mla.sparse_decode(q, ks.cache, idx, topk_length=lens, attn_sink=sink,
                                extra_k_cache=eks.cache, extra_indices=eidx,
                                extra_topk_length=elens, d_v=d_v, sm_scale=0.07)
    b = REF.sparse_decode(q, ks.cache, idx, lens, sink, eks.cache, eidx, elens, d_v, 0.07, None,
                          None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
