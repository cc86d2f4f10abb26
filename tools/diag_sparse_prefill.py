"""Which Triton sparse_prefill launch faults on the GPU, and where: each variant runs in its own
process (a fault leaves a sticky CUDA error), synchronised after the call, then compared with the
reference. `--sanitize` runs one variant at a reduced shape under compute-sanitizer memcheck.

    python tools/diag_sparse_prefill.py                 # all variants, one process each
    python tools/diag_sparse_prefill.py --variant bwd   # one, in this process
    python tools/diag_sparse_prefill.py --time-fwd      # forward candidates: check, then time
    python tools/diag_sparse_prefill.py --time-fwd fwd_kernel split_n64_sum --dims 576
    TRITON_INTERPRET=1 python tools/diag_sparse_prefill.py --time-fwd --dry   # CPU, tiny shapes
    python tools/diag_sparse_prefill.py --time-bwd      # backward candidates: check, then time
    python tools/diag_sparse_prefill.py --time-bwd dq2 p2split --s-kv 32768
    TRITON_INTERPRET=1 python tools/diag_sparse_prefill.py --time-bwd --dry   # CPU, tiny shapes

--time-fwd: for each FWD_CANDIDATES entry (sparse_prefill.FWD_VARIANT), in one process, at the
benchmark's shape (s_q 4096, h_q 128, h_kv 1, d_v 512, topk 2048, s_kv 32768 or $DIAG_S_KV, one
randperm row set per query, no sink / lengths), d_qk 576 and 512: the output and lse of the
timed launch's first --check-sq queries against the reference backend, a corner case (s_q 64,
sink with +-inf, topk_length, invalid and duplicated indices) against the reference, then the
median of triton.testing.do_bench; then FlashMLA's flash_mla_sparse_fwd on the same inputs where
``import flash_mla`` works. One process per d_qk; a CUDA fault (sticky) ends it, and the
candidates after the faulting one go on in a fresh one.

--time-bwd: for each named BWD_CANDIDATES entry (default BWD_TIME_DEFAULT: the module's default
"dq2" first, then the split-dot candidates), one process per --s-kv (32768, then 8192), at the
benchmark's shape (s_q 4096, h_q 128, h_kv 1, d_qk 576, d_v 512, topk 2048, one randperm row
set per query, dlse 0, no sink / lengths; out / lse from the module's forward): a reduced check
against the reference backend (the first --bwd-check-sq queries, 64, of the same q and kv, with a
sink holding +-inf, topk_length below 0 / past topk, invalid and duplicated indices, a query with
nothing valid, random dlse: dq / dkv / dsink relative errors < 2e-2), the full-shape dq and dkv
against the first candidate's (< 1e-2), then the do_bench median of the whole backward and of
its first phase alone (the second phase's launches skipped). Candidates left when --budget
seconds (200) have passed are skipped (and no new --s-kv process starts with under 40 s left),
so that one GPU command stays under 4 minutes. With --dry (TRITON_INTERPRET=1, CPU) the shapes
are tiny (s_q 4, h_q 64, topk 128, s_kv 256 whatever --s-kv says) and each time is one call.
"""

import argparse
import os
import subprocess
import sys
import time

# Backward candidates that compile within shared memory under Triton 3.6 (tools/
# triton_compile_check.py), each with every setting it depends on, so that a name means the same
# configuration whatever the module's defaults; "bwd" / "default" are the module's defaults.
def _ds(n, w, s):  # first phase (fused mode: the kernel): (BLOCK_N, num_warps, num_stages)
    return {"big": (n, w, s), "small": (16, 4, 1)}


def _dkv(n, dc, w, s):  # second phase: (BLOCK_N keys, DC columns, num_warps, num_stages)
    return {"big": (n, dc, w, s), "small": (16, 64, 4, 1)}


# switches added after the timings of 2026-11-25 (off in every candidate that predates them)
_NEW_OFF = {"BWD_DS_SPLIT": False, "BWD_DKV_SPLIT": False, "BWD_DKV_PREFETCH_IDX": False}
_FUSED = {"BWD_MODE": "fused", "BWD_MAX_BLOCK_H": 32, "BWD_DK_TRANSPOSED": False,
          "BWD_PREFETCH_IDX": False, "BWD_ATOMIC_SEM": "relaxed", "BWD_CONFIG": _ds(32, 8, 2),
          **_NEW_OFF}
# two phases, dq formed by the first (64 heads a program)
_DQ1 = {"BWD_MODE": "two_phase", "BWD_DQ_IN_PHASE2": False, "BWD_DS_PREFETCH_IDX": False,
        "BWD_ATOMIC_SEM": "relaxed", "BWD_DS_MAX_BLOCK_H": 64, "BWD_DS_CONFIG": _ds(32, 8, 1),
        "BWD_DKV_CONFIG": _dkv(64, 64, 4, 2), "BWD_SCRATCH_BYTES": 512 << 20, **_NEW_OFF}
# two phases, dq formed by the second: the module's default from c79f1d1 until p2split_pf
_DQ2 = {**_DQ1, "BWD_DQ_IN_PHASE2": True, "BWD_DS_PREFETCH_IDX": True,
        "BWD_DS_CONFIG": _ds(64, 4, 1), "BWD_DKV_CONFIG": _dkv(64, 128, 8, 2)}
# the split dots (sparse_prefill.BWD_DS_SPLIT / BWD_DKV_SPLIT) on top of the default
_P2 = {**_DQ2, "BWD_DKV_SPLIT": True}
_P1 = {**_DQ2, "BWD_DS_SPLIT": True, "BWD_DS_CONFIG": _ds(64, 8, 1)}
_BOTH = {**_P1, "BWD_DKV_SPLIT": True, "BWD_DKV_PREFETCH_IDX": True}
BWD_CANDIDATES = {
    "fused_n32_s2": _FUSED,
    "fused_n32_s2_acqrel": {**_FUSED, "BWD_ATOMIC_SEM": "acq_rel"},
    "dq1": _DQ1,
    "dq1_acqrel": {**_DQ1, "BWD_ATOMIC_SEM": "acq_rel"},
    "dq1_ds_n64": {**_DQ1, "BWD_DS_CONFIG": _ds(64, 8, 1)},
    "dq1_ds_s2": {**_DQ1, "BWD_DS_CONFIG": _ds(32, 8, 2)},
    "dq1_ds_prefetch": {**_DQ1, "BWD_DS_PREFETCH_IDX": True},
    "dq1_dc128_w4": {**_DQ1, "BWD_DKV_CONFIG": _dkv(64, 128, 4, 2)},
    "dq1_dc256_w8": {**_DQ1, "BWD_DKV_CONFIG": _dkv(64, 256, 8, 1)},
    "dq2": _DQ2,
    "dq2_no_prefetch": {**_DQ2, "BWD_DS_PREFETCH_IDX": False},
    "dq2_dc64_w4": {**_DQ2, "BWD_DS_PREFETCH_IDX": False, "BWD_DKV_CONFIG": _dkv(64, 64, 4, 2)},
    "dq2_ds_w8": {**_DQ2, "BWD_DS_PREFETCH_IDX": False, "BWD_DS_CONFIG": _ds(64, 8, 1),
                  "BWD_DKV_CONFIG": _dkv(64, 64, 4, 2)},
    "dq2_n32": {**_DQ2, "BWD_DS_PREFETCH_IDX": False, "BWD_DKV_CONFIG": _dkv(32, 128, 8, 2)},
    "dq2_n128": {**_DQ2, "BWD_DS_PREFETCH_IDX": False, "BWD_DKV_CONFIG": _dkv(128, 128, 8, 1)},
    "dq2_s1": {**_DQ2, "BWD_DS_PREFETCH_IDX": False, "BWD_DKV_CONFIG": _dkv(64, 128, 8, 1)},
    # untimed (2026-11-25 on): the split dots
    "p2split": _P2,
    "p2split_pf": {**_P2, "BWD_DKV_PREFETCH_IDX": True},
    "p1split_w8": _P1,
    "split_both": _BOTH,
    "split_both_p1n32s2": {**_BOTH, "BWD_DS_CONFIG": _ds(32, 8, 2)},
    "split_both_p2s1": {**_BOTH, "BWD_DKV_CONFIG": _dkv(64, 128, 8, 1)},
    # (2026-11-25, after p2split_pf's 199.7 TFLOPS at s_kv 32768) its second phase's tiles
    "p2pf_dc256_s1": {**_P2, "BWD_DKV_PREFETCH_IDX": True, "BWD_DKV_CONFIG": _dkv(64, 256, 8, 1)},
    "p2pf_n32": {**_P2, "BWD_DKV_PREFETCH_IDX": True, "BWD_DKV_CONFIG": _dkv(32, 128, 8, 2)},
    "p2pf_n128_s1": {**_P2, "BWD_DKV_PREFETCH_IDX": True, "BWD_DKV_CONFIG": _dkv(128, 128, 8, 1)},
    "p2pf_dc64_w4": {**_P2, "BWD_DKV_PREFETCH_IDX": True, "BWD_DKV_CONFIG": _dkv(64, 64, 4, 2)},
}
# what --time-bwd checks and times when given no names: the default and the new candidates
BWD_TIME_DEFAULT = ["dq2", "p2split", "p2split_pf", "p1split_w8", "split_both",
                    "split_both_p1n32s2", "split_both_p2s1"]


# Forward candidates: settings of sparse_prefill.FWD_VARIANT (None: the first kernel,
# _fwd_kernel; a dict: the split-scores kernel, its keys over FWD_SPLIT_DEFAULTS;
# "split_n64_sum" is the module's default, FWD_VARIANT_DEFAULT). Compile figures per candidate:
# tools/triton_compile_check.py --only prefill --prefill-fwd all --dots
FWD_CANDIDATES = {
    "fwd_kernel": None,
    "split": {},
    "split_sum": {"defer_sum": False},
    "split_onev": {"split_v": False},
    "split_s3": {"num_stages": 3},
    "split_n64_s1": {"block_n": 64, "num_stages": 1},
    "split_n64_s2": {"block_n": 64, "num_stages": 2},
    "split_n64_onev": {"block_n": 64, "split_v": False},
    "split_n64_sum": {"block_n": 64, "defer_sum": False},
    "split_lazy": {"tau": 8.0},
    "split_n64_lazy": {"block_n": 64, "tau": 8.0},
    "fromzero_chained": {"split_s": False},
}


class _NoLaunch:
    """Stands in for a kernel: [grid](...) launches nothing (times the other phase alone)."""

    def __getitem__(self, grid):
        return lambda *a, **k: None


VARIANTS = {
    # name: (forward?, module settings)
    "fwd": (True, {}),
    "fwd_noprefetch": (True, {"PREFETCH_IDX": False}),
    "bwd": (False, {}),
    "bwd_nosink_nolen": (False, {}),
    "bwd_not_transposed_small": (False, {"BWD_DK_TRANSPOSED": False}),
}
VARIANTS.update({f"bwd_{k}": (False, v) for k, v in BWD_CANDIDATES.items()})


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _bench(fn, dry, warmup, rep):
    """Median ms of fn: triton.testing.do_bench on the GPU, one timed call under --dry."""
    if dry:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def _problem(s_q, h_q, d_qk, s_kv, topk, dev):
    """The benchmark's inputs (seed 0): q, kv (one kv head) and one randperm row set per query."""
    import torch
    torch.manual_seed(0)
    q = torch.randn(s_q, h_q, d_qk, device=dev).bfloat16()
    kv = torch.randn(s_kv, 1, d_qk, device=dev).bfloat16()
    idx = torch.argsort(torch.rand(s_q, s_kv, device=dev), dim=1)[:, :topk]
    return q, kv, idx.int().view(s_q, 1, topk).contiguous()


def _corner(idx, h_q, s_kv, topk, dev):
    """(indices, sink, lengths) of the corner case over idx's queries: ~10% of the indices
    invalid (-1 or past s_kv), columns 1 and 7 duplicating column 0, query 0 with nothing valid,
    sinks +inf / -inf on the first / last head, lengths negative and past topk on the last two
    queries (query 1 keeps a random length when there are more than three)."""
    import torch
    n = idx.shape[0]
    cidx = idx.clone()
    bad = torch.rand(cidx.shape, device=dev) < 0.1
    cidx = torch.where(bad, torch.where(torch.rand(cidx.shape, device=dev) < 0.5,
                                        torch.full_like(cidx, -1),
                                        torch.full_like(cidx, s_kv + 5)), cidx)
    cidx[:, :, 1] = cidx[:, :, 0]
    cidx[:, :, 7] = cidx[:, :, 0]
    cidx[0] = -1
    sink = torch.randn(h_q, device=dev)
    sink[0], sink[-1] = float("inf"), float("-inf")
    lens = torch.randint(0, topk + 1, (n,), device=dev, dtype=torch.int32)
    if n >= 3:
        lens[n - 2], lens[n - 1] = -3, topk + 7
    return cidx, sink, lens


def _failure(e, dry):
    """(the exception in one line, whether this process must stop: a CUDA fault leaves a sticky
    error, so the caller restarts the candidates left in a fresh process)"""
    text = str(e).strip()
    msg = f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}"
    return msg, not dry and ("CUDA" in msg or "illegal" in msg or "cuda" in msg)


def time_forward(names, d_qk, check_sq, dry, flashmla=True):
    """See the module docstring (--time-fwd); one d_qk. Returns the names not run (after a CUDA
    fault)."""
    import torch
    import torch_mla
    from torch_mla.triton import sparse_prefill as sp

    dev = "cpu" if dry else "cuda"
    if dry:  # the interpreter: tiny shapes, one timed call
        s_q, h_q, d_v, topk, s_kv, check_sq = 4, 64, 512, 64, 256, min(check_sq, 2)
    else:
        s_q, h_q, d_v, topk = 4096, 128, 512, 2048
        s_kv = int(os.environ.get("DIAG_S_KV", 32768))
    cs = 64 if not dry else 3
    print(f"forward d_qk {d_qk}, s_q {s_q} h_q {h_q} h_kv 1 d_v {d_v} topk {topk} s_kv {s_kv}; "
          f"check: first {check_sq} queries vs reference + corner case (s_q {cs}, sink, "
          "lengths)", flush=True)
    flash_mla = None
    if flashmla:
        try:
            import flash_mla
        except Exception as e:  # noqa: BLE001 - timed only where the peer imports
            print(f"flash_mla not importable ({type(e).__name__}: {e})", flush=True)

    def bench(fn):
        return _bench(fn, dry, 25, 150)

    todo = list(names)
    q, kv, idx = _problem(s_q, h_q, d_qk, s_kv, topk, dev)
    scale = d_qk ** -0.5
    args = (q, kv, idx, scale, d_v, None, None)
    with torch_mla.use_backend("reference"):
        ref = torch.ops.mla.sparse_prefill(q[:check_sq], kv, idx[:check_sq], scale, d_v,
                                           None, None)
    # the corner case (see _corner), on fresh queries
    cq = torch.randn(cs, h_q, d_qk, device=dev).bfloat16()
    cidx, sink, lens = _corner(idx[:cs], h_q, s_kv, topk, dev)
    cargs = (cq, kv, cidx, scale, d_v, sink, lens)
    with torch_mla.use_backend("reference"):
        cref = torch.ops.mla.sparse_prefill(*cargs)
    flops = 2 * s_q * h_q * topk * (d_qk + d_v)
    saved_variant = sp.FWD_VARIANT
    while todo:
        name = todo.pop(0)
        sp.FWD_VARIANT = None if FWD_CANDIDATES[name] is None else dict(FWD_CANDIDATES[name])
        try:
            with torch_mla.use_backend("triton"):
                out, ml, lse = torch.ops.mla.sparse_prefill(*args)
                if not dry:
                    torch.cuda.synchronize()
                err = _rel(out[:check_sq], ref[0])
                fin = torch.isfinite(ref[2])
                dlse = (lse[:check_sq][fin] - ref[2][fin]).abs().max().item()
                dml = (ml[:check_sq][fin] - ref[1][fin]).abs().max().item()
                c = torch.ops.mla.sparse_prefill(*cargs)
                cfin = torch.isfinite(cref[2])
                cerr = _rel(c[0], cref[0])
                cok = (torch.equal(c[2] == float("inf"), cref[2] == float("inf"))
                       and torch.equal(c[1] == float("-inf"), cref[1] == float("-inf"))
                       and torch.isfinite(c[0]).all().item()
                       and (c[2][cfin] - cref[2][cfin]).abs().max().item() < 1e-3
                       and (c[1][cfin] - cref[1][cfin]).abs().max().item() < 1e-3)
                ok = err < 2e-2 and dlse < 1e-3 and dml < 1e-3 and cerr < 2e-2 and cok
                ms = bench(lambda: torch.ops.mla.sparse_prefill(*args))
            print(f"fwd d_qk {d_qk} {name:<16} {'OK  ' if ok else 'BAD '} out rel {err:.1e} "
                  f"lse {dlse:.1e} ml {dml:.1e} corner {cerr:.1e}{'' if cok else ' (stats!)'}"
                  f" | {ms * 1e3:9.1f} us {flops / ms / 1e9:6.1f} TFLOPS", flush=True)
        except Exception as e:  # noqa: BLE001 - report, go on (or restart after a fault)
            msg, fault = _failure(e, dry)
            print(f"fwd d_qk {d_qk} {name:<16} FAIL {msg}", flush=True)
            if fault:
                return todo
    sp.FWD_VARIANT = saved_variant
    if flash_mla is not None:
        try:
            fn = lambda: flash_mla.flash_mla_sparse_fwd(q, kv, idx, scale, d_v)
            fo = fn()
            err = _rel(fo[0][:check_sq], ref[0])
            ms = bench(fn)
            print(f"fwd d_qk {d_qk} {'FlashMLA':<16} out rel {err:.1e} | {ms * 1e3:9.1f} us "
                  f"{flops / ms / 1e9:6.1f} TFLOPS", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"fwd d_qk {d_qk} FlashMLA FAIL {type(e).__name__}: {e}", flush=True)
    return []


def _apply(sp, settings, saved):
    """Module settings of one backward candidate, over the module's own values (saved)."""
    for k, v in saved.items():
        setattr(sp, k, v)
    for k, v in settings.items():
        setattr(sp, k, v)


def time_backward_candidates(names, s_kv, check_sq, dry, deadline):
    """See the module docstring (--time-bwd); one s_kv. Returns the names not run (after a CUDA
    fault)."""

    import torch
    import torch_mla
    from torch_mla.triton import sparse_prefill as sp

    dev = "cpu" if dry else "cuda"
    if dry:  # the interpreter: tiny shapes (64 heads over d_v 512: the "big" configurations)
        s_q, h_q, d_qk, d_v, topk, s_kv, check_sq = 4, 64, 576, 512, 128, 256, 4
    else:
        s_q, h_q, d_qk, d_v, topk = 4096, 128, 576, 512, 2048
    print(f"backward s_q {s_q} h_q {h_q} h_kv 1 d_qk {d_qk} d_v {d_v} topk {topk} s_kv {s_kv} "
          f"(dlse 0, no sink / lengths); check: s_q {check_sq} with sink, lengths, invalid and "
          "duplicated indices, random dlse vs the reference; full shape vs the first candidate",
          flush=True)

    def bench(fn):
        return _bench(fn, dry, 50, 300)

    def sync():
        if not dry:
            torch.cuda.synchronize()

    keys = sorted({k for v in BWD_CANDIDATES.values() for k in v})
    saved = {k: getattr(sp, k) for k in keys}
    dkv_kernel = sp._bwd_dkv_kernel
    q, kv, idx = _problem(s_q, h_q, d_qk, s_kv, topk, dev)
    scale = d_qk ** -0.5
    with torch_mla.use_backend("triton"):
        out, _, lse = torch.ops.mla.sparse_prefill(q, kv, idx, scale, d_v, None, None)
    dout, dlse = torch.randn_like(out), torch.zeros_like(lse)
    bargs = (dout, dlse, q, kv, idx, out, lse, scale, d_v, None, None)
    # the reduced check: the corner case (see _corner) on the first queries, random dlse
    cq = q[:check_sq].clone()
    cidx, sink, lens = _corner(idx[:check_sq], h_q, s_kv, topk, dev)
    with torch_mla.use_backend("reference"):
        cout, _, clse = torch.ops.mla.sparse_prefill(cq, kv, cidx, scale, d_v, sink, lens)
        cdout = torch.randn_like(cout)
        cdlse = torch.randn_like(clse)
        cargs = (cdout, cdlse, cq, kv, cidx, cout, clse, scale, d_v, sink, lens)
        cref = torch.ops.mla.sparse_prefill_backward(*cargs)
    sync()
    flops = 2.5 * 2 * s_q * h_q * topk * (d_qk + d_v)
    base = None  # (name, dq, dkv) of the first candidate at the full shape
    todo = list(names)
    while todo:
        name = todo.pop(0)
        if time.time() > deadline:
            print(f"bwd s_kv {s_kv} {name:<20} skipped (time budget)", flush=True)
            continue
        _apply(sp, BWD_CANDIDATES[name], saved)
        try:
            with torch_mla.use_backend("triton"):
                g = torch.ops.mla.sparse_prefill_backward(*cargs)
                sync()
                errs = [_rel(a, b) for a, b in zip(g, cref)]
                fin = all(torch.isfinite(t).all().item() for t in g)
                ok = fin and max(errs) < 2e-2 and cref[0].norm().item() > 0
                full = torch.ops.mla.sparse_prefill_backward(*bargs)
                sync()
                vs = ""
                if base is None:
                    base = (name, full[0], full[1])
                else:
                    e_dq, e_dkv = _rel(full[0], base[1]), _rel(full[1], base[2])
                    ok = ok and e_dq < 1e-2 and e_dkv < 1e-2
                    vs = f" | full vs {base[0]}: dq {e_dq:.1e} dkv {e_dkv:.1e}"
                del full
                fn = lambda: torch.ops.mla.sparse_prefill_backward(*bargs)
                ms = bench(fn)
                ms1 = None
                if sp.BWD_MODE == "two_phase":
                    sp._bwd_dkv_kernel = _NoLaunch()
                    try:
                        ms1 = bench(fn)
                    finally:
                        sp._bwd_dkv_kernel = dkv_kernel
            p1 = f" (first phase {ms1:.2f} ms)" if ms1 is not None else ""
            print(f"bwd s_kv {s_kv} {name:<20} {'OK  ' if ok else 'BAD '} dq/dkv/dsink rel "
                  f"{errs[0]:.1e} {errs[1]:.1e} {errs[2]:.1e}{vs} | {ms:8.2f} ms "
                  f"{flops / ms / 1e9:6.1f} TFLOPS{p1}", flush=True)
        except Exception as e:  # noqa: BLE001 - report, go on (or restart after a fault)
            sp._bwd_dkv_kernel = dkv_kernel
            msg, fault = _failure(e, dry)
            print(f"bwd s_kv {s_kv} {name:<20} FAIL {msg}", flush=True)
            if fault:
                return todo
    _apply(sp, {}, saved)
    return []


def time_backward(settings_name):
    """Median time of the backward at the benchmark's shape (s_q 4096, s_kv 8192, h_q 128,
    d_qk 576, d_v 512, topk 2048, no sink / lengths), FLOPs counted as 2.5x the forward's."""
    import torch
    import triton.testing
    import torch_mla
    from torch_mla.triton import sparse_prefill as sp

    for k, v in BWD_CANDIDATES.get(settings_name, {}).items():
        setattr(sp, k, v)
    torch.manual_seed(0)
    s_q, h_q, d_qk, d_v, topk = 4096, 128, 576, 512, 2048
    s_kv = int(os.environ.get("DIAG_S_KV", 8192))  # the benchmark's shape: 32768
    q = torch.randn(s_q, h_q, d_qk, device="cuda").bfloat16()
    kv = torch.randn(s_kv, 1, d_qk, device="cuda").bfloat16()
    idx = torch.argsort(torch.rand(s_q, s_kv, device="cuda"), dim=1)[:, :topk].int().view(s_q, 1, topk)
    scale = d_qk ** -0.5
    with torch_mla.use_backend("triton"):
        out, _, lse = torch.ops.mla.sparse_prefill(q, kv, idx, scale, d_v, None, None)
        dout, dlse = torch.randn_like(out), torch.zeros_like(lse)
        fn = lambda: torch.ops.mla.sparse_prefill_backward(dout, dlse, q, kv, idx, out, lse,
                                                           scale, d_v, None, None)
        ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
        phase1 = ""
        if sp.BWD_MODE == "two_phase":
            sp._bwd_dkv_kernel = _NoLaunch()
            ms1 = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
            phase1 = f" (first phase alone {ms1:.2f} ms)"
    flops = 2.5 * 2 * s_q * h_q * topk * (d_qk + d_v)
    print(f"time {settings_name} (s_kv {s_kv}): {ms:.2f} ms = {flops / ms / 1e9:.1f} TFLOPS{phase1}", flush=True)


def run_one(name, small):
    import torch
    import torch_mla
    from torch_mla.triton import sparse_prefill as sp

    fwd, settings = VARIANTS[name]
    for k, v in settings.items():
        setattr(sp, k, v)
    torch.manual_seed(0)
    dev = "cuda"
    s_q, h_q, d_qk, d_v, s_kv, topk = (8, 64, 576, 512, 1024, 256) if small else (
        192, 128, 576, 512, 8192, 2048)
    if name == "bwd_not_transposed_small":
        h_q = 16
    q = torch.randn(s_q, h_q, d_qk, device=dev).bfloat16()
    kv = torch.randn(s_kv, 1, d_qk, device=dev).bfloat16()
    idx = torch.randint(0, s_kv, (s_q, 1, topk), device=dev, dtype=torch.int32)
    bad = torch.rand(idx.shape, device=dev) < 0.1
    idx = torch.where(bad, torch.where(torch.rand(idx.shape, device=dev) < 0.5,
                                       torch.full_like(idx, -1), torch.full_like(idx, s_kv + 5)),
                      idx)
    plain = name == "bwd_nosink_nolen"
    sink = None if plain else torch.randn(h_q, device=dev)
    lens = None if plain else torch.randint(0, topk + 1, (s_q,), device=dev, dtype=torch.int32)
    scale = d_qk ** -0.5
    args = (q, kv, idx, scale, d_v, sink, lens)
    with torch_mla.use_backend("reference"):
        exp = torch.ops.mla.sparse_prefill(*args)
    torch.cuda.synchronize()
    if fwd:
        with torch_mla.use_backend("triton"):
            got = torch.ops.mla.sparse_prefill(*args)
        torch.cuda.synchronize()
        err = ((got[0].float() - exp[0].float()).norm() / exp[0].float().norm()).item()
        print(f"{name}: OK, out rel err {err:.2e}", flush=True)
        return
    dout, dlse = torch.randn_like(exp[0]), torch.randn_like(exp[2])
    bargs = (dout, dlse, q, kv, idx, exp[0], exp[2], scale, d_v, sink, lens)
    with torch_mla.use_backend("reference"):
        gexp = torch.ops.mla.sparse_prefill_backward(*bargs)
    torch.cuda.synchronize()
    with torch_mla.use_backend("triton"):
        ggot = torch.ops.mla.sparse_prefill_backward(*bargs)
    torch.cuda.synchronize()
    errs = [((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
            for a, b in zip(ggot, gexp)]
    print(f"{name}: OK, dq/dkv/dsink rel err " + " ".join(f"{e:.2e}" for e in errs), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--time-one")
    ap.add_argument("--sanitize", help="variant to run under compute-sanitizer (reduced shape)")
    ap.add_argument("--time", nargs="*", help="time the backward: default and/or candidates")
    ap.add_argument("--time-fwd", nargs="*", help="check and time forward candidates "
                    "(FWD_CANDIDATES keys; default: all)")
    ap.add_argument("--dims", type=int, nargs="*", default=[576, 512], help="d_qk for --time-fwd")
    ap.add_argument("--check-sq", type=int, default=1024,
                    help="--time-fwd: queries compared with the reference")
    ap.add_argument("--dry", action="store_true", help="--time-fwd on the CPU at tiny shapes "
                    "(needs TRITON_INTERPRET=1): checks that the script runs")
    ap.add_argument("--time-bwd", nargs="*", help="check and time backward candidates "
                    "(BWD_CANDIDATES keys; default: BWD_TIME_DEFAULT)")
    ap.add_argument("--s-kv", type=int, nargs="*", default=[32768, 8192],
                    help="s_kv for --time-bwd (one process each, in this order)")
    ap.add_argument("--bwd-check-sq", type=int, default=64,
                    help="--time-bwd: queries of the reduced reference check")
    ap.add_argument("--budget", type=float, default=200,
                    help="--time-bwd: seconds after which the remaining candidates are skipped")
    ap.add_argument("--bwd-child", type=int, help=argparse.SUPPRESS)  # one s_kv, this process
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--fwd-child", type=int, help=argparse.SUPPRESS)  # one d_qk, this process
    ap.add_argument("--no-flashmla", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.time_fwd is not None:
        names = a.time_fwd or list(FWD_CANDIDATES)
        unknown = [n for n in names if n not in FWD_CANDIDATES]
        if unknown:
            ap.error(f"unknown forward candidates {unknown}; known: {list(FWD_CANDIDATES)}")
        if a.fwd_child is not None:
            left = time_forward(names, a.fwd_child, a.check_sq, a.dry, not a.no_flashmla)
            if left:
                print("FAULT-LEFT " + " ".join(left), flush=True)
                sys.exit(3)
            return
        for d_qk in a.dims:
            todo = names
            while todo:
                cmd = [sys.executable, __file__, "--time-fwd", *todo, "--fwd-child", str(d_qk),
                       "--check-sq", str(a.check_sq)] + (["--dry"] if a.dry else []) + \
                    (["--no-flashmla"] if a.no_flashmla else [])
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
                print((r.stdout + (r.stderr[-3000:] if r.returncode else "")).rstrip(),
                      flush=True)
                left = [ln for ln in r.stdout.splitlines() if ln.startswith("FAULT-LEFT")]
                todo = left[0].split()[1:] if r.returncode == 3 and left else []
                if todo:  # a CUDA fault: the rest (and FlashMLA) in a fresh process
                    print(f"restarting for {todo}", flush=True)
        return
    if a.time_bwd is not None:
        names = a.time_bwd or list(BWD_TIME_DEFAULT)
        unknown = [n for n in names if n not in BWD_CANDIDATES]
        if unknown:
            ap.error(f"unknown backward candidates {unknown}; known: {list(BWD_CANDIDATES)}")
        if a.bwd_child is not None:
            left = time_backward_candidates(names, a.bwd_child, a.bwd_check_sq, a.dry,
                                            a.deadline)
            if left:
                print("FAULT-LEFT " + " ".join(left), flush=True)
                sys.exit(3)
            return
        deadline = time.time() + a.budget
        for s_kv in a.s_kv:
            todo = names
            if deadline - time.time() < 40:
                print(f"s_kv {s_kv}: skipped (time budget)", flush=True)
                continue
            while todo:
                cmd = [sys.executable, __file__, "--time-bwd", *todo, "--bwd-child", str(s_kv),
                       "--bwd-check-sq", str(a.bwd_check_sq), "--deadline", str(deadline)] + \
                    (["--dry"] if a.dry else [])
                try:
                    r = subprocess.run(cmd, capture_output=True, text=True,
                                       timeout=max(10.0, deadline - time.time() + 30))
                except subprocess.TimeoutExpired as e:
                    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
                    print(out.rstrip() + f"\n(s_kv {s_kv}: timed out)", flush=True)
                    break
                print((r.stdout + (r.stderr[-3000:] if r.returncode else "")).rstrip(),
                      flush=True)
                left = [ln for ln in r.stdout.splitlines() if ln.startswith("FAULT-LEFT")]
                todo = left[0].split()[1:] if r.returncode == 3 and left else []
                if todo:  # a CUDA fault: the rest in a fresh process
                    print(f"restarting for {todo}", flush=True)
        return
    if a.time is not None:
        for name in a.time or ["default"] + list(BWD_CANDIDATES):
            r = subprocess.run([sys.executable, __file__, "--time-one", name],
                               capture_output=True, text=True, timeout=300)
            tail = (r.stdout + r.stderr).strip().splitlines()
            print(f"[rc {r.returncode}] " + (tail[-1] if tail else "(no output)"), flush=True)
        return
    if a.time_one:
        time_backward(a.time_one)
        return
    if a.variant:
        run_one(a.variant, a.small)
        return
    if a.sanitize:
        kern = "_fwd_kernel" if VARIANTS[a.sanitize][0] else "_bwd_"  # both backward kernels
        cmd = ["compute-sanitizer", "--tool", "memcheck", "--show-backtrace", "device",
               "--kernel-name", f"kns={kern}", "--print-limit", "5", sys.executable, __file__,
               "--variant", a.sanitize, "--small"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
        print((r.stdout + r.stderr)[-6000:], flush=True)
        return
    for name in VARIANTS:
        r = subprocess.run([sys.executable, __file__, "--variant", name], capture_output=True,
                           text=True, timeout=300, env=os.environ)
        tail = (r.stdout + r.stderr).strip().splitlines()
        print(f"[rc {r.returncode}] " + (tail[-1] if tail else "(no output)"), flush=True)
        if r.returncode:
            print("\n".join(tail[-6:]), flush=True)


if __name__ == "__main__":
    main()
