"""Indexer training ops: indexer_scores (differentiable), the attention targets, the KL loss, and a
tiny compiled end-to-end distillation (dense warm-up, then sparse stage)."""

import pytest
import torch
import torch.nn.functional as F

import torch_mla
from torch_mla import dsa
from torch_mla.reference import indexer as ref_indexer
from samples import SAMPLES

NEG_INF = float("-inf")


def _indices(shape, high, gen, invalid_frac=0.25):
    idx = torch.randint(0, high, shape, generator=gen, dtype=torch.int32)
    bad = torch.rand(shape, generator=gen) < invalid_frac
    junk = torch.where(torch.rand(shape, generator=gen) < 0.5, -1, high + 2).to(torch.int32)
    return torch.where(bad, junk, idx)


# ---------------------------------------------------------------------------------------------
# indexer_scores
# ---------------------------------------------------------------------------------------------

def scores64(q, k, w, idx):
    valid = (idx >= 0) & (idx < k.shape[0])
    rows = k.double()[idx.long().clamp(0, k.shape[0] - 1)]  # [s_q, topk, d]
    s = torch.einsum("thd,tjd->thj", q.double(), rows).clamp_min(0)
    val = torch.einsum("th,thj->tj", w.double(), s)
    return torch.where(valid, val, NEG_INF)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scores_match_float64(dtype, monkeypatch):
    monkeypatch.setattr(ref_indexer, "CHUNK_BYTES", 4000)  # several query chunks
    g = torch.Generator().manual_seed(0)
    s_q, h, d, s_k, topk = 9, 4, 16, 11, 7
    q = torch.randn(s_q, h, d, generator=g).to(dtype)
    k = torch.randn(s_k, d, generator=g).to(dtype)
    w = torch.randn(s_q, h, generator=g)
    idx = _indices((s_q, topk), s_k, g)
    idx[2] = -1  # a query with nothing valid
    idx[3, :2] = 4  # a duplicate
    out = torch_mla.indexer_scores(q, k, w, idx)
    assert out.dtype == torch.float32 and out.shape == (s_q, topk)
    want = scores64(q, k, w, idx)
    assert torch.equal(torch.isinf(out), torch.isinf(want))
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_scores_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    s_q, h, d, s_k, topk = 5, 3, 6, 7, 6
    q = torch.randn(s_q, h, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(s_k, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(s_q, h, generator=g, dtype=torch.float64, requires_grad=True)
    idx = _indices((s_q, topk), s_k, g)
    idx[0, :3] = 2  # duplicates accumulate into dk
    valid = (idx >= 0) & (idx < s_k)

    def f(q, k, w):  # -inf entries have no gradient; gradcheck needs finite outputs
        return torch.where(valid, torch_mla.indexer_scores(q, k, w, idx), 0.0)

    assert torch.autograd.gradcheck(f, (q, k, w), eps=1e-6, atol=1e-6)


def test_scores_backward_matches_float64_autograd_and_ignores_grads_at_invalid():
    g = torch.Generator().manual_seed(2)
    s_q, h, d, s_k, topk = 6, 4, 8, 9, 5
    q = torch.randn(s_q, h, d, generator=g).to(torch.bfloat16).requires_grad_()
    k = torch.randn(s_k, d, generator=g).to(torch.bfloat16).requires_grad_()
    w = torch.randn(s_q, h, generator=g).requires_grad_()
    idx = _indices((s_q, topk), s_k, g)
    out = torch_mla.indexer_scores(q, k, w, idx)
    grad = torch.randn(s_q, topk, generator=g)
    valid = (idx >= 0) & (idx < s_k)
    grad_given = torch.where(valid, grad, float("nan"))  # NaN at -inf entries must not leak
    dq, dk, dw = torch.autograd.grad(out, (q, k, w), grad_given)
    q64, k64, w64 = (t.detach().double().requires_grad_() for t in (q, k, w))
    want = torch.where(valid, scores64(q64, k64, w64, idx), 0.0)
    dq64, dk64, dw64 = torch.autograd.grad(want, (q64, k64, w64), torch.where(valid, grad, 0.0).double())
    for got, ref in ((dq, dq64), (dk, dk64), (dw, dw64)):
        assert got.dtype == (torch.float32 if ref is dw64 else torch.bfloat16)
        torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=2e-2)


def test_scores_opcheck_with_grad():
    for _, args in SAMPLES["indexer_scores"](requires_grad=True):
        torch.library.opcheck(torch.ops.mla.indexer_scores.default, args)


# ---------------------------------------------------------------------------------------------
# attention targets
# ---------------------------------------------------------------------------------------------

def head_summed_probs64(q, kv, sm_scale, valid_keys):
    """q [s_q, h, d], keys [s_q, n, d] (per query), valid [s_q, n] -> [s_q, n]: per-head softmax
    over the valid keys, summed over heads, renormalised (0 rows for queries without keys)."""
    logits = torch.einsum("thd,tnd->thn", q.double(), kv.double()) * sm_scale
    logits = logits.masked_fill(~valid_keys[:, None, :], NEG_INF)
    any_valid = valid_keys.any(-1)
    p = torch.softmax(torch.where(any_valid[:, None, None], logits, 0.0), -1)
    p = torch.where(valid_keys[:, None, :], p, 0.0).sum(1)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    return torch.where(any_valid[:, None], p, 0.0)


@pytest.mark.parametrize("with_lens", [False, True])
def test_sparse_attn_scores_match_float64_and_sum_to_one(with_lens, monkeypatch):
    monkeypatch.setattr(ref_indexer, "CHUNK_BYTES", 6000)
    g = torch.Generator().manual_seed(3)
    s_q, h, d, s_kv, topk = 8, 4, 32, 13, 6
    q = torch.randn(s_q, h, d, generator=g).to(torch.bfloat16)
    kv = torch.randn(s_kv, 1, d, generator=g).to(torch.bfloat16)
    idx = _indices((s_q, 1, topk), s_kv, g)
    idx[1, 0] = -1  # a query with nothing valid
    idx[4, 0, :3] = 5  # duplicates count once per occurrence
    lens = torch.randint(0, topk + 1, (s_q,), generator=g, dtype=torch.int32) if with_lens else None
    scale = d ** -0.5
    _, _, lse = torch_mla.sparse_prefill(q, kv, idx, scale, d, topk_length=lens)
    p = torch_mla.sparse_attn_scores(q, kv, idx, lse, scale, topk_length=lens)
    assert p.dtype == torch.float32 and p.shape == (s_q, topk)
    ii = idx[:, 0].long()
    valid = (ii >= 0) & (ii < s_kv)
    if lens is not None:
        valid &= torch.arange(topk) < lens[:, None].long()
    want = head_summed_probs64(q, kv[:, 0][ii.clamp(0, s_kv - 1)], scale, valid)
    torch.testing.assert_close(p.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.all(p[~valid] == 0)
    sums = p.sum(-1)
    torch.testing.assert_close(sums[valid.any(-1)], torch.ones(int(valid.any(-1).sum())))
    assert torch.all(sums[~valid.any(-1)] == 0)


def test_dense_attn_scores_match_float64_and_sum_to_one(monkeypatch):
    monkeypatch.setattr(ref_indexer, "CHUNK_BYTES", 3000)  # query and key chunks
    g = torch.Generator().manual_seed(4)
    s_q, h, d, s_k = 10, 4, 16, 40
    q = torch.randn(s_q, h, d, generator=g)
    kv = torch.randn(s_k, 1, d, generator=g)
    k_start = torch.randint(-2, 20, (s_q,), generator=g, dtype=torch.int32)
    k_end = torch.randint(5, s_k + 4, (s_q,), generator=g, dtype=torch.int32)
    k_end[3] = k_start[3]  # empty window
    scale = 0.3
    idx = dsa.window_indices(k_start, k_end, s_k)
    _, _, lse = torch_mla.sparse_prefill(q, kv, idx[:, None], scale, d)
    p = torch_mla.dense_attn_scores(q, kv, lse, scale, k_start, k_end)
    assert p.shape == (s_q, s_k) and p.dtype == torch.float32
    cols = torch.arange(s_k)
    inside = (cols >= k_start[:, None].long()) & (cols < k_end[:, None].long())
    want = head_summed_probs64(q, kv[:, 0].expand(s_q, s_k, d), scale, inside)
    torch.testing.assert_close(p.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.all(p[~inside] == 0) and torch.all(p[3] == 0)
    torch.testing.assert_close(p.sum(-1)[inside.any(-1)], torch.ones(int(inside.any(-1).sum())))
    # whole rows when the window is absent
    lse_all = torch.logsumexp(torch.einsum("thd,sd->ths", q, kv[:, 0]) * scale, -1)
    p_all = torch_mla.dense_attn_scores(q, kv, lse_all, scale)
    want_all = head_summed_probs64(q, kv[:, 0].expand(s_q, s_k, d), scale,
                                   torch.ones(s_q, s_k, dtype=torch.bool))
    torch.testing.assert_close(p_all.double(), want_all, rtol=1e-5, atol=1e-6)


def test_attention_targets_are_not_differentiable():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, 2, 8, generator=g, requires_grad=True)
    kv = torch.randn(5, 1, 8, generator=g, requires_grad=True)
    idx = torch.randint(0, 5, (3, 1, 4), generator=g, dtype=torch.int32)
    _, _, lse = torch_mla.sparse_prefill(q, kv, idx, d_v=8)
    p = torch_mla.sparse_attn_scores(q, kv, idx, lse)
    assert not p.requires_grad and p.grad_fn is None
    p = torch_mla.dense_attn_scores(q, kv, lse)
    assert not p.requires_grad


# ---------------------------------------------------------------------------------------------
# KL loss
# ---------------------------------------------------------------------------------------------

def test_kl_loss_matches_kl_div_on_dense_rows():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(7, 11, generator=g, requires_grad=True)
    p = torch.softmax(torch.randn(7, 11, generator=g) * 2, -1)
    loss = dsa.indexer_kl_loss(logits, p)
    want = F.kl_div(F.log_softmax(logits, -1), p, reduction="batchmean")
    torch.testing.assert_close(loss, want)
    g1, = torch.autograd.grad(loss, logits)
    g2, = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(dsa.indexer_kl_loss(logits, p, reduction="sum"),
                               F.kl_div(F.log_softmax(logits, -1), p, reduction="sum"))
    torch.testing.assert_close(dsa.indexer_kl_loss(logits, p, reduction="none"),
                               F.kl_div(F.log_softmax(logits, -1), p, reduction="none").sum(-1))
    # equal distributions: zero loss
    same = dsa.indexer_kl_loss(torch.log(p), p)
    torch.testing.assert_close(same, torch.zeros(()), atol=1e-6, rtol=0)


def test_kl_loss_zero_probs_and_minus_inf_logits_give_no_nan():
    logits = torch.tensor([[1.0, NEG_INF, 0.5, NEG_INF],
                           [NEG_INF, NEG_INF, NEG_INF, NEG_INF],  # a query without keys
                           [2.0, -1.0, 0.0, 3.0]], requires_grad=True)
    p = torch.tensor([[0.25, 0.0, 0.75, 0.0],
                      [0.0, 0.0, 0.0, 0.0],
                      [0.0, 0.5, 0.0, 0.5]])
    loss = dsa.indexer_kl_loss(logits, p, reduction="none")
    # row 0 over its finite entries; row 1 contributes 0; row 2 with 0 log 0 = 0
    lq0 = torch.log_softmax(torch.tensor([1.0, 0.5]), -1)
    want0 = (torch.tensor([0.25, 0.75]) * (torch.log(torch.tensor([0.25, 0.75])) - lq0)).sum()
    lq2 = torch.log_softmax(logits[2].detach(), -1)
    want2 = 0.5 * (torch.log(torch.tensor(0.5)) - lq2[1]) + 0.5 * (torch.log(torch.tensor(0.5)) - lq2[3])
    torch.testing.assert_close(loss, torch.stack([want0, torch.tensor(0.0), want2]))
    grad, = torch.autograd.grad(loss.mean(), logits)
    assert torch.isfinite(grad).all()
    assert torch.all(grad[1] == 0) and grad[0, 1] == 0 and grad[0, 3] == 0
    # mass where the indexer says -inf: the true KL, +inf (not NaN)
    bad = dsa.indexer_kl_loss(torch.tensor([[0.0, NEG_INF]]), torch.tensor([[0.5, 0.5]]))
    assert bad.item() == float("inf")


def test_window_indices():
    out = dsa.window_indices(torch.tensor([0, 2, -1], dtype=torch.int32),
                             torch.tensor([1, 4, 9], dtype=torch.int32), 5)
    assert out.dtype == torch.int32
    assert out.tolist() == [[0, -1, -1, -1, -1], [-1, -1, 2, 3, -1], [0, 1, 2, 3, 4]]
    assert dsa.window_indices(None, None, 3, s_q=2).tolist() == [[0, 1, 2], [0, 1, 2]]


# ---------------------------------------------------------------------------------------------
# end to end: dense warm-up, then sparse stage, compiled
# ---------------------------------------------------------------------------------------------

class TinyIndexer(torch.nn.Module):
    def __init__(self, d_model, heads, d_index, gen):
        super().__init__()
        self.heads, self.d_index = heads, d_index
        self.wq = torch.nn.Parameter(torch.randn(d_model, heads * d_index, generator=gen) * 0.3)
        self.wk = torch.nn.Parameter(torch.randn(d_model, d_index, generator=gen) * 0.3)
        self.ww = torch.nn.Parameter(torch.randn(d_model, heads, generator=gen) * 0.3)

    def forward(self, x):
        q = (x @ self.wq).view(x.shape[0], self.heads, self.d_index)
        return q, x @ self.wk, x @ self.ww


def test_tiny_indexer_distillation_dense_then_sparse_compiled():
    g = torch.Generator().manual_seed(7)
    s, d_model, h, d_qk, topk = 24, 16, 4, 16, 6
    x = torch.randn(s, d_model, generator=g)
    # the (frozen) main attention the indexer learns to imitate: causal over one sequence
    q = torch.randn(s, h, d_qk, generator=g) * 2
    kv = torch.randn(s, 1, d_qk, generator=g)
    scale = d_qk ** -0.5
    k_start = torch.zeros(s, dtype=torch.int32)
    k_end = torch.arange(1, s + 1, dtype=torch.int32)
    model = TinyIndexer(d_model, 2, 8, g)

    def dense_loss(x):
        idx = dsa.window_indices(k_start, k_end, s)
        _, _, lse = torch_mla.sparse_prefill(q, kv, idx[:, None], scale, d_qk)
        p = torch_mla.dense_attn_scores(q, kv, lse, scale, k_start, k_end)
        qi, ki, w = model(x)
        return dsa.indexer_kl_loss(torch_mla.indexer_scores(qi, ki, w, idx), p)

    def sparse_loss(x):
        qi, ki, w = model(x)
        # selection with the inference path: Hadamard + FP8 logits, top-k
        q_fp8, q_scale = torch_mla.indexer_quantize(qi.detach())
        k_fp8, k_scale = torch_mla.indexer_quantize(ki.detach())
        logits = torch_mla.indexer_logits(q_fp8, k_fp8, k_scale, w.detach() * q_scale,
                                          k_start, k_end)
        idx = torch_mla.indexer_topk(logits, topk)
        _, _, lse = torch_mla.sparse_prefill(q, kv, idx[:, None], scale, d_qk)
        p = torch_mla.sparse_attn_scores(q, kv, idx[:, None], lse, scale)
        return dsa.indexer_kl_loss(torch_mla.indexer_scores(qi, ki, w, idx), p)

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for fn in (dense_loss, sparse_loss):
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), fn(x))  # compiled == eager
        losses = []
        for _ in range(8):
            opt.zero_grad()
            loss = compiled(x)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert all(map(lambda v: v == v, losses))
        assert losses[-1] < 0.8 * losses[0], (fn.__name__, losses)
