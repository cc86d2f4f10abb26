"""Exact reference of ``mla::sparse_decode``: sparse MLA decoding over a paged FP8 cache.

Semantics (FlashMLA's tests/ref.py ``ref_sparse_attn_decode`` is the definition):
- An index of a key set is valid when ``0 <= idx < num_blocks * block_size`` of its own cache and
  its position ``j < topk_length[b]`` (``extra_topk_length`` for the extra set). Invalid entries
  contribute nothing and their bytes never reach the result.
- Keys are the dequantized tokens (bf16 values, computed in fp32 — fp64 for fp64 q); values are
  their first ``d_v`` columns. One softmax runs over the valid keys of both sets; a duplicated
  index counts once per occurrence.
- ``lse`` is the natural log-sum-exp of the scaled logits; without a valid key out = 0 and
  lse = +inf. ``attn_sink`` multiplies out by ``1 / (1 + exp(sink - lse))`` (lse ignores it).
The schedule arguments only split work on GPUs; the reference computes directly and ignores them.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..meta.common import stats_dtype
from ..meta.layouts import FP8Layout, layout_for_d_qk
from .kv_cache import gather_tokens

# Rough bound on the temporaries of one chunk of queries (gathered bytes, bf16 and fp32 keys,
# logits and probabilities). Keeps e.g. b=128, s_q=2, h_q=128, topk=2048 well under a few GB.
_CHUNK_BYTES = 256 * 1024 * 1024


def _valid_mask(indices: torch.Tensor, topk_length: Optional[torch.Tensor],
                num_slots: int) -> torch.Tensor:
    """[b, s_q, topk] bool: index in its cache and at a position below topk_length[b]."""
    idx = indices.to(torch.int64)
    valid = (idx >= 0) & (idx < num_slots)
    if topk_length is not None:
        pos = torch.arange(indices.shape[-1], device=indices.device)
        valid &= pos.view(1, 1, -1) < topk_length.to(torch.int64).view(-1, 1, 1)
    return valid


def _gather_keys(cache: torch.Tensor, layout: FP8Layout, idx: torch.Tensor, valid: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    """Dequantized keys ``[r, t, d]`` in ``dtype`` for indices ``idx [r, t]``; rows of invalid
    entries are exactly 0 (their bytes are read through a clamped index, then discarded by
    ``torch.where``, so NaN garbage in unused slots cannot leak through 0 * NaN)."""
    r, t = idx.shape
    num_slots = cache.shape[0] * cache.shape[1]
    if num_slots == 0 or r * t == 0:  # shapes only: nothing can be valid / nothing to read
        return torch.zeros((r, t, layout.d), dtype=dtype, device=idx.device)
    slots = idx.to(torch.int64).clamp(0, num_slots - 1).reshape(-1)
    keys = gather_tokens(cache, layout, slots).to(dtype).view(r, t, layout.d)
    return torch.where(valid.unsqueeze(-1), keys, torch.zeros((), dtype=dtype, device=keys.device))


def sparse_decode(q: torch.Tensor, k_cache: torch.Tensor, indices: torch.Tensor,
                  topk_length: Optional[torch.Tensor] = None,
                  attn_sink: Optional[torch.Tensor] = None,
                  extra_k_cache: Optional[torch.Tensor] = None,
                  extra_indices: Optional[torch.Tensor] = None,
                  extra_topk_length: Optional[torch.Tensor] = None, d_v: int = 512,
                  sm_scale: float = 1.0, schedule_metadata: Optional[torch.Tensor] = None,
                  num_splits: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    del schedule_metadata, num_splits  # work-splitting hints for GPU kernels; not needed here
    b, s_q, h_q, d_qk = q.shape
    layout = layout_for_d_qk(d_qk)
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device

    # Key sets as (cache, indices [R, t], valid [R, t]) over the R = b * s_q query rows.
    sets: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for cache, idx, length in ((k_cache, indices, topk_length),
                               (extra_k_cache, extra_indices, extra_topk_length)):
        if cache is None:
            continue
        valid = _valid_mask(idx, length, cache.shape[0] * cache.shape[1])
        sets.append((cache, idx.reshape(b * s_q, -1), valid.reshape(b * s_q, -1)))
    total_t = sum(s[1].shape[1] for s in sets)

    rows = b * s_q
    qf = q.reshape(rows, h_q, d_qk)
    out = torch.empty((rows, h_q, d_v), dtype=q.dtype, device=dev)
    lse_out = torch.empty((rows, h_q), dtype=stats_dtype(q), device=dev)

    sink = None if attn_sink is None else attn_sink.to(cdtype)

    elem = torch.finfo(cdtype).bits // 8
    per_row = max(1, total_t * (layout.bytes_per_token + layout.d * (2 + 3 * elem)
                                + 3 * h_q * elem) + h_q * d_v * elem)
    chunk = max(1, _CHUNK_BYTES // per_row)

    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        keys, valid = [], []
        for cache, idx, vmask in sets:
            keys.append(_gather_keys(cache, layout, idx[r0:r1], vmask[r0:r1], cdtype))
            valid.append(vmask[r0:r1])
        k = torch.cat(keys, dim=1)  # [r, T, d]
        vm = torch.cat(valid, dim=1)  # [r, T]
        has_key = vm.any(dim=1)  # [r]

        logits = torch.matmul(qf[r0:r1].to(cdtype), k.transpose(1, 2)) * sm_scale  # [r, h, T]
        logits = logits.masked_fill(~vm.unsqueeze(1), float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)  # [r, h]; -inf where no valid key
        # For rows without a key, subtracting +inf makes every probability exp(-inf) = 0.
        lse_safe = torch.where(has_key.unsqueeze(1), lse, torch.full_like(lse, float("inf")))
        p = torch.exp(logits - lse_safe.unsqueeze(-1))
        o = torch.matmul(p, k[..., :d_v])  # [r, h, d_v]

        if sink is not None:
            # 1 / (1 + exp(sink - lse)) == sigmoid(lse - sink): a -inf sink gives 1, a +inf sink
            # gives 0. The only inf - inf (+inf sink on a row without keys, lse_safe = +inf)
            # yields NaN in a row that the torch.where below replaces by zeros.
            o = o * torch.sigmoid(lse_safe - sink).unsqueeze(-1)
        o = torch.where(has_key.view(-1, 1, 1), o, torch.zeros((), dtype=o.dtype, device=dev))
        out[r0:r1] = o.to(q.dtype)
        lse_out[r0:r1] = lse_safe.to(lse_out.dtype)

    # A fresh contiguous [b, h_q, s_q] (what the fake impl promises; .contiguous() of the
    # transposed view would keep odd strides when s_q == 1).
    lse = torch.empty((b, h_q, s_q), dtype=lse_out.dtype, device=dev)
    lse.copy_(lse_out.view(b, s_q, h_q).transpose(1, 2))
    return out.view(b, s_q, h_q, d_v), lse
