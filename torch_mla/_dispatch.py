"""Backend selection: every ``mla`` op's CPU/CUDA kernel is an entry that checks the inputs once
(the contract in torch_mla.meta) and hands them to the first backend that accepts them.

A backend is a ``Backend``: a name, the ops it implements, and ``supports(op, args)`` which returns
the reasons it does not apply (an empty list means it does). Order per device type:
CUDA: native -> triton -> reference; any other device: reference. A forced backend
(``use_backend`` or ``TORCH_MLA_BACKEND``) is used alone and raises with its reasons if it refuses.

Decisions are cached as plans (torch_mla._eager: the public function's eager fast path, and the
op's kernel below), keyed on the call's metadata and the forced backend. Everything else a
decision reads is module state of torch_mla (backend
tables, GPU_VERIFIED sets, the native library's load state, the backends' supports()), so every
cache is dropped (``invalidate``) whenever any of it changes: the modules concerned are
``watch``ed (rebinding any of their attributes invalidates, as monkeypatching does) and their
tables are ``WatchedDict``s; the few places that rebind module state from inside the module
(the library loader) call ``invalidate`` themselves.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import types
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import meta

# ---------------------------------------------------------------------------------------------
# invalidation of cached decisions
# ---------------------------------------------------------------------------------------------

_CACHES: List[dict] = []  # every cache of decisions (the eager fast path's plans)
# bumped by every invalidation: a decision made while the state changed is not stored
generation = 0


def invalidate() -> None:
    """Drop every cached decision (a backend table, a GPU_VERIFIED set, the library's load state
    or a supports() function changed, or may have)."""
    global generation
    generation += 1
    for cache in _CACHES:
        cache.clear()


def register_cache(cache: dict) -> dict:
    _CACHES.append(cache)
    return cache


class WatchedModule(types.ModuleType):
    """A module whose attribute (re)binding from outside (``mod.X = ...``, monkeypatch.setattr)
    invalidates cached decisions. Reads are untouched: module code reads its globals directly."""

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        invalidate()

    def __delattr__(self, name):
        super().__delattr__(name)
        invalidate()


def watch(module: types.ModuleType) -> None:
    """Make ``module`` a WatchedModule (Python allows assigning a module's ``__class__``)."""
    if not isinstance(module, WatchedModule):
        module.__class__ = WatchedModule


class WatchedDict(dict):
    """A dispatch table (backend order, ops -> supports/impl) whose changes invalidate."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        invalidate()

    def __delitem__(self, key):
        super().__delitem__(key)
        invalidate()

    def _changed(method):  # noqa: N805 - decorates the mutating dict methods below
        def wrapper(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            finally:
                invalidate()
        wrapper.__name__ = method.__name__
        return wrapper

    pop = _changed(dict.pop)
    popitem = _changed(dict.popitem)
    clear = _changed(dict.clear)
    update = _changed(dict.update)
    setdefault = _changed(dict.setdefault)
    __ior__ = _changed(dict.__ior__)
    del _changed


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------

BACKEND_NAMES = ("native", "triton", "reference")
ORDER = WatchedDict({"cuda": ("native", "triton", "reference")})
DEFAULT_ORDER = ("reference",)
ENV_VAR = "TORCH_MLA_BACKEND"


class Backend:
    """``prepares`` (optional): op -> ``prepare(*args)``, which returns a function of the same
    arguments doing the op for every call whose metadata (shapes, strides, dtypes, devices,
    None-ness, 16-byte alignment of each tensor; d_v) equals this call's: the per-shape host
    work done once. The eager fast path caches it; ops without one are cached as their impl."""

    def __init__(self, name: str, impls: Dict[str, Callable],
                 supports: Optional[Callable[[str, Sequence], List[str]]] = None,
                 prepares: Optional[Dict[str, Callable]] = None):
        self.name = name
        self.impls = impls
        self._supports = supports
        self.prepares = prepares if prepares is not None else {}

    def reasons(self, op: str, args: Sequence) -> List[str]:
        """Why this backend does not run ``op`` on ``args`` (empty: it does)."""
        if op not in self.impls:
            return [f"{self.name} has no kernel for {op}"]
        if self._supports is None:
            return []
        reasons = self._supports(op, args)
        return list(reasons) if reasons else []


def prepared_impl(prepare: Callable) -> Callable:
    """An op's impl made from a backend's ``prepare`` (see Backend): the per-metadata part,
    then the call (what the eager fast path does in two steps, with the first one cached)."""
    def impl(*args):
        return prepare(*args)(*args)
    impl.__doc__ = prepare.__doc__
    return impl


_BACKENDS: Dict[str, Backend] = WatchedDict()
_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("torch_mla_backend",
                                                                         default=None)


def register_backend(backend: Backend) -> None:
    assert backend.name in BACKEND_NAMES, backend.name
    _BACKENDS[backend.name] = backend  # a WatchedDict: invalidates


def unverified_reasons(backend: str, op: str, verified) -> List[str]:
    """The gate every fast backend applies on the GPU: a kernel that has not passed its
    tests/gpu/ suite on the hardware (not in ``verified``) is skipped, with this reason, unless
    its backend is forced. It could fault or be wrong at real sizes; the next backend is safe."""
    if op in verified or forced_backend() == backend:
        return []
    return [f"the {backend} {op} kernel has not passed its GPU tests yet "
            f"(force it with torch_mla.use_backend('{backend}'))"]


def _check_name(name: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown torch_mla backend {name!r}; choose one of {BACKEND_NAMES}")
    return name


def forced_backend() -> Optional[str]:
    name = _forced.get()
    if name is None:
        env = os.environ.get(ENV_VAR, "")
        if env:
            env = env.strip().lower()
            name = _check_name(env) if env else None
    return name


class use_backend(contextlib.ContextDecorator):  # noqa: N801 - a function in the public API
    """Run every torch_mla op inside the block on backend ``name`` ("native", "triton" or
    "reference"); an op that backend cannot run raises with the reasons. Overrides
    ``TORCH_MLA_BACKEND``.

    A class rather than a @contextmanager generator: entering and leaving costs ~0.4 us instead
    of ~1.4, paid by every call a caller wraps in it (the bench does). The name is checked on
    entering, as the generator did; an instance can be entered again, also nested."""

    __slots__ = ("_name", "_tokens")

    def __init__(self, name: str):
        self._name = name
        self._tokens = []

    def __enter__(self):
        self._tokens.append(_forced.set(_check_name(self._name)))

    def __exit__(self, *exc):
        _forced.reset(self._tokens.pop())
        return False

    def _recreate_cm(self):  # as a decorator: a fresh one per call (threads may share it)
        return type(self)(self._name)


def _device(args: Sequence) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cpu")


def _candidates(args: Sequence) -> Sequence[str]:
    forced = forced_backend()
    if forced is not None:
        return (forced,)
    return ORDER.get(_device(args).type, DEFAULT_ORDER)


def _report(op: str, args: Sequence):
    """[(backend name, reasons)] for every candidate, in order, up to and including the chosen."""
    rows = []
    for name in _candidates(args):
        backend = _BACKENDS.get(name)
        reasons = (backend.reasons(op, args) if backend is not None
                   else [f"the {name} backend is not part of this build"])
        rows.append((name, reasons))
        if not reasons:
            break
    return rows


def select(op: str, args: Sequence) -> Backend:
    # The common case without building the report: the forced backend, or the device's order,
    # asked in turn; on refusal the report below says why every candidate declined.
    forced = forced_backend()
    names = (forced,) if forced is not None else ORDER.get(_device(args).type, DEFAULT_ORDER)
    for name in names:
        backend = _BACKENDS.get(name)
        if backend is not None and not backend.reasons(op, args):
            return backend
    rows = _report(op, args)
    name, reasons = rows[-1]
    if reasons:
        detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in rows)
        prefix = f"backend {forced!r} was forced and " if forced else "no backend "
        raise RuntimeError(f"torch_mla: {prefix}cannot run mla::{op} here ({detail})")
    return _BACKENDS[name]  # pragma: no cover - a backend changed its mind between two asks


def explain_args(op: str, args: Sequence) -> str:
    meta.CHECKS[op](*args)
    rows = _report(op, args)
    chosen, reasons = rows[-1]
    lines = [f"mla::{op} on {_device(args)}: "
             + (f"{chosen}" if not reasons else "no backend applies")]
    forced = forced_backend()
    if forced:
        lines[0] += f" (forced by use_backend/{ENV_VAR})"
    for name, why in rows:
        if why:
            lines.append(f"  skipped {name}: " + "; ".join(why))
    return "\n".join(lines)


# op -> contract check, as the entries below captured it (the eager fast path checks with these)
CHECKS: Dict[str, Callable] = dict(meta.CHECKS)
# op -> ``run(*args)``: the op through a cached plan of its metadata, or None when it has none
# (torch_mla._eager: sparse_decode). The kernels below try it first: a call that comes through
# torch.ops (compiled code, or eager calls the fast path leaves to the op) skips the checks, the
# backend choice and the per-shape work when an earlier call with the same key made a plan.
PLANNED: Dict[str, Callable] = {}


def _entry(op: str):
    check = CHECKS[op]

    def kernel(*args):
        planned = PLANNED.get(op)
        if planned is not None:
            res = planned(*args)
            if res is not None:
                return res
        check(*args)
        return select(op, args).impls[op](*args)

    kernel.__name__ = f"mla_{op}_entry"
    return kernel


# op name -> the CPU/CUDA kernel of mla::<op> (contract check, backend choice, implementation):
# what torch.ops.mla.<op> runs on real CPU/CUDA tensors.
ENTRIES: Dict[str, Callable] = {op: _entry(op) for op in meta.OPS}

_IMPL_LIB = torch.library.Library("mla", "IMPL")  # noqa: TOR901 - kernels of our own namespace
for _op in meta.OPS:
    _IMPL_LIB.impl(_op, ENTRIES[_op], "CPU")
    _IMPL_LIB.impl(_op, ENTRIES[_op], "CUDA")
