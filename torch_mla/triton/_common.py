"""What every Triton kernel module shares: where Triton may run, and the interpreter flag.

Triton decides at decoration time whether ``@triton.jit`` kernels are interpreted: with
``TRITON_INTERPRET=1`` set before torch_mla is imported, the kernels run on CPU tensors (slowly;
CI uses this on small shapes). The interpreter multiplies bf16/fp16 ``tl.dot`` operands as raw
bits, so kernels upcast dot operands to fp32 when ``DOT_F32`` (a constexpr) is set; the GPU build
never does. (Seen with Triton 3.9: bf16 x bf16 elementwise products are wrong there too, so do
elementwise math on 16-bit values in fp32.)
"""

from __future__ import annotations

import operator
import os
import warnings
from typing import List, Sequence

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DOT_F32 = INTERPRET  # pass as a tl.constexpr to every kernel that calls tl.dot


def alert_not_deterministic(what: str) -> None:
    """PyTorch's rule for an op without a deterministic implementation (as its own CUDA
    index_add_ or scatter_add_ follow it): under ``torch.use_deterministic_algorithms(True)``
    raise, or warn with ``warn_only=True``. Called by kernels that sum with atomic adds, whose
    float results depend on the order the additions land in."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    msg = (f"torch_mla: {what} adds partial sums with atomics, so its result is not bitwise "
           "reproducible, and torch.use_deterministic_algorithms(True) is on. The reference "
           "backend is deterministic (torch_mla.use_backend('reference'), slow on large "
           "shapes); or pass warn_only=True to torch.use_deterministic_algorithms.")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg, stacklevel=3)
    else:
        raise RuntimeError(msg)


def first_tensor(args: Sequence) -> torch.Tensor:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    raise ValueError("no tensor argument")


def device_reasons(args: Sequence) -> List[str]:
    """Why Triton cannot run on the device of these arguments (empty: it can)."""
    t = first_tensor(args)
    if t.is_cuda:  # every call on a GPU: no device object or type string made
        return []
    dev = t.device
    if dev.type == "cpu":
        return [] if INTERPRET else ["CPU tensors run Triton kernels only under TRITON_INTERPRET=1"]
    return [f"Triton runs on CUDA devices, not {dev.type}"]


# ---------------------------------------------------------------------------------------------
# launches
# ---------------------------------------------------------------------------------------------
#
# ``kernel[grid](*args, **kw)`` costs ~15-30 us of host time per launch in Triton 3.9 (measured
# by tools/host_overhead.py on the CPU: the generated binder specializes every argument, then a
# cache key is built, knobs read, hooks checked, and only then the C launcher runs), as much as
# all the rest of a decode call. ``launch`` keeps, per kernel and per *exact* launch signature,
# the compiled kernel that call returned, and launches it again directly
# (``compiled[grid](*all arguments)``, what JITFunction.run itself ends with) when the same
# signature comes back. The signature is finer than Triton's specialization key, so the kernel
# it finds is the one Triton would have chosen: every int argument by value (Triton specializes
# ints on == 1 and % 16), every other non-tensor argument by type and value, floats by type
# (not specialized), tensors by dtype and, all together, by being 16-byte aligned (Triton's
# pointer specialization; any unaligned pointer sends the call through Triton), the device of
# the first tensor (callers make it the current device, whose kernel cache Triton would use),
# and every keyword (constexprs and options) by value. Not seen: Triton knobs changed after a
# signature's first launch (TRITON_DEBUG and the like), and JITFunction pre-run hooks (none of
# ours has any). If a direct launch fails the first time it is tried (another Triton's calling
# convention), direct launches stop for the process, with one warning, and every launch goes
# through ``kernel[grid]`` as before. TORCH_MLA_TRITON_DIRECT_LAUNCH=0 turns them off.

DIRECT_LAUNCH = os.environ.get("TORCH_MLA_TRITON_DIRECT_LAUNCH", "1") != "0"
_MAX_SIGNATURES = 512
# signature -> [compiled kernel, constexpr values in parameter order, direct launch has worked]
_compiled: dict = {}


def cuda_index(t: torch.Tensor):
    """The CUDA device index of ``t``, None if it is not on a CUDA device (then launches go
    through Triton). A seam: tools/host_overhead.py makes CPU tensors count as device 0."""
    return t.get_device() if t.is_cuda else None


def _signature(kernel, args, kwargs, _tensor=torch.Tensor):
    """The exact launch signature (see above), or None when the call must go through Triton."""
    parts = [kernel]
    add = parts.append
    ptrs = 0
    dev = None
    for a in args:
        cls = a.__class__
        if cls is int:
            add(a)
        elif cls is _tensor or isinstance(a, _tensor):
            if dev is None:
                dev = cuda_index(a)
                if dev is None:
                    return None
            ptrs |= a.data_ptr()
            add(a.dtype)
        elif cls is float:
            add(float)
        else:
            add((cls, a))
    if dev is None or ptrs & 15:
        return None
    add(dev)
    parts.extend(kwargs.items())
    return tuple(parts)


def _constexpr_tail(kernel, n_positional: int, kwargs):
    """The keyword arguments that are kernel parameters, in parameter order (what follows the
    positional ones in the compiled kernel's argument list), or None if unknown."""
    names = getattr(kernel, "arg_names", None)
    if names is None or len(names) < n_positional:
        return None
    rest = names[n_positional:]
    if any(n not in kwargs for n in rest):
        return None
    return tuple(kwargs[n] for n in rest)


class LaunchSite:
    """One launch of one kernel in a prepared call (see torch_mla.triton.sparse_decode.prepare),
    passed to ``launch`` in place of the kernel. Its launch signature (above) costs ~5 us to
    build for a 38-argument kernel, and between calls of one prepared call all of it but the int
    arguments (and any other non-tensor, non-float ones) and the keywords is fixed: every tensor
    argument keeps its dtype, device and 16-byte alignment (the inputs share one metadata key,
    which includes their alignment; new tensors come from PyTorch's allocators, whose blocks are
    at least 64-byte aligned) and float arguments are not specialized. So the signature is built
    once and reused while those arguments and the keywords compare equal (one C-level
    itemgetter and one dict comparison); otherwise it is built again.
    tests/test_host_overhead.py checks it against ``_signature`` call by call."""

    __slots__ = ("kernel", "_seen", "_memo", "_ready")

    def __init__(self, kernel):
        self.kernel = kernel
        self._seen = False
        # (getter of the by-value arguments, their values, the keywords, the signature); one
        # tuple, replaced whole, so that threads sharing a site never mix two calls' parts
        self._memo = None
        # (signature, grid, runner, compiled kernel, constexpr tail) of the last direct launch
        self._ready = None

    def signature(self, args, kwargs):
        memo = self._memo
        if memo is not None and kwargs == memo[2] and memo[0](args) == memo[1]:
            return memo[3]
        sig = _signature(self.kernel, args, kwargs)
        # what to compare is found on the second call: a site used once (the op's kernel
        # prepares a call and runs it once) pays only for the signature, as a plain launch does
        if sig is None:
            self._memo = None
        elif self._seen:
            # every argument the signature holds by value (a position's type is fixed by the
            # launch code, so == on values is enough)
            where = [i for i, a in enumerate(args)
                     if not (a.__class__ is float or isinstance(a, torch.Tensor))]
            get = operator.itemgetter(*where) if where else _no_ints
            self._memo = (get, get(args), dict(kwargs), sig)
        self._seen = True
        return sig


def _no_ints(args):
    return None


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, or the direct launch of the compiled kernel that an
    identical earlier call got (see above). Returns the compiled kernel (None under the
    interpreter). ``kernel`` may be a LaunchSite of the kernel."""
    global DIRECT_LAUNCH
    site = None
    if kernel.__class__ is LaunchSite:
        site, kernel = kernel, kernel.kernel
        sig = site.signature(args, kwargs) if DIRECT_LAUNCH else None
        ready = site._ready
        # the same signature (the very object: the site kept it) and grid as the last direct
        # launch from this site: its runner again, without the lookup (hashing a 50-element
        # signature) or making the runner
        if sig is not None and ready is not None and ready[0] is sig and ready[1] == grid:
            ready[2](*args, *ready[4])
            return ready[3]
    else:
        sig = _signature(kernel, args, kwargs) if DIRECT_LAUNCH else None
    if sig is not None:
        hit = _compiled.get(sig)
        if hit is not None:
            compiled = hit[0]
            grid3 = grid if len(grid) == 3 else (*grid, 1, 1)[:3]  # the runner reads 3 dims
            if hit[2]:
                runner = compiled[grid3]
                runner(*args, *hit[1])
                if site is not None:
                    site._ready = (sig, grid, runner, compiled, hit[1])
                return compiled
            try:
                compiled[grid3](*args, *hit[1])
            except Exception as exc:  # another Triton's convention: launch through Triton
                DIRECT_LAUNCH = False
                _compiled.clear()
                warnings.warn(f"torch_mla: direct Triton launches are off ({type(exc).__name__}: "
                              f"{exc}); every launch goes through kernel[grid]", stacklevel=2)
            else:
                hit[2] = True
                return compiled
    compiled = kernel[grid](*args, **kwargs)
    if sig is not None and DIRECT_LAUNCH and hasattr(compiled, "__getitem__"):
        tail = _constexpr_tail(kernel, len(args), kwargs)
        if tail is not None:
            if len(_compiled) >= _MAX_SIGNATURES:
                _compiled.clear()
            _compiled[sig] = [compiled, tail, False]
    return compiled
