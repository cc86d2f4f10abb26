"""Host overhead of one eager ``torch_mla.sparse_decode`` call, without a GPU, on the Triton or
the native backend.

What runs: the whole public eager call path on CPU tensors of the production shape: the eager
fast path (``torch_mla._eager``: guard, metadata key, cached plan) or, on its first call with a
key and whenever it does not apply, ``torch.ops.mla.sparse_decode`` -> contract checks ->
backend choice -> the backend's host code (output and workspace allocation, schedule handling,
launch arguments / the native parameter struct). Simulated, so that the CUDA code path is the one
taken:

* the device predicates say "CUDA": the dispatcher's candidate order for CPU tensors is the CUDA
  order (native -> triton -> reference); the Triton backend's predicates (``device_reasons`` and
  the GPU-verified gate) see the first tensor as a CUDA one (``_common.first_tensor`` returns a
  stand-in with ``is_cuda`` and a cuda device), and the native backend's device check passes;
* every Triton launch (``torch_mla.triton.sparse_decode._launch``, the one seam all of its
  launches go through) is replaced by a stub that records ``(kernel, grid, args, kwargs)``,
  launches nothing and returns a stand-in compiled kernel shaped like Triton 3.6's
  (``StandInCompiled``), so that a plan records and then makes its direct C launcher calls
  (``sparse_decode._c_launch``) on it: from a key's second call on, the Triton launches are
  those calls, to a Python function that does nothing (a C one in the real launcher);
* ``--backend native``: the native library is a stand-in (``NativeStandIn``) whose
  ``sparse_decode`` is a real C function typed like ``tmla_sparse_decode`` that returns 0 at
  once, so the ctypes call (argument conversion, GIL release) is timed and the kernels are not;
  the current CUDA stream / device queries answer 0 (``native.sparse_decode._current_stream``,
  ``_current_device``; in older trees ``torch.cuda.current_stream``).

Not run here: the CUDA device guard, the CUDA caching allocator (CPU malloc instead), the C side
of a launch (Triton's C launcher, the native library's cudaLaunchKernelEx calls) and Triton's
runner's driver queries. ``--launch-estimate`` (on by default, Triton) times the Python part of
Triton's launch path on the recorded arguments.

Usage::

    python tools/host_overhead.py                          # b=64 s_q=2 h_q=128 topk=2048, V32
    python tools/host_overhead.py --backend native
    python tools/host_overhead.py --bench-shape --backend both   # the bench's host-overhead row
    python tools/host_overhead.py --b 1 --profile          # + cProfile of the whole call
    python tools/host_overhead.py --auto                   # unforced dispatch

Numbers are host-clock medians on this machine's CPU; the GPU host (H100 box) differs, so
compare stages with each other and before/after on the same machine. The tool also runs on an
older tree (``PYTHONPATH=<tree>``): what that tree lacks is skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import ctypes
import io
import os
import pstats
import statistics
import sys
import time
from typing import Callable, Dict, List

# Run as a script: real @triton.jit kernels (not the interpreter), which the launch estimate
# needs. Imported (by the tests) it leaves the environment alone: Triton reads it at launch time
# too.
if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402

import torch_mla  # noqa: E402
from torch_mla import _dispatch  # noqa: E402
from torch_mla.meta.layouts import LAYOUTS, empty_cache  # noqa: E402

OP = "sparse_decode"


# ---------------------------------------------------------------------------------------------
# the CUDA simulation
# ---------------------------------------------------------------------------------------------

class LaunchRecorder:
    """Stands in for ``_launch(kernel, grid, *args, **kwargs)``: records, launches nothing, and
    returns a stand-in of the compiled kernel (``StandInCompiled``, one per kernel), so that a
    plan can set up its direct C launches (torch_mla.triton.sparse_decode._c_launch) on it;
    those launches are recorded in ``c_calls`` as (kernel, the C launcher's arguments)."""

    def __init__(self):
        self.calls: List[tuple] = []
        self.c_calls: List[tuple] = []
        self.keep = False
        self.compiled: Dict[object, "StandInCompiled"] = {}

    def __call__(self, kernel, grid, *args, **kwargs):
        kernel = kernel_of(kernel)
        if self.keep:
            self.calls.append((kernel, grid, args, kwargs))
        compiled = self.compiled.get(kernel)
        if compiled is None:
            compiled = self.compiled[kernel] = StandInCompiled(self, kernel)
        return compiled


class StandInLauncher:
    """Triton 3.6's CudaLauncher as the runner calls it (no scratch, no cooperative grid, no
    programmatic dependent launch); its C ``launch`` is a Python function that records the call
    when the recorder keeps calls and does nothing else."""

    def __init__(self, rec: LaunchRecorder, kernel):
        def launch(*a):
            if rec.keep:
                rec.c_calls.append((kernel, a))
        self.launch = launch  # an instance attribute, as in Triton

    def __call__(self, gx, gy, gz, stream, function, *args):
        self.launch(gx, gy, gz, stream, function, False, False, None, None, *args)


class StandInCompiled:
    """A compiled kernel whose runner (``compiled[grid](*args)``) does what Triton 3.6's does:
    current stream (0 here), no launch metadata without hooks, then the launcher."""

    def __init__(self, rec: LaunchRecorder, kernel):
        self.function = 0x7F00  # a CUfunction handle
        self.packed_metadata = (8, 1, 0)
        self._run = StandInLauncher(rec, kernel)

    def __getitem__(self, grid):
        import triton

        def runner(*args):
            rt = triton.knobs.runtime
            self._run(grid[0], grid[1], grid[2], 0, self.function, self.packed_metadata, None,
                      rt.launch_enter_hook, rt.launch_exit_hook, *args)
        return runner


def kernel_of(kernel):
    """The Triton kernel of a launch (launch sites wrap it: torch_mla.triton._common)."""
    from torch_mla.triton import _common

    site = getattr(_common, "LaunchSite", None)
    return kernel.kernel if site is not None and isinstance(kernel, site) else kernel


def _c_stub():
    """A C function that returns 0 at once, typed as tmla_sparse_decode (const char *params,
    void *stream, char *err, int64 err_len) -> int: libc's fegetround (FE_TONEAREST, 0, under
    the default rounding mode; the extra arguments are ignored by the callee). None if this libc
    has none."""
    try:
        fn = ctypes.CDLL(None).fegetround
    except (AttributeError, OSError):  # pragma: no cover - not glibc
        return None
    fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn if fn(b"", None, None, 0) == 0 else None


class NativeStandIn:
    """The native library as the backend sees it (``_lib.get()``) on a machine without one:
    ``sparse_decode`` is a C stub (``_c_stub``: ctypes converts the arguments as for the real
    call, nothing is launched), or, inside ``record()``, a Python function that keeps each
    call's (params bytes, stream) and returns 0."""

    path = "<host_overhead stand-in>"
    build_info = "stand-in"

    def __init__(self):
        self.c_stub = _c_stub()
        self.sparse_decode = self.c_stub or (lambda params, stream, err, err_len: 0)
        self.calls: List[tuple] = []

    @contextlib.contextmanager
    def record(self):
        keep = self.sparse_decode
        self.sparse_decode = lambda params, stream, err, n: self.calls.append((params, stream)) or 0
        try:
            yield self.calls
        finally:
            self.sparse_decode = keep


@contextlib.contextmanager
def simulate_cuda(recorder: LaunchRecorder, verified: bool = False, native=None):
    """Make CPU tensors take the CUDA path of the dispatcher and the backends, with Triton
    launches recorded by ``recorder`` instead of run. ``verified``: treat the Triton
    sparse_decode kernel as GPU-verified (so that an unforced call may choose it). ``native``: a
    NativeStandIn to serve as the loaded native library, False for "it failed to load" (the
    native backend declines), None to leave its state as it is."""
    import torch_mla.native as nat
    import torch_mla.triton as tri
    from torch_mla.triton import _common
    from torch_mla.triton import sparse_decode as tsd

    saved = []

    def patch(obj, name, value, is_item=False):
        if is_item:
            saved.append((obj, name, obj.get(name, _MISSING), True))
            obj[name] = value
        else:
            saved.append((obj, name, getattr(obj, name, _MISSING), False))
            setattr(obj, name, value)

    patch(_dispatch.ORDER, "cpu", _dispatch.ORDER["cuda"], is_item=True)
    patch(_common, "first_tensor", _first_tensor_as_cuda)
    patch(nat, "device_reasons", lambda args: [])
    if verified:
        patch(tri, "GPU_VERIFIED", tri.GPU_VERIFIED | {OP})
    if hasattr(tsd, "_launch"):
        patch(tsd, "_launch", recorder)
        if hasattr(tsd, "_c_launch"):  # direct C launches on the recorder's stand-ins
            patch(_common, "cuda_index", lambda t: 0)
            patch(tsd, "_DIRECT_C", True)
            patch(tsd, "_current_stream", lambda index: 0)
            patch(tsd, "_current_device", lambda: 0)
    else:  # before the seam existed: stub the kernel objects themselves
        class _Stub:
            def __init__(self, kernel):
                self.kernel = kernel

            def __getitem__(self, grid):
                return lambda *a, **kw: recorder(self.kernel, grid, *a, **kw)

        patch(tsd, "_sparse_decode_kernel", _Stub(tsd._sparse_decode_kernel))
        patch(tsd, "_combine_kernel", _Stub(tsd._combine_kernel))
    if native is not None:
        from torch_mla.native import _lib
        from torch_mla.native import sparse_decode as nsd

        patch(_lib, "_lib", native or None)
        patch(_lib, "_tried", True)
        if native and hasattr(nsd, "_current_stream"):
            patch(nsd, "_current_stream", lambda index: 0)
            patch(nsd, "_current_device", lambda: 0)  # asked for CUDA tensors only
        elif native:  # older trees: torch.cuda.current_stream(dev).cuda_stream
            patch(torch.cuda, "current_stream", lambda device=None: _STREAM)
    if hasattr(_dispatch, "invalidate"):  # (older trees cache nothing)
        _dispatch.invalidate()
    try:
        yield recorder
    finally:
        for obj, name, value, is_item in reversed(saved):
            if value is _MISSING:
                (obj.pop(name) if is_item else delattr(obj, name))
            elif is_item:
                obj[name] = value
            else:
                setattr(obj, name, value)
        if hasattr(_dispatch, "invalidate"):
            _dispatch.invalidate()


class _Stream:
    cuda_stream = 0


_STREAM = _Stream()
_MISSING = object()


class _AsCuda:
    """The first tensor argument as the Triton backend's device predicates see it on a GPU."""
    is_cuda = True
    device = torch.device("cuda", 0)


_AS_CUDA = _AsCuda()


def _first_tensor_as_cuda(args):
    for a in args:  # the same scan as torch_mla.triton._common.first_tensor
        if isinstance(a, torch.Tensor):
            return _AS_CUDA
    raise ValueError("no tensor argument")


# ---------------------------------------------------------------------------------------------
# inputs (the bench's sparse_decode case, without the cost of filling a real cache)
# ---------------------------------------------------------------------------------------------

def make_inputs(b=64, s_q=2, h_q=128, topk=2048, layout="v32", block_size=64, num_parts=132,
                device="cpu", seed=0):
    """q, cache, indices, schedule and sm_scale of a sparse_decode call (cache bytes random:
    nothing here reads them)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    lay = LAYOUTS[layout]
    nblk = max(1, b * ((topk + block_size - 1) // block_size))
    q = torch.randn((b, s_q, h_q, lay.d), generator=gen, device=device).to(torch.bfloat16)
    cache = empty_cache(nblk, block_size, lay, device=device)
    cache.view(torch.uint8).random_(0, 120, generator=gen)
    idx = torch.randint(0, nblk * block_size, (b, s_q, topk), generator=gen, device=device,
                        dtype=torch.int32)
    sched = torch_mla.decode_schedule(torch.full((b,), topk, dtype=torch.int32, device=device),
                                      num_parts=num_parts)
    return q, cache, idx, sched, lay.d ** -0.5


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------

def median_us(fn: Callable[[], object], calls: int = 2000, warmup: int = 50) -> float:
    for _ in range(warmup):
        fn()
    clock = time.perf_counter
    times = []
    for _ in range(calls):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times) * 1e6


def _op_args(q, cache, idx, sched, scale):
    from torch_mla.api import _sparse_decode_args

    return _sparse_decode_args(q, cache, idx, d_v=512, sm_scale=scale, schedule=sched)


def _allocations(backend: str, q, sched):
    """The per-call allocations of ``backend``'s host code, as it makes them."""
    from torch_mla.native.sparse_decode import workspace_bytes

    b, s_q, h_q, _ = q.shape
    n_ws = b + sched.metadata.shape[0]
    dt, f32 = q.dtype, torch.float32
    if hasattr(torch_mla._eager, "workspace"):  # the workspace is a cached buffer (no alloc)
        return [lambda: torch.empty(b, s_q, h_q, 512, dtype=dt),
                lambda: torch.empty(b, h_q, s_q, dtype=f32)]
    if backend == "native":
        n = workspace_bytes(b, s_q, h_q, sched.metadata.shape[0], True)
        return [lambda: torch.empty(b, s_q, h_q, 512, dtype=dt),
                lambda: torch.empty(b, h_q, s_q, dtype=f32),
                lambda: torch.empty(n, dtype=torch.uint8)]
    return [lambda: torch.empty(b, s_q, h_q, 512, dtype=dt),
            lambda: torch.empty(b, h_q, s_q, dtype=f32),
            lambda: torch.empty(n_ws, s_q, h_q, 512, dtype=f32),
            lambda: torch.empty(n_ws, s_q, h_q, dtype=f32)]


def stages(q, cache, idx, sched, scale, backend: str, forced: bool, calls: int
           ) -> Dict[str, float]:
    """Median us of the whole call and of each stage run alone (stages overlap: they are
    isolated measurements, not a partition)."""
    from torch_mla import meta

    ctx = (lambda: torch_mla.use_backend(backend)) if forced else contextlib.nullcontext
    args = _op_args(q, cache, idx, sched, scale)
    check = meta.CHECKS[OP]
    res: Dict[str, float] = {}

    def public():
        with ctx():
            return torch_mla.sparse_decode(q, cache, idx, d_v=512, sm_scale=scale, schedule=sched)

    def op_path():
        with ctx():
            return torch.ops.mla.sparse_decode(*args)

    def select():
        with ctx():
            return _dispatch.select(OP, args)

    with ctx():
        chosen = _dispatch.select(OP, args)
    res["public call torch_mla.sparse_decode (total)"] = median_us(public, calls)
    eager = getattr(torch_mla, "_eager", None)
    if eager is not None:
        before = set(eager._PLANS)
        public()
        new = [k for k in eager._PLANS if k not in before] or list(eager._PLANS)
        key = new[-1]
        plan = eager._PLANS[key]
        sd_args = (q, cache, idx, None, None, None, None, None, 512, scale, sched)

        def guard_key_lookup():
            with ctx():
                return eager.sparse_decode(*sd_args)

        res["  fast path: guard (plain())"] = median_us(eager.plain, calls)
        eager._PLANS[key] = lambda *a: None
        getattr(eager, "_LAST", {}).clear()  # (the last call's plan, kept apart)
        try:
            res["  fast path: guard + metadata key + plan lookup"] = median_us(guard_key_lookup,
                                                                           calls)
        finally:
            eager._PLANS[key] = plan
            getattr(eager, "_LAST", {}).clear()
        res[f"  the plan: {chosen.name}'s prepared call (launches stubbed)"] = median_us(
            lambda: plan(*args), calls)
    else:
        impl = chosen.impls[OP]
        res[f"  {chosen.name} host impl (launches stubbed)"] = median_us(lambda: impl(*args),
                                                                         calls)
    allocs = _allocations(chosen.name, q, sched)
    what = "out, lse" if len(allocs) == 2 else "out, lse, workspace"
    res[f"    {len(allocs)} x torch.empty ({what})"] = median_us(
        lambda: [a() for a in allocs], calls)
    if hasattr(_dispatch, "PLANNED"):
        res["  torch.ops.mla.sparse_decode (compiled code's call: dispatcher, then the plan)"] = \
            median_us(op_path, calls)

        def first_call():
            _dispatch.invalidate()
            return public()
        res["  first call with a key (plans dropped before each): the whole op"] = median_us(
            first_call, calls)
    else:
        res["  torch.ops.mla.sparse_decode(*op_args)"] = median_us(op_path, calls)
    res["    contract checks (meta)"] = median_us(lambda: check(*args), calls)
    res["    backend choice (select)"] = median_us(select, calls)
    prepare = getattr(chosen, "prepares", {}).get(OP)
    if prepare is not None:
        res[f"    {chosen.name} prepare (per-shape host work)"] = median_us(
            lambda: prepare(*args), calls)
    probe = _dispatch_probe()
    res["    torch.ops dispatch alone (no-op Python kernel, same schema)"] = median_us(
        lambda: probe(*args), calls)
    if forced:
        def ctx_only():
            with ctx():
                pass
        res[f"  use_backend('{backend}') context"] = median_us(ctx_only, calls)
    res["  (python loop + call floor)"] = median_us(lambda: None, calls)
    return res


_PROBE = []


def _dispatch_probe():
    """torch.ops.<ns>.f with sparse_decode's schema and a Python CPU kernel that returns at once:
    what the dispatcher alone costs a call (argument parsing, autograd fallback, boxing)."""
    if not _PROBE:
        lib = torch.library.Library("mla_host_probe", "DEF")  # noqa: TOR901
        lib.define("f(Tensor q, Tensor k_cache, Tensor indices, Tensor? topk_length=None, "
                   "Tensor? attn_sink=None, Tensor? extra_k_cache=None, "
                   "Tensor? extra_indices=None, Tensor? extra_topk_length=None, int d_v=512, "
                   "float sm_scale=1.0, Tensor? schedule_metadata=None, "
                   "Tensor? num_splits=None) -> (Tensor out, Tensor lse)")
        outs = (torch.empty(0), torch.empty(0))
        lib.impl("f", lambda *a: outs, "CPU")
        _PROBE.extend([lib, torch.ops.mla_host_probe.f])
    return _PROBE[1]


def profile(q, cache, idx, sched, scale, backend: str, forced: bool, calls: int,
            top: int = 30) -> str:
    ctx = (lambda: torch_mla.use_backend(backend)) if forced else contextlib.nullcontext

    def public():
        with ctx():
            return torch_mla.sparse_decode(q, cache, idx, d_v=512, sm_scale=scale, schedule=sched)

    for _ in range(50):
        public()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        public()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


# ---------------------------------------------------------------------------------------------
# Triton's own launch path, estimated
# ---------------------------------------------------------------------------------------------

def launch_estimate(records, calls: int) -> List[str]:
    """Time what of ``kernel[grid](*args, **kw)`` runs without a GPU, on the recorded launches:

    * "binder + key": the argument binder Triton generates per kernel (binding + per-argument
      specialization, with the CUDA backend's rules) and the kernel-cache key;
    * "run()": all of ``JITFunction.run`` with a stand-in driver (device 0, stream 0, an sm_90
      target) and, in the kernel cache, a stand-in compiled kernel whose C launcher does nothing;
    * "direct relaunch": torch_mla's ``_common.launch`` on a signature it has seen, down to
      Triton's own ``CompiledKernel[grid](...)`` runner, with the same stand-ins.

    Both use triton.runtime internals; if they differ in this Triton, a line says so."""
    lines = []
    try:
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget
        from triton.runtime.jit import compute_cache_key, create_function_from_signature

        target = GPUTarget("cuda", 90, 32)
        backend = backends["nvidia"].compiler(target)
    except Exception as exc:  # pragma: no cover - depends on the Triton version
        return [f"launch estimate unavailable with this Triton ({type(exc).__name__}: {exc})"]
    for kernel, grid, args, kwargs in records:
        fn = kernel
        while not hasattr(fn, "params") and hasattr(fn, "fn"):
            fn = fn.fn
        name = getattr(fn, "__name__", str(fn))
        n_args = len(args) + len(kwargs)
        try:
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            kw = dict(kwargs, debug=False)
            cache: dict = {}

            def bind():
                bound, spec, opts = binder(*args, **kw)
                return compute_cache_key(cache, spec, opts)

            bind_us = f"{median_us(bind, calls):6.1f} us"
        except Exception as exc:  # pragma: no cover - depends on the Triton version
            bind_us = f"failed ({type(exc).__name__}: {exc})"
        try:
            run_us = f"{_run_with_stand_ins(fn, grid, args, kwargs, target, calls):6.1f} us"
        except Exception as exc:  # pragma: no cover - depends on the Triton version
            run_us = f"failed ({type(exc).__name__}: {exc})"
        try:
            direct_us = f"{_direct_with_stand_ins(fn, grid, args, kwargs, target, calls):6.1f} us"
        except Exception as exc:  # pragma: no cover - depends on the Triton version
            direct_us = f"failed ({type(exc).__name__}: {exc})"
        lines.append(f"  {name:<22} grid={tuple(grid)!s:<9} {n_args:>2} args:")
        lines.append(f"      kernel[grid](...): binder + cache key {bind_us}, whole run() {run_us}")
        try:
            site_us = _direct_with_stand_ins(fn, grid, args, kwargs, target, calls, site=True)
            site_us = f"{site_us:6.1f} us"
        except Exception as exc:  # pragma: no cover - depends on the Triton / torch_mla version
            site_us = f"unavailable ({type(exc).__name__}: {exc})"
        lines.append(f"      torch_mla direct relaunch (_common.launch, signature seen): "
                     f"{direct_us}")
        lines.append(f"      the same through a LaunchSite (a plan's launch, signature kept): "
                     f"{site_us}")
    return lines


class _StandInDriver:
    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return self.target


def _c_launcher_stand_in(*a):
    """Triton's C launcher (argument unpacking, data_ptr() of each tensor, cuLaunchKernelEx):
    not timed, the same in both paths."""


def _direct_with_stand_ins(fn, grid, args, kwargs, target, calls: int, site: bool = False
                           ) -> float:
    """Host time of torch_mla's direct relaunch: the launch signature, the lookup, and Triton's
    own CompiledKernel[grid](...) runner (stream query, launch metadata, hooks), with a stand-in
    driver and a stand-in C launcher."""
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime import driver as tdriver

    from torch_mla.triton import _common

    ck = object.__new__(CompiledKernel)
    ck.module, ck.function, ck.packed_metadata = object(), None, None
    ck._run = _c_launcher_stand_in
    ck._module_pid = -1  # not ours: __del__ unloads nothing
    ck.name, ck.hash, ck.metadata_group, ck.src = fn.__name__, "", {}, None

    class JitStandIn:
        arg_names = fn.arg_names

        def __getitem__(self, grid):
            return lambda *a, **kw: ck

    kernel = JitStandIn()
    prev_active, prev_index = tdriver._active, _common.cuda_index
    prev_state = (_common.DIRECT_LAUNCH, dict(_common._compiled))
    tdriver.set_active(_StandInDriver(target))
    _common.cuda_index = lambda t: 0
    _common.DIRECT_LAUNCH = True
    try:
        _common.launch(kernel, grid, *args, **kwargs)  # the first call stores the signature
        assert _common._signature(kernel, args, kwargs) in _common._compiled
        if site:  # what a plan launches through (its second call keeps the signature)
            kernel = _common.LaunchSite(kernel)
            _common.launch(kernel, grid, *args, **kwargs)
        us = median_us(lambda: _common.launch(kernel, grid, *args, **kwargs), calls)
        if not _common.DIRECT_LAUNCH:
            raise RuntimeError("the direct launch failed and switched itself off")
        return us
    finally:
        tdriver._active = prev_active
        _common.cuda_index = prev_index
        _common.DIRECT_LAUNCH = prev_state[0]
        _common._compiled.clear()
        _common._compiled.update(prev_state[1])


def _run_with_stand_ins(fn, grid, args, kwargs, target, calls: int) -> float:
    import collections

    from triton.runtime import driver as tdriver

    class Compiled:
        function = None
        packed_metadata = None
        run = staticmethod(_c_launcher_stand_in)

        def launch_metadata(self, grid, stream, *a):
            return None  # what CompiledKernel returns without launch hooks

    def do_compile(key, signature, device, *rest, **kw):
        k = Compiled()
        fn.device_caches[device][0][key] = k
        return k

    prev_active, prev_caches = tdriver._active, fn.device_caches
    tdriver.set_active(_StandInDriver(target))
    fn.device_caches = collections.defaultdict(fn.create_binder)
    fn._do_compile = do_compile
    try:
        launch = fn[grid]
        return median_us(lambda: launch(*args, **kwargs), calls)
    finally:
        del fn._do_compile
        fn.device_caches = prev_caches
        tdriver._active = prev_active


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--b", type=int, default=64)
    p.add_argument("--s-q", type=int, default=2)
    p.add_argument("--h-q", type=int, default=128)
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--layout", default="v32", choices=sorted(LAYOUTS))
    p.add_argument("--num-parts", type=int, default=132, help="schedule parts (H100: 132 SMs)")
    p.add_argument("--bench-shape", action="store_true",
                   help="the bench's host-overhead row: V32 b=2 s_q=1 h_q=64 topk=128, the "
                   "schedule decode_schedule makes for it on an H100 (132 SMs / 1 head block)")
    p.add_argument("--backend", default="triton", choices=("triton", "native", "both"))
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--auto", action="store_true",
                   help="unforced dispatch (default: use_backend(<backend>), as the bench runs "
                   "it); the Triton kernel is marked GPU-verified, and with --backend triton "
                   "the native library is left unloaded (declines), so that Triton is chosen")
    p.add_argument("--profile", action="store_true", help="also print a cProfile of the call")
    p.add_argument("--no-launch-estimate", action="store_true")
    a = p.parse_args(argv)
    if a.bench_shape:
        a.layout, a.b, a.s_q, a.h_q, a.topk, a.num_parts = "v32", 2, 1, 64, 128, 132

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for backend in (("triton", "native") if a.backend == "both" else (a.backend,)):
            _main(a, backend)
        return 0
    finally:
        torch.set_num_threads(threads)


def _main(a, backend: str) -> int:
    q, cache, idx, sched, scale = make_inputs(a.b, a.s_q, a.h_q, a.topk, a.layout,
                                              num_parts=a.num_parts)
    forced = not a.auto
    rec = LaunchRecorder()
    lib = NativeStandIn() if backend == "native" else None
    with simulate_cuda(rec, verified=a.auto, native=lib if lib is not None else False):
        with torch_mla.use_backend(backend) if forced else contextlib.nullcontext():
            rec.keep = True
            with lib.record() if lib is not None else contextlib.nullcontext():
                torch_mla.sparse_decode(q, cache, idx, d_v=512, sm_scale=scale, schedule=sched)
            rec.keep = False
            chosen = torch_mla.explain(OP, q, cache, idx, d_v=512, sm_scale=scale,
                                       schedule=sched).splitlines()[0]
        res = stages(q, cache, idx, sched, scale, backend, forced, a.calls)
        prof = (profile(q, cache, idx, sched, scale, backend, forced, a.calls) if a.profile
                else "")

    print(f"sparse_decode {a.layout.upper()} b={a.b} s_q={a.s_q} h_q={a.h_q} topk={a.topk} "
          f"num_parts={a.num_parts}; torch {torch.__version__}; "
          f"{f'forced use_backend({backend})' if forced else 'unforced dispatch'}")
    print(f"choice: {chosen}")
    stub = ("native C call stubbed" + ("" if lib is None or lib.c_stub is not None
                                       else " by a Python function (no libc fegetround)")
            if lib is not None else "Triton launches stubbed")
    print(f"median host us per call, {a.calls} calls each (CPU tensors, CUDA path simulated, "
          f"{stub}):")
    for k, v in res.items():
        print(f"  {v:8.2f}  {k}")
    if lib is not None:
        print(f"native library calls recorded per call: {len(lib.calls)}")
    print(f"Triton launches recorded per call: {len(rec.calls)}")
    for kernel, grid, args, kwargs in rec.calls:
        name = getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))
        print(f"  {name}[{tuple(grid)}]: {len(args)} positional + {len(kwargs)} keyword arguments")
    if not a.no_launch_estimate and rec.calls:
        print("Triton launch path, Python part that runs without a GPU (per launch):")
        for line in launch_estimate(rec.calls, a.calls):
            print(line)
        print("  not timed here (GPU only): the driver's device/stream queries and the C "
              "launcher (unpacks every argument, data_ptr() per tensor, cuLaunchKernelEx), the "
              "same on both paths")
    if prof:
        print(prof)
    return 0


if __name__ == "__main__":
    sys.exit(main())
