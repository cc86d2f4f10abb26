"""The native SM90 sparse_decode kernels on a reduced case set, for compute-sanitizer:

    compute-sanitizer --tool memcheck  --kernel-name kns=decode python3 gpu/sanitize_native.py
    compute-sanitizer --tool racecheck --kernel-name kns=decode python3 gpu/sanitize_native.py

(run from tests/, as run_on_device.sh runs the GPU tests; the warp-specialized wgmma kernel is
the default, with its crossover for the h_q 128 cases, and TORCH_MLA_NATIVE_DECODE_WGMMA=0 runs
the serial one instead; STEPS=sanitize in run_on_device.sh runs both tools on both kernels). Covers V32 and MODEL1, h_q 64 / 128,
s_q 1 / 2, extra KV with another block size, topk_length / extra_topk_length, +-inf sinks,
invalid and out-of-range indices, block sizes 2 / 61, topk not a multiple of 64, all indices
invalid, and a schedule with more parts than work (splits and the combine). Each case is also
checked against the reference, so a clean sanitizer report comes with right answers."""

import os
import sys

import torch

import torch_mla

# tests/ (oracles, samples), which pytest's rootdir conftest puts on the path, for a plain run
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_native_sparse_decode import check, make, reference

CASES = [
    # d, b, s_q, h_q, topk, etopk, kwargs
    (576, 2, 2, 128, 256, 0, {}),
    (576, 1, 1, 64, 128 + 40, 0, {"bs": 61}),
    (512, 2, 2, 64, 128, 64, {"ebs": 2}),
    (512, 1, 1, 128, 64, 128, {"bs": 2, "ebs": 61}),
    (576, 2, 1, 64, 128, 0, {"invalid_frac": 1.0}),
]


def main():
    lib_ok = __import__("torch_mla.native", fromlist=["library"]).library()
    assert lib_ok is not None, "native library not loaded"
    for i, (d, b, s_q, h_q, topk, etopk, kw) in enumerate(CASES):
        q, cache, args = make(d, b, s_q, h_q, topk, etopk, tokens_per_b=256, etokens_per_b=128,
                              seed=i, **kw)
        for parts in (None, 2 * b + 3):
            sched = None
            if parts is not None:
                total = torch.full((b,), topk + etopk, dtype=torch.int32, device="cuda")
                sched = torch_mla.decode_schedule(total, num_parts=parts)
            with torch_mla.use_backend("native"):
                out, lse = torch_mla.sparse_decode(q, cache, schedule=sched, d_v=512, **args)
            torch.cuda.synchronize()
            check(out, lse, q, cache, args, ref=reference(q, cache, args))
            print(f"case {i} parts {parts}: ok", flush=True)
    print("all cases ok")


if __name__ == "__main__":
    sys.exit(main())
