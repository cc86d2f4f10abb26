"""Triton ``mla::dense_decode``: split-KV MQA over a paged bf16/fp16 cache, then a combine pass.

Work split (FlashMLA's): the keys of all batch elements are cut into blocks of ``SCHED_BLOCK_N``
(64) and a ``decode_schedule`` hands each of ``num_parts`` persistent parts an equal run of the
global block list (it may start in the middle of one batch element and end in another). Each
part's keys are read by several programs: one per row block (up to ``BLOCK_H`` rows of one kv
head, a row being one (query position j, query head) pair, so the h_q (64/128) heads and the s_q
(1-4) MTP positions of a batch element share every key load) and, optionally, per half of the
value columns. A program writes its result straight to ``out``/``lse`` when its part holds a
whole batch element, otherwise a normalised partial (fp32 o, log2-domain lse) into a workspace of
``b + num_parts`` slots (a static bound: each part adds at most one split more than the batch
boundaries it crosses). The combine kernel merges the partials of the split elements, writes
``out = 0, lse = +inf`` for elements with no key, and leaves single-split ones alone.

Two split kernels (``VARIANT``):

* The paged kernel (``_decode_paged_kernel``, the default). Tiles of BLOCK_N (64) keys aligned
  to BLOCK_N, which divides the cache's block size, so a tile lies in one page: one table entry
  per tile, read one tile ahead. Full tiles are copied by TMA into shared memory (a host-made
  descriptor over the cache seen as [pages * block_size, columns]) through Triton's two-stage
  pipeline, with the tile two ahead prefetched into L2 (cp.async.bulk.prefetch); the partial
  tiles at a part's unaligned start and at a sequence's end take a masked path (rows outside the
  range load as 0, so NaN in unused slots never reaches the math), as do the causal masks (only
  the last full tiles of a sequence get them). Scores are one dot per value block (two blocks of
  256 columns) plus one for the 64 non-value columns (576 is not a power of two), each behind a
  branch that hides it from Triton's chained-dot layout choice (see ``_jit.mm0``): both warp
  groups then compute half of the keys of the 64 x 64 scores instead of both the whole, and P
  reaches the PV dots through shared memory. Per-thread running sums of P (``defer_sum``) take
  the per-tile row sum, and its cross-warp-group barriers, out of the loop.
* The gather kernel (``_decode_split_kernel``, VARIANT None; block sizes that BLOCK_N does not
  divide always use it): any block size, one table entry per key, cp.async copies through 64 x
  512 pointer tensors, the scores' dot chained into the PV dot.

Roof at the production shape (H100 SXM: 989 dense bf16 TFLOPS, 3.35 TB/s), FlashMLA's counts:
FLOPs = 2 * b * s_q * h_q * s_k * (576 + 512); bytes >= b * s_k * 576 * 2 (the cache, read once).
b=64 s_q=1 h_q=128 s_k=8192: 146 GFLOP -> 148 us at peak; 604 MB -> 180 us at peak: memory bound
(arithmetic intensity 241 FLOP/B, H100's ridge ~295), FlashMLA 241 us. b=64 s_q=2 s_k=4096: same
FLOPs, 302 MB -> 148 us compute bound, FlashMLA 217 us. The target is >= 0.5x FlashMLA.

Measured on one H100 80GB HBM3 (triton 3.6, torch 2.11, CUDA-graph replay, median, schedule
precomputed with decode_schedule(h_q=128) as the bench does: 66 parts; FlashMLA timed in the same
run), ``python3 tools/gpu_tune.py decode``, over six runs (run-to-run spread ~3%):

    variant                  b=64 s_q=1 s_k=8192     b=128 s_q=1 s_k=8192    b=64 s_q=2 s_k=4096
    FlashMLA                 239-248 us              523-531 us              218-238 us
    gather kernel            792-799 us  0.30x       1495-1525 us  0.35x     834-850 us  0.26-0.29x
    paged, defaults (last)   437-439 us  0.56x       830-835 us  0.63x       465-469 us  0.51x

of which the combine kernel takes 12-13 us at s_q=1 and 29-30 us at s_q=2 (17 / 36 us before it
read two splits at a time). The paged kernel's steps, each timed in the same run as the gather
kernel: split scores + TMA (one value block, no prefetch) 511 / 967 / 553 us; the same with the
scores chained as in the gather kernel (both warp groups computing all of them) 548 / 1029 /
615; with cp.async instead of TMA 514 / 963 / 572; L2 prefetch 1, 2, 3 tiles ahead 473-481 /
880-896 / 509-512 (4: 496 / 925 / 513); deferred row sums 460 / 853 / 494; two value blocks 448 /
841 / 474 (fewer spills; deferred sums off or one value block: within the spread). The build is
sensitive to ptxas's register allocation of the tile loop: moving the accumulator's rescale
after P's conversion took s_q=2 to 525 us. Slower and not kept: 32-key tiles in three stages (n16
score dots, twice the shared-memory reads per FLOP) 615 / 1175 / 683; value columns split over
two programs of 128 rows (block_h 128, dv_split 2: the scores computed twice, 144 KB of Q leaving
one key stage) 667-697 / 1267-1313 / 711-729; rescaling the accumulator only when a row max grows
by more than 2**8 (more registers around the dots, a second cross-warp reduction) 550 / 1053 /
597; merging split elements in the part that finishes them last (a counter per element; no
combine kernel) 575 / 1098 / 625, the epilogue's registers costing the tile loop more than the
combine kernel takes.

What holds the paged kernel at ~3.4 us per 64-key tile of 64 rows (FlashMLA: ~1.9): Q (72 KB)
and two 72 KB key stages fill shared memory, and Triton's pipeliner issues a stage's copy after
the iteration's dots (its loads go last in the loop body), so with two stages the copy of tile
i+1 overlaps only the loop's tail: the L2 prefetch shortens it, nothing hides it. The score dots
run at n32 per warp group with Q read from shared memory each time: shared-memory bound (1.5x
their tensor time). 255 registers with ~100 spilled words (mostly outside the tile loop; the
gather kernel: 176).
Without a schedule argument the op computes one with ~15 small tensor ops, +90-115 us: pass one
made once per decode step.

Why s_q = 2 is the row furthest from the target (analysis 2026-11-26; no new measurement). The
rows of a program are (query position, head) pairs, so s_q is already folded into the row
dimension: each 64-key tile is read by rows / 64 programs of 64 rows, 2 at s_q=1 and 4 at
s_q=2, sharing it through L2 (neighbours on grid axis 0). FlashMLA does the same (64-row CTAs,
ceil(s_q * h_q / 64) of them per part); one CTA cannot hold more rows (a 64 x 512 fp32
accumulator is half the register file). Per SM both rows then do the same work: 124 tile-steps
of 64 x 64 keys (2 * 64 * 64 * 1088 = 8.9 MFLOP and 72 KB from L2 each, 1.21 GB L2->SM in all);
HBM reads 604 MB at s_q=1 (180 us at 3.35 TB/s) and 302 MB at s_q=2 (90 us); 146 GFLOP in both
(197 us at the ~740 TFLOPS measured, 148 at 989). FlashMLA: 241 us at s_q=1 (HBM and tensor
bound together), 217 us at s_q=2 (compute bound, 91% of 740). The paged kernel spends ~3.5 us
per tile-step at both (split kernel ~435 / ~443 us: bound by its own issue and copy latency,
neither HBM nor tensor cores), so FlashMLA's gain from the halved bytes at s_q=2 does not carry
over, and on top of it s_q=2 pays twice the combine (29-30 us, reading 2 x 64 x 256 rows x 2 KB)
because decode_schedule(h_q=128), blind to s_q, makes 66 parts: 66 x 4 = 264 programs (two
waves at one program per SM), each ~62 tiles, so every batch element of 64 tiles is split in
two. FlashMLA's metadata makes 33 parts there (132 CTAs). ``part_group`` (below; auto by
default since 2026-11-25) merges consecutive parts per program (0: until one program per SM; 2
at s_q=2 on the bench's schedule, 1 at s_q=1, where the kernel is the ungrouped one): half the
elements end in one program and are written straight to ``out``, so the combine reads half as
much and the split kernel stores half the fp32 partials, in one wave. Compile check (Triton 3.6,
sm_90, d576, s_q=1 / s_q=2 causal): 255 registers, spills 94 -> 104 / 100 -> 106 words, shared
221208 / 222208 B (unchanged); the tile loops' SASS within 3 instructions of the ungrouped
kernel's, with the same local loads / stores (the added spills sit outside them). Measured on
the H100 (2026-11-25, ``DECODE_PROFILE=1 DECODE_VARIANTS='[{},{"part_group":0},{},
{"part_group":0}]' python3 tools/gpu_tune.py decode``, CUDA-graph replay, FlashMLA live: 248.6 /
536.5 / 231.3 us; two runs each, alternating), us and x FlashMLA:

    row                      part_group 1 (before)       part_group 0 (auto, the default)
    b=64 s_q=1 s_k=8192      437.0 / 440.2  0.57x        446.5 / 444.2  0.56x   (k = 1 here)
    b=128 s_q=1 s_k=8192     837.2 / 841.8  0.64x        833.4 / 849.3  0.63x   (k = 1 here)
    b=64 s_q=2 s_k=4096      466.6 / 468.9  0.49-0.50x   441.4 / 441.9  0.52x

At s_q=2 the split kernel went 436 -> 415-419 us and the combine 28.5 -> 19.4 us (profiler).
The time per tile-step (~3.5 us against FlashMLA's ~1.8) is what remains.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional

import torch
import triton
import triton.language as tl

from ._common import DOT_F32, INTERPRET  # noqa: F401  (tests read it here)
from . import register
from .._device import sm_count
from ._jit import LOG2E, mm as _mm, mm0, pow2 as _pow2
from ..reference.schedule import decode_schedule


# Keys per schedule block. Every schedule this op receives is read in these units: the public
# decode_schedule's default block_n. A schedule may override it in metadata[:, 5] (0 there, as the
# contract writes it today, means this default).
SCHED_BLOCK_N = 64




@triton.jit
def _decode_split_kernel(
    Q, K, BT, SEQ, META, NSPLIT, OUT, LSE, WO, WL,
    stride_qb, stride_qs, stride_qh,
    stride_kblk, stride_kslot, stride_kh,
    stride_btb, stride_btc,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    stride_wos, stride_wor,
    stride_wls,
    B, s_q, group, block_size, max_keys, d_qk, d_v, rows_per_kvh, scale_log2,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_DT: tl.constexpr, HAS_TAIL: tl.constexpr, CAUSAL: tl.constexpr,
    SCHED_BN: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_r = tl.program_id(1)
    row_blocks = tl.cdiv(rows_per_kvh, BLOCK_H)
    kvh = pid_r // row_blocks
    rb = pid_r % row_blocks

    r = rb * BLOCK_H + tl.arange(0, BLOCK_H)  # row within this kv head
    r_ok = r < rows_per_kvh
    j = r // group  # query position (MTP)
    head = kvh * group + r % group
    gr = kvh * rows_per_kvh + r  # row within the workspace

    dv = tl.arange(0, BLOCK_DV)
    dv_ok = dv < d_v
    dt = d_v + tl.arange(0, BLOCK_DT)
    dt_ok = dt < d_qk
    nn = tl.arange(0, BLOCK_N)

    mrow = META + pid_p * 8
    begin_b = tl.load(mrow)
    begin_blk = tl.load(mrow + 1)
    end_b = tl.load(mrow + 2)
    end_blk = tl.load(mrow + 3)
    first_split = tl.load(mrow + 4)
    sched_bn = tl.load(mrow + 5)
    sched_bn = tl.where(sched_bn > 0, sched_bn, SCHED_BN)
    # An empty part has begin_b == end_b == B: no iteration.
    last_b = tl.where(begin_b >= B, begin_b - 1, end_b)

    for bi in range(begin_b, last_b + 1):
        seqlen = tl.load(SEQ + bi)
        # Keys exist only in the table's slots (as in the reference): never read past its row.
        n_keys = tl.minimum(seqlen, max_keys)
        k_begin = tl.where(bi == begin_b, begin_blk * sched_bn, 0)
        k_end = tl.where(bi == end_b, tl.minimum(end_blk * sched_bn, n_keys), n_keys)
        split = tl.where(bi == begin_b, first_split, tl.load(NSPLIT + bi))
        n_split = tl.load(NSPLIT + bi + 1) - tl.load(NSPLIT + bi)
        if CAUSAL:
            limit = seqlen - s_q + j + 1  # [BLOCK_H]: keys t < limit are visible
        else:
            limit = tl.zeros([BLOCK_H], dtype=tl.int32) + seqlen

        q_base = Q + tl.cast(bi, tl.int64) * stride_qb + j * stride_qs + head * stride_qh
        q_v = tl.load(q_base[:, None] + dv[None, :], mask=r_ok[:, None] & dv_ok[None, :],
                      other=0.0)
        if HAS_TAIL:
            q_t = tl.load(q_base[:, None] + dt[None, :], mask=r_ok[:, None] & dt_ok[None, :],
                          other=0.0)

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
        bt_row = BT + tl.cast(bi, tl.int64) * stride_btb
        for start in range(k_begin, k_end, BLOCK_N):
            t = start + nn
            t_ok = t < k_end
            # Table entries past the range are never read (they may be -1 or garbage).
            blk = tl.load(bt_row + (t // block_size) * stride_btc, mask=t_ok, other=0)
            k_row = K + blk.to(tl.int64) * stride_kblk + (t % block_size) * stride_kslot \
                + kvh * stride_kh
            # Masked rows read as 0: NaN in slots past the sequence stays out.
            k_v = tl.load(k_row[:, None] + dv[None, :], mask=t_ok[:, None] & dv_ok[None, :],
                          other=0.0)
            s = _mm(q_v, tl.trans(k_v), tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32),
                    DOT_F32)
            if HAS_TAIL:
                k_t = tl.load(k_row[:, None] + dt[None, :], mask=t_ok[:, None] & dt_ok[None, :],
                              other=0.0)
                s = _mm(q_t, tl.trans(k_t), s, DOT_F32)
            s = s * scale_log2
            visible = t_ok[None, :] & (t[None, :] < limit[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen nothing keeps max -inf: shift by 0 so exp2 gives 0, not NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = _mm(p.to(k_v.dtype), k_v, acc * alpha[:, None], DOT_F32)
            m_i = m_new

        seen = l_i > 0
        o = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse2 = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        if n_split == 1:
            # This part holds the whole batch element: final result, no combine needed.
            o_ptr = OUT + tl.cast(bi, tl.int64) * stride_ob + j * stride_os + head * stride_oh
            tl.store(o_ptr[:, None] + dv[None, :], o.to(OUT.dtype.element_ty),
                     mask=r_ok[:, None] & dv_ok[None, :])
            tl.store(LSE + tl.cast(bi, tl.int64) * stride_lb + head * stride_lh + j,
                     tl.where(seen, lse2 * 0.6931471805599453, float("inf")), mask=r_ok)
        else:
            w_ptr = WO + split.to(tl.int64) * stride_wos + gr * stride_wor
            tl.store(w_ptr[:, None] + dv[None, :], o, mask=r_ok[:, None] & dv_ok[None, :])
            tl.store(WL + split.to(tl.int64) * stride_wls + gr, lse2, mask=r_ok)


@triton.jit
def _decode_combine_kernel(
    WO, WL, NSPLIT, OUT, LSE,
    stride_wos, stride_wor, stride_wls,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    total_rows, rows_per_kvh, group, d_v,
    BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr, SKIP_DONE: tl.constexpr,
):
    bi = tl.program_id(0)
    gr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    g_ok = gr < total_rows
    kvh = gr // rows_per_kvh
    r = gr % rows_per_kvh
    j = r // group
    head = kvh * group + r % group
    dv = tl.arange(0, BLOCK_DV)
    dv_ok = dv < d_v
    s0 = tl.load(NSPLIT + bi)
    s1 = tl.load(NSPLIT + bi + 1)
    o_ptr = OUT + tl.cast(bi, tl.int64) * stride_ob + j * stride_os + head * stride_oh
    l_ptr = LSE + tl.cast(bi, tl.int64) * stride_lb + head * stride_lh + j
    if s1 - s0 != 1:  # one split: the split kernel wrote the result already
        m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        den = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
        live = g_ok
        if SKIP_DONE:
            # (the split kernel with grouped parts) lse +inf in the first slot: the split kernel
            # wrote these rows' result; -inf in a slot: no partial there, its o never written
            lse_0 = tl.load(WL + tl.cast(s0, tl.int64) * stride_wls + gr,
                            mask=g_ok & (gr * 0 + s0 < s1), other=0.0)
            live = g_ok & (lse_0 != float("inf"))
        # Split sp + 1 is loaded before split sp is merged, so that two splits' reads are in
        # flight at a time (the loop is not pipelined otherwise; merging is memory bound).
        n_ok = live & (gr * 0 + s0 < s1)
        lse_n = tl.load(WL + tl.cast(s0, tl.int64) * stride_wls + gr, mask=n_ok,
                        other=float("-inf"))
        if SKIP_DONE:
            n_ok = n_ok & (lse_n != float("-inf"))
        o_n = tl.load(WO + tl.cast(s0, tl.int64) * stride_wos + gr[:, None] * stride_wor
                      + dv[None, :], mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        for sp in range(s0, s1):
            lse_s = lse_n
            o_s = o_n
            nxt = sp + 1
            n_ok = live & (gr * 0 + nxt < s1)
            lse_n = tl.load(WL + tl.cast(nxt, tl.int64) * stride_wls + gr, mask=n_ok,
                            other=float("-inf"))
            if SKIP_DONE:
                n_ok = n_ok & (lse_n != float("-inf"))
            o_n = tl.load(WO + tl.cast(nxt, tl.int64) * stride_wos + gr[:, None] * stride_wor
                          + dv[None, :], mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
            m_new = tl.maximum(m, lse_s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_safe)
            w = tl.exp2(lse_s - m_safe)
            den = den * alpha + w
            acc = acc * alpha[:, None] + w[:, None] * o_s
            m = m_new
        seen = den > 0
        o = acc / tl.where(seen, den, 1.0)[:, None]
        lse = tl.where(seen, (m + tl.log2(tl.where(seen, den, 1.0))) * 0.6931471805599453, float("inf"))
        tl.store(o_ptr[:, None] + dv[None, :], o.to(OUT.dtype.element_ty),
                 mask=live[:, None] & dv_ok[None, :])
        tl.store(l_ptr, lse, mask=live)


# ---------------------------------------------------------------------------------------------
# The paged kernel (the default; see VARIANT below)
# ---------------------------------------------------------------------------------------------
#
# Value columns: the first d_v key columns are cut into VBLOCKS (1 or 2) blocks of BLOCK_DVP
# columns, each its own copy, QK^T dot and PV dot. Block a is this program's (the program of
# value half ``half`` when DV_SPLIT == 2 programs share a row block); block b is the other one
# (VBLOCKS == 2), accumulated by this program too when OWN_B (DV_SPLIT == 1), otherwise only
# multiplied into the scores.


@triton.jit
def _paged_scores(q_a, q_b, q_t, k_a, k_b, k_t, gate, BLOCK_H: tl.constexpr,
                  BLOCK_N: tl.constexpr, VBLOCKS: tl.constexpr, HAS_TAIL: tl.constexpr,
                  SPLIT_S: tl.constexpr, DOT_F32: tl.constexpr):
    """Q K^T of one tile, one dot per value block and one for the non-value tail, each from a
    zero accumulator and summed afterwards (a dot accumulating into another's result would
    count as a chain, see _jit.mm0)."""
    if SPLIT_S:
        s = mm0(q_a, k_a, gate, BLOCK_H, BLOCK_N, SPLIT_S, DOT_F32, TRANS_B=True)
        if VBLOCKS == 2:
            s = s + mm0(q_b, k_b, gate, BLOCK_H, BLOCK_N, SPLIT_S, DOT_F32, TRANS_B=True)
        if HAS_TAIL:
            s = s + mm0(q_t, k_t, gate, BLOCK_H, BLOCK_N, SPLIT_S, DOT_F32, TRANS_B=True)
    else:
        s = _mm(q_a, tl.trans(k_a), tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32), DOT_F32)
        if VBLOCKS == 2:
            s = _mm(q_b, tl.trans(k_b), s, DOT_F32)
        if HAS_TAIL:
            s = _mm(q_t, tl.trans(k_t), s, DOT_F32)
    return s


@triton.jit
def _paged_update(s, visible, k_a, k_b, m_i, l_i, acc, acc_b, scale_log2, MASKED: tl.constexpr,
                  OWN_B: tl.constexpr, DEFER_SUM: tl.constexpr, DOT_F32: tl.constexpr):
    """One online-softmax step: scores s (fp32), values k_a (and k_b when OWN_B); keys outside
    ``visible`` (when MASKED) weigh 0. With DEFER_SUM, l_i is [BLOCK_H, BLOCK_N]: each thread
    keeps its own elements' running sums and the row sum is taken once at the end (with split
    scores a row's keys lie in both warp groups, so a per-tile row sum would cross them through
    shared memory and barriers; the row max still has to)."""
    s = s * scale_log2
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen nothing keeps max -inf: shift by 0 so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    if DEFER_SUM:
        l_i = l_i * alpha[:, None] + p
    else:
        l_i = l_i * alpha + tl.sum(p, 1)
    # (the rescale before P's conversion: the order the measured build has; ptxas's register
    # allocation of this loop is sensitive to it)
    acc = acc * alpha[:, None]
    if OWN_B:
        acc_b = acc_b * alpha[:, None]
    p = p.to(k_a.dtype)
    acc = _mm(p, k_a, acc, DOT_F32)
    if OWN_B:
        acc_b = _mm(p, k_b, acc_b, DOT_F32)
    return m_new, l_i, acc, acc_b


@triton.jit
def _l2_prefetch_tile(K, page, slot, ok, stride_kblk, stride_kslot, kvh_off,
                      PF_CHUNK_BYTES: tl.constexpr):
    """Ask L2 for the BLOCK_N cache rows of a later tile, contiguous in memory (checked on the
    host), so that its TMA copy finds them there: lane 0 of each warp issues one bulk prefetch
    of the warp's PF_CHUNK_BYTES share (16-byte aligned). No data comes back and nothing waits;
    nothing is issued where ``ok`` is false. (One issuing lane per warp: the TMA unit takes
    warp-uniform operands, so per-lane addresses would be issued lane by lane.)"""
    base = (K + page * stride_kblk + slot * stride_kslot + kvh_off).to(tl.int64)
    tl.inline_asm_elementwise(
        "{ .reg .pred p, q; .reg .u32 t, w; .reg .u64 a; "
        "mov.u32 t, %tid.x; and.b32 w, t, 31; setp.ne.u32 q, $2, 0; "
        "setp.eq.and.u32 p, w, 0, q; shr.u32 w, t, 5; mad.wide.u32 a, w, $3, $1; "
        "@p cp.async.bulk.prefetch.L2.global [a], $3; mov.b32 $0, 0; }",
        "=r,l,r,r", [base, ok.to(tl.int32), PF_CHUNK_BYTES + tl.zeros_like(ok.to(tl.int32))],
        dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _paged_fast_tiles(lo, hi, m_i, l_i, acc, acc_b, q_a, q_b, q_t, K, KD_V, KD_T, bt_row,
                      stride_btc, block_size, stride_kblk, stride_kslot, kvh_off, col0, ca, cb,
                      d_v, da, da_ok, db, db_ok, dt, dt_ok, limit, gate, scale_log2,
                      BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, VBLOCKS: tl.constexpr,
                      OWN_B: tl.constexpr, HAS_TAIL: tl.constexpr, SPLIT_S: tl.constexpr,
                      USE_TMA: tl.constexpr, MASKED: tl.constexpr, DEFER_SUM: tl.constexpr,
                      PREFETCH: tl.constexpr, PF_CHUNK_BYTES: tl.constexpr,
                      DOT_F32: tl.constexpr):
    """The tiles [lo, hi) (BLOCK_N-aligned, all keys in range, so each inside one page: no mask
    on the loads; one table entry per tile; TMA copies when USE_TMA). MASKED applies the causal
    limit to the scores."""
    nn = tl.arange(0, BLOCK_N)
    # The next tile's table entry is read one iteration ahead (a scalar carried through the
    # loop): a tile's copy then depends on no load of its own iteration, so the pipeliner issues
    # it num_stages - 1 tiles ahead instead of spending a stage (and a buffer) on the table read.
    page_next = tl.load(bt_row + (lo // block_size) * stride_btc, mask=lo < hi, other=0)
    for start in range(lo, hi, BLOCK_N):
        page = page_next.to(tl.int64)
        slot = start % block_size
        nxt = start + BLOCK_N
        page_next = tl.load(bt_row + (nxt // block_size) * stride_btc, mask=nxt < hi, other=0)
        if PREFETCH > 0:
            # Warm L2 with the tile PREFETCH tiles ahead: its TMA copy, issued one tile ahead
            # and waited at the next iteration's start, then costs an L2 read instead of an HBM
            # round trip.
            pf = start + PREFETCH * BLOCK_N
            pf_page = tl.load(bt_row + (pf // block_size) * stride_btc, mask=pf < hi,
                              other=0).to(tl.int64)
            _l2_prefetch_tile(K, pf_page, pf % block_size, pf < hi, stride_kblk, stride_kslot,
                              kvh_off, PF_CHUNK_BYTES)
        if USE_TMA:
            # 2-D view [num_blocks * block_size, columns]: row = page * block_size + slot
            row0 = (page * block_size + slot).to(tl.int32)
            k_a = KD_V.load([row0, col0 + ca])
            k_b = k_a
            k_t = k_a
            if VBLOCKS == 2:
                k_b = KD_V.load([row0, col0 + cb])
            if HAS_TAIL:
                k_t = KD_T.load([row0, col0 + d_v])
        else:
            k_row = K + page * stride_kblk + (slot + nn) * stride_kslot + kvh_off
            k_a = tl.load(k_row[:, None] + da[None, :], mask=da_ok[None, :], other=0.0)
            k_b = k_a
            k_t = k_a
            if VBLOCKS == 2:
                k_b = tl.load(k_row[:, None] + db[None, :], mask=db_ok[None, :], other=0.0)
            if HAS_TAIL:
                k_t = tl.load(k_row[:, None] + dt[None, :], mask=dt_ok[None, :], other=0.0)
        s = _paged_scores(q_a, q_b, q_t, k_a, k_b, k_t, gate, BLOCK_H, BLOCK_N, VBLOCKS,
                          HAS_TAIL, SPLIT_S, DOT_F32)
        visible = (start + nn)[None, :] < limit[:, None]
        m_i, l_i, acc, acc_b = _paged_update(s, visible, k_a, k_b, m_i, l_i, acc, acc_b,
                                             scale_log2, MASKED, OWN_B, DEFER_SUM, DOT_F32)
    return m_i, l_i, acc, acc_b


@triton.jit
def _paged_store(o, r_ok, cols, cols_ok, bi, j, head, gr, split, n_split, OUT, WO,
                 stride_ob, stride_os, stride_oh, stride_wos, stride_wor):
    """Columns ``cols`` of the rows' output: the final one (this part holds the whole batch
    element) or the normalised fp32 partial of split ``split``."""
    if n_split == 1:
        o_ptr = OUT + tl.cast(bi, tl.int64) * stride_ob + j * stride_os + head * stride_oh
        tl.store(o_ptr[:, None] + cols[None, :], o.to(OUT.dtype.element_ty),
                 mask=r_ok[:, None] & cols_ok[None, :])
    else:
        w_ptr = WO + split.to(tl.int64) * stride_wos + gr * stride_wor
        tl.store(w_ptr[:, None] + cols[None, :], o, mask=r_ok[:, None] & cols_ok[None, :])


@triton.jit
def _decode_paged_kernel(
    Q, K, KD_V, KD_T, BT, SEQ, META, NSPLIT, OUT, LSE, WO, WL,
    stride_qb, stride_qs, stride_qh,
    stride_kblk, stride_kslot, stride_kh,
    stride_btb, stride_btc,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    stride_wos, stride_wor,
    stride_wls,
    B, s_q, group, block_size, max_keys, d_qk, d_v, rows_per_kvh, scale_log2, num_parts,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
    DV_SPLIT: tl.constexpr, VBLOCKS: tl.constexpr, BLOCK_DT: tl.constexpr,
    HAS_TAIL: tl.constexpr, CAUSAL: tl.constexpr, SCHED_BN: tl.constexpr,
    SPLIT_S: tl.constexpr, USE_TMA: tl.constexpr, DEFER_SUM: tl.constexpr,
    PREFETCH: tl.constexpr, PF_CHUNK_BYTES: tl.constexpr, PART_GROUP: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    # Programs that read the same keys (the row blocks and value-column halves of one part)
    # are neighbours on axis 0, so they run at the same time and the second read of a key tile
    # hits L2.
    BLOCK_DVP: tl.constexpr = BLOCK_DV // VBLOCKS  # columns of a value block
    OWN_B: tl.constexpr = VBLOCKS == 2 and DV_SPLIT == 1
    pid = tl.program_id(0)
    pid_p = tl.program_id(1)
    half = pid % DV_SPLIT
    row_blocks = tl.cdiv(rows_per_kvh, BLOCK_H)
    kvh = (pid // DV_SPLIT) // row_blocks
    rb = (pid // DV_SPLIT) % row_blocks

    r = rb * BLOCK_H + tl.arange(0, BLOCK_H)  # row within this kv head
    r_ok = r < rows_per_kvh
    j = r // group  # query position (MTP)
    head = kvh * group + r % group
    gr = kvh * rows_per_kvh + r  # row within the workspace

    ca = half * BLOCK_DVP  # first column of value block a (this program's)
    cb = (1 - half) * BLOCK_DVP  # and of block b (VBLOCKS == 2)
    da = ca + tl.arange(0, BLOCK_DVP)
    da_ok = da < d_v
    db = cb + tl.arange(0, BLOCK_DVP)
    db_ok = db < d_v
    dt = d_v + tl.arange(0, BLOCK_DT)
    dt_ok = dt < d_qk
    nn = tl.arange(0, BLOCK_N)
    col0 = kvh * stride_kh  # this kv head's first column in the descriptors' 2-D view

    mrow = META + pid_p * PART_GROUP * 8
    begin_b = tl.load(mrow)
    begin_blk = tl.load(mrow + 1)
    end_b = tl.load(mrow + 2)
    end_blk = tl.load(mrow + 3)
    first_split = tl.load(mrow + 4)
    sched_bn = tl.load(mrow + 5)
    sched_bn = tl.where(sched_bn > 0, sched_bn, SCHED_BN)
    if PART_GROUP > 1:
        # PART_GROUP consecutive parts as one run of keys (the contract's parts are consecutive
        # runs of one global block list, empty ones last): it ends where the group's last
        # non-empty part ends. last_begin / last_first: that part's first batch element and
        # split (one schedule, one block unit: the first part's sched_bn holds for all).
        last_begin = begin_b
        last_first = first_split
        for g in tl.static_range(1, PART_GROUP):
            pg = pid_p * PART_GROUP + g
            g_begin = tl.load(META + pg * 8, mask=pg < num_parts, other=B)
            take = g_begin < B
            end_b = tl.where(take, tl.load(META + pg * 8 + 2, mask=take, other=0), end_b)
            end_blk = tl.where(take, tl.load(META + pg * 8 + 3, mask=take, other=0), end_blk)
            last_first = tl.where(take, tl.load(META + pg * 8 + 4, mask=take, other=0),
                                  last_first)
            last_begin = tl.where(take, g_begin, last_begin)
    # An empty part has begin_b == end_b == B: no iteration.
    last_b = tl.where(begin_b >= B, begin_b - 1, end_b)

    for bi in range(begin_b, last_b + 1):
        seqlen = tl.load(SEQ + bi)
        # Keys exist only in the table's slots (as in the reference): never read past its row.
        n_keys = tl.minimum(seqlen, max_keys)
        k_begin = tl.where(bi == begin_b, begin_blk * sched_bn, 0)
        k_end = tl.where(bi == end_b, tl.minimum(end_blk * sched_bn, n_keys), n_keys)
        split = tl.where(bi == begin_b, first_split, tl.load(NSPLIT + bi))
        n_split = tl.load(NSPLIT + bi + 1) - tl.load(NSPLIT + bi)
        n_store = n_split  # 1: the result goes straight to out / lse
        if PART_GROUP > 1:
            # The schedule's splits of bi that this group covers, [split, split_last] (one
            # partial for all of them, in slot split). All of bi's: the final result.
            split_last = tl.where(
                bi == end_b, tl.where(last_begin == bi, last_first, tl.load(NSPLIT + bi)),
                tl.load(NSPLIT + bi + 1) - 1)
            n_store = tl.where(split_last - split + 1 == n_split, 1, 2)
        if CAUSAL:
            limit = seqlen - s_q + j + 1  # [BLOCK_H]: keys t < limit are visible
            # keys below every row's limit (row j = 0 has the smallest one)
            all_see = seqlen - s_q + 1
        else:
            limit = tl.zeros([BLOCK_H], dtype=tl.int32) + seqlen
            all_see = k_end
        gate = seqlen > 0  # true wherever a tile exists (see _jit.mm0)

        q_base = Q + tl.cast(bi, tl.int64) * stride_qb + j * stride_qs + head * stride_qh
        q_a = tl.load(q_base[:, None] + da[None, :], mask=r_ok[:, None] & da_ok[None, :],
                      other=0.0)
        q_b = q_a
        q_t = q_a
        if VBLOCKS == 2:
            q_b = tl.load(q_base[:, None] + db[None, :], mask=r_ok[:, None] & db_ok[None, :],
                          other=0.0)
        if HAS_TAIL:
            q_t = tl.load(q_base[:, None] + dt[None, :], mask=r_ok[:, None] & dt_ok[None, :],
                          other=0.0)

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        if DEFER_SUM:
            l_i = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
        else:
            l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_DVP], dtype=tl.float32)
        if OWN_B:
            acc_b = tl.zeros([BLOCK_H, BLOCK_DVP], dtype=tl.float32)
        else:
            acc_b = tl.zeros([1], dtype=tl.float32)  # unused: a small stand-in
        bt_row = BT + tl.cast(bi, tl.int64) * stride_btb

        # Fast tiles: BLOCK_N-aligned (so inside one page: block_size % BLOCK_N == 0, checked
        # on the host) and wholly inside [k_begin, k_end): [f0, f1). Those below every row's
        # causal limit, [f0, fu), need no mask at all; the causal kernel masks the scores of
        # the rest, [fu, f1) (a tile or two at the end of a sequence). The other tiles of the
        # range (an unaligned head, the sequence's last partial tile) go through the masked
        # edge loop below; the order of tiles does not matter to the online softmax.
        f0 = tl.cdiv(k_begin, BLOCK_N) * BLOCK_N
        f1 = tl.maximum((k_end // BLOCK_N) * BLOCK_N, f0)
        if CAUSAL:
            fu = tl.minimum(tl.maximum((all_see // BLOCK_N) * BLOCK_N, f0), f1)
        else:
            fu = f1
        m_i, l_i, acc, acc_b = _paged_fast_tiles(
            f0, fu, m_i, l_i, acc, acc_b, q_a, q_b, q_t, K, KD_V, KD_T, bt_row, stride_btc,
            block_size, stride_kblk, stride_kslot, kvh * stride_kh, col0, ca, cb, d_v,
            da, da_ok, db, db_ok, dt, dt_ok, limit, gate, scale_log2,
            BLOCK_H, BLOCK_N, VBLOCKS, OWN_B, HAS_TAIL, SPLIT_S, USE_TMA, False,
            DEFER_SUM, PREFETCH, PF_CHUNK_BYTES, DOT_F32)
        if CAUSAL:
            m_i, l_i, acc, acc_b = _paged_fast_tiles(
                fu, f1, m_i, l_i, acc, acc_b, q_a, q_b, q_t, K, KD_V, KD_T, bt_row, stride_btc,
                block_size, stride_kblk, stride_kslot, kvh * stride_kh, col0, ca, cb, d_v,
                da, da_ok, db, db_ok, dt, dt_ok, limit, gate, scale_log2,
                BLOCK_H, BLOCK_N, VBLOCKS, OWN_B, HAS_TAIL, SPLIT_S, USE_TMA, True,
                DEFER_SUM, 0, PF_CHUNK_BYTES, DOT_F32)

        # Edge tiles: the aligned tile holding an unaligned k_begin (if any), then the partial
        # tile from f1 to k_end (if any). Rows outside [k_begin, k_end) load as 0 (NaN in unused
        # slots stays out) and weigh 0; the tile lies in one page, whose table entry is valid
        # since the tile holds at least one key of the range.
        t_head = (k_begin // BLOCK_N) * BLOCK_N
        # (k_begin < k_end: a part's begin block may lie past a sequence clipped to its table)
        n_head = ((t_head < f0) & (k_begin < k_end)).to(tl.int32)
        n_edge = n_head + tl.cdiv(tl.maximum(k_end - f1, 0), BLOCK_N)
        for e in tl.range(0, n_edge, num_stages=1, disable_licm=True):
            start = tl.where(e < n_head, t_head, f1 + (e - n_head) * BLOCK_N)
            t = start + nn
            t_ok = (t >= k_begin) & (t < k_end)
            page = tl.load(bt_row + (start // block_size) * stride_btc).to(tl.int64)
            k_row = K + page * stride_kblk + (t % block_size) * stride_kslot + kvh * stride_kh
            k_a = tl.load(k_row[:, None] + da[None, :], mask=t_ok[:, None] & da_ok[None, :],
                          other=0.0)
            k_b = k_a
            k_t = k_a
            if VBLOCKS == 2:
                k_b = tl.load(k_row[:, None] + db[None, :], mask=t_ok[:, None] & db_ok[None, :],
                              other=0.0)
            if HAS_TAIL:
                k_t = tl.load(k_row[:, None] + dt[None, :], mask=t_ok[:, None] & dt_ok[None, :],
                              other=0.0)
            s = _paged_scores(q_a, q_b, q_t, k_a, k_b, k_t, gate, BLOCK_H, BLOCK_N, VBLOCKS,
                              HAS_TAIL, SPLIT_S, DOT_F32)
            visible = t_ok[None, :] & (t[None, :] < limit[:, None])
            m_i, l_i, acc, acc_b = _paged_update(s, visible, k_a, k_b, m_i, l_i, acc, acc_b,
                                                 scale_log2, True, OWN_B, DEFER_SUM, DOT_F32)

        if DEFER_SUM:
            l_i = tl.sum(l_i, 1)
        seen = l_i > 0
        inv = 1.0 / tl.where(seen, l_i, 1.0)
        lse2 = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        l_ok = r_ok & (r * 0 + half == 0)  # the halves hold the same lse: one writes it
        _paged_store(acc * inv[:, None], r_ok, da, da_ok, bi, j, head, gr, split, n_store, OUT,
                     WO, stride_ob, stride_os, stride_oh, stride_wos, stride_wor)
        if OWN_B:
            _paged_store(acc_b * inv[:, None], r_ok, db, db_ok, bi, j, head, gr, split, n_store,
                         OUT, WO, stride_ob, stride_os, stride_oh, stride_wos, stride_wor)
        if n_store == 1:
            tl.store(LSE + tl.cast(bi, tl.int64) * stride_lb + head * stride_lh + j,
                     tl.where(seen, lse2 * 0.6931471805599453, float("inf")), mask=l_ok)
        else:
            tl.store(WL + split.to(tl.int64) * stride_wls + gr, lse2, mask=l_ok)
        if PART_GROUP > 1:
            # What the combine kernel (SKIP_DONE) reads in the schedule's other slots of bi: an
            # lse of +inf in its first slot when this program wrote the final result (the
            # combine leaves those rows alone), -inf in the slots of this group that hold no
            # partial (they weigh nothing and their o is not read).
            if n_store == 1:
                if n_split > 1:
                    tl.store(WL + tl.load(NSPLIT + bi).to(tl.int64) * stride_wls + gr,
                             tl.full([BLOCK_H], float("inf"), tl.float32), mask=l_ok)
            else:
                for sp in range(split + 1, split_last + 1):
                    tl.store(WL + tl.cast(sp, tl.int64) * stride_wls + gr,
                             tl.full([BLOCK_H], float("-inf"), tl.float32), mask=l_ok)


# (BLOCK_N, num_warps, num_stages) for the 512-wide value tile; None: the default below. A
# module-level knob so that tuning runs can try others.
CONFIG_512 = None

# Which split kernel runs. A dict (the default, {}) selects the paged kernel
# (_decode_paged_kernel) for every shape it can run (the cache's block_size a multiple of
# block_n; the gather kernel elsewhere), its keys overriding PAGED_DEFAULTS (the fastest set
# measured, see the module docstring); None selects the gather kernel (_decode_split_kernel,
# with CONFIG_512) everywhere.
#   block_h    rows (query position, head) per program, capped at the shape's rows
#   block_n    keys per tile
#   dv_split   1, or 2: two programs per row block, each accumulating half of the value columns
#              (both compute the row block's full scores)
#   vblocks    1, or 2: the value columns copied and multiplied as two blocks (dv_split 2 implies
#              it)
#   split_s    compute the scores outside Triton's chained-dot layout (see _jit.mm0)
#   tma        copy the unmasked tiles with TMA (needs sm_90+, a cache whose pages are one
#              stride(0) = block_size * stride(1) apart with 16-byte aligned base and strides,
#              and d_v, d_qk - d_v powers of two); else cp.async through pointers
#   prefetch   0, or n: with TMA copies on the GPU, ask L2 for the tile n tiles ahead
#              (cp.async.bulk.prefetch; never under the interpreter)
#   defer_sum  keep per-thread running sums of the probabilities, one row sum at the end
#   part_group 1: one program per schedule part and row block; k >= 2: each program takes k
#              consecutive parts as one run of keys (fewer programs, fewer partial results for
#              the combine; see the module docstring); 0: the smallest k that leaves one program
#              per SM (k = ceil(parts * programs per part / SMs), 1 where that already holds)
#   num_warps, num_stages
# TORCH_MLA_DENSE_DECODE_VARIANT (JSON, read at import) sets it for a whole process, e.g. a GPU
# test run: '{"vblocks": 1}' (a paged variant), 'gather' (the gather kernel).
VARIANT: Optional[dict] = {}
_env_variant = os.environ.get("TORCH_MLA_DENSE_DECODE_VARIANT", "").strip()
if _env_variant:
    VARIANT = None if _env_variant.lower() in ("gather", "none", "null") \
        else json.loads(_env_variant)
PAGED_DEFAULTS = dict(block_h=64, block_n=64, dv_split=1, vblocks=2, split_s=True, tma=True,
                      num_warps=8, num_stages=2, prefetch=2, defer_sum=True, part_group=0)

# (rows per program, num_warps) of the combine kernel. 8 x 512 rows on 4 warps: two splits' tiles
# in flight (the prefetch) and the accumulator take 128 registers (16 rows: 254, half the
# programs per SM).
COMBINE_CONFIG = (8, 4)


class _Launch:
    """The split kernel's launch parameters for one call."""

    def __init__(self, paged, block_h, block_n, num_warps, num_stages, dv_split=1,
                 split_s=False, tma=False, prefetch=0, defer_sum=False, vblocks=1,
                 part_group=1):
        self.paged, self.block_h, self.block_n = paged, block_h, block_n
        self.num_warps, self.num_stages = num_warps, num_stages
        self.dv_split, self.split_s, self.tma, self.prefetch = dv_split, split_s, tma, prefetch
        self.defer_sum = defer_sum
        self.vblocks = max(vblocks, dv_split)
        self.part_group = part_group


def _config(rows_per_kvh: int, d_qk: int, d_v: int):
    """(BLOCK_H, BLOCK_N, num_warps, num_stages) of the gather kernel for this shape."""
    block_h = min(64, _pow2(rows_per_kvh))
    if _pow2(d_v) >= 512:
        # 64 x 576 bf16 keys per stage (72 KB) next to Q (72 KB): two stages just fit 228 KB;
        # the 64 x 512 fp32 accumulator takes 128 registers a thread over 8 warps.
        block_n, warps, stages = CONFIG_512 or (64, 8, 2)
        return block_h, block_n, warps, stages
    return block_h, 64, 4, 2


_TMA_DEVICES: dict = {}


def _tma_ok(q, k_cache, block_size, d_qk, d_v) -> bool:
    """Whether the paged kernel may copy full tiles with TMA descriptors over a 2-D view
    [num_blocks * block_size, columns] of the cache (row = page * block_size + slot)."""
    if d_v != _pow2(d_v) or (d_qk > d_v and d_qk - d_v != _pow2(d_qk - d_v)):
        return False
    s0, s1, s2, s3 = k_cache.stride()
    esize = k_cache.element_size()
    if s3 != 1 or s0 != block_size * s1 or (s1 * esize) % 16 or k_cache.data_ptr() % 16:
        return False
    if q.is_cuda:
        idx = q.device.index if q.device.index is not None else torch.cuda.current_device()
        if idx not in _TMA_DEVICES:
            _TMA_DEVICES[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
        return _TMA_DEVICES[idx]
    return True  # the interpreter


def _launch_config(rows, d_qk, d_v, block_size) -> _Launch:
    if VARIANT is not None:
        v = dict(PAGED_DEFAULTS, **VARIANT)
        if block_size % v["block_n"] == 0:
            return _Launch(True, min(v["block_h"], _pow2(rows)), v["block_n"], v["num_warps"],
                           v["num_stages"], v["dv_split"], bool(v["split_s"]), bool(v["tma"]),
                           int(v["prefetch"]), bool(v["defer_sum"]), int(v["vblocks"]),
                           int(v["part_group"]))
    return _Launch(False, *_config(rows, d_qk, d_v))


def dense_decode(q, k_cache, block_table, cache_seqlens, d_v=512, sm_scale=1.0, causal=False,
                 schedule_metadata=None, num_splits=None):
    b, s_q, h_q, d_qk = q.shape
    _, block_size, h_kv, _ = k_cache.shape
    group = h_q // h_kv
    rows = group * s_q  # rows of one kv head: (query position, query head)
    out = torch.empty((b, s_q, h_q, d_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h_q, s_q), dtype=torch.float32, device=q.device)
    if b == 0:
        return out, lse
    if s_q * h_q == 0:
        return out, lse
    cfg = _launch_config(rows, d_qk, d_v, block_size)
    row_blocks = triton.cdiv(rows, cfg.block_h)
    # programs that share each key tile: kv heads x row blocks x value-column halves
    per_part = h_kv * row_blocks * (cfg.dv_split if cfg.paged else 1)
    if schedule_metadata is None:
        # One part per group of SMs that together hold all programs of a batch element.
        parts = max(1, sm_count(q.device) // per_part)
        schedule_metadata, num_splits = decode_schedule(cache_seqlens, parts, SCHED_BLOCK_N)
    num_parts = schedule_metadata.shape[0]
    max_splits = b + num_parts
    part_group = 1
    if cfg.paged:
        part_group = cfg.part_group
        if part_group == 0:  # auto: one program per SM
            part_group = -(-num_parts * per_part // sm_count(q.device))
        part_group = max(1, min(part_group, num_parts))
    ws_o = torch.empty((max_splits, h_kv * rows, d_v), dtype=torch.float32, device=q.device)
    ws_l = torch.empty((max_splits, h_kv * rows), dtype=torch.float32, device=q.device)
    meta = schedule_metadata.contiguous()
    nsplit = num_splits.contiguous()
    seq = cache_seqlens.contiguous()
    d_tail = d_qk - d_v
    common = (
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_table.stride(0), block_table.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        ws_o.stride(0), ws_o.stride(1), ws_l.stride(0),
        b, s_q, group, block_size, block_table.shape[1] * block_size, d_qk, d_v, rows,
        float(sm_scale) * LOG2E,
    )
    if not cfg.paged:
        _decode_split_kernel[(num_parts, h_kv * row_blocks)](
            q, k_cache, block_table, seq, meta, nsplit, out, lse, ws_o, ws_l, *common,
            BLOCK_H=cfg.block_h, BLOCK_N=cfg.block_n, BLOCK_DV=_pow2(d_v),
            BLOCK_DT=_pow2(d_tail), HAS_TAIL=d_tail > 0, CAUSAL=bool(causal),
            SCHED_BN=SCHED_BLOCK_N, DOT_F32=DOT_F32,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    else:
        block_dv = _pow2(d_v, 16 * cfg.vblocks)
        use_tma = cfg.tma and block_dv == d_v and _tma_ok(q, k_cache, block_size, d_qk, d_v)
        kd_v = kd_t = k_cache  # placeholders: the kernel reads them only with USE_TMA
        if use_tma:
            from triton.tools.tensor_descriptor import TensorDescriptor
            rows_2d = k_cache.shape[0] * block_size
            cols_2d = (h_kv - 1) * k_cache.stride(2) + d_qk
            view = ([rows_2d, cols_2d], [k_cache.stride(1), 1])
            kd_v = TensorDescriptor(k_cache, *view, [cfg.block_n, block_dv // cfg.vblocks])
            kd_t = TensorDescriptor(k_cache, *view, [cfg.block_n, _pow2(d_tail)]) \
                if d_tail > 0 else kd_v
        # L2 prefetch: a tile's rows must be one contiguous range (slots of one head packed),
        # cut into one 16-byte aligned chunk per warp
        tile_bytes = cfg.block_n * d_qk * k_cache.element_size()
        prefetch = cfg.prefetch if (
            use_tma and not INTERPRET and k_cache.stride(1) == d_qk and h_kv == 1
            and tile_bytes % (16 * cfg.num_warps) == 0) else 0
        _decode_paged_kernel[(per_part, triton.cdiv(num_parts, part_group))](
            q, k_cache, kd_v, kd_t, block_table, seq, meta, nsplit, out, lse, ws_o, ws_l,
            *common, num_parts,
            BLOCK_H=cfg.block_h, BLOCK_N=cfg.block_n, BLOCK_DV=block_dv,
            DV_SPLIT=cfg.dv_split, VBLOCKS=cfg.vblocks, BLOCK_DT=_pow2(d_tail),
            HAS_TAIL=d_tail > 0,
            CAUSAL=bool(causal), SCHED_BN=SCHED_BLOCK_N, SPLIT_S=cfg.split_s,
            USE_TMA=use_tma, DEFER_SUM=cfg.defer_sum, PREFETCH=prefetch,
            PF_CHUNK_BYTES=tile_bytes // cfg.num_warps if prefetch else 16,
            PART_GROUP=part_group, DOT_F32=DOT_F32,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    block_r, combine_warps = COMBINE_CONFIG
    _decode_combine_kernel[(b, triton.cdiv(h_kv * rows, block_r))](
        ws_o, ws_l, nsplit, out, lse,
        ws_o.stride(0), ws_o.stride(1), ws_l.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        h_kv * rows, rows, group, d_v,
        BLOCK_R=block_r, BLOCK_DV=_pow2(d_v), SKIP_DONE=part_group > 1,
        num_warps=combine_warps,
    )
    return out, lse


def supports(q, k_cache, block_table, cache_seqlens, d_v=512, sm_scale=1.0, causal=False,
             schedule_metadata=None, num_splits=None) -> List[str]:
    why = []
    if q.dtype not in (torch.bfloat16, torch.float16):
        why.append(f"q dtype {str(q.dtype).replace('torch.', '')}: the Triton kernel takes "
                   "bf16/fp16 (fp32/fp64 run on the reference)")
    d_qk = q.shape[-1]
    if d_v > 512:
        why.append(f"d_v {d_v} > 512: the fp32 output tile of 64 rows would not fit in registers")
    if d_qk - d_v > 256:
        why.append(f"d_qk - d_v = {d_qk - d_v} > 256: the non-value key columns would not fit "
                   "in shared memory next to the values")
    return why


register("dense_decode", dense_decode, supports)
