"""FlashMLA's Python API (``flash_mla.flash_mla_interface``), implemented on torch_mla's ops.

A FlashMLA user switches by changing one import::

    import torch_mla.compat.flash_mla as flash_mla
    # or: from torch_mla.compat.flash_mla import get_mla_metadata, flash_mla_with_kvcache

The functions keep FlashMLA's names, argument order, defaults and return values; the work is done
by ``torch_mla.sparse_decode`` / ``dense_decode`` / ``sparse_prefill`` / ``dense_prefill``, so it
runs on any device torch_mla supports, under ``torch.compile`` and with autograd for the prefill
functions. FlashMLA's own package is never imported.

Differences worth knowing:
- A dense decode over an FP8 cache (``is_fp8_kvcache=True`` without ``indices``) is not
  implemented (torch_mla's FP8 caches are the sparse V32 / MODEL1 layouts); it raises
  ``NotImplementedError``.
- ``dropout_p`` must be 0 and ``deterministic`` False, as in FlashMLA, but a violation raises
  ``ValueError`` (FlashMLA asserts).
- Inconsistent reuse of a ``FlashMLASchedMeta`` raises ``AssertionError`` with FlashMLA's
  messages, also under ``python -O`` (they are explicit raises, not ``assert`` statements).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from .. import api

__all__ = [
    "FlashMLASchedMeta",
    "get_mla_metadata",
    "flash_mla_with_kvcache",
    "flash_mla_sparse_fwd",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
]

Tensor = torch.Tensor


@dataclasses.dataclass
class FlashMLASchedMeta:
    """Scheduling state shared by the ``flash_mla_with_kvcache`` calls of one decode step.

    As in FlashMLA it starts empty; the first call records its configuration (``config``) and the
    work split (``tile_scheduler_metadata`` / ``num_splits``, from ``torch_mla.decode_schedule``),
    and every later call must have the same configuration. Reuse one instance only while the
    shapes and the values of ``cache_seqlens`` / ``topk_length`` / ``extra_topk_length`` stay the
    same (typically: every layer of one decode step).
    """

    @dataclasses.dataclass
    class Config:
        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int

        causal: bool
        is_fp8_kvcache: bool
        topk: Optional[int]

        extra_page_block_size: Optional[int]
        extra_topk: Optional[int]

    have_initialized: bool = False
    config: Optional[Config] = None
    tile_scheduler_metadata: Optional[Tensor] = None  # [num_parts, 8] int32
    num_splits: Optional[Tensor] = None  # [b + 1] int32


def get_mla_metadata(*args, **kwargs) -> Tuple[FlashMLASchedMeta, None]:
    """An empty ``FlashMLASchedMeta``; the first ``flash_mla_with_kvcache`` call fills it.

    Arguments are accepted and ignored (FlashMLA keeps them for its older interface, which took
    ``cache_seqlens``, ``num_q_tokens_per_head_k`` and ``num_heads_k``). Returns
    ``(FlashMLASchedMeta(), None)``; only the first element is used.
    """
    return FlashMLASchedMeta(), None


def _require(cond: bool, msg: str) -> None:
    # FlashMLA uses ``assert``; raise the same exception type, but never compiled away by -O.
    if not cond:
        raise AssertionError(msg)


_INCONSISTENT = (" Your input arguments are inconsistent with sched_meta. Please make sure the "
                 "input arguments are consistent across different invocations of "
                 "flash_mla_with_kvcache on the same sched_meta.")


def _check_config(cfg: "FlashMLASchedMeta.Config", new: "FlashMLASchedMeta.Config") -> None:
    """Every field of the recorded config must equal the new call's (FlashMLA's messages)."""
    what = {
        "b": "batch_size (q.shape[0])",
        "s_q": "seq_len_q (q.shape[1])",
        "h_q": "num_heads_q (q.shape[2])",
        "page_block_size": "page_block_size (k_cache.shape[1])",
        "h_k": "num_heads_k (k_cache.shape[2])",
        "causal": "causal",
        "is_fp8_kvcache": "is_fp8_kvcache",
        "topk": "the last dim of indices_in_kvcache",
        "extra_page_block_size": "the page_block_size of extra_k_cache",
        "extra_topk": "the last dim of extra_indices_in_kvcache",
    }
    for field in dataclasses.fields(cfg):
        old_v, new_v = getattr(cfg, field.name), getattr(new, field.name)
        _require(old_v == new_v,
                 f"sched_meta.config.{field.name} must be equal to {what[field.name]}: it was "
                 f"{old_v} at the first call, got {new_v}." + _INCONSISTENT)


def _sparse_seqlens(q: Tensor, topk: int, topk_length: Optional[Tensor],
                    extra_topk: Optional[int], extra_topk_length: Optional[Tensor]) -> Tensor:
    """Keys per batch element of a sparse decode, what ``decode_schedule`` splits."""
    b = q.shape[0]
    n = (topk_length if topk_length is not None
         else torch.full((b,), topk, dtype=torch.int32, device=q.device))
    if extra_topk is not None:
        n = n + (extra_topk_length if extra_topk_length is not None
                 else torch.full((b,), extra_topk, dtype=torch.int32, device=q.device))
    return n.to(torch.int32)


def flash_mla_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    block_table: Optional[Tensor],
    cache_seqlens: Optional[Tensor],
    head_dim_v: int,
    tile_scheduler_metadata: FlashMLASchedMeta,
    num_splits: None = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: Optional[Tensor] = None,
    attn_sink: Optional[Tensor] = None,
    extra_k_cache: Optional[Tensor] = None,
    extra_indices_in_kvcache: Optional[Tensor] = None,
    topk_length: Optional[Tensor] = None,
    extra_topk_length: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """MLA decoding over a paged KV cache, FlashMLA's entry point.

    Sparse (``indices`` given; requires ``is_fp8_kvcache=True`` and ``causal=False``): runs
    ``torch_mla.sparse_decode`` over the FP8 cache (V32 layout for d_qk 576, MODEL1 for 512);
    ``block_table`` and ``cache_seqlens`` are ignored, ``indices`` are in-cache positions
    ``block * page_block_size + offset``. Dense: runs ``torch_mla.dense_decode`` over a bf16/fp16
    cache ``[num_blocks, page_block_size, h_k, d_qk]`` with ``block_table`` / ``cache_seqlens``.

    Args follow FlashMLA: q ``[b, s_q, h_q, d_qk]``; ``tile_scheduler_metadata`` from
    ``get_mla_metadata()``; ``num_splits`` must be None; ``softmax_scale`` defaults to
    ``d_qk ** -0.5``; ``attn_sink [h_q]`` f32, ``topk_length`` / ``extra_topk_length [b]`` int32,
    ``extra_k_cache`` / ``extra_indices_in_kvcache`` as in ``torch_mla.sparse_decode``.

    Returns ``(out [b, s_q, h_q, head_dim_v], softmax_lse [b, h_q, s_q] f32)``.
    """
    sched_meta = tile_scheduler_metadata
    _require(isinstance(sched_meta, FlashMLASchedMeta),
             "tile_scheduler_metadata must be of type FlashMLASchedMeta (from get_mla_metadata()), "
             f"got {type(sched_meta).__name__}")
    _require(num_splits is None, "num_splits must be None")

    topk = indices.shape[-1] if indices is not None else None
    extra_page_block_size = extra_k_cache.shape[1] if extra_k_cache is not None else None
    extra_topk = (extra_indices_in_kvcache.shape[-1]
                  if extra_indices_in_kvcache is not None else None)
    config = FlashMLASchedMeta.Config(
        q.shape[0], q.shape[1], q.shape[2], k_cache.shape[1], k_cache.shape[2],
        bool(causal), bool(is_fp8_kvcache), topk, extra_page_block_size, extra_topk)

    if topk is not None:
        _require(not causal, "causal must be False when indices_in_kvcache is not None "
                 "(i.e. sparse attention is enabled)")
        _require(is_fp8_kvcache, "is_fp8_kvcache must be True when sparse attention is enabled "
                 "(sparse decoding reads an FP8 cache)")
    else:
        _require(indices is None and attn_sink is None and extra_k_cache is None
                 and extra_indices_in_kvcache is None and topk_length is None
                 and extra_topk_length is None,
                 "indices_in_kvcache, attn_sink, extra_k_cache, extra_indices_in_kvcache, "
                 "topk_length and extra_topk_length must be None when dense attention is used.")
        _require(block_table is not None and cache_seqlens is not None,
                 "block_table and cache_seqlens must be provided when dense attention is used.")
        if is_fp8_kvcache:
            raise NotImplementedError(
                "torch_mla.compat.flash_mla: dense decoding over an FP8 KV cache "
                "(is_fp8_kvcache=True without indices) is not implemented; use a bf16/fp16 cache "
                "for dense decoding, or sparse decoding (pass indices) with an FP8 cache")

    if not sched_meta.have_initialized:
        # The first call records the configuration and the work split; later calls reuse both.
        if topk is not None:
            seqlens = _sparse_seqlens(q, topk, topk_length, extra_topk, extra_topk_length)
        else:
            seqlens = cache_seqlens
        schedule = api.decode_schedule(seqlens, h_q=q.shape[2], s_q=q.shape[1])
        sched_meta.have_initialized = True
        sched_meta.config = config
        sched_meta.tile_scheduler_metadata = schedule.metadata
        sched_meta.num_splits = schedule.num_splits
    else:
        _require(sched_meta.config is not None, "sched_meta was marked initialized but holds no "
                 "config; get a fresh one from get_mla_metadata()")
        _check_config(sched_meta.config, config)
        schedule = api.DecodeSchedule(sched_meta.tile_scheduler_metadata, sched_meta.num_splits)

    if topk is not None:
        return api.sparse_decode(
            q, k_cache, indices, topk_length=topk_length, attn_sink=attn_sink,
            extra_k_cache=extra_k_cache, extra_indices=extra_indices_in_kvcache,
            extra_topk_length=extra_topk_length, d_v=head_dim_v, sm_scale=softmax_scale,
            schedule=schedule)
    return api.dense_decode(q, k_cache, block_table, cache_seqlens, d_v=head_dim_v,
                            sm_scale=softmax_scale, causal=causal, schedule=schedule)


def flash_mla_sparse_fwd(
    q: Tensor,
    kv: Tensor,
    indices: Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: Optional[Tensor] = None,
    topk_length: Optional[Tensor] = None,
    indexer_topk: int = 0,
):
    """Sparse MLA prefill (``torch_mla.sparse_prefill``), differentiable.

    q ``[s_q, h_q, d_qk]``, kv ``[s_kv, h_kv, d_qk]``, indices ``[s_q, h_kv, topk]`` int32 (-1 or
    ``>= s_kv`` is skipped), ``attn_sink [h_q]`` f32, ``topk_length [s_q]`` int32.

    Returns ``(out [s_q, h_q, d_v], max_logits [s_q, h_q] f32, lse [s_q, h_q] f32)``. With
    ``indexer_topk > 0`` (newer FlashMLA) a fourth output ``lse_indexer`` is added: the lse over
    only the first ``indexer_topk`` entries of ``indices`` (still honouring ``topk_length``).
    """
    out, max_logits, lse = api.sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink,
                                              topk_length)
    if indexer_topk <= 0:
        return out, max_logits, lse
    # The indexer's share is the same attention restricted to the first indexer_topk indices:
    # cut the index list there (a slice of the last dim stays contiguous in it).
    _, _, lse_indexer = api.sparse_prefill(q, kv, indices[..., :indexer_topk], sm_scale, d_v,
                                           None, topk_length)
    return out, max_logits, lse, lse_indexer


def _check_unsupported(dropout_p: float, deterministic: bool) -> None:
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0 (FlashMLA has no dropout), got {dropout_p}")
    if deterministic:
        raise ValueError("deterministic=True is not supported (FlashMLA asserts it is False)")


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_qo: Tensor,
    cu_seqlens_kv: Tensor,
    max_seqlen_qo: int,
    max_seqlen_kv: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    deterministic: bool = False,
    is_varlen: bool = True,
) -> Tuple[Tensor, Tensor]:
    """Dense varlen prefill in MHA mode (``torch_mla.dense_prefill``), differentiable.

    q ``[t_q, h_q, d_qk]``, k ``[t_k, h_k, d_qk]``, v ``[t_k, h_k, d_v]``, cu_seqlens int32
    ``[b + 1]``; ``causal`` is bottom-right aligned. ``is_varlen`` is accepted and has no effect
    (the varlen path covers the fixed-length case). Returns ``(out [t_q, h_q, d_v],
    lse [t_q, h_q] f32)``.
    """
    _check_unsupported(dropout_p, deterministic)
    return api.dense_prefill(q, k, v, cu_seqlens_qo, cu_seqlens_kv, max_seqlen_qo, max_seqlen_kv,
                             sm_scale=softmax_scale, causal=causal)


def flash_attn_varlen_qkvpacked_func(
    qkv: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    head_dim_qk: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    deterministic: bool = False,
    is_varlen: bool = True,
) -> Tuple[Tensor, Tensor]:
    """``flash_attn_varlen_func`` on ``qkv [t, h, 2 * head_dim_qk + d_v]``: q, k, v are the
    slices ``[:head_dim_qk]``, ``[head_dim_qk:2 * head_dim_qk]`` and the rest of the last dim
    (views, contiguous in the last dim, which is all the ops need)."""
    _check_unsupported(dropout_p, deterministic)
    d = head_dim_qk
    return api.dense_prefill(qkv[:, :, :d], qkv[:, :, d:2 * d], qkv[:, :, 2 * d:], cu_seqlens,
                             cu_seqlens, max_seqlen, max_seqlen, sm_scale=softmax_scale,
                             causal=causal)


def flash_attn_varlen_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    cu_seqlens_qo: Tensor,
    cu_seqlens_kv: Tensor,
    max_seqlen_qo: int,
    max_seqlen_kv: int,
    head_dim_qk: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    deterministic: bool = False,
    is_varlen: bool = True,
) -> Tuple[Tensor, Tensor]:
    """``flash_attn_varlen_func`` with ``kv [t_k, h_k, head_dim_qk + d_v]``: k is
    ``kv[:, :, :head_dim_qk]`` and v the rest."""
    _check_unsupported(dropout_p, deterministic)
    d = head_dim_qk
    return api.dense_prefill(q, kv[:, :, :d], kv[:, :, d:], cu_seqlens_qo, cu_seqlens_kv,
                             max_seqlen_qo, max_seqlen_kv, sm_scale=softmax_scale, causal=causal)
