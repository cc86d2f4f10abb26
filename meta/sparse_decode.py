"""Contract of ``mla::sparse_decode``: sparse MLA decoding over a paged FP8 cache.

q [b, s_q, h_q, d_qk]; k_cache packed FP8 [num_blocks, block_size, 1, bytes] whose layout follows
d_qk (576 -> V32, 512 -> MODEL1); indices [b, s_q, topk] int32 in-cache positions
(block * block_size + offset); topk_length [b] keeps the first topk_length[i] indices of batch i.
extra_k_cache / extra_indices [b, s_q, extra_topk] / extra_topk_length [b] add a second key set
(its own block size, same layout); the softmax runs over the union. Values are the first d_v
dequantized columns of each key. Outputs: out [b, s_q, h_q, d_v] (q's dtype), lse [b, h_q, s_q] f32 (f64 for f64 q).
schedule_metadata / num_splits come from ``mla::decode_schedule`` (optional; a backend that splits
work computes its own when absent).
"""

from __future__ import annotations

import torch

from .common import (FLOAT_DTYPES, FP8_CACHE_DTYPES, check, check_attn_sink, check_device,
                     check_dtype, check_finite_scale, check_index, check_last_dim_contiguous,
                     check_optional_index, check_rank, check_size, define, stats_dtype)
from .layouts import MODEL1, V32, check_fp8_cache, layout_for_d_qk
from .schedule import check_schedule, schedule_valid_eager

FWD = define(
    "sparse_decode(Tensor q, Tensor k_cache, Tensor indices, Tensor? topk_length=None, "
    "Tensor? attn_sink=None, Tensor? extra_k_cache=None, Tensor? extra_indices=None, "
    "Tensor? extra_topk_length=None, int d_v=512, float sm_scale=1.0, "
    "Tensor? schedule_metadata=None, Tensor? num_splits=None) -> (Tensor out, Tensor lse)"
)


def check_sparse_decode(q, k_cache, indices, topk_length=None, attn_sink=None, extra_k_cache=None,
                        extra_indices=None, extra_topk_length=None, d_v=512, sm_scale=1.0,
                        schedule_metadata=None, num_splits=None):
    # Eager calls on real tensors (concrete sizes) first try one plain predicate that holds only
    # when every check below passes (~4 us instead of ~12 on the host path of every call); when
    # it does not hold, the checks run and raise with their message. Fake tensors (compile,
    # export, the fake impl) always run the checks: they record guards on symbolic sizes.
    if type(q) is torch.Tensor and valid_eager(
            q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices,
            extra_topk_length, d_v, sm_scale, schedule_metadata, num_splits):
        return
    check_sparse_decode_each(q, k_cache, indices, topk_length, attn_sink, extra_k_cache,
                             extra_indices, extra_topk_length, d_v, sm_scale, schedule_metadata,
                             num_splits)


def _fp8_cache_ok(cache, layout, dev) -> bool:
    """check_fp8_cache(name, cache, layout) and check_device(name, cache, ..., dev) would pass."""
    cs = cache.shape
    if len(cs) != 4 or cache.dtype not in FP8_CACHE_DTYPES or cache.device != dev:
        return False
    bpt = layout.bytes_per_token
    st = cache.stride()
    return (cs[2] == 1 and cs[3] == bpt and st[3] == 1 and st[1] == bpt
            and (cs[0] <= 1 or st[0] >= cs[1] * bpt))


def _indices_ok(t, b, s_q, dev) -> bool:
    """check_index(rank 3) + check_size(0: b, 1: s_q) + check_last_dim_contiguous would pass."""
    ts = t.shape
    return (len(ts) == 3 and ts[0] == b and ts[1] == s_q and t.dtype is torch.int32
            and t.device == dev and (ts[2] <= 1 or t.stride(2) == 1))


def _lengths_ok(t, b, dev) -> bool:
    """check_optional_index(name, t, (b,), ...) would pass (t not None)."""
    return t.shape == (b,) and t.dtype is torch.int32 and t.device == dev


def valid_eager(q, k_cache, indices, topk_length=None, attn_sink=None, extra_k_cache=None,
                extra_indices=None, extra_topk_length=None, d_v=512, sm_scale=1.0,
                schedule_metadata=None, num_splits=None) -> bool:
    """True only if ``check_sparse_decode_each`` passes on these concrete inputs (False: run
    it for the error). Real tensors only (it branches on sizes). tests/test_host_overhead.py
    checks it against the checks on mutated inputs."""
    qs = q.shape
    if len(qs) != 4 or q.dtype not in FLOAT_DTYPES:
        return False
    b, s_q, h_q, d_qk = qs
    if d_qk == V32.d:
        layout = V32
    elif d_qk == MODEL1.d:
        layout = MODEL1
    else:
        return False
    dev = q.device
    if not (q.stride(3) == 1 and 0 < d_v <= layout.d
            and sm_scale == sm_scale and abs(sm_scale) != float("inf")
            and _fp8_cache_ok(k_cache, layout, dev) and _indices_ok(indices, b, s_q, dev)):
        return False
    if topk_length is not None and not _lengths_ok(topk_length, b, dev):
        return False
    if attn_sink is not None and not (attn_sink.dtype in (torch.float32, torch.float64)
                                      and attn_sink.shape == (h_q,) and attn_sink.device == dev):
        return False
    if extra_k_cache is None:
        if extra_indices is not None or extra_topk_length is not None:
            return False
    elif not (extra_indices is not None and _fp8_cache_ok(extra_k_cache, layout, dev)
              and _indices_ok(extra_indices, b, s_q, dev)
              and (extra_topk_length is None or _lengths_ok(extra_topk_length, b, dev))):
        return False
    return schedule_valid_eager(schedule_metadata, num_splits, b, dev)


def check_sparse_decode_each(q, k_cache, indices, topk_length=None, attn_sink=None,
                             extra_k_cache=None, extra_indices=None, extra_topk_length=None,
                             d_v=512, sm_scale=1.0, schedule_metadata=None, num_splits=None):
    """Every input check of mla::sparse_decode, one by one, each with its message."""
    check_rank("q", q, 4, "[b, s_q, h_q, d_qk]")
    check_dtype("q", q, FLOAT_DTYPES)
    check_last_dim_contiguous("q", q)
    b, s_q, h_q, d_qk = q.shape
    layout = layout_for_d_qk(d_qk)
    check_fp8_cache("k_cache", k_cache, layout)
    check_device("k_cache", k_cache, "q", q)
    check(
        0 < d_v <= layout.d,
        lambda: f"d_v must be in [1, {layout.d}] (values are the first d_v columns of a key), "
        f"got {d_v}",
    )
    check_finite_scale(sm_scale)
    check_index("indices", indices, 3, "[b, s_q, topk]", "q", q)
    check_size("indices", indices, 0, b, "batch of q")
    check_size("indices", indices, 1, s_q, "s_q of q")
    check_last_dim_contiguous("indices", indices)
    check_optional_index("topk_length", topk_length, (b,), "[b]", "q", q)
    check_attn_sink(attn_sink, h_q, q)
    check(
        (extra_k_cache is None) == (extra_indices is None),
        lambda: "extra_k_cache and extra_indices must be given together "
        f"(got extra_k_cache {'set' if extra_k_cache is not None else 'None'}, "
        f"extra_indices {'set' if extra_indices is not None else 'None'})",
    )
    check(
        extra_topk_length is None or extra_indices is not None,
        lambda: "extra_topk_length needs extra_k_cache and extra_indices",
    )
    if extra_k_cache is not None:
        check_fp8_cache("extra_k_cache", extra_k_cache, layout)
        check_device("extra_k_cache", extra_k_cache, "q", q)
        check_index("extra_indices", extra_indices, 3, "[b, s_q, extra_topk]", "q", q)
        check_size("extra_indices", extra_indices, 0, b, "batch of q")
        check_size("extra_indices", extra_indices, 1, s_q, "s_q of q")
        check_last_dim_contiguous("extra_indices", extra_indices)
        check_optional_index("extra_topk_length", extra_topk_length, (b,), "[b]", "q", q)
    check_schedule(schedule_metadata, num_splits, b, q)


@torch.library.register_fake(FWD)
def _sparse_decode_fake(q, k_cache, indices, topk_length=None, attn_sink=None, extra_k_cache=None,
                        extra_indices=None, extra_topk_length=None, d_v=512, sm_scale=1.0,
                        schedule_metadata=None, num_splits=None):
    check_sparse_decode(q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices,
                        extra_topk_length, d_v, sm_scale, schedule_metadata, num_splits)
    b, s_q, h_q, _ = q.shape
    return q.new_empty((b, s_q, h_q, d_v)), q.new_empty((b, h_q, s_q), dtype=stats_dtype(q))
