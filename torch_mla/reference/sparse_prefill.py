"""Reference ``mla::sparse_prefill`` and ``mla::sparse_prefill_backward``: exact PyTorch, fp32 math
(fp64 when the inputs are fp64, so gradcheck can run through it).

Semantics (FlashMLA's tests/ref.py; restated in DESIGN.md and meta/sparse_prefill.py): query i,
head h attends to the rows ``indices[i, h // (h_q // h_kv), :]`` of ``kv[:, h // (h_q // h_kv)]``.
An index that is negative, ``>= s_kv`` or at a position ``>= topk_length[i]`` is invalid: it adds
nothing and its row's contents can never reach the result (unused cache slots may hold NaN). A
valid index that appears twice counts twice. With an attention sink, ``out`` is scaled by
``f = exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink)``; ``lse`` and ``max_logits`` ignore it.

Work is chunked over queries so the gathered rows and the ``[h_q, topk]`` logits of one chunk stay
within ``CHUNK_BYTES`` (DeepSeek prefill, s_q 4096 x topk 2048 x h_q 128 x d 576, would otherwise
gather ~19 GB of fp32 rows). The chunk size comes from shapes only, so nothing syncs the host.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..meta.common import stats_dtype

# Byte budget for the intermediates of one query chunk (gathered rows in the input and compute
# dtypes, logits, probabilities and, in backward, their gradients). Tests lower it to force many
# chunks; the result does not depend on it.
CHUNK_BYTES = 256 << 20


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    # Same rule as the stats: fp64 inputs compute in fp64 (gradcheck), everything else in fp32.
    return stats_dtype(q)


def _query_chunk(q: torch.Tensor, indices: torch.Tensor, backward: bool) -> int:
    """How many queries one chunk may hold so that its intermediates fit ``CHUNK_BYTES``."""
    _, h_q, d_qk = q.shape
    h_kv, topk = indices.shape[1], indices.shape[2]
    acc = torch.finfo(_compute_dtype(q)).bits // 8
    rows = h_kv * topk * d_qk
    # Gathered rows in the input dtype, their compute-dtype copy, and in backward their gradient.
    per_query = rows * q.element_size() + rows * acc * (2 if backward else 1)
    # [h_q, topk] logits / probabilities (and gradients in backward), a few alive at once.
    per_query += h_q * topk * acc * (6 if backward else 4)
    # int64 indices, clamped copy, flat positions and masks.
    per_query += h_kv * topk * 26
    return max(1, CHUNK_BYTES // max(1, per_query))


def _gather(kv: torch.Tensor, idx: torch.Tensor, lens: Optional[torch.Tensor], acc: torch.dtype):
    """Rows of one chunk: (clamped int64 indices, valid mask [c, h_kv, topk], rows [c, h_kv, topk, d]).

    Invalid entries are read at a clamped in-range position (so nothing faults) and then replaced
    by zeros with ``torch.where``; multiplying by the mask instead would turn a NaN in an unused
    slot into NaN (0 * NaN), leaking garbage into the result."""
    s_kv, h_kv, _ = kv.shape
    topk = idx.shape[-1]
    idx = idx.long()
    valid = (idx >= 0) & (idx < s_kv)
    if lens is not None:
        pos = torch.arange(topk, device=idx.device)
        valid = valid & (pos < lens.long()[:, None, None])
    safe = idx.clamp(0, s_kv - 1)
    heads = torch.arange(h_kv, device=idx.device)[None, :, None]
    rows = kv[safe, heads]  # [c, h_kv, topk, d_qk]
    # Zeroed in the input dtype (half the bytes of the compute copy for bf16), then converted.
    rows = torch.where(valid[..., None], rows, rows.new_zeros(()))
    return safe, valid, rows.to(acc)


def _attend(qc: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor, sm_scale: float, d_v: int,
            sink: Optional[torch.Tensor]):
    """Softmax attention of one chunk, grouped as [c, h_kv, g, ...] (g query heads per kv head).

    Returns max_logits, lse (+inf where no key is valid), p (probabilities, 0 on invalid
    entries), o_raw (= sum_j p_j v_j, before the sink), f (sink factor) and any_valid [c, h_kv, 1].
    """
    c, h_q, d_qk = qc.shape
    h_kv = rows.shape[1]
    g = h_q // h_kv
    qg = qc.to(rows.dtype).reshape(c, h_kv, g, d_qk)
    logits = torch.matmul(qg, rows.transpose(-1, -2)) * sm_scale  # [c, h_kv, g, topk]
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    any_valid = valid.any(-1)[:, :, None]  # shared by the g query heads of a kv head
    max_logits = logits.amax(-1)  # -inf where nothing is valid
    lse = torch.logsumexp(logits, -1)  # -inf where nothing is valid; fixed to +inf below
    # A finite stand-in for empty rows so exp(-inf - lse) is 0 rather than exp(-inf + inf) = NaN.
    lse_safe = torch.where(any_valid, lse, lse.new_zeros(()))
    p = torch.exp(logits - lse_safe[..., None])
    o_raw = torch.matmul(p, rows[..., :d_v])  # [c, h_kv, g, d_v]; 0 where nothing is valid
    lse = torch.where(any_valid, lse, lse.new_full((), float("inf")))
    if sink is None:
        f = torch.ones_like(lse_safe)
    else:
        # exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink): no overflow, and sink = -inf
        # gives 1, sink = +inf gives 0. lse_safe (not lse = +inf) keeps empty queries free of
        # inf - inf; their o_raw is 0 anyway.
        f = torch.sigmoid(lse_safe - sink.to(rows.dtype).reshape(1, h_kv, g))
    return qg, max_logits, lse, p, o_raw, f, any_valid


def sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink=None, topk_length=None):
    s_q, h_q, _ = q.shape
    s_kv = kv.shape[0]
    topk = indices.shape[-1]
    acc = _compute_dtype(q)
    # Allocated exactly as the fake impl does (shapes, dtypes, contiguous layout).
    out = q.new_empty((s_q, h_q, d_v))
    max_logits = q.new_empty((s_q, h_q), dtype=stats_dtype(q))
    lse = q.new_empty((s_q, h_q), dtype=stats_dtype(q))
    if s_kv == 0 or topk == 0:
        # No key can be valid (a shape fact, not a data read): clamping into an empty kv and
        # reducing over an empty topk are both impossible, so answer directly.
        out.zero_()
        max_logits.fill_(float("-inf"))
        lse.fill_(float("inf"))
        return out, max_logits, lse
    chunk = _query_chunk(q, indices, backward=False)
    for s in range(0, s_q, chunk):
        e = min(s + chunk, s_q)
        lens = None if topk_length is None else topk_length[s:e]
        _, valid, rows = _gather(kv, indices[s:e], lens, acc)
        _, ml, ls, _, o_raw, f, _ = _attend(q[s:e], rows, valid, sm_scale, d_v, attn_sink)
        c = e - s
        out[s:e] = (o_raw * f[..., None]).reshape(c, h_q, d_v)
        max_logits[s:e] = ml.reshape(c, h_q)
        lse[s:e] = ls.reshape(c, h_q)
    return out, max_logits, lse


def sparse_prefill_backward(dout, dlse, q, kv, indices, out, lse, sm_scale, d_v, attn_sink=None,
                            topk_length=None):
    """Gradients of (out, lse) w.r.t. q, kv and attn_sink.

    The forward is recomputed per chunk from q and kv (``out`` and ``lse`` are not read): the raw
    output O_raw = out / f is needed for the sink gradient and cannot be recovered by division
    where f is 0 (sink +inf), and recomputing keeps the gradient exact for any saved precision.
    With g = dout, f the sink factor and P the softmax over valid keys:
      dL/df = g . O_raw,  D = g . out = f * dL/df,  dlse_total = dlse + dL/df * f * (1 - f),
      ds_j = P_j * (f * g . v_j - D) + dlse_total * P_j,
      dq = scale * sum_j ds_j k_j,  dk_j += scale * ds_j q,  dv_j += P_j * f * g,
      d_sink = -sum_queries dL/df * f * (1 - f).
    """
    s_q, h_q, d_qk = q.shape
    s_kv, h_kv, _ = kv.shape
    topk = indices.shape[-1]
    g = h_q // h_kv
    acc = _compute_dtype(q)
    dq = torch.empty_like(q)
    dkv = torch.empty_like(kv)
    sink_dtype = torch.float32 if attn_sink is None else attn_sink.dtype
    if s_kv == 0 or topk == 0:
        dq.zero_()
        dkv.zero_()
        return dq, dkv, q.new_zeros((h_q,), dtype=sink_dtype)
    # Own contiguous accumulator, flat over (row, kv head), so index_add_ can sum duplicated
    # indices (and indices shared by several queries) in the compute dtype.
    dkv_acc = torch.zeros((s_kv * h_kv, d_qk), dtype=acc, device=kv.device)
    d_sink = torch.zeros((h_kv, g), dtype=acc, device=q.device)
    heads = torch.arange(h_kv, device=q.device)[None, :, None]
    zero = torch.zeros((), dtype=acc, device=q.device)
    chunk = _query_chunk(q, indices, backward=True)
    for s in range(0, s_q, chunk):
        e = min(s + chunk, s_q)
        c = e - s
        lens = None if topk_length is None else topk_length[s:e]
        safe, valid, rows = _gather(kv, indices[s:e], lens, acc)
        qg, _, _, p, o_raw, f, any_valid = _attend(q[s:e], rows, valid, sm_scale, d_v, attn_sink)
        gout = dout[s:e].to(acc).reshape(c, h_kv, g, d_v)
        dl = dlse[s:e].to(acc).reshape(c, h_kv, g)
        dl_df = (gout * o_raw).sum(-1)  # [c, h_kv, g]
        fd = f * (1 - f)
        # Queries with no valid key have out 0 and lse +inf whatever q, kv and the sink are: no
        # gradient flows, and any dlse given for them (even inf or NaN) is dropped.
        dlse_tot = torch.where(any_valid, dl + dl_df * fd, zero)
        big_d = f * dl_df
        gv = torch.matmul(gout, rows[..., :d_v].transpose(-1, -2))  # [c, h_kv, g, topk]
        ds = p * (f[..., None] * gv - big_d[..., None] + dlse_tot[..., None])
        # Scaled here, on [c, h_q, topk], rather than on the d_qk-wide products below.
        ds = torch.where(valid[:, :, None, :], ds * sm_scale, zero)
        dq[s:e] = torch.matmul(ds, rows).reshape(c, h_q, d_qk)
        drows = torch.matmul(ds.transpose(-1, -2), qg)  # [c, h_kv, topk, d_qk]
        drows[..., :d_v] += torch.matmul((p * f[..., None]).transpose(-1, -2), gout)
        # Invalid entries have ds = 0 and p = 0 exactly (and their rows were never read), so their
        # drows are exact zeros: index_add_ adds nothing at their clamped (in-range) position.
        dkv_acc.index_add_(0, (safe * h_kv + heads).reshape(-1), drows.reshape(-1, d_qk))
        d_sink -= torch.where(any_valid, dl_df * fd, zero).sum(0)
    dkv.copy_(dkv_acc.view(s_kv, h_kv, d_qk))
    d_attn_sink = (d_sink.reshape(h_q).to(sink_dtype) if attn_sink is not None
                   else q.new_zeros((h_q,), dtype=torch.float32))
    return dq, dkv, d_attn_sink
