"""Contract of ``mla::dense_prefill`` (MHA-mode prefill, varlen) and its backward.

q [t_q, h_q, d_qk], k [t_k, h_k, d_qk], v [t_k, h_k, d_v] (DeepSeek: d_qk 192, d_v 128; GQA when
h_q is a multiple of h_k); cu_seqlens_q/k [b + 1] int32 pack the sequences; max_seqlen_q/k bound
them. ``causal`` aligns the mask bottom-right (query i of a sequence of s_q queries over s_k keys
sees keys j <= i + s_k - s_q), as FlashAttention does. Outputs out [t_q, h_q, d_v], lse [t_q, h_q]
f32 (f64 for f64 q; +inf and out 0 for a query that sees no key). Gradients to q, k, v from out and lse.
"""

from __future__ import annotations

import torch

from .common import (FLOAT_DTYPES, check, check_device, check_dtype, check_finite_scale,
                     check_heads, check_index, check_last_dim_contiguous, check_rank,
                     check_same_dtype, check_shape, check_size, define, stats_dtype)

FWD = define(
    "dense_prefill(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
    "SymInt max_seqlen_q, SymInt max_seqlen_k, float sm_scale, bool causal=False) "
    "-> (Tensor out, Tensor lse)"
)
BWD = define(
    "dense_prefill_backward(Tensor dout, Tensor dlse, Tensor q, Tensor k, Tensor v, Tensor out, "
    "Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, "
    "SymInt max_seqlen_k, float sm_scale, bool causal=False) -> (Tensor dq, Tensor dk, Tensor dv)"
)


def check_dense_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        sm_scale, causal=False):
    check_rank("q", q, 3, "[t_q, h_q, d_qk]")
    check_rank("k", k, 3, "[t_k, h_k, d_qk]")
    check_rank("v", v, 3, "[t_k, h_k, d_v]")
    check_dtype("q", q, FLOAT_DTYPES)
    for name, t in (("k", k), ("v", v)):
        check_same_dtype(name, t, "q", q)
        check_device(name, t, "q", q)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_last_dim_contiguous(name, t)
    check_size("k", k, 2, q.shape[2], "d_qk of q")
    check_size("v", v, 0, k.shape[0], "t_k of k")
    check_size("v", v, 1, k.shape[1], "h_k of k")
    check_heads(q.shape[1], k.shape[1], "q", "k")
    check_finite_scale(sm_scale)
    check_index("cu_seqlens_q", cu_seqlens_q, 1, "[b + 1]", "q", q)
    check_index("cu_seqlens_k", cu_seqlens_k, 1, "[b + 1]", "q", q)
    check(cu_seqlens_q.shape[0] >= 1, lambda: "cu_seqlens_q must hold at least one entry")
    check_size("cu_seqlens_k", cu_seqlens_k, 0, cu_seqlens_q.shape[0], "b + 1, as cu_seqlens_q")
    check(max_seqlen_q >= 0, lambda: f"max_seqlen_q must be >= 0, got {max_seqlen_q}")
    check(max_seqlen_k >= 0, lambda: f"max_seqlen_k must be >= 0, got {max_seqlen_k}")


@torch.library.register_fake(FWD)
def _dense_prefill_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        sm_scale, causal=False):
    check_dense_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        sm_scale, causal)
    t_q, h_q, _ = q.shape
    return q.new_empty((t_q, h_q, v.shape[2])), q.new_empty((t_q, h_q), dtype=stats_dtype(q))


def check_dense_prefill_backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                 max_seqlen_q, max_seqlen_k, sm_scale, causal=False):
    check_dense_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        sm_scale, causal)
    t_q, h_q, _ = q.shape
    d_v = v.shape[2]
    for name, t, shape, doc in (("out", out, (t_q, h_q, d_v), "[t_q, h_q, d_v]"),
                                ("dout", dout, (t_q, h_q, d_v), "[t_q, h_q, d_v]"),
                                ("lse", lse, (t_q, h_q), "[t_q, h_q]"),
                                ("dlse", dlse, (t_q, h_q), "[t_q, h_q]")):
        check_shape(name, t, shape, doc)
        check_device(name, t, "q", q)
    check_same_dtype("dout", dout, "q", q)
    check_same_dtype("out", out, "q", q)
    check_dtype("lse", lse, (stats_dtype(q),))
    check_dtype("dlse", dlse, (stats_dtype(q),))


@torch.library.register_fake(BWD)
def _dense_prefill_backward_fake(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                 max_seqlen_q, max_seqlen_k, sm_scale, causal=False):
    check_dense_prefill_backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                 max_seqlen_q, max_seqlen_k, sm_scale, causal)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sm_scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.args = (max_seqlen_q, max_seqlen_k, sm_scale, causal)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    if dlse is None:
        dlse = torch.zeros_like(lse)
    dq, dk, dv = torch.ops.mla.dense_prefill_backward(
        dout.contiguous(), dlse.contiguous(), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
        *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd(FWD, _backward, setup_context=_setup_context)
