"""Cross-checks against FlashMLA on the same inputs (GPU, and only where the FlashMLA peer is
importable: put ``.peers/flashmla`` on PYTHONPATH, as tests/gpu/run_on_device.sh does).

- FP8 caches written by our ``quantize_kv_cache`` / ``write_kv_cache`` are read by FlashMLA's
  sparse decoder, and caches laid out as FlashMLA's own quantizer lays them (V32 with a spare token
  per block) are read by ours: the outputs agree to bf16 rounding.
- ``sparse_prefill`` and ``dense_decode`` agree with FlashMLA's kernels.
Every torch_mla backend that accepts the inputs is checked (forced), not only the default one.
"""

import pytest
import torch

import torch_mla

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
flash_mla = pytest.importorskip("flash_mla", reason="the FlashMLA peer is not on PYTHONPATH")

BACKENDS = ("reference", "triton", "native")


def _close(ours, theirs, what, tol=2e-2):
    ours, theirs = ours.float(), theirs.float()
    assert torch.isfinite(ours).all() == torch.isfinite(theirs).all(), what
    fin = torch.isfinite(theirs)
    err = (ours[fin] - theirs[fin]).norm() / theirs[fin].norm().clamp_min(1e-12)
    assert err < tol, f"{what}: relative error {err:.3e}"


def _backends(op, *args, **kwargs):
    """The backends that accept this call when forced."""
    names = []
    for name in BACKENDS:
        with torch_mla.use_backend(name):
            if "no backend applies" not in torch_mla.explain(op, *args, **kwargs):
                names.append(name)
    return names


def _sparse_inputs(layout, b=4, s_q=2, h_q=128, topk=512, block_size=64, num_blocks=96,
                   padded_v32=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    lay = torch_mla.meta.layouts.LAYOUTS[layout]
    kv = torch.randn(num_blocks, block_size, 1, lay.d, device="cuda", generator=g).bfloat16()
    cache = torch_mla.quantize_kv_cache(kv, layout)
    if padded_v32:  # FlashMLA's quantizer allocates one spare token per V32 block
        store = torch.zeros(num_blocks, block_size + 1, lay.bytes_per_token, device="cuda",
                            dtype=cache.dtype)[:, :block_size]
        store.copy_(cache.view(num_blocks, block_size, lay.bytes_per_token))
        cache = store.view(num_blocks, block_size, 1, lay.bytes_per_token)
    total = num_blocks * block_size
    idx = torch.stack([torch.randperm(total, device="cuda", generator=g)[:topk]
                       for _ in range(b * s_q)]).view(b, s_q, topk).int()
    idx[:, :, -7:] = -1  # a few invalid entries
    q = torch.randn(b, s_q, h_q, lay.d, device="cuda", generator=g).bfloat16()
    return q, cache, idx


def _flashmla_sparse(q, cache, idx, **kw):
    sched, _ = flash_mla.get_mla_metadata()
    return flash_mla.flash_mla_with_kvcache(q, cache, None, None, 512, sched, None,
                                            softmax_scale=q.shape[-1] ** -0.5,
                                            is_fp8_kvcache=True, indices=idx, **kw)


@pytest.mark.parametrize("padded_v32", [False, True])
def test_v32_cache_read_by_both(padded_v32):
    q, cache, idx = _sparse_inputs("v32", padded_v32=padded_v32)
    o_ref, lse_ref = _flashmla_sparse(q, cache, idx)
    for name in _backends("sparse_decode", q, cache, idx):
        with torch_mla.use_backend(name):
            o, lse = torch_mla.sparse_decode(q, cache, idx)
        _close(o, o_ref, f"{name} out")
        _close(lse, lse_ref, f"{name} lse", tol=1e-4)


def test_write_kv_cache_then_flashmla_reads_it():
    """Rows written one slot at a time by write_kv_cache decode like FlashMLA says they should."""
    q, cache, idx = _sparse_inputs("v32")
    rows = torch.randn(300, 576, device="cuda").bfloat16()
    slots = torch.randperm(cache.shape[0] * cache.shape[1], device="cuda")[:300]
    torch_mla.write_kv_cache(cache, rows, slots, "v32")
    o_ref, lse_ref = _flashmla_sparse(q, cache, idx)
    o, lse = torch_mla.sparse_decode(q, cache, idx)
    _close(o, o_ref, "out")
    _close(lse, lse_ref, "lse", tol=1e-4)


def test_model1_with_extra_and_sink():
    q, cache, idx = _sparse_inputs("model1", h_q=64, topk=128)
    _, ecache, eidx = _sparse_inputs("model1", h_q=64, topk=512, num_blocks=40, seed=1)
    sink = torch.randn(64, device="cuda")
    lens = torch.randint(1, 129, (q.shape[0],), device="cuda", dtype=torch.int32)
    elens = torch.randint(1, 513, (q.shape[0],), device="cuda", dtype=torch.int32)
    o_ref, lse_ref = _flashmla_sparse(q, cache, idx, attn_sink=sink, extra_k_cache=ecache,
                                      extra_indices_in_kvcache=eidx, topk_length=lens,
                                      extra_topk_length=elens)
    kw = dict(topk_length=lens, attn_sink=sink, extra_k_cache=ecache, extra_indices=eidx,
              extra_topk_length=elens)
    for name in _backends("sparse_decode", q, cache, idx, **kw):
        with torch_mla.use_backend(name):
            o, lse = torch_mla.sparse_decode(q, cache, idx, **kw)
        _close(o, o_ref, f"{name} out")
        _close(lse, lse_ref, f"{name} lse", tol=1e-4)


@pytest.mark.parametrize("d_qk,h_q", [(576, 128), (512, 64)])
def test_sparse_prefill_matches_flashmla(d_qk, h_q):
    g = torch.Generator(device="cuda").manual_seed(2)
    s_q, s_kv, topk = 256, 4096, 2048
    q = torch.randn(s_q, h_q, d_qk, device="cuda", generator=g).bfloat16()
    kv = torch.randn(s_kv, 1, d_qk, device="cuda", generator=g).bfloat16()
    idx = torch.stack([torch.randperm(s_kv, device="cuda", generator=g)[:topk]
                       for _ in range(s_q)]).view(s_q, 1, topk).int()
    idx[:, :, -5:] = -1
    sink = torch.randn(h_q, device="cuda")
    o_ref, ml_ref, lse_ref = flash_mla.flash_mla_sparse_fwd(q, kv, idx, d_qk ** -0.5, 512,
                                                            attn_sink=sink)
    for name in _backends("sparse_prefill", q, kv, idx, attn_sink=sink):
        with torch_mla.use_backend(name):
            o, ml, lse = torch_mla.sparse_prefill(q, kv, idx, attn_sink=sink)
        _close(o, o_ref, f"{name} out")
        _close(ml, ml_ref, f"{name} max_logits", tol=1e-4)
        _close(lse, lse_ref, f"{name} lse", tol=1e-4)


@pytest.mark.parametrize("s_q,causal", [(1, False), (2, True)])
def test_dense_decode_matches_flashmla(s_q, causal):
    g = torch.Generator(device="cuda").manual_seed(3)
    b, h_q, bs, max_blocks = 8, 128, 64, 32
    seqlens = torch.randint(s_q, bs * max_blocks, (b,), device="cuda", generator=g).int()
    table = torch.randperm(b * max_blocks, device="cuda", generator=g).int().view(b, max_blocks)
    cache = torch.randn(b * max_blocks, bs, 1, 576, device="cuda", generator=g).bfloat16()
    q = torch.randn(b, s_q, h_q, 576, device="cuda", generator=g).bfloat16()
    sched, _ = flash_mla.get_mla_metadata()
    o_ref, lse_ref = flash_mla.flash_mla_with_kvcache(q, cache, table, seqlens, 512, sched, None,
                                                      causal=causal)
    for name in _backends("dense_decode", q, cache, table, seqlens, causal=causal):
        with torch_mla.use_backend(name):
            o, lse = torch_mla.dense_decode(q, cache, table, seqlens, causal=causal)
        _close(o, o_ref, f"{name} out")
        _close(lse, lse_ref, f"{name} lse", tol=1e-4)
