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
