"""Native backend: hand-written CUDA kernels for Hopper (csrc/, built by ``python -m
torch_mla.build`` into one shared library with a plain C ABI), called through ctypes.

The backend applies to CUDA tensors on a compute-capability-9.0 GPU (sm_90a kernels) for the
ops and shapes each kernel module accepts. Importing this package never loads, builds or
touches CUDA: the library is found (or built, when nvcc exists) on the first supports() call
that gets that far, i.e. the first op call on a Hopper GPU that the native kernels would run.
If it cannot be had, one warning says why and supports() reports it, so the dispatcher takes
the next backend (Triton). Kernels not in ``GPU_VERIFIED`` run only when the backend is forced.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, Dict, List, Sequence

import torch

from .. import _dispatch
from . import _lib

# (WatchedDicts: a change drops the decisions the eager fast path cached; see _dispatch)
IMPLS: Dict[str, Callable] = _dispatch.WatchedDict()
SUPPORTS: Dict[str, Callable[..., List[str]]] = _dispatch.WatchedDict()
PREPARES: Dict[str, Callable] = _dispatch.WatchedDict()  # op -> prepare (see _dispatch.Backend)
# (major, minor) compute capabilities with kernels in the library
ARCHS = ((9, 0),)

# Kernels whose tests/gpu/ suite has passed on a GPU. The others compile and pass the CPU checks
# but are chosen on a GPU only when the backend is forced (use_backend("native") /
# TORCH_MLA_BACKEND=native): a kernel never run on the hardware could fault or be wrong. Until
# then an unforced call neither loads nor builds the library.
# H100, 2026-11-25: tests/gpu/test_native_sparse_decode.py (34 passed) and
# tests/gpu/sanitize_native.py clean under compute-sanitizer memcheck and racecheck.
GPU_VERIFIED = frozenset({"sparse_decode"})


def register(op: str, impl: Callable, supports: Callable[..., List[str]],
             prepare: Callable = None) -> None:
    IMPLS[op] = impl
    SUPPORTS[op] = supports
    if prepare is not None:
        PREPARES[op] = prepare


@functools.lru_cache(maxsize=None)
def _capability(index: int):
    return torch.cuda.get_device_capability(index)


def device_reasons(args: Sequence) -> List[str]:
    """Why the native kernels cannot run on the device of these arguments (empty: they can)."""
    dev = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
    if dev.type != "cuda":
        return [f"native kernels run on CUDA devices (Hopper, sm_90a), not {dev.type}"]
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    cap = _capability(idx)
    if tuple(cap) not in ARCHS:
        return [f"native kernels are built for sm_90a (compute capability 9.0, Hopper); "
                f"{torch.cuda.get_device_name(idx)} is sm_{cap[0]}{cap[1]}"]
    return []


def _supports(op: str, args: Sequence) -> List[str]:
    reasons = device_reasons(args) or list(SUPPORTS[op](*args))
    if reasons:
        return reasons
    reasons = _dispatch.unverified_reasons("native", op, GPU_VERIFIED)
    if reasons:
        return reasons
    # Only now (an op the kernels would run) load the library, building it on first use.
    if _lib.get() is None:
        return [_lib.reason()]
    return []


def library():
    """The loaded NativeLibrary (loading or building it now), or None; see ``reason()``."""
    return _lib.get()


reason = _lib.reason

from . import sparse_decode  # noqa: E402,F401  (registers its op)

_dispatch.register_backend(_dispatch.Backend("native", IMPLS, _supports, PREPARES))
# what the backend's decisions read lives in these modules: rebinding any of their attributes
# (monkeypatching GPU_VERIFIED, device_reasons, ...) drops the cached decisions
for _mod in (sys.modules[__name__], _lib, sparse_decode):
    _dispatch.watch(_mod)
del _mod
