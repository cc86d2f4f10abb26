"""The Triton mla::sparse_prefill kernels (forward and backward) under the Triton interpreter on the
CPU, through the public ops inside ``torch_mla.use_backend("triton")``, against the reference
backend on the same inputs, plus one case against an independent float64 formula (forward values
and autograd gradients). Shapes are small (the interpreter is slow) but include the real head dims
576/512 and 512/512. Every test draws fresh random inputs."""

import pytest
import torch

import torch_mla

tri = pytest.importorskip("torch_mla.triton")
if "sparse_prefill" not in tri.IMPLS:  # pragma: no cover - Triton missing
    pytest.skip("Triton backend not available", allow_module_level=True)
if not tri._common.INTERPRET:  # pragma: no cover - a CUDA machine: tests/gpu covers the kernels
    pytest.skip("CPU tensors run Triton only under TRITON_INTERPRET=1", allow_module_level=True)

INF = float("inf")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_indices(s_q, h_kv, topk, s_kv):
    """Valid rows mixed with negatives, values >= s_kv (some far out) and duplicates."""
    idx = torch.randint(-3, s_kv + 3, (s_q, h_kv, topk), dtype=torch.int64)
    far = torch.rand(idx.shape) < 0.05
    idx = torch.where(far, torch.randint(-2**31, 2**31 - 1, idx.shape), idx)
    if topk >= 4:
        idx[:, :, topk // 2] = idx[:, :, 0]
        idx[:, :, topk - 1] = idx[:, :, 1]
        idx[:, :, 1] = idx[:, :, 0]
    if s_q > 1:
        idx[0, 0] = -1  # query 0, kv head 0: nothing valid
    return idx.to(torch.int32)


def used_rows(indices, s_kv, topk_length):
    """[s_kv, h_kv] bool: rows some valid entry points at."""
    s_q, h_kv, topk = indices.shape
    pos = torch.arange(topk)
    ok = (indices >= 0) & (indices < s_kv)
    if topk_length is not None:
        ok &= pos < topk_length[:, None, None]
    used = torch.zeros(s_kv, h_kv, dtype=torch.bool)
    for k in range(h_kv):
        used[indices[:, k][ok[:, k]].long(), k] = True
    return used


def make_case(s_q, s_kv, h_q, h_kv, d_qk, d_v, topk, *, dtype=torch.bfloat16, sink=None,
              use_len=False):
    q = torch.randn(s_q, h_q, d_qk).to(dtype)
    kv = torch.randn(s_kv, h_kv, d_qk).to(dtype)
    indices = make_indices(s_q, h_kv, topk, s_kv)
    topk_length = None
    if use_len:
        topk_length = torch.randint(-2, topk + 5, (s_q,), dtype=torch.int32)
        if s_q > 2:
            topk_length[1] = 0
            topk_length[2] = topk
    # NaN in every row no valid entry reads: a kernel that touched one would poison its result.
    kv = torch.where(used_rows(indices, s_kv, topk_length)[..., None], kv,
                     torch.full_like(kv, float("nan")))
    attn_sink = None
    if sink is not None:
        attn_sink = torch.randn(h_q) * 2
        if sink == "inf":
            attn_sink[0], attn_sink[-1] = INF, -INF
    return q, kv, indices, d_qk ** -0.5, d_v, attn_sink, topk_length


def forward_both(args):
    with torch_mla.use_backend("triton"):
        got = torch.ops.mla.sparse_prefill(*args)
    with torch_mla.use_backend("reference"):
        exp = torch.ops.mla.sparse_prefill(*args)
    return got, exp


def check_forward(got, exp, dtype):
    out, ml, lse = got
    e_out, e_ml, e_lse = exp
    assert out.dtype == dtype and ml.dtype == lse.dtype == torch.float32
    assert out.shape == e_out.shape and lse.shape == e_lse.shape
    assert torch.isfinite(out).all()
    assert torch.equal(lse == INF, e_lse == INF) and torch.equal(ml == -INF, e_ml == -INF)
    assert not lse.isnan().any() and not ml.isnan().any()
    fin = torch.isfinite(e_lse)
    assert not fin.all(), "the draw should contain a query with no valid key"
    # Logits are exact fp32 dots here (DOT_F32), so the stats are fp32-tight.
    torch.testing.assert_close(lse[fin], e_lse[fin], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ml[fin], e_ml[fin], rtol=1e-5, atol=1e-5)
    assert (out[~fin] == 0).all()
    # P is rounded to the input dtype before P V (as on the GPU): ~0.5% relative.
    assert rel(out, e_out) < 1e-2


def backward_both(args, got, exp):
    q, kv, idx, scale, d_v, sink, lens = args
    dout = torch.randn_like(exp[0])
    dlse = torch.randn_like(exp[2])
    with torch_mla.use_backend("triton"):
        g = torch.ops.mla.sparse_prefill_backward(dout, dlse, q, kv, idx, got[0], got[2], scale,
                                                  d_v, sink, lens)
    with torch_mla.use_backend("reference"):
        e = torch.ops.mla.sparse_prefill_backward(dout, dlse, q, kv, idx, exp[0], exp[2], scale,
                                                  d_v, sink, lens)
    return g, e


def check_backward(g, e, args):
    q, kv, sink = args[0], args[1], args[5]
    dq, dkv, dsink = g
    assert dq.dtype == q.dtype and dkv.dtype == kv.dtype and dq.shape == q.shape
    assert dkv.shape == kv.shape
    assert torch.isfinite(dq).all() and torch.isfinite(dkv).all() and torch.isfinite(dsink).all()
    assert rel(dq, e[0]) < 2e-2
    assert rel(dkv, e[1]) < 2e-2
    # rows nothing valid points at (NaN in kv) get exactly zero gradient
    assert (dkv[kv.isnan()] == 0).all()
    if sink is None:
        assert torch.equal(dsink, torch.zeros_like(dsink)) and dsink.dtype == torch.float32
    else:
        assert dsink.dtype == sink.dtype
        torch.testing.assert_close(dsink, e[2], rtol=2e-2,
                                   atol=2e-2 * e[2].abs().max().item() + 1e-5)


CASES = [
    # s_q, s_kv, h_q, h_kv, d_qk, d_v, topk, dtype, sink, use_len
    pytest.param(4, 40, 16, 1, 48, 32, 70, torch.bfloat16, "inf", True, id="tail_topk_inf_sink"),
    pytest.param(3, 30, 32, 2, 32, 16, 64, torch.float16, "finite", False, id="gqa_fp16"),
    pytest.param(3, 50, 16, 1, 32, 32, 48, torch.bfloat16, None, True, id="no_tail_dim"),
    pytest.param(3, 30, 24, 1, 32, 24, 40, torch.bfloat16, "finite", True, id="padded_dims_h24"),
    pytest.param(3, 40, 128, 1, 32, 16, 40, torch.bfloat16, "inf", True, id="two_head_blocks"),
    pytest.param(2, 64, 16, 1, 576, 512, 80, torch.bfloat16, "inf", True, id="d576_v512"),
    pytest.param(2, 64, 16, 1, 512, 512, 64, torch.bfloat16, "finite", False, id="d512_v512"),
    # 256 heads on one kv head: past the two-phase backward's 128, so the fused kernel runs
    pytest.param(2, 30, 256, 1, 32, 16, 24, torch.bfloat16, "finite", True, id="group256_fused"),
]


@pytest.mark.parametrize("s_q,s_kv,h_q,h_kv,d_qk,d_v,topk,dtype,sink,use_len", CASES)
def test_forward_and_backward_match_reference(s_q, s_kv, h_q, h_kv, d_qk, d_v, topk, dtype, sink,
                                              use_len):
    args = make_case(s_q, s_kv, h_q, h_kv, d_qk, d_v, topk, dtype=dtype, sink=sink,
                     use_len=use_len)
    got, exp = forward_both(args)
    check_forward(got, exp, dtype)
    g, e = backward_both(args, got, exp)
    check_backward(g, e, args)


@pytest.mark.parametrize("option,value", [
    ("BWD_MODE", "fused"),  # one backward kernel with per-head-block dK/dV atomics
    ("BWD_SCRATCH_BYTES", 1),  # two-phase, one query per chunk: the chunk loop and its slices
    ("BWD_ATOMIC_SEM", "acq_rel"),
    ("BWD_DQ_IN_PHASE2", False),  # two-phase with dq formed by the first phase
    ("BWD_DS_PREFETCH_IDX", False),
    ("BWD_PREFETCH_IDX", True), ("PREFETCH_IDX", False),
    ("BWD_DS_SPLIT", True), ("BWD_DKV_SPLIT", True), ("BWD_DKV_PREFETCH_IDX", True)])
def test_kernel_options(monkeypatch, option, value):
    # Switches of the kernel module: same results.
    from torch_mla.triton import sparse_prefill as mod
    monkeypatch.setattr(mod, option, value)
    args = make_case(3, 40, 16, 1, 48, 32, 70, sink="inf", use_len=True)
    got, exp = forward_both(args)
    check_forward(got, exp, torch.bfloat16)
    g, e = backward_both(args, got, exp)
    check_backward(g, e, args)


def _bwd_candidates():
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    from diag_sparse_prefill import BWD_CANDIDATES, BWD_TIME_DEFAULT
    return {name: BWD_CANDIDATES[name] for name in BWD_TIME_DEFAULT}


@pytest.mark.parametrize("name", list(_bwd_candidates()))
@pytest.mark.parametrize("shape", [
    # s_q, s_kv, h_q, h_kv, d_qk, d_v, topk, sink, use_len
    pytest.param((3, 40, 16, 1, 48, 32, 70, "inf", True), id="small_tail_topk"),
    # 64 heads over d_v 512: the "big" configurations of both phases (8 warps, split layouts);
    # topk 150 ends in a partial block
    pytest.param((2, 64, 64, 1, 576, 512, 150, "inf", True), id="big_d576"),
    pytest.param((2, 64, 128, 1, 512, 512, 100, "finite", False), id="big_d512_h128"),
])
def test_backward_candidates(monkeypatch, name, shape):
    # The backward configurations tools/diag_sparse_prefill.py --time-bwd times (each a set of
    # module settings), against the reference: duplicated / invalid indices, sinks, topk_length,
    # random dlse.
    from torch_mla.triton import sparse_prefill as mod
    for k, v in _bwd_candidates()[name].items():
        monkeypatch.setattr(mod, k, v)
    s_q, s_kv, h_q, h_kv, d_qk, d_v, topk, sink, use_len = shape
    args = make_case(s_q, s_kv, h_q, h_kv, d_qk, d_v, topk, sink=sink, use_len=use_len)
    got, exp = forward_both(args)
    check_forward(got, exp, torch.bfloat16)
    g, e = backward_both(args, got, exp)
    check_backward(g, e, args)


# The forward kernels: the module's default (FWD_VARIANT_DEFAULT, the split-scores kernel, which
# every other test runs), the first kernel (FWD_VARIANT None, _fwd_kernel) and the knobs that
# change the split kernel's body, each on the corner cases of the other tests (invalid and
# duplicated indices, a query with no valid key, topk_length below 0 / 0 / past topk, infinite
# sinks, NaN in unused rows).
FWD_VARIANTS = [
    pytest.param(None, id="fwd_kernel"),
    pytest.param({}, id="split"),
    pytest.param({"defer_sum": False, "split_v": False}, id="split_rowsum_onev"),
    pytest.param({"tau": 8.0}, id="split_lazy"),
    pytest.param({"tau": 0.5, "defer_sum": False}, id="split_lazy_tight_rowsum"),
    pytest.param({"split_s": False}, id="fromzero_chained"),
]


def test_forward_default_is_the_timed_split_variant():
    from torch_mla.triton import sparse_prefill as mod
    assert mod.FWD_VARIANT_DEFAULT == {"block_n": 64, "defer_sum": False}
    v = dict(mod.FWD_SPLIT_DEFAULTS, **mod.FWD_VARIANT_DEFAULT)
    assert v["split_s"] and v["split_v"] and v["tau"] == 0 and v["num_stages"] == 2


def test_forward_variant_env_var():
    # TORCH_MLA_SPARSE_PREFILL_FWD_VARIANT is read at import: "none" selects _fwd_kernel,
    # "default" (or unset) the default dict, JSON a variant.
    import importlib
    import os
    from torch_mla.triton import sparse_prefill as mod
    saved = os.environ.get("TORCH_MLA_SPARSE_PREFILL_FWD_VARIANT")
    seen = {}
    try:
        for val in ("none", "default", '{"tau": 8.0}', ""):
            os.environ["TORCH_MLA_SPARSE_PREFILL_FWD_VARIANT"] = val
            seen[val] = importlib.reload(mod).FWD_VARIANT
    finally:
        if saved is None:
            os.environ.pop("TORCH_MLA_SPARSE_PREFILL_FWD_VARIANT", None)
        else:
            os.environ["TORCH_MLA_SPARSE_PREFILL_FWD_VARIANT"] = saved
        importlib.reload(mod)
    assert seen["none"] is None
    assert seen["default"] == seen[""] == mod.FWD_VARIANT_DEFAULT
    assert seen['{"tau": 8.0}'] == {"tau": 8.0}


@pytest.mark.parametrize("variant", [
    pytest.param("default", id="default_split_n64_sum"),
    pytest.param(None, id="fwd_kernel"),
    pytest.param({"block_n": 64, "num_stages": 1}, id="split_n64_s1"),
])
@pytest.mark.parametrize("d_qk", [576, 512])
def test_forward_big_head_block(monkeypatch, variant, d_qk):
    # 64 heads on one kv head over d_v 512: the "big" launch configuration (the variant's
    # block_n, 8 warps), which the small shapes of the other tests never reach; topk 150 leaves
    # a partial last block of 64 and of 32.
    from torch_mla.triton import sparse_prefill as mod
    if variant != "default":
        monkeypatch.setattr(mod, "FWD_VARIANT", variant)
    assert mod._blocks(torch.empty(1, 64, d_qk), torch.empty(1, 1, d_qk), 512)[-1] == "big"
    args = make_case(2, 64, 64, 1, d_qk, 512, 150, sink="inf", use_len=True)
    got, exp = forward_both(args)
    check_forward(got, exp, torch.bfloat16)


@pytest.mark.parametrize("variant", FWD_VARIANTS)
@pytest.mark.parametrize("shape", [
    # s_q, s_kv, h_q, h_kv, d_qk, d_v, topk, dtype, sink, use_len
    pytest.param((4, 40, 16, 1, 48, 32, 70, torch.bfloat16, "inf", True), id="tail_topk_inf_sink"),
    pytest.param((3, 30, 24, 1, 32, 24, 40, torch.float16, "finite", True), id="padded_h24_fp16"),
    pytest.param((3, 64, 16, 1, 576, 512, 80, torch.bfloat16, "inf", True), id="d576_v512"),
])
def test_forward_variants_match_reference(monkeypatch, variant, shape):
    from torch_mla.triton import sparse_prefill as mod
    monkeypatch.setattr(mod, "FWD_VARIANT", variant)
    s_q, s_kv, h_q, h_kv, d_qk, d_v, topk, dtype, sink, use_len = shape
    args = make_case(s_q, s_kv, h_q, h_kv, d_qk, d_v, topk, dtype=dtype, sink=sink,
                     use_len=use_len)
    got, exp = forward_both(args)
    check_forward(got, exp, dtype)


def test_forward_variant_big_scores_lazy_rescale(monkeypatch):
    # Lazy rescaling keeps a stale shift while the max grows by <= tau: logits spread over a
    # wide range (scaled q) make both the kept and the moved shift happen; max_logits must still
    # be the true max.
    from torch_mla.triton import sparse_prefill as mod
    monkeypatch.setattr(mod, "FWD_VARIANT", {"tau": 4.0})
    q, kv, idx, scale, d_v, sink, lens = make_case(3, 50, 16, 1, 48, 32, 96, sink="finite",
                                                   use_len=True)
    q = (q.float() * 6).to(q.dtype)
    got, exp = forward_both((q, kv, idx, scale, d_v, sink, lens))
    check_forward(got, exp, torch.bfloat16)


@pytest.mark.parametrize("how", ["negative", "out_of_range", "zero_length"])
@pytest.mark.parametrize("sink", [None, "inf"])
@pytest.mark.parametrize("variant", ["default", None, {}, {"tau": 8.0}],
                         ids=["default", "fwd_kernel", "split", "split_lazy"])
def test_all_invalid(monkeypatch, how, sink, variant):
    from torch_mla.triton import sparse_prefill as mod
    if variant != "default":
        monkeypatch.setattr(mod, "FWD_VARIANT", variant)
    s_q, s_kv, h_q, h_kv, d_qk, d_v, topk = 3, 10, 16, 2, 32, 16, 20
    q = torch.randn(s_q, h_q, d_qk, dtype=torch.bfloat16)
    kv = torch.full((s_kv, h_kv, d_qk), float("nan"), dtype=torch.bfloat16)  # nothing may be read
    topk_length = None
    if how == "negative":
        idx = -torch.randint(1, 100, (s_q, h_kv, topk), dtype=torch.int32)
    elif how == "out_of_range":
        idx = torch.randint(s_kv, 2**31 - 1, (s_q, h_kv, topk), dtype=torch.int32)
    else:
        idx = torch.randint(0, s_kv, (s_q, h_kv, topk), dtype=torch.int32)
        topk_length = torch.tensor([0, -3, 0], dtype=torch.int32)
    attn_sink = None if sink is None else torch.tensor([INF, -INF] * 8)
    with torch_mla.use_backend("triton"):
        out, ml, lse = torch.ops.mla.sparse_prefill(q, kv, idx, 0.2, d_v, attn_sink, topk_length)
        assert torch.equal(out, torch.zeros(s_q, h_q, d_v, dtype=q.dtype))
        assert (ml == -INF).all() and (lse == INF).all()
        # dlse of empty queries is dropped, even when it is NaN or inf
        dlse = torch.full((s_q, h_q), float("nan"))
        dlse[0] = INF
        dq, dkv, dsink = torch.ops.mla.sparse_prefill_backward(
            torch.randn(s_q, h_q, d_v, dtype=q.dtype), dlse, q, kv, idx, out, lse, 0.2, d_v,
            attn_sink, topk_length)
    assert torch.equal(dq, torch.zeros_like(q)) and torch.equal(dkv, torch.zeros_like(kv))
    assert torch.equal(dsink, torch.zeros(h_q))


def test_empty_shapes():
    q = torch.randn(2, 16, 32, dtype=torch.bfloat16)
    idx = torch.zeros(2, 1, 3, dtype=torch.int32)
    kv0 = torch.randn(0, 1, 32).bfloat16()
    kv5 = torch.randn(5, 1, 32).bfloat16()
    with torch_mla.use_backend("triton"):
        out, ml, lse = torch.ops.mla.sparse_prefill(q, kv0, idx, 0.2, 16)
        assert (out == 0).all() and (ml == -INF).all() and (lse == INF).all()
        out, ml, lse = torch.ops.mla.sparse_prefill(q, kv5, idx[..., :0], 0.2, 16)
        assert (out == 0).all() and (ml == -INF).all() and (lse == INF).all()
        out, ml, lse = torch.ops.mla.sparse_prefill(q[:0], kv5, idx[:0], 0.2, 16)
        assert out.shape == (0, 16, 16)


# ----------------------------------------------------------------------------- independent formula

def formula(q, kv, indices, scale, d_v, sink, topk_length):
    """(out, lse) in float64 by a per-(query, head) loop over the valid entries; differentiable."""
    s_q, h_q, _ = q.shape
    s_kv, h_kv, _ = kv.shape
    g = h_q // h_kv
    outs, lses = [], []
    for i in range(s_q):
        n = indices.shape[-1]
        if topk_length is not None:
            n = max(0, min(int(topk_length[i]), n))
        o_i, l_i = [], []
        for h in range(h_q):
            rows = [int(j) for j in indices[i, h // g, :n] if 0 <= int(j) < s_kv]
            if not rows:
                o_i.append(torch.zeros(d_v, dtype=torch.float64))
                l_i.append(torch.tensor(INF, dtype=torch.float64))
                continue
            k = kv[rows, h // g].double()
            logits = scale * (k @ q[i, h].double())
            lse = torch.logsumexp(logits, 0)
            o = torch.softmax(logits, 0) @ k[:, :d_v]
            if sink is not None:
                o = o * torch.sigmoid(lse - sink[h].double())
            o_i.append(o)
            l_i.append(lse)
        outs.append(torch.stack(o_i))
        lses.append(torch.stack(l_i))
    return torch.stack(outs), torch.stack(lses)


def test_against_float64_formula_with_autograd():
    s_q, s_kv, h_q, h_kv, d_qk, d_v, topk = 3, 24, 16, 1, 48, 32, 40
    q, kv, idx, scale, _, sink, lens = make_case(s_q, s_kv, h_q, h_kv, d_qk, d_v, topk,
                                                 sink="finite", use_len=True)
    kv = torch.nan_to_num(kv)  # the formula multiplies whole rows; NaN-free rows keep it simple
    qd, kvd, sd = (t.double().requires_grad_(True) for t in (q, kv, sink))
    e_out, e_lse = formula(qd, kvd, idx, scale, d_v, sd, lens)
    fin = torch.isfinite(e_lse)
    w_out = torch.randn(e_out.shape, dtype=torch.float64)
    w_lse = torch.randn(e_lse.shape, dtype=torch.float64)
    ((e_out * w_out).sum() + (torch.where(fin, e_lse, 0) * w_lse).sum()).backward()

    qt, kvt, st = (t.clone().requires_grad_(True) for t in (q, kv, sink))
    with torch_mla.use_backend("triton"):
        out, _, lse = torch_mla.sparse_prefill(qt, kvt, idx, scale, d_v, st, lens)
        loss = (out.double() * w_out).sum() + (torch.where(fin, lse.double(), 0) * w_lse).sum()
        loss.backward()
    assert torch.equal(torch.isinf(lse), ~fin)
    torch.testing.assert_close(lse[fin].double(), e_lse[fin].detach(), rtol=1e-5, atol=1e-5)
    assert rel(out, e_out.detach()) < 1e-2
    assert rel(qt.grad, qd.grad) < 2e-2
    assert rel(kvt.grad, kvd.grad) < 2e-2
    torch.testing.assert_close(st.grad.double(), sd.grad, rtol=2e-2,
                               atol=2e-2 * sd.grad.abs().max().item())


# ----------------------------------------------------------------------------- what it refuses

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_refuses_wide_dtypes_with_a_reason(dtype):
    q = torch.randn(2, 16, 32, dtype=dtype)
    kv = torch.randn(5, 1, 32, dtype=dtype)
    idx = torch.zeros(2, 1, 4, dtype=torch.int32)
    from torch_mla.triton import sparse_prefill as mod
    reasons = mod.supports(q, kv, idx, 0.2, 16)
    assert reasons and "bf16 or fp16" in reasons[0]
    assert str(dtype).replace("torch.", "") in reasons[0]
    with torch_mla.use_backend("triton"):
        text = torch_mla.explain("sparse_prefill", q, kv, idx, 0.2, 16)
        assert "bf16 or fp16" in text
        with pytest.raises(RuntimeError, match="bf16 or fp16"):
            torch_mla.sparse_prefill(q, kv, idx, 0.2, 16)
    # the bf16 version of the same call is accepted
    assert mod.supports(q.bfloat16(), kv.bfloat16(), idx, 0.2, 16) == []


def test_refuses_oversized_dims():
    from torch_mla.triton import sparse_prefill as mod
    q = torch.empty(1, 16, 1024 + 64, dtype=torch.bfloat16)
    assert any("d_v 1024" in r for r in mod.supports(q, q, None, 0.1, 1024))
    q = torch.empty(1, 16, 512 + 256, dtype=torch.bfloat16)
    assert any("d_qk - d_v = 256" in r for r in mod.supports(q, q, None, 0.1, 512))


@pytest.fixture
def deterministic_mode():
    def set_mode(warn_only):
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
    yield set_mode
    torch.use_deterministic_algorithms(False)


def test_deterministic_mode_refuses_the_atomic_backward(deterministic_mode):
    # dkv sums with atomics: like PyTorch's own nondeterministic ops, raise under
    # torch.use_deterministic_algorithms(True), warn with warn_only; the reference is exact
    args = make_case(2, 30, 16, 1, 32, 16, 24, sink="finite", use_len=True)
    got, exp = forward_both(args)
    deterministic_mode(False)
    with pytest.raises(RuntimeError, match="use_deterministic_algorithms"):
        backward_both(args, got, exp)
    deterministic_mode(True)
    with pytest.warns(UserWarning, match="not bitwise reproducible"):
        g, e = backward_both(args, got, exp)
    check_backward(g, e, args)
