"""The toy DeepSeek-style block (torch_mla.toy_model) compiled by Inductor on the GPU: prefill
forward and backward through sparse_prefill, and a decode step through write_kv_cache and
sparse_decode over the paged FP8 cache, each against the same block run eagerly. bf16 at a
DeepSeek-like head shape (64 query heads, MODEL1's d_qk 512), so the GPU backends (Triton /
native) run under the compiled graph. Fresh random inputs (the seed is printed). Skipped without
CUDA.
"""

import os
import random

import pytest
import torch

import torch_mla
from torch_mla.toy_model import PagedCache, ToyConfig, ToyMLABlock

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = os.environ.get("TORCH_MLA_TOY_DEVICE", "cuda")  # "cpu" checks this file's logic
CFG = ToyConfig(hidden=256, n_heads=64, q_rank=128, d_latent=448, d_rope=64, d_head=32,
                d_index=32, topk=64)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _block():
    seed = random.SystemRandom().randrange(2 ** 31)
    print("seed", seed)
    torch.manual_seed(seed)
    return ToyMLABlock(CFG).to(device=DEV, dtype=torch.bfloat16)


def test_inductor_prefill_forward_backward():
    block = _block()
    torch._dynamo.reset()
    compiled = torch.compile(block.prefill, fullgraph=True)  # Inductor
    x = torch.randn(300, CFG.hidden, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    got, want = compiled(x), block.prefill(x)
    assert torch.isfinite(got).all()
    assert _rel(got, want) < 2e-2
    dout = torch.randn_like(want)
    params = [p for n, p in block.named_parameters() if not n.startswith(("w_iq", "w_ik"))]
    g_got = torch.autograd.grad(got, [x, *params], dout)
    g_want = torch.autograd.grad(want, [x, *params], dout)
    for a, b in zip(g_got, g_want):
        assert torch.isfinite(a).all()
        assert _rel(a, b) < 5e-2


def test_inductor_decode_step_matches_eager_and_writes_the_same_cache():
    block = _block()
    x = torch.randn(40, CFG.hidden, device=DEV, dtype=torch.bfloat16)
    caches = [PagedCache.new(CFG, batch=2, max_len=48, block_size=16, device=DEV)
              for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            block.fill_cache(c, x[:30], 0)
            block.fill_cache(c, x[:21], 1)
        torch._dynamo.reset()
        step = torch.compile(block.decode_step, fullgraph=True)  # Inductor
        pos = torch.tensor([30, 21], device=DEV)
        for i in range(4):
            xt = torch.randn(2, CFG.hidden, device=DEV, dtype=torch.bfloat16)
            want = block.decode_step(xt, pos + i, caches[0])
            got = step(xt, pos + i, caches[1])
            assert torch.isfinite(got).all()
            assert _rel(got, want) < 2e-2, i
    # Inductor rounds the new tokens' projections differently from eager, so the FP8 bytes may
    # differ in the last bit; what the caches hold must agree as numbers.
    deq = [torch_mla.dequantize_kv_cache(c.k_cache, c.layout).float() for c in caches]
    assert torch.isfinite(deq[1]).all()
    assert _rel(deq[1], deq[0]) < 2e-2
