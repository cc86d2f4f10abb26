"""torch_mla: Multi-head Latent Attention (MLA) and DeepSeek Sparse Attention (DSA) kernels as
first-class PyTorch custom ops (namespace ``torch.ops.mla``).

The op contracts live in ``torch_mla.meta``; implementations are chosen per call (see
``explain``): native CUDA and Triton on GPUs, the exact PyTorch reference everywhere else.
"""

from . import meta  # noqa: F401  (defines the ops)
from . import _dispatch  # noqa: F401  (registers the CPU/CUDA entries)
from . import reference  # noqa: F401  (registers the reference backend)
from . import triton  # noqa: F401  (registers the Triton backend where Triton imports)
from . import native  # noqa: F401  (registers the native CUDA backend; loads nothing yet)
from ._dispatch import use_backend
from .api import (DecodeSchedule, decode_schedule, dense_decode, dense_prefill,
                  dequantize_kv_cache, explain, quantize_kv_cache, sparse_decode, sparse_prefill,
                  write_kv_cache)
from . import dsa  # noqa: F401  (indexer training: indexer_kl_loss, window_indices)
from .indexer import (dense_attn_scores, indexer_logits, indexer_logits_paged, indexer_quantize,
                      indexer_scores, indexer_topk, indexer_topk_to_cache_indices,
                      new_indexer_cache, sparse_attn_scores, write_indexer_cache)

__version__ = "0.1.0"

__all__ = [
    "DecodeSchedule", "decode_schedule", "dense_decode", "dense_prefill", "dequantize_kv_cache",
    "explain", "quantize_kv_cache", "sparse_decode", "sparse_prefill", "use_backend",
    "write_kv_cache",
]
__all__ += [
    "dense_attn_scores", "dsa", "indexer_logits", "indexer_logits_paged", "indexer_quantize",
    "indexer_scores", "indexer_topk", "indexer_topk_to_cache_indices", "new_indexer_cache",
    "sparse_attn_scores", "write_indexer_cache",
]
