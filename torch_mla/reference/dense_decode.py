"""Reference ``mla::dense_decode``: dense MLA decoding over a paged bf16/fp16 cache.

Semantics (contract in meta/dense_decode.py): key t of batch element i is
``k_cache[block_table[i, t // block_size], t % block_size]``; keys ``t < cache_seqlens[i]``
exist; with ``causal`` query j of s_q sees keys ``t < cache_seqlens[i] - s_q + j + 1`` (MTP).
Values are the first ``d_v`` columns of the keys; query head h reads kv head ``h // (h_q // h_kv)``.
A query that sees no key gets ``out = 0`` and ``lse = +inf``.

How it stays exact, safe and graph friendly:
- Nothing is read on the host: loop bounds come from shapes only (the gather covers all
  ``max_blocks * block_size`` slots of the table, and masks drop the ones past each sequence).
- Block-table entries past a sequence may be -1 or garbage, so they are clamped into range before
  indexing (never a fault) and the gathered rows are then masked.
- Unused cache slots may hold NaN: masked rows are *replaced* by zero with ``torch.where`` (a
  multiply by 0 would keep NaN), so NaN reaches neither logits nor values.
- Memory is bounded: batch elements are taken a few at a time, and when one element's keys are
  too many, its blocks are taken in chunks merged with an online (running max) softmax.
- Math in fp32 (fp64 for fp64 inputs); ``out`` in q's dtype, ``lse`` in stats_dtype(q).
"""

from __future__ import annotations

import math

import torch

from ..meta.common import stats_dtype

# Elements (of the compute dtype) one chunk may hold in its gathered keys and its logits; bounds
# the reference's working memory to a few hundred MB whatever the batch and context length.
_BUDGET = 1 << 24


def dense_decode(q, k_cache, block_table, cache_seqlens, d_v=512, sm_scale=1.0, causal=False,
                 schedule_metadata=None, num_splits=None):
    # The schedule only tells fast kernels how to split work; the result does not depend on it.
    del schedule_metadata, num_splits
    b, s_q, h_q, d_qk = q.shape
    num_blocks, block_size, h_kv, _ = k_cache.shape
    max_blocks = block_table.shape[1]
    group = h_q // h_kv
    cdt = stats_dtype(q)  # compute dtype: f32, or f64 for f64 inputs
    dev = q.device

    out = q.new_zeros((b, s_q, h_q, d_v))
    lse = torch.full((b, h_q, s_q), math.inf, dtype=cdt, device=dev)
    # No slot to read: every query sees no key (a valid input then has all seqlens 0).
    if b * s_q * h_q == 0 or num_blocks * block_size * max_blocks == 0:
        return out, lse

    # Per key of one batch element: its gathered row, plus a logit and a probability per query row.
    per_key = h_kv * d_qk + 2 * h_q * s_q
    keys_budget = max(1, _BUDGET // per_key)
    max_keys = max_blocks * block_size
    batch_chunk = max(1, min(b, keys_budget // max_keys))
    blocks_chunk = max(1, min(max_blocks, keys_budget // (batch_chunk * block_size)))

    j = torch.arange(s_q, device=dev)
    for b0 in range(0, b, batch_chunk):
        b1 = min(b, b0 + batch_chunk)
        n = b1 - b0
        # [n, h_kv, group * s_q, d_qk]: rows of one kv head are (query head in group, query pos)
        qc = (q[b0:b1].to(cdt).view(n, s_q, h_kv, group, d_qk).permute(0, 2, 3, 1, 4)
              .reshape(n, h_kv, group * s_q, d_qk))
        seqlen = cache_seqlens[b0:b1].to(torch.int64)  # [n]
        # Exclusive bound of the keys each query sees, [n, s_q].
        if causal:
            limit = seqlen[:, None] - s_q + 1 + j[None, :]
        else:
            limit = seqlen[:, None].expand(n, s_q)

        # Online-softmax state per (batch, kv head, group head, query).
        run_max = torch.full((n, h_kv, group, s_q), -math.inf, dtype=cdt, device=dev)
        run_sum = torch.zeros((n, h_kv, group, s_q), dtype=cdt, device=dev)
        acc = torch.zeros((n, h_kv, group, s_q, d_v), dtype=cdt, device=dev)

        for c0 in range(0, max_blocks, blocks_chunk):
            c1 = min(max_blocks, c0 + blocks_chunk)
            kc = (c1 - c0) * block_size
            # Entries past a sequence may be -1 or garbage: clamp so the gather cannot fault; the
            # rows read through them are masked out below.
            blocks = block_table[b0:b1, c0:c1].to(torch.int64).clamp(0, num_blocks - 1)
            keys = k_cache[blocks].reshape(n, kc, h_kv, d_qk)
            t = c0 * block_size + torch.arange(kc, device=dev)  # key positions of this chunk
            exists = t[None, :] < seqlen[:, None]  # [n, kc]
            # where, not a multiply: NaN in unused slots must not survive (NaN * 0 = NaN).
            keys = torch.where(exists[:, :, None, None], keys.to(cdt), 0.0)
            keys = keys.permute(0, 2, 1, 3)  # [n, h_kv, kc, d_qk]

            logits = torch.matmul(qc, keys.transpose(-1, -2)) * sm_scale
            logits = logits.view(n, h_kv, group, s_q, kc)
            visible = t[None, None, :] < limit[:, :, None]  # [n, s_q, kc]; implies exists
            logits = logits.masked_fill(~visible[:, None, None], -math.inf)

            new_max = torch.maximum(run_max, logits.amax(-1))
            # A query with nothing visible yet keeps max -inf; shift by 0 so exp gives 0, not NaN.
            shift = torch.where(new_max == -math.inf, 0.0, new_max)
            rescale = torch.exp(run_max - shift)
            probs = torch.exp(logits - shift[..., None])
            run_sum = run_sum * rescale + probs.sum(-1)
            pv = torch.matmul(probs.view(n, h_kv, group * s_q, kc), keys[..., :d_v])
            acc = acc * rescale[..., None] + pv.view(n, h_kv, group, s_q, d_v)
            run_max = new_max

        seen = run_sum > 0
        lse_c = torch.where(seen, run_max + torch.log(run_sum), math.inf)
        out_c = torch.where(seen[..., None], acc / run_sum[..., None], 0.0)
        lse[b0:b1] = lse_c.reshape(n, h_q, s_q)
        out[b0:b1] = out_c.permute(0, 3, 1, 2, 4).reshape(n, s_q, h_q, d_v).to(q.dtype)
    return out, lse
