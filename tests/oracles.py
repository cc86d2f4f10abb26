"""Independent float64 oracles shared by several test files (written here, never a call of the
code under test): the e4m3fn value table and encoder, the Sylvester-Hadamard matrix, and top-k by
a full stable sort."""

from __future__ import annotations

import numpy as np
import torch

NEG_INF = float("-inf")


def _e4m3_table():
    vals = np.empty(256)
    for c in range(256):
        sign = -1.0 if c & 0x80 else 1.0
        e, m = (c >> 3) & 0xF, c & 0x7
        if e == 0xF and m == 0x7:
            vals[c] = np.nan
        elif e == 0:
            vals[c] = sign * (m / 8.0) * 2.0 ** -6
        else:
            vals[c] = sign * (1.0 + m / 8.0) * 2.0 ** (e - 7)
    return vals


E4M3 = _e4m3_table()  # float64 value of every e4m3fn code
POS = E4M3[:127]  # codes 0x00..0x7E: increasing non-negative finite values, 0 .. 448


def encode_e4m3(v, zero_sign=True):
    """Round-to-nearest-even e4m3 codes (uint8) of float64 values with |v| <= 448. ``zero_sign``:
    keep the sign bit on zeros and on values that round to zero, as a float conversion does."""
    v = np.asarray(v, dtype=np.float64)
    a = np.abs(v)
    assert np.all(a <= 448.0)
    hi = np.clip(np.searchsorted(POS, a, side="left"), 1, 126)
    lo = hi - 1
    d_lo, d_hi = a - POS[lo], POS[hi] - a
    code = np.where(d_lo < d_hi, lo, hi)
    code = np.where(d_lo == d_hi, np.where(lo % 2 == 0, lo, hi), code)  # even mantissa on ties
    code = np.where(a == 0, 0, code)
    negative = np.signbit(v) if zero_sign else np.signbit(v) & (a > 0)
    return (code | np.where(negative, 0x80, 0)).astype(np.uint8)


def fp8_to64(t):
    """float64 values of an FP8 (or uint8-viewed) tensor."""
    return torch.from_numpy(E4M3[t.view(torch.uint8).numpy().astype(np.int64)])


def hadamard64(d):
    """The d x d Sylvester-Hadamard matrix (entries +-1), float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def topk_by_sort(logits, k, k_start=None, k_end=None):
    """Positions of the k largest finite logits within [k_start, k_end) by a full stable sort
    (ties, also -0.0 vs +0.0, keep ascending positions); -1 where fewer are valid."""
    s_q, s_k = logits.shape
    cols = torch.arange(s_k)
    valid = torch.isfinite(logits)
    if k_start is not None:
        valid &= cols >= k_start[:, None].long()
    if k_end is not None:
        valid &= cols < k_end[:, None].long()
    masked = torch.where(valid, logits.double(), NEG_INF)
    vals, order = torch.sort(masked, dim=-1, descending=True, stable=True)
    out = torch.full((s_q, k), -1, dtype=torch.int32)
    kk = min(k, s_k)
    out[:, :kk] = torch.where(torch.isinf(vals[:, :kk]), -1, order[:, :kk]).int()
    return out


def dense_decode64(q, k_cache, block_table, cache_seqlens, d_v, sm_scale, causal):
    """float64 out [b, s_q, h_q, d_v], lse [b, h_q, s_q] of paged dense decoding, query by query;
    +inf / 0 where a query sees no key (causal: query j of s_q sees keys < n - s_q + j + 1)."""
    q, k_cache = q.double().cpu(), k_cache.double().cpu()
    b, s_q, h_q, _ = q.shape
    _, bs, h_kv, _ = k_cache.shape
    g = h_q // h_kv
    out = torch.zeros(b, s_q, h_q, d_v, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), float("inf"), dtype=torch.float64)
    table = block_table.tolist()
    for i, n in enumerate(cache_seqlens.tolist()):
        for j in range(s_q):
            limit = n - s_q + j + 1 if causal else n
            if limit <= 0:
                continue
            keys = torch.stack([k_cache[table[i][t // bs], t % bs] for t in range(limit)])
            for h in range(h_q):
                kh = keys[:, h // g]  # [limit, d_qk]
                s = (kh @ q[i, j, h]) * sm_scale
                lse[i, h, j] = torch.logsumexp(s, 0)
                out[i, j, h] = torch.softmax(s, 0) @ kh[:, :d_v]
    return out, lse


def paged_dense_inputs(seqlens, s_q, h_q, h_kv, block_size, d_qk, dtype, gen, junk=-1,
                       extra_blocks=2):
    """A NaN-poisoned paged cache holding each sequence in a shuffled set of blocks: every slot
    not part of a sequence (tail of a last block, unused blocks) is NaN, block-table entries past a
    sequence's end are ``junk`` (-1 or an out-of-range id). Returns q, k_cache, block_table,
    cache_seqlens (CPU)."""
    b = len(seqlens)
    need = [-(-n // block_size) for n in seqlens]
    max_blocks = max(need + [1]) + 1  # one spare column, always junk
    num_blocks = sum(need) + extra_blocks
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    k_cache = torch.full((num_blocks, block_size, h_kv, d_qk), float("nan"), dtype=dtype)
    block_table = torch.full((b, max_blocks), junk, dtype=torch.int32)
    for i, n in enumerate(seqlens):
        for c in range(need[i]):
            blk = perm.pop()
            block_table[i, c] = blk
            rows = min(block_size, n - c * block_size)
            k_cache[blk, :rows] = torch.randn(rows, h_kv, d_qk, generator=gen).to(dtype)
    q = torch.randn(b, s_q, h_q, d_qk, generator=gen).to(dtype)
    return q, k_cache, block_table, torch.tensor(seqlens, dtype=torch.int32)


def bit_mismatches(got, want, limit=8, **context):
    """A failure message for two tensors that should hold the same bits: how many elements
    differ, and the first ``limit`` of them (flat index, both bit patterns and values, and the
    same element of each ``context`` tensor of the same shape, e.g. the input)."""
    g, w = got.contiguous().flatten(), want.contiguous().flatten()
    ibits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[g.element_size()]
    gb, wb = g.view(ibits), w.view(ibits)
    bad = (gb != wb).nonzero().flatten()
    lines = [f"{bad.numel()} of {g.numel()} elements differ"]
    ctx = {k: v.contiguous().flatten() for k, v in context.items()}
    for i in bad[:limit].tolist():
        extra = " ".join(f"{k}={v[i].item()!r}" for k, v in ctx.items())
        lines.append(f"  [{i}] got {gb[i].item():#x} ({g[i].float().item()!r}) want "
                     f"{wb[i].item():#x} ({w[i].float().item()!r}) {extra}")
    return "\n".join(lines)


def poison_cuda_allocator(mib: int, device="cuda"):
    """Fill ``mib`` MiB of the CUDA caching allocator's free blocks with NaN, so that an output
    element (or a workspace entry read back) that a kernel never writes shows up as NaN instead of
    a stale right answer."""
    x = torch.full((mib * 1024 * 1024 // 4,), float("nan"), device=device)
    del x
