"""Contract of ``mla::dense_decode``: dense MLA decoding over a paged bf16/fp16 cache.

q [b, s_q, h_q, d_qk] (d_qk 576 in DeepSeek models; any d_qk >= d_v accepted by the reference);
k_cache [num_blocks, block_size, h_kv, d_qk] of q's dtype, values are its first d_v columns;
block_table [b, max_blocks] int32; cache_seqlens [b] int32. With ``causal`` and s_q > 1 (MTP),
query i of s_q sees keys [0, cache_seqlens - s_q + i + 1). Outputs out [b, s_q, h_q, d_v],
lse [b, h_q, s_q] f32 (f64 for f64 q; +inf and out 0 for a query with no key).
"""

from __future__ import annotations

import torch

from .common import (FLOAT_DTYPES, check, check_device, check_dtype, check_finite_scale,
                     check_heads, check_index, check_last_dim_contiguous, check_rank,
                     check_same_dtype, check_shape, check_size, define, stats_dtype)
from .schedule import check_schedule

FWD = define(
    "dense_decode(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, int d_v=512, "
    "float sm_scale=1.0, bool causal=False, Tensor? schedule_metadata=None, "
    "Tensor? num_splits=None) -> (Tensor out, Tensor lse)"
)


def check_dense_decode(q, k_cache, block_table, cache_seqlens, d_v=512, sm_scale=1.0,
                       causal=False, schedule_metadata=None, num_splits=None):
    check_rank("q", q, 4, "[b, s_q, h_q, d_qk]")
    check_dtype("q", q, FLOAT_DTYPES)
    check_last_dim_contiguous("q", q)
    b, s_q, h_q, d_qk = q.shape
    check_rank("k_cache", k_cache, 4, "[num_blocks, block_size, h_kv, d_qk]")
    check_same_dtype("k_cache", k_cache, "q", q)
    check_device("k_cache", k_cache, "q", q)
    check_last_dim_contiguous("k_cache", k_cache)
    check_size("k_cache", k_cache, 3, d_qk, "d_qk of q")
    check_heads(h_q, k_cache.shape[2], "q", "k_cache")
    check(0 < d_v <= d_qk, lambda: f"d_v must be in [1, d_qk={d_qk}], got {d_v}")
    check_finite_scale(sm_scale)
    check_index("block_table", block_table, 2, "[b, max_blocks]", "q", q)
    check_size("block_table", block_table, 0, b, "batch of q")
    check_index("cache_seqlens", cache_seqlens, 1, "[b]", "q", q)
    check_shape("cache_seqlens", cache_seqlens, (b,), "[b]")
    check_schedule(schedule_metadata, num_splits, b, q)


@torch.library.register_fake(FWD)
def _dense_decode_fake(q, k_cache, block_table, cache_seqlens, d_v=512, sm_scale=1.0,
                       causal=False, schedule_metadata=None, num_splits=None):
    check_dense_decode(q, k_cache, block_table, cache_seqlens, d_v, sm_scale, causal,
                       schedule_metadata, num_splits)
    b, s_q, h_q, _ = q.shape
    return q.new_empty((b, s_q, h_q, d_v)), q.new_empty((b, h_q, s_q), dtype=stats_dtype(q))
