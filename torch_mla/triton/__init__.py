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


def register(op: str, impl: Callable, supports: Callable[..., List[str]]) -> None:
    IMPLS[op] = impl
    SUPPORTS[op] = supports


def _supports(op: str, args: Sequence) -> List[str]:
    from ._common import device_reasons

    return device_reasons(args) or list(SUPPORTS[op](*args))


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
