"""Triton ``mla::sparse_decode``: sparse MLA decoding over the paged FP8 caches (V32, MODEL1).

Design (split-KV over a device-side schedule, then a combine pass; no host sync anywhere, so a
call captures into a CUDA graph):

* Work list. Every batch element i has ``nbm = cdiv(Lm, B)`` blocks of main keys followed by
  ``nbe = cdiv(Le, B)`` blocks of extra keys (B: the schedule's block_n, 64 when computed here;
  Lm = topk_length[i] clipped to [0, topk], or topk; Le likewise for the extra set). Each set
  is counted in whole blocks, so no block ever mixes the two caches. ``decode_schedule``
  (torch_mla.reference.schedule, pure tensor ops) cuts the batch-major list of blocks into
  ``num_parts`` equal runs; without a schedule argument we
  compute one on the device from exactly these per-set-rounded counts, with num_parts = SM count
  // (h_q / BLOCK_H) (SM count cached per device), so that the main grid is one wave.
* Main kernel, grid ``(num_parts, h_q // BLOCK_H, S)``. A program reads its run from the metadata
  row and walks the batch elements it touches. For each one, and each of its query rows (tokens
  z, z + S, ... of the s_q: S > 1 when the parts and head blocks alone leave SMs idle, as with a
  schedule that counted s_q, see run's s_blocks; each row has its own indices), it runs an online
  softmax over its blocks of that batch: gather
  BLOCK_N indices, mask the invalid ones (position >= length, index < 0 or >= num_blocks *
  block_size: their bytes are never loaded), load the tokens' bytes through their block base
  (``cache + (idx // block_size) * stride(0)``), dequantize in registers (e4m3 bits -> f32, times
  the tile scale -> q's dtype) and feed ``tl.dot`` in chunks of 64 columns (so every chunk has one
  scale per token and every tile is a power of two wide): logits = sum over the 9 (V32: 8 NoPE +
  RoPE) or 8 (MODEL1: 7 NoPE + RoPE) chunks, values = the first 8 chunks (512 columns; MODEL1's
  include RoPE). A batch element covered by one part only is finished in place (normalize, sink,
  write out / lse); otherwise the part writes its normalized partial output and log2-sum-exp
  into an fp32 workspace at split ``num_splits[i] + (part - first part of i)``.
* Combine kernel, grid ``(b * s_q, h_q // 16)``: for a batch element with >= 2 splits, merges
  them with log-sum-exp weights and applies the sink; with 0 splits writes out 0 / lse +inf; with
  1 split it has nothing to do.
* supports(): q bf16/fp16 (tensor-core operands; keys and probabilities are rounded to q's
  dtype, accumulation is fp32); h_q a multiple of 16 (BLOCK_H 64 with 8 warps where h_q allows,
  else 32/16 with 4 warps); d_v <= 512 (all 512 value columns are accumulated and the first d_v
  stored; V32's d_v > 512 would need its RoPE as values); caches 16-byte aligned with stride(0)
  a multiple of 16 (every cache made by empty_cache / quantize_kv_cache / FlashMLA is).
* Workspace: total splits <= b + num_parts (each part adds at most one split per batch element it
  touches beyond the first), so its size is static: ``[b + num_parts, s_q, h_q, 512]`` f32.

A schedule passed by the caller comes from ``torch_mla.decode_schedule`` over this call's key
counts: ``topk_length + extra_topk_length`` (what torch_mla.compat passes), the topk, or
per-set-rounded counts, with any ``block_n`` (read from metadata column 5; 0, in schedules made
before that column existed, reads as 64). The kernel clips every part's block range to the real
blocks the same way and lets the last part of a batch element run to its end, so any of these
partitions each batch element's keys exactly once; they differ only in balance (a schedule made
from unrounded counts can have one block fewer than the per-set-rounded list). A batch element
must have at least one split when it has keys.

Roof (H100 SXM: ~800 TFLOP/s dense bf16 as measured, 3.35 TB/s HBM). Bytes: every gathered token
once per (b, s_q) row (V32 656 B, MODEL1 584 B), q, out; FLOPs 2 * b * s_q * h_q * topk_total *
(d_qk + d_v):

    V32 b=64  s_q=2 h_q=128 topk=2048:         FLOPs 73.0 G  (91 us)   bytes 172 MB (51 us)
    V32 b=128 s_q=2 h_q=128 topk=2048:         FLOPs 146 G   (182 us)  bytes 344 MB (103 us)
    MODEL1 b=128 s_q=2 h_q=64 topk=128+512:    FLOPs 21.5 G  (27 us)   bytes 96 MB  (29 us)
    MODEL1 b=128 s_q=2 h_q=128 topk=128+1024:  FLOPs 77.3 G  (97 us)   bytes 172 MB (51 us)
    V32 b=148 s_q=2 h_q=128 topk=16384:        FLOPs 1.35 T  (1.69 ms) bytes 3.2 GB (0.95 ms)

Compute limits every case but the small MODEL1 one (where the two roofs meet); what a Triton
kernel adds on top is the dequantization (one cvt + mul per key element per head block: keys are
dequantized once per BLOCK_H=64 heads, twice for h_q=128) and the fp32 partial outputs of the
split-KV workspace.

Measured on one H100 80GB HBM3 (Triton 3.6, torch 2.11, CUDA-graph replay, median; FlashMLA's
figures from the same kind of machine, in the FlashMLA peer's README in the shared folder):

    V32 b=64  h_q=128 topk=2048           500 us  146 TFLOP/s  0.40x FlashMLA (201.7 us)
    V32 b=128 h_q=128 topk=2048           989 us  148 TFLOP/s  0.39x (389.6 us)
    MODEL1 b=128 h_q=64 topk=128+512      188 us  114 TFLOP/s  0.57x (107.1 us)
    MODEL1 b=128 h_q=128 topk=128+1024    571 us  135 TFLOP/s  0.38x (216.8 us)
    V32 b=148 h_q=128 topk=16384         8.04 ms  168 TFLOP/s  0.40x (3.21 ms)

What holds it there (from the TTGIR and ptxas figures of the compiled kernel): 255 registers
and ~160 B of spills per thread (the [64, 512] fp32 accumulator alone is 128 registers at 8
warps), ~185 KB of shared memory (q 72 KB + the dequantized bf16 tile 72 KB, shared by the QK
and PV wgmmas, + one stage of raw bytes), hence one CTA per SM and a gather prefetched only one
tile ahead; dequantization and the wgmmas of a tile run one after the other in the same warps.
Tried and slower: BLOCK_N 32 (0.28x on V32), num_stages 3, dequantizing chunk by chunk between
the QK dots, e4m3 -> bf16 with a bf16 scale multiply. In the benchmark of the final tree
(2026-11-25, schedule from decode_schedule(h_q=128): 66 parts, one wave) 0.34-0.35x on the V32
and MODEL1 h_q=128 rows, 0.48x on MODEL1 h_q=64; the schedule's part count alone moved V32 b=64
between 509 us (66 parts) and 591 (132) or 987 (33). Going further needs warp specialization
(a producer warp group gathering and dequantizing into shared memory while the consumers run the
wgmmas, as FlashMLA does), which the long-stable Triton API does not express.

The split-scores variant (``VARIANT`` a dict; the default since 2026-11-25, sixth session). In
the chunked kernel above the scores' dots feed the PV dots (through P), and Triton lays out such
a dot with all warps along M: with BLOCK_H = 64 and 8 warps both warp groups compute the same
64 x 64 scores (TTGIR: the score dots have warpsPerCTA [8, 1], the PV dots [4, 2]), doubling the
QK tensor work (53% of the FLOPs). The variant (``_tile_split``) dequantizes each tile as two
256-column value blocks (V32: [64, 2, 128] bytes times one f32 scale per 128 columns; MODEL1:
[64, 4, 64] bytes times one ue8m0 scale per 64, its RoPE the last group of block b; reshaped to
[64, 256] with no layout conversion) plus V32's 64 RoPE columns, computes one score dot per
block from zero behind an always-true branch (``_jit.mm0``, dense_decode's trick: the scores get
[4, 2], each warp group half of the keys, and P reaches the PV dots through shared memory), keeps
per-thread running sums of P (one row sum at the end) and two [64, 256] accumulators. Compile
check (Triton 3.6, sm_90, two stages): spills 148 -> 54 words (V32 s_q 2), 200 -> 92 (MODEL1
h128 extra); shared memory 190 KB -> 190 KB (V32), 169 KB -> 205 KB (MODEL1); 255 registers
both. ``python3 tools/gpu_tune.py sparse`` times the variants on the bench's rows; on the H100
(2026-11-25, CUDA-graph replay, FlashMLA live in the same run, each variant checked against the
reference first; us and x FlashMLA):

    row                                    chunked           split, 2 stages   split, default stages
    V32 b=64 s_q=2 h_q=128 topk=2048       516.9  0.36x      347.0  0.54x      337.6  0.55x  (3)
    V32 b=128                             1027.6  0.36x      715.1  0.51x      693.9  0.53x  (3)
    MODEL1 h_q=64 topk=128 + extra 512     195.4  0.48x      160.4  0.59x      132.3  0.71x  (1)
    MODEL1 h_q=128 topk=128 + extra 1024   598.8  0.34x      491.0  0.42x      435.1  0.47x  (1)
    V32 b=148 topk=16384                  8771.6  0.35x     5759.6  0.53x     5639.6  0.54x  (3)

(chunked: an earlier run of the same day; FlashMLA 186-188 / 366-371 / 94 / 206-207 /
3066-3070 us in both.) The stages per layout are ``SPLIT_STAGES``.
tests/gpu/test_triton_sparse_decode.py passed on the split variant with two stages (20/20, H100,
2026-11-25). What still limits MODEL1 h_q = 128: its keys are dequantized once per 64-head
block, i.e. twice, where FlashMLA's crossover shares one dequantization between the two halves.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from typing import List, Optional

import torch
import triton
import triton.language as tl

from ..meta.layouts import MODEL1, V32, alignment_reasons
from .._device import sm_count
from ..reference.schedule import decode_schedule
from .. import _dispatch
from . import register
from .._eager import workspace
from . import _common
from ._common import DOT_F32, LaunchSite, _constexpr_tail, launch
from ._jit import mm as _mm, mm0

_SB = 64  # keys per schedule block (decode_schedule's default block_n)
_D_V_MAX = 512  # value columns the kernel accumulates (8 chunks)
_LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _key_chunk(cache, base, sbase, valid, C: tl.constexpr, LAYOUT: tl.constexpr, KT: tl.constexpr):
    """Columns [64 C, 64 C + 64) of the dequantized keys, [BLOCK_N, 64] in KT (q's dtype: the
    dot operand type); 0 where invalid.

    ``base``: byte offset of each token's data; ``sbase``: of its MODEL1 scale bytes. C = 8 is
    V32's RoPE (columns 512..575)."""
    cols = tl.arange(0, 64)
    if LAYOUT == 0 and C == 8:  # V32 RoPE: bf16 after 512 e4m3 + 4 f32 scales
        ptr = (cache + base + 528).to(tl.pointer_type(tl.bfloat16))
        k = tl.load(ptr[:, None] + cols[None, :], mask=valid[:, None], other=0.0).to(KT)
    elif LAYOUT == 1 and C == 7:  # MODEL1 RoPE: bf16 after 448 e4m3
        ptr = (cache + base + 448).to(tl.pointer_type(tl.bfloat16))
        k = tl.load(ptr[:, None] + cols[None, :], mask=valid[:, None], other=0.0).to(KT)
    else:
        raw = tl.load(cache + base[:, None] + (C * 64 + cols)[None, :], mask=valid[:, None],
                      other=0)
        if LAYOUT == 0:  # one f32 scale per 128 NoPE values, right after the NoPE bytes
            sptr = (cache + base + (512 + 4 * (C // 2))).to(tl.pointer_type(tl.float32))
            scale = tl.load(sptr, mask=valid, other=0.0)
        else:  # one ue8m0 byte per 64 values: 2 ** (byte - 127), built from its exponent bits
            e = tl.load(cache + sbase + C, mask=valid, other=0).to(tl.int32)
            scale = (e << 23).to(tl.float32, bitcast=True)
        k = (raw.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale[:, None]).to(KT)
    return k


@triton.jit
def _token_rows(idx_row, t0, length, block_size, stride0, num_slots, LAYOUT: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """For positions [t0, t0 + BLOCK_N) of one key set: which tokens are valid (in the length,
    index in [0, num_slots)), the byte offset of each token's row in the cache (0 for invalid
    ones, never read) and of its scales (V32: the row itself; MODEL1: the block's scale array)."""
    pos = t0 + tl.arange(0, BLOCK_N)
    in_len = pos < length
    ix = tl.load(idx_row + pos, mask=in_len, other=-1)
    valid = in_len & (ix >= 0) & (ix < num_slots)
    ix = tl.where(valid, ix, 0)
    blk = ix // block_size
    off = ix - blk * block_size
    if LAYOUT == 0:
        base = blk.to(tl.int64) * stride0 + off * 656
        sbase = base
    else:
        base = blk.to(tl.int64) * stride0 + off * 576
        sbase = blk.to(tl.int64) * stride0 + block_size * 576 + off * 8
    return valid, base, sbase


@triton.jit
def _tile(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, m, l,
          q0, q1, q2, q3, q4, q5, q6, q7, q8,
          idx_row, t0, length, cache, block_size, stride0, num_slots, scale_log2,
          LAYOUT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
          DOT_F32: tl.constexpr):
    """Online-softmax step over positions [t0, t0 + BLOCK_N) of one key set of one query row;
    positions at or past ``length`` (the end of this part's range of the set, never past its
    topk_length) are skipped like invalid indices."""
    KT = q0.dtype
    valid, base, sbase = _token_rows(idx_row, t0, length, block_size, stride0, num_slots, LAYOUT,
                                     BLOCK_N)

    k0 = _key_chunk(cache, base, sbase, valid, 0, LAYOUT, KT)
    k1 = _key_chunk(cache, base, sbase, valid, 1, LAYOUT, KT)
    k2 = _key_chunk(cache, base, sbase, valid, 2, LAYOUT, KT)
    k3 = _key_chunk(cache, base, sbase, valid, 3, LAYOUT, KT)
    k4 = _key_chunk(cache, base, sbase, valid, 4, LAYOUT, KT)
    k5 = _key_chunk(cache, base, sbase, valid, 5, LAYOUT, KT)
    k6 = _key_chunk(cache, base, sbase, valid, 6, LAYOUT, KT)
    k7 = _key_chunk(cache, base, sbase, valid, 7, LAYOUT, KT)
    s = tl.zeros((BLOCK_H, BLOCK_N), dtype=tl.float32)
    s = _mm(q0, tl.trans(k0), s, DOT_F32)
    s = _mm(q1, tl.trans(k1), s, DOT_F32)
    s = _mm(q2, tl.trans(k2), s, DOT_F32)
    s = _mm(q3, tl.trans(k3), s, DOT_F32)
    s = _mm(q4, tl.trans(k4), s, DOT_F32)
    s = _mm(q5, tl.trans(k5), s, DOT_F32)
    s = _mm(q6, tl.trans(k6), s, DOT_F32)
    s = _mm(q7, tl.trans(k7), s, DOT_F32)
    if LAYOUT == 0:
        k8 = _key_chunk(cache, base, sbase, valid, 8, LAYOUT, KT)
        s = _mm(q8, tl.trans(k8), s, DOT_F32)
    s = tl.where(valid[None, :], s * scale_log2, float("-inf"))

    m_new = tl.maximum(m, tl.max(s, 1))
    # Rows that have seen no valid key yet keep m = -inf; shift by 0 there so that
    # exp2(-inf - -inf) never produces NaN (p and alpha are then exactly 0).
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_use)
    p = tl.exp2(s - m_use[:, None])
    l = l * alpha + tl.sum(p, 1)
    pb = p.to(KT)
    acc0 = _mm(pb, k0, acc0 * alpha[:, None], DOT_F32)
    acc1 = _mm(pb, k1, acc1 * alpha[:, None], DOT_F32)
    acc2 = _mm(pb, k2, acc2 * alpha[:, None], DOT_F32)
    acc3 = _mm(pb, k3, acc3 * alpha[:, None], DOT_F32)
    acc4 = _mm(pb, k4, acc4 * alpha[:, None], DOT_F32)
    acc5 = _mm(pb, k5, acc5 * alpha[:, None], DOT_F32)
    acc6 = _mm(pb, k6, acc6 * alpha[:, None], DOT_F32)
    acc7 = _mm(pb, k7, acc7 * alpha[:, None], DOT_F32)
    return acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, m_new, l


# ---------------------------------------------------------------------------------------------
# the split-scores variant (VARIANT a dict; see the module docstring and VARIANT below)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _key_block(cache, base, sbase, valid, HALF: tl.constexpr, LAYOUT: tl.constexpr,
               KT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Value columns [256 HALF, 256 HALF + 256) of the dequantized keys, [BLOCK_N, 256] in KT
    (q's dtype); 0 where invalid (masked loads: the bytes of invalid tokens are never read).

    Loaded as [BLOCK_N, groups, width] with one scale per (token, group), so the scale is a
    broadcast rather than a per-element select, then reshaped (row-major: column = group * width
    + c). V32: 2 groups of 128 e4m3 values, one f32 scale each (its RoPE is the tail,
    _key_chunk C = 8). MODEL1: 4 groups of 64, one ue8m0 byte each; in HALF 1 the last group
    (columns 448..511) is the bf16 RoPE."""
    if LAYOUT == 0:
        j = tl.arange(0, 2)
        c = tl.arange(0, 128)
        col = 256 * HALF + 128 * j[:, None] + c[None, :]  # [2, 128]
        raw = tl.load(cache + base[:, None, None] + col[None, :, :], mask=valid[:, None, None],
                      other=0)
        sptr = (cache + base[:, None] + (512 + 8 * HALF + 4 * j)[None, :]).to(
            tl.pointer_type(tl.float32))
        scale = tl.load(sptr, mask=valid[:, None], other=0.0)  # [BLOCK_N, 2]
        k = (raw.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale[:, :, None]).to(KT)
        k = tl.reshape(k, (BLOCK_N, 256))
    else:
        j = tl.arange(0, 4)
        c = tl.arange(0, 64)
        col = 256 * HALF + 64 * j[:, None] + c[None, :]  # [4, 64]
        if HALF == 0:
            raw = tl.load(cache + base[:, None, None] + col[None, :, :],
                          mask=valid[:, None, None], other=0)
            e = tl.load(cache + sbase[:, None] + j[None, :], mask=valid[:, None],
                        other=0).to(tl.int32)
            scale = (e << 23).to(tl.float32, bitcast=True)  # 2 ** (byte - 127)
            k = (raw.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale[:, :, None]).to(KT)
        else:
            nope = j < 3  # groups 0-2: e4m3 columns 256..447; group 3: the bf16 RoPE
            raw = tl.load(cache + base[:, None, None] + col[None, :, :],
                          mask=valid[:, None, None] & nope[None, :, None], other=0)
            e = tl.load(cache + sbase[:, None] + (4 + j)[None, :],
                        mask=valid[:, None] & nope[None, :], other=0).to(tl.int32)
            scale = (e << 23).to(tl.float32, bitcast=True)
            deq = (raw.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale[:, :, None]).to(KT)
            rptr = (cache + base + 448).to(tl.pointer_type(tl.bfloat16))
            rope = tl.load(rptr[:, None, None] + (c[None, :] + 0 * j[:, None])[None, :, :],
                           mask=valid[:, None, None] & (j == 3)[None, :, None], other=0.0)
            k = tl.where((j == 3)[None, :, None], rope.to(KT), deq)
        k = tl.reshape(k, (BLOCK_N, 256))
    return k


@triton.jit
def _tile_split(acc_a, acc_b, m, l, q_a, q_b, q_t, gate,
                idx_row, t0, length, cache, block_size, stride0, num_slots, scale_log2,
                LAYOUT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                SPLIT_S: tl.constexpr, DEFER_SUM: tl.constexpr, DOT_F32: tl.constexpr):
    """_tile with the keys as two 256-column value blocks (a, b) and, for V32, the 64 RoPE
    columns (t); the scores are one dot per block from zero, summed (a dot accumulating into
    another's result would chain them, see _jit.mm0). With DEFER_SUM, l is [BLOCK_H, BLOCK_N]:
    per-thread running sums of P, summed over the keys once at the end (a per-tile row sum would
    cross the two warp groups, each holding half of a row's keys)."""
    KT = q_a.dtype
    valid, base, sbase = _token_rows(idx_row, t0, length, block_size, stride0, num_slots, LAYOUT,
                                     BLOCK_N)

    k_a = _key_block(cache, base, sbase, valid, 0, LAYOUT, KT, BLOCK_N)
    k_b = _key_block(cache, base, sbase, valid, 1, LAYOUT, KT, BLOCK_N)
    s = mm0(q_a, k_a, gate, BLOCK_H, BLOCK_N, SPLIT_S, DOT_F32, TRANS_B=True)
    if SPLIT_S:
        s = s + mm0(q_b, k_b, gate, BLOCK_H, BLOCK_N, SPLIT_S, DOT_F32, TRANS_B=True)
    else:
        s = _mm(q_b, tl.trans(k_b), s, DOT_F32)
    if LAYOUT == 0:
        k_t = _key_chunk(cache, base, sbase, valid, 8, LAYOUT, KT)
        if SPLIT_S:
            s = s + mm0(q_t, k_t, gate, BLOCK_H, BLOCK_N, SPLIT_S, DOT_F32, TRANS_B=True)
        else:
            s = _mm(q_t, tl.trans(k_t), s, DOT_F32)
    s = tl.where(valid[None, :], s * scale_log2, float("-inf"))

    m_new = tl.maximum(m, tl.max(s, 1))
    # Rows that have seen no valid key yet keep m = -inf: shift by 0 there (see _tile).
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_use)
    p = tl.exp2(s - m_use[:, None])
    if DEFER_SUM:
        l = l * alpha[:, None] + p
    else:
        l = l * alpha + tl.sum(p, 1)
    acc_a = acc_a * alpha[:, None]
    acc_b = acc_b * alpha[:, None]
    pb = p.to(KT)
    acc_a = _mm(pb, k_a, acc_a, DOT_F32)
    acc_b = _mm(pb, k_b, acc_b, DOT_F32)
    return acc_a, acc_b, m_new, l


@triton.jit
def _store_block(ptr, acc, scale, d_v, C0: tl.constexpr):
    cols = C0 + tl.arange(0, 256)
    tl.store(ptr + cols[None, :], (acc * scale[:, None]).to(ptr.dtype.element_ty),
             mask=cols[None, :] < d_v)


@triton.jit
def _store_chunk(ptr, acc, scale, d_v, C: tl.constexpr):
    cols = C * 64 + tl.arange(0, 64)
    tl.store(ptr + cols[None, :], (acc * scale[:, None]).to(ptr.dtype.element_ty),
             mask=cols[None, :] < d_v)


@triton.jit
def _sparse_decode_kernel(
        q, stride_qb, stride_qs, stride_qh,
        kc, kc_stride0, kc_bs, kc_slots,
        idx, stride_ib, stride_is, topk, lens,
        ec, ec_stride0, ec_bs, ec_slots,
        eidx, stride_eb, stride_es, etopk, elens,
        sink, sched, nsplits, ws_o, ws_lse, n_ws,
        out, stride_ob, stride_os, stride_oh, lse_out,
        b, s_q, h_q, d_v, scale_log2,
        LAYOUT: tl.constexpr, HAS_LEN: tl.constexpr, HAS_EXTRA: tl.constexpr,
        HAS_ELEN: tl.constexpr, HAS_SINK: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, SPLIT: tl.constexpr,
        SPLIT_S: tl.constexpr, DEFER_SUM: tl.constexpr):
    part = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, 64)
    row = sched + part * 8
    b_begin = tl.load(row)
    blk_begin = tl.load(row + 1)
    b_end = tl.load(row + 2)
    blk_end = tl.load(row + 3)
    first = tl.load(row + 4)
    # keys per schedule block, as decode_schedule recorded it (0 in schedules made before the
    # column existed: those used the default 64)
    sb = tl.load(row + 5)
    sb = tl.where(sb > 0, sb, 64)

    # an empty part has b_begin == b: the loop does not run
    for i in range(b_begin, tl.minimum(b_end, b - 1) + 1):
        lm = topk
        if HAS_LEN:
            lm = tl.minimum(tl.maximum(tl.load(lens + i), 0), topk)
        le = 0
        if HAS_EXTRA:
            le = etopk
            if HAS_ELEN:
                le = tl.minimum(tl.maximum(tl.load(elens + i), 0), etopk)
        nbm = tl.cdiv(lm, sb)
        nb = nbm + tl.cdiv(le, sb)
        ns0 = tl.load(nsplits + i)
        nsp = tl.load(nsplits + i + 1) - ns0
        split = tl.where(i == b_begin, first, ns0)
        lo = tl.where(i == b_begin, blk_begin, 0)
        hi = tl.where(i == b_end, blk_end, nb)
        hi = tl.where(split - ns0 == nsp - 1, nb, hi)  # the last part runs to the end
        hi = tl.minimum(hi, nb)
        lo = tl.minimum(lo, hi)
        # positions [lo, hi) of each set this part covers, cut to the set's length; tiles of
        # BLOCK_N are masked at the range's end (sb need not be a multiple of BLOCK_N)
        m_lo = tl.minimum(lo, nbm) * sb
        m_hi = tl.minimum(tl.minimum(hi, nbm) * sb, lm)
        e_lo = (tl.maximum(lo, nbm) - nbm) * sb
        e_hi = tl.minimum((tl.maximum(hi, nbm) - nbm) * sb, le)
        if (nsp > 0) & (split < n_ws):
            if SPLIT:
                gate = hi > lo  # true wherever a tile runs (see _jit.mm0)
                for s in range(tl.program_id(2), s_q, tl.num_programs(2)):
                    qp = (q + i * stride_qb + s * stride_qs + heads[:, None] * stride_qh
                          + tl.arange(0, 256)[None, :])
                    q_a = tl.load(qp)
                    q_b = tl.load(qp + 256)
                    if LAYOUT == 0:
                        q_t = tl.load(q + i * stride_qb + s * stride_qs + heads[:, None] * stride_qh
                                      + 512 + cols[None, :])
                    else:
                        q_t = q_a  # unused: MODEL1's RoPE is in value block b
                    acc_a = tl.zeros((BLOCK_H, 256), dtype=tl.float32)
                    acc_b = tl.zeros((BLOCK_H, 256), dtype=tl.float32)
                    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
                    if DEFER_SUM:
                        l = tl.zeros((BLOCK_H, BLOCK_N), dtype=tl.float32)
                    else:
                        l = tl.zeros((BLOCK_H,), dtype=tl.float32)

                    irow = idx + i * stride_ib + s * stride_is
                    for t0 in range(m_lo, m_hi, BLOCK_N):
                        acc_a, acc_b, m, l = _tile_split(
                            acc_a, acc_b, m, l, q_a, q_b, q_t, gate,
                            irow, t0, m_hi, kc, kc_bs, kc_stride0, kc_slots, scale_log2,
                            LAYOUT, BLOCK_H, BLOCK_N, SPLIT_S, DEFER_SUM, DOT_F32)
                    if HAS_EXTRA:
                        erow = eidx + i * stride_eb + s * stride_es
                        for t0 in range(e_lo, e_hi, BLOCK_N):
                            acc_a, acc_b, m, l = _tile_split(
                                acc_a, acc_b, m, l, q_a, q_b, q_t, gate,
                                erow, t0, e_hi, ec, ec_bs, ec_stride0, ec_slots, scale_log2,
                                LAYOUT, BLOCK_H, BLOCK_N, SPLIT_S, DEFER_SUM, DOT_F32)
                    if DEFER_SUM:
                        l = tl.sum(l, 1)

                    has = l > 0
                    inv = 1.0 / tl.where(has, l, 1.0)
                    lse2 = tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf"))
                    if nsp == 1:
                        # the only part of this batch element: finish here, no combine needed
                        if HAS_SINK:
                            sk = tl.load(sink + heads) * 1.4426950408889634
                            inv = tl.where(has, inv / (1.0 + tl.exp2(sk - tl.where(has, lse2, 0.0))),
                                           0.0)
                        op = (out + i * stride_ob + s * stride_os
                              + heads[:, None] * stride_oh)
                        _store_block(op, acc_a, inv, d_v, 0)
                        _store_block(op, acc_b, inv, d_v, 256)
                        tl.store(lse_out + (i * h_q + heads) * s_q + s,
                                 tl.where(has, lse2 * 0.6931471805599453, float("inf")))
                    else:
                        wrow = (split.to(tl.int64) * s_q + s) * h_q + heads
                        wp = ws_o + wrow[:, None] * 512
                        _store_block(wp, acc_a, inv, 512, 0)
                        _store_block(wp, acc_b, inv, 512, 256)
                        tl.store(ws_lse + wrow, lse2)
            else:
                for s in range(tl.program_id(2), s_q, tl.num_programs(2)):
                    qp = q + i * stride_qb + s * stride_qs + heads[:, None] * stride_qh + cols[None, :]
                    q0 = tl.load(qp)
                    q1 = tl.load(qp + 64)
                    q2 = tl.load(qp + 128)
                    q3 = tl.load(qp + 192)
                    q4 = tl.load(qp + 256)
                    q5 = tl.load(qp + 320)
                    q6 = tl.load(qp + 384)
                    q7 = tl.load(qp + 448)
                    if LAYOUT == 0:
                        q8 = tl.load(qp + 512)
                    else:
                        q8 = q7  # unused: MODEL1 has 8 chunks
                    acc0 = tl.zeros((BLOCK_H, 64), dtype=tl.float32)
                    acc1 = tl.zeros((BLOCK_H, 64), dtype=tl.float32)
                    acc2 = tl.zeros((BLOCK_H, 64), dtype=tl.float32)
                    acc3 = tl.zeros((BLOCK_H, 64), dtype=tl.float32)
                    acc4 = tl.zeros((BLOCK_H, 64), dtype=tl.float32)
                    acc5 = tl.zeros((BLOCK_H, 64), dtype=tl.float32)
                    acc6 = tl.zeros((BLOCK_H, 64), dtype=tl.float32)
                    acc7 = tl.zeros((BLOCK_H, 64), dtype=tl.float32)
                    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
                    l = tl.zeros((BLOCK_H,), dtype=tl.float32)

                    irow = idx + i * stride_ib + s * stride_is
                    for t0 in range(m_lo, m_hi, BLOCK_N):
                        acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, m, l = _tile(
                            acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, m, l,
                            q0, q1, q2, q3, q4, q5, q6, q7, q8,
                            irow, t0, m_hi, kc, kc_bs, kc_stride0, kc_slots, scale_log2,
                            LAYOUT, BLOCK_H, BLOCK_N, DOT_F32)
                    if HAS_EXTRA:
                        erow = eidx + i * stride_eb + s * stride_es
                        for t0 in range(e_lo, e_hi, BLOCK_N):
                            acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, m, l = _tile(
                                acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, m, l,
                                q0, q1, q2, q3, q4, q5, q6, q7, q8,
                                erow, t0, e_hi, ec, ec_bs, ec_stride0, ec_slots, scale_log2,
                                LAYOUT, BLOCK_H, BLOCK_N, DOT_F32)

                    has = l > 0
                    inv = 1.0 / tl.where(has, l, 1.0)
                    lse2 = tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf"))
                    if nsp == 1:
                        # the only part of this batch element: finish here, no combine needed
                        if HAS_SINK:
                            sk = tl.load(sink + heads) * 1.4426950408889634
                            # 1 / (1 + exp(sink - lse)); rows without keys are 0 (acc is 0 there)
                            inv = tl.where(has, inv / (1.0 + tl.exp2(sk - tl.where(has, lse2, 0.0))),
                                           0.0)
                        op = (out + i * stride_ob + s * stride_os
                              + heads[:, None] * stride_oh)
                        _store_chunk(op, acc0, inv, d_v, 0)
                        _store_chunk(op, acc1, inv, d_v, 1)
                        _store_chunk(op, acc2, inv, d_v, 2)
                        _store_chunk(op, acc3, inv, d_v, 3)
                        _store_chunk(op, acc4, inv, d_v, 4)
                        _store_chunk(op, acc5, inv, d_v, 5)
                        _store_chunk(op, acc6, inv, d_v, 6)
                        _store_chunk(op, acc7, inv, d_v, 7)
                        tl.store(lse_out + (i * h_q + heads) * s_q + s,
                                 tl.where(has, lse2 * 0.6931471805599453, float("inf")))
                    else:
                        wrow = (split.to(tl.int64) * s_q + s) * h_q + heads
                        wp = ws_o + wrow[:, None] * 512
                        _store_chunk(wp, acc0, inv, 512, 0)
                        _store_chunk(wp, acc1, inv, 512, 1)
                        _store_chunk(wp, acc2, inv, 512, 2)
                        _store_chunk(wp, acc3, inv, 512, 3)
                        _store_chunk(wp, acc4, inv, 512, 4)
                        _store_chunk(wp, acc5, inv, 512, 5)
                        _store_chunk(wp, acc6, inv, 512, 6)
                        _store_chunk(wp, acc7, inv, 512, 7)
                        tl.store(ws_lse + wrow, lse2)


@triton.jit
def _combine_kernel(ws_o, ws_lse, n_ws, nsplits, sink, out, stride_ob, stride_os, stride_oh,
                    lse_out, s_q, h_q, d_v, HAS_SINK: tl.constexpr, BLOCK_H: tl.constexpr,
                    D: tl.constexpr):
    r = tl.program_id(0)
    i = r // s_q
    s = r - i * s_q
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, D)
    ns0 = tl.load(nsplits + i)
    nsp = tl.load(nsplits + i + 1) - ns0
    ns1 = tl.minimum(ns0 + nsp, n_ws)  # never read past the workspace, whatever the schedule
    if nsp != 1:  # one split: the main kernel wrote the result
        mx = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
        for k in range(ns0, ns1):
            mx = tl.maximum(mx, tl.load(ws_lse + (k * s_q + s) * h_q + heads))
        has = mx > float("-inf")
        m_use = tl.where(has, mx, 0.0)
        acc = tl.zeros((BLOCK_H, D), dtype=tl.float32)
        wsum = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for k in range(ns0, ns1):
            wrow = (k * s_q + s) * h_q + heads
            w = tl.exp2(tl.load(ws_lse + wrow) - m_use)  # empty splits: exp2(-inf) = 0
            wsum += w
            acc += w[:, None] * tl.load(ws_o + wrow[:, None] * D + cols[None, :])
        lse2 = m_use + tl.log2(tl.where(has, wsum, 1.0))
        inv = tl.where(has, 1.0 / tl.where(has, wsum, 1.0), 0.0)
        if HAS_SINK:
            sk = tl.load(sink + heads) * 1.4426950408889634
            inv = tl.where(has, inv / (1.0 + tl.exp2(sk - lse2)), 0.0)
        op = out + i * stride_ob + s * stride_os + heads[:, None] * stride_oh
        tl.store(op + cols[None, :], (acc * inv[:, None]).to(out.dtype.element_ty),
                 mask=cols[None, :] < d_v)
        tl.store(lse_out + (i * h_q + heads) * s_q + s,
                 tl.where(has, lse2 * 0.6931471805599453, float("inf")))


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------

def _block_h(h_q: int) -> int:
    for bh in (64, 32, 16):
        if h_q % bh == 0:
            return bh
    return 0


# Tuning knobs (module attributes so that a tuning script can change them).
_TUNE = {"block_n": 64, "num_stages": 2, "ctas_per_sm": 1}

# Which main kernel body runs (read per call). None: the chunked kernel (nine / eight 64-column
# key chunks, the scores' dots chained into the PV dots, so with BLOCK_H 64 and 8 warps both
# warp groups compute the same scores; _tile). A dict: the split-scores variant (_tile_split:
# keys as two 256-column value blocks + V32's RoPE tail, each score dot behind a branch so each
# warp group computes half of the keys, see _jit.mm0; the default), its keys overriding
# SPLIT_DEFAULTS and SPLIT_STAGES:
#   split_s    the score dots behind branches (False: chained, duplicated as in the old kernel)
#   defer_sum  per-thread running sums of P, one row sum at the end
#   block_n, num_warps, num_stages   for BLOCK_H 64 (BLOCK_H 32 / 16: 32 keys, 4 warps)
# TORCH_MLA_SPARSE_DECODE_VARIANT (JSON, read at import) sets it for a whole process, e.g.
# '{}' (the split variant's defaults) or 'chunks' (the chunked kernel).
VARIANT: Optional[dict] = {}
_env_variant = os.environ.get("TORCH_MLA_SPARSE_DECODE_VARIANT", "").strip()
if _env_variant:
    VARIANT = None if _env_variant.lower() in ("chunks", "none", "null") \
        else json.loads(_env_variant)
SPLIT_DEFAULTS = dict(split_s=True, defer_sum=True, block_n=64, num_warps=8)
# Pipeline stages of the split variant per layout, unless VARIANT names num_stages. H100,
# 2026-11-25, tools/gpu_tune.py sparse (us, stages 1 / 2 / 3): V32 b=64 369 / 347 / 338, b=128
# 774 / 715 / 694, b=148 topk 16384 6201 / 5760 / 5640; MODEL1 h_q=64 + extra 512
# 132 / 160 / 165, h_q=128 + extra 1024 435 / 491 / 504. MODEL1's tiles are short (one
# schedule block of 64 keys per set and part at these shapes), so a deeper pipeline only
# adds its prologue.
SPLIT_STAGES = (3, 1)  # by layout_id: V32, MODEL1


def _config(block_h: int, layout_id: int):
    """(block_n, num_warps, num_stages, split kwargs for the main kernel)."""
    if VARIANT is not None:
        v = dict(SPLIT_DEFAULTS, num_stages=SPLIT_STAGES[layout_id])
        v.update(VARIANT)
        extra = dict(SPLIT=True, SPLIT_S=bool(v["split_s"]), DEFER_SUM=bool(v["defer_sum"]))
        if block_h == 64:
            return v["block_n"], v["num_warps"], v["num_stages"], extra
        return 32, 4, v["num_stages"], extra
    if block_h == 64:
        return _TUNE["block_n"], 8, _TUNE["num_stages"], _NO_SPLIT
    return 32, 4, _TUNE["num_stages"], _NO_SPLIT


# the chunked kernel (every kernel parameter is passed: direct relaunches need all of them)
_NO_SPLIT = dict(SPLIT=False, SPLIT_S=False, DEFER_SUM=False)


def _num_parts(device: torch.device, head_blocks: int) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few parts, so splits and the combine are exercised
    return max(1, sm_count(device) * _TUNE["ctas_per_sm"] // head_blocks)


def _key_count(length, n: int, b: int, device) -> torch.Tensor:
    """Keys per batch element of one set, [b] int64 (length clipped to [0, n])."""
    if length is None:
        return torch.full((b,), n, dtype=torch.int64, device=device)
    return length.to(torch.int64).clamp(0, n)


def _cache_dims(cache: torch.Tensor, layout):
    """(block stride in bytes, block size, slots). The kernels take the cache as uint8 and do
    byte arithmetic on it (an fp8 pointer would compile, and load, differently)."""
    nb, bs = cache.shape[0], cache.shape[1]
    stride0 = cache.stride(0) if nb > 1 else layout.block_bytes(bs)  # 1-byte elements: bytes
    return stride0, bs, nb * bs


# ``kernel[grid](*args, **kwargs)``, directly relaunching the compiled kernel of an identical
# earlier call (see _common.launch). Every launch of this module goes through this name, so that
# tools/host_overhead.py can stand in for it and time the host path without a GPU.
_launch = launch


_NO_GUARD = contextlib.nullcontext()  # stateless, so one instance serves every call


# Direct calls of Triton's C launcher. Even a direct relaunch (_common.launch) goes through
# Triton's runner per launch: a closure, the current device and stream, launch metadata (a dict
# built whenever the hook chains exist, i.e. always in Triton 3.6), the CudaLauncher's scratch
# closures, then the C launcher, which calls the empty hook chains (two Python calls) and, per
# tensor argument, data_ptr() and cuPointerGetAttribute (a driver call). A plan that has launched
# a kernel once through that path records, once, the arguments the runner hands the C launcher
# for it (the runner run again with the C function swapped for a recorder: nothing launched) and,
# if they are what Triton 3.6's runner passes (no scratch, no programmatic dependent launch, no
# hook, our arguments unchanged), calls the C function itself from then on with the same fixed
# arguments, no hooks, and device pointers as ints (which the 3.6 launcher takes as they are).
# The compiled kernel stays the one Triton chose: a plan fixes every argument Triton specializes
# on (dtypes, alignment and int values come from the plan's key or are new allocations) except
# the part count and the tuning knobs, which key the recorded launch. Only with Triton 3.6 (the
# launcher convention this was checked against); TORCH_MLA_TRITON_C_LAUNCH=0 turns it off.
_DIRECT_C = (triton.__version__.split(".")[:2] == ["3", "6"]
             and os.environ.get("TORCH_MLA_TRITON_C_LAUNCH", "1") != "0")
try:
    _knobs_runtime = triton.knobs.runtime
except AttributeError:  # pragma: no cover - Triton without knobs: no direct C launches
    _knobs_runtime, _DIRECT_C = None, False
_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream",
                          lambda index: torch.cuda.current_stream(index).cuda_stream)


def _hooks_idle() -> bool:
    """No launch hook is set (None, or an empty Triton 3.6 HookChain)."""
    rt = _knobs_runtime
    return (not getattr(rt.launch_enter_hook, "calls", rt.launch_enter_hook)
            and not getattr(rt.launch_exit_hook, "calls", rt.launch_exit_hook))


_c_lock = threading.Lock()


def _c_launch(kernel, compiled, grid, args, kwargs, stream):
    """``(C launch function, fixed arguments, constexpr tail)`` of ``compiled`` (what launching
    ``kernel`` with these arguments returned) on ``stream``, checked as described above, or None
    (then launches keep going through Triton)."""
    if not _DIRECT_C or compiled is None or stream is None or not _hooks_idle():
        return None
    tail = _constexpr_tail(kernel, len(args), kwargs)
    launcher = getattr(compiled, "_run", None)
    c = getattr(launcher, "__dict__", {}).get("launch")
    if tail is None or c is None:
        return None
    seen = []
    me = threading.get_ident()

    def record(*a):
        if threading.get_ident() != me:  # another thread's launch of this kernel: a real one
            return c(*a)
        seen.append(a)
        return None

    with _c_lock:  # one swap at a time: a second one would take the first's recorder for c
        c = launcher.__dict__.get("launch")
        launcher.launch = record
        try:
            compiled[grid](*args, *tail)
        except Exception:  # noqa: BLE001 - another convention: stay on Triton's path
            return None
        finally:
            launcher.launch = c
    if len(seen) != 1:
        return None
    a = seen[0]
    ours = (*args, *tail)
    if (len(a) != 13 + len(ours) or tuple(a[:3]) != tuple(grid) or a[3] != stream
            or a[4] is not compiled.function or a[6] or a[7] is not None or a[8] is not None
            or a[9] is not compiled.packed_metadata
            or getattr(a[11], "calls", a[11]) or getattr(a[12], "calls", a[12])
            or any(x is not y for x, y in zip(a[13:], ours))):
        return None
    return c, a[4:10], tail


_F32 = torch.float32
_U8 = torch.uint8
# torch.cuda.current_device() without re-checking CUDA's initialization on every call
_current_device = getattr(torch._C, "_cuda_getDevice", lambda: torch.cuda.current_device())


# Host side of one call (run per layer per decode step, so kept to the least host work: the
# contract has checked every input; no tensor is made but the outputs and the workspace; sizes
# and strides of the new tensors are computed here rather than asked of them). ``prepare`` does
# the part that depends only on the call's metadata once; the eager fast path
# (torch_mla._eager) keeps the function it returns, the op's kernel runs both every time.
def prepare(q, k_cache, indices, topk_length=None, attn_sink=None, extra_k_cache=None,
            extra_indices=None, extra_topk_length=None, d_v=512, sm_scale=1.0,
            schedule_metadata=None, num_splits=None):
    """``run(*args)`` for this call and every call whose tensors have the same shapes, strides,
    dtypes, device, 16-byte alignment and None-ness, and the same d_v. Tuning knobs (_TUNE) are
    read per call, as tuning scripts change them between calls."""
    b, s_q, h_q, d_qk = q.shape
    dev, dtype = q.device, q.dtype
    if b == 0 or s_q == 0 or h_q == 0:
        def run_empty(q, *args):
            return (torch.empty(b, s_q, h_q, d_v, dtype=dtype, device=dev),
                    torch.empty(b, h_q, s_q, dtype=_F32, device=dev))
        return run_empty
    layout = V32 if d_qk == V32.d else MODEL1  # the contract allows only these two
    layout_id = 0 if layout is V32 else 1
    topk = indices.shape[2]
    has_extra = extra_k_cache is not None
    etopk = extra_indices.shape[2] if has_extra else 0
    block_h = _block_h(h_q)
    head_blocks = h_q // block_h
    sms = sm_count(dev)  # (the s_blocks of run: see there)
    has_schedule = schedule_metadata is not None
    if has_schedule:
        copy_schedule = not (schedule_metadata.is_contiguous() and num_splits.is_contiguous())
    kc_view = k_cache.dtype is not _U8  # the kernels take the cache as uint8 (see _cache_args)
    kc_stride0, kc_bs, kc_slots = _cache_dims(k_cache, layout)
    sq0, sq1, sq2 = q.stride()[:3]
    si0, si1 = indices.stride(0), indices.stride(1)
    if has_extra:
        ec_view = extra_k_cache.dtype is not _U8
        ec_stride0, ec_bs, ec_slots = _cache_dims(extra_k_cache, layout)
        se0, se1 = extra_indices.stride(0), extra_indices.stride(1)
    else:  # placeholders, never read (HAS_EXTRA is off)
        ec_stride0, ec_bs, ec_slots, se0, se1 = kc_stride0, kc_bs, 0, si0, si1
    has_len, has_elen = topk_length is not None, extra_topk_length is not None
    copy_lens = has_len and not topk_length.is_contiguous()
    copy_elens = has_elen and not extra_topk_length.is_contiguous()
    has_sink = attn_sink is not None
    convert_sink = has_sink and not (attn_sink.dtype is _F32 and attn_sink.is_contiguous())
    # out is new and contiguous: its strides are these (Triton specializes on the values only)
    so0, so1, so2 = s_q * h_q * d_v, h_q * d_v, d_v
    index = _common.cuda_index(q)  # Triton launches on the current CUDA device
    main_site, combine_site = LaunchSite(_sparse_decode_kernel), LaunchSite(_combine_kernel)
    combine_grid = (b * s_q, h_q // 16)
    # the workspace of the recorded launches: one buffer, partial outputs then their lse
    ws_row, lse_row = s_q * h_q * _D_V_MAX * 4, s_q * h_q * 4
    c_state = [None]  # (num_parts, _config(), the recorded launches) once they are recorded

    def run(q, k_cache, indices, topk_length=None, attn_sink=None, extra_k_cache=None,
            extra_indices=None, extra_topk_length=None, d_v=d_v, sm_scale=1.0,
            schedule_metadata=None, num_splits=None):
        out = torch.empty(b, s_q, h_q, d_v, dtype=dtype, device=dev)
        lse = torch.empty(b, h_q, s_q, dtype=_F32, device=dev)
        if has_schedule:
            if copy_schedule:
                schedule_metadata = schedule_metadata.contiguous()
                num_splits = num_splits.contiguous()
        else:
            # Count each key set in whole schedule blocks so that no block mixes the two caches.
            n = (_key_count(topk_length, topk, b, dev) + _SB - 1) // _SB * _SB
            if has_extra:
                n = n + (_key_count(extra_topk_length, etopk, b, dev) + _SB - 1) // _SB * _SB
            schedule_metadata, num_splits = decode_schedule(n.to(torch.int32),
                                                            _num_parts(dev, head_blocks), _SB)
        num_parts = schedule_metadata.shape[0]
        n_ws = b + num_parts
        # The grid's third axis: query tokens spread over programs (a program takes tokens z,
        # z + S, ...) where the parts and head blocks leave SMs idle, e.g. with a schedule that
        # counted the s_q tokens (decode_schedule(h_q=, s_q=), as FlashMLA's metadata does);
        # 1 (every program all s_q tokens) where they fill the GPU. (Inline: a per-call cost.)
        s_blocks = max(1, min(s_q, sms * _TUNE["ctas_per_sm"] // max(1, num_parts * head_blocks)))
        cfg = _config(block_h, layout_id)
        if index is not None and index != _current_device():
            guard, stream = torch.cuda.device(index), None
        else:
            guard, stream = _NO_GUARD, (_current_stream(index) if index is not None else None)
        if has_len:
            lens = topk_length.contiguous() if copy_lens else topk_length
        else:
            lens = indices
        if has_elen:
            elens = extra_topk_length.contiguous() if copy_elens else extra_topk_length
        else:
            elens = indices
        if has_sink:
            sink = attn_sink.to(_F32).contiguous() if convert_sink else attn_sink
        else:
            sink = lse
        direct = c_state[0]
        if (direct is not None and direct[0] == num_parts and direct[1] == cfg
                and stream is not None and _hooks_idle() and not _TUNE.get("debug")):
            # the recorded launches (see _c_launch), on this call's pointers
            c, fixed, tail, cc, cfixed, ctail = direct[2]
            lse_at = (n_ws * ws_row + 255) // 256 * 256  # ws_lse's offset, 256-byte aligned
            ws, ws_o = workspace(lse_at + n_ws * lse_row, dev, index, stream)
            ws_lse = ws_o + lse_at
            qp, ip = q.data_ptr(), indices.data_ptr()
            kp = k_cache.data_ptr()
            lp, sp, op, lsep = lens.data_ptr(), sink.data_ptr(), out.data_ptr(), lse.data_ptr()
            splits = num_splits.data_ptr()
            if has_extra:
                ep, eip = extra_k_cache.data_ptr(), extra_indices.data_ptr()
            else:
                ep, eip = kp, ip
            c(num_parts, head_blocks, s_blocks, stream, *fixed, None, None, None,
              qp, sq0, sq1, sq2,
              kp, kc_stride0, kc_bs, kc_slots,
              ip, si0, si1, topk, lp,
              ep, ec_stride0, ec_bs, ec_slots,
              eip, se0, se1, etopk, elens.data_ptr() if has_elen else ip,
              sp, schedule_metadata.data_ptr(), splits, ws_o, ws_lse, n_ws,
              op, so0, so1, so2, lsep,
              b, s_q, h_q, d_v, float(sm_scale) * _LOG2E, *tail)
            cc(combine_grid[0], combine_grid[1], 1, stream, *cfixed, None, None, None,
               ws_o, ws_lse, n_ws, splits, sp, op, so0, so1, so2, lsep, s_q, h_q, d_v, *ctail)
            return out, lse
        ws_o = torch.empty(n_ws, s_q, h_q, _D_V_MAX, dtype=_F32, device=dev)
        ws_lse = torch.empty(n_ws, s_q, h_q, dtype=_F32, device=dev)
        kc = k_cache.view(_U8) if kc_view else k_cache
        if has_extra:
            ec = extra_k_cache.view(_U8) if ec_view else extra_k_cache
            eidx = extra_indices
        else:
            ec, eidx = kc, indices
        block_n, num_warps, num_stages, split_kw = cfg
        with guard:
            main_args = (q, sq0, sq1, sq2,
                         kc, kc_stride0, kc_bs, kc_slots,
                         indices, si0, si1, topk, lens,
                         ec, ec_stride0, ec_bs, ec_slots,
                         eidx, se0, se1, etopk, elens,
                         sink, schedule_metadata, num_splits, ws_o, ws_lse, n_ws,
                         out, so0, so1, so2, lse,
                         b, s_q, h_q, d_v, float(sm_scale) * _LOG2E)
            main_kw = dict(LAYOUT=layout_id, HAS_LEN=has_len, HAS_EXTRA=has_extra,
                           HAS_ELEN=has_elen, HAS_SINK=has_sink, BLOCK_H=block_h,
                           BLOCK_N=block_n, DOT_F32=DOT_F32, num_warps=num_warps,
                           num_stages=num_stages, **split_kw)
            kern = _launch(main_site, (num_parts, head_blocks, s_blocks), *main_args, **main_kw)
            if _TUNE.get("debug"):  # tuning scripts read registers / spills / shared memory
                _TUNE["last_kernel"] = kern
            # Always launched: whether any batch element has 0 or >= 2 splits is known only on
            # the device (a batch element with exactly one split returns at once there).
            comb_args = (ws_o, ws_lse, n_ws, num_splits, sink, out, so0, so1, so2,
                         lse, s_q, h_q, d_v)
            comb_kw = dict(HAS_SINK=has_sink, BLOCK_H=16, D=_D_V_MAX, num_warps=4)
            ckern = _launch(combine_site, combine_grid, *comb_args, **comb_kw)
        if _DIRECT_C and stream is not None and not _TUNE.get("debug"):
            m = _c_launch(_sparse_decode_kernel, kern, (num_parts, head_blocks, s_blocks),
                          main_args, main_kw, stream)
            cm = m and _c_launch(_combine_kernel, ckern, (*combine_grid, 1), comb_args, comb_kw,
                                 stream)
            c_state[0] = (num_parts, cfg, (*m, *cm)) if cm else None
        return out, lse

    return run


_Q_DTYPES = (torch.bfloat16, torch.float16)


def _aligned16(cache: torch.Tensor) -> bool:
    """alignment_reasons(name, cache, why) == [] (16-byte base and block stride)."""
    return cache.data_ptr() % 16 == 0 and (cache.shape[0] <= 1 or cache.stride(0) % 16 == 0)


def _aligned(name: str, cache: torch.Tensor) -> List[str]:
    return alignment_reasons(name, cache, "the kernel loads tokens and their f32/bf16 parts with aligned vectors")


def supports(q, k_cache, indices, topk_length=None, attn_sink=None, extra_k_cache=None,
             extra_indices=None, extra_topk_length=None, d_v=512, sm_scale=1.0,
             schedule_metadata=None, num_splits=None) -> List[str]:
    # every call asks this: the accepting case first, in one expression (the conditions of the
    # reasons below, and alignment_reasons' with align=16)
    if (q.dtype in _Q_DTYPES and q.shape[2] % 16 == 0 and d_v <= _D_V_MAX
            and _aligned16(k_cache) and (extra_k_cache is None or _aligned16(extra_k_cache))):
        return []
    reasons = []
    if q.dtype not in _Q_DTYPES:
        reasons.append(f"q dtype {q.dtype}: Triton kernels take bf16/fp16 (the dots run on "
                       "q's dtype)")
    h_q = q.shape[2]
    if _block_h(h_q) == 0:
        reasons.append(f"h_q={h_q} is not a multiple of 16 (heads are processed in blocks of "
                       "64, 32 or 16)")
    if d_v > _D_V_MAX:
        reasons.append(f"d_v={d_v} > {_D_V_MAX}: the kernel accumulates the first 512 value "
                       "columns only")
    reasons += _aligned("k_cache", k_cache)
    if extra_k_cache is not None:
        reasons += _aligned("extra_k_cache", extra_k_cache)
    return reasons


sparse_decode = _dispatch.prepared_impl(prepare)
register("sparse_decode", sparse_decode, supports, prepare)
