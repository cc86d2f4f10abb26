"""Finding, building (on first GPU use) and loading the native library with ctypes.

Order: ``$TORCH_MLA_NATIVE_LIB`` (an explicit file), else the hash-keyed cache build of the
current sources (torch_mla.build), else, when nvcc exists (and ``TORCH_MLA_NATIVE_BUILD`` is not
``0``), a build now, with progress on stderr. Nothing happens at import: the first ``get()``
comes from the native backend's supports() on a CUDA tensor of a Hopper GPU. A library that
cannot be had is reported once with a warning, and the dispatcher moves on to the next backend.

Every C function's argument and result types are resolved once here, at load.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from typing import Optional

ABI_VERSION = 1  # csrc/include/torch_mla_native.h: TMLA_ABI_VERSION
NOT_BUILT = "native library not built; run python -m torch_mla.build"
ENV_BUILD = "TORCH_MLA_NATIVE_BUILD"


class NativeLibrary:
    """A loaded libtorch_mla_native.so with its entry points typed."""

    def __init__(self, path: str):
        self.path = path
        self.cdll = ctypes.CDLL(path)
        c = self.cdll
        c.tmla_abi_version.argtypes = []
        c.tmla_abi_version.restype = ctypes.c_int64
        abi = c.tmla_abi_version()
        if abi != ABI_VERSION:
            raise OSError(f"{path} has native ABI version {abi}, this torch_mla needs "
                          f"{ABI_VERSION}; rebuild with python -m torch_mla.build")
        c.tmla_build_info.argtypes = []
        c.tmla_build_info.restype = ctypes.c_char_p
        self.build_info = c.tmla_build_info().decode()
        c.tmla_sparse_decode_workspace_bytes.argtypes = [ctypes.c_int64] * 5
        c.tmla_sparse_decode_workspace_bytes.restype = ctypes.c_int64
        self.sparse_decode_workspace_bytes = c.tmla_sparse_decode_workspace_bytes
        # (params: bytes of the packed struct, stream: int, err: char buffer, err_len)
        c.tmla_sparse_decode.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_char_p,
                                         ctypes.c_int64]
        c.tmla_sparse_decode.restype = ctypes.c_int
        self.sparse_decode = c.tmla_sparse_decode

    def __repr__(self):
        return f"NativeLibrary({self.path!r}: {self.build_info})"


_ERR_LEN = 1024
_tls = threading.local()


def err_buffer():
    """A per-thread error-message buffer for the C calls (the C side always clears it)."""
    buf = getattr(_tls, "buf", None)
    if buf is None:
        buf = _tls.buf = ctypes.create_string_buffer(_ERR_LEN)
    return buf


_lock = threading.Lock()
_lib: Optional[NativeLibrary] = None
_reason: Optional[str] = None
_tried = False


def _log(msg: str) -> None:
    import sys

    print(f"[torch_mla.native] {msg}", file=sys.stderr, flush=True)


def _locate_or_build() -> NativeLibrary:
    # imported here, not at module import: `python -m torch_mla.build` imports torch_mla first
    # and runpy warns if the module it runs is already in sys.modules
    from .. import build as _build

    explicit = os.environ.get(_build.ENV_LIB)
    if explicit:
        if not os.path.isfile(explicit):
            raise OSError(f"{_build.ENV_LIB}={explicit} does not exist ({NOT_BUILT})")
        return NativeLibrary(explicit)
    path = _build.cached_library_path()
    if path.is_file():
        return NativeLibrary(str(path))
    if os.environ.get(ENV_BUILD, "1").strip() == "0":
        raise OSError(f"{NOT_BUILT} ({ENV_BUILD}=0 forbids building on first use)")
    if _build.find_nvcc() is None:
        raise OSError(f"{NOT_BUILT} (nvcc not found, so it cannot be built on first use)")
    _log("the native library for these sources is not built yet; building it now "
         f"(once per machine, into {path.parent})")
    built = _build.build(log=_log)
    return NativeLibrary(str(built))


def get() -> Optional[NativeLibrary]:
    """The library, loading (or building) it on the first call; None if it cannot be had."""
    global _lib, _reason, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                _lib = _locate_or_build()
            except Exception as e:  # noqa: BLE001 - any failure means: fall back, say why once
                _reason = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
                if len(str(e)) > len(_reason):
                    _reason += " ..."
                warnings.warn(f"torch_mla: native CUDA kernels unavailable ({e}); using the next "
                              "backend (Triton)", RuntimeWarning, stacklevel=3)
            _tried = True
            _invalidate()
    return _lib


def reason() -> str:
    """Why get() returned None (NOT_BUILT before the first attempt)."""
    return _reason or NOT_BUILT


def reset() -> None:
    """Forget the load attempt (tests; or after building in the same process)."""
    global _lib, _reason, _tried
    with _lock:
        _lib, _reason, _tried = None, None, False
    _invalidate()


def _invalidate() -> None:
    """Backend choices depend on whether the library loaded: drop the cached ones (a module's
    own global assignments are not seen by its watcher; see torch_mla._dispatch)."""
    from .. import _dispatch

    _dispatch.invalidate()
