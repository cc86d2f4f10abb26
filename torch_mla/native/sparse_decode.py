"""Native ``mla::sparse_decode`` (csrc/sm90/sparse_decode): the Python half of the C call.

Per call: two ``torch.empty`` (out and lse, returned: always new; on the current stream, so
CUDA-graph capture takes them from the graph's pool), the workspace (scratch: a buffer kept per
thread and stream and reused, or new under capture, see ``torch_mla._eager.workspace``), one
current-stream query, one ``struct.pack`` of the parameter struct, one ctypes call that launches
[schedule] -> main kernel -> combine on the current stream. Nothing syncs the host. The struct's field order is csrc/include/torch_mla_native.h's
``tmla_sparse_decode_params``: 38 fields of 8 bytes (int64, one double: sm_scale).

``prepare`` does the per-shape part once (sizes, strides, layout, workspace size, which inputs
need a copy); the eager fast path (torch_mla._eager) keeps the function it returns for every
call with the same metadata, and the op's kernel runs both each time.
"""

from __future__ import annotations

import struct
from typing import List

import torch

from .._device import decode_parts
from ..meta.layouts import MODEL1, V32, alignment_reasons
from .. import _dispatch
from .._eager import workspace
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


def _cache_dims(cache: torch.Tensor, layout):
    nb, bs = cache.shape[0], cache.shape[1]
    stride0 = cache.stride(0) if nb > 1 else layout.block_bytes(bs)  # bytes: 1-byte dtype
    return nb, bs, stride0


# The current stream's cudaStream_t and the current device: what torch.cuda.current_stream(dev)
# .cuda_stream and torch.cuda.current_device() return, without building a Stream object and
# re-checking CUDA's initialization (~2-3 us of host time per call); Triton's driver reads the
# stream the same way. Module attributes: tools/host_overhead.py stands in for them on a CPU.
_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream",
                          lambda index: torch.cuda.current_stream(index).cuda_stream)
_current_device = getattr(torch._C, "_cuda_getDevice", lambda: torch.cuda.current_device())
_F32 = torch.float32
_U8 = torch.uint8
_ERR_LEN = _lib._ERR_LEN  # every thread's error buffer has this size


def prepare(q, k_cache, indices, topk_length=None, attn_sink=None, extra_k_cache=None,
            extra_indices=None, extra_topk_length=None, d_v=512, sm_scale=1.0,
            schedule_metadata=None, num_splits=None):
    """``run(*args)`` for this call and every call whose tensors have the same shapes, strides,
    dtypes, device and None-ness, and the same d_v (what ``run`` takes from here)."""
    lib = _lib.get()
    if lib is None:  # supports() said yes, so this is a forced backend after a failed load
        raise RuntimeError(f"torch_mla native: {_lib.reason()}")
    b, s_q, h_q, d_qk = q.shape
    dev, dtype = q.device, q.dtype
    if b * s_q * h_q == 0:
        def run_empty(q, *args):
            return (torch.empty(b, s_q, h_q, d_v, dtype=dtype, device=dev),
                    torch.empty(b, h_q, s_q, dtype=_F32, device=dev))
        return run_empty
    layout = V32 if d_qk == V32.d else MODEL1
    has_schedule = schedule_metadata is not None
    if has_schedule:
        num_parts = schedule_metadata.shape[0]
        copy_schedule = not (schedule_metadata.is_contiguous() and num_splits.is_contiguous())
    else:
        # decode_schedule's default for this call: one (part, token, 64 heads) job per CTA slot
        # of the persistent kernel (V32 b=128 s_q=2 h_q=128 on the H100: 395 us with 33 parts,
        # ~426 with 66; the first, non-persistent kernel preferred 66)
        num_parts = decode_parts(dev, h_q, s_q)
        copy_schedule = False
    ws_bytes = workspace_bytes(b, s_q, h_q, num_parts, has_schedule)
    qs0, qs1, qs2 = q.stride()[:3]
    knb, kbs, kst = _cache_dims(k_cache, layout)
    topk = indices.shape[-1]
    is0, is1 = indices.stride(0), indices.stride(1)
    has_extra = extra_k_cache is not None
    if has_extra:
        enb, ebs, est = _cache_dims(extra_k_cache, layout)
        etopk = extra_indices.shape[-1]
        eis0, eis1 = extra_indices.stride(0), extra_indices.stride(1)
    else:
        enb = ebs = est = etopk = eis0 = eis1 = 0
    # lengths, sink and schedule are read as flat f32 / int32 arrays: copied per call only when
    # they are not (a contiguous f32 sink or int32 vector is passed as it is)
    copy_lens = topk_length is not None and not topk_length.is_contiguous()
    copy_elens = (has_extra and extra_topk_length is not None
                  and not extra_topk_length.is_contiguous())
    has_sink = attn_sink is not None
    convert_sink = has_sink and not (attn_sink.dtype is _F32 and attn_sink.is_contiguous())
    index = dev.index  # None only for CPU tensors, i.e. under tools/host_overhead.py
    abi, nbytes, pack = _lib.ABI_VERSION, _STRUCT_BYTES, _FMT.pack
    tls, err_buffer = _lib._tls, _lib.err_buffer

    def run(q, k_cache, indices, topk_length=None, attn_sink=None, extra_k_cache=None,
            extra_indices=None, extra_topk_length=None, d_v=d_v, sm_scale=1.0,
            schedule_metadata=None, num_splits=None):
        out = torch.empty(b, s_q, h_q, d_v, dtype=dtype, device=dev)
        lse = torch.empty(b, h_q, s_q, dtype=_F32, device=dev)
        if index is not None and index != _current_device():
            stream = None  # asked under the device guard below
        else:
            stream = _current_stream(index)
        # scratch, reused on this stream (torch_mla._eager.workspace says why that is safe);
        # ws keeps it alive until the launches are queued
        ws, ws_ptr = workspace(ws_bytes, dev, index, stream)
        # Zero-size tensors may have a NULL data pointer; the library never reads them (topk 0
        # or no slots), so any valid address stands in.
        dummy = q.data_ptr()
        if has_schedule:
            if copy_schedule:
                schedule_metadata = schedule_metadata.contiguous()
                num_splits = num_splits.contiguous()
            sched_ptr, splits_ptr = schedule_metadata.data_ptr(), num_splits.data_ptr()
        else:
            sched_ptr = splits_ptr = 0
        if topk_length is None:
            lens_ptr = 0
        else:
            if copy_lens:
                topk_length = topk_length.contiguous()
            lens_ptr = topk_length.data_ptr()
        if has_extra:
            ec = extra_k_cache.data_ptr() or dummy
            eidx = extra_indices.data_ptr() or dummy
            if extra_topk_length is None:
                elen = 0
            else:
                if copy_elens:
                    extra_topk_length = extra_topk_length.contiguous()
                elen = extra_topk_length.data_ptr()
        else:
            ec = eidx = elen = 0
        if has_sink:
            if convert_sink:
                attn_sink = attn_sink.to(_F32).contiguous()
            sink_ptr = attn_sink.data_ptr()
        else:
            sink_ptr = 0
        params = pack(
            abi, nbytes, b, s_q, h_q, d_qk, d_v, topk, etopk, sm_scale,
            dummy, qs0, qs1, qs2,
            k_cache.data_ptr() or dummy, knb, kbs, kst,
            indices.data_ptr() or dummy, is0, is1,
            lens_ptr,
            ec, enb, ebs, est,
            eidx, eis0, eis1, elen,
            sink_ptr,
            sched_ptr, splits_ptr, num_parts,
            out.data_ptr(), lse.data_ptr(), ws_ptr, ws_bytes)
        try:
            err = tls.buf  # this thread's error buffer (made by err_buffer() on first use)
        except AttributeError:
            err = err_buffer()
        if stream is None:
            with torch.cuda.device(index):  # the library launches on the current device's context
                rc = lib.sparse_decode(params, _current_stream(index), err, _ERR_LEN)
        else:
            rc = lib.sparse_decode(params, stream, err, _ERR_LEN)
        if rc != 0:
            raise RuntimeError(f"torch_mla native sparse_decode failed (code {rc}): "
                               f"{err.value.decode(errors='replace')}")
        return out, lse

    return run


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


sparse_decode = _dispatch.prepared_impl(prepare)
register("sparse_decode", sparse_decode, supports, prepare)
