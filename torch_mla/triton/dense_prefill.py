"""Triton ``mla::dense_prefill`` and ``mla::dense_prefill_backward``: FlashAttention-2-style
varlen attention (MHA mode of DeepSeek's MLA prefill: d_qk 192, d_v 128; also d_qk 128; GQA).

Forward: grid (query block, q head, sequence). A program loads its query tile once and walks the
key blocks of its sequence with an online softmax in the exp2 domain; key blocks every row sees
in full run without masks, the few on the causal diagonal / sequence end with them. Causal is
bottom-right aligned: query i of s_q sees keys j <= i + s_k - s_q.

Backward (no atomics, deterministic):
1. ``_bwd_pre``: delta = rowsum(dout * out) - dlse, 0 for rows without key (lse = +inf) so that
   ds = P * (dP - delta) = P * (dP - D + dlse), the reference's formula.
2. ``_bwd_dkdv``: grid (key block, kv head, sequence); keeps K, V of the block and walks the
   query blocks that see it, for every query head of the kv head's group (GQA: dk, dv summed
   over the group in registers): dv += P^T dO, dk += dS^T Q.
3. ``_bwd_dq``: grid (query block, q head, sequence); walks the key blocks: dq += dS K.
Both recompute P from lse. Tokens outside [cu_seqlens[0], cu_seqlens[-1]) (padding) get out 0,
lse +inf and zero gradients from ``_fill_padding``, which reads cu_seqlens on the device.

A head dim that is not a power of two (192) is handled as two tiles, 128 + 64 (generally: the
largest power of two <= d, then the rest padded to a power of two and masked); every dot over
the head dim is two dots accumulated.

FLOPs counted (the FlashAttention convention; causal halves everything):
forward = 2 * b * h * s_q * s_k * (d_qk + d_v) / 2 (QK^T and PV); backward = 2.5 x forward
(5 matmuls to the forward's 2; the exact count for d_qk != d_v is 2 * b * h * s^2 * (3 d_qk +
2 d_v) / 2 = 2.7 x forward at 192/128, and the dq kernel's recomputation of QK^T and dO V^T is
not counted); forward + backward = 3.5 x forward FLOPs over the sum of both times.
Roof at b=4 h=128 s=4096 d_qk=192 d_v=128 causal on H100 SXM (989 dense bf16 TFLOPS, 3.35
TB/s): forward 2.75 TFLOP -> 2.8 ms at peak; minimal bytes (q, k, v read and out written once)
= 16384 tokens * 128 heads * (192 + 192 + 128 + 128) * 2 B = 2.7 GB -> 0.8 ms: compute bound
(~1000 FLOP/B). The backward (also reading dout, writing dq, dk, dv) is compute bound likewise.
Measured on H100 (triton 3.6, torch 2.11, triton.testing.do_bench) at that shape with the
configs below: forward 6.13 ms = 449 TFLOPS (target 302); backward 23.0 ms = 298 TFLOPS by the
2.5x count; forward + backward 330 TFLOPS by the 3.5x count (target 167). d_qk = d_v = 128:
forward 433, forward + backward 335 TFLOPS.
"""

from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from ._common import DOT_F32, INTERPRET
from . import register
from ._jit import LOG2E, mm as _mm




@triton.jit
def _ld(ptr, rows, row_ok, stride, cols, col_ok, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    """Tile ptr[rows, cols] (0 where masked). The masks are constexpr-optional so that interior
    tiles of a full head dim load without any predicate."""
    ptrs = ptr + rows[:, None] * stride + cols[None, :]
    if MASK_R:
        if MASK_C:
            x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if MASK_C:
            x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _fwd_block(acc, l_i, m_i, q1, q2, K, V, stride_kt, stride_vt, n_start, n_loc, s_k,
               m_idx, diag, d1, d2, dv, scale_log2,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_D2: tl.constexpr,
               MC1: tl.constexpr, MC2: tl.constexpr, MCV: tl.constexpr, D_QK: tl.constexpr,
               D_V: tl.constexpr, DOT_F32: tl.constexpr):
    """One key block of the forward's online softmax (log2 domain). MASKED: the block holds
    keys past the sequence or on the causal diagonal."""
    n = n_start + n_loc
    n_ok = n < s_k
    k1 = _ld(K, n, n_ok, stride_kt, d1, d1 < D_QK, MASKED, MC1)
    s = _mm(q1, tl.trans(k1), tl.zeros([q1.shape[0], n_loc.shape[0]], dtype=tl.float32),
            DOT_F32)
    if HAS_D2:
        k2 = _ld(K, n, n_ok, stride_kt, d2, d2 < D_QK, MASKED, MC2)
        s = _mm(q2, tl.trans(k2), s, DOT_F32)
    s = s * scale_log2
    if MASKED:
        if CAUSAL:
            vis = n_ok[None, :] & (n[None, :] <= m_idx[:, None] + diag)
        else:
            vis = n_ok[None, :] & (m_idx[:, None] >= 0)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen nothing keeps max -inf: shift by 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = m_new
    v = _ld(V, n, n_ok, stride_vt, dv, dv < D_V, MASKED, MCV)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _mm(p.to(v.dtype), v, acc * alpha[:, None], DOT_F32)
    return acc, l_i, m_new


@triton.jit
def _fwd_kernel(
    Q, K, V, CUQ, CUK, OUT, LSE,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_lt, stride_lh,
    group, scale_log2,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D_QK: tl.constexpr, D_V: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    DV: tl.constexpr, HAS_D2: tl.constexpr, MC1: tl.constexpr, MC2: tl.constexpr,
    MCV: tl.constexpr, DOT_F32: tl.constexpr,
):
    mb = tl.program_id(0)
    h = tl.program_id(1)
    bi = tl.program_id(2)
    q0 = tl.load(CUQ + bi)
    s_q = tl.load(CUQ + bi + 1) - q0
    if mb * BLOCK_M >= s_q:
        return
    k0 = tl.load(CUK + bi)
    s_k = tl.load(CUK + bi + 1) - k0
    hk = h // group

    m_idx = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m_idx < s_q
    n_loc = tl.arange(0, BLOCK_N)
    d1 = tl.arange(0, D1)
    d2 = D1 + tl.arange(0, D2)
    dv = tl.arange(0, DV)

    Qh = Q + q0.to(tl.int64) * stride_qt + h * stride_qh
    Kh = K + k0.to(tl.int64) * stride_kt + hk * stride_kh
    Vh = V + k0.to(tl.int64) * stride_vt + hk * stride_vh
    q1 = _ld(Qh, m_idx, m_ok, stride_qt, d1, d1 < D_QK, True, MC1)
    if HAS_D2:
        q2 = _ld(Qh, m_idx, m_ok, stride_qt, d2, d2 < D_QK, True, MC2)
    else:
        q2 = q1

    diag = s_k - s_q  # bottom-right causal: key n visible to query m iff n <= m + diag
    if CAUSAL:
        # keys every row of the block sees: n <= mb * BLOCK_M + diag
        full_end = tl.minimum(mb * BLOCK_M + diag + 1, s_k)
        hi = tl.minimum((mb + 1) * BLOCK_M + diag, s_k)
    else:
        full_end = s_k
        hi = s_k
    full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    for n_start in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q1, q2, Kh, Vh, stride_kt, stride_vt,
                                   n_start, n_loc, s_k, m_idx, diag, d1, d2, dv, scale_log2,
                                   False, CAUSAL, HAS_D2, MC1, MC2, MCV, D_QK, D_V, DOT_F32)
    for n_start in range(full_end, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q1, q2, Kh, Vh, stride_kt, stride_vt,
                                   n_start, n_loc, s_k, m_idx, diag, d1, d2, dv, scale_log2,
                                   True, CAUSAL, HAS_D2, MC1, MC2, MCV, D_QK, D_V, DOT_F32)

    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("inf"))
    Oh = OUT + q0.to(tl.int64) * stride_ot + h * stride_oh
    tl.store(Oh + m_idx[:, None] * stride_ot + dv[None, :], o.to(OUT.dtype.element_ty),
             mask=m_ok[:, None] & (dv[None, :] < D_V))
    tl.store(LSE + (q0 + m_idx).to(tl.int64) * stride_lt + h * stride_lh, lse, mask=m_ok)


@triton.jit
def _fill_padding(CU, last, X, S, n_tok, width, stride_xt, stride_xh, stride_st, stride_sh,
                  fill_s, HAS_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    """Rows t of X [n_tok, heads, width] outside [CU[0], CU[last]) := 0 (and S [n_tok, heads]
    := fill_s): padding tokens, found on the device. Program (token block, head)."""
    tb = tl.program_id(0)
    h = tl.program_id(1)
    lo = tl.load(CU)
    hi = tl.load(CU + last)
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    pad = (t < n_tok) & ((t < lo) | (t >= hi))
    w = tl.arange(0, BLOCK_W)
    for w0 in range(0, width, BLOCK_W):
        ww = w0 + w
        tl.store(X + t.to(tl.int64)[:, None] * stride_xt + h * stride_xh + ww[None, :],
                 tl.zeros([BLOCK_T, BLOCK_W], dtype=X.dtype.element_ty),
                 mask=pad[:, None] & (ww[None, :] < width))
    if HAS_S:
        tl.store(S + t.to(tl.int64) * stride_st + h * stride_sh,
                 tl.zeros([BLOCK_T], dtype=tl.float32) + fill_s, mask=pad)


def _fill(cu, x, stats=None, fill=0.0):
    n_tok, heads, width = x.shape
    if n_tok == 0 or heads == 0:
        return
    block_t = 64
    s = stats if stats is not None else x
    _fill_padding[(triton.cdiv(n_tok, block_t), heads)](
        cu, cu.shape[0] - 1, x, s, n_tok, width, x.stride(0), x.stride(1),
        s.stride(0), s.stride(1), float(fill), HAS_S=stats is not None,
        BLOCK_T=block_t, BLOCK_W=min(128, triton.next_power_of_2(max(1, width))), num_warps=4)


@triton.jit
def _bwd_pre(OUT, DOUT, LSE, DLSE, DELTA, CUQ, last, n_tok, d_v,
             stride_ot, stride_oh, stride_dot, stride_doh, stride_lt, stride_lh,
             stride_dlt, stride_dlh,
             BLOCK_T: tl.constexpr, DV: tl.constexpr):
    """delta [heads, n_tok] = rowsum(dout * out) - dlse; 0 for rows without key or padding."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    lo = tl.load(CUQ)
    hi = tl.load(CUQ + last)
    t_ok = t < n_tok
    t64 = t.to(tl.int64)
    dv = tl.arange(0, DV)
    msk = t_ok[:, None] & (dv[None, :] < d_v)
    o = tl.load(OUT + t64[:, None] * stride_ot + h * stride_oh + dv[None, :], mask=msk,
                other=0.0).to(tl.float32)
    do = tl.load(DOUT + t64[:, None] * stride_dot + h * stride_doh + dv[None, :], mask=msk,
                 other=0.0).to(tl.float32)
    lse = tl.load(LSE + t64 * stride_lt + h * stride_lh, mask=t_ok, other=float("inf"))
    dlse = tl.load(DLSE + t64 * stride_dlt + h * stride_dlh, mask=t_ok, other=0.0)
    live = (lse != float("inf")) & (t >= lo) & (t < hi)
    delta = tl.where(live, tl.sum(o * do, 1) - dlse, 0.0)
    tl.store(DELTA + h.to(tl.int64) * n_tok + t, delta, mask=t_ok)


@triton.jit
def _bwd_dkdv_block(dk1, dk2, dv_acc, k1, k2, v, Qh, DOh, LSEh, DELh, stride_qt, stride_dot,
                    stride_lt, m_start, m_loc, s_q, n_idx, diag, d1, d2, dv, scale_log2,
                    MASKED: tl.constexpr, ST: tl.constexpr, HAS_D2: tl.constexpr,
                    MC1: tl.constexpr, MC2: tl.constexpr, MCV: tl.constexpr, D_QK: tl.constexpr,
                    D_V: tl.constexpr, DOT_F32: tl.constexpr):
    """One query block's contribution to a key block's dk, dv. MASKED: causal diagonal."""
    m = m_start + m_loc
    m_ok = m < s_q
    q1 = _ld(Qh, m, m_ok, stride_qt, d1, d1 < D_QK, True, MC1)
    do = _ld(DOh, m, m_ok, stride_dot, dv, dv < D_V, True, MCV)
    # Rows past the sequence read lse = +inf (P exactly 0) and delta 0.
    lse2 = tl.load(LSEh + m * stride_lt, mask=m_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELh + m, mask=m_ok, other=0.0)
    if ST:
        # S^T = K Q^T: K, V are the A operands (registers), the products need no transpose.
        st = _mm(k1, tl.trans(q1), tl.zeros([n_idx.shape[0], m_loc.shape[0]], dtype=tl.float32),
                 DOT_F32)
        if HAS_D2:
            q2 = _ld(Qh, m, m_ok, stride_qt, d2, d2 < D_QK, True, MC2)
            st = _mm(k2, tl.trans(q2), st, DOT_F32)
        pt = tl.exp2(st * scale_log2 - lse2[None, :])  # P^T [BLOCK_N, BLOCK_M]
        if MASKED:
            pt = tl.where(n_idx[:, None] <= m[None, :] + diag, pt, 0.0)
        dv_acc = _mm(pt.to(do.dtype), do, dv_acc, DOT_F32)
        dpt = _mm(v, tl.trans(do), tl.zeros([n_idx.shape[0], m_loc.shape[0]],
                                            dtype=tl.float32), DOT_F32)
        dst = (pt * (dpt - delta[None, :])).to(q1.dtype)
    else:
        # S = Q K^T: K, V are the B operands (shared memory); P and dS are transposed after.
        s = _mm(q1, tl.trans(k1), tl.zeros([m_loc.shape[0], n_idx.shape[0]], dtype=tl.float32),
                DOT_F32)
        if HAS_D2:
            q2 = _ld(Qh, m, m_ok, stride_qt, d2, d2 < D_QK, True, MC2)
            s = _mm(q2, tl.trans(k2), s, DOT_F32)
        p = tl.exp2(s * scale_log2 - lse2[:, None])  # [BLOCK_M, BLOCK_N]
        if MASKED:
            p = tl.where(n_idx[None, :] <= m[:, None] + diag, p, 0.0)
        dv_acc = _mm(tl.trans(p.to(do.dtype)), do, dv_acc, DOT_F32)
        dp = _mm(do, tl.trans(v), tl.zeros([m_loc.shape[0], n_idx.shape[0]], dtype=tl.float32),
                 DOT_F32)
        dst = tl.trans((p * (dp - delta[:, None])).to(q1.dtype))
    dk1 = _mm(dst, q1, dk1, DOT_F32)
    if HAS_D2:
        dk2 = _mm(dst, q2, dk2, DOT_F32)
    return dk1, dk2, dv_acc


@triton.jit
def _bwd_dkdv(
    Q, K, V, DOUT, LSE, DELTA, CUQ, CUK, DK, DV,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_lt, stride_lh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    n_tok_q, group, scale_log2, sm_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D_QK: tl.constexpr, D_V: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    DVP: tl.constexpr, HAS_D2: tl.constexpr, MC1: tl.constexpr, MC2: tl.constexpr,
    MCV: tl.constexpr, ST: tl.constexpr, DOT_F32: tl.constexpr,
):
    nb = tl.program_id(0)
    hk = tl.program_id(1)
    bi = tl.program_id(2)
    k0 = tl.load(CUK + bi)
    s_k = tl.load(CUK + bi + 1) - k0
    if nb * BLOCK_N >= s_k:
        return
    q0 = tl.load(CUQ + bi)
    s_q = tl.load(CUQ + bi + 1) - q0

    n_idx = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n_idx < s_k
    m_loc = tl.arange(0, BLOCK_M)
    d1 = tl.arange(0, D1)
    d2 = D1 + tl.arange(0, D2)
    dv = tl.arange(0, DVP)

    Kh = K + k0.to(tl.int64) * stride_kt + hk * stride_kh
    Vh = V + k0.to(tl.int64) * stride_vt + hk * stride_vh
    k1 = _ld(Kh, n_idx, n_ok, stride_kt, d1, d1 < D_QK, True, MC1)
    if HAS_D2:
        k2 = _ld(Kh, n_idx, n_ok, stride_kt, d2, d2 < D_QK, True, MC2)
    else:
        k2 = k1
    v = _ld(Vh, n_idx, n_ok, stride_vt, dv, dv < D_V, True, MCV)

    dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, D2], dtype=tl.float32)
    dv_acc = tl.zeros([BLOCK_N, DVP], dtype=tl.float32)

    diag = s_k - s_q
    if CAUSAL:
        # query m sees key n iff m >= n - diag. [lo, full): query blocks on the diagonal (some
        # pairs masked); [full, s_q): blocks whose rows see every key of this block.
        lo = tl.maximum(nb * BLOCK_N - diag, 0) // BLOCK_M * BLOCK_M
        full = tl.minimum(tl.maximum(nb * BLOCK_N + BLOCK_N - 1 - diag, 0), s_q)
        full = tl.maximum(tl.cdiv(full, BLOCK_M) * BLOCK_M, lo)
    else:
        lo = 0
        full = 0
    for hg in range(0, group):  # GQA: the group's query heads all add into this dk, dv
        h = hk * group + hg
        Qh = Q + q0.to(tl.int64) * stride_qt + h * stride_qh
        DOh = DOUT + q0.to(tl.int64) * stride_dot + h * stride_doh
        LSEh = LSE + q0.to(tl.int64) * stride_lt + h * stride_lh
        DELh = DELTA + tl.cast(h, tl.int64) * n_tok_q + q0
        for m_start in range(lo, full, BLOCK_M):
            dk1, dk2, dv_acc = _bwd_dkdv_block(
                dk1, dk2, dv_acc, k1, k2, v, Qh, DOh, LSEh, DELh, stride_qt, stride_dot,
                stride_lt, m_start, m_loc, s_q, n_idx, diag, d1, d2, dv, scale_log2,
                True, ST, HAS_D2, MC1, MC2, MCV, D_QK, D_V, DOT_F32)
        for m_start in range(full, s_q, BLOCK_M):
            dk1, dk2, dv_acc = _bwd_dkdv_block(
                dk1, dk2, dv_acc, k1, k2, v, Qh, DOh, LSEh, DELh, stride_qt, stride_dot,
                stride_lt, m_start, m_loc, s_q, n_idx, diag, d1, d2, dv, scale_log2,
                False, ST, HAS_D2, MC1, MC2, MCV, D_QK, D_V, DOT_F32)

    DKh = DK + k0.to(tl.int64) * stride_dkt + hk * stride_dkh
    DVh = DV + k0.to(tl.int64) * stride_dvt + hk * stride_dvh
    tl.store(DKh + n_idx[:, None] * stride_dkt + d1[None, :],
             (dk1 * sm_scale).to(DK.dtype.element_ty), mask=n_ok[:, None] & (d1[None, :] < D_QK))
    if HAS_D2:
        tl.store(DKh + n_idx[:, None] * stride_dkt + d2[None, :],
                 (dk2 * sm_scale).to(DK.dtype.element_ty),
                 mask=n_ok[:, None] & (d2[None, :] < D_QK))
    tl.store(DVh + n_idx[:, None] * stride_dvt + dv[None, :], dv_acc.to(DV.dtype.element_ty),
             mask=n_ok[:, None] & (dv[None, :] < D_V))


@triton.jit
def _bwd_dq_block(dq1, dq2, q1, q2, do, lse2, delta, Kh, Vh, stride_kt, stride_vt, n_start,
                  n_loc, s_k, m_idx, diag, d1, d2, dv, scale_log2,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_D2: tl.constexpr,
                  MC1: tl.constexpr, MC2: tl.constexpr, MCV: tl.constexpr, D_QK: tl.constexpr,
                  D_V: tl.constexpr, DOT_F32: tl.constexpr):
    """One key block's contribution to a query block's dq. MASKED: sequence end or diagonal."""
    n = n_start + n_loc
    n_ok = n < s_k
    k1 = _ld(Kh, n, n_ok, stride_kt, d1, d1 < D_QK, MASKED, MC1)
    s = _mm(q1, tl.trans(k1), tl.zeros([m_idx.shape[0], n_loc.shape[0]], dtype=tl.float32),
            DOT_F32)
    if HAS_D2:
        k2 = _ld(Kh, n, n_ok, stride_kt, d2, d2 < D_QK, MASKED, MC2)
        s = _mm(q2, tl.trans(k2), s, DOT_F32)
    p = tl.exp2(s * scale_log2 - lse2[:, None])
    if MASKED:
        if CAUSAL:
            p = tl.where(n_ok[None, :] & (n[None, :] <= m_idx[:, None] + diag), p, 0.0)
        else:
            p = tl.where(n_ok[None, :], p, 0.0)
    v = _ld(Vh, n, n_ok, stride_vt, dv, dv < D_V, MASKED, MCV)
    dp = _mm(do, tl.trans(v), tl.zeros([m_idx.shape[0], n_loc.shape[0]], dtype=tl.float32),
             DOT_F32)
    ds = (p * (dp - delta[:, None])).to(k1.dtype)
    dq1 = _mm(ds, k1, dq1, DOT_F32)
    if HAS_D2:
        dq2 = _mm(ds, k2, dq2, DOT_F32)
    return dq1, dq2


@triton.jit
def _bwd_dq(
    Q, K, V, DOUT, LSE, DELTA, CUQ, CUK, DQ,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_lt, stride_lh, stride_dqt, stride_dqh,
    n_tok_q, group, scale_log2, sm_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D_QK: tl.constexpr, D_V: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    DVP: tl.constexpr, HAS_D2: tl.constexpr, MC1: tl.constexpr, MC2: tl.constexpr,
    MCV: tl.constexpr, DOT_F32: tl.constexpr,
):
    mb = tl.program_id(0)
    h = tl.program_id(1)
    bi = tl.program_id(2)
    q0 = tl.load(CUQ + bi)
    s_q = tl.load(CUQ + bi + 1) - q0
    if mb * BLOCK_M >= s_q:
        return
    k0 = tl.load(CUK + bi)
    s_k = tl.load(CUK + bi + 1) - k0
    hk = h // group

    m_idx = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m_idx < s_q
    n_loc = tl.arange(0, BLOCK_N)
    d1 = tl.arange(0, D1)
    d2 = D1 + tl.arange(0, D2)
    dv = tl.arange(0, DVP)

    Qh = Q + q0.to(tl.int64) * stride_qt + h * stride_qh
    q1 = _ld(Qh, m_idx, m_ok, stride_qt, d1, d1 < D_QK, True, MC1)
    if HAS_D2:
        q2 = _ld(Qh, m_idx, m_ok, stride_qt, d2, d2 < D_QK, True, MC2)
    else:
        q2 = q1
    do = _ld(DOUT + q0.to(tl.int64) * stride_dot + h * stride_doh, m_idx, m_ok, stride_dot,
             dv, dv < D_V, True, MCV)
    lse2 = tl.load(LSE + (q0 + m_idx).to(tl.int64) * stride_lt + h * stride_lh, mask=m_ok,
                   other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + tl.cast(h, tl.int64) * n_tok_q + q0 + m_idx, mask=m_ok, other=0.0)
    Kh = K + k0.to(tl.int64) * stride_kt + hk * stride_kh
    Vh = V + k0.to(tl.int64) * stride_vt + hk * stride_vh

    diag = s_k - s_q
    if CAUSAL:
        full_end = tl.minimum(mb * BLOCK_M + diag + 1, s_k)
        hi = tl.minimum((mb + 1) * BLOCK_M + diag, s_k)
    else:
        full_end = s_k
        hi = s_k
    full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N

    dq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, D2], dtype=tl.float32)
    for n_start in range(0, full_end, BLOCK_N):
        dq1, dq2 = _bwd_dq_block(dq1, dq2, q1, q2, do, lse2, delta, Kh, Vh, stride_kt,
                                 stride_vt, n_start, n_loc, s_k, m_idx, diag, d1, d2, dv,
                                 scale_log2, False, CAUSAL, HAS_D2, MC1, MC2, MCV, D_QK, D_V,
                                 DOT_F32)
    for n_start in range(full_end, hi, BLOCK_N):
        dq1, dq2 = _bwd_dq_block(dq1, dq2, q1, q2, do, lse2, delta, Kh, Vh, stride_kt,
                                 stride_vt, n_start, n_loc, s_k, m_idx, diag, d1, d2, dv,
                                 scale_log2, True, CAUSAL, HAS_D2, MC1, MC2, MCV, D_QK, D_V,
                                 DOT_F32)

    DQh = DQ + q0.to(tl.int64) * stride_dqt + h * stride_dqh
    tl.store(DQh + m_idx[:, None] * stride_dqt + d1[None, :],
             (dq1 * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & (d1[None, :] < D_QK))
    if HAS_D2:
        tl.store(DQh + m_idx[:, None] * stride_dqt + d2[None, :],
                 (dq2 * sm_scale).to(DQ.dtype.element_ty),
                 mask=m_ok[:, None] & (d2[None, :] < D_QK))


def _head_split(d: int):
    """(D1, D2): a power-of-two tile and a masked power-of-two rest (0: none), D1 + D2 >= d."""
    d1 = max(16, 1 << (max(1, d).bit_length() - 1))
    rest = d - d1
    d2 = max(16, triton.next_power_of_2(rest)) if rest > 0 else 0
    return d1, d2


def _dv(d: int) -> int:
    return max(16, triton.next_power_of_2(max(1, d)))


# Tile sizes: (BLOCK_M, BLOCK_N, num_warps, num_stages), picked by a sweep on the H100 at the
# shape above (forward: 128x128/8/2 was 3% slower, 64x64/4/3 27%; dk/dv: 32x128 1.05x, 32x64
# 1.9x, 4 warps 3x slower; dq: 64x64/4/2 1.08x). The interpreter uses small tiles so that the
# tests' short sequences still cross several blocks and the diagonal logic.
# DKDV_CFG adds ST: whether the dk/dv kernel computes S^T = K Q^T (K, V as register operands).
if INTERPRET:
    FWD_CFG = (16, 16, 4, 1)
    DKDV_CFG = (16, 16, 4, 1, True)
    DQ_CFG = (16, 16, 4, 1)
else:
    FWD_CFG = (128, 64, 8, 3)
    DKDV_CFG = (64, 128, 8, 2, True)
    DQ_CFG = (128, 64, 8, 3)


def _dims(d_qk: int, d_v: int) -> dict:
    """Head-dim constexprs shared by every kernel: tiles D1 (+ D2) over d_qk, DV over d_v, and
    whether each tile needs a column mask."""
    d1, d2 = _head_split(d_qk)
    dvp = _dv(d_v)
    return dict(D_QK=d_qk, D_V=d_v, D1=d1, D2=max(d2, 16), HAS_D2=d2 > 0, MC1=d1 > d_qk,
                MC2=d1 + d2 > d_qk, MCV=dvp > d_v, DOT_F32=DOT_F32)


def dense_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sm_scale,
                  causal=False):
    t_q, h_q, d_qk = q.shape
    t_k, h_k, d_v = v.shape
    out = torch.empty((t_q, h_q, d_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((t_q, h_q), dtype=torch.float32, device=q.device)
    nseq = cu_seqlens_q.shape[0] - 1
    cu_q = cu_seqlens_q.contiguous()
    cu_k = cu_seqlens_k.contiguous()
    _fill(cu_q, out, lse, float("inf"))  # padding tokens: out 0, lse +inf
    if nseq == 0 or t_q == 0 or h_q == 0 or h_k == 0 or max_seqlen_q == 0:
        return out, lse
    block_m, block_n, warps, stages = FWD_CFG
    dims = _dims(d_qk, d_v)
    _fwd_kernel[(triton.cdiv(max_seqlen_q, block_m), h_q, nseq)](
        q, k, v, cu_q, cu_k, out, lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        h_q // h_k, float(sm_scale) * LOG2E,
        CAUSAL=bool(causal), BLOCK_M=block_m, BLOCK_N=block_n, DV=_dv(d_v), **dims,
        num_warps=warps, num_stages=stages,
    )
    return out, lse


def dense_prefill_backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                           max_seqlen_q, max_seqlen_k, sm_scale, causal=False):
    t_q, h_q, d_qk = q.shape
    t_k, h_k, d_v = v.shape
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    nseq = cu_seqlens_q.shape[0] - 1
    cu_q = cu_seqlens_q.contiguous()
    cu_k = cu_seqlens_k.contiguous()
    # Padding tokens (outside [cu[0], cu[-1])) get zero gradients; the kernels write the rest.
    _fill(cu_q, dq)
    _fill(cu_k, dk)
    _fill(cu_k, dv)
    if nseq == 0 or h_k == 0:
        return dq, dk, dv
    dims = _dims(d_qk, d_v)
    dvp = _dv(d_v)
    scale_log2 = float(sm_scale) * LOG2E
    group = h_q // h_k
    # delta [h_q, t_q]: each program's rows are contiguous
    delta = torch.empty((h_q, t_q), dtype=torch.float32, device=q.device)
    if t_q > 0 and h_q > 0:
        _bwd_pre[(triton.cdiv(t_q, 64), h_q)](
            out, dout, lse, dlse, delta, cu_q, nseq, t_q, d_v,
            out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
            lse.stride(0), lse.stride(1), dlse.stride(0), dlse.stride(1),
            BLOCK_T=64, DV=dvp, num_warps=4)
    if max_seqlen_k > 0 and t_k > 0:
        block_m, block_n, warps, stages, st = DKDV_CFG
        # runs even without queries: it is what writes the zero dk, dv of a sequence's keys
        _bwd_dkdv[(triton.cdiv(max_seqlen_k, block_n), h_k, nseq)](
            q, k, v, dout, lse, delta, cu_q, cu_k, dk, dv,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), lse.stride(0), lse.stride(1),
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            t_q, group, scale_log2, float(sm_scale), CAUSAL=bool(causal), BLOCK_M=block_m,
            BLOCK_N=block_n, DVP=dvp, ST=st, **dims, num_warps=warps, num_stages=stages)
    if max_seqlen_q > 0 and t_q > 0 and h_q > 0:
        block_m, block_n, warps, stages = DQ_CFG
        _bwd_dq[(triton.cdiv(max_seqlen_q, block_m), h_q, nseq)](
            q, k, v, dout, lse, delta, cu_q, cu_k, dq,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), lse.stride(0), lse.stride(1),
            dq.stride(0), dq.stride(1),
            t_q, group, scale_log2, float(sm_scale), CAUSAL=bool(causal), BLOCK_M=block_m,
            BLOCK_N=block_n, DVP=dvp, **dims, num_warps=warps, num_stages=stages)
    return dq, dk, dv


def supports(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sm_scale,
             causal=False) -> List[str]:
    why = []
    if q.dtype not in (torch.bfloat16, torch.float16):
        why.append(f"q dtype {str(q.dtype).replace('torch.', '')}: the Triton kernels take "
                   "bf16/fp16 (fp32/fp64 run on the reference)")
    if cu_seqlens_q.shape[0] - 1 > 65535 or q.shape[1] > 65535:
        why.append("more than 65535 sequences or heads: they index CUDA grid dimensions 2 and 1")
    d_qk, d_v = q.shape[-1], v.shape[-1]
    if d_qk > 256 or d_v > 256:
        why.append(f"head dims d_qk={d_qk}, d_v={d_v}: the Triton kernels keep a query tile "
                   "and its fp32 accumulators in registers, which holds d_qk, d_v <= 256")
    return why


def supports_backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                      max_seqlen_k, sm_scale, causal=False) -> List[str]:
    return supports(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sm_scale,
                    causal)


register("dense_prefill", dense_prefill, supports)
register("dense_prefill_backward", dense_prefill_backward, supports_backward)
