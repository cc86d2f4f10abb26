"""Bad inputs raise a clear error naming the argument, before any backend runs."""

import pytest
import torch

import torch_mla
from samples import SAMPLES


def _first(op, name=None):
    cases = SAMPLES[op]()
    for n, args in cases:
        if name is None or n == name:
            return list(args)
    raise KeyError(name)


def _replace(args, i, value):
    args = list(args)
    args[i] = value
    return args


def _bad_cases():
    sp = _first("sparse_prefill", "sink_topk_length")  # q, kv, indices, scale, d_v, sink, lens
    q, kv, idx = sp[0], sp[1], sp[2]
    yield "sparse_prefill", _replace(sp, 0, q.to(torch.int32)), "q must have dtype"
    yield "sparse_prefill", _replace(sp, 1, kv.to(torch.float64)), "kv must have the dtype of q"
    yield "sparse_prefill", _replace(sp, 0, q[0]), "q must be 3-D"
    yield "sparse_prefill", _replace(sp, 1, kv[..., :-1]), "kv.shape[2]"
    yield "sparse_prefill", _replace(sp, 2, idx[:-1]), "indices.shape[0]"
    yield "sparse_prefill", _replace(sp, 2, idx.to(torch.int64)), "indices must have dtype int32"
    yield "sparse_prefill", _replace(sp, 0, q.transpose(1, 2).contiguous().transpose(1, 2)), \
        "q must be contiguous in its last dimension"
    yield "sparse_prefill", _replace(sp, 1, kv.to("meta")), "kv must be on the device of q"
    yield "sparse_prefill", _replace(sp, 4, 10_000), "d_v must be in"
    yield "sparse_prefill", _replace(sp, 3, float("nan")), "sm_scale must be a finite number"
    yield "sparse_prefill", _replace(sp, 5, sp[5][:-1]), "attn_sink must have shape"
    yield "sparse_prefill", _replace(sp, 6, sp[6].to(torch.int64)), "topk_length must have dtype int32"
    yield "sparse_prefill", _replace(sp, 1, kv.expand(-1, 3, -1)), "must be a multiple of kv heads"

    sd = _first("sparse_decode", "model1_extra")
    q, cache = sd[0], sd[1]
    v32_cache = SAMPLES["sparse_decode"]()[0][1][1]
    yield "sparse_decode", _replace(sd, 1, v32_cache), "k_cache.shape[3] must be 584"
    yield "sparse_decode", _replace(sd, 0, torch.randn(2, 2, 4, 100)), "d_qk) must be 576"
    yield "sparse_decode", _replace(sd, 1, cache.view(torch.int8)), "k_cache must have dtype"
    yield "sparse_decode", _replace(sd, 2, sd[2].to(torch.int64)), "indices must have dtype int32"
    yield "sparse_decode", _replace(sd, 6, None), "extra_k_cache and extra_indices must be given"
    yield "sparse_decode", _replace(sd, 3, sd[3][:1]), "topk_length must have shape"
    yield "sparse_decode", _replace(sd, 10, torch.zeros(4, 8, dtype=torch.int32)), \
        "schedule_metadata and num_splits must be given together"
    yield "sparse_decode", [*sd[:10], torch.zeros(4, 8, dtype=torch.int32),
                            torch.zeros(7, dtype=torch.int32)], "num_splits must have shape"

    dd = _first("dense_decode", "gqa")
    yield "dense_decode", _replace(dd, 2, dd[2].to(torch.int64)), "block_table must have dtype int32"
    yield "dense_decode", _replace(dd, 3, dd[3][:1]), "cache_seqlens must have shape"
    yield "dense_decode", _replace(dd, 1, dd[1].to(torch.float16)), "k_cache must have the dtype"

    dp = _first("dense_prefill", "causal_gqa")
    yield "dense_prefill", _replace(dp, 2, dp[2][:-1]), "v.shape[0]"
    yield "dense_prefill", _replace(dp, 4, dp[4][:-1]), "cu_seqlens_k.shape[0]"
    yield "dense_prefill", _replace(dp, 3, dp[3].to(torch.int64)), "cu_seqlens_q must have dtype int32"

    qz = _first("quantize_kv_cache", "v32")
    yield "quantize_kv_cache", _replace(qz, 1, "fp8"), "layout must be one of"
    yield "quantize_kv_cache", _replace(qz, 1, "model1"), "kv.shape[3]"
    dq = _first("dequantize_kv_cache", "model1")
    yield "dequantize_kv_cache", _replace(dq, 1, "v32"), "k_cache.shape[3] must be 656"
    wr = _first("write_kv_cache", "v32")
    yield "write_kv_cache", _replace(wr, 2, wr[2].to(torch.int32)), "slot_mapping must have dtype int64"
    yield "write_kv_cache", _replace(wr, 1, wr[1][:, :512]), "kv.shape[1]"
    yield "decode_schedule", [torch.zeros(3, dtype=torch.int64), 4, 64], "seqlens must have dtype int32"
    yield "decode_schedule", [torch.zeros(3, dtype=torch.int32), 0, 64], "num_parts must be >= 1"


@pytest.mark.parametrize("op,args,message", list(_bad_cases()),
                         ids=lambda x: x if isinstance(x, str) and " " not in x else "")
def test_bad_input_names_the_argument(op, args, message):
    with pytest.raises(RuntimeError, match=None) as info:
        getattr(torch.ops.mla, op)(*args)
    assert message in str(info.value), str(info.value)


def test_overlapping_cache_blocks_are_rejected_but_dense_ones_accepted():
    """Blocks may be padded (FlashMLA's MODEL1 caches are) or dense (a clone()), never overlap."""
    padded = SAMPLES["dequantize_kv_cache"]()[1][1][0]  # model1, 2 blocks of 5 tokens, padded
    assert padded.stride(0) == 3456 > 5 * 584
    dense = padded.clone()
    assert dense.stride(0) == 5 * 584
    torch.testing.assert_close(torch_mla.dequantize_kv_cache(dense, "model1"),
                               torch_mla.dequantize_kv_cache(padded, "model1"))
    overlapping = dense.view(-1)[: 6 * 584].as_strided((2, 5, 1, 584), (584, 584, 584, 1))
    with pytest.raises(RuntimeError, match=r"k_cache.stride\(0\) must be at least 2920"):
        torch_mla.dequantize_kv_cache(overlapping, "model1")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown torch_mla backend"):
        with torch_mla.use_backend("cudnn"):
            pass
