"""The host path of an eager sparse_decode call (what tools/host_overhead.py times), kept honest:

* the one-expression contract predicate (meta.sparse_decode.valid_eager) never accepts inputs that
  the checks one by one reject, and accepts the usual valid calls (so the cheap path is taken);
* the Triton supports() accepting fast case agrees with its reasons;
* the direct relaunch of a compiled Triton kernel (torch_mla.triton._common.launch) reuses a
  compiled kernel only for an identical launch signature, hands Triton's runner every argument
  in parameter order with a 3-D grid, and falls back to kernel[grid] for good if that fails;
* a Triton launch site of a prepared call (_common.LaunchSite) hands back the signature that
  ``_signature`` computes, call after call;
* once a plan exists, an eager call does only its per-call work: no contract check, no backend
  choice, no torch.ops dispatch, 3 (native) or 4 (Triton) allocations, one C call or two
  launches (counted with sys.setprofile: robust, unlike a wall-clock threshold);
* tools/host_overhead.py's CUDA simulation runs the Triton host code and records its two launches
  with the arguments the kernels expect, runs the native host code down to the C call whose
  parameter struct points at the right tensors, and leaves nothing patched behind.
"""

import importlib.util
import os
import sys
import warnings

import pytest
import torch

import torch_mla
from torch_mla.meta import sparse_decode as msd
from torch_mla.meta.layouts import LAYOUTS, empty_cache
from samples import SAMPLES

triton = pytest.importorskip("triton")
_common = importlib.import_module("torch_mla.triton._common")
TSD = importlib.import_module("torch_mla.triton.sparse_decode")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
    spec = importlib.util.spec_from_file_location(
        "host_overhead_tool", os.path.join(ROOT, "tools", "host_overhead.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _valid_cases():
    cases = {name: list(args) for name, args in SAMPLES["sparse_decode"]()}
    for name in list(cases):  # each also with a schedule
        args = list(cases[name])
        b = args[0].shape[0]
        sched = torch_mla.decode_schedule(torch.full((b,), 8, dtype=torch.int32), num_parts=3)
        args[10], args[11] = sched.metadata, sched.num_splits
        cases[name + "_sched"] = args
    return cases


def _with(args, **changes):
    names = ["q", "k_cache", "indices", "topk_length", "attn_sink", "extra_k_cache",
             "extra_indices", "extra_topk_length", "d_v", "sm_scale", "schedule_metadata",
             "num_splits"]
    args = list(args)
    for k, v in changes.items():
        args[names.index(k)] = v
    return args


def _mutations(args):
    q, cache, idx, lens, sink, ecache, eidx, elens, d_v, scale, meta, splits = args
    b, s_q, h_q, d = q.shape
    yield "q rank", _with(args, q=q[0])
    yield "q dtype", _with(args, q=q.to(torch.int32))
    wide = torch.empty(b, s_q, h_q, 2 * d, dtype=q.dtype)
    yield "q last dim strided", _with(args, q=wide[..., ::2])
    yield "q d_qk", _with(args, q=torch.randn(b, s_q, h_q, 100).to(q.dtype))
    yield "q other layout", _with(args, q=torch.randn(b, s_q, h_q, 1088 - d).to(q.dtype))
    yield "q on meta", _with(args, q=q.to("meta"))
    yield "cache dtype", _with(args, k_cache=cache.view(torch.int8))
    yield "cache rank", _with(args, k_cache=cache[0])
    yield "cache h_kv", _with(args, k_cache=cache.expand(-1, -1, 2, -1))
    yield "cache bytes", _with(args, k_cache=cache[..., :-1])
    yield "cache token stride", _with(args, k_cache=cache[:, ::2])
    nb, bs, _, w = cache.shape
    flat = cache.reshape(-1)[: nb * bs * w]
    overlapping = flat.as_strided((nb, bs, 1, w), (w, w, w, 1))
    yield "cache overlapping blocks", _with(args, k_cache=overlapping)
    yield "cache on meta", _with(args, k_cache=cache.to("meta"))
    yield "d_v 0", _with(args, d_v=0)
    yield "d_v big", _with(args, d_v=d + 1)
    yield "sm_scale nan", _with(args, sm_scale=float("nan"))
    yield "sm_scale inf", _with(args, sm_scale=float("-inf"))
    yield "indices dtype", _with(args, indices=idx.long())
    yield "indices rank", _with(args, indices=idx[0])
    yield "indices batch", _with(args, indices=idx[:1])
    yield "indices s_q", _with(args, indices=torch.cat([idx, idx], 1))
    yield "indices last dim strided", _with(args, indices=torch.cat([idx, idx], 2)[..., ::2])
    yield "indices on meta", _with(args, indices=idx.to("meta"))
    yield "topk_length shape", _with(args, topk_length=torch.zeros(b + 1, dtype=torch.int32))
    yield "topk_length dtype", _with(args, topk_length=torch.zeros(b, dtype=torch.int64))
    yield "topk_length rank", _with(args, topk_length=torch.zeros(b, 1, dtype=torch.int32))
    yield "attn_sink dtype", _with(args, attn_sink=torch.zeros(h_q, dtype=torch.bfloat16))
    yield "attn_sink shape", _with(args, attn_sink=torch.zeros(h_q + 1))
    yield "attn_sink on meta", _with(args, attn_sink=torch.zeros(h_q, device="meta"))
    yield "extra cache alone", _with(args, extra_k_cache=cache, extra_indices=None,
                                     extra_topk_length=None)
    yield "extra indices alone", _with(args, extra_k_cache=None, extra_indices=idx)
    yield "extra lengths alone", _with(args, extra_k_cache=None, extra_indices=None,
                                       extra_topk_length=torch.zeros(b, dtype=torch.int32))
    if ecache is not None:
        yield "extra cache bytes", _with(args, extra_k_cache=ecache[..., :-1])
        yield "extra indices batch", _with(args, extra_indices=eidx[:1])
        yield "extra indices dtype", _with(args, extra_indices=eidx.long())
        yield "extra lengths shape", _with(args, extra_topk_length=elens[:1])
    meta_ = meta if meta is not None else torch.zeros(3, 8, dtype=torch.int32)
    splits_ = splits if splits is not None else torch.zeros(b + 1, dtype=torch.int32)
    yield "schedule metadata alone", _with(args, schedule_metadata=meta_, num_splits=None)
    yield "schedule splits alone", _with(args, schedule_metadata=None, num_splits=splits_)
    yield "schedule width", _with(args, schedule_metadata=torch.zeros(3, 7, dtype=torch.int32),
                                  num_splits=splits_)
    yield "schedule dtype", _with(args, schedule_metadata=meta_.long(), num_splits=splits_)
    yield "schedule rank", _with(args, schedule_metadata=meta_[0], num_splits=splits_)
    yield "num_splits shape", _with(args, schedule_metadata=meta_,
                                    num_splits=torch.zeros(b, dtype=torch.int32))
    yield "num_splits dtype", _with(args, schedule_metadata=meta_, num_splits=splits_.long())
    yield "schedule on meta", _with(args, schedule_metadata=meta_.to("meta"), num_splits=splits_)
    # valid variations: fp8 / uint8 caches, f16 / f32 / f64 q, f64 sink, smaller d_v
    yield "ok uint8 cache", _with(args, k_cache=cache.view(torch.uint8))
    for dt in (torch.float16, torch.float32, torch.float64):
        yield f"ok q {dt}", _with(args, q=q.to(dt))
    yield "ok d_v 7", _with(args, d_v=7)
    if sink is not None:
        yield "ok sink f64", _with(args, attn_sink=sink.double())


def _checks_pass(args) -> bool:
    try:
        msd.check_sparse_decode_each(*args)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("case", list(_valid_cases()))
def test_valid_eager_is_sufficient_and_taken(case):
    args = _valid_cases()[case]
    assert _checks_pass(args)
    assert msd.valid_eager(*args), "the cheap predicate must accept a plain valid call"
    seen_reject = 0
    for what, mutated in _mutations(args):
        passes = _checks_pass(mutated)
        fast = msd.valid_eager(*mutated)
        assert not (fast and not passes), f"{what}: valid_eager accepted inputs the checks reject"
        if what.startswith("ok "):
            assert passes and fast, what
        else:
            assert not passes, f"{what}: the mutation should be invalid"
            seen_reject += 1
            # and the contract entry point still raises (through the checks, with the message)
            with pytest.raises(RuntimeError):
                msd.check_sparse_decode(*mutated)
    assert seen_reject > 30


def test_fake_tensors_always_run_every_check(monkeypatch):
    """Under tracing the predicate is skipped: it would branch on (symbolic) sizes."""
    calls = []
    monkeypatch.setattr(msd, "valid_eager", lambda *a: calls.append(1) or True)
    args = _valid_cases()["v32"]
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        torch.ops.mla.sparse_decode(*fake)
    assert calls == []
    msd.check_sparse_decode(*args)
    assert calls == [1]


# ---------------------------------------------------------------------------------------------
# Triton supports(): the accepting fast case
# ---------------------------------------------------------------------------------------------

def _expected_ok(q, cache, d_v):
    from torch_mla.meta.layouts import alignment_reasons

    return (q.dtype in (torch.bfloat16, torch.float16) and q.shape[2] % 16 == 0 and d_v <= 512
            and not alignment_reasons("k_cache", cache, ""))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("h_q", [8, 16, 48, 64])
@pytest.mark.parametrize("d_v", [512, 513])
@pytest.mark.parametrize("cache_kind", ["aligned", "offset", "odd_stride", "one_block_odd"])
def test_triton_supports_fast_case_agrees(dtype, h_q, d_v, cache_kind):
    lay = LAYOUTS["v32"]
    if cache_kind == "aligned":
        cache = empty_cache(3, 4, lay)
    elif cache_kind == "offset":  # base not 16-byte aligned
        cache = torch.empty(3 * 4 * 656 + 8, dtype=torch.uint8)[8:].view(3, 4, 1, 656)
    elif cache_kind == "odd_stride":  # block stride not a multiple of 16
        cache = torch.empty(3, 4 * 656 + 8, dtype=torch.uint8)[:, : 4 * 656].view(3, 4, 1, 656)
    else:  # one block: its stride does not matter
        cache = torch.empty(1, 4 * 656 + 8, dtype=torch.uint8)[:, : 4 * 656].view(1, 4, 1, 656)
    q = torch.zeros(2, 1, h_q, 576, dtype=dtype)
    idx = torch.zeros(2, 1, 4, dtype=torch.int32)
    reasons = TSD.supports(q, cache, idx, None, None, None, None, None, d_v, 0.1, None, None)
    assert (reasons == []) == _expected_ok(q, cache, d_v), reasons
    # with an extra cache, both must be aligned
    reasons = TSD.supports(q, empty_cache(2, 4, lay), idx, None, None, cache, idx, None, d_v, 0.1,
                           None, None)
    assert (reasons == []) == _expected_ok(q, cache, d_v), reasons


# ---------------------------------------------------------------------------------------------
# direct relaunch of compiled Triton kernels
# ---------------------------------------------------------------------------------------------

class _Driver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 1234

    def get_current_target(self):  # pragma: no cover - not used by the runner
        return None


@pytest.fixture
def direct(monkeypatch):
    """A stand-in JIT kernel whose launches return a real Triton CompiledKernel (its runner code
    is Triton's own) with a recording stand-in for the C launcher; CPU tensors count as
    device 0."""
    try:
        from triton.compiler.compiler import CompiledKernel
        from triton.runtime import driver as tdriver
    except ImportError:  # pragma: no cover - another Triton layout
        pytest.skip("triton.compiler.compiler.CompiledKernel not importable")
    launched, jit_calls = [], []
    ck = object.__new__(CompiledKernel)
    ck.module, ck.function, ck.packed_metadata = object(), "fn", "meta"
    ck._module_pid = -1
    ck.name, ck.hash, ck.metadata_group, ck.src = "k", "", {}, None
    ck._run = lambda *a: launched.append(a)

    class Jit:
        arg_names = ["x", "n", "y", "scale", "A", "B"]

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                jit_calls.append((grid, args, kwargs))
                return ck
            return run

    monkeypatch.setattr(tdriver, "_active", _Driver())
    monkeypatch.setattr(_common, "cuda_index", lambda t: 0)
    monkeypatch.setattr(_common, "DIRECT_LAUNCH", True)
    monkeypatch.setattr(_common, "_compiled", {})
    return Jit(), ck, launched, jit_calls


def test_direct_relaunch_reuses_only_identical_signatures(direct):
    kernel, ck, launched, jit_calls = direct
    x, y = torch.zeros(8), torch.zeros(4, dtype=torch.int32)
    call = lambda x=x, n=5, y=y, s=0.5, **kw: _common.launch(  # noqa: E731
        kernel, (3, 2), x, n, y, s, **{"A": 1, "B": True, "num_warps": 4, **kw})
    assert call() is ck and len(jit_calls) == 1 and launched == []  # first: through Triton
    assert call(s=0.25) is ck and len(jit_calls) == 1  # floats are not specialized
    assert len(launched) == 1
    grid_and_args = launched[0][:4], launched[0][9:]
    assert grid_and_args == ((3, 2, 1, 1234), (x, 5, y, 0.25, 1, True))  # 3-D grid, all args
    # anything Triton specializes on, or might, goes through Triton again
    call(n=16)
    call(y=torch.zeros(4, dtype=torch.int64))
    call(x=torch.zeros(9)[1:])  # 4-byte offset: not 16-byte aligned
    call(B=False)
    call(num_warps=8)
    call(n=True)  # a bool is not the int 1
    assert len(jit_calls) == 7 and len(launched) == 1
    call(n=16)  # now known
    assert len(jit_calls) == 7 and len(launched) == 2


def test_direct_relaunch_skips_cpu_and_unknown_parameters(direct, monkeypatch):
    kernel, ck, launched, jit_calls = direct
    x = torch.zeros(8)
    monkeypatch.setattr(_common, "cuda_index", lambda t: None)  # not a CUDA tensor
    for _ in range(2):
        _common.launch(kernel, (1,), x, 1, x, 0.5, A=1, B=2)
    assert len(jit_calls) == 2 and launched == []
    monkeypatch.setattr(_common, "cuda_index", lambda t: 0)
    for _ in range(2):  # B left to its default: parameter order unknown, no direct launch
        _common.launch(kernel, (1,), x, 1, x, 0.5, A=1)
    assert len(jit_calls) == 4 and launched == []


def test_direct_relaunch_failure_falls_back_for_good(direct):
    kernel, ck, launched, jit_calls = direct

    def broken(*a):
        raise TypeError("function takes exactly 40 arguments (46 given)")

    ck._run = broken
    x = torch.zeros(8)
    _common.launch(kernel, (1,), x, 1, x, 0.5, A=1, B=2)
    with pytest.warns(UserWarning, match="direct Triton launches are off"):
        assert _common.launch(kernel, (1,), x, 1, x, 0.5, A=1, B=2) is ck
    assert len(jit_calls) == 2 and _common.DIRECT_LAUNCH is False and _common._compiled == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _common.launch(kernel, (1,), x, 1, x, 0.5, A=1, B=2)
    assert len(jit_calls) == 3


def test_kernel_parameter_names_match_the_launch_sites():
    """The direct launch appends the keyword arguments in ``arg_names`` order after the
    positional ones: every parameter after the positional ones must be passed by keyword."""
    tool = _tool()
    rec = tool.LaunchRecorder()
    q, cache, idx, sched, scale = tool.make_inputs(b=2, s_q=2, h_q=16, topk=64, num_parts=4)
    with tool.simulate_cuda(rec), torch_mla.use_backend("triton"):
        rec.keep = True
        torch_mla.sparse_decode(q, cache, idx, d_v=512, sm_scale=scale, schedule=sched)
    assert len(rec.calls) == 2
    for kernel, grid, args, kwargs in rec.calls:
        names = getattr(kernel, "arg_names", None)
        if names is None:  # pragma: no cover - the interpreter's wrapper
            names = kernel.fn.arg_names
        assert len(names) >= len(args)
        assert set(names[len(args):]) <= set(kwargs), names[len(args):]


# ---------------------------------------------------------------------------------------------
# tools/host_overhead.py
# ---------------------------------------------------------------------------------------------

def test_tool_simulation_records_the_launches_and_restores_everything():
    from torch_mla import _dispatch
    import torch_mla.native as nat

    tool = _tool()
    before = (dict(_dispatch.ORDER), _common.first_tensor, nat.device_reasons, TSD._launch)
    b, s_q, h_q = 3, 2, 32
    q, cache, idx, sched, scale = tool.make_inputs(b=b, s_q=s_q, h_q=h_q, topk=64, num_parts=5)
    rec = tool.LaunchRecorder()
    with tool.simulate_cuda(rec):
        with torch_mla.use_backend("triton"):
            text = torch_mla.explain("sparse_decode", q, cache, idx, d_v=512, sm_scale=scale,
                                     schedule=sched)
            rec.keep = True
            out, lse = torch_mla.sparse_decode(q, cache, idx, d_v=320, sm_scale=scale,
                                               schedule=sched)
        # unforced, the CUDA order applies: native (GPU-verified) takes it; with neither
        # kernel verified, native and triton decline
        chosen = torch_mla.explain("sparse_decode", q, cache, idx, d_v=512, sm_scale=scale,
                                   schedule=sched)
        import torch_mla.triton as tri
        saved = (nat.GPU_VERIFIED, tri.GPU_VERIFIED)
        nat.GPU_VERIFIED, tri.GPU_VERIFIED = frozenset(), frozenset()
        try:
            unforced = torch_mla.explain("sparse_decode", q, cache, idx, d_v=512,
                                         sm_scale=scale, schedule=sched)
        finally:
            nat.GPU_VERIFIED, tri.GPU_VERIFIED = saved
    assert "native" in chosen.splitlines()[0]
    assert "triton" in text.splitlines()[0]
    assert "skipped native" in unforced and "skipped triton" in unforced
    assert "has not passed its GPU tests" in unforced
    (k1, g1, a1, kw1), (k2, g2, a2, kw2) = rec.calls
    assert k1 is TSD._sparse_decode_kernel and k2 is TSD._combine_kernel
    block_h = kw1["BLOCK_H"]
    parts, hb = sched.metadata.shape[0], h_q // block_h
    # (the third axis: the s_q tokens over the SMs the parts leave idle; sm_count is 8 here)
    assert tuple(g1) == (parts, hb, max(1, min(s_q, 8 // (parts * hb))))
    assert tuple(g2) == (b * s_q, h_q // 16)
    # the output strides are computed on the host, not asked of the tensor: they must agree
    same = lambda a, t: a.data_ptr() == t.data_ptr() and a.shape == t.shape  # noqa: E731
    assert same(a1[28], out) and tuple(a1[29:32]) == out.stride()[:3]
    assert same(a1[32], lse) and same(a2[9], lse)
    assert same(a2[5], out) and tuple(a2[6:9]) == out.stride()[:3]
    assert same(a1[0], q) and tuple(a1[1:4]) == q.stride()[:3]
    assert a1[4].dtype == torch.uint8 and a1[4].data_ptr() == cache.data_ptr()
    after = (dict(_dispatch.ORDER), _common.first_tensor, nat.device_reasons, TSD._launch)
    assert after == before


def test_tool_native_simulation_packs_the_call():
    """The native host code, run on CPU tensors down to the C call: one call, whose parameter
    struct (csrc/include/torch_mla_native.h) holds this call's sizes, strides and pointers."""
    from torch_mla.native import _lib
    from torch_mla.native import sparse_decode as nsd

    tool = _tool()
    before = (_lib._lib, _lib._tried, nsd._current_stream, nsd._current_device)
    b, s_q, h_q, topk = 3, 2, 64, 64
    q, cache, idx, sched, scale = tool.make_inputs(b=b, s_q=s_q, h_q=h_q, topk=topk, num_parts=5)
    rec, lib = tool.LaunchRecorder(), tool.NativeStandIn()
    with tool.simulate_cuda(rec, native=lib):
        with torch_mla.use_backend("native"), lib.record() as calls:
            for _ in range(2):  # the op path (plan made), then the plan
                out, lse = torch_mla.sparse_decode(q, cache, idx, d_v=320, sm_scale=scale,
                                                   schedule=sched)
                params, stream = calls.pop()
                f = nsd._FMT.unpack(params)
                assert f[:10] == (_lib.ABI_VERSION, nsd._STRUCT_BYTES, b, s_q, h_q, 576, 320,
                                  topk, 0, scale)
                assert f[10:14] == (q.data_ptr(), *q.stride()[:3])
                assert f[14:18] == (cache.data_ptr(), cache.shape[0], cache.shape[1],
                                    cache.stride(0))
                assert f[18:21] == (idx.data_ptr(), *idx.stride()[:2])
                assert f[31:34] == (sched.metadata.data_ptr(), sched.num_splits.data_ptr(),
                                    sched.metadata.shape[0])
                assert f[34:36] == (out.data_ptr(), lse.data_ptr())
                assert f[37] == nsd.workspace_bytes(b, s_q, h_q, 5, True) and stream == 0
                assert out.shape == (b, s_q, h_q, 320) and lse.shape == (b, h_q, s_q)
        assert not rec.calls and not calls
    assert (_lib._lib, _lib._tried, nsd._current_stream, nsd._current_device) == before


def _calls_during(fn):
    """(Python functions entered, C functions called) while fn() runs, from sys.setprofile."""
    py, c = [], []

    def prof(frame, event, arg):
        if event == "call":
            py.append(frame.f_code)
        elif event == "c_call":
            c.append(arg)
    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return py, c


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_a_planned_call_does_only_its_per_call_work(backend):
    """After the first call with a key, the eager call runs no contract check, no backend choice,
    no dispatcher, no per-shape arithmetic: torch_mla's Python frames are the public function,
    the fast path and the prepared call (plus Triton's tuning-knob read); it allocates only
    the outputs and the workspace and makes one C call or two launches."""
    from torch_mla import _dispatch

    tool = _tool()
    q, cache, idx, sched, scale = tool.make_inputs(b=2, s_q=1, h_q=64, topk=128, num_parts=132)
    rec, lib = tool.LaunchRecorder(), tool.NativeStandIn()
    def call():
        return torch_mla.sparse_decode(q, cache, idx, sm_scale=scale, schedule=sched)
    with tool.simulate_cuda(rec, native=lib if backend == "native" else None):
        with torch_mla.use_backend(backend), lib.record() as lib_calls:
            first, _ = _calls_during(call)
            call()  # (Triton: the first planned call records its C launches; both: workspace)
            rec.keep = True
            py, c = _calls_during(call)
            rec.keep = False
            # through torch.ops (compiled code calls the op): the plan too, behind the dispatcher
            op_args = (q, cache, idx, None, None, None, None, None, 512, scale, *sched)
            via_op, _ = _calls_during(lambda: torch.ops.mla.sparse_decode(*op_args))
            _dispatch.invalidate()
            again, _ = _calls_during(call)
    ours = [f"{os.path.basename(code.co_filename)}:{code.co_name}" for code in py
            if os.sep + "torch_mla" + os.sep in code.co_filename]
    expected = ["api.py:sparse_decode", "_eager.py:sparse_decode", "_eager.py:run",
                "_eager.py:_meta", "_eager.py:_meta",  # (_meta: the schedule's 2 tensors)
                "sparse_decode.py:run"]
    if backend == "triton":
        expected += ["sparse_decode.py:_config", "sparse_decode.py:_hooks_idle"]
    expected.append("_eager.py:workspace")  # (the cached workspace: no allocation)
    assert ours == expected, ours
    assert not any(code.co_filename.endswith(os.path.join("torch", "_ops.py")) for code in py)
    assert sum(f is torch.empty for f in c) == 2  # out and lse
    if backend == "native":
        assert len(lib_calls) == 5 and not rec.calls  # (the five calls above)
    else:
        # the planned call launches through the recorded C launcher, not through _launch
        assert len(rec.c_calls) == 2 and not rec.calls and not lib_calls
    assert not {"check_sparse_decode", "select", "prepare"} & {c.co_name for c in via_op}
    assert "run" in {c.co_name for c in via_op}
    # the first call with a key (and the first after an invalidation) does the whole op
    names = {code.co_name for code in first}
    assert {"check_sparse_decode", "select", "prepare"} <= names
    assert {"check_sparse_decode", "select", "prepare"} <= {code.co_name for code in again}


def test_launch_site_signature_is_the_launch_signature(monkeypatch):
    """Through many calls of prepared Triton calls (other scales, schedules, tuning knobs), the
    signature a LaunchSite hands back is the one _signature computes."""
    tool = _tool()
    checked = []

    def checking_launch(kernel, grid, *args, **kwargs):
        if isinstance(kernel, _common.LaunchSite):
            got = kernel.signature(args, kwargs)
            assert got == _common._signature(kernel.kernel, args, kwargs)
            checked.append(got is not None)

    q, cache, idx, sched, scale = tool.make_inputs(b=2, s_q=1, h_q=64, topk=64, num_parts=6)
    rec = tool.LaunchRecorder()
    monkeypatch.setattr(_common, "cuda_index", lambda t: 0)  # CPU tensors count as device 0
    with tool.simulate_cuda(rec), torch_mla.use_backend("triton"):
        TSD._launch = checking_launch  # (in place of the recorder; simulate_cuda restores it)
        for i in range(12):
            if i == 4:
                monkeypatch.setitem(TSD._TUNE, "num_stages", 3)  # a keyword changes
            if i == 8:
                monkeypatch.setitem(TSD._TUNE, "block_n", 32)  # another keyword
            torch_mla.sparse_decode(q, cache, idx, sm_scale=scale * (1 + i),
                                    schedule=sched if i % 3 else None)
    assert len(checked) == 24 and all(checked)
    # and a site compares what it must (on the GPU, an int argument may change within a plan:
    # the part count of a schedule made per call follows _TUNE["ctas_per_sm"]): another int,
    # another keyword -> another signature
    site = _common.LaunchSite(TSD._combine_kernel)
    x = torch.zeros(8)
    sigs = [site.signature((x, 5, x, 0.5), {"A": 1}) for _ in range(3)]
    assert sigs[0] == sigs[2]
    assert site.signature((x, 16, x, 0.5), {"A": 1}) != sigs[0]
    assert site.signature((x, 5, x, 0.25), {"A": 2}) != sigs[0]
    assert site.signature((x, 5, x, 0.25), {"A": 1}) == sigs[0]


def test_tool_runs():
    tool = _tool()
    assert tool.main(["--b", "2", "--s-q", "1", "--h-q", "16", "--topk", "64", "--num-parts",
                      "4", "--calls", "20", "--no-launch-estimate", "--backend", "both"]) == 0
