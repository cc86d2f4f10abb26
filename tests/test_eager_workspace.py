"""The cached scratch of eager calls (torch_mla._eager.workspace) and Triton sparse_decode's
recorded C launches: reuse only where safe, never aliasing returned tensors, following the
current stream, capture, threads, tuning knobs and launch hooks."""

import importlib
import threading

import pytest
import torch

import torch_mla
from torch_mla import _dispatch, _eager

tho = importlib.import_module("test_host_overhead")


@pytest.fixture(autouse=True)
def _fresh():
    _eager.release_workspaces()
    yield
    _eager.release_workspaces()


def test_workspace_reused_per_stream_and_grown():
    dev = torch.device("cpu")
    a, pa = _eager.workspace(1000, dev, 0, 7)
    b, pb = _eager.workspace(800, dev, 0, 7)
    assert b is a and pb == pa == a.data_ptr()
    c, _ = _eager.workspace(1000, dev, 0, 8)  # another stream: its own
    assert c is not a
    d, _ = _eager.workspace(5000, dev, 0, 7)  # larger: replaced
    assert d is not a and d.numel() >= 5000
    assert _eager.workspace(10, dev, 0, 7)[0] is d
    assert _eager.workspace(10, dev, 1, 7)[0] is not d  # another device


def test_workspace_not_kept_for_none_stream_capture_or_size(monkeypatch):
    dev = torch.device("cpu")
    assert _eager.workspace(10, dev, 0, None)[0] is not _eager.workspace(10, dev, 0, None)[0]
    kept, _ = _eager.workspace(10, dev, 0, 3)
    monkeypatch.setattr(_eager, "_capturing", lambda: True)
    cap1, _ = _eager.workspace(10, dev, 0, 3)
    cap2, _ = _eager.workspace(10, dev, 0, 3)
    assert cap1 is not kept and cap2 is not kept and cap1 is not cap2
    monkeypatch.setattr(_eager, "_capturing", lambda: False)
    assert _eager.workspace(10, dev, 0, 3)[0] is kept  # capture over: the kept one again
    monkeypatch.setattr(_eager, "WORKSPACE_CACHE_BYTES", 100)
    big1, _ = _eager.workspace(1000, dev, 0, 4)
    assert _eager.workspace(1000, dev, 0, 4)[0] is not big1


def test_workspace_per_thread():
    dev = torch.device("cpu")
    mine, _ = _eager.workspace(10, dev, 0, 5)
    other = []
    t = threading.Thread(target=lambda: other.append(_eager.workspace(10, dev, 0, 5)[0]))
    t.start()
    t.join()
    assert other[0] is not mine
    assert _eager.workspace(10, dev, 0, 5)[0] is mine
    _eager.release_workspaces()
    assert _eager.workspace(10, dev, 0, 5)[0] is not mine


def _call(q, cache, idx, sched, scale):
    return torch_mla.sparse_decode(q, cache, idx, sm_scale=scale, schedule=sched)


def _native_ws(params):
    from torch_mla.native import sparse_decode as nsd

    f = nsd._FMT.unpack(params)
    return f[34], f[35], f[36], f[37]  # out, lse, workspace, its bytes


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_outputs_never_alias_across_calls_and_streams_follow(backend, monkeypatch):
    from torch_mla.native import sparse_decode as nsd
    from torch_mla.triton import sparse_decode as tsd

    tool = tho._tool()
    args = tool.make_inputs(b=2, s_q=1, h_q=64, topk=128, num_parts=6)
    rec, lib = tool.LaunchRecorder(), tool.NativeStandIn()
    stream = [0]
    with tool.simulate_cuda(rec, native=lib if backend == "native" else None):
        mod = nsd if backend == "native" else tsd
        monkeypatch.setattr(mod, "_current_stream", lambda index: stream[0])
        with torch_mla.use_backend(backend), lib.record() as lib_calls:
            rec.keep = True
            outs, ws = [], []
            for s in (0, 0, 0, 1, 1, 0):
                stream[0] = s
                del rec.c_calls[:]
                outs.append(_call(*args))
                if backend == "native":
                    o, lse, w, n = _native_ws(lib_calls[-1][0])
                    assert lib_calls[-1][1] == s
                    ws.append((w, n))
                elif rec.c_calls:
                    (_, main), (_, comb) = rec.c_calls
                    assert main[3] == comb[3] == s
                    ws.append((comb[13], comb[14] - comb[13] + 4))  # ws_o .. ws_lse
                else:
                    ws.append(None)  # a first call (through _launch): its own workspace
            rec.keep = False
    # every returned tensor is its own memory, held while later calls run
    spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
             for pair in outs for t in pair]
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    for w in ws:
        if w is not None:
            assert all(e <= w[0] or s >= w[0] + w[1] for s, e in spans)
    # one workspace per stream once the plan is made
    cached = [w for w in ws[1:] if w is not None]
    by_stream = {}
    for s, w in zip((0, 0, 0, 1, 1, 0)[1:], ws[1:]):
        if w is not None:
            by_stream.setdefault(s, set()).add(w[0])
    assert cached and all(len(v) == 1 for v in by_stream.values())
    if 1 in by_stream and 0 in by_stream:
        assert by_stream[0] != by_stream[1]


def test_triton_c_launch_matches_the_launch_and_follows_knobs_and_hooks(monkeypatch):
    import triton

    from torch_mla.triton import sparse_decode as tsd

    tool = tho._tool()
    q, cache, idx, sched, scale = tool.make_inputs(b=2, s_q=1, h_q=64, topk=128, num_parts=6)
    rec = tool.LaunchRecorder()
    with tool.simulate_cuda(rec):
        with torch_mla.use_backend("triton"):
            rec.keep = True
            _call(q, cache, idx, sched, scale)  # the first: through _launch, then recorded
            assert len(rec.calls) == 2 and not rec.c_calls
            slow = list(rec.calls)
            del rec.calls[:]
            _call(q, cache, idx, sched, scale)
            assert not rec.calls and len(rec.c_calls) == 2
            # the C launcher gets what Triton's runner would give it for the same call, with
            # device pointers for tensors and no hooks
            for (kernel, grid, a, kw), (ck, c) in zip(slow, rec.c_calls):
                assert ck is kernel and tuple(c[:3]) == (*grid, 1, 1)[:3]
                assert c[4:13] == (0x7F00, False, False, None, None, (8, 1, 0), None, None, None)
                ours = c[13:13 + len(a)]
                for x, y in zip(a, ours):
                    if isinstance(x, torch.Tensor):
                        if x.data_ptr() != y:  # new allocations: out, lse, workspace
                            assert type(y) is int
                    elif isinstance(x, float):
                        assert y == pytest.approx(x)
                    else:
                        assert x == y
                assert c[13 + len(a):] == tsd._constexpr_tail(kernel, len(a), kw)
            # a tuning knob change: through _launch again, then recorded again
            del rec.calls[:], rec.c_calls[:]
            stages = tsd._TUNE["num_stages"]
            variant = tsd.VARIANT
            monkeypatch.setitem(tsd._TUNE, "num_stages", stages + 1)
            if variant is not None:
                monkeypatch.setattr(tsd, "SPLIT_DEFAULTS", dict(tsd.SPLIT_DEFAULTS))
                tsd.VARIANT = dict(variant, num_stages=7)
            try:
                _call(q, cache, idx, sched, scale)
                assert len(rec.calls) == 2 and not rec.c_calls
                assert rec.calls[0][3]["num_stages"] in (stages + 1, 7)
                del rec.calls[:]
                _call(q, cache, idx, sched, scale)
                assert not rec.calls and len(rec.c_calls) == 2
            finally:
                tsd.VARIANT = variant
            # a launch hook: through Triton's runner while it is set
            del rec.calls[:], rec.c_calls[:]
            hook = lambda *a: None  # noqa: E731
            triton.knobs.runtime.launch_enter_hook.add(hook)
            try:
                _call(q, cache, idx, sched, scale)
                assert len(rec.calls) == 2 and not rec.c_calls
            finally:
                triton.knobs.runtime.launch_enter_hook.remove(hook)
            rec.keep = False


@pytest.mark.parametrize("bad", ["scratch", "pdl", "hook", "arg"])
def test_c_launch_declines_other_conventions(bad, monkeypatch):
    import triton

    from torch_mla.triton import sparse_decode as tsd

    tool = tho._tool()
    rec = tool.LaunchRecorder()
    kernel = tsd._combine_kernel
    compiled = rec(kernel, (1, 1))
    t = torch.zeros(4)
    args = (t, t, 3, t, t, t, 16, 16, 16, t, 1, 64, 64)
    kw = dict(HAS_SINK=False, BLOCK_H=16, D=512, num_warps=4)
    monkeypatch.setattr(tsd, "_DIRECT_C", True)
    assert tsd._c_launch(kernel, compiled, (1, 1, 1), args, kw, 0) is not None
    launcher = compiled._run
    real_call = type(launcher).__call__
    if bad == "scratch":
        monkeypatch.setattr(type(launcher), "__call__", lambda self, gx, gy, gz, st, fn, *a:
                            self.launch(gx, gy, gz, st, fn, False, False, 1, None, *a))
    elif bad == "pdl":
        monkeypatch.setattr(type(launcher), "__call__", lambda self, gx, gy, gz, st, fn, *a:
                            self.launch(gx, gy, gz, st, fn, False, True, None, None, *a))
    elif bad == "hook":
        monkeypatch.setattr(triton.knobs.runtime.launch_exit_hook, "calls", [lambda *a: None])
    else:
        monkeypatch.setattr(type(launcher), "__call__", lambda self, gx, gy, gz, st, fn, *a:
                            real_call(self, gx, gy, gz, st, fn, *a[:-1], 0))
    assert tsd._c_launch(kernel, compiled, (1, 1, 1), args, kw, 0) is None
    assert compiled._run.launch is launcher.launch  # the launcher is left as it was
    _dispatch.invalidate()
