"""Small representative inputs for every op, shared by the contract, compile and error tests.

Each sample is ``(name, args)`` where args are the op's positional arguments (schema order).
Shapes are tiny but every optional feature appears: topk_length, sinks, extra KV, both FP8
layouts, causal and non-causal, GQA.
"""

from __future__ import annotations

import torch

import torch_mla


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _indices(shape, high, gen, invalid_frac=0.25):
    idx = torch.randint(0, high, shape, generator=gen, dtype=torch.int32)
    bad = torch.rand(shape, generator=gen) < invalid_frac
    junk = torch.where(torch.rand(shape, generator=gen) < 0.5, torch.full_like(idx, -1),
                       torch.full_like(idx, high + 3))
    return torch.where(bad, junk, idx)


def sparse_prefill(dtype=torch.float32, requires_grad=False, seed=0):
    g = _g(seed)
    out = []
    for name, (s_q, h_q, h_kv, d_qk, d_v, s_kv, topk, sink, lens) in {
        "plain": (5, 4, 1, 32, 16, 11, 6, False, False),
        "sink_topk_length": (5, 4, 1, 32, 16, 11, 6, True, True),
        "gqa": (3, 4, 2, 24, 8, 7, 5, True, True),
    }.items():
        q = torch.randn(s_q, h_q, d_qk, generator=g).to(dtype).requires_grad_(requires_grad)
        kv = torch.randn(s_kv, h_kv, d_qk, generator=g).to(dtype).requires_grad_(requires_grad)
        idx = _indices((s_q, h_kv, topk), s_kv, g)
        attn_sink = (torch.randn(h_q, generator=g).requires_grad_(requires_grad) if sink else None)
        topk_length = (torch.randint(0, topk + 1, (s_q,), generator=g, dtype=torch.int32)
                       if lens else None)
        out.append((name, (q, kv, idx, d_qk ** -0.5, d_v, attn_sink, topk_length)))
    return out


def sparse_prefill_backward(seed=0):
    out = []
    for name, args in sparse_prefill(seed=seed):
        q, kv, idx, scale, d_v, sink, lens = args
        o, _, lse = torch.ops.mla.sparse_prefill(*args)
        g = _g(seed + 1)
        dout = torch.randn(o.shape, generator=g)
        dlse = torch.randn(lse.shape, generator=g)
        out.append((name, (dout, dlse, q, kv, idx, o, lse, scale, d_v, sink, lens)))
    return out


def fp8_cache(layout, num_blocks, block_size, seed=0, dtype=torch.uint8):
    """A packed cache. uint8 by default: opcheck compares inputs with allclose, which has no
    float8 kernel on the CPU (the float8 dtype is covered by the reference tests)."""
    lay = torch_mla.meta.layouts.LAYOUTS[layout]
    kv = torch.randn(num_blocks, block_size, 1, lay.d, generator=_g(seed)).to(torch.bfloat16)
    return torch_mla.quantize_kv_cache(kv, layout).view(dtype)


def sparse_decode(seed=0):
    g = _g(seed)
    out = []
    for name, (layout, b, s_q, h_q, topk, extra, sink, lens) in {
        "v32": ("v32", 2, 2, 4, 8, False, False, False),
        "v32_sink_lens": ("v32", 2, 1, 4, 8, False, True, True),
        "model1_extra": ("model1", 2, 2, 4, 8, True, True, True),
    }.items():
        lay = torch_mla.meta.layouts.LAYOUTS[layout]
        cache = fp8_cache(layout, 3, 4, seed)
        q = torch.randn(b, s_q, h_q, lay.d, generator=g).to(torch.bfloat16)
        idx = _indices((b, s_q, topk), 12, g)
        topk_length = torch.randint(0, topk + 1, (b,), generator=g, dtype=torch.int32) if lens else None
        attn_sink = torch.randn(h_q, generator=g) if sink else None
        ecache = eidx = elens = None
        if extra:
            ecache = fp8_cache(layout, 2, 2, seed + 7)
            eidx = _indices((b, s_q, 4), 4, g)
            elens = torch.randint(0, 5, (b,), generator=g, dtype=torch.int32)
        out.append((name, (q, cache, idx, topk_length, attn_sink, ecache, eidx, elens, 512,
                           lay.d ** -0.5, None, None)))
    return out


def dense_decode(seed=0):
    g = _g(seed)
    out = []
    for name, (b, s_q, h_q, h_kv, d, d_v, bs, causal) in {
        "noncausal": (2, 1, 4, 1, 32, 16, 4, False),
        "causal_mtp": (2, 3, 4, 1, 32, 16, 4, True),
        "gqa": (2, 2, 4, 2, 24, 8, 3, True),
    }.items():
        q = torch.randn(b, s_q, h_q, d, generator=g)
        num_blocks = 6
        cache = torch.randn(num_blocks, bs, h_kv, d, generator=g)
        table = torch.randperm(num_blocks, generator=g).to(torch.int32)[: b * 3].view(b, 3)
        seqlens = torch.randint(0, 3 * bs + 1, (b,), generator=g, dtype=torch.int32)
        out.append((name, (q, cache, table, seqlens, d_v, d ** -0.5, causal, None, None)))
    return out


def dense_prefill(requires_grad=False, seed=0):
    g = _g(seed)
    out = []
    for name, (h_q, h_k, d, d_v, lens_q, lens_k, causal) in {
        "noncausal": (4, 4, 24, 16, (3, 4), (4, 5), False),
        "causal_gqa": (4, 2, 24, 16, (3, 0, 4), (5, 2, 4), True),
    }.items():
        t_q, t_k = sum(lens_q), sum(lens_k)
        q = torch.randn(t_q, h_q, d, generator=g).requires_grad_(requires_grad)
        k = torch.randn(t_k, h_k, d, generator=g).requires_grad_(requires_grad)
        v = torch.randn(t_k, h_k, d_v, generator=g).requires_grad_(requires_grad)
        cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
        cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
        out.append((name, (q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), d ** -0.5, causal)))
    return out


def dense_prefill_backward(seed=0):
    out = []
    for name, args in dense_prefill(seed=seed):
        o, lse = torch.ops.mla.dense_prefill(*args)
        g = _g(seed + 1)
        dout = torch.randn(o.shape, generator=g)
        dlse = torch.randn(lse.shape, generator=g)
        out.append((name, (dout, dlse, args[0], args[1], args[2], o, lse, *args[3:])))
    return out


def quantize_kv_cache(seed=0):
    g = _g(seed)
    return [(lay, (torch.randn(2, bs, 1, d, generator=g).to(torch.bfloat16), lay))
            for lay, d, bs in (("v32", 576, 3), ("model1", 512, 5))]


def dequantize_kv_cache(seed=0):
    return [(lay, (fp8_cache(lay, 2, bs, seed), lay)) for lay, bs in (("v32", 3), ("model1", 5))]


def write_kv_cache(seed=0):
    g = _g(seed)
    out = []
    for lay, d, bs in (("v32", 576, 3), ("model1", 512, 5)):
        cache = fp8_cache(lay, 2, bs, seed)
        kv = torch.randn(3, d, generator=g).to(torch.bfloat16)
        slots = torch.tensor([1, -1, 2 * bs - 1], dtype=torch.int64)
        out.append((lay, (cache, kv, slots, lay)))
    return out


def decode_schedule(seed=0):
    g = _g(seed)
    return [("mixed", (torch.tensor([100, 0, 3, 500], dtype=torch.int32), 4, 64)),
            ("random", (torch.randint(0, 300, (7,), generator=g, dtype=torch.int32), 5, 16))]


SAMPLES = {
    "sparse_prefill": sparse_prefill,
    "sparse_prefill_backward": sparse_prefill_backward,
    "sparse_decode": sparse_decode,
    "dense_decode": dense_decode,
    "dense_prefill": dense_prefill,
    "dense_prefill_backward": dense_prefill_backward,
    "quantize_kv_cache": quantize_kv_cache,
    "dequantize_kv_cache": dequantize_kv_cache,
    "write_kv_cache": write_kv_cache,
    "decode_schedule": decode_schedule,
}


# ---------------------------------------------------------------------------------------------
# DSA lightning indexer. FP8 inputs are given as uint8 bytes: opcheck compares inputs with
# kernels that float8 lacks on the CPU (the float8 dtype is covered by test_indexer_reference).
# ---------------------------------------------------------------------------------------------

def _fp8_bytes(x, hadamard=True):
    q, s = torch_mla.indexer_quantize(x, hadamard=hadamard)
    return q.view(torch.uint8), s


def indexer_quantize(seed=0):
    g = _g(seed)
    zero_row = torch.randn(4, 8, generator=g)
    zero_row[1] = 0
    return [("hadamard_bf16", (torch.randn(3, 2, 16, generator=g).to(torch.bfloat16), True, "fp32")),
            ("ue8m0_zero_row", (zero_row, True, "ue8m0")),
            ("plain_fp16_d12", (torch.randn(5, 12, generator=g).to(torch.float16), False, "fp32"))]


def indexer_logits(seed=0):
    g = _g(seed)
    s_q, h, d, s_k = 5, 3, 16, 7
    q, q_scale = _fp8_bytes(torch.randn(s_q, h, d, generator=g))
    k, k_scale = _fp8_bytes(torch.randn(s_k, d, generator=g))
    w = torch.randn(s_q, h, generator=g) * q_scale
    # two packed sequences (keys 0..3 and 3..7), causal; the last query's window is empty
    k_start = torch.tensor([0, 0, 3, 3, 5], dtype=torch.int32)
    k_end = torch.tensor([2, 3, 5, 7, 5], dtype=torch.int32)
    return [("ragged_causal", (q, k, k_scale, w, k_start, k_end))]


def _indexer_cache(num_blocks, block_size, d, seed, pad=0):
    store = torch.zeros(num_blocks, block_size * (d + 4) + pad, dtype=torch.uint8)
    cache = store[:, : block_size * (d + 4)].view(num_blocks, block_size, 1, d + 4)
    k = torch.randn(num_blocks * block_size, d, generator=_g(seed)).to(torch.bfloat16)
    torch_mla.write_indexer_cache(cache, k, torch.arange(num_blocks * block_size))
    return cache


def write_indexer_cache(seed=0):
    g = _g(seed)
    out = []
    for name, (pad, hadamard, fmt) in {"plain": (0, True, "fp32"),
                                       "padded_ue8m0_nohadamard": (12, False, "ue8m0")}.items():
        cache = _indexer_cache(3, 4, 16, seed, pad)
        k = torch.randn(4, 16, generator=g).to(torch.bfloat16)
        slots = torch.tensor([1, -1, 11, 100], dtype=torch.int64)
        out.append((name, (cache, k, slots, hadamard, fmt)))
    return out


def indexer_logits_paged(seed=0):
    g = _g(seed)
    b, n, h, d, bs = 2, 2, 3, 16, 4
    cache = _indexer_cache(4, bs, d, seed, pad=8)
    q, q_scale = _fp8_bytes(torch.randn(b, n, h, d, generator=g))
    w = (torch.randn(b, n, h, generator=g) * q_scale).view(b * n, h)
    context_lens = torch.tensor([5, 9], dtype=torch.int32)
    block_table = torch.tensor([[2, 0, -1], [1, 3, 2]], dtype=torch.int32)
    return [("mtp2", (q, cache, w, context_lens, block_table, 12))]


def indexer_topk(seed=0):
    g = _g(seed)
    logits = torch.randn(4, 10, generator=g).round()  # rounding makes ties
    logits[0, 3] = float("-inf")
    logits[2] = float("-inf")
    k_start = torch.tensor([0, 2, 0, 9], dtype=torch.int32)
    k_end = torch.tensor([10, 6, 10, 3], dtype=torch.int32)
    return [("whole_rows", (logits, 5, None, None)),
            ("windows", (logits, 3, k_start, k_end)),
            ("k_past_s_k", (logits, 12, None, k_end))]


def indexer_scores(dtype=torch.float32, requires_grad=False, seed=0):
    g = _g(seed)
    s_q, h, d, s_k, topk = 4, 3, 8, 6, 5
    q = torch.randn(s_q, h, d, generator=g).to(dtype).requires_grad_(requires_grad)
    k = torch.randn(s_k, d, generator=g).to(dtype).requires_grad_(requires_grad)
    w = torch.randn(s_q, h, generator=g).to(dtype).requires_grad_(requires_grad)
    idx = _indices((s_q, topk), s_k, g)
    return [("mixed_invalid", (q, k, w, idx))]


def indexer_scores_backward(seed=0):
    out = []
    for name, args in indexer_scores(seed=seed):
        grad = torch.randn(args[0].shape[0], args[3].shape[1], generator=_g(seed + 1))
        out.append((name, (grad, *args)))
    return out


def sparse_attn_scores(seed=0):
    g = _g(seed)
    out = []
    for name, lens in {"plain": False, "topk_length": True}.items():
        s_q, h, d, s_kv, topk = 4, 3, 16, 7, 5
        q = torch.randn(s_q, h, d, generator=g)
        kv = torch.randn(s_kv, 1, d, generator=g)
        idx = _indices((s_q, 1, topk), s_kv, g)
        topk_length = (torch.tensor([5, 2, 0, 4], dtype=torch.int32) if lens else None)
        _, _, lse = torch.ops.mla.sparse_prefill(q, kv, idx, d ** -0.5, d, None, topk_length)
        out.append((name, (q, kv, idx, lse, d ** -0.5, topk_length)))
    return out


def dense_attn_scores(seed=0):
    g = _g(seed)
    s_q, h, d, s_k = 4, 3, 16, 6
    q = torch.randn(s_q, h, d, generator=g)
    kv = torch.randn(s_k, 1, d, generator=g)
    k_start = torch.tensor([0, 0, 3, 3], dtype=torch.int32)
    k_end = torch.tensor([1, 3, 4, 3], dtype=torch.int32)
    logits = torch.einsum("qhd,kd->qhk", q, kv[:, 0]) * d ** -0.5
    cols = torch.arange(s_k)
    inside = (cols >= k_start[:, None].long()) & (cols < k_end[:, None].long())
    lse = torch.logsumexp(logits.masked_fill(~inside[:, None], float("-inf")), -1)
    lse = torch.where(torch.isfinite(lse), lse, float("inf"))
    return [("windows", (q, kv, lse, d ** -0.5, k_start, k_end)),
            ("whole_rows", (q, kv, torch.logsumexp(logits, -1), d ** -0.5, None, None))]


SAMPLES.update({
    "indexer_quantize": indexer_quantize,
    "indexer_logits": indexer_logits,
    "write_indexer_cache": write_indexer_cache,
    "indexer_logits_paged": indexer_logits_paged,
    "indexer_topk": indexer_topk,
    "indexer_scores": indexer_scores,
    "indexer_scores_backward": indexer_scores_backward,
    "sparse_attn_scores": sparse_attn_scores,
    "dense_attn_scores": dense_attn_scores,
})
