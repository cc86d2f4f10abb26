"""Triton dense_prefill forward and backward (under TRITON_INTERPRET on CPU) against a float64
formula written here: per sequence and head, a dense masked softmax, with the gradients taken by
float64 autograd of that formula. It shares nothing with the kernels' tiling or masks."""

import math

import pytest
import torch

import torch_mla
from torch_mla.triton import dense_prefill as TP

pytestmark = pytest.mark.skipif(not TP.INTERPRET and not torch.cuda.is_available(),
                                reason="Triton kernels run on CUDA or under TRITON_INTERPRET")

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def formula(q, k, v, lens_q, lens_k, scale, causal, dout=None, dlse=None):
    """float64 (out, lse) and, given dout/dlse, (dq, dk, dv). Padding tokens (past the last
    sequence) and queries with no key: out 0, lse +inf, no gradient."""
    q, k, v = (x.detach().double().cpu().requires_grad_(True) for x in (q, k, v))
    t_q, h_q, _ = q.shape
    h_k = k.shape[1]
    g = h_q // h_k
    outs = torch.zeros(t_q, h_q, v.shape[2], dtype=torch.float64)
    lses = torch.full((t_q, h_q), math.inf, dtype=torch.float64)
    loss = 0.0
    q0 = k0 = 0
    for sq, sk in zip(lens_q, lens_k):
        for h in range(h_q):
            qs, ks, vs = q[q0:q0 + sq, h], k[k0:k0 + sk, h // g], v[k0:k0 + sk, h // g]
            s = qs @ ks.T * scale
            i = torch.arange(sq)[:, None]
            j = torch.arange(sk)[None, :]
            vis = (j <= i + sk - sq) if causal else torch.ones(sq, sk, dtype=torch.bool)
            rows = vis.any(1)
            if not rows.any():
                continue
            s = s[rows].masked_fill(~vis[rows], -math.inf)
            lse = torch.logsumexp(s, 1)
            o = torch.softmax(s, 1) @ vs
            idx = torch.nonzero(rows)[:, 0] + q0
            outs[idx, h] = o.detach()
            lses[idx, h] = lse.detach()
            if dout is not None:
                loss = loss + (o * dout[idx, h].double().cpu()).sum() \
                    + (lse * dlse[idx, h].double().cpu()).sum()
        q0 += sq
        k0 += sk
    if dout is None:
        return outs, lses
    if isinstance(loss, float):
        grads = [torch.zeros_like(x) for x in (q, k, v)]
    else:
        grads = torch.autograd.grad(loss, (q, k, v), allow_unused=True)
        grads = [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, (q, k, v))]
    return outs, lses, grads


def make(lens_q, lens_k, h_q, h_k, d_qk, d_v, pad=3, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t_q, t_k = sum(lens_q) + pad, sum(lens_k) + pad
    q = torch.randn(t_q, h_q, d_qk, generator=gen).to(dtype)
    k = torch.randn(t_k, h_k, d_qk, generator=gen).to(dtype)
    v = torch.randn(t_k, h_k, d_v, generator=gen).to(dtype)
    # padding tokens hold NaN: they must be neither read into a sequence nor leak
    q[sum(lens_q):] = math.nan
    k[sum(lens_k):] = math.nan
    v[sum(lens_k):] = math.nan
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return q.to(DEV), k.to(DEV), v.to(DEV), cu(lens_q).to(DEV), cu(lens_k).to(DEV)


def rel(a, b):
    return ((a.double().cpu() - b).norm() / b.norm().clamp_min(1e-12)).item()


def check(lens_q, lens_k, h_q, h_k, d_qk, d_v, causal, dtype=torch.bfloat16, seed=0,
          backward=True, tol=2e-2):
    q, k, v, cu_q, cu_k = make(lens_q, lens_k, h_q, h_k, d_qk, d_v, dtype=dtype, seed=seed)
    scale = d_qk ** -0.5
    q.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    with torch_mla.use_backend("triton"):
        out, lse = torch_mla.dense_prefill(q, k, v, cu_q, cu_k, max(lens_q + [0]),
                                           max(lens_k + [0]), sm_scale=scale, causal=causal)
    assert out.dtype == dtype and lse.dtype == torch.float32
    gen = torch.Generator().manual_seed(seed + 100)
    dout = torch.randn(out.shape, generator=gen).to(dtype).to(DEV)
    dlse = torch.randn(lse.shape, generator=gen).to(DEV)
    ref_out, ref_lse, ref_grads = formula(q, k, v, lens_q, lens_k, scale, causal, dout, dlse)
    out_c, lse_c = out.detach().double().cpu(), lse.detach().double().cpu()
    none = ref_lse.isinf()
    assert not out_c.isnan().any() and not lse_c.isnan().any()
    assert torch.equal(lse_c.isinf(), none) and (lse_c[none] > 0).all()
    assert (out_c[none] == 0).all()
    torch.testing.assert_close(out_c, ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse_c[~none], ref_lse[~none], atol=1e-4, rtol=1e-4)
    if not backward:
        return
    with torch_mla.use_backend("triton"):
        grads = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
    for name, got, want in zip("qkv", grads, ref_grads):
        assert got.dtype == dtype
        assert not got.isnan().any(), name
        # padding tokens and keys/queries outside every sequence get exactly zero
        assert (got.double().cpu()[want.abs().sum((1, 2)) == 0] == 0).all(), name
        assert rel(got, want) < tol, (name, rel(got, want))


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_gqa_small_dims(causal):
    # empty query sequence, empty key sequence, s_k < s_q (causal: first queries see nothing),
    # s_k > s_q, GQA 4 -> 2, d_qk 24 = 16 + 8 masked, d_v 16
    check([5, 0, 37, 20, 6], [9, 4, 37, 3, 0], 4, 2, 24, 16, causal, seed=int(causal))


@pytest.mark.parametrize("causal", [True, False])
def test_deepseek_dims_192_128(causal):
    check([33, 17], [40, 17], 2, 1, 192, 128, causal, seed=2 + int(causal))


def test_head_dim_128_fp16():
    check([29, 50], [29, 50], 2, 2, 128, 128, True, dtype=torch.float16, seed=4)


def test_production_tiles_under_interpreter(monkeypatch):
    # the tile sizes the GPU uses (the CPU default is 16 x 16)
    monkeypatch.setattr(TP, "FWD_CFG", (128, 64, 8, 3))
    monkeypatch.setattr(TP, "DKDV_CFG", (64, 128, 8, 2, True))
    monkeypatch.setattr(TP, "DQ_CFG", (128, 64, 8, 3))
    check([150, 70], [130, 90], 2, 1, 192, 128, True, seed=5)


def test_dkdv_transposed_and_plain_agree(monkeypatch):
    # the dk/dv kernel's two formulations (S^T = K Q^T or S = Q K^T then transposed)
    monkeypatch.setattr(TP, "DKDV_CFG", (16, 32, 4, 1, False))
    monkeypatch.setattr(TP, "DQ_CFG", (32, 16, 4, 1))
    check([21, 40], [45, 40], 4, 1, 24, 16, True, seed=6)


def test_no_sequences_and_all_padding():
    q, k, v, _, _ = make([], [], 2, 2, 24, 16, pad=5)
    cu = torch.zeros(1, dtype=torch.int32, device=DEV)
    with torch_mla.use_backend("triton"):
        out, lse = torch_mla.dense_prefill(q, k, v, cu, cu, 0, 0, causal=True)
        dq, dk, dv = torch.ops.mla.dense_prefill_backward(
            torch.randn_like(out), torch.randn_like(lse), q, k, v, out, lse, cu, cu, 0, 0,
            0.2, True)
    assert (out == 0).all() and lse.isinf().all() and (lse > 0).all()
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


def test_keys_without_queries_get_zero_grad():
    # the second sequence has keys but no queries: its dk, dv are written as exact zeros
    check([12, 0], [12, 20], 2, 2, 24, 16, False, seed=7)


def test_supports_says_why_not():
    q, k, v, cu_q, cu_k = make([4], [4], 2, 2, 24, 16)
    assert TP.supports(q, k, v, cu_q, cu_k, 4, 4, 0.1) == []
    assert any("float32" in r for r in TP.supports(q.float(), k.float(), v.float(), cu_q, cu_k,
                                                   4, 4, 0.1))
    big = torch.zeros(4, 2, 576, dtype=torch.bfloat16)
    assert any("576" in r for r in TP.supports(big, big, big[..., :512], cu_q, cu_k, 4, 4, 0.1))
