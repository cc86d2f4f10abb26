"""Reference dense_prefill (forward and backward) against an independent float64 formula.

The formula cuts the packed tokens into sequences on the host and runs plain per-sequence
attention with an explicit index-built mask; its gradients come from torch.autograd, so the
reference's hand-written backward is checked against autograd of an independent forward.
"""

import importlib
import math

import pytest
import torch

import torch_mla

REF = importlib.import_module("torch_mla.reference.dense_prefill")


def formula(q, k, v, cu_q, cu_k, sm_scale, causal):
    """Differentiable float64 (out [t_q, h_q, d_v], lse [t_q, h_q]); +inf / 0 for a query with
    no key and for padding tokens past cu_q[-1]."""
    t_q, h_q, _ = q.shape
    h_k, d_v = v.shape[1], v.shape[2]
    g = h_q // h_k
    q, k, v = q.double(), k.double(), v.double()
    outs, lses = [], []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cq) - 1):
        qi = q[cq[i]:cq[i + 1]]  # [s_q, h_q, d]
        ki = k[ck[i]:ck[i + 1]].repeat_interleave(g, dim=1)  # [s_k, h_q, d]
        vi = v[ck[i]:ck[i + 1]].repeat_interleave(g, dim=1)
        s_q, s_k = qi.shape[0], ki.shape[0]
        mask = torch.ones(s_q, s_k, dtype=torch.bool)
        if causal:
            mask = torch.tensor([[c <= r + s_k - s_q for c in range(s_k)] for r in range(s_q)],
                                dtype=torch.bool).reshape(s_q, s_k)
        s = torch.einsum("qhd,khd->hqk", qi, ki) * sm_scale
        has = mask.any(-1)  # [s_q]
        # rows with no key use finite logits (0) so logsumexp and its gradient stay finite
        s = torch.where(mask, s, -math.inf)
        s = torch.where(has[:, None], s, 0.0)
        lse = torch.logsumexp(s, -1)  # [h, s_q]
        p = torch.where(mask & has[:, None], torch.exp(s - lse[..., None]), 0.0)
        o = torch.einsum("hqk,khv->qhv", p, vi)
        outs.append(torch.where(has[:, None, None], o, 0.0))
        lses.append(torch.where(has[None, :], lse, math.inf).T)
    pad = t_q - cq[-1]
    outs.append(q.new_zeros(pad, h_q, d_v))
    lses.append(torch.full((pad, h_q), math.inf, dtype=torch.float64))
    return torch.cat(outs), torch.cat(lses)


def make_inputs(lens_q, lens_k, h_q, h_k, d_qk, d_v, dtype, gen, pad_q=0, pad_k=0):
    cu_q = torch.tensor([0] + lens_q, dtype=torch.int64).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, dtype=torch.int64).cumsum(0).to(torch.int32)
    t_q, t_k = int(cu_q[-1]) + pad_q, int(cu_k[-1]) + pad_k
    q = torch.randn(t_q, h_q, d_qk, generator=gen).to(dtype)
    k = torch.randn(t_k, h_k, d_qk, generator=gen).to(dtype)
    v = torch.randn(t_k, h_k, d_v, generator=gen).to(dtype)
    return q, k, v, cu_q, cu_k, max(lens_q + [0]), max(lens_k + [0])


def masked_lse(lse):
    """lse with its +inf entries (no key) replaced by 0, so losses and gradcheck stay finite."""
    return torch.where(lse.isinf(), 0.0, lse)


CASES = {
    # name: (lens_q, lens_k, h_q, h_k, d_qk, d_v, padding q tokens, padding k tokens)
    "deepseek_dims": ([5, 0, 9, 3], [5, 4, 12, 2], 4, 2, 192, 128, 0, 0),
    "small_sq_gt_sk": ([6, 4, 1], [3, 4, 0], 4, 2, 16, 8, 2, 3),
    "mha_small": ([7, 2], [7, 11], 3, 3, 24, 12, 0, 0),
    "one_seq_gqa4": ([13], [9], 4, 1, 32, 16, 1, 0),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_against_formula(case, causal):
    lq, lk, h_q, h_k, d_qk, d_v, pq, pk = CASES[case]
    gen = torch.Generator().manual_seed(len(case) * 31 + causal)
    q, k, v, cu_q, cu_k, mq, mk = make_inputs(lq, lk, h_q, h_k, d_qk, d_v, torch.float32, gen,
                                              pq, pk)
    scale = 0.7 * d_qk ** -0.5
    out, lse = torch_mla.dense_prefill(q, k, v, cu_q, cu_k, mq, mk, sm_scale=scale, causal=causal)
    ref_out, ref_lse = formula(q, k, v, cu_q, cu_k, scale, causal)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert torch.equal(lse.isinf(), ref_lse.isinf())
    assert (out[ref_lse.isinf()] == 0).all()
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_no_key_queries_are_empty():
    """s_q > s_k with causal leaves the first queries without keys; an empty key sequence and
    padding tokens too: all get out 0 and lse +inf."""
    gen = torch.Generator().manual_seed(1)
    q, k, v, cu_q, cu_k, mq, mk = make_inputs([4, 3], [2, 0], 2, 1, 8, 8, torch.float32, gen,
                                              pad_q=2)
    out, lse = torch_mla.dense_prefill(q, k, v, cu_q, cu_k, mq, mk, causal=True)
    no_key = torch.tensor([1, 1, 0, 0, 1, 1, 1, 1, 1], dtype=torch.bool)
    assert torch.equal(lse.isinf().all(-1), no_key) and torch.equal(lse.isinf().any(-1), no_key)
    assert (lse[no_key] == math.inf).all() and (out[no_key] == 0).all()


def test_chunked_rows(monkeypatch):
    monkeypatch.setattr(REF, "_BUDGET", 50)  # one query row per chunk
    gen = torch.Generator().manual_seed(2)
    q, k, v, cu_q, cu_k, mq, mk = make_inputs([5, 0, 4], [6, 3, 4], 4, 2, 16, 8, torch.float64,
                                              gen, 1, 1)
    out, lse = torch_mla.dense_prefill(q, k, v, cu_q, cu_k, mq, mk, sm_scale=0.3, causal=True)
    ref_out, ref_lse = formula(q, k, v, cu_q, cu_k, 0.3, True)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-12)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.ops.mla.dense_prefill_backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, mq,
                                                 mk, 0.3, True)
    monkeypatch.setattr(REF, "_BUDGET", 1 << 22)
    whole = torch.ops.mla.dense_prefill_backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, mq,
                                                 mk, 0.3, True)
    for a, b in zip(grads, whole):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.fixture
def one_thread():
    """gradcheck makes hundreds of tiny op calls; intra-op threads only add contention there."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradcheck(causal, one_thread):
    """fp64 gradcheck of (q, k, v) -> (out, lse) through the public op and its autograd formula,
    with GQA, an empty query sequence, s_q != s_k, and padding query tokens."""
    gen = torch.Generator().manual_seed(3 + causal)
    q, k, v, cu_q, cu_k, mq, mk = make_inputs([3, 0, 2], [2, 3, 3], 4, 2, 4, 3, torch.float64,
                                              gen, pad_q=1)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()

    def fn(q, k, v):
        out, lse = torch_mla.dense_prefill(q, k, v, cu_q, cu_k, mq, mk, sm_scale=0.8,
                                           causal=causal)
        return out, masked_lse(lse)

    assert torch.autograd.gradcheck(fn, (q, k, v), atol=1e-7, rtol=1e-5)


def _grads(fn, q, k, v, dout, dlse):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out.double() * dout).sum() + (masked_lse(lse.double()) * dlse).sum()
    return (out.detach(), lse.detach()) + torch.autograd.grad(loss, (q, k, v))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bf16_forward_backward(causal):
    """bf16 through the public op (fp32 math inside) against fp64 autograd of the formula on the
    same (bf16-exact) inputs; loose tolerance for bf16 outputs and gradients."""
    gen = torch.Generator().manual_seed(10 + causal)
    q, k, v, cu_q, cu_k, mq, mk = make_inputs([9, 0, 17], [12, 5, 17], 4, 2, 192, 128,
                                              torch.bfloat16, gen, pad_q=1)
    dout = torch.randn(q.shape[0], 4, 128, generator=gen, dtype=torch.float64)
    dlse = torch.randn(q.shape[0], 4, generator=gen, dtype=torch.float64)
    scale = 192 ** -0.5

    got = _grads(lambda q, k, v: torch_mla.dense_prefill(q, k, v, cu_q, cu_k, mq, mk,
                                                         sm_scale=scale, causal=causal),
                 q, k, v, dout.bfloat16().double(), dlse.float().double())
    want = _grads(lambda q, k, v: formula(q, k, v, cu_q, cu_k, scale, causal),
                  q.double(), k.double(), v.double(), dout.bfloat16().double(),
                  dlse.float().double())
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    for name, a in zip(("dq", "dk", "dv"), got[2:]):
        assert a.dtype == torch.bfloat16, name
        assert not a.isnan().any(), name
    assert torch.equal(got[1].isinf(), want[1].isinf())
    assert rel_err(got[0], want[0]) < 1e-2
    assert rel_err(masked_lse(got[1]), masked_lse(want[1])) < 1e-4
    for name, a, b in zip(("dq", "dk", "dv"), got[2:], want[2:]):
        assert rel_err(a, b) < 2e-2, name


def test_backward_op_fp32_with_dlse_on_empty_rows():
    """The backward op called directly: nonzero dout/dlse on queries with no key (and padding)
    must add nothing and produce no NaN; matches fp64 autograd of the formula."""
    gen = torch.Generator().manual_seed(21)
    q, k, v, cu_q, cu_k, mq, mk = make_inputs([4, 2, 3], [2, 0, 5], 4, 2, 20, 12,
                                              torch.float32, gen, pad_q=2, pad_k=1)
    out, lse = torch_mla.dense_prefill(q, k, v, cu_q, cu_k, mq, mk, sm_scale=0.4, causal=True)
    assert lse.isinf().any()
    dout = torch.randn(out.shape, generator=gen)
    dlse = torch.randn(lse.shape, generator=gen).masked_fill(lse.isinf(), 0.0)
    # a NaN upstream gradient of an lse that is +inf (e.g. from merging lse's) must not leak
    dq, dk, dv = torch.ops.mla.dense_prefill_backward(
        dout, dlse.masked_fill(lse.isinf(), math.nan), q, k, v, out, lse, cu_q, cu_k, mq, mk,
        0.4, True)
    want = _grads(lambda q, k, v: formula(q, k, v, cu_q, cu_k, 0.4, True), q.double(),
                  k.double(), v.double(), dout.double(), dlse.double())
    for name, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), want[2:]):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5, msg=name)
    assert (dq[lse.isinf().all(-1)] == 0).all()
    assert (dk[-1] == 0).all() and (dv[-1] == 0).all()  # the padding key token


def test_strided_inputs():
    """Inputs contiguous only in their last dimension (the contract's requirement)."""
    gen = torch.Generator().manual_seed(4)
    q, k, v, cu_q, cu_k, mq, mk = make_inputs([3, 5], [4, 6], 4, 2, 16, 8, torch.float32, gen)
    qs = torch.randn(4, q.shape[0], 16, generator=gen).transpose(0, 1)  # [t_q, h_q, d] strided
    qs.copy_(q)
    ks = torch.randn(k.shape[0], 2, 40, generator=gen)[..., 3:19]
    ks.copy_(k)
    got = torch_mla.dense_prefill(qs, ks, v, cu_q, cu_k, mq, mk, causal=True)
    want = torch_mla.dense_prefill(q, k, v, cu_q, cu_k, mq, mk, causal=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    dout = torch.randn(4, q.shape[0], 8, generator=gen).transpose(0, 1)
    args = (cu_q, cu_k, mq, mk, 0.25, True)
    got = torch.ops.mla.dense_prefill_backward(dout, want[1], qs, ks, v, want[0], want[1], *args)
    ref = torch.ops.mla.dense_prefill_backward(dout.contiguous(), want[1], q, k, v, want[0],
                                               want[1], *args)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_reads_no_value_on_host():
    """On meta tensors any read of data on the host would raise."""
    q = torch.empty(7, 4, 16, device="meta")
    k = torch.empty(9, 2, 16, device="meta")
    v = torch.empty(9, 2, 8, device="meta")
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    out, lse = REF.dense_prefill(q, k, v, cu, cu, 5, 5, 0.5, True)
    assert out.shape == (7, 4, 8) and lse.shape == (7, 4)
    grads = REF.dense_prefill_backward(out, lse, q, k, v, out, lse, cu, cu, 5, 5, 0.5, True)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_nan_in_padding_tokens_never_leaks():
    """Tokens past cu_seqlens[-1] belong to no sequence: NaN there reaches neither out, lse nor
    the gradients of the real tokens (and their own gradients are 0)."""
    g = torch.Generator().manual_seed(11)
    cu_q = torch.tensor([0, 3, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 7], dtype=torch.int32)
    q = torch.randn(5 + 2, 4, 16, generator=g, dtype=torch.float64)  # 2 padding query tokens
    k = torch.randn(7 + 3, 2, 16, generator=g, dtype=torch.float64)  # 3 padding key tokens
    v = torch.randn(7 + 3, 2, 8, generator=g, dtype=torch.float64)
    for t in (q[5:], k[7:], v[7:]):
        t.fill_(float("nan"))
    for causal in (False, True):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = torch_mla.dense_prefill(*leaves, cu_q, cu_k, 3, 4, causal=causal)
        clean = [x[:n].clone().requires_grad_() for x, n in ((q, 5), (k, 7), (v, 7))]
        out_c, lse_c = torch_mla.dense_prefill(*clean, cu_q, cu_k, 3, 4, causal=causal)
        torch.testing.assert_close(out[:5], out_c)
        torch.testing.assert_close(lse[:5], lse_c)
        assert (out[5:] == 0).all() and (lse[5:] == float("inf")).all()
        weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
        (out * weights).sum().backward()
        (out_c * weights[:5]).sum().backward()
        for full, part, n in zip(leaves, clean, (5, 7, 7)):
            torch.testing.assert_close(full.grad[:n], part.grad)
            assert (full.grad[n:] == 0).all()
