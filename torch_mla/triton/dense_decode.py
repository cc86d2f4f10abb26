"""Triton ``mla::dense_decode``: split-KV MQA over a paged bf16/fp16 cache, then a combine pass.

Work split (FlashMLA's): the keys of all batch elements are cut into blocks of ``SCHED_BLOCK_N``
(64) and a ``decode_schedule`` hands each of ``num_parts`` persistent programs an equal run of the
global block list (it may start in the middle of one batch element and end in another). Grid =
(part, row block): a row block is up to ``BLOCK_H`` rows of one kv head, a row being one (query
position j, query head) pair, so the h_q (64/128) heads and the s_q (1-4) MTP positions of a
batch element share every key load. A part writes its result straight to ``out``/``lse`` when it
holds a whole batch element, otherwise a normalised partial (fp32 o, log2-domain lse) into a
workspace of ``b + num_parts`` slots (a static bound: each part adds at most one split more than
the batch boundaries it crosses). The combine kernel merges the partials of the split elements,
writes ``out = 0, lse = +inf`` for elements with no key, and leaves single-split ones alone.

Per key tile of ``BLOCK_N`` keys, the keys' rows are found through the block table (masked load:
entries past the part's range are never read), the first ``d_v`` columns serve both as the keys'
first part and as the values (read once), and the remaining ``d_qk - d_v`` columns (the 64 RoPE
columns) make a second, small dot: 576 is not a power of two, 512 + 64 are. Masked loads give 0
for slots past the sequence, so NaN in unused cache slots never reaches the math.

Roof at the production shape (H100 SXM: 989 dense bf16 TFLOPS, 3.35 TB/s), FlashMLA's counts:
FLOPs = 2 * b * s_q * h_q * s_k * (576 + 512); bytes >= b * s_k * 576 * 2 (the cache, read once).
b=64 s_q=1 h_q=128 s_k=8192: 146 GFLOP -> 148 us at peak; 604 MB -> 180 us at peak: memory bound
(arithmetic intensity 241 FLOP/B, H100's ridge ~295), FlashMLA 241 us. b=64 s_q=2 s_k=4096: same
FLOPs, 302 MB -> 148 us compute bound, FlashMLA 217 us. The target is >= 0.5x FlashMLA.
With ``BLOCK_H`` = 64 rows per program and h_q = 128 two programs read the same keys: the second
read is meant to hit L2 (they run side by side on neighbouring SMs at the same time).

Measured on H100 (triton 3.6, torch 2.11, CUDA-graph replay, schedule precomputed):
b=64 s_q=1 s_k=8192: 778 us (188 TFLOPS, 776 GB/s, 0.31x FlashMLA's 241 us); b=128: 1516 us
(0.34x); b=64 s_q=2 s_k=4096 causal: 778 us (0.28x). Without a schedule argument the op computes
one with ~15 small tensor ops, +90-115 us: pass one made once per decode step. Below the 0.5x target; why, as far as the compiled
code shows: (1) Triton lays the warps of a dot whose result feeds another dot all along M
(FlashAttention's choice), so with 64 rows and 8 warps both warpgroups compute the same 64 x 64
x 576 QK^T: the larger matmul runs twice. 8 warps are needed because the 64 x 512 fp32 output
takes 256 registers a thread on one warpgroup (tried: 4 warps, 2.8x slower from spills). (2) Q
(72 KB) and two 72 KB key stages fill shared memory, so the copy of tile i+1 is issued only
after tile i's dots and waited at the next iteration's start: loads and MMAs barely overlap
(tried: BLOCK_N 32/16 with 3-5 stages, 1.3-1.9x slower; prefetching table entries a tile ahead,
1.25x slower). A kernel that splits the PV product across warpgroups while sharing S (FlashMLA's
design) is beyond what tl.dot's layouts express; that is the native backend's job.
"""

from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from ._common import DOT_F32, INTERPRET  # noqa: F401  (tests read it here)
from . import register
from .._device import sm_count
from ._jit import LOG2E, mm as _mm, pow2 as _pow2
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
    BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
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
        for sp in range(s0, s1):
            lse_s = tl.load(WL + tl.cast(sp, tl.int64) * stride_wls + gr, mask=g_ok,
                            other=float("-inf"))
            o_s = tl.load(WO + tl.cast(sp, tl.int64) * stride_wos + gr[:, None] * stride_wor
                          + dv[None, :], mask=g_ok[:, None] & dv_ok[None, :], other=0.0)
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
                 mask=g_ok[:, None] & dv_ok[None, :])
        tl.store(l_ptr, lse, mask=g_ok)


# (BLOCK_N, num_warps, num_stages) for the 512-wide value tile; None: the default below. A
# module-level knob so that tuning runs can try others.
CONFIG_512 = None


def _config(rows_per_kvh: int, d_qk: int, d_v: int):
    """(BLOCK_H, BLOCK_N, num_warps, num_stages) for this shape."""
    block_h = min(64, _pow2(rows_per_kvh))
    if _pow2(d_v) >= 512:
        # 64 x 576 bf16 keys per stage (72 KB) next to Q (72 KB): two stages just fit 228 KB;
        # the 64 x 512 fp32 accumulator takes 128 registers a thread over 8 warps.
        block_n, warps, stages = CONFIG_512 or (64, 8, 2)
        return block_h, block_n, warps, stages
    return block_h, 64, 4, 2


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
    block_h, block_n, num_warps, num_stages = _config(rows, d_qk, d_v)
    row_blocks = triton.cdiv(rows, block_h)
    if schedule_metadata is None:
        # One part per group of SMs that together hold all row blocks of a batch element.
        parts = max(1, sm_count(q.device) // (h_kv * row_blocks))
        schedule_metadata, num_splits = decode_schedule(cache_seqlens, parts, SCHED_BLOCK_N)
    num_parts = schedule_metadata.shape[0]
    max_splits = b + num_parts
    ws_o = torch.empty((max_splits, h_kv * rows, d_v), dtype=torch.float32, device=q.device)
    ws_l = torch.empty((max_splits, h_kv * rows), dtype=torch.float32, device=q.device)
    meta = schedule_metadata.contiguous()
    nsplit = num_splits.contiguous()
    seq = cache_seqlens.contiguous()
    d_tail = d_qk - d_v
    _decode_split_kernel[(num_parts, h_kv * row_blocks)](
        q, k_cache, block_table, seq, meta, nsplit, out, lse, ws_o, ws_l,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_table.stride(0), block_table.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        ws_o.stride(0), ws_o.stride(1), ws_l.stride(0),
        b, s_q, group, block_size, block_table.shape[1] * block_size, d_qk, d_v, rows,
        float(sm_scale) * LOG2E,
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_DV=_pow2(d_v), BLOCK_DT=_pow2(d_tail),
        HAS_TAIL=d_tail > 0, CAUSAL=bool(causal), SCHED_BN=SCHED_BLOCK_N, DOT_F32=DOT_F32,
        num_warps=num_warps, num_stages=num_stages,
    )
    block_r = 16
    _decode_combine_kernel[(b, triton.cdiv(h_kv * rows, block_r))](
        ws_o, ws_l, nsplit, out, lse,
        ws_o.stride(0), ws_o.stride(1), ws_l.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        h_kv * rows, rows, group, d_v,
        BLOCK_R=block_r, BLOCK_DV=_pow2(d_v), num_warps=4,
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
