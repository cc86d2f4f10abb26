"""Exact PyTorch implementations of every ``mla`` op (fp32 accumulation; fp64 inputs compute in
fp64 so gradients can be checked with gradcheck). The CPU kernels and the oracle of the others."""

from __future__ import annotations

from .. import _dispatch
from . import dense_decode, dense_prefill, kv_cache, schedule, sparse_decode, sparse_prefill
from . import indexer

# Submodules keep their names (torch_mla.reference.sparse_prefill is the module); the op table
# points at the functions.
IMPLS = _dispatch.WatchedDict({  # (a change drops cached decisions; see _dispatch)
    "sparse_prefill": sparse_prefill.sparse_prefill,
    "sparse_prefill_backward": sparse_prefill.sparse_prefill_backward,
    "sparse_decode": sparse_decode.sparse_decode,
    "dense_decode": dense_decode.dense_decode,
    "dense_prefill": dense_prefill.dense_prefill,
    "dense_prefill_backward": dense_prefill.dense_prefill_backward,
    "quantize_kv_cache": kv_cache.quantize_kv_cache,
    "dequantize_kv_cache": kv_cache.dequantize_kv_cache,
    "write_kv_cache": kv_cache.write_kv_cache,
    "decode_schedule": schedule.decode_schedule,
    "indexer_quantize": indexer.indexer_quantize,
    "indexer_logits": indexer.indexer_logits,
    "write_indexer_cache": indexer.write_indexer_cache,
    "indexer_logits_paged": indexer.indexer_logits_paged,
    "indexer_topk": indexer.indexer_topk,
    "indexer_scores": indexer.indexer_scores,
    "indexer_scores_backward": indexer.indexer_scores_backward,
    "sparse_attn_scores": indexer.sparse_attn_scores,
    "dense_attn_scores": indexer.dense_attn_scores,
})

# The reference runs every op on any device, for any input the contract accepts.
_dispatch.register_backend(_dispatch.Backend("reference", IMPLS))
