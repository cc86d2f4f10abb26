"""Every op inside one torch.compile(fullgraph=True) function: no graph break, dynamic shapes,
forward and backward, same results as eager."""

import torch
import torch._dynamo.testing

import torch_mla
from samples import fp8_cache

D_QK, D_V = 32, 16


def _inputs(s_q, seed=0):
    g = torch.Generator().manual_seed(seed)
    s_kv, topk, h_q = 2 * s_q + 3, 6, 4
    t = {}
    t["q"] = torch.randn(s_q, h_q, D_QK, generator=g, requires_grad=True)
    t["kv"] = torch.randn(s_kv, 1, D_QK, generator=g, requires_grad=True)
    t["idx"] = torch.randint(-1, s_kv + 1, (s_q, 1, topk), generator=g, dtype=torch.int32)
    t["sink"] = torch.randn(h_q, generator=g, requires_grad=True)
    t["lens"] = torch.randint(0, topk + 1, (s_q,), generator=g, dtype=torch.int32)
    # dense prefill: two sequences, GQA
    t["pq"] = torch.randn(s_q + 2, 4, 24, generator=g, requires_grad=True)
    t["pk"] = torch.randn(s_q + 4, 2, 24, generator=g, requires_grad=True)
    t["pv"] = torch.randn(s_q + 4, 2, 8, generator=g, requires_grad=True)
    t["cu_q"] = torch.tensor([0, 2, s_q + 2], dtype=torch.int32)
    t["cu_k"] = torch.tensor([0, 3, s_q + 4], dtype=torch.int32)
    # FP8 cache (V32), new rows to write, sparse decode queries
    t["cache"] = fp8_cache("v32", 3, 4, seed)
    t["new_kv"] = torch.randn(s_q, 576, generator=g).to(torch.bfloat16)
    t["slots"] = torch.arange(s_q, dtype=torch.int64) - 1  # first slot -1: skipped
    t["dq"] = torch.randn(2, 1, 4, 576, generator=g).to(torch.bfloat16)
    t["didx"] = torch.randint(-1, 12, (2, 1, 8), generator=g, dtype=torch.int32)
    t["dlens"] = torch.tensor([8, 5], dtype=torch.int32)
    # dense decode
    t["ddq"] = torch.randn(2, 2, 4, D_QK, generator=g)
    t["dcache"] = torch.randn(6, 4, 1, D_QK, generator=g)
    t["table"] = torch.randperm(6, generator=g).to(torch.int32).view(2, 3)
    t["seqlens"] = torch.tensor([7, 12], dtype=torch.int32)
    return t


def every_op(t, max_q, max_k):
    out, max_logits, lse = torch_mla.sparse_prefill(
        t["q"], t["kv"], t["idx"], d_v=D_V, attn_sink=t["sink"], topk_length=t["lens"])
    pout, plse = torch_mla.dense_prefill(t["pq"], t["pk"], t["pv"], t["cu_q"], t["cu_k"],
                                         max_q, max_k, causal=True)
    cache = t["cache"].clone()
    torch_mla.write_kv_cache(cache, t["new_kv"], t["slots"], "v32")
    cache = torch_mla.quantize_kv_cache(torch_mla.dequantize_kv_cache(cache, "v32"), "v32")
    sched = torch_mla.decode_schedule(t["dlens"], num_parts=4)
    dout, dlse = torch_mla.sparse_decode(t["dq"], cache, t["didx"], topk_length=t["dlens"],
                                         schedule=sched)
    sched2 = torch_mla.decode_schedule(t["seqlens"], num_parts=4)
    ddout, ddlse = torch_mla.dense_decode(t["ddq"], t["dcache"], t["table"], t["seqlens"],
                                          d_v=D_V, causal=True, schedule=sched2)
    finite = lambda x: torch.where(torch.isfinite(x), x, torch.zeros_like(x))  # noqa: E731
    loss = (out.float().square().sum() + finite(lse).sum() + pout.square().sum()
            + finite(plse).sum())
    return loss, (out, max_logits, lse, pout, plse, dout, dlse, ddout, ddlse)


def _grads(t, loss):
    leaves = [t[k] for k in ("q", "kv", "sink", "pq", "pk", "pv")]
    return torch.autograd.grad(loss, leaves)


def test_every_op_compiles_fullgraph_dynamic_and_matches_eager():
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(every_op, backend=counter, fullgraph=True, dynamic=True)
    for s_q in (5, 7):  # two sizes: dynamic shapes, no recompile
        t = _inputs(s_q, seed=s_q)
        loss_e, outs_e = every_op(t, 4, 5 + s_q)
        grads_e = _grads(t, loss_e)
        loss_c, outs_c = compiled(t, 4, 5 + s_q)
        grads_c = _grads(t, loss_c)
        for a, b in zip(outs_e, outs_c):
            torch.testing.assert_close(a, b, equal_nan=True)
        for a, b in zip(grads_e, grads_c):
            torch.testing.assert_close(a, b)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"


def test_no_graph_breaks_reported_by_dynamo_explain():
    t = _inputs(5)
    explanation = torch._dynamo.explain(every_op)(t, 4, 10)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
