"""Contract of ``mla::sparse_prefill`` and its backward.

q [s_q, h_q, d_qk], kv [s_kv, h_kv, d_qk] (the first d_v columns of kv are the values),
indices [s_q, h_kv, topk] int32 into kv's first dim; topk_length [s_q] int32 keeps only the first
topk_length[i] indices of query i. Outputs: out [s_q, h_q, d_v] (q's dtype), max_logits and lse
[s_q, h_q] f32 (f64 for f64 q; natural-log, of the scaled logits; a query with no valid key gets max_logits -inf,
lse +inf and out 0). attn_sink [h_q] scales out by exp(lse) / (exp(lse) + exp(attn_sink)).

Gradients flow to q, kv and attn_sink from out and lse (max_logits is not differentiable).
"""

from __future__ import annotations

import torch

from .common import (FLOAT_DTYPES, check, check_attn_sink, check_device, check_dtype,
                     check_finite_scale, check_heads, check_index, check_last_dim_contiguous,
                     check_optional_index, check_rank, check_same_dtype, check_shape, check_size,
                     define, stats_dtype)

FWD = define(
    "sparse_prefill(Tensor q, Tensor kv, Tensor indices, float sm_scale, int d_v, "
    "Tensor? attn_sink=None, Tensor? topk_length=None) -> (Tensor out, Tensor max_logits, Tensor lse)"
)
BWD = define(
    "sparse_prefill_backward(Tensor dout, Tensor dlse, Tensor q, Tensor kv, Tensor indices, "
    "Tensor out, Tensor lse, float sm_scale, int d_v, Tensor? attn_sink=None, "
    "Tensor? topk_length=None) -> (Tensor dq, Tensor dkv, Tensor d_attn_sink)"
)


def check_sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink=None, topk_length=None):
    check_rank("q", q, 3, "[s_q, h_q, d_qk]")
    check_rank("kv", kv, 3, "[s_kv, h_kv, d_qk]")
    check_dtype("q", q, FLOAT_DTYPES)
    check_same_dtype("kv", kv, "q", q)
    check_device("kv", kv, "q", q)
    check_last_dim_contiguous("q", q)
    check_last_dim_contiguous("kv", kv)
    s_q, h_q, d_qk = q.shape
    h_kv = kv.shape[1]
    check_size("kv", kv, 2, d_qk, "d_qk of q")
    check_heads(h_q, h_kv)
    check(
        0 < d_v <= d_qk,
        lambda: f"d_v must be in [1, d_qk={d_qk}] (values are kv[..., :d_v]), got {d_v}",
    )
    check_finite_scale(sm_scale)
    check_index("indices", indices, 3, "[s_q, h_kv, topk]", "q", q)
    check_size("indices", indices, 0, s_q, "s_q of q")
    check_size("indices", indices, 1, h_kv, "h_kv of kv")
    check_last_dim_contiguous("indices", indices)
    check_attn_sink(attn_sink, h_q, q)
    check_optional_index("topk_length", topk_length, (s_q,), "[s_q]", "q", q)


@torch.library.register_fake(FWD)
def _sparse_prefill_fake(q, kv, indices, sm_scale, d_v, attn_sink=None, topk_length=None):
    check_sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)
    s_q, h_q, _ = q.shape
    out = q.new_empty((s_q, h_q, d_v))
    max_logits = q.new_empty((s_q, h_q), dtype=stats_dtype(q))
    lse = q.new_empty((s_q, h_q), dtype=stats_dtype(q))
    return out, max_logits, lse


def check_sparse_prefill_backward(dout, dlse, q, kv, indices, out, lse, sm_scale, d_v,
                                  attn_sink=None, topk_length=None):
    check_sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)
    s_q, h_q, _ = q.shape
    for name, t, shape, doc in (("out", out, (s_q, h_q, d_v), "[s_q, h_q, d_v]"),
                                ("dout", dout, (s_q, h_q, d_v), "[s_q, h_q, d_v]"),
                                ("lse", lse, (s_q, h_q), "[s_q, h_q]"),
                                ("dlse", dlse, (s_q, h_q), "[s_q, h_q]")):
        check_shape(name, t, shape, doc)
        check_device(name, t, "q", q)
    check_same_dtype("dout", dout, "q", q)
    check_same_dtype("out", out, "q", q)
    check_dtype("lse", lse, (stats_dtype(q),))
    check_dtype("dlse", dlse, (stats_dtype(q),))


@torch.library.register_fake(BWD)
def _sparse_prefill_backward_fake(dout, dlse, q, kv, indices, out, lse, sm_scale, d_v,
                                  attn_sink=None, topk_length=None):
    check_sparse_prefill_backward(dout, dlse, q, kv, indices, out, lse, sm_scale, d_v,
                                  attn_sink, topk_length)
    d_sink = q.new_empty((q.shape[1],), dtype=torch.float32 if attn_sink is None else attn_sink.dtype)
    return torch.empty_like(q), torch.empty_like(kv), d_sink


def _setup_context(ctx, inputs, output):
    q, kv, indices, sm_scale, d_v, attn_sink, topk_length = inputs
    out, max_logits, lse = output
    ctx.mark_non_differentiable(max_logits)
    ctx.save_for_backward(q, kv, indices, out, lse, attn_sink, topk_length)
    ctx.sm_scale = sm_scale
    ctx.d_v = d_v


def _backward(ctx, dout, dmax_logits, dlse):
    q, kv, indices, out, lse, attn_sink, topk_length = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    if dlse is None:
        dlse = torch.zeros_like(lse)
    dq, dkv, d_sink = torch.ops.mla.sparse_prefill_backward(
        dout.contiguous(), dlse.contiguous(), q, kv, indices, out, lse, ctx.sm_scale, ctx.d_v,
        attn_sink, topk_length)
    return dq, dkv, None, None, None, (d_sink if attn_sink is not None else None), None


torch.library.register_autograd(FWD, _backward, setup_context=_setup_context)
