"""The eager fast path of ``torch_mla.sparse_decode``: on plain CPU/CUDA tensors, what
``torch.ops.mla.sparse_decode`` would do, without paying for it on every call.

Why: a decode step calls the op once per layer, and its host path cost more than the kernels of a
small step (tools/host_overhead.py: the dispatcher ~4 us, the contract checks ~3.5, the backend
choice ~4.5, the backend's per-shape arithmetic several more, on a fast desktop CPU; about three
times that on the H100 host). All of that depends only on the call's metadata, so it is done
once per metadata and cached as a *plan*; a call then costs its metadata reads, one dict lookup
and what the backend must do per call (allocate, launch).

Same results, same errors:

* ``plain()``: nothing that could see or change the op call is active: a TorchFunction or
  TorchDispatch mode (FakeTensorMode, FunctionalTensorMode, make_fx, export, DeviceContext),
  functorch transforms (vmap, grad), jit tracing, the autograd profiler (the op keeps its trace
  event), forward AD. torch.compile never gets here: the public function asks
  ``torch.compiler.is_compiling()`` first, which Dynamo folds to True, so it traces the op.
* each tensor argument must be a plain tensor that reaches the op's kernel unchanged: exactly
  ``torch.Tensor`` (no subclass), no gradient needed, no negative bit, a readable non-null data
  pointer (sparse, mkldnn and nested tensors raise or have none, as do ZeroTensors and zero-size
  tensors); a device the op has a kernel for (CPU or CUDA). Anything else takes the op.
* the plan's key is what the decisions read: for every tensor argument its shape, strides, dtype,
  device and ``data_ptr() % 16`` (None for absent ones); d_v; whether sm_scale is finite; the
  forced backend. The contract checks and every backend's supports() read nothing else (never a
  tensor's values: no host sync), so a plan made for a key holds for every call with that key.
  Module state they read (backend tables, GPU_VERIFIED, the native library's load state) drops
  every plan when it changes (torch_mla._dispatch.invalidate).
* a key whose inputs the contract rejects, or that no backend takes, gets no plan: every such
  call goes through the op, which raises the error it always raised.
"""

from __future__ import annotations

import math
import threading

import torch

from . import _device, _dispatch
from .meta import common, layouts, schedule, sparse_decode as msd

_OP = "sparse_decode"
_MAX_PLANS = 256  # shapes in use at a time are few; a flood of new ones just starts over
_PLANS: dict = _dispatch.register_cache({})  # key -> the prepared function of the op's args

_Tensor = torch.Tensor
_tf_mode = torch._C._is_torch_function_mode_enabled
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch = torch._C._are_functorch_transforms_active
_tracing = torch._C._get_tracing_state
_profiling = torch.autograd._profiler_enabled
_fwad = torch.autograd.forward_ad
_isfinite = math.isfinite


def plain() -> bool:
    """Nothing active that could see or change an op call (see the module docstring)."""
    return not (_tf_mode() or _dispatch_modes() or _functorch() or _tracing() is not None
                or _profiling() or _fwad._current_level >= 0)


class _NotPlain(Exception):
    """A tensor argument the op must see (raised while reading the key; caught right there)."""


def _meta(t):
    """The key part of an optional tensor argument (raises for a tensor that is not plain)."""
    if type(t) is not _Tensor or t.requires_grad or t.is_neg():
        raise _NotPlain
    ptr = t.data_ptr()
    if not ptr:
        raise _NotPlain
    return t.shape, t.stride(), t.dtype, t.device, ptr & 15


# {0: (key, plan)} of the last call: consecutive calls (layers) mostly share a key, and comparing
# with it costs less than hashing it. One tuple, so threads never see a key with another's plan.
_LAST: dict = _dispatch.register_cache({})
_NO_ENTRY = (None, None)


def sparse_decode(q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices,
                  extra_topk_length, d_v, sm_scale, schedule):
    """``(out, lse)`` of the call, or None: then the caller takes ``torch.ops.mla.sparse_decode``
    (arguments as the public function's; converted here exactly as there)."""
    # plain(), inlined (every call asks); q is looked at only once it is known to be a tensor
    if (_tf_mode() or _dispatch_modes() or _functorch() or _tracing() is not None
            or _profiling() or _fwad._current_level >= 0 or type(q) is not _Tensor):
        return None
    try:
        if sm_scale is None:
            sm_scale = q.shape[-1] ** -0.5
        d_v = int(d_v)
        sm_scale = float(sm_scale)
        sched, splits = (None, None) if schedule is None else (schedule.metadata,
                                                               schedule.num_splits)
    except Exception:  # noqa: BLE001 - the op's argument conversion raises it again
        return None
    return run(q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices,
               extra_topk_length, d_v, sm_scale, sched, splits)


def run(q, k_cache, indices, topk_length=None, attn_sink=None, extra_k_cache=None,
        extra_indices=None, extra_topk_length=None, d_v=512, sm_scale=1.0,
        schedule_metadata=None, num_splits=None):
    """The op on its schema's arguments (defaults as there: the dispatcher may leave trailing
    ones out) through the plan of their key (made now if need be), or None when they get none
    (not plain, or rejected: the caller runs the op's full path). Also what the op's CPU/CUDA
    kernel runs first (torch_mla._dispatch), so that compiled code skips the checks and the
    backend choice too."""
    # the three tensors every call has, inlined (the others are often None)
    T = _Tensor
    if (type(q) is not T or type(k_cache) is not T or type(indices) is not T
            or q.requires_grad or k_cache.requires_grad or indices.requires_grad
            or q.is_neg() or k_cache.is_neg() or indices.is_neg()):
        return None
    try:
        qp, kp, ip = q.data_ptr(), k_cache.data_ptr(), indices.data_ptr()
        if not (qp and kp and ip):
            return None
        forced = _dispatch._forced.get()
        if forced is None:
            forced = _dispatch.forced_backend()
        key = (forced, d_v, _isfinite(sm_scale),
               q.shape, q.stride(), q.dtype, q.device, qp & 15,
               k_cache.shape, k_cache.stride(), k_cache.dtype, k_cache.device, kp & 15,
               indices.shape, indices.stride(), indices.dtype, indices.device, ip & 15,
               None if topk_length is None else _meta(topk_length),
               None if attn_sink is None else _meta(attn_sink),
               None if extra_k_cache is None else _meta(extra_k_cache),
               None if extra_indices is None else _meta(extra_indices),
               None if extra_topk_length is None else _meta(extra_topk_length),
               None if schedule_metadata is None else _meta(schedule_metadata),
               None if num_splits is None else _meta(num_splits))
        last = _LAST.get(0, _NO_ENTRY)
        plan = last[1] if key == last[0] else _PLANS.get(key)
    except Exception:  # noqa: BLE001 - whatever it is, the op raises it (or handles the input)
        return None
    args = (q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices,
            extra_topk_length, d_v, sm_scale, schedule_metadata, num_splits)
    if plan is None:
        generation = _dispatch.generation
        plan = _plan(args)
        if plan is None:
            return None
        if generation != _dispatch.generation:  # the state changed meanwhile (another thread)
            return plan(*args)  # this call may use it (made from the state it started with)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    _LAST[0] = (key, plan)
    return plan(*args)


def _plan(args):
    """The function that runs the op on calls with these arguments' key, or None (the op must
    see them, or raises for them)."""
    if args[0].device.type not in ("cpu", "cuda"):  # no kernel of the op on other devices
        return None
    try:
        _dispatch.CHECKS[_OP](*args)
        backend = _dispatch.select(_OP, args)
        prepare = backend.prepares.get(_OP)
        return prepare(*args) if prepare is not None else backend.impls[_OP]
    except Exception:  # noqa: BLE001 - the op raises it again, from where it always did
        return None


# Module state the decisions read: rebinding any attribute of these modules drops every plan.
# (The backends' packages watch themselves; these are the shared ones.)
for _mod in (_dispatch, _device, common, layouts, schedule, msd):
    _dispatch.watch(_mod)
del _mod

_dispatch.PLANNED[_OP] = run  # the op's kernel tries the plan first


# ---------------------------------------------------------------------------------------------
# scratch memory of eager calls
# ---------------------------------------------------------------------------------------------
#
# A backend's split-KV workspace is scratch: written and read by the kernels of one call, on the
# current stream, never returned. A torch.empty per call pays the caching allocator twice (the
# allocation, and the free when the call returns) on top of the Python call, so calls on one
# stream reuse one buffer instead. Why that is safe:
#
# * stream order: the next call on the same stream launches its kernels after this call's, and
#   no kernel of ours is launched with programmatic dependent launch, so a later call writes the
#   buffer only after every earlier kernel on that stream has finished with it;
# * one buffer per (thread, device, stream): two threads launching on one stream could interleave
#   their kernels (main A, main B, combine A), so each thread has its own;
# * never while the current stream is capturing a CUDA graph: a graph keeps the addresses it was
#   captured with and replays later on any stream, concurrently with eager calls; captured calls
#   allocate as before (from the graph's private pool);
# * a buffer grows by being replaced: the old one goes back to the caching allocator, which hands
#   its memory only to later allocations on the stream it was made on (the same stream, so again
#   ordered after the kernels that used it);
# * buffers above WORKSPACE_CACHE_BYTES are not kept (a call that large runs kernels long enough
#   to hide an allocation), so at most that much stays held per (thread, device, stream);
#   release_workspaces() drops this thread's buffers (e.g. before torch.cuda.empty_cache()).
#
# The returned tensors (out, lse) are always new allocations: nothing a caller holds aliases a
# cached buffer.

WORKSPACE_CACHE_BYTES = 64 << 20
_ws_local = threading.local()
# (a CPU build of torch has a stand-in that raises when called)
_capturing = (getattr(torch._C, "_cuda_isCurrentStreamCapturing", None)
              if torch.version.cuda is not None else None)
_U8 = torch.uint8


def workspace(nbytes: int, device: torch.device, index, stream: int):
    """``(uint8 tensor of at least nbytes on device, its data pointer)`` for scratch that only
    kernels launched in this call on ``stream`` use: the raw current stream of ``device``, which
    must be the current device (CUDA index ``index``; None and stream 0 for CPU tensors, whose
    kernels run synchronously); ``stream=None``: a new buffer, not kept. Reused across calls
    where that is safe (above)."""
    if stream is None:  # (callers: launching on another device than the current one)
        buf = torch.empty(max(nbytes, 1), dtype=_U8, device=device)
        return buf, buf.data_ptr()
    try:
        cache = _ws_local.bufs
    except AttributeError:
        cache = _ws_local.bufs = {}
    key = (index, stream)
    hit = cache.get(key)
    if hit is not None and hit[2] >= nbytes and not (index is not None and _capturing
                                                     and _capturing()):
        return hit[0], hit[1]
    buf = torch.empty(max(nbytes, 1), dtype=_U8, device=device)
    ptr = buf.data_ptr()
    if nbytes <= WORKSPACE_CACHE_BYTES and not (index is not None and _capturing
                                                and _capturing()):
        cache[key] = (buf, ptr, nbytes)
    return buf, ptr


def release_workspaces() -> None:
    """Drop this thread's cached scratch buffers (their memory returns to the caching
    allocator)."""
    _ws_local.__dict__.pop("bufs", None)

