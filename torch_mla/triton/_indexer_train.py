"""Triton kernels of the DSA indexer's training ops: ``mla::indexer_scores`` (+ backward),
``mla::sparse_attn_scores`` and ``mla::dense_attn_scores``. Registered by ``indexer.py``'s import.
Semantics: meta/indexer.py; oracle: torch_mla/reference/indexer.py.

indexer_scores (forward): one program per query t keeps ``q[t] [h, d]`` and ``w[t] [h]`` on chip
and walks its ``topk`` indices in blocks of ``BLOCK_N``: gather the rows ``k[idx]`` (masked: an
index < 0 or >= s_k is never read and gives -inf), ``S^T = rows [BLOCK_N, d] @ q^T`` (keys on
the MMA's M, heads on N, so the head sum runs along N), ``out = sum_h w * max(S, 0)``.
Backward, the same walk: ``dw[h] += sum_j g_j max(S_jh, 0)``; ``G = g * w * (S > 0)``;
``dq += G^T rows``; ``dk[idx_j] += G_j q`` through f32 atomics into an ``[s_k, d]`` buffer
(duplicated indices and keys shared by queries add up; the summation order, hence the last bits,
varies between runs), cast to k's dtype at the end. Gradients arriving at invalid entries are
never loaded. For bf16 / fp16 inputs G is rounded to the input dtype before its two tensor-core
dots (FlashAttention does the same with dS): ~2**-9 relative per entry; f32 inputs use IEEE f32
dots. Roof (H100, bf16 989 TFLOPS) at s_q 4096, h 64, d 128, topk 2048: forward 2 * 4096 * 64 *
2048 * 128 = 137 GFLOP (0.14 ms) but the gathers read 4096 * 2048 * 256 B = 2.1 GB of rows
(from L2 for a 4096-key sequence): gather-bound, ~0.3-0.6 ms at L2 speed; the backward does 3x
the FLOPs and as many row gathers plus 2.1 GB x 2 of f32 atomics. Not measured (no GPU run).

sparse_attn_scores / dense_attn_scores: one program per query t keeps ``q[t] [h, d_qk]`` (split
into a power-of-two head part and a tail, 576 = 512 + 64) and ``lse[t]`` on chip and walks its
keys (its indices; or the keys of its window ``[k_start, k_end)``), writing
``p_j = sum_h exp(sm_scale * q_h . k_j - lse_h)`` (0 where invalid or outside the window); a
second walk over the same row divides by the row's sum (a row whose sum is 0 stays 0). The
exponent is taken as ``exp2((sm_scale * log2 e) * s - lse * log2 e)`` in f32 (the reference:
``exp(sm_scale * s - lse)``): the two agree to a few f32 ulps of the exponent, ~1e-5 relative for
logits of magnitude ~100. Roof at s_q 4096, h 128, d_qk 576, topk 2048 (sparse): 2 * 4096 * 128
* 2048 * 576 = 1.24 TFLOP -> 1.25 ms at 989 TFLOPS; compute bound. Not measured (no GPU run).
"""

from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from . import register
from ._common import DOT_F32, INTERPRET, alert_not_deterministic
from ._indexer_common import pow2

LOG2E = 1.4426950408889634

SCORES_BLOCK_N = 64
SCORES_WARPS = 4
ATTN_BLOCK_N = 64 if INTERPRET else 32
ATTN_WARPS = 8
# Two stages of the key tiles beside the [h, d] query tile: three need 259 KB of shared memory
# at h 128, d 576 for dense_attn_scores (the H100 has 227 KB; tools/triton_compile_check.py).
ATTN_STAGES = 2
MAX_SCORES_TILE = 128 * 256  # BLOCK_H * BLOCK_D of the backward's f32 dq accumulator
MAX_ATTN_HEADS = 128
MAX_ATTN_D = 1024


def _dtype_reasons(q: torch.Tensor) -> List[str]:
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return [f"q dtype {q.dtype}: the Triton indexer training kernels take bf16/fp16/fp32"]
    return []


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    """a @ b in f32: 16-bit operands on the tensor cores, f32 ones in IEEE f32 (never TF32);
    the interpreter multiplies 16-bit operands as raw bits, so they are upcast there."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


# ---------------------------------------------------------------------------------------------
# indexer_scores
# ---------------------------------------------------------------------------------------------

@triton.jit
def _scores_fwd_kernel(Q, K, W, IDX, OUT, s_k, h, topk,
                       stride_qs, stride_qh, stride_ks, stride_ws, stride_wh, stride_is,
                       stride_os,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < h
    d_ok = offs_d < D
    q = tl.load(Q + t * stride_qs + offs_h[:, None] * stride_qh + offs_d[None, :],
                mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    qt = tl.trans(q)
    w = tl.load(W + t * stride_ws + offs_h * stride_wh, mask=h_ok, other=0.0).to(tl.float32)
    for n0 in range(0, topk, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        in_k = pos < topk
        idx = tl.load(IDX + t * stride_is + pos, mask=in_k, other=-1)
        valid = in_k & (idx >= 0) & (idx < s_k)
        rows = tl.load(K + tl.where(valid, idx, 0).to(tl.int64)[:, None] * stride_ks
                       + offs_d[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0)
        s = _dot(rows, qt, DOT_F32, IEEE)  # [BLOCK_N, BLOCK_H]
        val = tl.sum(tl.maximum(s, 0.0) * w[None, :], axis=1)
        tl.store(OUT + t * stride_os + pos, tl.where(valid, val, float("-inf")), mask=in_k)


@triton.jit
def _scores_bwd_kernel(GRAD, Q, K, W, IDX, DQ, DK, DW, s_k, h, topk,
                       stride_gs, stride_qs, stride_qh, stride_ks, stride_ws, stride_wh,
                       stride_is, stride_dqs, stride_dqh, stride_dws, stride_dwh,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < h
    d_ok = offs_d < D
    hd_ok = h_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + t * stride_qs + offs_h[:, None] * stride_qh + offs_d[None, :],
                mask=hd_ok, other=0.0)
    qt = tl.trans(q)
    w = tl.load(W + t * stride_ws + offs_h * stride_wh, mask=h_ok, other=0.0).to(tl.float32)
    dq = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    dw = tl.zeros([BLOCK_H], tl.float32)
    for n0 in range(0, topk, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        in_k = pos < topk
        idx = tl.load(IDX + t * stride_is + pos, mask=in_k, other=-1)
        valid = in_k & (idx >= 0) & (idx < s_k)
        row_off = tl.where(valid, idx, 0).to(tl.int64)[:, None] * stride_ks + offs_d[None, :]
        rows = tl.load(K + row_off, mask=valid[:, None] & d_ok[None, :], other=0.0)
        # gradients of -inf entries are never read (they may hold anything, NaN included)
        g = tl.load(GRAD + t * stride_gs + pos, mask=valid, other=0.0)
        s = _dot(rows, qt, DOT_F32, IEEE)  # [BLOCK_N, BLOCK_H]
        dw += tl.sum(g[:, None] * tl.maximum(s, 0.0), axis=0)
        gs = tl.where(s > 0.0, g[:, None] * w[None, :], 0.0)  # [BLOCK_N, BLOCK_H]
        gs_op = gs.to(Q.dtype.element_ty)
        dq += _dot(tl.trans(gs_op), rows, DOT_F32, IEEE)  # [BLOCK_H, BLOCK_D]
        drows = _dot(gs_op, q, DOT_F32, IEEE)  # [BLOCK_N, BLOCK_D]
        # relaxed: the sums are read only after the kernel (acq_rel, Triton's default, orders
        # every access around each atomic: 2.7x slower in sparse_prefill's backward on the H100)
        tl.atomic_add(DK + row_off, drows, mask=valid[:, None] & d_ok[None, :], sem="relaxed")
    tl.store(DQ + t * stride_dqs + offs_h[:, None] * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=hd_ok)
    tl.store(DW + t * stride_dws + offs_h * stride_dwh, dw.to(DW.dtype.element_ty), mask=h_ok)


def _scores_consts(q):
    h, d = q.shape[1], q.shape[2]
    return dict(D=d, BLOCK_D=pow2(d, 16), BLOCK_H=pow2(h, 16), BLOCK_N=SCORES_BLOCK_N,
                DOT_F32=DOT_F32, IEEE=q.dtype == torch.float32)


def indexer_scores(q, k, weights, indices):
    s_q, h, d = q.shape
    s_k = k.shape[0]
    topk = indices.shape[1]
    out = torch.empty((s_q, topk), dtype=torch.float32, device=q.device)
    if s_q == 0 or topk == 0:
        return out
    if s_k == 0:
        return out.fill_(float("-inf"))
    _scores_fwd_kernel[(s_q,)](
        q, k, weights, indices, out, s_k, h, topk,
        q.stride(0), q.stride(1), k.stride(0), weights.stride(0), weights.stride(1),
        indices.stride(0), out.stride(0), **_scores_consts(q), num_warps=SCORES_WARPS)
    return out


def indexer_scores_backward(grad, q, k, weights, indices):
    s_q, h, d = q.shape
    s_k = k.shape[0]
    topk = indices.shape[1]
    dq = torch.empty_like(q)
    dw = torch.empty_like(weights)
    if s_q == 0 or topk == 0 or s_k == 0:
        return dq.zero_(), torch.zeros_like(k), dw.zero_()
    alert_not_deterministic("the Triton indexer_scores backward (dk)")
    dk = torch.zeros((s_k, d), dtype=torch.float32, device=k.device)
    grad = grad if grad.stride(-1) == 1 else grad.contiguous()
    _scores_bwd_kernel[(s_q,)](
        grad, q, k, weights, indices, dq, dk, dw, s_k, h, topk,
        grad.stride(0), q.stride(0), q.stride(1), k.stride(0), weights.stride(0),
        weights.stride(1), indices.stride(0), dq.stride(0), dq.stride(1), dw.stride(0),
        dw.stride(1), **_scores_consts(q), num_warps=SCORES_WARPS)
    return dq, dk.to(k.dtype), dw


def _scores_supports(q, k, weights, indices) -> List[str]:
    reasons = _dtype_reasons(q)
    if pow2(q.shape[1], 16) * pow2(q.shape[2], 16) > MAX_SCORES_TILE:
        reasons.append(f"h x d = {q.shape[1]} x {q.shape[2]} too large: the backward keeps one "
                       "query's f32 dq in registers (h, d padded to powers of two, at most "
                       f"{MAX_SCORES_TILE} values)")
    return reasons


def _scores_backward_supports(grad, q, k, weights, indices) -> List[str]:
    return _scores_supports(q, k, weights, indices)


# ---------------------------------------------------------------------------------------------
# sparse_attn_scores / dense_attn_scores
# ---------------------------------------------------------------------------------------------

@triton.jit
def _head_probs(q1, q2, k_rows, valid, lse2, scale_log2, d_ok2,
                D1: tl.constexpr, D2: tl.constexpr, BLOCK_D2: tl.constexpr,
                DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    """``sum_h exp(sm_scale * q_h . k - lse_h)`` for the rows at ``k_rows`` ([BLOCK_N] pointers):
    q1 ``[BLOCK_H, D1]`` / q2 ``[BLOCK_H, BLOCK_D2]`` the query's two column parts, lse2 the
    lse in log2 units. 0 where not valid (rows not valid are never read)."""
    offs1 = tl.arange(0, D1)
    k1 = tl.load(k_rows[:, None] + offs1[None, :], mask=valid[:, None], other=0.0)
    s = _dot(q1, tl.trans(k1), DOT_F32, IEEE)  # [BLOCK_H, BLOCK_N]
    if D2 > 0:
        offs2 = tl.arange(0, BLOCK_D2)
        k2 = tl.load(k_rows[:, None] + D1 + offs2[None, :],
                     mask=valid[:, None] & d_ok2[None, :], other=0.0)
        s += _dot(q2, tl.trans(k2), DOT_F32, IEEE)
    p = tl.exp2(s * scale_log2 - lse2[:, None])  # lse = +inf (or padded heads): 0
    return tl.where(valid, tl.sum(p, axis=0), 0.0)


@triton.jit
def _load_query(Q, LSE, t, stride_qs, stride_qh, stride_ls, stride_lh, h,
                D1: tl.constexpr, D2: tl.constexpr, BLOCK_D2: tl.constexpr,
                BLOCK_H: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < h
    q_rows = Q + t * stride_qs + offs_h[:, None] * stride_qh
    q1 = tl.load(q_rows + tl.arange(0, D1)[None, :], mask=h_ok[:, None], other=0.0)
    offs2 = tl.arange(0, BLOCK_D2)
    d_ok2 = offs2 < D2
    q2 = tl.load(q_rows + D1 + offs2[None, :], mask=h_ok[:, None] & d_ok2[None, :], other=0.0)
    lse = tl.load(LSE + t * stride_ls + offs_h * stride_lh, mask=h_ok,
                  other=float("inf")).to(tl.float32)
    return q1, q2, d_ok2, lse * 1.4426950408889634


@triton.jit
def _normalise_row(OUT_ROW, total, lo, hi, BLOCK_N: tl.constexpr):
    """Divide ``OUT_ROW[lo:hi]`` by total (IEEE division, as the reference; a row whose total is
    0 stays 0)."""
    tl.debug_barrier()  # the values written by the first walk are read back by other threads
    div = tl.where(total > 0.0, total, 1.0)
    for n0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        m = (pos >= lo) & (pos < hi)
        v = tl.load(OUT_ROW + pos, mask=m, other=0.0)
        tl.store(OUT_ROW + pos, tl.math.div_rn(v, div), mask=m)


@triton.jit
def _sparse_attn_kernel(Q, KV, IDX, LSE, LENS, OUT, s_kv, h, topk, scale_log2,
                        stride_qs, stride_qh, stride_kvs, stride_is, stride_ls, stride_lh,
                        stride_os,
                        D1: tl.constexpr, D2: tl.constexpr, BLOCK_D2: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEN: tl.constexpr,
                        DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    q1, q2, d_ok2, lse2 = _load_query(Q, LSE, t, stride_qs, stride_qh, stride_ls, stride_lh, h,
                                      D1, D2, BLOCK_D2, BLOCK_H)
    n_keys = topk
    if HAS_LEN:
        n_keys = tl.minimum(tl.maximum(tl.load(LENS + t), 0), topk)
    out_row = OUT + t * stride_os
    total = tl.zeros([BLOCK_N], tl.float32)
    for n0 in range(0, topk, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        idx = tl.load(IDX + t * stride_is + pos, mask=pos < n_keys, other=-1)
        valid = (pos < n_keys) & (idx >= 0) & (idx < s_kv)
        k_rows = KV + tl.where(valid, idx, 0).to(tl.int64) * stride_kvs
        p = _head_probs(q1, q2, k_rows, valid, lse2, scale_log2, d_ok2, D1, D2, BLOCK_D2,
                        DOT_F32, IEEE)
        total += p
        tl.store(out_row + pos, p, mask=pos < topk)
    _normalise_row(out_row, tl.sum(total, axis=0), 0, topk, BLOCK_N)


@triton.jit
def _dense_attn_kernel(Q, KV, LSE, KSTART, KEND, OUT, s_k, h, scale_log2,
                       stride_qs, stride_qh, stride_kvs, stride_ls, stride_lh, stride_os,
                       D1: tl.constexpr, D2: tl.constexpr, BLOCK_D2: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, HAS_START: tl.constexpr,
                       HAS_END: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    lo = 0
    hi = s_k
    if HAS_START:
        lo = tl.minimum(tl.maximum(tl.load(KSTART + t), 0), s_k)
    if HAS_END:
        hi = tl.maximum(tl.minimum(tl.load(KEND + t), s_k), 0)
    out_row = OUT + t * stride_os
    zeros = tl.zeros([BLOCK_N], tl.float32)
    # outside the window: 0, and no key is read
    for n0 in range(0, s_k, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        tl.store(out_row + pos, zeros, mask=(pos < s_k) & ((pos < lo) | (pos >= hi)))
    q1, q2, d_ok2, lse2 = _load_query(Q, LSE, t, stride_qs, stride_qh, stride_ls, stride_lh, h,
                                      D1, D2, BLOCK_D2, BLOCK_H)
    total = tl.zeros([BLOCK_N], tl.float32)
    for n0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = (pos >= lo) & (pos < hi)
        k_rows = KV + tl.where(valid, pos, 0).to(tl.int64) * stride_kvs
        p = _head_probs(q1, q2, k_rows, valid, lse2, scale_log2, d_ok2, D1, D2, BLOCK_D2,
                        DOT_F32, IEEE)
        total += p
        tl.store(out_row + pos, p, mask=valid)
    _normalise_row(out_row, tl.sum(total, axis=0), lo, hi, BLOCK_N)


def _split_d(d: int):
    """d = D1 + D2 with D1 the largest power of two <= d (576 -> 512 + 64)."""
    d1 = 1 << (d.bit_length() - 1)
    d2 = d - d1
    return dict(D1=d1, D2=d2, BLOCK_D2=pow2(d2, 16))


def _attn_consts(q):
    return dict(**_split_d(q.shape[2]), BLOCK_H=pow2(q.shape[1], 16), BLOCK_N=ATTN_BLOCK_N,
                DOT_F32=DOT_F32, IEEE=q.dtype == torch.float32)


def sparse_attn_scores(q, kv, indices, lse, sm_scale, topk_length=None):
    s_q, h, d = q.shape
    s_kv = kv.shape[0]
    topk = indices.shape[2]
    out = torch.empty((s_q, topk), dtype=torch.float32, device=q.device)
    if s_q == 0 or topk == 0:
        return out
    if s_kv == 0:
        return out.zero_()
    lens = topk_length.contiguous() if topk_length is not None else out
    _sparse_attn_kernel[(s_q,)](
        q, kv, indices, lse, lens, out, s_kv, h, topk, float(sm_scale) * LOG2E,
        q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), lse.stride(0), lse.stride(1),
        out.stride(0), HAS_LEN=topk_length is not None, **_attn_consts(q),
        num_warps=ATTN_WARPS, num_stages=ATTN_STAGES)
    return out


def dense_attn_scores(q, kv, lse, sm_scale, k_start=None, k_end=None):
    s_q, h, d = q.shape
    s_k = kv.shape[0]
    out = torch.empty((s_q, s_k), dtype=torch.float32, device=q.device)
    if s_q == 0 or s_k == 0:
        return out
    ks = k_start.contiguous() if k_start is not None else out
    ke = k_end.contiguous() if k_end is not None else out
    _dense_attn_kernel[(s_q,)](
        q, kv, lse, ks, ke, out, s_k, h, float(sm_scale) * LOG2E,
        q.stride(0), q.stride(1), kv.stride(0), lse.stride(0), lse.stride(1), out.stride(0),
        HAS_START=k_start is not None, HAS_END=k_end is not None, **_attn_consts(q),
        num_warps=ATTN_WARPS, num_stages=ATTN_STAGES)
    return out


def _attn_reasons(q) -> List[str]:
    reasons = _dtype_reasons(q)
    if q.shape[1] > MAX_ATTN_HEADS:
        reasons.append(f"h = {q.shape[1]} > {MAX_ATTN_HEADS}: one query's heads form the MMA's M")
    if q.shape[2] > MAX_ATTN_D:
        reasons.append(f"d_qk = {q.shape[2]} > {MAX_ATTN_D}: one query's row is kept on chip")
    return reasons


def _sparse_attn_supports(q, kv, indices, lse, sm_scale, topk_length=None) -> List[str]:
    return _attn_reasons(q)


def _dense_attn_supports(q, kv, lse, sm_scale, k_start=None, k_end=None) -> List[str]:
    return _attn_reasons(q)


register("indexer_scores", indexer_scores, _scores_supports)
register("indexer_scores_backward", indexer_scores_backward, _scores_backward_supports)
register("sparse_attn_scores", sparse_attn_scores, _sparse_attn_supports)
register("dense_attn_scores", dense_attn_scores, _dense_attn_supports)
