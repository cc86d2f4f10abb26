"""The reference mla::sparse_prefill (forward and backward) against an independent float64 formula.

The formula here is dense: a count matrix C[i, kv_head, j] = how many valid entries of query i's
index row point at kv row j, then a softmax over all s_kv rows weighted by C. It shares nothing with
the reference's gather-and-chunk code. Every test draws fresh random inputs.
"""

import importlib
import math
import time

import pytest
import torch

import torch_mla

# The module, not the function: torch_mla.reference re-exports a function of the same name.
ref_mod = importlib.import_module("torch_mla.reference.sparse_prefill")

INF = float("inf")


# ----------------------------------------------------------------------------- test's own formula

def count_matrix(indices, s_kv, topk_length=None):
    """C [s_q, h_kv, s_kv] float64: occurrences of each kv row among query i's valid indices."""
    s_q, h_kv, topk = indices.shape
    counts = torch.zeros(s_q, h_kv, s_kv, dtype=torch.float64)
    lens = [topk] * s_q if topk_length is None else topk_length.tolist()
    rows = indices.tolist()
    for i in range(s_q):
        for k in range(h_kv):
            for pos, j in enumerate(rows[i][k]):
                if pos < lens[i] and 0 <= j < s_kv:
                    counts[i, k, j] += 1
    return counts


def dense_formula(q, kv, counts, sm_scale, d_v, sink=None):
    """(out, max_logits, lse) in float64, differentiable in q, kv and sink.

    The max and the normaliser of empty queries are replaced by harmless constants before use
    (through where, so autograd sees no inf - inf or 0/0 there either)."""
    q, kv = q.double(), kv.double()
    s_q, h_q, _ = q.shape
    h_kv = kv.shape[1]
    head = torch.arange(h_q) // (h_q // h_kv)
    c = counts[:, head, :]  # [s_q, h_q, s_kv]
    logits = sm_scale * torch.einsum("ihd,jhd->ihj", q, kv[:, head, :])
    masked = torch.where(c > 0, logits, torch.full_like(logits, -INF))
    has = c.sum(-1) > 0
    m = masked.amax(-1)
    m_safe = torch.where(has, m, torch.zeros_like(m)).detach()  # lse does not depend on the shift
    w = c * torch.exp(masked - m_safe[..., None])
    z = torch.where(has, w.sum(-1), torch.ones_like(m))
    lse = torch.where(has, m_safe + torch.log(z), torch.full_like(m, INF))
    out = torch.einsum("ihj,jhd->ihd", w, kv[:, head, :d_v]) / z[..., None]
    if sink is not None:
        lse_safe = torch.where(has, lse, torch.zeros_like(lse))
        # exp(lse) / (exp(lse) + exp(sink)) written as a sigmoid so that infinite sinks have a
        # finite derivative (0) in autograd.
        factor = torch.sigmoid(lse_safe - sink.double()[None, :])
        out = out * factor[..., None]
    out = torch.where(has[..., None], out, torch.zeros_like(out))
    return out, m, lse


# ----------------------------------------------------------------------------- inputs

def make_indices(s_q, h_kv, topk, s_kv, *, empty_query=True, gen=None):
    """Random int32 indices mixing valid rows, negatives, out-of-range values and duplicates."""
    idx = torch.randint(-3, s_kv + 3, (s_q, h_kv, topk), generator=gen, dtype=torch.int64)
    # Far-out values too, both ways.
    far = torch.rand(idx.shape, generator=gen) < 0.05
    idx = torch.where(far, torch.randint(-2**31, 2**31 - 1, idx.shape, generator=gen), idx)
    # Duplicates: copy some earlier positions onto later ones.
    if topk >= 4:
        idx[:, :, topk // 2] = idx[:, :, 0]
        idx[:, :, topk - 1] = idx[:, :, 1]
        idx[:, :, 1] = idx[:, :, 0]
    if empty_query and s_q > 1:
        # Query 0, kv head 0: nothing valid (other kv heads of query 0 may still be).
        idx[0, 0] = torch.where(torch.arange(topk) % 2 == 0, -1, s_kv)
    return idx.to(torch.int32)


def poison_unused(kv, counts):
    """NaN in every (row, kv head) no valid index reads. Returns the poisoned copy."""
    unused = counts.sum(0).T == 0  # [s_kv, h_kv]
    return torch.where(unused[..., None], torch.full_like(kv, float("nan")), kv)


def make_sink(h_q, mode):
    if mode is None:
        return None
    sink = torch.randn(h_q, dtype=torch.float32)
    if mode == "inf":
        sink[0], sink[1] = INF, -INF
    return sink


def make_case(s_q, s_kv, h_q, h_kv, d_qk, topk, dtype, use_len, empty_query=True):
    q = torch.randn(s_q, h_q, d_qk, dtype=torch.float64).to(dtype)
    kv = torch.randn(s_kv, h_kv, d_qk, dtype=torch.float64).to(dtype)
    indices = make_indices(s_q, h_kv, topk, s_kv, empty_query=empty_query)
    topk_length = None
    if use_len:
        topk_length = torch.randint(0, topk + 3, (s_q,), dtype=torch.int32)
        if s_q > 2:
            topk_length[1] = 0  # an empty query by length alone
            topk_length[2] = topk
    return q, kv, indices, topk_length


FWD_SHAPES = [
    # s_q, s_kv, h_q, h_kv, d_qk, d_v, topk
    (5, 40, 64, 1, 32, 16, 24),
    (4, 48, 128, 1, 32, 16, 24),
    (3, 64, 16, 1, 576, 512, 16),
    (3, 64, 16, 1, 512, 512, 16),
    (4, 30, 8, 2, 32, 16, 20),  # GQA
]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-10),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


@pytest.mark.parametrize("shape", FWD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("use_len", [False, True], ids=["nolen", "len"])
@pytest.mark.parametrize("sink_mode", [None, "finite", "inf"])
def test_forward_matches_formula(shape, dtype, use_len, sink_mode):
    s_q, s_kv, h_q, h_kv, d_qk, d_v, topk = shape
    q, kv, indices, topk_length = make_case(s_q, s_kv, h_q, h_kv, d_qk, topk, dtype, use_len)
    sink = make_sink(h_q, sink_mode)
    counts = count_matrix(indices, s_kv, topk_length)
    kv_bad = poison_unused(kv, counts)
    scale = d_qk ** -0.5
    out, max_logits, lse = torch_mla.sparse_prefill(q, kv_bad, indices, scale, d_v, sink, topk_length)
    e_out, e_max, e_lse = dense_formula(q, kv, counts, scale, d_v, sink)

    assert out.dtype == dtype and out.shape == (s_q, h_q, d_v)
    assert lse.dtype == max_logits.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any() and not max_logits.isnan().any()
    torch.testing.assert_close(out.double(), e_out, **TOL[dtype])
    # Stats are fp32 from (possibly bf16) inputs taken exactly: fp32-tight in either case.
    torch.testing.assert_close(lse.double(), e_lse, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(max_logits.double(), e_max, rtol=2e-5, atol=2e-5)
    # The corner cases really occurred in this draw.
    has = counts.sum(-1) > 0
    assert not has.all(), "expected an empty (query, kv head)"
    assert (lse[~has[:, torch.arange(h_q) // (h_q // h_kv)]] == INF).all()


def test_forward_float64():
    q, kv, indices, topk_length = make_case(4, 20, 8, 2, 16, 10, torch.float64, True)
    sink = make_sink(8, "inf").double()
    counts = count_matrix(indices, 20, topk_length)
    out, max_logits, lse = torch_mla.sparse_prefill(q, poison_unused(kv, counts), indices, 0.3, 8,
                                                    sink, topk_length)
    assert out.dtype == lse.dtype == max_logits.dtype == torch.float64
    for got, want in zip((out, max_logits, lse), dense_formula(q, kv, counts, 0.3, 8, sink)):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("how", ["negative", "out_of_range", "zero_length"])
@pytest.mark.parametrize("sink_mode", [None, "inf"])
def test_all_indices_invalid(how, sink_mode):
    s_q, s_kv, h_q, h_kv, d = 3, 10, 4, 2, 16
    q = torch.randn(s_q, h_q, d)
    kv = torch.full((s_kv, h_kv, d), float("nan"))  # nothing may be read
    topk_length = None
    if how == "negative":
        indices = -torch.randint(1, 100, (s_q, h_kv, 5), dtype=torch.int32)
    elif how == "out_of_range":
        indices = torch.randint(s_kv, 2**31 - 1, (s_q, h_kv, 5), dtype=torch.int32)
    else:
        indices = torch.randint(0, s_kv, (s_q, h_kv, 5), dtype=torch.int32)
        topk_length = torch.tensor([0, -2, 0], dtype=torch.int32)
    sink = make_sink(h_q, sink_mode)
    out, max_logits, lse = torch_mla.sparse_prefill(q, kv, indices, 0.25, 8, sink, topk_length)
    assert torch.equal(out, torch.zeros(s_q, h_q, 8))
    assert (max_logits == -INF).all() and (lse == INF).all()

    dq, dkv, dsink = torch.ops.mla.sparse_prefill_backward(
        torch.randn(s_q, h_q, 8), torch.ones(s_q, h_q), q, kv, indices, out, lse, 0.25, 8, sink,
        topk_length)
    assert torch.equal(dq, torch.zeros_like(q)) and torch.equal(dkv, torch.zeros_like(kv))
    assert torch.equal(dsink, torch.zeros(h_q)) and dsink.dtype == torch.float32


def test_empty_shapes():
    q = torch.randn(2, 4, 16)
    kv0 = torch.randn(0, 1, 16)
    idx = torch.zeros(2, 1, 3, dtype=torch.int32)
    out, ml, lse = torch_mla.sparse_prefill(q, kv0, idx, 0.25, 8)
    assert torch.equal(out, torch.zeros(2, 4, 8)) and (ml == -INF).all() and (lse == INF).all()
    out, ml, lse = torch_mla.sparse_prefill(q, torch.randn(5, 1, 16), idx[..., :0], 0.25, 8)
    assert torch.equal(out, torch.zeros(2, 4, 8)) and (ml == -INF).all() and (lse == INF).all()


def test_duplicates_count_per_occurrence():
    # Query attends to rows {0, 0, 0, 1}: row 0 carries three times row 1's weight at equal logits.
    q = torch.zeros(1, 2, 8)
    kv = torch.randn(2, 1, 8)
    idx = torch.tensor([[[0, 1, 0, 0]]], dtype=torch.int32)
    out, _, lse = torch_mla.sparse_prefill(q, kv, idx, 1.0, 8)
    want = (3 * kv[0, 0] + kv[1, 0]) / 4
    torch.testing.assert_close(out[0, 0], want)
    torch.testing.assert_close(lse, torch.full((1, 2), math.log(4.0)))


def test_sink_values():
    # One valid key with logit 0: lse 0, so the sink factor is 1 / (1 + exp(sink)).
    q = torch.zeros(1, 4, 8)
    kv = torch.randn(3, 1, 8)
    idx = torch.tensor([[[2, -1]]], dtype=torch.int32)
    sink = torch.tensor([-INF, 0.0, 1.5, INF])
    out, _, lse = torch_mla.sparse_prefill(q, kv, idx, 1.0, 8, sink)
    factor = torch.tensor([1.0, 0.5, 1 / (1 + math.exp(1.5)), 0.0])
    torch.testing.assert_close(out[0], factor[:, None] * kv[2, 0])
    assert torch.equal(lse, torch.zeros(1, 4))


# ----------------------------------------------------------------------------- gradients

def _grad_case(sink_mode):
    s_q, h_q, h_kv, d_qk, d_v, s_kv, topk = 3, 4, 2, 16, 8, 12, 6
    q = torch.randn(s_q, h_q, d_qk, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(s_kv, h_kv, d_qk, dtype=torch.float64, requires_grad=True)
    indices = make_indices(s_q, h_kv, topk, s_kv, empty_query=True)
    topk_length = torch.tensor([6, 4, 0], dtype=torch.int32)  # query 2 empty by length
    sink = None
    if sink_mode is not None:
        sink = make_sink(h_q, sink_mode).double().requires_grad_(True)
    return q, kv, indices, topk_length, sink, d_v


@pytest.mark.parametrize("sink_mode", [None, "finite", "inf"])
def test_gradcheck(sink_mode):
    q, kv, indices, topk_length, sink, d_v = _grad_case(sink_mode)
    scale = 0.4

    def fn(q, kv, *rest):
        s = rest[0] if rest else None
        out, _, lse = torch_mla.sparse_prefill(q, kv, indices, scale, d_v, s, topk_length)
        # Empty queries have lse = +inf, which finite differences cannot handle; its gradient is 0.
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    inputs = (q, kv) if sink is None else (q, kv, sink)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(6, 40, 8, 2, 64, 32, 16), (3, 50, 16, 1, 576, 512, 12)],
                         ids=lambda s: "x".join(map(str, s)))
def test_backward_matches_formula(dtype, shape):
    s_q, s_kv, h_q, h_kv, d_qk, d_v, topk = shape
    q, kv, indices, topk_length = make_case(s_q, s_kv, h_q, h_kv, d_qk, topk, dtype, True)
    sink = make_sink(h_q, "inf")
    counts = count_matrix(indices, s_kv, topk_length)
    kv_bad = poison_unused(kv, counts)
    scale = d_qk ** -0.5
    dout = torch.randn(s_q, h_q, d_v).to(dtype)
    dlse = torch.randn(s_q, h_q)

    qg, kvg, sg = (t.detach().clone().requires_grad_(True) for t in (q, kv_bad, sink))
    out, _, lse = torch_mla.sparse_prefill(qg, kvg, indices, scale, d_v, sg, topk_length)
    # Empty queries: lse is +inf, give them a zero upstream gradient through where.
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    dq, dkv, dsink = torch.autograd.grad((out, lse), (qg, kvg, sg), (dout, dlse))

    q64, kv64, s64 = (t.detach().double().requires_grad_(True) for t in (q, kv, sink))
    e_out, _, e_lse = dense_formula(q64, kv64, counts, scale, d_v, s64)
    e_lse = torch.where(torch.isfinite(e_lse), e_lse, torch.zeros_like(e_lse))
    e_dq, e_dkv, e_dsink = torch.autograd.grad((e_out, e_lse), (q64, kv64, s64),
                                               (dout.double(), dlse.double()))

    assert dq.dtype == dtype and dkv.dtype == dtype and dsink.dtype == torch.float32
    for got in (dq, dkv, dsink):
        assert torch.isfinite(got).all()
    # Rows no valid index reads (poisoned with NaN) get exactly zero gradient.
    unused = counts.sum(0).T == 0
    assert unused.any() and (dkv[unused] == 0).all()
    # Heads with an infinite sink: +inf silences out (grad to q only via lse), -inf is no sink.
    assert dsink[0] == 0 and dsink[1] == 0
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for name, got, want in (("dq", dq, e_dq), ("dkv", dkv, e_dkv), ("dsink", dsink, e_dsink)):
        err = (got.double() - want).norm() / want.norm()
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"


def test_backward_empty_queries_ignore_dlse():
    # A query with no valid key yields zero gradients even for an inf/NaN dlse.
    q = torch.randn(2, 4, 16)
    kv = torch.randn(6, 1, 16)
    idx = torch.tensor([[[1, 3, -1]], [[-5, 6, 99]]], dtype=torch.int32)  # query 1 empty
    sink = torch.tensor([0.5, INF, -INF, -1.0])
    out, _, lse = torch_mla.sparse_prefill(q, kv, idx, 0.25, 8, sink)
    dlse = torch.tensor([[0.0, 0.0, 0.0, 0.0], [float("nan"), INF, -INF, 1.0]])
    dq, dkv, dsink = torch.ops.mla.sparse_prefill_backward(
        torch.randn(2, 4, 8), dlse, q, kv, idx, out, lse, 0.25, 8, sink, None)
    assert torch.isfinite(dq).all() and torch.isfinite(dkv).all() and torch.isfinite(dsink).all()
    assert (dq[1] == 0).all()
    assert (dkv[[0, 2, 4, 5]] == 0).all()  # only rows 1 and 3 are read


# ----------------------------------------------------------------------------- chunking

def test_chunking_does_not_change_results(monkeypatch):
    s_q, s_kv, h_q, h_kv, d_qk, d_v, topk = 7, 30, 8, 2, 32, 16, 12
    q, kv, indices, topk_length = make_case(s_q, s_kv, h_q, h_kv, d_qk, topk, torch.float32, True)
    # Shared rows across queries, so dkv accumulates across chunks too.
    indices = indices % 5
    sink = make_sink(h_q, "finite")
    dout, dlse = torch.randn(s_q, h_q, d_v), torch.randn(s_q, h_q)

    def run():
        fwd = torch_mla.sparse_prefill(q, kv, indices, 0.2, d_v, sink, topk_length)
        bwd = torch.ops.mla.sparse_prefill_backward(dout, dlse, q, kv, indices, fwd[0], fwd[2], 0.2,
                                                    d_v, sink, topk_length)
        return fwd + bwd

    whole = run()
    assert ref_mod._query_chunk(q, indices, backward=True) >= s_q
    monkeypatch.setattr(ref_mod, "CHUNK_BYTES", 1)  # one query per chunk
    assert ref_mod._query_chunk(q, indices, backward=True) == 1
    calls = []
    gather = ref_mod._gather
    monkeypatch.setattr(ref_mod, "_gather", lambda *a: calls.append(1) or gather(*a))
    split = run()
    assert len(calls) == 2 * s_q
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_chunk_budget_at_deepseek_shape():
    # s_q 4096, topk 2048, h_q 128, d_qk 576 (bf16): chunks keep the gathered fp32 rows and the
    # logits within the budget, i.e. a few hundred MB instead of ~19 GB.
    q = torch.empty(4096, 128, 576, dtype=torch.bfloat16, device="meta")
    idx = torch.empty(4096, 1, 2048, dtype=torch.int32, device="meta")
    for backward in (False, True):
        c = ref_mod._query_chunk(q, idx, backward)
        assert 1 <= c < 4096
        rows_fp32 = c * 2048 * 576 * 4 * (2 if backward else 1)
        logits = c * 128 * 2048 * 4
        assert rows_fp32 + logits <= ref_mod.CHUNK_BYTES


def test_moderate_call_is_quick(monkeypatch):
    s_q, s_kv, h_q, h_kv, d_qk, d_v, topk = 256, 2048, 16, 1, 576, 512, 512
    q = torch.randn(s_q, h_q, d_qk, dtype=torch.bfloat16)
    kv = torch.randn(s_kv, h_kv, d_qk, dtype=torch.bfloat16)
    indices = torch.randint(-8, s_kv + 8, (s_q, h_kv, topk), dtype=torch.int32)
    peak = []
    gather = ref_mod._gather

    def watched(*a):
        res = gather(*a)
        peak.append(res[2].numel() * res[2].element_size())
        return res

    monkeypatch.setattr(ref_mod, "_gather", watched)
    t0 = time.perf_counter()
    out, _, lse = torch_mla.sparse_prefill(q.requires_grad_(True), kv.requires_grad_(True), indices,
                                           d_qk ** -0.5, d_v)
    (out.float().square().sum() + lse.sum()).backward()
    elapsed = time.perf_counter() - t0
    assert elapsed < 30, f"took {elapsed:.1f} s"
    assert max(peak) <= ref_mod.CHUNK_BYTES
    assert torch.isfinite(q.grad.float()).all() and torch.isfinite(kv.grad.float()).all()
    # Spot-check a few queries against the formula.
    sel = torch.tensor([0, 101, 255])
    counts = count_matrix(indices[sel], s_kv)
    e_out, _, e_lse = dense_formula(q.detach()[sel], kv.detach(), counts, d_qk ** -0.5, d_v)
    torch.testing.assert_close(out.detach()[sel].double(), e_out, **TOL[torch.bfloat16])
    torch.testing.assert_close(lse[sel].double(), e_lse, rtol=2e-5, atol=2e-5)
