"""The reference backend on a CUDA device: same results as on the CPU, no host sync, and decode ops
capture into a CUDA graph. Skipped without CUDA."""

import pytest
import torch

import torch_mla
from samples import SAMPLES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _to(x, device):
    return x.to(device) if isinstance(x, torch.Tensor) else x


def _cases():
    for op, make in SAMPLES.items():
        for name, args in make():
            yield pytest.param(op, args, id=f"{op}-{name}")


@pytest.mark.parametrize("op,args", list(_cases()))
def test_cuda_matches_cpu_without_host_sync(op, args):
    fn = getattr(torch.ops.mla, op)
    cpu_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    gpu_args = [_to(a, "cuda") for a in args]
    expected = fn(*cpu_args)
    with torch_mla.use_backend("reference"):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = fn(*gpu_args)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    if fn.default._schema.returns == []:  # a mutating op (write_*_cache): compare the caches
        expected, got = cpu_args[0], gpu_args[0]
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = got if isinstance(got, tuple) else (got,)
    for e, g in zip(expected, got):
        if e.dtype in (torch.float8_e4m3fn, torch.uint8):
            assert torch.equal(e.view(torch.uint8), g.cpu().view(torch.uint8))
        else:
            torch.testing.assert_close(g.cpu(), e, equal_nan=True, atol=2e-2, rtol=2e-2)


def test_sparse_decode_step_captures_in_cuda_graph():
    args = [_to(a, "cuda") for a in SAMPLES["sparse_decode"]()[2][1]]
    q, cache, idx, lens = args[0], args[1], args[2], args[3]
    sched = torch_mla.decode_schedule(lens, num_parts=8)
    static_out = {}

    def step():
        static_out["o"], static_out["lse"] = torch_mla.sparse_decode(
            q, cache, idx, topk_length=lens, attn_sink=args[4], extra_k_cache=args[5],
            extra_indices=args[6], extra_topk_length=args[7], schedule=sched)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm up outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    ref_o, ref_lse = torch_mla.sparse_decode(
        q, cache, idx, topk_length=lens, attn_sink=args[4], extra_k_cache=args[5],
        extra_indices=args[6], extra_topk_length=args[7], schedule=sched)
    # same schedule, same split: the replay must match the eager call bit for bit (a different
    # part count would move the split points and the bf16 rounding of the partials)
    torch.testing.assert_close(static_out["o"], ref_o, rtol=0, atol=0)
    torch.testing.assert_close(static_out["lse"], ref_lse, rtol=0, atol=0)
