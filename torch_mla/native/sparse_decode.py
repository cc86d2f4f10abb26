"""Native ``mla::sparse_decode`` (csrc/sm90/sparse_decode): the Python half of the C call.

Per call: three ``torch.empty`` (out, lse, workspace; on the current stream, so CUDA-graph
capture takes them from the graph's pool), one ``struct.pack`` of the parameter struct, one
ctypes call that launches [schedule] -> main kernel -> combine on the current stream. Nothing
syncs the host. The struct's field order is csrc/include/torch_mla_native.h's
``tmla_sparse_decode_params``: 38 fields of 8 bytes (int64, one double: sm_scale).
"""

from __future__ import annotations

import struct
from typing import List

import torch

from .._device import decode_parts
from ..meta.layouts import MODEL1, V32, alignment_reasons
from . import _lib, register

_FMT = struct.Struct("<9qd28q")
_STRUCT_BYTES = _FMT.size  # 304
_D_V_MAX = 512
_ALIGN = 256


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def workspace_bytes(b: int, s_q: int, h_q: int, num_parts: int, has_schedule: bool) -> int:
    """Mirror of tmla_sparse_decode_workspace_bytes (tests compare the two): split-KV partial
    outputs [b + num_parts, s_q, h_q, 512] f32 and their lse, plus, without a caller schedule,
    the schedule the library computes (metadata, num_splits and b ints of scratch)."""
    n_ws = b + num_parts
    n = _align(n_ws * s_q * h_q * _D_V_MAX * 4) + _align(n_ws * s_q * h_q * 4)
    if not has_schedule:
        n += _align((num_parts * 8 + (b + 1) + b) * 4)
    return n


def _cache_args(cache: torch.Tensor, layout, dummy: int):
    nb, bs = cache.shape[0], cache.shape[1]
    stride0 = cache.stride(0) if nb > 1 else layout.block_bytes(bs)  # bytes: 1-byte dtype
    return cache.data_ptr() or dummy, nb, bs, stride0


def sparse_decode(q, k_cache, indices, topk_length=None, attn_sink=None, extra_k_cache=None,
                  extra_indices=None, extra_topk_length=None, d_v=512, sm_scale=1.0,
                  schedule_metadata=None, num_splits=None):
    lib = _lib.get()
    if lib is None:  # supports() said yes, so this is a forced backend after a failed load
        raise RuntimeError(f"torch_mla native: {_lib.reason()}")
    b, s_q, h_q, d_qk = q.shape
    dev = q.device
    out = torch.empty((b, s_q, h_q, d_v), dtype=q.dtype, device=dev)
    lse = torch.empty((b, h_q, s_q), dtype=torch.float32, device=dev)
    if b * s_q * h_q == 0:
        return out, lse
    layout = V32 if d_qk == V32.d else MODEL1
    if schedule_metadata is None:
        # decode_schedule's default (one wave of 64-head parts; the grid's s_q axis adds waves,
        # which measured faster than dividing the parts by s_q: 454 vs 471 us at V32 b=64 s_q=2
        # h_q=128 on the H100)
        num_parts = decode_parts(dev, h_q)
        sched_ptr = splits_ptr = 0
    else:
        schedule_metadata = schedule_metadata.contiguous()
        num_splits = num_splits.contiguous()
        num_parts = schedule_metadata.shape[0]
        sched_ptr, splits_ptr = schedule_metadata.data_ptr(), num_splits.data_ptr()
    ws_bytes = workspace_bytes(b, s_q, h_q, num_parts, schedule_metadata is not None)
    ws = torch.empty((ws_bytes,), dtype=torch.uint8, device=dev)

    # Zero-size tensors may have a NULL data pointer; the library never reads them (topk 0 or
    # no slots), so any valid address stands in.
    dummy = q.data_ptr()
    kc, knb, kbs, kst = _cache_args(k_cache, layout, dummy)
    if topk_length is not None:
        topk_length = topk_length.contiguous()
    if extra_k_cache is not None:
        ec, enb, ebs, est = _cache_args(extra_k_cache, layout, dummy)
        eidx, etopk = extra_indices.data_ptr() or dummy, extra_indices.shape[-1]
        eis0, eis1 = extra_indices.stride(0), extra_indices.stride(1)
        if extra_topk_length is not None:
            extra_topk_length = extra_topk_length.contiguous()
        elen = extra_topk_length.data_ptr() if extra_topk_length is not None else 0
    else:
        ec = enb = ebs = est = eidx = etopk = eis0 = eis1 = elen = 0
    if attn_sink is not None:
        attn_sink = attn_sink.to(torch.float32).contiguous()

    params = _FMT.pack(
        _lib.ABI_VERSION, _STRUCT_BYTES, b, s_q, h_q, d_qk, d_v, indices.shape[-1], etopk,
        float(sm_scale),
        q.data_ptr(), q.stride(0), q.stride(1), q.stride(2),
        kc, knb, kbs, kst,
        indices.data_ptr() or dummy, indices.stride(0), indices.stride(1),
        topk_length.data_ptr() if topk_length is not None else 0,
        ec, enb, ebs, est,
        eidx, eis0, eis1, elen,
        attn_sink.data_ptr() if attn_sink is not None else 0,
        sched_ptr, splits_ptr, num_parts,
        out.data_ptr(), lse.data_ptr(), ws.data_ptr(), ws_bytes)
    err = _lib.err_buffer()
    if dev.index is not None and dev.index != torch.cuda.current_device():
        with torch.cuda.device(dev):  # the library launches on the current device's context
            rc = lib.sparse_decode(params, torch.cuda.current_stream(dev).cuda_stream, err, len(err))
    else:
        rc = lib.sparse_decode(params, torch.cuda.current_stream(dev).cuda_stream, err, len(err))
    if rc != 0:
        raise RuntimeError(f"torch_mla native sparse_decode failed (code {rc}): "
                           f"{err.value.decode(errors='replace')}")
    return out, lse


def _aligned(name: str, cache: torch.Tensor) -> List[str]:
    return alignment_reasons(name, cache, "the kernel gathers tokens with 16-byte cp.async")


def supports(q, k_cache, indices, topk_length=None, attn_sink=None, extra_k_cache=None,
             extra_indices=None, extra_topk_length=None, d_v=512, sm_scale=1.0,
             schedule_metadata=None, num_splits=None) -> List[str]:
    reasons = []
    if q.dtype != torch.bfloat16:
        reasons.append(f"q dtype {str(q.dtype).replace('torch.', '')}: the native kernel takes "
                       "bf16 (keys are dequantized to bf16 for bf16 tensor-core MMA)")
    if d_v > _D_V_MAX:
        reasons.append(f"d_v={d_v} > {_D_V_MAX}: the kernel accumulates 512 value columns")
    b, s_q, h_q, _ = q.shape
    if s_q > 65535 or h_q > 65535:
        reasons.append(f"s_q={s_q} / h_q={h_q} above 65535 (CUDA grid limits)")
    if schedule_metadata is not None and schedule_metadata.shape[0] > 65535:
        reasons.append(f"schedule with {schedule_metadata.shape[0]} parts (at most 65535)")
    if b * s_q >= 2 ** 31 or b + (schedule_metadata.shape[0] if schedule_metadata is not None
                                  else 0) >= 2 ** 31:
        reasons.append("b * s_q must be < 2^31")
    if q.data_ptr() % 16 or any(st % 8 for st in q.stride()[:3]):
        reasons.append("q rows must be 16-byte aligned (data_ptr % 16 == 0 and strides of b, "
                       f"s_q, h_q multiples of 8; got strides {tuple(q.stride())})")
    reasons += _aligned("k_cache", k_cache)
    if extra_k_cache is not None:
        reasons += _aligned("extra_k_cache", extra_k_cache)
    return reasons


register("sparse_decode", sparse_decode, supports)
