"""Reference DSA lightning indexer ops: exact PyTorch, fp32 math (fp64 for fp64 training inputs).

Semantics are stated once, in meta/indexer.py. Everything here is chunked so that no op holds
more than about ``CHUNK_BYTES`` of intermediates beyond its inputs and output (DeepSeek-V3.2
prefill: 64 heads x 128k keys of fp32 logits per query would otherwise be 32 MB *per query*),
and the chunk sizes come from shapes only, so nothing reads tensor values on the host.

FP8 inputs arrive as float8_e4m3fn or as uint8 holding the same bytes; both are read through a
float8 view. e4m3 values and their pairwise products are exact in fp32, so the dot products'
only rounding is the fp32 accumulation.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..meta.common import stats_dtype
from ..meta.indexer import AMAX_FLOOR, FP8_MAX, SCALE_BYTES

# Byte budget for the intermediates of one chunk. Tests lower it to force many chunks; results
# do not depend on it.
CHUNK_BYTES = 256 << 20

_NEG_INF = float("-inf")


def _chunk(budget_per_item: int, total: int) -> int:
    """How many items (queries, keys, rows) of ``budget_per_item`` bytes fit one chunk."""
    return max(1, min(max(total, 1), CHUNK_BYTES // max(1, budget_per_item)))


def _as_fp8(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float8_e4m3fn else t.view(torch.float8_e4m3fn)


def _window(lo: Optional[torch.Tensor], hi: Optional[torch.Tensor], rows: slice, cols: torch.Tensor):
    """Mask ``[r, c]``: column position in ``[lo, hi)`` of each row (absent bound: open)."""
    mask = torch.ones((), dtype=torch.bool, device=cols.device)
    if lo is not None:
        mask = mask & (cols[None, :] >= lo[rows].long()[:, None])
    if hi is not None:
        mask = mask & (cols[None, :] < hi[rows].long()[:, None])
    return mask


# ---------------------------------------------------------------------------------------------
# quantization
# ---------------------------------------------------------------------------------------------

def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x @ H / sqrt(d)`` in fp32 along the last dim (H the Sylvester Hadamard matrix).

    H_2n = H_2 (x) H_n, so H_d is the Kronecker product of log2(d) copies of H_2, each acting on
    one bit of the column index; applying them one bit at a time is the fast Walsh-Hadamard
    transform: log2(d) passes of (a + b, a - b), O(d log d) per row and no d x d matrix."""
    d = x.shape[-1]
    y = x.float().reshape(-1, d)
    n = y.shape[0]
    h = d // 2
    while h >= 1:
        pairs = y.view(n, d // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2).view(n, d)
        h //= 2
    return (y * (1.0 / math.sqrt(d))).view(x.shape)


def _quantize_rows(x: torch.Tensor, hadamard: bool, scale_format: str):
    """(e4m3 ``[..., d]``, f32 scale ``[...]``) of x; see meta/indexer.py for the formula."""
    y = hadamard_transform(x) if hadamard else x.float()
    amax = y.abs().amax(dim=-1) if y.shape[-1] > 0 else y.new_zeros(y.shape[:-1])
    # Divided by a tensor, not the Python number: CUDA divides by a scalar as a multiplication
    # by its rounded reciprocal, 1 ulp off IEEE division on about half of all rows (seen on the
    # H100, 2026-11-25), and the scale must be the same bits on every device.
    scale = torch.clamp_min(amax, AMAX_FLOOR) / torch.full_like(amax, FP8_MAX)
    if scale_format == "ue8m0":
        # The smallest power of two >= scale (a scale that is one already stays). An f32 log2
        # can round onto the integer from either side, so the candidate is checked both ways.
        p2 = torch.exp2(torch.ceil(torch.log2(scale)))
        p2 = torch.where(p2 < scale, p2 * 2, p2)
        scale = torch.where(p2 * 0.5 >= scale, p2 * 0.5, p2)
    # y / scale <= 448 up to one rounding; the clamp keeps the e4m3 cast finite regardless.
    q = (y / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def indexer_quantize(x, hadamard=True, scale_format="fp32"):
    lead, d = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, d)
    x_fp8 = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(lead, dtype=torch.float32, device=x.device)
    flat_q, flat_s = x_fp8.view(-1, d), scale.view(-1)
    # ~3 fp32 copies of a row alive during the transform and the division.
    step = _chunk(12 * max(d, 1), rows.shape[0])
    for s in range(0, rows.shape[0], step):
        q, sc = _quantize_rows(rows[s:s + step], hadamard, scale_format)
        flat_q[s:s + step] = q
        flat_s[s:s + step] = sc
    return x_fp8, scale


# ---------------------------------------------------------------------------------------------
# logits (ragged prefill)
# ---------------------------------------------------------------------------------------------

def _weighted_relu(qc: torch.Tensor, kc: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_h w[r, h] * ReLU(qc[r, h] . kc[..., c])``: qc ``[r, h, d]``, kc ``[c, d]`` or
    ``[r', c, d]`` batched with r = r' * g, w ``[r, h]`` -> ``[r, c]``."""
    r, h, d = qc.shape
    if kc.dim() == 2:
        s = torch.matmul(qc.reshape(r * h, d), kc.transpose(0, 1)).view(r, h, -1)
    else:
        rb = kc.shape[0]
        s = torch.matmul(qc.reshape(rb, (r // rb) * h, d), kc.transpose(1, 2)).view(r, h, -1)
    # [r, 1, h] @ [r, h, c]: the head sum as a batched matmul, no [r, h, c] product tensor.
    return torch.matmul(w.unsqueeze(1), torch.relu_(s)).squeeze(1)


def indexer_logits(q_fp8, k_fp8, k_scale, weights, k_start, k_end):
    s_q, h, d = q_fp8.shape
    s_k = k_fp8.shape[0]
    out = torch.empty((s_q, s_k), dtype=torch.float32, device=q_fp8.device)
    if s_q == 0 or s_k == 0:
        return out
    q = _as_fp8(q_fp8)
    k = _as_fp8(k_fp8)
    # Keys per chunk: their fp32 copy; queries per chunk: their fp32 copy and [h, keys] logits.
    kc_n = _chunk(4 * d + 4 * h, s_k) if s_k * (4 * d) > CHUNK_BYTES // 2 else s_k
    qc_n = _chunk(4 * h * d + 4 * h * kc_n + 8 * kc_n, s_q)
    for ks in range(0, s_k, kc_n):
        ke = min(ks + kc_n, s_k)
        kf = k[ks:ke].float()
        cols = torch.arange(ks, ke, device=q.device)
        for qs in range(0, s_q, qc_n):
            qe = min(qs + qc_n, s_q)
            val = _weighted_relu(q[qs:qe].float(), kf, weights[qs:qe]) * k_scale[ks:ke]
            mask = _window(k_start, k_end, slice(qs, qe), cols)
            out[qs:qe, ks:ke] = torch.where(mask, val, _NEG_INF)
    return out


# ---------------------------------------------------------------------------------------------
# paged cache
# ---------------------------------------------------------------------------------------------

def _cache_sections(cache: torch.Tensor, d: int):
    """Strided uint8 views ``(values [nb, bs, d], scales [nb, bs, 4])`` of a paged indexer cache,
    honouring stride(0); writes into them land in the cache."""
    nb, bs = cache.shape[0], cache.shape[1]
    raw = cache.view(torch.uint8)
    block = bs * (d + SCALE_BYTES)
    stride0 = raw.stride(0) if nb > 1 else block
    rows = raw.as_strided((nb, block), (stride0, 1))
    values = rows[:, : bs * d].view(nb, bs, d)
    scales = rows[:, bs * d:].view(nb, bs, SCALE_BYTES)
    return values, scales


def write_indexer_cache(cache, k, slot_mapping, hadamard=True, scale_format="fp32"):
    """Quantize row i of ``k`` into slot ``slot_mapping[i]``, in place, without a host sync.

    Every row performs one ``index_put_`` and the rows are rewired so the result does not depend
    on the order the writes land in (index_put_ with duplicate targets is unordered on GPUs):
    - a valid row writes the bytes of its slot's winner, the last row naming that slot;
    - a skipped row (slot < 0 or past the cache) writes into slot 0 what slot 0 ends up holding:
      the bytes of slot 0's winner if a valid row targets slot 0, else slot 0's current bytes.
    """
    n, d = k.shape
    nb, bs = cache.shape[0], cache.shape[1]
    num_slots = nb * bs
    if n == 0 or num_slots == 0:
        return None
    q, scale = indexer_quantize(k, hadamard, scale_format)
    new = (q.view(torch.uint8), scale.view(n, 1).view(torch.uint8))  # [n, d], [n, 4]

    slots = slot_mapping.long()
    valid = (slots >= 0) & (slots < num_slots)
    key = torch.where(valid, slots, -1)
    # Stable sort: within a run of equal keys the last element has the largest row index.
    sorted_key, order = torch.sort(key, stable=True)
    winner = order[torch.searchsorted(sorted_key, key, right=True) - 1]
    zero = torch.zeros(1, dtype=torch.int64, device=k.device)
    pos0 = (torch.searchsorted(sorted_key, zero, right=True) - 1).clamp_min(0)
    has0 = sorted_key[pos0] == 0  # [1]: some valid row writes slot 0
    winner0 = order[pos0]  # [1]: the last such row (meaningful when has0)

    target = torch.where(valid, slots, 0)
    blk, off = target // bs, target % bs
    for sec, rows in zip(_cache_sections(cache, d), new):
        old0 = sec[0, 0].unsqueeze(0)  # slot 0's bytes before anything is written
        for_skipped = torch.where(has0.unsqueeze(-1), rows[winner0], old0)
        sec.index_put_((blk, off), torch.where(valid.unsqueeze(-1), rows[winner], for_skipped))
    return None


def _gather_cache(values, scales, blocks, offs):
    """fp32 tokens ``[..., d]`` and scales ``[...]`` at in-range (block, offset) pairs."""
    k = values[blocks, offs].view(torch.float8_e4m3fn).float()
    s = scales[blocks, offs].contiguous().view(torch.float32).squeeze(-1)
    return k, s


def indexer_logits_paged(q_fp8, cache, weights, context_lens, block_table, max_context_len):
    b, n, h, d = q_fp8.shape
    nb, bs = cache.shape[0], cache.shape[1]
    max_blocks = block_table.shape[1]
    L = max_context_len
    out = torch.empty((b * n, L), dtype=torch.float32, device=q_fp8.device)
    if b * n == 0 or L == 0:
        return out
    if nb * bs == 0 or max_blocks == 0:
        return out.fill_(_NEG_INF)  # no key can be read (a shape fact)
    q = _as_fp8(q_fp8)
    values, scales = _cache_sections(cache, d)
    dev = q.device
    # Positions per chunk (for one batch element): gathered fp32 keys and [n * h] logits each.
    per_pos = 4 * d + 4 * n * h + d + 40
    pc = _chunk(per_pos, L)
    bc = _chunk(per_pos * pc + 4 * n * h * d, b)
    ctx = context_lens.long()
    j = torch.arange(n, device=dev)
    for ps in range(0, L, pc):
        pe = min(ps + pc, L)
        pos = torch.arange(ps, pe, device=dev)
        blk_i = pos // bs
        in_table = blk_i < max_blocks
        blk_i = blk_i.clamp_max(max_blocks - 1)
        for bs_ in range(0, b, bc):
            be = min(bs_ + bc, b)
            blocks = block_table[bs_:be, blk_i].long()  # [cb, P]
            ok = in_table & (blocks >= 0) & (blocks < nb)
            # Unreadable positions are read at block 0 (in range, never faults) and masked below;
            # garbage there (NaN) cannot leak: each position's logit depends on its own key only.
            blocks = torch.where(ok, blocks, 0)
            kf, ksc = _gather_cache(values, scales, blocks, (pos % bs).expand_as(blocks))
            cb = be - bs_
            rows = slice(bs_ * n, be * n)
            val = _weighted_relu(q[bs_:be].float().reshape(cb * n, h, d), kf, weights[rows])
            val = val.view(cb, n, -1) * ksc[:, None, :]
            # query j of n sees positions < context_len - n + j + 1
            limit = ctx[bs_:be, None] - n + j[None, :] + 1  # [cb, n]
            mask = ok[:, None, :] & (pos[None, None, :] < limit[:, :, None])
            out[rows, ps:pe] = torch.where(mask, val, _NEG_INF).view(cb * n, -1)
    return out


# ---------------------------------------------------------------------------------------------
# top-k
# ---------------------------------------------------------------------------------------------

_LOW = (1 << 32) - 1
_INVALID_KEY = torch.iinfo(torch.int64).min


def _order_keys(x: torch.Tensor, valid: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """One int64 per entry whose order is (logit descending, position ascending), unique per
    position, and ``_INVALID_KEY`` (below every valid key) where ``valid`` is False.

    The f32 bits are mapped to an int32 that orders like the float (positive floats already do;
    negative ones get their 31 magnitude bits flipped), shifted into the high word; the low word
    is ``2**32 - 1 - position`` so an equal logit at a smaller position compares larger. A
    partial selection (torch.topk) on these keys gives the exact tie order without sorting rows.
    """
    x = x + 0.0  # -0.0 -> +0.0: equal logits must tie whatever their sign bit
    bits = x.contiguous().view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    key = ordered * (1 << 32) + (_LOW - cols)
    return torch.where(valid, key, _INVALID_KEY)


def indexer_topk(logits, k, k_start=None, k_end=None):
    s_q, s_k = logits.shape
    out = torch.empty((s_q, k), dtype=torch.int32, device=logits.device)
    if s_q == 0 or k == 0:
        return out
    kk = min(k, s_k)
    if kk < k:
        out[:, kk:] = -1  # fewer positions than k in every row
    if kk == 0:
        return out
    cols = torch.arange(s_k, device=logits.device)
    # int64 keys plus a few same-size temporaries per entry.
    step = _chunk(32 * s_k, s_q)
    for s in range(0, s_q, step):
        e = min(s + step, s_q)
        x = logits[s:e]
        valid = torch.isfinite(x) & _window(k_start, k_end, slice(s, e), cols)
        vals, idx = torch.topk(_order_keys(x, valid, cols), kk, dim=-1, largest=True, sorted=True)
        out[s:e, :kk] = torch.where(vals == _INVALID_KEY, -1, idx).to(torch.int32)
    return out


# ---------------------------------------------------------------------------------------------
# training: indexer scores at selected positions, attention targets
# ---------------------------------------------------------------------------------------------

def _gather_rows(k: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, acc: torch.dtype):
    """Rows ``k[idx]`` in ``acc`` with invalid entries read at a clamped position and zeroed by
    ``torch.where`` (so garbage or NaN in unused rows never reaches a result)."""
    safe = idx.clamp(0, k.shape[0] - 1)
    rows = k[safe]
    rows = torch.where(valid.unsqueeze(-1), rows, rows.new_zeros(()))
    return safe, rows.to(acc)


def _scores_chunk(q, k, weights, indices, acc):
    s_q, h, d = q.shape
    topk = indices.shape[1]
    # gathered rows (input + compute dtype, and their gradient in backward) and [h, topk] logits
    per_q = topk * d * (q.element_size() + 2 * torch.finfo(acc).bits // 8) + 5 * h * topk * 8
    return _chunk(per_q + 4 * h * d * 8, s_q)


def indexer_scores(q, k, weights, indices):
    s_q, h, d = q.shape
    s_k = k.shape[0]
    topk = indices.shape[1]
    acc = stats_dtype(q)
    out = torch.empty((s_q, topk), dtype=acc, device=q.device)
    if s_q == 0 or topk == 0:
        return out
    if s_k == 0:
        return out.fill_(_NEG_INF)
    step = _scores_chunk(q, k, weights, indices, acc)
    for s in range(0, s_q, step):
        e = min(s + step, s_q)
        idx = indices[s:e].long()
        valid = (idx >= 0) & (idx < s_k)
        _, rows = _gather_rows(k, idx, valid, acc)  # [c, topk, d]
        logits = torch.relu_(torch.matmul(q[s:e].to(acc), rows.transpose(1, 2)))  # [c, h, topk]
        val = torch.matmul(weights[s:e].to(acc).unsqueeze(1), logits).squeeze(1)
        out[s:e] = torch.where(valid, val, _NEG_INF)
    return out


def indexer_scores_backward(grad, q, k, weights, indices):
    """With s = q[t, h] . k[idx_j] and g = grad masked to valid entries:
    dweights[t, h] = sum_j g * ReLU(s);  with G = g * weights[t, h] * (s > 0):
    dq[t, h] = sum_j G * k[idx_j];  dk[idx_j] += sum_h G * q[t, h] (duplicates add up)."""
    s_q, h, d = q.shape
    s_k = k.shape[0]
    topk = indices.shape[1]
    acc = stats_dtype(q)
    dq = torch.empty_like(q)
    dw = torch.empty_like(weights)
    if s_q == 0 or topk == 0 or s_k == 0:
        dq.zero_()
        dw.zero_()
        return dq, torch.zeros_like(k), dw
    dk_acc = torch.zeros((s_k, d), dtype=acc, device=k.device)
    zero = torch.zeros((), dtype=acc, device=q.device)
    step = _scores_chunk(q, k, weights, indices, acc)
    for s in range(0, s_q, step):
        e = min(s + step, s_q)
        idx = indices[s:e].long()
        valid = (idx >= 0) & (idx < s_k)
        safe, rows = _gather_rows(k, idx, valid, acc)
        qc = q[s:e].to(acc)
        wc = weights[s:e].to(acc)
        # Gradients given for -inf entries (even NaN) are dropped.
        g = torch.where(valid, grad[s:e].to(acc), zero)  # [c, topk]
        sc = torch.matmul(qc, rows.transpose(1, 2))  # [c, h, topk]
        dw[s:e] = torch.matmul(torch.relu(sc), g.unsqueeze(-1)).squeeze(-1).to(dw.dtype)
        gs = torch.where(sc > 0, g.unsqueeze(1) * wc.unsqueeze(-1), zero)  # [c, h, topk]
        dq[s:e] = torch.matmul(gs, rows).to(dq.dtype)
        drows = torch.matmul(gs.transpose(1, 2), qc)  # [c, topk, d]; 0 on invalid entries
        dk_acc.index_add_(0, safe.reshape(-1), drows.reshape(-1, d))
    return dq, dk_acc.to(k.dtype), dw


def _attn_probs(qc, rows, lse_c, sm_scale, valid):
    """``sum_h exp(sm_scale * qc[:, h] . rows - lse[:, h])``: qc ``[c, h, d]``, rows ``[c, n, d]``
    or ``[n, d]``, valid ``[c, n]`` -> ``[c, n]``, 0 where not valid."""
    if rows.dim() == 2:
        logits = torch.matmul(qc, rows.transpose(0, 1))
    else:
        logits = torch.matmul(qc, rows.transpose(1, 2))
    # lse = +inf (a query sparse_prefill found no key for) gives exp(-inf) = 0.
    p = torch.exp(logits * sm_scale - lse_c.unsqueeze(-1)).sum(1)
    return torch.where(valid, p, 0.0)


def _normalise_rows(p: torch.Tensor) -> torch.Tensor:
    total = p.sum(-1, keepdim=True)
    return p.div_(torch.where(total > 0, total, 1.0))  # a row without valid entries stays 0


def sparse_attn_scores(q, kv, indices, lse, sm_scale, topk_length=None):
    s_q, h, d = q.shape
    s_kv = kv.shape[0]
    topk = indices.shape[2]
    acc = stats_dtype(q)
    out = torch.empty((s_q, topk), dtype=acc, device=q.device)
    if s_q == 0 or topk == 0:
        return out
    if s_kv == 0:
        return out.zero_()
    k = kv[:, 0]
    pos = torch.arange(topk, device=q.device)
    per_q = topk * d * (q.element_size() + torch.finfo(acc).bits // 8) + 3 * h * topk * 8
    step = _chunk(per_q, s_q)
    for s in range(0, s_q, step):
        e = min(s + step, s_q)
        idx = indices[s:e, 0].long()
        valid = (idx >= 0) & (idx < s_kv)
        if topk_length is not None:
            valid = valid & (pos[None, :] < topk_length[s:e].long()[:, None])
        _, rows = _gather_rows(k, idx, valid, acc)
        out[s:e] = _attn_probs(q[s:e].to(acc), rows, lse[s:e].to(acc), sm_scale, valid)
    return _normalise_rows(out)


def dense_attn_scores(q, kv, lse, sm_scale, k_start=None, k_end=None):
    s_q, h, d = q.shape
    s_k = kv.shape[0]
    acc = stats_dtype(q)
    out = torch.empty((s_q, s_k), dtype=acc, device=q.device)
    if s_q == 0 or s_k == 0:
        return out
    esize = torch.finfo(acc).bits // 8
    # Keys are chunked too (the head sum is per key; rows are normalised at the end).
    kc_n = _chunk(d * esize + 3 * h * esize, s_k) if s_k * d * esize > CHUNK_BYTES // 2 else s_k
    qc_n = _chunk(h * d * esize + 3 * h * kc_n * esize, s_q)
    for ks in range(0, s_k, kc_n):
        ke = min(ks + kc_n, s_k)
        kf = kv[ks:ke, 0].to(acc)
        cols = torch.arange(ks, ke, device=q.device)
        for qs in range(0, s_q, qc_n):
            qe = min(qs + qc_n, s_q)
            valid = _window(k_start, k_end, slice(qs, qe), cols).expand(qe - qs, ke - ks)
            out[qs:qe, ks:ke] = _attn_probs(q[qs:qe].to(acc), kf, lse[qs:qe].to(acc), sm_scale,
                                            valid)
    return _normalise_rows(out)
