"""Public functions of the DSA lightning indexer (DeepSeek Sparse Attention).

Inference: ``indexer_quantize`` (Hadamard + FP8), ``indexer_logits`` (ragged prefill),
``write_indexer_cache`` + ``indexer_logits_paged`` (paged decode, MTP), ``indexer_topk`` and
``indexer_topk_to_cache_indices`` (positions -> in-cache indices for ``sparse_decode``).
Training: ``indexer_scores`` (differentiable), ``sparse_attn_scores`` / ``dense_attn_scores``
(the attention targets); the loss is ``torch_mla.dsa.indexer_kl_loss``.

The exact semantics of every op are in ``torch_mla.meta.indexer``. Each ``_<op>_args`` helper
turns the public arguments into the op's positional arguments; ``torch_mla.explain`` uses the
same helpers (``ARGS``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def _indexer_quantize_args(x, *, hadamard=True, scale_format="fp32"):
    return (x, bool(hadamard), scale_format)


def indexer_quantize(x: Tensor, *, hadamard: bool = True,
                     scale_format: str = "fp32") -> Tuple[Tensor, Tensor]:
    """Rotate (normalised Hadamard) and quantize rows to FP8 e4m3 with one scale per row.

    Args:
        x: ``[..., d]`` bf16 / fp16 / fp32; d a power of two when ``hadamard``.
        hadamard: rotate first: ``y = x @ H / sqrt(d)`` (H the Sylvester Hadamard matrix).
        scale_format: ``"fp32"`` (``scale = max(amax, 1e-4) / 448``) or ``"ue8m0"`` (that,
            rounded up to a power of two, as DeepSeek-V3.2's indexer cache uses).

    Returns:
        ``x_fp8`` float8_e4m3fn ``[..., d]`` and ``scale`` f32 ``[...]`` with
        ``y ~= x_fp8.float() * scale[..., None]``. An all-zero row gets zeros and scale
        ``1e-4 / 448`` (never NaN). For queries ``[s, h, d]`` the scale is ``[s, h]``: fold it
        into the indexer weights before ``indexer_logits``.
    """
    return torch.ops.mla.indexer_quantize(*_indexer_quantize_args(
        x, hadamard=hadamard, scale_format=scale_format))


def _indexer_logits_args(q_fp8, k_fp8, k_scale, weights, k_start, k_end):
    return (q_fp8, k_fp8, k_scale, weights, k_start, k_end)


def indexer_logits(q_fp8: Tensor, k_fp8: Tensor, k_scale: Tensor, weights: Tensor,
                   k_start: Tensor, k_end: Tensor) -> Tensor:
    """Indexer logits of packed (ragged) sequences, as DeepGEMM's ``fp8_mqa_logits``.

    ``logits[t, s] = sum_h weights[t, h] * ReLU(q_fp8[t, h] . k_fp8[s]) * k_scale[s]`` for
    ``k_start[t] <= s < k_end[t]``, ``-inf`` elsewhere.

    Args:
        q_fp8: ``[s_q, h, d]`` float8_e4m3fn (or uint8 e4m3 bytes).
        k_fp8: ``[s_k, d]`` FP8; k_scale: ``[s_k]`` f32 (from ``indexer_quantize`` of k).
        weights: ``[s_q, h]`` f32, with q's own scale folded in by the caller:
            ``weights = w * q_scale * softmax_scale`` (q_scale ``[s_q, h]`` from
            ``indexer_quantize(q)``); exact, since ReLU commutes with a positive factor.
        k_start, k_end: ``[s_q]`` int32 window of keys each query sees (sequence start; causal end).

    Returns:
        ``[s_q, s_k]`` f32. Memory beyond the output stays bounded (chunked over queries and keys).
    """
    return torch.ops.mla.indexer_logits(*_indexer_logits_args(
        q_fp8, k_fp8, k_scale, weights, k_start, k_end))


def _write_indexer_cache_args(cache, k, slot_mapping, *, hadamard=True, scale_format="fp32"):
    return (cache, k, slot_mapping, bool(hadamard), scale_format)


def write_indexer_cache(cache: Tensor, k: Tensor, slot_mapping: Tensor, *, hadamard: bool = True,
                        scale_format: str = "fp32") -> None:
    """Quantize ``k [n, d]`` (as ``indexer_quantize``) into a paged indexer cache, in place.

    Args:
        cache: ``[num_blocks, block_size, 1, d + 4]`` uint8 / float8_e4m3fn; within a block all
            tokens' d FP8 bytes come first (token t at ``t * d``), then all f32 scales (token t
            at ``block_size * d + 4 * t``): DeepGEMM's / vLLM's grouping. Blocks are addressed by
            ``stride(0)``. ``new_indexer_cache`` makes one.
        k: ``[n, d]`` keys (bf16 / fp16 / fp32), not yet rotated.
        slot_mapping: ``[n]`` int64 ``block * block_size + offset``; negative or out-of-cache
            slots are skipped and no other byte changes.
    """
    torch.ops.mla.write_indexer_cache(*_write_indexer_cache_args(
        cache, k, slot_mapping, hadamard=hadamard, scale_format=scale_format))


def new_indexer_cache(num_blocks: int, block_size: int, d: int = 128, *, device=None,
                      dtype: torch.dtype = torch.uint8) -> Tensor:
    """A zeroed paged indexer cache ``[num_blocks, block_size, 1, d + 4]``."""
    return torch.zeros((num_blocks, block_size, 1, d + 4), dtype=dtype, device=device)


def _indexer_logits_paged_args(q_fp8, cache, weights, context_lens, block_table, max_context_len):
    return (q_fp8, cache, weights, context_lens, block_table, max_context_len)


def indexer_logits_paged(q_fp8: Tensor, cache: Tensor, weights: Tensor, context_lens: Tensor,
                         block_table: Tensor, max_context_len: int) -> Tensor:
    """Indexer logits over a paged cache (decode, with next_n MTP queries), as DeepGEMM's
    ``fp8_paged_mqa_logits`` with clean logits.

    Args:
        q_fp8: ``[b, next_n, h, d]`` FP8. cache: as ``write_indexer_cache`` fills it.
        weights: ``[b * next_n, h]`` f32 (q's scale folded in, as for ``indexer_logits``).
        context_lens: ``[b]`` int32 tokens in each sequence (the new ones included).
        block_table: ``[b, max_blocks]`` int32.
        max_context_len: columns of the output (>= max(context_lens)).

    Returns:
        ``[b * next_n, max_context_len]`` f32; row ``i * next_n + j`` sees positions
        ``< context_lens[i] - next_n + j + 1``, ``-inf`` elsewhere.
    """
    return torch.ops.mla.indexer_logits_paged(*_indexer_logits_paged_args(
        q_fp8, cache, weights, context_lens, block_table, max_context_len))


def _indexer_topk_args(logits, k, *, k_start=None, k_end=None):
    return (logits, int(k), k_start, k_end)


def indexer_topk(logits: Tensor, k: int, *, k_start: Optional[Tensor] = None,
                 k_end: Optional[Tensor] = None) -> Tensor:
    """Positions of the k largest finite logits per row (within ``[k_start, k_end)`` when given),
    by descending logit, ties by ascending position; -1 pads rows with fewer than k.

    Args:
        logits: ``[s_q, s_k]`` f32 (from ``indexer_logits`` / ``indexer_logits_paged``).
        k: how many (2048 in DeepSeek-V3.2).

    Returns:
        int32 ``[s_q, k]``. For ``sparse_prefill`` over the packed keys these are the indices
        (``[:, None, :]`` for its ``[s_q, 1, topk]``); for paged decoding map them with
        ``indexer_topk_to_cache_indices``.
    """
    return torch.ops.mla.indexer_topk(*_indexer_topk_args(logits, k, k_start=k_start, k_end=k_end))


def indexer_topk_to_cache_indices(positions: Tensor, block_table: Tensor, block_size: int,
                                  batch_ids: Optional[Tensor] = None) -> Tensor:
    """Map sequence positions to in-cache indices ``block_table[b, p // bs] * bs + p % bs``.

    Pure tensor ops (no op, no host sync; works under torch.compile).

    Args:
        positions: ``[..., k]`` integer positions within each row's sequence; -1 (or any negative)
            stays -1, as does a position past the block table or whose block entry is negative.
        block_table: ``[b, max_blocks]`` int32.
        block_size: tokens per cache block.
        batch_ids: the batch element of every row, shaped like (or broadcastable to)
            ``positions.shape[:-1]``. Absent: ``positions.shape[0]`` is the batch (``[b, ...,
            k]``), e.g. the ``[b * next_n, k]`` top-k of ``indexer_logits_paged`` viewed as
            ``[b, next_n, k]``, which then feeds ``sparse_decode``'s ``indices [b, s_q, topk]``.

    Returns:
        int32 of ``positions``' shape.
    """
    pos = positions.long()
    b, max_blocks = block_table.shape
    if batch_ids is None:
        shape = tuple(positions.shape)  # the message closes over plain values only (Dynamo)
        torch._check(
            pos.dim() >= 2 and pos.shape[0] == b,
            lambda: f"positions.shape[0] must be the batch size {b} of block_table when "
            f"batch_ids is not given, got shape {shape}",
        )
        rows = torch.arange(b, device=pos.device).view(b, *([1] * (pos.dim() - 1)))
    else:
        rows = batch_ids.long().unsqueeze(-1)
    blk_i = torch.div(pos, block_size, rounding_mode="floor")
    valid = (pos >= 0) & (blk_i < max_blocks)
    if max_blocks == 0:
        return torch.full_like(pos, -1, dtype=torch.int32)
    blocks = block_table[rows, blk_i.clamp(0, max_blocks - 1)].long()
    valid = valid & (blocks >= 0)
    return torch.where(valid, blocks * block_size + pos % block_size, -1).to(torch.int32)


def _indexer_scores_args(q, k, weights, indices):
    return (q, k, weights, indices)


def indexer_scores(q: Tensor, k: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
    """Differentiable indexer logits at selected positions (training; no FP8, no rotation).

    Args:
        q: ``[s_q, h, d]`` bf16 / fp16 / fp32 / fp64; k: ``[s_k, d]`` same dtype.
        weights: ``[s_q, h]`` (any float dtype).
        indices: ``[s_q, topk]`` int32 positions in k; < 0 or >= s_k is invalid. The dense stage
            passes every key of the window (``torch_mla.dsa.window_indices``).

    Returns:
        ``[s_q, topk]`` f32 (f64 for f64 q): ``sum_h weights * ReLU(q . k[idx])``, -inf where
        invalid. Gradients reach q, k and weights. On a GPU (Triton) the gradient of k adds
        up with atomics: not bitwise reproducible, so under
        ``torch.use_deterministic_algorithms(True)`` it raises (warns with ``warn_only``); the
        reference backend is deterministic.
    """
    return torch.ops.mla.indexer_scores(*_indexer_scores_args(q, k, weights, indices))


def _sparse_attn_scores_args(q, kv, indices, lse, sm_scale=None, topk_length=None):
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    return (q, kv, indices, lse, float(sm_scale), topk_length)


def sparse_attn_scores(q: Tensor, kv: Tensor, indices: Tensor, lse: Tensor,
                       sm_scale: Optional[float] = None,
                       topk_length: Optional[Tensor] = None) -> Tensor:
    """The sparse-stage target: the main attention's probabilities at its selected keys, summed
    over heads and renormalised.

    Args:
        q, kv, indices, sm_scale, topk_length: exactly as given to ``sparse_prefill`` (kv
            ``[s_kv, 1, d_qk]``, indices ``[s_q, 1, topk]`` int32; h_kv must be 1).
        lse: ``[s_q, h]`` the lse ``sparse_prefill`` returned.

    Returns:
        ``[s_q, topk]`` f32 (f64 for f64 q) rows summing to 1 (0 at invalid entries; a row with
        none valid is all 0). Not differentiable.
    """
    return torch.ops.mla.sparse_attn_scores(*_sparse_attn_scores_args(
        q, kv, indices, lse, sm_scale, topk_length))


def _dense_attn_scores_args(q, kv, lse, sm_scale=None, k_start=None, k_end=None):
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    return (q, kv, lse, float(sm_scale), k_start, k_end)


def dense_attn_scores(q: Tensor, kv: Tensor, lse: Tensor, sm_scale: Optional[float] = None,
                      k_start: Optional[Tensor] = None, k_end: Optional[Tensor] = None) -> Tensor:
    """The dense warm-up target: the main attention's probabilities over every key of the
    window ``[k_start[t], k_end[t])`` (whole row when absent), summed over heads, renormalised.

    Args:
        q: ``[s_q, h, d_qk]``; kv: ``[s_k, 1, d_qk]``; lse: ``[s_q, h]`` of that attention.
        k_start, k_end: ``[s_q]`` int32.

    Returns:
        ``[s_q, s_k]`` f32 (f64 for f64 q), 0 outside the window. Not differentiable.
    """
    return torch.ops.mla.dense_attn_scores(*_dense_attn_scores_args(
        q, kv, lse, sm_scale, k_start, k_end))


ARGS = {
    "indexer_quantize": _indexer_quantize_args,
    "indexer_logits": _indexer_logits_args,
    "write_indexer_cache": _write_indexer_cache_args,
    "indexer_logits_paged": _indexer_logits_paged_args,
    "indexer_topk": _indexer_topk_args,
    "indexer_scores": _indexer_scores_args,
    "sparse_attn_scores": _sparse_attn_scores_args,
    "dense_attn_scores": _dense_attn_scores_args,
}
