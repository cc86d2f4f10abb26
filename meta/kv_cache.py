"""Contracts of the FP8 KV-cache ops (byte layouts in layouts.py).

- ``quantize_kv_cache(kv [num_blocks, block_size, 1, d], layout)`` -> packed cache (a new tensor
  laid out as FlashMLA lays it: MODEL1 blocks padded to a multiple of 576 B).
- ``dequantize_kv_cache(k_cache, layout)`` -> bf16 ``[num_blocks, block_size, 1, d]``.
- ``write_kv_cache(k_cache!, kv [n, d], slot_mapping [n] int64, layout)``: quantizes each row of kv
  into slot ``slot_mapping[i]`` (block * block_size + offset) of the cache, in place; slot -1 is
  skipped and no byte outside the written slots changes.
"""

from __future__ import annotations

import torch

from .common import (FLOAT_DTYPES, check, check_device, check_dtype, check_last_dim_contiguous,
                     check_rank, check_size, define)
from .layouts import check_fp8_cache, empty_cache, get_layout

QUANTIZE = define("quantize_kv_cache(Tensor kv, str layout) -> Tensor")
DEQUANTIZE = define("dequantize_kv_cache(Tensor k_cache, str layout) -> Tensor")
WRITE = define("write_kv_cache(Tensor(a!) k_cache, Tensor kv, Tensor slot_mapping, str layout) -> ()")


def check_quantize_kv_cache(kv, layout: str):
    lay = get_layout(layout)
    check_rank("kv", kv, 4, f"[num_blocks, block_size, 1, {lay.d}]")
    check_dtype("kv", kv, FLOAT_DTYPES)
    check(kv.shape[2] == 1, lambda: f"kv.shape[2] (h_kv) must be 1, got {kv.shape[2]}")
    check_size("kv", kv, 3, lay.d, f"d of the {lay.name} layout")
    return lay


@torch.library.register_fake(QUANTIZE)
def _quantize_fake(kv, layout):
    lay = check_quantize_kv_cache(kv, layout)
    return empty_cache(kv.shape[0], kv.shape[1], lay, device=kv.device)


def check_dequantize_kv_cache(k_cache, layout: str):
    lay = get_layout(layout)
    check_fp8_cache("k_cache", k_cache, lay)
    return lay


@torch.library.register_fake(DEQUANTIZE)
def _dequantize_fake(k_cache, layout):
    lay = check_dequantize_kv_cache(k_cache, layout)
    return k_cache.new_empty((k_cache.shape[0], k_cache.shape[1], 1, lay.d), dtype=torch.bfloat16)


def check_write_kv_cache(k_cache, kv, slot_mapping, layout: str):
    lay = get_layout(layout)
    check_fp8_cache("k_cache", k_cache, lay)
    check_rank("kv", kv, 2, f"[n, {lay.d}]")
    check_dtype("kv", kv, FLOAT_DTYPES)
    check_size("kv", kv, 1, lay.d, f"d of the {lay.name} layout")
    check_last_dim_contiguous("kv", kv)
    check_device("kv", kv, "k_cache", k_cache)
    check_rank("slot_mapping", slot_mapping, 1, "[n]")
    check_dtype("slot_mapping", slot_mapping, (torch.int64,))
    check_size("slot_mapping", slot_mapping, 0, kv.shape[0], "rows of kv")
    check_device("slot_mapping", slot_mapping, "k_cache", k_cache)
    return lay


@torch.library.register_fake(WRITE)
def _write_fake(k_cache, kv, slot_mapping, layout):
    check_write_kv_cache(k_cache, kv, slot_mapping, layout)
