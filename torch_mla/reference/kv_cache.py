"""Exact reference of the FP8 KV-cache ops: quantize, dequantize and the in-place slot writer.

The byte formats are FlashMLA's (tests/quant.py there is the definition; meta/layouts.py has the
facts). Per token and per tile of NoPE values (128 for V32, 64 for MODEL1):

    amax      = max |x| over the tile            (x cast to bf16 first: the cache holds bf16)
    scale_inv = 2 ** ceil(log2(max(amax / 448, 1e-4)))          (f32 arithmetic)
    stored    = (x / scale_inv) as float8_e4m3fn

V32 stores scale_inv as f32 next to the token; MODEL1 stores its ue8m0 byte (exponent + 127) in a
per-block scale section. RoPE values are stored as bf16, unquantized.

Everything here works on uint8 views of the cache, addressing blocks through ``stride(0)``
(``meta.layouts.block_view``), so padded caches (FlashMLA's V32 quantizer allocates
block_size + 1 tokens per block) and uint8 caches work alike.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ..meta.layouts import (MODEL1, MODEL1_DATA_BYTES, MODEL1_SCALE_STRIDE, V32, FP8Layout,
                            block_view, empty_cache, get_layout)

_FP8_MAX = 448.0  # largest finite float8_e4m3fn
_MIN_SCALE_INV = 1e-4  # FlashMLA's floor of amax / 448 (keeps all-zero tiles finite)


# ---------------------------------------------------------------------------------------------
# per-token packing
# ---------------------------------------------------------------------------------------------

def _scales_inv(nope: torch.Tensor, layout: FP8Layout) -> torch.Tensor:
    """Power-of-two scale_inv per tile: f32 ``[n, num_tiles]`` of bf16 values ``nope [n, d_nope]``.

    Same f32 operations as FlashMLA (clamp, log2, ceil, pow) so the bytes match on every input,
    NaN/inf included. For finite bf16 inputs amax / 448 is either an exact power of two or at
    least 1/224 (relative) away from one, so the f32 log2 can never round across an integer.
    """
    tiles = nope.view(nope.shape[0], layout.num_tiles, layout.tile)
    amax = tiles.abs().amax(dim=-1).float()  # exact: |x| and max are exact on bf16 values
    # a tensor divisor: CUDA divides by a Python number as a multiplication by its reciprocal
    return torch.pow(2, torch.clamp_min(amax / torch.full_like(amax, _FP8_MAX),
                                        _MIN_SCALE_INV).log2().ceil())


def _quantize_nope(nope: torch.Tensor, scale_inv: torch.Tensor, layout: FP8Layout) -> torch.Tensor:
    """e4m3 bytes ``[n, d_nope]`` of bf16 ``nope`` divided by its tile's scale_inv."""
    n = nope.shape[0]
    tiles = nope.float().view(n, layout.num_tiles, layout.tile)
    # Division by a power of two is exact, so the only rounding is the e4m3 cast (RNE).
    q = (tiles / scale_inv.unsqueeze(-1)).to(torch.float8_e4m3fn)
    return q.view(torch.uint8).reshape(n, layout.d_nope)


def _rope_bytes(rope: torch.Tensor) -> torch.Tensor:
    """bf16 bytes ``[n, 2 * d_rope]`` (native byte order, as FlashMLA's ``.view``)."""
    return rope.contiguous().view(torch.uint8)


def _pack_v32(x: torch.Tensor) -> torch.Tensor:
    """bf16 ``[n, 576]`` -> V32 token bytes ``[n, 656]``: NoPE e4m3 | 4 x f32 scale | bf16 RoPE."""
    lay = V32
    nope, rope = x[:, : lay.d_nope], x[:, lay.d_nope:]
    s = _scales_inv(nope, lay)
    return torch.cat([_quantize_nope(nope, s, lay), s.contiguous().view(torch.uint8),
                      _rope_bytes(rope)], dim=1)


def _pack_model1(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """bf16 ``[n, 512]`` -> MODEL1 (data ``[n, 576]`` = NoPE e4m3 | bf16 RoPE,
    scales ``[n, 8]`` = 7 ue8m0 bytes | one zero pad byte)."""
    lay = MODEL1
    nope, rope = x[:, : lay.d_nope], x[:, lay.d_nope:]
    s = _scales_inv(nope, lay)
    data = torch.cat([_quantize_nope(nope, s, lay), _rope_bytes(rope)], dim=1)
    # float8_e8m0fnu of an exact power of two 2**e is the byte e + 127 (NaN -> 0xFF), which is
    # exactly what FlashMLA stores.
    sbytes = s.to(torch.float8_e8m0fnu).view(torch.uint8)
    pad = torch.zeros((x.shape[0], MODEL1_SCALE_STRIDE - lay.num_tiles), dtype=torch.uint8,
                      device=x.device)
    return data, torch.cat([sbytes, pad], dim=1)


def _pack(x: torch.Tensor, layout: FP8Layout):
    x = x.to(torch.bfloat16)
    return _pack_v32(x) if layout is V32 else _pack_model1(x)


# ---------------------------------------------------------------------------------------------
# per-token unpacking
# ---------------------------------------------------------------------------------------------

def _unpack_v32(tok: torch.Tensor) -> torch.Tensor:
    """V32 token bytes ``[n, 656]`` -> bf16 ``[n, 576]`` (e4m3 -> f32, times the f32 scale)."""
    lay = V32
    n = tok.shape[0]
    nope = tok[:, : lay.d_nope].contiguous().view(torch.float8_e4m3fn).float()
    s_end = lay.d_nope + lay.num_tiles * 4
    scale = tok[:, lay.d_nope: s_end].contiguous().view(torch.float32)  # [n, num_tiles]
    rope = tok[:, s_end:].contiguous().view(torch.bfloat16)
    nope = (nope.view(n, lay.num_tiles, lay.tile) * scale.unsqueeze(-1)).view(n, lay.d_nope)
    return torch.cat([nope.to(torch.bfloat16), rope], dim=1)


def _unpack_model1(data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MODEL1 data ``[n, 576]`` and scale bytes ``[n, >= 7]`` -> bf16 ``[n, 512]``
    (e4m3 -> bf16, times the ue8m0 scale as bf16, in bf16 like FlashMLA)."""
    lay = MODEL1
    n = data.shape[0]
    nope = data[:, : lay.d_nope].contiguous().view(torch.float8_e4m3fn).to(torch.bfloat16)
    rope = data[:, lay.d_nope:].contiguous().view(torch.bfloat16)
    scale = scales[:, : lay.num_tiles].contiguous().view(torch.float8_e8m0fnu).to(torch.bfloat16)
    nope = (nope.view(n, lay.num_tiles, lay.tile) * scale.unsqueeze(-1)).view(n, lay.d_nope)
    return torch.cat([nope, rope], dim=1)


# ---------------------------------------------------------------------------------------------
# views of a cache: [num_blocks, block_size, bytes] per section, honouring stride(0)
# ---------------------------------------------------------------------------------------------

def _sections(cache: torch.Tensor, layout: FP8Layout):
    """Strided uint8 views of the cache's per-token sections, each ``[num_blocks, block_size, w]``:
    V32 -> (tokens,); MODEL1 -> (data, scales). Writes into them land in the cache."""
    nb, bs = cache.shape[0], cache.shape[1]
    rows = block_view(cache, layout)  # [nb, bs * bytes_per_token], stride (stride0, 1)
    if layout is V32:
        return (rows.view(nb, bs, layout.bytes_per_token),)
    split = bs * MODEL1_DATA_BYTES
    data = rows[:, :split].view(nb, bs, MODEL1_DATA_BYTES)
    scales = rows[:, split:].view(nb, bs, MODEL1_SCALE_STRIDE)
    return data, scales


def gather_tokens(cache: torch.Tensor, layout: FP8Layout, slots: torch.Tensor) -> torch.Tensor:
    """Dequantized bf16 tokens ``[n, d]`` of in-range slots ``slots [n]`` (int64,
    block * block_size + offset). Reads only those tokens' bytes; the caller clamps invalid
    slots into range and masks their rows (their bytes may be garbage)."""
    bs = cache.shape[1]
    blk, off = slots // bs, slots % bs
    secs = _sections(cache, layout)
    if layout is V32:
        return _unpack_v32(secs[0][blk, off])
    return _unpack_model1(secs[0][blk, off], secs[1][blk, off])


# ---------------------------------------------------------------------------------------------
# the ops
# ---------------------------------------------------------------------------------------------

def quantize_kv_cache(kv: torch.Tensor, layout: str) -> torch.Tensor:
    lay = get_layout(layout)
    nb, bs = kv.shape[0], kv.shape[1]
    cache = empty_cache(nb, bs, lay, device=kv.device)  # same strides as the fake impl
    if cache.numel() == 0:
        return cache
    x = kv.reshape(nb * bs, lay.d)
    row = lay.block_bytes(bs)
    # Every byte of every block row, MODEL1's end-of-block padding included, is written so the
    # result is deterministic (FlashMLA leaves pad bytes uninitialised; readers ignore them).
    full = cache.view(torch.uint8).as_strided((nb, row), (row, 1))
    if lay is V32:
        full.copy_(_pack(x, lay).view(nb, row))
    else:
        data, scales = _pack(x, lay)
        used = bs * lay.bytes_per_token
        full[:, :used].copy_(torch.cat([data.view(nb, bs * MODEL1_DATA_BYTES),
                                        scales.view(nb, bs * MODEL1_SCALE_STRIDE)], dim=1))
        full[:, used:].zero_()
    return cache


def dequantize_kv_cache(k_cache: torch.Tensor, layout: str) -> torch.Tensor:
    lay = get_layout(layout)
    nb, bs = k_cache.shape[0], k_cache.shape[1]
    if nb * bs == 0:
        return torch.empty((nb, bs, 1, lay.d), dtype=torch.bfloat16, device=k_cache.device)
    secs = _sections(k_cache, lay)
    if lay is V32:
        out = _unpack_v32(secs[0].reshape(nb * bs, lay.bytes_per_token))
    else:
        out = _unpack_model1(secs[0].reshape(nb * bs, MODEL1_DATA_BYTES),
                             secs[1].reshape(nb * bs, MODEL1_SCALE_STRIDE))
    return out.view(nb, bs, 1, lay.d)


def write_kv_cache(k_cache: torch.Tensor, kv: torch.Tensor, slot_mapping: torch.Tensor,
                   layout: str) -> None:
    """Quantize row i of ``kv`` into slot ``slot_mapping[i]``, in place, without a host sync.

    Slots < 0 or >= num_blocks * block_size are skipped. When several rows name the same slot
    the last of them (largest i) wins, deterministically. Only the written slots' bytes change
    (for MODEL1: their 576 data bytes and their 8 scale bytes, pad byte written as 0).

    How, without reading slot_mapping on the host: every row performs one ``index_put_``, but
    rows are rewired so the result does not depend on the order the writes land in:
    - a valid row writes the bytes of its slot's winner (all writers of a slot agree);
    - a skipped row writes into slot 0 whatever slot 0 ends up holding: the bytes of slot 0's
      winner if some valid row targets slot 0, else slot 0's current bytes (a no-op).
    """
    lay = get_layout(layout)
    nb, bs = k_cache.shape[0], k_cache.shape[1]
    n = kv.shape[0]
    num_slots = nb * bs
    if n == 0 or num_slots == 0:
        return None
    dev = kv.device
    packed = _pack(kv, lay)
    packed = (packed,) if lay is V32 else packed

    slots = slot_mapping.to(torch.int64)
    valid = (slots >= 0) & (slots < num_slots)
    key = torch.where(valid, slots, torch.full_like(slots, -1))
    # Stable sort: within a group of equal keys the last element is the largest row index.
    sorted_key, order = torch.sort(key, stable=True)
    group_last = torch.searchsorted(sorted_key, key, right=True) - 1  # >= 0: key itself is there
    winner = order[group_last]  # for a valid row: the last row writing the same slot
    zero = torch.zeros(1, dtype=torch.int64, device=dev)
    pos0 = (torch.searchsorted(sorted_key, zero, right=True) - 1).clamp_min(0)
    has0 = sorted_key[pos0] == 0  # [1]: some valid row writes slot 0
    winner0 = order[pos0]  # [1]: the last such row (meaningful when has0)

    target = torch.where(valid, slots, torch.zeros_like(slots))
    blk, off = target // bs, target % bs
    secs = _sections(k_cache, lay)
    for sec, new in zip(secs, packed):
        old0 = sec[0, 0].unsqueeze(0)  # [1, w] current bytes of slot 0 (read before writing)
        for_skipped = torch.where(has0.unsqueeze(-1), new[winner0], old0)  # [1, w]
        vals = torch.where(valid.unsqueeze(-1), new[winner], for_skipped)
        sec.index_put_((blk, off), vals)
    return None
