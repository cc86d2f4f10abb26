"""Which Triton sparse_prefill launch faults on the GPU, and where: each variant runs in its own
process (a fault leaves a sticky CUDA error), synchronised after the call, then compared with the
reference. `--sanitize` runs one variant at a reduced shape under compute-sanitizer memcheck.

    python tools/diag_sparse_prefill.py                 # all variants, one process each
    python tools/diag_sparse_prefill.py --variant bwd   # one, in this process
"""

import argparse
import os
import subprocess
import sys

# Backward candidates that compile within shared memory under Triton 3.6 (tools/
# triton_compile_check.py), each with every setting it depends on, so that a name means the same
# configuration whatever the module's defaults; "bwd" / "default" are the module's defaults.
def _ds(n, w, s):  # first phase (fused mode: the kernel): (BLOCK_N, num_warps, num_stages)
    return {"big": (n, w, s), "small": (16, 4, 1)}


def _dkv(n, dc, w, s):  # second phase: (BLOCK_N keys, DC columns, num_warps, num_stages)
    return {"big": (n, dc, w, s), "small": (16, 64, 4, 1)}


_FUSED = {"BWD_MODE": "fused", "BWD_MAX_BLOCK_H": 32, "BWD_DK_TRANSPOSED": False,
          "BWD_PREFETCH_IDX": False, "BWD_ATOMIC_SEM": "relaxed", "BWD_CONFIG": _ds(32, 8, 2)}
# two phases, dq formed by the first (64 heads a program)
_DQ1 = {"BWD_MODE": "two_phase", "BWD_DQ_IN_PHASE2": False, "BWD_DS_PREFETCH_IDX": False,
        "BWD_ATOMIC_SEM": "relaxed", "BWD_DS_MAX_BLOCK_H": 64, "BWD_DS_CONFIG": _ds(32, 8, 1),
        "BWD_DKV_CONFIG": _dkv(64, 64, 4, 2)}
# two phases, dq formed by the second: the module's default (c79f1d1)
_DQ2 = {**_DQ1, "BWD_DQ_IN_PHASE2": True, "BWD_DS_PREFETCH_IDX": True,
        "BWD_DS_CONFIG": _ds(64, 4, 1), "BWD_DKV_CONFIG": _dkv(64, 128, 8, 2)}
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
    a = ap.parse_args()
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
