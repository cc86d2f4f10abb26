"""The eager fast path of torch_mla.sparse_decode (torch_mla._eager) is the op, only cheaper:

* it returns what ``torch.ops.mla.sparse_decode`` returns, and raises what it raises, on every
  valid sample and every mutation that tests/test_host_overhead.py makes of them, on its first
  call with a key (the plan is made) and on the next (the plan is used); the op itself (whose
  kernel uses the plans too) matches its own first call;
* it steps aside (returns None, so the op runs) whenever something could see or change the op,
  or a tensor is not a plain one;
* a plan never outlives what it was made from: tensor values, scalars, the forced backend, the
  environment, and module state of the dispatcher and the backends.
"""

import importlib

import pytest
import torch

import torch_mla
from torch_mla import _dispatch, _eager

tho = importlib.import_module("test_host_overhead")


def _public(args):
    q, cache, idx, lens, sink, ecache, eidx, elens, d_v, scale, meta, splits = args
    sched = None if meta is None and splits is None else torch_mla.DecodeSchedule(meta, splits)
    return torch_mla.sparse_decode(q, cache, idx, topk_length=lens, attn_sink=sink,
                                   extra_k_cache=ecache, extra_indices=eidx,
                                   extra_topk_length=elens, d_v=d_v, sm_scale=scale,
                                   schedule=sched)


def _outcome(fn):
    try:
        return "ok", fn()
    except Exception as exc:  # noqa: BLE001 - compared below
        return type(exc), str(exc)


def _same(a, b, what):
    assert a[0] == b[0], (what, a, b)
    if a[0] == "ok":
        for x, y in zip(a[1], b[1]):
            torch.testing.assert_close(x, y, equal_nan=True, rtol=0, atol=0, msg=what)
    else:
        assert a[1] == b[1], what


@pytest.mark.parametrize("case", list(tho._valid_cases()))
def test_public_call_is_the_op_on_every_mutation(case):
    args = tho._valid_cases()[case]
    variants = [("valid", args)] + list(tho._mutations(args))
    for what, mutated in variants:
        _dispatch.invalidate()
        expected = _outcome(lambda: torch.ops.mla.sparse_decode(*mutated))
        _dispatch.invalidate()
        for attempt in ("plan made", "plan used"):
            _same(_outcome(lambda: _public(mutated)), expected, f"{what} ({attempt})")
        _same(_outcome(lambda: torch.ops.mla.sparse_decode(*mutated)), expected,
              f"{what} (the op, plan used)")
        # valid inputs get a plan (the fast path is taken); inputs the op rejects never do
        assert len(_eager._PLANS) == (expected[0] == "ok"), what


def test_plans_read_no_values():
    """Same metadata, other values (indices, lengths, sink, scale): other results."""
    args = list(tho._valid_cases()["model1_extra_sched"])
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        args[2] = torch.randint(-1, 12, args[2].shape, generator=g, dtype=torch.int32)
        args[3] = torch.randint(0, 9, args[3].shape, generator=g, dtype=torch.int32)
        args[4] = torch.randn(args[4].shape, generator=g)
        args[9] = 0.05 * (seed + 1)
        _same(_outcome(lambda: _public(args)),
              _outcome(lambda: torch.ops.mla.sparse_decode(*args)), f"seed {seed}")
    args[9] = float("nan")  # the key holds whether sm_scale is finite: the op's error
    _same(_outcome(lambda: _public(args)), _outcome(lambda: torch.ops.mla.sparse_decode(*args)),
          "nan scale")


def _fast(args):
    q, cache, idx, lens, sink, ecache, eidx, elens, d_v, scale, meta, splits = args
    sched = None if meta is None else torch_mla.DecodeSchedule(meta, splits)
    return _eager.sparse_decode(q, cache, idx, lens, sink, ecache, eidx, elens, d_v, scale,
                                sched)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")
def test_fast_path_steps_aside_unless_plain():
    args = list(tho._valid_cases()["v32_sink_lens_sched"])
    q = args[0]
    assert _fast(args) is not None and _fast(args) is not None
    with torch.inference_mode():
        assert _fast(tho._with(args, q=q.clone())) is not None
    with torch.no_grad():
        assert _fast(args) is not None

    def aside(changed, why):
        assert _fast(changed) is None, why
        # and the public call gives the op's result
        _same(_outcome(lambda: _public(changed)),
              _outcome(lambda: torch.ops.mla.sparse_decode(*changed)), why)

    aside(tho._with(args, q=q.float().requires_grad_()), "q needs a gradient")
    aside(tho._with(args, attn_sink=args[4].clone().requires_grad_()), "sink needs a gradient")
    aside(tho._with(args, q=torch._neg_view(q)), "negative bit")
    aside(tho._with(args, indices=torch._neg_view(args[2])), "negative bit on an int tensor")
    aside(tho._with(args, topk_length=torch._efficientzerotensor(args[3].shape,
                                                                 dtype=torch.int32)),
          "ZeroTensor")
    aside(tho._with(args, q=torch.nn.Parameter(q, requires_grad=False)), "a subclass")
    empty = tho._with(args, q=q[:0], indices=args[2][:0], topk_length=args[3][:0],
                      schedule_metadata=args[10][:1], num_splits=args[11][:1])  # b = 0
    for _ in range(2):
        _same(_outcome(lambda: _public(empty)),
              _outcome(lambda: torch.ops.mla.sparse_decode(*empty)), "b = 0")
    for bad in (args[2].to_sparse(), args[3].to_sparse()):
        assert _fast(tho._with(args, indices=bad) if bad.dim() == 3
                     else tho._with(args, topk_length=bad)) is None, "sparse"
    assert _fast(tho._with(args, q=q.to("meta"))) is None
    with torch.autograd.profiler.profile():
        assert _fast(args) is None, "the profiler records the op"
    with torch.device("cpu"):  # a TorchFunctionMode
        assert _fast(args) is None
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert _fast(args) is None
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        assert _fast(args) is None
    seen = []
    torch.vmap(lambda x: seen.append(_fast(tho._with(args, q=x))) or x)(q.unsqueeze(0))
    assert seen == [None]

    def traced(x):
        seen.append(_fast(tho._with(args, q=x)))
        return x
    seen.clear()
    torch.jit.trace(traced, (q,), check_trace=False)
    assert seen == [None]


def test_public_call_traces_the_op_under_compile():
    """Dynamo folds is_compiling(): the graph holds mla::sparse_decode (whose kernel, run by the
    compiled code, then uses a plan like any call that comes through the op)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    args = tho._valid_cases()["v32_sched"]
    _dispatch.invalidate()
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(_public, backend=counter, fullgraph=True)
    _same(_outcome(lambda: compiled(args)), _outcome(lambda: torch.ops.mla.sparse_decode(*args)),
          "compiled")
    _same(_outcome(lambda: compiled(args)), _outcome(lambda: torch.ops.mla.sparse_decode(*args)),
          "compiled, plan used")
    assert counter.frame_count == 1 and len(_eager._PLANS) == 1
    graph = counter.graphs[0]
    assert any("mla.sparse_decode" in str(n.target) for n in graph.graph.nodes)


# ---------------------------------------------------------------------------------------------
# plans follow the state they were made from
# ---------------------------------------------------------------------------------------------

def _chosen(tool, rec, lib, call):
    """Which backend ran call() under the tool's CUDA simulation."""
    del rec.calls[:], rec.c_calls[:], lib.calls[:]
    rec.keep = True
    try:
        with lib.record():
            call()
    finally:
        rec.keep = False
    return "native" if lib.calls else "triton" if rec.calls or rec.c_calls else "reference"


def test_plans_follow_backend_state(monkeypatch):
    import torch_mla.native as nat
    from torch_mla.native import _lib

    tool = tho._tool()
    q, cache, idx, sched, scale = tool.make_inputs(b=2, s_q=1, h_q=16, topk=64, num_parts=4)
    rec, lib = tool.LaunchRecorder(), tool.NativeStandIn()
    def call():
        return torch_mla.sparse_decode(q, cache, idx, sm_scale=scale, schedule=sched)
    with tool.simulate_cuda(rec, verified=True, native=lib):
        for _ in range(2):  # (each twice: the second call uses the plan)
            assert _chosen(tool, rec, lib, call) == "native"
        with torch_mla.use_backend("triton"):
            assert _chosen(tool, rec, lib, call) == "triton"
        monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
        assert [_chosen(tool, rec, lib, call) for _ in range(2)] == ["triton"] * 2
        with torch_mla.use_backend("native"):  # overrides the environment
            assert _chosen(tool, rec, lib, call) == "native"
        monkeypatch.delenv(_dispatch.ENV_VAR)
        assert _chosen(tool, rec, lib, call) == "native"
        saved = nat.GPU_VERIFIED
        nat.GPU_VERIFIED = frozenset()  # a module attribute: watched
        try:
            assert [_chosen(tool, rec, lib, call) for _ in range(2)] == ["triton"] * 2
        finally:
            nat.GPU_VERIFIED = saved
        assert _chosen(tool, rec, lib, call) == "native"
        _lib._lib = None  # as after a failed load: native declines
        try:
            assert _chosen(tool, rec, lib, call) == "triton"
        finally:
            _lib._lib = lib
        assert _chosen(tool, rec, lib, call) == "native"
        monkeypatch.setitem(nat.SUPPORTS, "sparse_decode", lambda *a: ["no"])  # a table entry
        assert _chosen(tool, rec, lib, call) == "triton"
        monkeypatch.undo()
        assert _chosen(tool, rec, lib, call) == "native"
        _dispatch.ORDER["cpu"] = ("reference",)  # (simulate_cuda restores its own entry)
        assert _chosen(tool, rec, lib, call) == "reference"
        # a misaligned q is another key, which native declines (its rows are read 16 bytes at a
        # time): Triton takes it
        _dispatch.ORDER["cpu"] = _dispatch.ORDER["cuda"]
        odd = torch.empty(q.numel() + 1, dtype=q.dtype)[1:].view(q.shape).copy_(q)
        assert odd.data_ptr() % 16
        assert _chosen(tool, rec, lib, lambda: torch_mla.sparse_decode(
            odd, cache, idx, sm_scale=scale, schedule=sched)) == "triton"
        assert _chosen(tool, rec, lib, call) == "native"


def test_watched_tables_invalidate():
    probe = _dispatch.register_cache({})
    try:
        table = _dispatch.WatchedDict(a=1)
        for change in (lambda: table.__setitem__("b", 2), lambda: table.pop("b"),
                       lambda: table.update(c=3), lambda: table.setdefault("d", 4),
                       lambda: table.__delitem__("d"), lambda: table.popitem(),
                       lambda: table.__ior__({"e": 5}), table.clear):
            probe["x"] = 1
            change()
            assert not probe
        probe["x"] = 1
        assert table.get("a") is None and "a" not in table and probe == {"x": 1}  # reads: kept
        mod = importlib.import_module("torch_mla.triton.sparse_decode")
        assert isinstance(mod, _dispatch.WatchedModule)
        setattr(mod, "_probe_attr", 1)
        assert not probe
        probe["x"] = 1
        delattr(mod, "_probe_attr")
        assert not probe
    finally:  # (by identity: list.remove would take the first empty dict, maybe a real cache)
        _dispatch._CACHES[:] = [c for c in _dispatch._CACHES if c is not probe]


def test_env_read_follows_os_environ(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    assert _dispatch.forced_backend() is None
    monkeypatch.setenv(_dispatch.ENV_VAR, " Reference ")
    assert _dispatch.forced_backend() == "reference"
    monkeypatch.setenv(_dispatch.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="unknown torch_mla backend 'bogus'"):
        _dispatch.forced_backend()
    monkeypatch.delenv(_dispatch.ENV_VAR)
    assert _dispatch.forced_backend() is None


def test_use_backend_nests_and_reenters():
    ub = torch_mla.use_backend("triton")
    with ub:
        assert _dispatch.forced_backend() == "triton"
        with ub:
            with torch_mla.use_backend("reference"):
                assert _dispatch.forced_backend() == "reference"
            assert _dispatch.forced_backend() == "triton"
        assert _dispatch.forced_backend() == "triton"
    assert _dispatch.forced_backend() is None

    @torch_mla.use_backend("reference")
    def inside():
        return _dispatch.forced_backend()
    assert inside() == "reference" and _dispatch.forced_backend() is None
    bad = torch_mla.use_backend("cudnn")  # checked on entering, as before
    with pytest.raises(ValueError, match="unknown torch_mla backend"):
        with bad:
            pass
    assert _dispatch.forced_backend() is None
