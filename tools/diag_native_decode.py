"""Where the native wgmma sparse_decode kernel spends its time: one bench case, timed (CUDA-graph
replay, as the bench) on the serial kernel, FlashMLA, and the wgmma kernel (the default) under each
profiling probe (TORCH_MLA_NATIVE_DECODE_PROBE, csrc/common/sparse_decode.h: 1 no producer
loads, 2 no dequantization, 16 producer writes nothing, i.e. the consumers alone; results are
wrong under a probe, only the time means something).

    python tools/diag_native_decode.py ["V32 b=128"] [probes, e.g. 0,1,2,3,16]
"""
import os
import sys

import torch

from torch_mla.bench import cases as C
from torch_mla.bench import timing


def main() -> None:
    match = sys.argv[1] if len(sys.argv) > 1 else "V32 b=128"
    probes = [int(p) for p in (sys.argv[2] if len(sys.argv) > 2 else "0,1,2,3,16").split(",")]
    case = next(c for c in C.all_cases() if c.op == "sparse_decode" and match in c.name)
    built = C.build(case, torch.device("cuda"))
    print(case.name, flush=True)
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
