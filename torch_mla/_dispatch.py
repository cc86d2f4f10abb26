"""Backend selection: every ``mla`` op's CPU/CUDA kernel is an entry that checks the inputs once
(the contract in torch_mla.meta) and hands them to the first backend that accepts them.

A backend is a ``Backend``: a name, the ops it implements, and ``supports(op, args)`` which returns
the reasons it does not apply (an empty list means it does). Order per device type:
CUDA: native -> triton -> reference; any other device: reference. A forced backend
(``use_backend`` or ``TORCH_MLA_BACKEND``) is used alone and raises with its reasons if it refuses.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import meta

BACKEND_NAMES = ("native", "triton", "reference")
ORDER = {"cuda": ("native", "triton", "reference")}
DEFAULT_ORDER = ("reference",)
ENV_VAR = "TORCH_MLA_BACKEND"


class Backend:
    def __init__(self, name: str, impls: Dict[str, Callable],
                 supports: Optional[Callable[[str, Sequence], List[str]]] = None):
        self.name = name
        self.impls = impls
        self._supports = supports

    def reasons(self, op: str, args: Sequence) -> List[str]:
        """Why this backend does not run ``op`` on ``args`` (empty: it does)."""
        if op not in self.impls:
            return [f"{self.name} has no kernel for {op}"]
        if self._supports is None:
            return []
        reasons = self._supports(op, args)
        return list(reasons) if reasons else []


_BACKENDS: Dict[str, Backend] = {}
_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("torch_mla_backend",
                                                                         default=None)


def register_backend(backend: Backend) -> None:
    assert backend.name in BACKEND_NAMES, backend.name
    _BACKENDS[backend.name] = backend


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
        env = os.environ.get(ENV_VAR, "").strip().lower()
        name = _check_name(env) if env else None
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run every torch_mla op inside the block on backend ``name`` ("native", "triton" or
    "reference"); an op that backend cannot run raises with the reasons. Overrides
    ``TORCH_MLA_BACKEND``."""
    token = _forced.set(_check_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


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


def _entry(op: str):
    check = meta.CHECKS[op]

    def kernel(*args):
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
