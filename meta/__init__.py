"""Op contracts of torch_mla, namespace ``mla``: schemas, input checks, fake impls, autograd.

Device-free: importing this defines every op; implementations are registered by torch_mla.
What torch.compile and torch.export see of an op is exactly what lives here.
"""

from . import common, layouts  # noqa: F401  (common defines the namespace first)
from . import schedule  # noqa: F401  (decode ops use its checks)
from . import dense_decode, dense_prefill, kv_cache, sparse_decode, sparse_prefill  # noqa: F401
from . import indexer  # noqa: F401

# op name -> (qualified name, check function). The check runs in every backend's entry.
CHECKS = {
    "sparse_prefill": sparse_prefill.check_sparse_prefill,
    "sparse_prefill_backward": sparse_prefill.check_sparse_prefill_backward,
    "sparse_decode": sparse_decode.check_sparse_decode,
    "dense_decode": dense_decode.check_dense_decode,
    "dense_prefill": dense_prefill.check_dense_prefill,
    "dense_prefill_backward": dense_prefill.check_dense_prefill_backward,
    "quantize_kv_cache": kv_cache.check_quantize_kv_cache,
    "dequantize_kv_cache": kv_cache.check_dequantize_kv_cache,
    "write_kv_cache": kv_cache.check_write_kv_cache,
    "decode_schedule": schedule.check_decode_schedule,
    "indexer_quantize": indexer.check_indexer_quantize,
    "indexer_logits": indexer.check_indexer_logits,
    "write_indexer_cache": indexer.check_write_indexer_cache,
    "indexer_logits_paged": indexer.check_indexer_logits_paged,
    "indexer_topk": indexer.check_indexer_topk,
    "indexer_scores": indexer.check_indexer_scores,
    "indexer_scores_backward": indexer.check_indexer_scores_backward,
    "sparse_attn_scores": indexer.check_sparse_attn_scores,
    "dense_attn_scores": indexer.check_dense_attn_scores,
}
OPS = tuple(CHECKS)
