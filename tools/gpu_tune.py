"""One device call's worth of measurements that pick settings (run on the GPU machine after
``source tests/gpu/device_env.sh``):

    python3 tools/gpu_tune.py topk        # indexer_topk variants against torch.topk
    python3 tools/gpu_tune.py host        # host time of one eager sparse_decode, and its profile
    python3 tools/gpu_tune.py sched       # sparse_decode time against the schedule's part count

topk: rows 4096 x 32768 f32 randn, k 2048 (the bench's case); every variant is first checked
bit for bit against the reference on the same logits, then timed with CUDA-graph replay
(torch_mla.bench.timing), median. host: the bench's host_overhead case (one eager call, GPU idle
before each), per backend, with Triton's direct relaunch on and off, then a cProfile of 300
Triton calls (top 25 by cumulative time).
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


if __name__ == "__main__":
    for what in sys.argv[1:]:
        {"topk": topk, "host": host, "sched": sched}[what]()
