"""Triton backend: kernels for every op, for any CUDA GPU (and the CPU under TRITON_INTERPRET=1).

Each kernel module adds its ops to ``IMPLS`` (op name -> function taking the schema's positional
arguments) and ``SUPPORTS`` (op name -> function returning the reasons it does not apply). The
backend registers itself only when Triton imports.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence

from .. import _dispatch

IMPLS: Dict[str, Callable] = {}
SUPPORTS: Dict[str, Callable[..., List[str]]] = {}

# Kernels whose tests/gpu/ suite has passed on a GPU (H100, torch 2.11, Triton 3.6). The others are
# correct under the interpreter but are not chosen automatically on a GPU until their GPU tests
# pass there: a kernel that was never run on the hardware could fault or be wrong at real sizes.
# Forcing the backend (use_backend("triton") / TORCH_MLA_BACKEND=triton) runs them anyway.
GPU_VERIFIED = frozenset({
    "dense_decode",  # 2026-11-25, tests/gpu/test_triton_dense.py
    "dense_prefill",  # 2026-11-25, tests/gpu/test_triton_dense.py
    "dense_prefill_backward",  # 2026-11-25, tests/gpu/test_triton_dense.py
    "quantize_kv_cache",  # 2026-11-25, tests/gpu/test_triton_kv_cache.py (quantize cases)
})


def register(op: str, impl: Callable, supports: Callable[..., List[str]]) -> None:
    IMPLS[op] = impl
    SUPPORTS[op] = supports


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
    _dispatch.register_backend(_dispatch.Backend("triton", IMPLS, _supports))
