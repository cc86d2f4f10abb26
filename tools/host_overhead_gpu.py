"""Host overhead of one eager ``torch_mla.sparse_decode`` call on a GPU host, per backend, and
where it goes. Runs in well under two minutes on the H100 box (most of it: compiling the Triton
kernels on a fresh machine).

What it prints:

1. the bench's number (``torch_mla.bench``'s host_overhead case: the same inputs, the same
   ``timing.host_overhead`` timer, device synchronized before each call, host clock from call to
   return) for triton, native and, where ``flash_mla`` imports, flashmla; for torch_mla's
   backends also with this tree's host-path changes switched off one by one:

   * ``ws-cache off``: the split-KV workspace allocated per call instead of reused
     (``torch_mla._eager.WORKSPACE_CACHE_BYTES = -1``);
   * ``C launch off`` (Triton): launches through ``_common.launch`` (Triton's runner) instead of
     the recorded direct C launcher calls (``torch_mla.triton.sparse_decode._DIRECT_C``);
   * ``old`` = both off: what the tree before these changes did (its allocations and launches);
   * ``kernel[grid]`` (Triton): also no direct relaunch at all (``_common.DIRECT_LAUNCH``).

2. a breakdown, each line timed alone with the device idle before each call (isolated
   measurements, not a partition): bare ``torch.empty`` on CUDA of the call's shapes, the stream /
   device / capture queries, the native library's ctypes call alone on prepared arguments (it
   launches the real kernels), one Triton launch on prepared arguments three ways (Triton's
   ``kernel[grid]``, torch_mla's direct relaunch, the recorded C launcher call with pointers as
   ints and with tensors), and the whole eager call with the launches replaced by no-ops (the
   Python and allocation part).

Usage (GPU box, from the repo root)::

    source tests/gpu/device_env.sh >/dev/null
    PYTHONPATH="$PYTHONPATH$peer" python3 tools/host_overhead_gpu.py

    python tools/host_overhead_gpu.py --cpu    # dry run on CPU tensors: CUDA path simulated with
                                               # tools/host_overhead.py's stand-ins (checks the
                                               # script; its numbers are not GPU numbers)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import traceback
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import host_overhead as tool  # noqa: E402  (tools/host_overhead.py: inputs, CPU stand-ins)

import torch_mla  # noqa: E402
from torch_mla import _dispatch, _eager  # noqa: E402
from torch_mla.bench import cases, timing  # noqa: E402


def _sync_of(cpu: bool) -> Callable[[], None]:
    return (lambda: None) if cpu else torch.cuda.synchronize


def host_us(fn, sync, replays: int) -> float:
    """The bench's timer (torch_mla.bench.timing.host_overhead), in us."""
    secs, _ = timing.host_overhead(fn, replays=replays, sync=sync)
    return secs * 1e6


def idle_us(fn, sync, replays: int) -> float:
    """Median us of fn() with the device idle before each call (sync not timed)."""
    for _ in range(3):
        fn()
    times = []
    clock = time.perf_counter
    for _ in range(replays):
        sync()
        t0 = clock()
        fn()
        times.append(clock() - t0)
    sync()
    return statistics.median(times) * 1e6


@contextlib.contextmanager
def settings(ws_cache: bool = True, c_launch: bool = True, relaunch: bool = True):
    """This tree's host-path changes on or off (each plan is remade: the modules are watched)."""
    from torch_mla.triton import _common
    from torch_mla.triton import sparse_decode as tsd

    saved = (_eager.WORKSPACE_CACHE_BYTES, getattr(tsd, "_DIRECT_C", None), _common.DIRECT_LAUNCH)
    if not ws_cache:
        _eager.WORKSPACE_CACHE_BYTES = -1
    if not c_launch and saved[1] is not None:
        tsd._DIRECT_C = False
    if not relaunch:
        _common.DIRECT_LAUNCH = False
    _eager.release_workspaces()
    _dispatch.invalidate()
    try:
        yield
    finally:
        _eager.WORKSPACE_CACHE_BYTES = saved[0]
        if saved[1] is not None:
            tsd._DIRECT_C = saved[1]
        _common.DIRECT_LAUNCH = saved[2]
        _eager.release_workspaces()
        _dispatch.invalidate()


VARIANTS = {
    "new": {},
    "ws-cache off": dict(ws_cache=False),
    "C launch off": dict(c_launch=False),
    "old (both off)": dict(ws_cache=False, c_launch=False),
    "kernel[grid] (no relaunch either)": dict(ws_cache=False, c_launch=False, relaunch=False),
}


def _plan_state(name: str):
    """The closure cell ``name`` of the plan the last call used (torch_mla._eager._LAST)."""
    last = _eager._LAST.get(0)
    if last is None:
        return None
    plan = last[1]
    code = getattr(plan, "__code__", None)
    if code is None or name not in code.co_freevars:
        return None
    return plan.__closure__[code.co_freevars.index(name)]


def bench_numbers(calls: Dict[str, Callable], sync, replays: int, out: List[str]) -> None:
    out.append("bench number (timing.host_overhead, device idle before each call), us:")
    for backend in ("native", "triton"):
        if backend not in calls:
            continue
        for vname, kw in VARIANTS.items():
            if backend == "native" and vname.startswith(("C launch", "kernel[grid]")):
                continue
            try:
                with settings(**kw):
                    us = host_us(calls[backend], sync, replays)
                out.append(f"  {us:8.1f}  {backend:8s} {vname}")
            except Exception as exc:  # noqa: BLE001 - report and go on
                out.append(f"  failed    {backend:8s} {vname}: {type(exc).__name__}: {exc}")
    if "flashmla" in calls:
        try:
            out.append(f"  {host_us(calls['flashmla'], sync, replays):8.1f}  flashmla")
        except Exception as exc:  # noqa: BLE001
            out.append(f"  failed    flashmla: {type(exc).__name__}: {exc}")


def breakdown(calls, q, sync, replays: int, cpu: bool, out: List[str]) -> None:
    from torch_mla.native import sparse_decode as nsd
    from torch_mla.triton import _common
    from torch_mla.triton import sparse_decode as tsd

    dev = q.device
    b, s_q, h_q, _ = q.shape
    out.append("breakdown (each alone, device idle before each call), us:")

    def line(what, fn, n=replays):
        try:
            out.append(f"  {idle_us(fn, sync, n):8.2f}  {what}")
        except Exception as exc:  # noqa: BLE001 - report and go on
            out.append(f"  failed    {what}: {type(exc).__name__}: {exc}")

    f32 = torch.float32
    line("torch.empty out [b,s_q,h_q,512] bf16 (+ its free)",
         lambda: torch.empty(b, s_q, h_q, 512, dtype=q.dtype, device=dev))
    line("torch.empty lse [b,h_q,s_q] f32 (+ its free)",
         lambda: torch.empty(b, h_q, s_q, dtype=f32, device=dev))
    n_ws = b + 132
    line(f"torch.empty workspace {n_ws * s_q * h_q * 2052 // 1024} KiB u8 (+ its free)",
         lambda: torch.empty(n_ws * s_q * h_q * 2052, dtype=torch.uint8, device=dev))
    line("3 x torch.empty (out, lse, workspace) together", lambda: (
        torch.empty(b, s_q, h_q, 512, dtype=q.dtype, device=dev),
        torch.empty(b, h_q, s_q, dtype=f32, device=dev),
        torch.empty(n_ws * s_q * h_q * 2052, dtype=torch.uint8, device=dev)))
    line("_eager.workspace() hit (thread-local lookup + capture query)",
         lambda: _eager.workspace(1 << 20, dev, 0 if cpu else dev.index,
                                  0 if cpu else torch._C._cuda_getCurrentRawStream(dev.index)))
    if not cpu:
        idx = dev.index
        line("torch._C._cuda_getCurrentRawStream(i)",
             lambda: torch._C._cuda_getCurrentRawStream(idx))
        line("torch._C._cuda_getDevice()", torch._C._cuda_getDevice)
        line("torch.cuda.current_device()", torch.cuda.current_device)
        line("torch.cuda.current_stream().cuda_stream",
             lambda: torch.cuda.current_stream().cuda_stream)
        line("torch._C._cuda_isCurrentStreamCapturing()",
             torch._C._cuda_isCurrentStreamCapturing)
    line("q.data_ptr()", q.data_ptr)
    line("(python call floor)", lambda: None)

    # native: the ctypes call alone, on the arguments of a real call (its out/lse kept alive,
    # its workspace the cached one)
    if "native" in calls:
        try:
            with settings():
                keep = calls["native"]()
                keep = calls["native"]()
                cell = _plan_state("lib")
                lib = cell.cell_contents if cell is not None else None
                if lib is None:
                    raise RuntimeError("no native plan found")
                seen = []
                real = lib.sparse_decode
                lib.sparse_decode = lambda *a: seen.append(a) or real(*a)
                try:
                    keep = calls["native"]()
                finally:
                    lib.sparse_decode = real
                a = seen[-1]
                line("native: ctypes call alone (params packed; launches main + combine)",
                     lambda: real(*a))
                line("native: struct.pack of the params",
                     lambda: nsd._FMT.pack(*nsd._FMT.unpack(a[0])))
                lib.sparse_decode = lambda *a: 0
                try:
                    line("native: whole eager call, ctypes call replaced by a no-op",
                         calls["native"])
                finally:
                    lib.sparse_decode = real
                del keep
        except Exception as exc:  # noqa: BLE001
            out.append(f"  failed    native breakdown: {type(exc).__name__}: {exc}")
            out.append("    " + traceback.format_exc().strip().splitlines()[-2])

    # Triton: one launch on prepared arguments, several ways
    if "triton" in calls:
        try:
            with settings():
                captured = []
                real_launch = tsd._launch

                def capture(kernel, grid, *args, **kwargs):
                    captured.append((kernel, grid, args, kwargs))
                    return real_launch(kernel, grid, *args, **kwargs)
                tsd._launch = capture  # (rebinding drops the plans: the next call is a first)
                try:
                    keep = calls["triton"]()
                finally:
                    tsd._launch = real_launch
                keep = calls["triton"]()  # the plan again (remade: _launch was rebound)
                keep = calls["triton"]()
                for kernel, grid, args, kwargs in captured:
                    k = tool.kernel_of(kernel)
                    name = getattr(getattr(k, "fn", k), "__name__", "kernel")
                    grid3 = (*grid, 1, 1)[:3]
                    if not cpu:  # (real kernels: not on CPU tensors)
                        line(f"triton {name}: kernel[grid](...) (Triton's full path)",
                             lambda: k[grid](*args, **kwargs))
                        site = _common.LaunchSite(k)
                        line(f"triton {name}: _common.launch via a LaunchSite (old plan's "
                             "launch)", lambda: _common.launch(site, grid, *args, **kwargs))
                    tail = _common._constexpr_tail(k, len(args), kwargs)
                    # the compiled kernel (--cpu: the recorder's stand-in)
                    compiled = real_launch(kernel, grid, *args, **kwargs)
                    if tail is not None and compiled is not None:
                        line(f"triton {name}: compiled[grid](...) (Triton's runner)",
                             lambda: compiled[grid3](*args, *tail))
                    stream = 0 if cpu else torch._C._cuda_getCurrentRawStream(dev.index)
                    rec = tsd._c_launch(k, compiled, grid3, args, kwargs, stream) \
                        if hasattr(tsd, "_c_launch") else None
                    if rec is None:
                        out.append(f"  (triton {name}: no direct C launch here)")
                        continue
                    c, fixed, tail = rec
                    ints = tuple(x.data_ptr() if isinstance(x, torch.Tensor) else x for x in args)
                    line(f"triton {name}: C launcher, pointers as ints (the new plan's launch)",
                         lambda: c(*grid3, stream, *fixed, None, None, None, *ints, *tail))
                    line(f"triton {name}: C launcher, tensors (data_ptr + "
                         "cuPointerGetAttribute each)",
                         lambda: c(*grid3, stream, *fixed, None, None, None, *args, *tail))
                cell = _plan_state("c_state")
                state = cell.cell_contents if cell is not None else None
                if state is not None and state[0] is not None:
                    saved = state[0]
                    nop = lambda *a: None  # noqa: E731
                    state[0] = (saved[0], saved[1], (nop, *saved[2][1:3], nop, *saved[2][4:]))
                    try:
                        line("triton: whole eager call, C launches replaced by no-ops",
                             calls["triton"])
                    finally:
                        state[0] = saved
                else:
                    out.append("  (triton: the plan has no recorded C launches)")
                del keep, captured
        except Exception as exc:  # noqa: BLE001
            out.append(f"  failed    triton breakdown: {type(exc).__name__}: {exc}")
            out.append("    " + traceback.format_exc().strip().splitlines()[-2])


def verify(calls, sync, cpu: bool, out: List[str]) -> bool:
    """The new host path gives the old path's results, bit for bit (same kernels, same inputs):
    repeated calls (returned tensors held: no two share memory), on a side stream, and captured
    in a CUDA graph and replayed between eager calls."""
    ok = True
    for backend in ("native", "triton"):
        if backend not in calls:
            continue
        fn = calls[backend]
        try:
            with settings(ws_cache=False, c_launch=False):
                ref = [t.clone() for t in fn()]
            with settings():
                got = [fn() for _ in range(4)]
                if not cpu:
                    cur = torch.cuda.current_stream()
                    side = torch.cuda.Stream()
                    side.wait_stream(cur)
                    with torch.cuda.stream(side):
                        got += [fn(), fn()]
                    cur.wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    side.wait_stream(cur)
                    with torch.cuda.stream(side):  # (warm the capture stream's plan)
                        fn()
                    cur.wait_stream(side)
                    sync()
                    with torch.cuda.graph(graph):
                        captured = fn()
                    for _ in range(3):
                        got.append(fn())
                        graph.replay()
                        got.append(tuple(t.clone() for t in captured))
                sync()
            ptrs = [t.data_ptr() for pair in got for t in pair]
            bad = [] if cpu else [i for i, pair in enumerate(got)  # (--cpu: nothing runs)
                                  if not all(torch.equal(a, b) for a, b in zip(pair, ref))]
            alias = len(set(ptrs)) != len(ptrs)
            same = "not compared (--cpu)" if cpu else "identical" if not bad else f"DIFFER at {bad}"
            out.append(f"verify {backend}: {len(got)} results vs the old path: {same}; "
                       f"returned tensors "
                       f"{'ALIAS' if alias else 'distinct'}")
            ok = ok and not bad and not alias
        except Exception as exc:  # noqa: BLE001
            out.append(f"verify {backend} failed: {type(exc).__name__}: {exc}")
            out.append("    " + traceback.format_exc().strip().splitlines()[-2])
            ok = False
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true",
                   help="dry run: CPU tensors, CUDA path simulated (tools/host_overhead.py)")
    p.add_argument("--replays", type=int, default=300)
    p.add_argument("--out", default=os.environ.get("OUT"),
                   help="folder for host_overhead_gpu.txt (default $OUT)")
    a = p.parse_args(argv)
    out: List[str] = []
    cpu = a.cpu or not torch.cuda.is_available()
    if cpu and not a.cpu:
        out.append("no CUDA device: running the --cpu dry run")
    out.append(f"torch {torch.__version__}, python {sys.version.split()[0]}, "
               f"{'CPU dry run' if cpu else torch.cuda.get_device_name()}")
    try:
        import triton
        out.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    stack = contextlib.ExitStack()
    with stack:
        if cpu:
            q, cache, idx, sched, scale = tool.make_inputs(2, 1, 64, 128, "v32", num_parts=132)
            rec, lib = tool.LaunchRecorder(), tool.NativeStandIn()
            stack.enter_context(tool.simulate_cuda(rec, native=lib))
            public = lambda: torch_mla.sparse_decode(  # noqa: E731
                q, cache, idx, d_v=512, sm_scale=scale, schedule=sched)
            calls = {b: (lambda b=b: _in(b, public)) for b in ("native", "triton")}
            out.append("(stand-ins: native C call = libc no-op, Triton C launcher = Python no-op)")
        else:
            case = next(c for c in cases.all_cases() if c.op == "host_overhead")
            built = cases.build(case, torch.device("cuda"))
            calls = {k: v for k, v in built.calls.items()
                     if k in ("native", "triton", "flashmla")}
            for k, why in built.refused.items():
                out.append(f"refused: {k}: {why}")
            q = _find_q(case)
        sync = _sync_of(cpu)
        for name, first in list(calls.items()):  # first calls: compile, load, build plans
            try:
                first()
                first()
                sync()
            except Exception as exc:  # noqa: BLE001
                out.append(f"{name} fails: {type(exc).__name__}: {exc}")
                calls.pop(name)
        ok = verify(calls, sync, cpu, out)
        bench_numbers(calls, sync, a.replays, out)
        breakdown(calls, q, sync, a.replays, cpu, out)
    text = "\n".join(out)
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "host_overhead_gpu.txt"), "w") as f:
            f.write(text + "\n")
    return 0 if ok else 1


def _in(backend, fn):
    with torch_mla.use_backend(backend):
        return fn()


def _find_q(case):
    """A tensor of the case's q shape/dtype on the GPU (the breakdown's allocation shapes)."""
    sp = case.spec
    from torch_mla.meta.layouts import LAYOUTS
    return torch.empty(sp["b"], sp["s_q"], sp["h_q"], LAYOUTS[sp["layout"]].d,
                       dtype=torch.bfloat16, device="cuda")


if __name__ == "__main__":
    sys.exit(main())
