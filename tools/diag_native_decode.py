"""Where the native wgmma sparse_decode kernel spends its time: one bench case, timed (CUDA-graph
replay, as the bench) on the serial kernel, FlashMLA, and the wgmma kernel (the default) under each
profiling probe (TORCH_MLA_NATIVE_DECODE_PROBE, csrc/common/sparse_decode.h: 1 no producer
loads, 2 no dequantization, 16 producer writes nothing, i.e. the consumers alone, 32 no
crossover, 64 one CTA slot a job (several waves), 128 no copies to the peer, 256 no NoPE
stores, 1024 the consumers skip their math, i.e. the producer alone; bits combine, e.g. 1025 =
the producer alone without its loads; results are wrong under all but 32 and 64, only the time
means something), for each schedule part count asked for (default: the bench's).

    python tools/diag_native_decode.py ["V32 b=128"] [probes, e.g. 0,1,2,3,16] [parts, e.g. 66,33]
"""
import os
import sys

import torch

import torch_mla

from torch_mla.bench import cases as C
from torch_mla.bench import timing


def main() -> None:
    match = sys.argv[1] if len(sys.argv) > 1 else "V32 b=128"
    probes = [int(p) for p in (sys.argv[2] if len(sys.argv) > 2 else "0,1,2,3,16").split(",")]
    parts = [int(p) for p in sys.argv[3].split(",")] if len(sys.argv) > 3 else [None]
    case = next(c for c in C.all_cases() if c.op == "sparse_decode" and match in c.name)
    for n in parts:
        if n is not None:
            C._schedule = lambda seqlens, h_q, s_q, n=n: torch_mla.decode_schedule(seqlens,
                                                                            num_parts=n)
        print(f"{case.name}, schedule parts: {n or 'default'}", flush=True)
        run(C.build(case, torch.device("cuda")), probes)


def run(built, probes) -> None:
    for name in (C.NATIVE_SERIAL, "flashmla"):
        if name in built.calls:
            t, how = timing.cuda_graph_time(built.calls[name], replays=10)
            print(f"  {name:<18} {t * 1e6:9.1f} us  {how}", flush=True)
    for p in probes:
        os.environ["TORCH_MLA_NATIVE_DECODE_PROBE"] = str(p)
        t, how = timing.cuda_graph_time(built.calls["native"], replays=10)
        print(f"  wgmma probe {p:<6} {t * 1e6:9.1f} us  {how}", flush=True)
    os.environ.pop("TORCH_MLA_NATIVE_DECODE_PROBE", None)


if __name__ == "__main__":
    main()
