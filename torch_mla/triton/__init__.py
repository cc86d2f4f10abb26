"""Triton backend: kernels for every op, for any CUDA GPU (and the CPU under TRITON_INTERPRET=1).

Each kernel module adds its ops to ``IMPLS`` (op name -> function taking the schema's positional
arguments) and ``SUPPORTS`` (op name -> function returning the reasons it does not apply). The
backend registers itself only when Triton imports.
"""

from __future__ import annotations

import sys
from typing import Callable, Dict, List, Sequence

from .. import _dispatch

# (WatchedDicts: a change drops the decisions the eager fast path cached; see _dispatch)
IMPLS: Dict[str, Callable] = _dispatch.WatchedDict()
SUPPORTS: Dict[str, Callable[..., List[str]]] = _dispatch.WatchedDict()
PREPARES: Dict[str, Callable] = _dispatch.WatchedDict()  # op -> prepare (see _dispatch.Backend)

# Kernels whose tests/gpu/ suite has passed on a GPU (H100, torch 2.11, Triton 3.6). The others are
# correct under the interpreter but are not chosen automatically on a GPU until their GPU tests
# pass there: a kernel that was never run on the hardware could fault or be wrong at real sizes.
# Forcing the backend (use_backend("triton") / TORCH_MLA_BACKEND=triton) runs them anyway.
GPU_VERIFIED = frozenset({
    # H100, torch 2.11, Triton 3.6, 2026-11-25: tests/gpu/test_triton_dense.py
    "dense_decode", "dense_prefill", "dense_prefill_backward",
    # same day, tree of commit 2413f4c: tests/gpu/test_triton_{sparse_decode,sparse_prefill,
    # kv_cache,indexer}.py, every test passing
    "sparse_decode", "sparse_prefill", "sparse_prefill_backward",
    "quantize_kv_cache", "dequantize_kv_cache", "write_kv_cache",
    "indexer_quantize", "write_indexer_cache", "indexer_logits", "indexer_logits_paged",
    "indexer_topk", "indexer_scores", "indexer_scores_backward", "sparse_attn_scores",
    "dense_attn_scores",
})


def register(op: str, impl: Callable, supports: Callable[..., List[str]],
             prepare: Callable = None) -> None:
    IMPLS[op] = impl
    SUPPORTS[op] = supports
    if prepare is not None:
        PREPARES[op] = prepare


def _supports(op: str, args: Sequence) -> List[str]:
    from ._common import device_reasons, first_tensor

    reasons = device_reasons(args) or list(SUPPORTS[op](*args))
    if not reasons and first_tensor(args).device.type == "cuda":  # the interpreter is not gated
        reasons = _dispatch.unverified_reasons("triton", op, GPU_VERIFIED)
    return reasons


try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - Triton ships with Linux torch
    AVAILABLE = False
else:
    AVAILABLE = True
    import importlib
    import pkgutil

    # every public module of this package is a kernel module that registers its ops on import
    for _mod in pkgutil.iter_modules(__path__):
        if not _mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{_mod.name}")
    _dispatch.register_backend(_dispatch.Backend("triton", IMPLS, _supports, PREPARES))
    # what the backend's decisions read lives in these modules: rebinding any of their
    # attributes (monkeypatching GPU_VERIFIED, device_reasons, ...) drops the cached decisions
    for _name in [__name__] + [n for n in sys.modules if n.startswith(__name__ + ".")]:
        _dispatch.watch(sys.modules[_name])
    del _name
