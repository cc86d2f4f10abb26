"""torch_mla: Multi-head Latent Attention (MLA) and DeepSeek Sparse Attention (DSA) kernels as
first-class PyTorch custom ops (namespace ``torch.ops.mla``).

The op contracts live in ``torch_mla.meta``; implementations are chosen per call (see
``explain``): native CUDA and Triton on GPUs, the exact PyTorch reference everywhere else.
"""

from . import meta  # noqa: F401  (defines the ops)
from . import _dispatch  # noqa: F401  (registers the CPU/CUDA entries)
from . import reference  # noqa: F401  (registers the reference backend)
from ._dispatch import use_backend
from .api import (DecodeSchedule, decode_schedule, dense_decode, dense_prefill,
                  dequantize_kv_cache, explain, quantize_kv_cache, sparse_decode, sparse_prefill,
                  write_kv_cache)

__version__ = "0.1.0"

__all__ = [
    "DecodeSchedule", "decode_schedule", "dense_decode", "dense_prefill", "dequantize_kv_cache",
    "explain", "quantize_kv_cache", "sparse_decode", "sparse_prefill", "use_backend",
    "write_kv_cache",
]
