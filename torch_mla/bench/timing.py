"""Timers: CUDA-graph replay (the default), plain CUDA events (where capture fails) and the host
clock (CPU runs, and the host overhead of one eager call).

CUDA-graph replay: ``calls`` calls are captured into one graph, so a replay launches them back to
back with no host work in between; one replay is timed with two CUDA events and divided by
``calls``; the result is the median over ``replays`` replays. Inputs stay the same across calls
(L2 holds what fits of them: decode caches are hundreds of MB, far beyond H100's 50 MB of L2).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Tuple

import torch


def _pick_calls(one_call_s: float, target_s: float, max_calls: int) -> int:
    if one_call_s <= 0:
        return max_calls
    return int(max(1, min(max_calls, round(target_s / one_call_s))))


def _event_once(fn: Callable[[], object], calls: int) -> float:
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3 / calls  # seconds per call


def cuda_graph_time(fn: Callable[[], object], replays: int = 50, target_s: float = 5e-3,
                    max_calls: int = 100, warmup: int = 2) -> Tuple[float, str]:
    """Median seconds per call of ``fn`` replayed from a CUDA graph; falls back to plain event
    timing when capture fails. Returns (seconds, method description)."""
    # warm up on a side stream (compiles Triton kernels, lazily initialises libraries, and lets
    # the caching allocator see the op's allocations outside the capture)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    one = _event_once(fn, 1)
    calls = _pick_calls(one, target_s, max_calls)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except Exception as exc:  # not capturable (host sync, CPU work, ...): plain events
        del graph
        torch.cuda.synchronize()
        secs, _ = cuda_event_time(fn, replays, target_s, max_calls, warmup=0)
        return secs, f"events (graph capture failed: {type(exc).__name__}: {str(exc)[:80]})"
    try:
        graph.replay()
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(replays):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3 / calls)
    finally:
        del graph
    return statistics.median(times), f"cuda graph ({calls} calls/replay, median of {replays})"


def cuda_event_time(fn: Callable[[], object], replays: int = 50, target_s: float = 5e-3,
                    max_calls: int = 100, warmup: int = 2) -> Tuple[float, str]:
    """Median seconds per call of ``fn`` launched eagerly between two CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    calls = _pick_calls(_event_once(fn, 1), target_s, max_calls)
    times = [_event_once(fn, calls) for _ in range(replays)]
    return statistics.median(times), f"cuda events ({calls} calls/sample, median of {replays})"


def wall_time(fn: Callable[[], object], replays: int = 5, warmup: int = 1,
              sync: Callable[[], None] = lambda: None) -> Tuple[float, str]:
    """Median host-clock seconds of one call (``sync`` after each, e.g. for a device)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(replays):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), f"host clock (median of {replays})"


def host_overhead(fn: Callable[[], object], replays: int = 200, warmup: int = 3,
                  sync: Callable[[], None] = lambda: None) -> Tuple[float, str]:
    """Median host time one eager call takes to return, the device idle before each call
    (``sync`` runs before the clock starts and is not timed)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(replays):
        sync()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    sync()
    return statistics.median(times), f"host clock, device idle (median of {replays})"
