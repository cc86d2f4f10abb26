"""One device call's worth of measurements that pick settings (run on the GPU machine after
``source tests/gpu/device_env.sh``):

    python3 tools/gpu_tune.py topk        # indexer_topk variants against torch.topk
    python3 tools/gpu_tune.py host        # host time of one eager sparse_decode, and its profile
    python3 tools/gpu_tune.py sched       # sparse_decode time against the schedule's part count
    python3 tools/gpu_tune.py decode      # dense_decode split-kernel variants (~1.5 min)
    python3 tools/gpu_tune.py sparse      # sparse_decode main-kernel variants (< 100 s)

topk: rows 4096 x 32768 f32 randn, k 2048 (the bench's case); every variant is first checked
bit for bit against the reference on the same logits, then timed with CUDA-graph replay
(torch_mla.bench.timing), median. host: the bench's host_overhead case (one eager call, GPU idle
before each), per backend, with Triton's direct relaunch on and off, then a cProfile of 300
Triton calls (top 25 by cumulative time). decode: torch_mla.triton.dense_decode's split-kernel
variants (its VARIANT and COMBINE_CONFIG knobs; DECODE_VARIANTS='[{...}, ...]' in the environment
replaces the list, null meaning the gather kernel; DECODE_PROFILE=1 adds each variant's device
time per kernel) at the three production shapes of the target (paged bf16
cache, block 64, h_q 128, d_qk 576, d_v 512; the bench's inputs and its precomputed
decode_schedule(h_q=128, s_q=s_q)); every variant is first checked against the reference backend on four
batch elements (first, second, middle, last), then timed with CUDA-graph replay, median; FlashMLA
is timed alongside where its peer imports (PYTHONPATH=...$peer), else its published H100 figures
are the ratio's base. sparse: torch_mla.triton.sparse_decode's VARIANT knob (None: the chunked
kernel; a dict: the split-scores variant; SPARSE_VARIANTS='[null, {...}]' in the environment
replaces the list) on the bench's five sparse_decode rows (its inputs and precomputed
decode_schedule(h_q, s_q)), each variant first checked against the reference backend on two batch
elements (the first and the last), then timed with CUDA-graph replay, median; FlashMLA timed
alongside where it imports (PYTHONPATH=...$peer), else its README figures are the base.
"""

import cProfile
import io
import pstats
import sys

import torch

import torch_mla
from torch_mla.bench import timing


def _time(fn):
    secs, _ = timing.cuda_graph_time(fn, replays=20, target_s=5e-3)
    return secs * 1e6


def topk():
    import torch_mla.triton.indexer as ti

    g = torch.Generator(device="cuda").manual_seed(0)
    rows, s_k, k = 4096, 32768, 2048
    logits = torch.randn((rows, s_k), generator=g, device="cuda")
    with torch_mla.use_backend("reference"):
        want = torch_mla.indexer_topk(logits, k)
    print(f"torch.topk sorted   {_time(lambda: torch.topk(logits, k, dim=-1)):9.1f} us")
    print(f"torch.topk unsorted {_time(lambda: torch.topk(logits, k, dim=-1, sorted=False)):9.1f} us")
    knobs = ("TOPK_DIGIT_BITS", "TOPK_BLOCK", "TOPK_WARPS", "TOPK_HIST_CMP", "TOPK_FAST",
             "TOPK_SAMPLE_RANK", "TOPK_OVERSAMPLE", "TOPK_CAP_FACTOR", "TOPK_MAXNREG")
    base = dict({key: getattr(ti, key) for key in knobs}, _TOPK_SORT=True)
    # Prediction (a pass over the rows costs ~0.6 ms at this case on the H100, Triton 3.6;
    # the radix path takes 5 of them, 3.22 ms measured): the default fast path makes ONE pass
    # (a compaction with one cumsum per chunk, maybe cheaper than the radix path's with two),
    # plus the sample (1024 gathered keys, 4 tl.histogram steps over them, ~0.1 ms) and the
    # candidate sort (the top 2048 of 4096 int64: ~2.2x the 0.15 ms 2048-key sort, ~0.35 ms)
    # -> ~1.0-1.1 ms, under torch.topk's 1.95 ms. A beta-binomial model of iid rows gives the
    # rows that fall back (5 more passes each): default (S 1024, OVER 1.4) ~4e-4; RANK 32
    # (S 512) ~1.8 % (cheaper sample, more fallbacks); RANK 128 (S 2048) ~0 (sample costs 2x);
    # OVER 1.25 ~0.7 % (count < k), 1.6 ~1.8 % (count > CAP); CAP factor 4 never falls back
    # but sorts 8192 candidates (~2.3x the sort). MAXNREG 64: the default's 80 registers allow
    # 3 programs of 8 warps per SM, 64 allow 4 (no spills at this shape, compile check).
    # Expected fastest: the default or MAXNREG 64; TOPK_FAST False is the old radix path.
    variants = [
        {}, {"TOPK_SAMPLE_RANK": 32}, {"TOPK_SAMPLE_RANK": 128}, {"TOPK_OVERSAMPLE": 1.25},
        {"TOPK_OVERSAMPLE": 1.6}, {"TOPK_CAP_FACTOR": 4}, {"TOPK_MAXNREG": 64},
        {"TOPK_WARPS": 16}, {"TOPK_BLOCK": 1024}, {"TOPK_FAST": False},
    ]
    for v in variants:
        for key, val in dict(base, **v).items():
            setattr(ti, key, val)
        try:
            with torch_mla.use_backend("triton"):
                ti._topk_paths = []  # which rows took the fast path (this call only)
                got = torch_mla.indexer_topk(logits, k)
                torch.cuda.synchronize()
                fast_rows = int(ti._topk_paths[0].sum())
                ti._topk_paths = None
                if ti._TOPK_SORT:
                    ok = "exact" if torch.equal(got, want) else "WRONG"
                else:
                    ok = ("same set" if torch.equal(got.sort(-1).values, want.sort(-1).values)
                          else "WRONG")
                us = _time(lambda: torch_mla.indexer_topk(logits, k))
            print(f"triton {v or 'default'}: {us:9.1f} us  {ok}  fast-path rows "
                  f"{fast_rows}/{rows}", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on
            ti._topk_paths = None
            print(f"triton {v}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    for key, val in base.items():
        setattr(ti, key, val)


def host():
    import torch_mla.triton._common as tc
    from torch_mla.bench import cases

    case = next(c for c in cases.all_cases() if c.op == "host_overhead")
    built = cases.build(case, torch.device("cuda"))
    for direct in (True, False):
        tc.DIRECT_LAUNCH = direct
        for name, fn in built.calls.items():
            secs, _ = timing.host_overhead(fn, replays=300, sync=torch.cuda.synchronize)
            print(f"host {name:8s} direct={direct}: {secs * 1e6:7.1f} us", flush=True)
    tc.DIRECT_LAUNCH = True
    for name in ("native", "triton"):
        _profile(built.calls[name], name)


def _profile(fn, name):
    print(f"=== profile: {name}")
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(22)
    print(s.getvalue()[-4500:])


def sched():
    """sparse_decode (V32 b=64 s_q=2 h_q=128 topk=2048, the bench's first row) with no schedule
    (each backend's own part count) and with decode_schedule at several part counts."""
    from torch_mla.bench import cases

    case = next(c for c in cases.all_cases() if c.op == "sparse_decode")
    sp = dict(case.spec)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    built = cases._sparse_decode(sp, dev, gen)  # noqa: SLF001 - its inputs, rebuilt below
    q_args = cases._sparse_scope(gen, dev, sp["layout"], sp["b"], sp["s_q"], sp["s_k"],  # noqa
                                 sp["topk"], sp["block_size"])
    cache, idx = q_args[0], q_args[1]
    d = cases.LAYOUTS[sp["layout"]].d
    q = torch.randn(sp["b"], sp["s_q"], sp["h_q"], d, device=dev).bfloat16()
    lens = torch.full((sp["b"],), sp["topk"], dtype=torch.int32, device=dev)
    for parts in (None, 33, 66, 132, 264):
        sch = None if parts is None else torch_mla.decode_schedule(lens, num_parts=parts)
        for backend in ("native", "triton"):
            with torch_mla.use_backend(backend):
                us = _time(lambda: torch_mla.sparse_decode(q, cache, idx, d_v=512,
                                                           sm_scale=d ** -0.5, schedule=sch))
            print(f"sched parts={parts} {backend}: {us:8.1f} us", flush=True)
    print(f"flashmla (bench): {_time(built.calls['flashmla']):8.1f} us" if "flashmla" in
          built.calls else "flashmla: not importable")


# dense_decode split-kernel variants: torch_mla.triton.dense_decode.VARIANT (None: the gather
# kernel; a dict: the paged kernel, its keys overriding PAGED_DEFAULTS), plus "combine": [rows,
# warps] for COMBINE_CONFIG. Cost model (one program, one 64-key tile of 64 rows; H100 SXM at
# ~1.75 GHz: 4096 bf16 FLOP/clk/SM on the tensor cores, 128 B/clk/SM of shared memory, and
# wgmma reads A and B from shared memory, so m64nNk16 costs max(N/2, (2048 + 32 N) / 128) clk;
# b=64 s_q=1 s_k=8192 gives 124 program-tiles per SM: 66 parts x 2 row blocks):
#   gather: QK^T done by both warp groups at n32 (2 x 36 wgmma x 3 KB of shared memory = 3.0k
#     clk) + PV 1.0k + ~1.6k instructions/warp of pointer math + the next tile's copy issued
#     after the dots (~2k exposed): ~7-8k predicted, 11k measured (795 us).
#   paged defaults: scores split over the warp groups (n32, shared-memory bound: 1.7k), PV 1.0k,
#     softmax with one cross-warp-group max ~0.5k, ~700 instructions/warp, the copy still issued
#     after the dots but from L2 (prefetched): ~1k exposed -> ~4.5k predicted, ~5.8k measured
#     (437 us). Each knob below undoes one step (measured: the module docstring):
#   vblocks 1 (one 512-column value block): same speed, more spills (measured 454 / 837 / 477).
#   prefetch 1 / 3: within noise of 2 (444 / 836 / 536, 451 / 850 / 482); 0 costs ~7%.
#   defer_sum False: a per-tile cross-warp-group row sum, predicted ~+4% (measured within
#     the run-to-run spread: 434-441 / 817-836 / 464-472).
#   split_s False: the gather kernel's duplicated scores (3.0k) -> ~+15% (measured 515 / 983 /
#     611).
#   combine [4, 4] / [16, 8]: the combine kernel (memory bound: 12-13 us at s_q=1, 29-30 at
#     s_q=2 with the default [8, 4]) with more / fewer programs in flight; predicted within
#     +-5 us (measured within 1 us).
#   part_group 0 (auto: consecutive schedule parts merged per program until the grid is one
#     program per SM). The bench's schedule (decode_schedule(h_q=128): 66 parts, blind to s_q)
#     gives 66 x 2 = 132 programs at s_q=1 (auto: group 1, the default's SASS exactly) but 66 x
#     4 = 264 at s_q=2: two waves, each program ~62 tiles (~1 element of 64: nearly every
#     element split in two). FlashMLA's metadata, knowing s_q, makes 33 parts there (132 CTAs).
#     Group 2: 132 programs of ~124 tiles; ~half the elements end inside one program (written
#     straight to out in bf16, the combine skips them), so the combine reads ~42 instead of ~84
#     MB (predicted 29-30 -> ~15 us) and the split kernel stores half the fp32 partials and
#     runs one wave (fewer element prologues / epilogues per SM). Predicted at s_q=2: -15 to
#     -30 us (~445-460 us, 0.47-0.49x FlashMLA's 217: short of 0.5x by itself); s_q=1 rows
#     unchanged (same kernel).
DECODE_VARIANTS = [
    None,
    {},
    {"part_group": 0},
    {"combine": [4, 4]},
    {"combine": [16, 8]},
    {"vblocks": 1},
    {"prefetch": 1},
    {"defer_sum": False},
    {"split_s": False},
]
# (b, s_q, s_k, FlashMLA's H100 time in us from the target's table)
DECODE_SHAPES = [(64, 1, 8192, 239.0), (128, 1, 8192, 513.0), (64, 2, 4096, 217.0)]
DECODE_SMOKE_SHAPES = [(3, 1, 200, 239.0), (3, 2, 256, 217.0)]  # DECODE_SMOKE=1 (see decode)


def _wall_us(fn):
    import time
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


def _decode_inputs(b, s_q, s_k, dev, gen, h_q=128, d=576, bs=64):
    """The bench's dense_decode inputs (torch_mla.bench.cases._dense_decode)."""
    import math
    from torch_mla.bench import cases

    nblk = math.ceil(s_k / 256) * 256 // bs
    q = cases._randn(gen, (b, s_q, h_q, d), dev)  # noqa: SLF001
    table = torch.randperm(b * nblk, generator=gen, device=dev).to(torch.int32).view(b, nblk)
    cache = cases._randn(gen, (b * nblk, bs, 1, d), dev)  # noqa: SLF001
    seqlens = torch.full((b,), s_k, dtype=torch.int32, device=dev)
    sched = torch_mla.decode_schedule(seqlens, h_q=h_q, s_q=s_q)  # the bench's schedule
    return q, cache, table, seqlens, sched


def _decode_check(q, cache, table, seqlens, sched, causal, scale):
    """Max error of the Triton output against the reference on 8 batch elements (pairs at the
    start, a quarter, the middle and the end: they sit in different parts of the schedule, and
    with part_group 2 at s_q=2 each pair holds an element split over two programs and one
    that a program holds whole)."""
    b = q.shape[0]
    idx = torch.tensor(sorted({min(max(i, 0), b - 1) for i in (
        0, 1, b // 4, b // 4 + 1, b // 2, b // 2 + 1, b - 2, b - 1)}), device=q.device)
    with torch_mla.use_backend("triton"):
        out, lse = torch_mla.dense_decode(q, cache, table, seqlens, d_v=512, sm_scale=scale,
                                          causal=causal, schedule=sched)
    with torch_mla.use_backend("reference"):
        ref_out, ref_lse = torch_mla.dense_decode(q[idx], cache, table[idx], seqlens[idx],
                                                  d_v=512, sm_scale=scale, causal=causal)
    out, lse = out[idx].float(), lse[idx]
    return _verdict(out, lse, ref_out, ref_lse)


def _verdict(out, lse, ref_out, ref_lse) -> str:
    """ok / WRONG (max error of out relative to the reference's largest value, max lse error),
    or NaN."""
    if out.isnan().any() or lse.isnan().any():
        return "NaN"
    err_o = ((out - ref_out.float()).abs().max() / ref_out.float().abs().max()).item()
    err_l = (lse - ref_lse).abs().max().item()
    ok = err_o < 2e-2 and err_l < 1e-3
    return f"{'ok' if ok else 'WRONG'}({err_o:.0e},{err_l:.0e})"


def _kernel_breakdown(fn, calls=5):
    """Device time per kernel name (us per call) of ``fn``, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = {}
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            times[ev.name] = times.get(ev.name, 0.0) + ev.device_time / calls
    return "  ".join(f"{k[:28]} {v:.1f}" for k, v in sorted(times.items(), key=lambda x: -x[1]))


def decode():
    import json
    import os
    import time

    import torch_mla.triton.dense_decode as td
    from torch_mla.bench import cases

    variants = DECODE_VARIANTS
    if os.environ.get("DECODE_VARIANTS"):
        variants = json.loads(os.environ["DECODE_VARIANTS"])
    # DECODE_SMOKE=1 (with TRITON_INTERPRET=1, on a CPU machine): tiny shapes, wall time of one
    # call, no FlashMLA; for catching a broken script before it reaches the GPU, not for numbers
    smoke = bool(os.environ.get("DECODE_SMOKE"))
    shapes = DECODE_SMOKE_SHAPES if smoke else DECODE_SHAPES
    timer = _wall_us if smoke else _time
    dev = torch.device("cpu" if smoke else "cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    scale = 576 ** -0.5
    inputs = [_decode_inputs(b, s_q, s_k, dev, gen) for b, s_q, s_k, _ in shapes]
    base = []
    for (b, s_q, s_k, published), _ in zip(shapes, inputs):
        us = None
        try:
            built = cases._dense_decode(dict(b=b, s_q=s_q, h_q=128, s_k=s_k, block_size=64),  # noqa
                                        dev, gen)
            if "flashmla" in built.calls:
                us = timer(built.calls["flashmla"])
            del built
        except Exception as e:  # noqa: BLE001 - the published figure stands in
            print(f"flashmla b={b} s_q={s_q}: {type(e).__name__}: {str(e)[:120]}")
        base.append((us, "live") if us else (published, "published"))
        torch.cuda.empty_cache()
    heads = [f"b={b} s_q={s_q} s_k={s_k}" for b, s_q, s_k, _ in shapes]
    print("FlashMLA: " + "  ".join(f"{h}: {us:.1f} us ({how})"
                                   for h, (us, how) in zip(heads, base)), flush=True)
    print(f"{'variant':<78} " + " ".join(f"{h:>24}" for h in heads))
    old = td.VARIANT, td.COMBINE_CONFIG
    for v in variants:
        td.COMBINE_CONFIG = tuple(v["combine"]) if v and "combine" in v else old[1]
        td.VARIANT = None if v is None else {k: x for k, x in v.items() if k != "combine"}
        cells = []
        t0 = time.time()
        for (b, s_q, s_k, _), (q, cache, table, seqlens, sched), (fl, _) in zip(
                shapes, inputs, base):
            causal = s_q > 1
            try:
                check = _decode_check(q, cache, table, seqlens, sched, causal, scale)
                with torch_mla.use_backend("triton"):
                    us = timer(lambda: torch_mla.dense_decode(
                        q, cache, table, seqlens, d_v=512, sm_scale=scale, causal=causal,
                        schedule=sched))
                cells.append(f"{us:7.1f} {fl / us:4.2f}x {check}")
            except Exception as e:  # noqa: BLE001 - report and go on
                cells.append(f"{type(e).__name__}: {str(e)[:60]}")
        name = "default (gather kernel)" if v is None else json.dumps(v, separators=(",", ":"))
        print(f"{name:<78} " + " ".join(f"{c:>24}" for c in cells)
              + f"  [{time.time() - t0:.0f}s]", flush=True)
        if os.environ.get("DECODE_PROFILE") and not smoke:  # per-kernel device time (us per call)
            for (b, s_q, s_k, _), (q, cache, table, seqlens, sched) in zip(shapes, inputs):
                with torch_mla.use_backend("triton"):
                    brk = _kernel_breakdown(lambda: torch_mla.dense_decode(
                        q, cache, table, seqlens, d_v=512, sm_scale=scale, causal=s_q > 1,
                        schedule=sched))
                print(f"    b={b} s_q={s_q}: {brk}", flush=True)
    td.VARIANT, td.COMBINE_CONFIG = old



# sparse_decode main-kernel variants: torch_mla.triton.sparse_decode.VARIANT (None: the chunked
# kernel, whose scores' dots are chained into the PV dots, so with BLOCK_H 64 and 8 warps both
# warp groups compute the same 64 x 64 scores; a dict: the split-scores variant, its keys
# overriding SPLIT_DEFAULTS). Prediction (compile check, Triton 3.6 sm_90: spills 148 -> 54 words
# on V32 s_q 2, 200 -> 92 on MODEL1 h128 extra; shared 190 KB both on V32, MODEL1 169 -> 205 KB):
# the split variant halves the score dots' tensor time (QK is 53% of the FLOPs) and removes most
# spills; ~10-20% faster on the V32 and MODEL1 h128 rows, less on MODEL1 h64. {"defer_sum":
# False} isolates the deferred row sums (a cross-warp-group row sum per tile: a few %).
SPARSE_VARIANTS = [None, {}, {"defer_sum": False}]
# the bench's rows (torch_mla.bench.cases) with FlashMLA's README figures (us, H100)
SPARSE_PUBLISHED = [201.7, 389.6, 107.1, 216.8, 3210.0]


def _sparse_inputs(sp, dev, gen):
    """The bench's sparse_decode inputs (torch_mla.bench.cases._sparse_decode) and its FlashMLA
    call (None where flash_mla does not import)."""
    from torch_mla.bench import cases

    layout, b, s_q, h_q = sp["layout"], sp["b"], sp["s_q"], sp["h_q"]
    d_qk = cases.LAYOUTS[layout].d
    cache, idx, _ = cases._sparse_scope(gen, dev, layout, b, s_q, sp["s_k"], sp["topk"],  # noqa
                                        sp["block_size"])
    ecache = eidx = None
    if sp.get("extra_topk"):
        ecache, eidx, _ = cases._sparse_scope(gen, dev, layout, b, s_q, sp["extra_s_k"],  # noqa
                                              sp["extra_topk"], sp["extra_block_size"])
    q = cases._randn(gen, (b, s_q, h_q, d_qk), dev, scale=1.0)  # noqa: SLF001
    scale = d_qk ** -0.5
    total = sp["topk"] + (sp.get("extra_topk") or 0)
    sched = torch_mla.decode_schedule(torch.full((b,), total, dtype=torch.int32, device=dev),
                                      h_q=h_q, s_q=s_q)  # the bench's schedule
    args = dict(q=q, cache=cache, idx=idx, ecache=ecache, eidx=eidx, scale=scale, sched=sched)
    flash = None
    try:
        import flash_mla as mod
        meta = mod.get_mla_metadata()[0]
        flash = lambda: mod.flash_mla_with_kvcache(  # noqa: E731
            q, cache, None, None, 512, meta, None, softmax_scale=scale, is_fp8_kvcache=True,
            indices=idx, extra_k_cache=ecache, extra_indices_in_kvcache=eidx)
    except Exception as e:  # noqa: BLE001 - the published figure stands in
        args["flash_why"] = f"{type(e).__name__}: {str(e)[:100]}"
    return args, flash


def _sparse_call(a, sel=None):
    q, idx, eidx, sched = a["q"], a["idx"], a["eidx"], a["sched"]
    if sel is not None:
        q, idx, sched = q[sel], idx[sel], None
        eidx = eidx[sel] if eidx is not None else None
    return torch_mla.sparse_decode(q, a["cache"], idx, extra_k_cache=a["ecache"],
                                   extra_indices=eidx, d_v=512, sm_scale=a["scale"],
                                   schedule=sched)


def _sparse_check(a):
    """Max relative error of out and abs error of lse against the reference backend on the
    first and the last batch element (different parts of the schedule)."""
    b = a["q"].shape[0]
    sel = torch.tensor(sorted({0, b - 1}), device=a["q"].device)
    with torch_mla.use_backend("triton"):
        out, lse = _sparse_call(a)
    with torch_mla.use_backend("reference"):
        ref_out, ref_lse = _sparse_call(a, sel)
    out, lse = out[sel].float(), lse[sel]
    return _verdict(out, lse, ref_out, ref_lse)


def sparse():
    import json
    import os
    import time

    import torch_mla.triton.sparse_decode as tsd
    from torch_mla.bench import cases

    t_start = time.time()
    variants = SPARSE_VARIANTS
    if os.environ.get("SPARSE_VARIANTS"):
        variants = json.loads(os.environ["SPARSE_VARIANTS"])
    rows = [c for c in cases.all_cases() if c.op == "sparse_decode"]
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    inputs, base = [], []
    for c, published in zip(rows, SPARSE_PUBLISHED):
        a, flash = _sparse_inputs(c.spec, dev, gen)
        us = None
        if flash is not None:
            try:
                us = _time(flash)
            except Exception as e:  # noqa: BLE001 - the published figure stands in
                print(f"flashmla {c.name}: {type(e).__name__}: {str(e)[:120]}")
        elif "flash_why" in a:
            print(f"flashmla not importable: {a['flash_why']}")
        inputs.append(a)
        base.append((us, "live") if us else (published, "published"))
    names = [c.name.replace("sparse_decode ", "") for c in rows]
    print(f"[inputs + FlashMLA: {time.time() - t_start:.0f}s]")
    for n, (us, how) in zip(names, base):
        print(f"FlashMLA {n:<45} {us:8.1f} us ({how})")
    old = tsd.VARIANT
    try:
        for v in variants:
            tsd.VARIANT = v
            name = "chunked (old)" if v is None else "split " + json.dumps(
                v, separators=(",", ":"))
            t0 = time.time()
            for n, a, (fl, _) in zip(names, inputs, base):
                try:
                    check = _sparse_check(a)
                    with torch_mla.use_backend("triton"):
                        us = _time(lambda: _sparse_call(a))
                    cell = f"{us:8.1f} us {fl / us:4.2f}x {check}"
                except Exception as e:  # noqa: BLE001 - report and go on
                    cell = f"{type(e).__name__}: {str(e)[:100]}"
                print(f"{name:<34} {n:<45} {cell}", flush=True)
            print(f"  [{name}: {time.time() - t0:.0f}s]", flush=True)
    finally:
        tsd.VARIANT = old
    print(f"[total {time.time() - t_start:.0f}s]")


if __name__ == "__main__":
    for what in sys.argv[1:]:
        {"topk": topk, "host": host, "sched": sched, "decode": decode,
         "sparse": sparse}[what]()
