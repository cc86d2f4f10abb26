"""The public functions of torch_mla: thin wrappers that fill defaults and call ``torch.ops.mla``.

Each ``_<op>_args`` helper turns the public arguments into the op's positional arguments; the
public function and ``explain`` share it, so both see exactly the same call.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from . import _dispatch, _eager
from ._device import decode_parts
from . import indexer as _indexer

Tensor = torch.Tensor
_is_compiling = torch.compiler.is_compiling


class DecodeSchedule(NamedTuple):
    """How decode work is split across the GPU (see ``decode_schedule``). Pass it to every layer
    of a decode step whose key counts are the same."""

    metadata: Tensor  # [num_parts, 8] int32
    num_splits: Tensor  # [b + 1] int32


def _schedule_args(schedule: Optional[DecodeSchedule]):
    if schedule is None:
        return None, None
    return schedule.metadata, schedule.num_splits


def _sparse_prefill_args(q, kv, indices, sm_scale=None, d_v=512, attn_sink=None, topk_length=None):
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    return (q, kv, indices, float(sm_scale), int(d_v), attn_sink, topk_length)


def sparse_prefill(q: Tensor, kv: Tensor, indices: Tensor, sm_scale: Optional[float] = None,
                   d_v: int = 512, attn_sink: Optional[Tensor] = None,
                   topk_length: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Sparse MLA attention over a bf16 KV (prefill of DeepSeek-V3.2 / V4), differentiable.

    Args:
        q: ``[s_q, h_q, d_qk]`` (d_qk 576 or 512 in DeepSeek models).
        kv: ``[s_kv, h_kv, d_qk]``; the values are ``kv[..., :d_v]``.
        indices: ``[s_q, h_kv, topk]`` int32 rows of ``kv`` each query attends to. An index that
            is negative, ``>= s_kv``, or at a position ``>= topk_length[i]`` is skipped (never read).
            A duplicated index counts once per occurrence.
        sm_scale: logit scale, default ``d_qk ** -0.5``.
        d_v: value width (512 for DeepSeek).
        attn_sink: ``[h_q]`` f32; multiplies out by ``exp(lse) / (exp(lse) + exp(attn_sink))``.
        topk_length: ``[s_q]`` int32; query i uses only its first ``topk_length[i]`` indices.

    Returns:
        ``out [s_q, h_q, d_v]`` (q's dtype), ``max_logits [s_q, h_q]`` f32 and ``lse [s_q, h_q]``
        f32 (f64 for f64 q), both of the scaled logits, natural log. A query with no valid key gets out 0,
        max_logits -inf and lse +inf. Gradients reach q, kv and attn_sink from out and lse.

    Memory of the backward on a GPU (Triton): beside dq and dkv, an fp32 ``[s_kv, h_kv, d_qk]``
    accumulator for dkv (keys shared by many queries add up atomically, so the sums are not
    bitwise reproducible run to run; under ``torch.use_deterministic_algorithms(True)`` that
    backward raises, or warns with ``warn_only=True``, and the reference backend is the
    deterministic one) and, for up to 128 heads per kv head, a scratch buffer of at most 512 MiB
    (2 bytes x 2 x h_q x topk per query, queries processed in chunks).
    """
    return torch.ops.mla.sparse_prefill(*_sparse_prefill_args(
        q, kv, indices, sm_scale, d_v, attn_sink, topk_length))


def _sparse_decode_args(q, k_cache, indices, *, topk_length=None, attn_sink=None,
                        extra_k_cache=None, extra_indices=None, extra_topk_length=None, d_v=512,
                        sm_scale=None, schedule=None):
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    return (q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices,
            extra_topk_length, int(d_v), float(sm_scale), *_schedule_args(schedule))


def sparse_decode(q: Tensor, k_cache: Tensor, indices: Tensor, *,
                  topk_length: Optional[Tensor] = None, attn_sink: Optional[Tensor] = None,
                  extra_k_cache: Optional[Tensor] = None, extra_indices: Optional[Tensor] = None,
                  extra_topk_length: Optional[Tensor] = None, d_v: int = 512,
                  sm_scale: Optional[float] = None,
                  schedule: Optional[DecodeSchedule] = None) -> Tuple[Tensor, Tensor]:
    """Sparse MLA decoding over a paged FP8 KV cache (DeepSeek-V3.2 and "MODEL1"/V4).

    Args:
        q: ``[b, s_q, h_q, d_qk]``; d_qk 576 selects the V32 cache layout, 512 the MODEL1 layout.
        k_cache: packed FP8 cache ``[num_blocks, block_size, 1, bytes]`` (656 B per token for V32,
            584 for MODEL1), as made by ``quantize_kv_cache`` / ``write_kv_cache``.
        indices: ``[b, s_q, topk]`` int32 in-cache positions ``block * block_size + offset``;
            negative or out-of-cache entries are skipped.
        topk_length: ``[b]`` int32; batch i uses only its first ``topk_length[i]`` indices.
        attn_sink: ``[h_q]`` f32, as in ``sparse_prefill``.
        extra_k_cache, extra_indices ``[b, s_q, extra_topk]``, extra_topk_length ``[b]``: a second
            key set (own block size, same layout); the softmax runs over both.
        d_v: value width (512). sm_scale: default ``d_qk ** -0.5``.
        schedule: a ``DecodeSchedule`` from ``decode_schedule`` (optional).

    Returns:
        ``out [b, s_q, h_q, d_v]`` (q's dtype) and ``lse [b, h_q, s_q]`` f32 (f64 for f64 q; +inf where a query
        has no valid key; its out is 0).
    """
    # Eager calls on plain tensors skip the dispatcher, the checks and the backend choice when
    # an earlier call with the same metadata made them (torch_mla._eager says when, and why the
    # result is the same). Dynamo folds is_compiling() to True: compiled code traces the op.
    if not _is_compiling():
        res = _eager.sparse_decode(q, k_cache, indices, topk_length, attn_sink, extra_k_cache,
                                   extra_indices, extra_topk_length, d_v, sm_scale, schedule)
        if res is not None:
            return res
    return torch.ops.mla.sparse_decode(*_sparse_decode_args(
        q, k_cache, indices, topk_length=topk_length, attn_sink=attn_sink,
        extra_k_cache=extra_k_cache, extra_indices=extra_indices,
        extra_topk_length=extra_topk_length, d_v=d_v, sm_scale=sm_scale, schedule=schedule))


def _dense_decode_args(q, k_cache, block_table, cache_seqlens, *, d_v=512, sm_scale=None,
                       causal=False, schedule=None):
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    return (q, k_cache, block_table, cache_seqlens, int(d_v), float(sm_scale), bool(causal),
            *_schedule_args(schedule))


def dense_decode(q: Tensor, k_cache: Tensor, block_table: Tensor, cache_seqlens: Tensor, *,
                 d_v: int = 512, sm_scale: Optional[float] = None, causal: bool = False,
                 schedule: Optional[DecodeSchedule] = None) -> Tuple[Tensor, Tensor]:
    """Dense MLA decoding over a paged bf16/fp16 cache.

    Args:
        q: ``[b, s_q, h_q, d_qk]`` (576 for DeepSeek).
        k_cache: ``[num_blocks, block_size, h_kv, d_qk]``, q's dtype; values are ``[..., :d_v]``.
        block_table: ``[b, max_blocks]`` int32. cache_seqlens: ``[b]`` int32.
        causal: with s_q > 1, query i sees keys ``[0, cache_seqlens - s_q + i + 1)``.
        schedule: a ``DecodeSchedule`` from ``decode_schedule(cache_seqlens, h_q=, s_q=)``
            (optional).

    Returns:
        ``out [b, s_q, h_q, d_v]`` and ``lse [b, h_q, s_q]`` f32 (f64 for f64 q).
    """
    return torch.ops.mla.dense_decode(*_dense_decode_args(
        q, k_cache, block_table, cache_seqlens, d_v=d_v, sm_scale=sm_scale, causal=causal,
        schedule=schedule))


def _dense_prefill_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                        sm_scale=None, causal=False):
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    return (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, float(sm_scale),
            bool(causal))


def dense_prefill(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                  max_seqlen_q: int, max_seqlen_k: int, *, sm_scale: Optional[float] = None,
                  causal: bool = False) -> Tuple[Tensor, Tensor]:
    """Dense varlen attention in MHA mode (DeepSeek prefill: d_qk 192, d_v 128), differentiable.

    Args:
        q: ``[t_q, h_q, d_qk]``; k: ``[t_k, h_k, d_qk]``; v: ``[t_k, h_k, d_v]``; GQA when
            ``h_q % h_k == 0``.
        cu_seqlens_q, cu_seqlens_k: ``[b + 1]`` int32 prefix sums of the sequence lengths.
        max_seqlen_q, max_seqlen_k: upper bounds of the lengths.
        causal: bottom-right aligned mask (query i of s_q sees keys ``j <= i + s_k - s_q``).

    Returns:
        ``out [t_q, h_q, d_v]`` and ``lse [t_q, h_q]`` f32 (f64 for f64 q). Gradients reach q, k, v.
    """
    return torch.ops.mla.dense_prefill(*_dense_prefill_args(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sm_scale=sm_scale,
        causal=causal))


def _quantize_kv_cache_args(kv, layout):
    return (kv, layout)


def quantize_kv_cache(kv: Tensor, layout: str) -> Tensor:
    """Pack a bf16 cache ``[num_blocks, block_size, 1, d]`` into FP8, byte-compatible with
    FlashMLA. ``layout``: "v32" (d 576, 656 B/token) or "model1" (d 512, 584 B/token, blocks
    padded to 576 B). Returns a float8_e4m3fn tensor ``[num_blocks, block_size, 1, bytes]``."""
    return torch.ops.mla.quantize_kv_cache(kv, layout)


def _dequantize_kv_cache_args(k_cache, layout):
    return (k_cache, layout)


def dequantize_kv_cache(k_cache: Tensor, layout: str) -> Tensor:
    """Unpack an FP8 cache into bf16 ``[num_blocks, block_size, 1, d]``."""
    return torch.ops.mla.dequantize_kv_cache(k_cache, layout)


def _write_kv_cache_args(k_cache, kv, slot_mapping, layout):
    return (k_cache, kv, slot_mapping, layout)


def write_kv_cache(k_cache: Tensor, kv: Tensor, slot_mapping: Tensor, layout: str) -> None:
    """Quantize ``kv [n, d]`` and write row i into slot ``slot_mapping[i]`` (int64,
    ``block * block_size + offset``) of ``k_cache``, in place. Slot -1 is skipped; no other byte
    of the cache changes."""
    torch.ops.mla.write_kv_cache(k_cache, kv, slot_mapping, layout)


def _decode_schedule_args(seqlens, *, num_parts=None, block_n=64, h_q=None, s_q=None):
    if num_parts is None:
        num_parts = decode_parts(seqlens.device, h_q, s_q)
    return (seqlens, int(num_parts), int(block_n))


def decode_schedule(seqlens: Tensor, *, num_parts: Optional[int] = None, block_n: int = 64,
                    h_q: Optional[int] = None, s_q: Optional[int] = None) -> DecodeSchedule:
    """Split decode work across the GPU, on the device (no host sync, CUDA-graph safe).

    Args:
        seqlens: ``[b]`` int32 keys per batch element: ``cache_seqlens`` for ``dense_decode``;
            for ``sparse_decode``, ``topk_length`` (plus ``extra_topk_length``) or the topk.
        num_parts: how many persistent workers share the work (default: the GPU's SM count,
            divided by the 64-head blocks of ``h_q`` and by ``s_q`` when they are given, as
            FlashMLA's ``get_mla_metadata`` counts ``s_q * h_q`` query rows).
        block_n: keys per block of work.
        h_q: query heads of the calls the schedule is for (``q.shape[2]``); pass it so that
            the default part count fills the GPU in one wave of 64-head programs.
        s_q: query tokens per batch element of those calls (``q.shape[1]``); pass it too, so
            that each (part, token, 64 heads) job has an SM of its own.

    Returns:
        ``DecodeSchedule(metadata [num_parts, 8], num_splits [b + 1])``, int32; the layout is
        documented in ``torch_mla.meta.schedule``. Compute it once per decode step and pass it to
        every layer.
    """
    return DecodeSchedule(*torch.ops.mla.decode_schedule(*_decode_schedule_args(
        seqlens, num_parts=num_parts, block_n=block_n, h_q=h_q, s_q=s_q)))


_ARGS = {
    "sparse_prefill": _sparse_prefill_args,
    "sparse_decode": _sparse_decode_args,
    "dense_decode": _dense_decode_args,
    "dense_prefill": _dense_prefill_args,
    "quantize_kv_cache": _quantize_kv_cache_args,
    "dequantize_kv_cache": _dequantize_kv_cache_args,
    "write_kv_cache": _write_kv_cache_args,
    "decode_schedule": _decode_schedule_args,
    **_indexer.ARGS,
}


def explain(op_name: str, *args, **kwargs) -> str:
    """Which backend runs ``op_name`` on these arguments (the public function's), and why each
    backend before it was skipped. Raises the op's own error for invalid inputs."""
    if op_name not in _ARGS:
        raise ValueError(f"unknown op {op_name!r}; choose one of {sorted(_ARGS)}")
    return _dispatch.explain_args(op_name, _ARGS[op_name](*args, **kwargs))
