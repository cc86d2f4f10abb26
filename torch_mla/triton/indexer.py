"""Triton kernels of the DSA lightning indexer (inference): ``mla::indexer_quantize``,
``mla::indexer_logits``, ``mla::indexer_logits_paged``, ``mla::write_indexer_cache`` and
``mla::indexer_topk``; the training ops live in ``_indexer_train.py`` and register here.
Semantics: meta/indexer.py; the oracle: torch_mla/reference/indexer.py.

indexer_quantize / write_indexer_cache
    A program quantizes ``R`` rows: load (any float dtype -> f32), the Hadamard butterflies in
    registers (``_indexer_common.hadamard_rows``: the reference's stages in the reference's order,
    so the rotated values are bit-identical), per-row amax, scale (fp32 or ue8m0), ``div_rn``
    quotient, clamp, integer e4m3 rounding. The FP8 bytes and the scales equal the reference's
    bit for bit for every finite input (tests compare bytes); NaN inputs give NaN codes whose
    sign bit may differ (torch's own NaN signs differ between devices).
    write_indexer_cache scatters the rows into the paged cache at the documented byte offsets
    (values at ``base + t * d``, f32 scale at ``base + bs * d + 4 t``; bytewise when the scale
    addresses are not 4-aligned). Duplicate slots: the last row naming a slot wins, with no
    host sync: for n <= ``SCAN_MAX_ROWS`` each row scans the later rows for its slot (one
    launch), above that a stable device sort groups equal slots and the last of each group
    writes. Rows with slot < 0 or past the cache write nothing.
    Roof (H100 SXM 3.35 TB/s): bytes only. q of a 4096-token prefill chunk [4096, 64, 128] bf16:
    67 MB read + 34.6 MB written -> 30 us. Each butterfly stage is a reshape / permute / split /
    join of the register tile, which the compiler may route through shared memory (7 stages for
    d = 128), so expect a fraction of that roof; not measured (no GPU run yet).

indexer_logits (ragged prefill, DeepGEMM's fp8_mqa_logits)
    A program owns ``BLOCK_Q`` consecutive queries and keeps their FP8 q tile
    ``[BLOCK_Q * h, d]`` on chip. It walks only the key tiles of ``BLOCK_N`` keys inside the
    union of its queries' windows ``[min k_start, max k_end)`` (tiles outside every window are
    skipped: only -inf is stored there), computing per tile
        S^T = k_tile [BLOCK_N, d] @ q^T [d, BLOCK_Q * h]       (FP8 x FP8 -> f32, tensor cores)
        out[t, s] = k_scale[s] * sum_h w[t, h] * max(S[t, h, s], 0)
    The keys sit on the MMA's M side and (query, head) on N, so the head sum runs along the
    accumulator's N axis: mostly within a thread plus a 4-lane shuffle in the wgmma layout (the
    reshape [BLOCK_N, BLOCK_Q * h] -> [BLOCK_N, BLOCK_Q, h] only relabels column bits; if the
    compiler moves data for it instead, that is the first thing to look at in a profile). Each key
    tile is read once per query block: s_q / BLOCK_Q times in all, from L2 (BLOCK_Q = 2 at h 64:
    8.6 GB of L2 reads at the shape below, 3.9 TB/s at the 2.2 ms target).
    Roof at s_q 4096, s_k 32768, h 64, d 128 (H100 SXM: 1979 dense FP8 TFLOPS, 3.35 TB/s,
    ~33.8 T f32 ops/s on the CUDA cores):
      FLOPs 2 * s_q * s_k * h * d = 2.20 TFLOP -> 1.11 ms at 1979 TFLOPS (the causal chunk, the
      last 4096 queries of a 32768-token sequence, has 125.8 M of the 134.2 M pairs: 2.06 TFLOP,
      1.04 ms); bytes: out 537 MB + q 34 MB + k 4 MB -> 0.17 ms. Compute bound (the tensor
      cores). The epilogue (max + FMA per (t, s, h): 17 G ops) needs ~0.51 ms of CUDA cores,
      which Triton overlaps with the MMAs only partly (no warp specialisation), so ~1.6 ms is
      the practical floor and the >= 50 % target means <= 2.2 ms for the full rectangle.
      Not measured (no GPU run yet).
    FP8 accumulation: the tensor cores accumulate the 128-long FP8 dots with their own
    (reduced) precision unless ``FP8_IMPRECISE_ACC`` asks Triton to promote to f32 every that
    many products; the GPU test allows an error of 2e-3 x sum_h |w| (|q_h| . |k|) k_scale.

indexer_logits_paged (decode with MTP, DeepGEMM's fp8_paged_mqa_logits + clean_logits)
    A program owns one batch element, up to ``BLOCK_Q`` of its next_n queries (all of them for
    next_n <= 4 at h = 64) and a chunk of positions; per tile of ``BLOCK_N`` positions it looks
    up the block table, gathers the FP8 rows and the f32 scales from the cache bytes (masked: an
    out-of-range table entry or position is never read, so NaN in unused slots cannot leak), and
    computes the same S^T / head-sum epilogue. Positions past a query's causal length
    ``context_len - next_n + j + 1`` (and unreadable ones) get -inf; a program's positions past
    its sequence's context are filled with -inf without touching the cache. Chunks are sized so
    that about 8 programs per SM exist (no host sync: shapes only).
    Roof at b 128, next_n 2, context 32768, h 64, d 128: bytes: cache 128 * 32768 * 132 B =
    554 MB + out 256 * 32768 * 4 B = 34 MB + q 2 MB -> 588 MB -> 176 us at 3.35 TB/s; FLOPs
    2 * 256 * 32768 * 64 * 128 = 137 GFLOP -> 69 us at 1979 TFLOPS. Memory bound; the >= 60 %
    target means <= 293 us. Not measured (no GPU run yet).

indexer_topk (per-row top-k: a sampled threshold and one pass, radix select as the fallback)
    One program per row. Logits map to int32 keys whose signed order is the float order (-0.0 =
    +0.0, non-finite and out-of-window entries excluded). The cost is the number of passes
    over the row (H100: ~0.6 ms per pass over 4096 rows of 32768), so the common case takes one:
    Fast path. (1) Threshold: S keys at evenly spaced positions of the window (the whole window
    when it has <= S positions), and their r-th largest t by a radix select in registers (4
    tl.histogram steps over the S keys, no pass over the row), with r = ceil(k * OVER * S / n)
    + MARGIN, so that about OVER * k (1.4 k) of the window's keys are >= t. (2) One pass
    counts the selectable keys >= t and compacts their positions, in position order, into a
    scratch row of CAP = 2 * next_pow2(k) slots (never written past CAP). (3) If the count c
    fits (c <= CAP) and the candidates hold the answer, the c candidates are sorted in
    registers by (logit desc, position asc) and the first min(c, k) written, then -1 padding.
    Why exact: if c >= k, the k-th largest key T of the row satisfies T >= t (c keys are >= t),
    so every key of the top k, and every key equal to T, is a candidate, and the candidates'
    order by (key desc, position asc) starts with the row's answer. If c < k but t = INT32_MIN
    (the key excluded entries get: r > the sample's valid keys, or r > S), the candidates are
    all selectable keys: the answer. (A sample that is the whole window has r = k: t is the
    exact k-th largest key, so c >= k unless t = INT32_MIN.)
    Otherwise (t too high: c < k; too low: c > CAP, e.g. heavy ties) the row takes the
    radix path below, from scratch; the branch is per row inside the one launch (no host
    sync). For iid rows at the bench's case (S 1024, r 94) a beta-binomial model gives ~4e-4
    of the rows outside [k, CAP]. The candidate sort keeps the K_P2 largest of CAP keys
    without sorting all of them (``_top_sorted``: sorted runs of K_P2, then a bitonic halving).
    Radix path (exact for any input). Pass 1 histograms the keys' top byte (``tl.histogram``,
    256 bins) over the row's window; if the row has at most k valid entries they are all taken,
    otherwise passes 2-4 histogram the next bytes among the entries that match the prefix found
    so far, which pins the exact k-th largest key T and how many entries equal to T are needed.
    A compaction pass writes the positions of keys > T, and of the first (by position) needed
    keys == T, into the output row (prefix sums give the slots); the program then reloads those
    <= k positions, rebuilds (key, position) as int64 and sorts them in registers (a bitonic
    network of reshapes, ``_indexer_common.sort_descending``) by descending logit, ties by
    ascending position, and writes them back followed by -1 padding.
    The row itself is never sorted; each pass reads only the row's window.
    Roof at s_q 4096, s_k 32768, k 2048: the logits are read once from HBM (537 MB, 160 us at
    3.35 TB/s); the radix path's other 4 passes read them again from L2 where they are meant to
    hit; writes 34 MB (+ up to 64 MB of candidate scratch on the fast path). Measured on the
    H100 (Triton 3.6): radix path 3.22 ms vs torch.topk 1.95 ms (sorted); the fast path is
    predicted at ~1.1 ms (one pass ~0.6 ms, the 4096 -> 2048 candidate sort ~0.3 ms, the
    sample ~0.1 ms); not measured yet.
"""

from __future__ import annotations

import math
from typing import List

import torch
import triton
import triton.language as tl

from .._device import sm_count
from . import register
from ._common import DOT_F32, INTERPRET
from ._indexer_common import (_bitonic_stage, fp8_operand, ordered_keys, pow2, quantize_rows,
                              sort_descending)

# --- configuration (module globals so a benchmark can try others) ----------------------------
# Promote FP8 dot accumulation to f32 every this many products on Hopper (None: the hardware's
# own accumulation for the whole 128-long dot, as DeepGEMM does for d = 128).
FP8_IMPRECISE_ACC = None
# Use the hardware f32 -> e4m3 conversion (SM89+) instead of the integer one. Same bytes for
# every value quantize produces; off until a GPU run has compared them.
USE_HW_E4M3 = False
# Quantize: elements per program (rows = this / d, at least 1).
QUANT_ELEMS = 4096 if INTERPRET else 2048
MAX_D = 8192
# indexer_logits: (BLOCK_N keys, (query, head) columns per program, num_warps, num_stages).
LOGITS_CONFIG = (64, 512, 4, 1) if INTERPRET else (128, 128, 8, 3)
# indexer_logits_paged: (BLOCK_N positions, max (query, head) columns, num_warps, num_stages).
PAGED_CONFIG = (64, 512, 4, 1) if INTERPRET else (64, 256, 4, 3)
PAGED_PROGRAMS_PER_SM = 8
MAX_LOGITS_D = 256
MAX_LOGITS_H = 256
# write_indexer_cache: rows up to which duplicates are found by an in-kernel scan.
SCAN_MAX_ROWS = 1024
_SCAN_BLOCK = 128
# indexer_topk: logits per chunk of a pass, and the largest k (the selected keys are sorted in
# registers).
TOPK_BLOCK = 1024 if INTERPRET else 2048
TOPK_WARPS = 8
# Bits per radix digit, a divisor of 32: 8 takes 4 histogram passes over each row, 4 takes 8
# (16 bins each). On the H100 (Triton 3.6) tl.histogram's cost grows with its bin count: 11-bit
# digits (3 passes) ran 7x slower than 8-bit ones.
TOPK_DIGIT_BITS = 8
# Count a chunk's digits by comparing with each bin (cheap for few bins) instead of tl.histogram.
TOPK_HIST_CMP = False
# False leaves the selected positions in position order: for timing the sort alone, never for
# results (the contract orders them by logit). It also turns the fast path off.
_TOPK_SORT = True
MAX_TOPK = 8192
# Fast path (one pass over the row instead of 32 / TOPK_DIGIT_BITS + 1; the radix path stays
# the exact fallback per row). False: the radix path only.
TOPK_FAST = True
# Keys sampled (evenly spaced over the window) to estimate the threshold: the power of two
# S that makes the k-th largest key about the TOPK_SAMPLE_RANK-th of the sample for a full row
# (S ~ RANK * s_k / k: the count's relative spread is ~1 / sqrt(RANK)), within
# [TOPK_SAMPLE_MIN, TOPK_SAMPLE_MAX] and no more than the row (then the sample is the window).
TOPK_SAMPLE_RANK = 64
TOPK_SAMPLE_MIN = 256
TOPK_SAMPLE_MAX = 4096
# Expected candidates per selected key: the sample rank is ceil(k * this * S / n) + MARGIN.
TOPK_OVERSAMPLE = 1.4
TOPK_SAMPLE_MARGIN = 4
# Candidate capacity CAP = TOPK_CAP_FACTOR * next_pow2(k) within [TOPK_CAP_MIN, TOPK_CAP_MAX]
# (never below next_pow2(k)). At the bench's case (n 32768, k 2048: S 1024, rank 94, ~3.0k
# candidates expected, CAP 4096) a beta-binomial model puts about 4e-4 of iid rows outside
# [k, CAP] (either way); those take the radix path as well.
TOPK_CAP_FACTOR = 2
TOPK_CAP_MIN = 512
TOPK_CAP_MAX = 8192
# Register cap per thread for the top-k kernel (ptxas .maxnreg; None: the compiler's choice),
# applied up to next_pow2(k) = TOPK_MAXNREG_UP_TO_K. At k 2048 / s_k 32768 the kernel takes 80
# registers (3 programs of 8 warps per SM); capped at 64 (4 programs) it compiles without spills
# and ran in 1195 us instead of 1298 (H100, 4096 rows, 2026-11-25); larger k spill under the cap
# (hundreds of words at k >= 4096), so they keep the compiler's choice.
TOPK_MAXNREG = 64
TOPK_MAXNREG_UP_TO_K = 2048
# A list to append, per call, an int32 [s_q] tensor: 1 where the row took the fast path (tests
# and tuning only; None in use).
_topk_paths = None


def _f8(t: torch.Tensor) -> torch.Tensor:
    """FP8 inputs as float8_e4m3fn (uint8 bytes are viewed, not copied)."""
    return t if t.dtype == torch.float8_e4m3fn else t.view(torch.float8_e4m3fn)


def _hw_e4m3(t: torch.Tensor) -> bool:
    return (USE_HW_E4M3 and not INTERPRET and t.device.type == "cuda"
            and torch.cuda.get_device_capability(t.device) >= (8, 9))


# ---------------------------------------------------------------------------------------------
# indexer_quantize
# ---------------------------------------------------------------------------------------------

@triton.jit
def _quantize_kernel(X, OUT_Q, OUT_S, n_rows, stride_x, inv_sqrt_d,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, LOG2D: tl.constexpr,
                     R: tl.constexpr, HADAMARD: tl.constexpr, UE8M0: tl.constexpr,
                     HW_E4M3: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    cols = tl.arange(0, BLOCK_D)
    ok = rows < n_rows
    m2 = ok[:, None] & (cols[None, :] < D)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    codes, scale = quantize_rows(x, inv_sqrt_d, R, D, BLOCK_D, LOG2D, HADAMARD, UE8M0, HW_E4M3)
    tl.store(OUT_Q + rows[:, None] * D + cols[None, :], codes.to(tl.uint8), mask=m2)
    tl.store(OUT_S + rows, scale, mask=ok)


def _rows_of(x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _quant_consts(d: int, hadamard: bool, scale_format: str, t: torch.Tensor):
    block_d = triton.next_power_of_2(max(d, 1))
    r = max(1, QUANT_ELEMS // block_d)
    return dict(D=d, BLOCK_D=block_d, LOG2D=int(math.log2(block_d)), R=r, HADAMARD=bool(hadamard),
                UE8M0=scale_format == "ue8m0", HW_E4M3=_hw_e4m3(t))


def _inv_sqrt(d: int) -> float:
    # the reference multiplies by the f32 rounding of this double; Triton rounds a float
    # argument to f32 the same way (round to nearest)
    return 1.0 / math.sqrt(max(d, 1))


# f32(1e-4) / 448 by IEEE division, once on the host (a CUDA tensor divided by a Python number
# is multiplied by the rounded reciprocal instead); exact as a Python float.
_FLOOR_SCALE = (torch.tensor(1e-4, dtype=torch.float32) / torch.tensor(448.0)).item()


def indexer_quantize(x, hadamard=True, scale_format="fp32"):
    d = x.shape[-1]
    x_fp8 = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    n_rows = scale.numel()
    if n_rows == 0:
        return x_fp8, scale
    if d == 0:  # nothing to quantize: every row gets the floor scale (a shape fact)
        floor = torch.full((), _FLOOR_SCALE, dtype=torch.float32, device=x.device)
        if scale_format == "ue8m0":  # the smallest power of two >= floor, from its bits
            bits = floor.view(torch.int32)
            floor = torch.where((bits & 0x7FFFFF) != 0, ((bits >> 23) + 1) << 23,
                                bits).view(torch.float32)
        return x_fp8, scale.copy_(floor.expand_as(scale))
    rows = _rows_of(x)
    c = _quant_consts(d, hadamard, scale_format, x)
    _quantize_kernel[(triton.cdiv(n_rows, c["R"]),)](
        rows, x_fp8.view(torch.uint8), scale, n_rows, rows.stride(0), _inv_sqrt(d), **c,
        num_warps=4)
    return x_fp8, scale


def _quantize_supports(x, hadamard=True, scale_format="fp32") -> List[str]:
    d = x.shape[-1]
    if d > MAX_D:
        return [f"d = {d} > {MAX_D}: a row is quantized in registers"]
    return []


# ---------------------------------------------------------------------------------------------
# write_indexer_cache
# ---------------------------------------------------------------------------------------------

@triton.jit
def _store_scales(base, off, scale, mask, bs, D: tl.constexpr, SCALE_F32: tl.constexpr):
    """f32 scales of tokens ``off`` at ``base + bs * D + 4 * off`` (little-endian bytes)."""
    addr = base + bs * D + 4 * off
    if SCALE_F32:
        tl.store(addr.to(tl.pointer_type(tl.float32)), scale, mask=mask)
    else:
        bits = scale.to(tl.int32, bitcast=True)
        for b in tl.static_range(4):
            tl.store(addr + b, ((bits >> (8 * b)) & 0xFF).to(tl.uint8), mask=mask)


@triton.jit
def _load_scales(base, off, mask, bs, D: tl.constexpr, SCALE_F32: tl.constexpr):
    addr = base + bs * D + 4 * off
    if SCALE_F32:
        return tl.load(addr.to(tl.pointer_type(tl.float32)), mask=mask, other=0.0)
    else:
        bits = tl.zeros(off.shape, tl.int32)
        for b in tl.static_range(4):
            byte = tl.load(addr + b, mask=mask, other=0).to(tl.int32)
            bits = bits | (byte << (8 * b))
        return bits.to(tl.float32, bitcast=True)


@triton.jit
def _write_kernel(X, SLOTS, ROWS, CACHE, n, num_slots, bs, stride0, stride_x, inv_sqrt_d,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, LOG2D: tl.constexpr, R: tl.constexpr,
                  HADAMARD: tl.constexpr, UE8M0: tl.constexpr, HW_E4M3: tl.constexpr,
                  SORTED: tl.constexpr, SCAN_BLOCK: tl.constexpr, SCALE_F32: tl.constexpr):
    p0 = tl.program_id(0).to(tl.int64) * R
    p = p0 + tl.arange(0, R)
    live = p < n
    slot = tl.load(SLOTS + p, mask=live, other=-1).to(tl.int64)
    valid = live & (slot >= 0) & (slot < num_slots)
    if SORTED:
        # stably sorted slots: the last entry of a run of equal slots is the last row naming it
        row = tl.load(ROWS + p, mask=live, other=0).to(tl.int64)
        nxt = tl.load(SLOTS + p + 1, mask=p + 1 < n, other=-1).to(tl.int64)
        winner = (p + 1 >= n) | (nxt != slot)
    else:
        # a row loses when a later row names the same slot
        row = p
        later = tl.zeros([R, SCAN_BLOCK], dtype=tl.int32)
        for j0 in range(p0 + 1, n, SCAN_BLOCK):
            j = j0 + tl.arange(0, SCAN_BLOCK)
            s = tl.load(SLOTS + j, mask=j < n, other=-1).to(tl.int64)
            hit = (s[None, :] == slot[:, None]) & (j[None, :] > p[:, None]) & (j[None, :] < n)
            later = later | hit.to(tl.int32)
        winner = tl.max(later, axis=1) == 0
    write = valid & winner
    slot = tl.where(write, slot, 0)
    row = tl.where(write, row, 0)
    cols = tl.arange(0, BLOCK_D)
    m2 = write[:, None] & (cols[None, :] < D)
    x = tl.load(X + row[:, None] * stride_x + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    codes, scale = quantize_rows(x, inv_sqrt_d, R, D, BLOCK_D, LOG2D, HADAMARD, UE8M0, HW_E4M3)
    blk = slot // bs
    off = slot % bs
    base = CACHE + blk * stride0
    tl.store(base[:, None] + off[:, None] * D + cols[None, :], codes.to(tl.uint8), mask=m2)
    _store_scales(base, off, scale, write, bs, D, SCALE_F32)


def _cache_raw(cache: torch.Tensor, d: int):
    """uint8 view of a paged indexer cache, its block stride in bytes, and whether every scale
    address is 4-byte aligned (then scales move as f32, else bytewise)."""
    raw = cache.view(torch.uint8)
    bs = cache.shape[1]
    stride0 = raw.stride(0) if cache.shape[0] > 1 else bs * (d + 4)
    aligned = raw.data_ptr() % 4 == 0 and stride0 % 4 == 0 and (bs * d) % 4 == 0
    return raw, stride0, aligned


def write_indexer_cache(cache, k, slot_mapping, hadamard=True, scale_format="fp32"):
    n, d = k.shape
    nb, bs = cache.shape[0], cache.shape[1]
    num_slots = nb * bs
    if n == 0 or num_slots == 0:
        return None
    raw, stride0, aligned = _cache_raw(cache, d)
    x = k if k.stride(-1) == 1 else k.contiguous()
    slots = slot_mapping.contiguous()
    if n <= SCAN_MAX_ROWS:
        rows, sorted_ = slots, False  # ROWS is not read
    else:
        # skipped rows get a key past the cache (never written); stable: equal slots keep row
        # order, so the last of each run is the last row naming the slot
        ok = (slots >= 0) & (slots < num_slots)
        keys = torch.where(ok, slots, num_slots)
        if num_slots < 2 ** 31 - 1:
            keys = keys.to(torch.int32)  # half the radix passes
        slots, rows = torch.sort(keys, stable=True)
        sorted_ = True
    c = _quant_consts(d, hadamard, scale_format, k)
    c["R"] = min(c["R"], 64)
    _write_kernel[(triton.cdiv(n, c["R"]),)](
        x, slots, rows, raw, n, num_slots, bs, stride0, x.stride(0), _inv_sqrt(d), **c,
        SORTED=sorted_, SCAN_BLOCK=_SCAN_BLOCK, SCALE_F32=aligned, num_warps=4)
    return None


def _write_supports(cache, k, slot_mapping, hadamard=True, scale_format="fp32") -> List[str]:
    d = k.shape[1]
    if d > MAX_D:
        return [f"d = {d} > {MAX_D}: a row is quantized in registers"]
    return []


# ---------------------------------------------------------------------------------------------
# indexer_logits (ragged) and indexer_logits_paged
# ---------------------------------------------------------------------------------------------

@triton.jit
def _head_sum(kt, qt, w, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr,
              DOT_F32: tl.constexpr, IMPRECISE: tl.constexpr):
    """``sum_h w[q, h] * max(k . q_h, 0)`` for a key tile ``kt [BLOCK_N, BLOCK_D]`` and the
    transposed query tile ``qt [BLOCK_D, BLOCK_Q * BLOCK_H]`` -> ``[BLOCK_N, BLOCK_Q]``."""
    if DOT_F32:
        s = tl.dot(fp8_operand(kt, DOT_F32), qt)
    elif IMPRECISE > 0:
        s = tl.dot(kt, qt, max_num_imprecise_acc=IMPRECISE)
    else:
        s = tl.dot(kt, qt)
    v = tl.maximum(s, 0.0) * w[None, :]
    return tl.sum(tl.reshape(v, [BLOCK_N, BLOCK_Q, BLOCK_H]), axis=2)


@triton.jit
def _logits_kernel(Q, K, KS, W, KSTART, KEND, OUT,
                   s_q, s_k, h, stride_qs, stride_qh, stride_ks, stride_kss, stride_ws, stride_wh,
                   stride_os,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
                   IMPRECISE: tl.constexpr):
    pid = tl.program_id(0)
    t = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    t_ok = t < s_q
    lo_t = tl.maximum(tl.load(KSTART + t, mask=t_ok, other=0), 0)
    hi_t = tl.minimum(tl.load(KEND + t, mask=t_ok, other=0), s_k)
    live = t_ok & (lo_t < hi_t)
    # the union of the windows (empty windows do not widen it)
    lo = tl.min(tl.where(live, lo_t, s_k), axis=0)
    hi = tl.max(tl.where(live, hi_t, 0), axis=0)

    # q tile [BLOCK_Q * BLOCK_H, BLOCK_D]: row r is query r // BLOCK_H, head r % BLOCK_H
    r = tl.arange(0, BLOCK_Q * BLOCK_H)
    rq = pid * BLOCK_Q + r // BLOCK_H
    rh = r % BLOCK_H
    r_ok = (rq < s_q) & (rh < h)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + rq.to(tl.int64)[:, None] * stride_qs + rh[:, None] * stride_qh
                + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    qt = tl.trans(fp8_operand(q, DOT_F32))
    w = tl.load(W + rq.to(tl.int64) * stride_ws + rh * stride_wh, mask=r_ok, other=0.0)

    out_rows = OUT + t.to(tl.int64)[None, :] * stride_os  # [1, BLOCK_Q]
    n_start = (lo // BLOCK_N) * BLOCK_N
    for n0 in range(n_start, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < s_k
        kt = tl.load(K + n.to(tl.int64)[:, None] * stride_ks + offs_d[None, :],
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        logit = _head_sum(kt, qt, w, BLOCK_N, BLOCK_Q, BLOCK_H, DOT_F32, IMPRECISE)
        ksc = tl.load(KS + n.to(tl.int64) * stride_kss, mask=n_ok, other=0.0)
        logit = logit * ksc[:, None]
        inside = (n[:, None] >= lo_t[None, :]) & (n[:, None] < hi_t[None, :])
        tl.store(out_rows + n[:, None], tl.where(inside, logit, float("-inf")),
                 mask=n_ok[:, None] & t_ok[None, :])
    # key tiles outside every window: -inf only
    n_end = tl.maximum((hi + BLOCK_N - 1) // BLOCK_N * BLOCK_N, n_start)
    neg = tl.full([BLOCK_N, BLOCK_Q], float("-inf"), tl.float32)
    for n0 in range(0, n_start, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        tl.store(out_rows + n[:, None], neg, mask=(n[:, None] < s_k) & t_ok[None, :])
    for n0 in range(n_end, s_k, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        tl.store(out_rows + n[:, None], neg, mask=(n[:, None] < s_k) & t_ok[None, :])


def _block_q(h_p2: int, max_cols: int, want: int) -> int:
    return max(1, min(want, max_cols // h_p2))


def indexer_logits(q_fp8, k_fp8, k_scale, weights, k_start, k_end):
    s_q, h, d = q_fp8.shape
    s_k = k_fp8.shape[0]
    out = torch.empty((s_q, s_k), dtype=torch.float32, device=q_fp8.device)
    if s_q == 0 or s_k == 0:
        return out
    q, k = _f8(q_fp8), _f8(k_fp8)
    block_n, max_cols, warps, stages = LOGITS_CONFIG
    block_h = pow2(h, 16)
    block_q = _block_q(block_h, max_cols, triton.next_power_of_2(s_q))
    _logits_kernel[(triton.cdiv(s_q, block_q),)](
        q, k, k_scale, weights, k_start.contiguous(), k_end.contiguous(), out,
        s_q, s_k, h, q.stride(0), q.stride(1), k.stride(0), k_scale.stride(0),
        weights.stride(0), weights.stride(1), out.stride(0),
        D=d, BLOCK_D=pow2(d, 32), BLOCK_H=block_h, BLOCK_Q=block_q, BLOCK_N=block_n,
        DOT_F32=DOT_F32, IMPRECISE=FP8_IMPRECISE_ACC or 0, num_warps=warps, num_stages=stages)
    return out


def _logits_shape_reasons(h: int, d: int) -> List[str]:
    reasons = []
    if d > MAX_LOGITS_D:
        reasons.append(f"d = {d} > {MAX_LOGITS_D}: the FP8 q tile is kept on chip")
    if h > MAX_LOGITS_H:
        reasons.append(f"h = {h} > {MAX_LOGITS_H} heads: one query's heads form the MMA's N")
    return reasons


def _logits_supports(q_fp8, k_fp8, k_scale, weights, k_start, k_end) -> List[str]:
    reasons = _logits_shape_reasons(q_fp8.shape[1], q_fp8.shape[2])
    if q_fp8.device.type == "cuda" and torch.cuda.get_device_capability(q_fp8.device) < (8, 9):
        reasons.append("FP8 tensor-core dots need SM89 or newer")
    return reasons


@triton.jit
def _paged_kernel(Q, CACHE, W, CTX, BT, OUT,
                  next_n, h, L, nb, bs, max_blocks, stride0, chunk,
                  stride_qb, stride_qn, stride_qh, stride_wr, stride_wh, stride_btb,
                  stride_btn, stride_or,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, SCALE_F32: tl.constexpr,
                  DOT_F32: tl.constexpr, IMPRECISE: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)  # batch element
    qg = tl.program_id(1)  # group of BLOCK_Q of its next_n queries
    c0 = tl.program_id(2) * chunk  # first position of this program
    c1 = tl.minimum(c0 + chunk, L)
    j = qg * BLOCK_Q + tl.arange(0, BLOCK_Q)
    j_ok = j < next_n
    ctx = tl.load(CTX + i)
    limit = ctx - next_n + j + 1  # query j sees positions < limit
    # positions any of these queries can see, readable through the block table
    hi = tl.minimum(tl.minimum(c1, tl.max(tl.where(j_ok, limit, 0), axis=0)), max_blocks * bs)

    r = tl.arange(0, BLOCK_Q * BLOCK_H)
    rj = qg * BLOCK_Q + r // BLOCK_H
    rh = r % BLOCK_H
    r_ok = (rj < next_n) & (rh < h)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + i * stride_qb + rj[:, None] * stride_qn + rh[:, None] * stride_qh
                + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    qt = tl.trans(fp8_operand(q, DOT_F32))
    w = tl.load(W + (i * next_n + rj) * stride_wr + rh * stride_wh, mask=r_ok, other=0.0)

    out_rows = OUT + (i * next_n + j.to(tl.int64))[None, :] * stride_or  # [1, BLOCK_Q]
    for p0 in range(c0, hi, BLOCK_N):
        p = p0 + tl.arange(0, BLOCK_N)
        bi = p // bs
        in_tab = p < hi
        blk = tl.load(BT + i * stride_btb + bi * stride_btn, mask=in_tab, other=-1)
        ok = in_tab & (blk >= 0) & (blk < nb)
        base = CACHE + tl.where(ok, blk, 0).to(tl.int64) * stride0
        off = p % bs
        kt = tl.load(base[:, None] + off[:, None] * D + offs_d[None, :],
                     mask=ok[:, None] & d_ok[None, :], other=0.0)
        kt = kt.to(tl.float8e4nv, bitcast=True)
        logit = _head_sum(kt, qt, w, BLOCK_N, BLOCK_Q, BLOCK_H, DOT_F32, IMPRECISE)
        logit = logit * _load_scales(base, off, ok, bs, D, SCALE_F32)[:, None]
        seen = ok[:, None] & (p[:, None] < limit[None, :])
        tl.store(out_rows + p[:, None], tl.where(seen, logit, float("-inf")),
                 mask=(p[:, None] < c1) & j_ok[None, :])
    # the rest of the chunk: nothing visible
    p_end = tl.maximum(c0 + tl.cdiv(hi - c0, BLOCK_N) * BLOCK_N, c0)
    neg = tl.full([BLOCK_N, BLOCK_Q], float("-inf"), tl.float32)
    for p0 in range(p_end, c1, BLOCK_N):
        p = p0 + tl.arange(0, BLOCK_N)
        tl.store(out_rows + p[:, None], neg, mask=(p[:, None] < c1) & j_ok[None, :])


def _paged_chunks(programs: int, device: torch.device) -> int:
    """How many position chunks each (batch element, query group) is cut into: enough for about
    ``PAGED_PROGRAMS_PER_SM`` programs per SM (one under the interpreter, whose cost is per
    program). Shapes and the device only, never tensor values."""
    if INTERPRET:
        return 1
    return triton.cdiv(PAGED_PROGRAMS_PER_SM * sm_count(device, cpu_default=1), programs)


def indexer_logits_paged(q_fp8, cache, weights, context_lens, block_table, max_context_len):
    b, n, h, d = q_fp8.shape
    nb, bs = cache.shape[0], cache.shape[1]
    max_blocks = block_table.shape[1]
    L = int(max_context_len)
    out = torch.empty((b * n, L), dtype=torch.float32, device=q_fp8.device)
    if b * n == 0 or L == 0:
        return out
    if nb * bs == 0 or max_blocks == 0:
        return out.fill_(float("-inf"))  # no key can be read (a shape fact)
    q = _f8(q_fp8)
    raw, stride0, aligned = _cache_raw(cache, d)
    block_n, max_cols, warps, stages = PAGED_CONFIG
    block_h = pow2(h, 16)
    block_q = _block_q(block_h, max_cols, triton.next_power_of_2(n))
    groups = triton.cdiv(n, block_q)
    tiles = triton.cdiv(L, block_n)
    chunks = max(1, min(tiles, _paged_chunks(b * groups, q.device)))
    chunk = triton.cdiv(tiles, chunks) * block_n
    chunks = triton.cdiv(L, chunk)
    _paged_kernel[(b, groups, chunks)](
        q, raw, weights, context_lens.contiguous(), block_table, out,
        n, h, L, nb, bs, max_blocks, stride0, chunk,
        q.stride(0), q.stride(1), q.stride(2), weights.stride(0), weights.stride(1),
        block_table.stride(0), block_table.stride(1), out.stride(0),
        D=d, BLOCK_D=pow2(d, 32), BLOCK_H=block_h, BLOCK_Q=block_q, BLOCK_N=block_n,
        SCALE_F32=aligned, DOT_F32=DOT_F32, IMPRECISE=FP8_IMPRECISE_ACC or 0,
        num_warps=warps, num_stages=stages)
    return out


def _paged_supports(q_fp8, cache, weights, context_lens, block_table, max_context_len):
    reasons = _logits_shape_reasons(q_fp8.shape[2], q_fp8.shape[3])
    if q_fp8.device.type == "cuda" and torch.cuda.get_device_capability(q_fp8.device) < (8, 9):
        reasons.append("FP8 tensor-core dots need SM89 or newer")
    return reasons


# ---------------------------------------------------------------------------------------------
# indexer_topk
# ---------------------------------------------------------------------------------------------

@triton.jit
def _row_keys(row_ptr, c0, lo, hi, BLOCK: tl.constexpr):
    """Keys (int32, signed order = float order) of positions c0 .. c0 + BLOCK of a row and
    which of them are selectable (finite, inside [lo, hi))."""
    pos = c0 + tl.arange(0, BLOCK)
    inside = (pos >= lo) & (pos < hi)
    x = tl.load(row_ptr + pos, mask=inside, other=float("-inf"))
    key, finite = ordered_keys(x)
    return pos, key, inside & finite


@triton.jit
def _digit(key, SHIFT: tl.constexpr, WIDTH: tl.constexpr):
    """Bits SHIFT .. SHIFT + WIDTH of the key in unsigned order (the top digit, the one that
    holds bit 31, has its sign bit flipped)."""
    dg = (key >> SHIFT) & ((1 << WIDTH) - 1)
    if SHIFT + WIDTH == 32:
        dg = dg ^ (1 << (WIDTH - 1))
    return dg


@triton.jit
def _histogram(row_ptr, lo, hi, prefix, pmask, SHIFT: tl.constexpr, WIDTH: tl.constexpr,
               NBINS: tl.constexpr, HIST_CMP: tl.constexpr, BLOCK: tl.constexpr):
    """Counts of digit (SHIFT, WIDTH) among the row's selectable keys with
    ``key & pmask == prefix``; HIST_CMP counts by comparing with every bin (few bins) instead
    of ``tl.histogram``."""
    hist = tl.zeros([NBINS], tl.int32)
    bins = tl.arange(0, NBINS)
    c_lo = (lo // BLOCK) * BLOCK
    for c0 in range(c_lo, hi, BLOCK):
        pos, key, ok = _row_keys(row_ptr, c0, lo, hi, BLOCK)
        ok = ok & ((key & pmask) == prefix)
        if HIST_CMP:
            dg = tl.where(ok, _digit(key, SHIFT, WIDTH), NBINS)  # NBINS: in no bin
            hist += tl.sum((dg[:, None] == bins[None, :]).to(tl.int32), axis=0)
        else:
            # entries left out count in bin 0 and are taken back out (no histogram mask)
            hist += tl.histogram(tl.where(ok, _digit(key, SHIFT, WIDTH), 0), NBINS)
            hist -= tl.where(bins == 0, BLOCK - tl.sum(ok.to(tl.int32), axis=0), 0)
    return hist


@triton.jit
def _pick_digit(hist, need, NBINS: tl.constexpr):
    """The digit value b of the need-th largest key (counted from the top by ``hist``) and how
    many of the needed keys lie in bins above b."""
    bins = tl.arange(0, NBINS)
    total = tl.sum(hist, axis=0)
    at_least = total - tl.cumsum(hist, axis=0) + hist  # keys in bins >= b
    b = tl.max(tl.where(at_least >= need, bins, -1), axis=0)
    above = tl.sum(tl.where(bins > b, hist, 0), axis=0)
    return b, above


@triton.jit
def _refine_digit(row_ptr, lo, hi, prefix, pmask, need, I: tl.constexpr, NBITS: tl.constexpr,
                  HIST_CMP: tl.constexpr, BLOCK: tl.constexpr):
    """Radix step I (>= 1): digit I from the top of the need-th largest key among those matching
    the ``prefix`` found so far. A function per step: Triton 3.6 refuses a constexpr assigned
    again in an unrolled loop."""
    SHIFT: tl.constexpr = 32 - NBITS * (I + 1)
    hist = _histogram(row_ptr, lo, hi, prefix, pmask, SHIFT, NBITS, 1 << NBITS, HIST_CMP, BLOCK)
    b, above = _pick_digit(hist, need, 1 << NBITS)
    return (need - above, prefix | (b << SHIFT),
            pmask | (tl.full([], (1 << NBITS) - 1, tl.int32) << SHIFT))


@triton.jit
def _radix_topk(row_ptr, out_ptr, lo, hi, k_sel, k_out, BLOCK: tl.constexpr,
                K_P2: tl.constexpr, LOG_K: tl.constexpr, NBITS: tl.constexpr,
                HIST_CMP: tl.constexpr, SORT: tl.constexpr):
    """The exact radix-select path for one row: 32 / NBITS histogram passes pin the k_sel-th
    largest key, a compaction pass writes the selected positions into the output row, and they
    are sorted there (5 passes over the row at 8-bit digits)."""
    # Radix select over the 32-bit keys in digits of NBITS bits (a divisor of 32): one
    # histogram pass over the row per digit, from the top digit (bits 32 - NBITS .. 31) down.
    NBINS: tl.constexpr = 1 << NBITS
    S0: tl.constexpr = 32 - NBITS
    # Pass 1: top digits of all selectable keys; their total is the row's count.
    zero = tl.zeros([], tl.int32)
    hist = _histogram(row_ptr, lo, hi, zero, zero, S0, NBITS, NBINS, HIST_CMP, BLOCK)
    count = tl.sum(hist, axis=0)
    # Selection: key > thr, or key == thr for the first need_eq such keys by position. With at
    # most k_sel selectable keys all are taken: thr = INT32_MIN is below every finite logit's
    # key (it is the key of a NaN pattern).
    thr = tl.full([], -2147483648, tl.int32)
    need_eq = zero
    if count > k_sel:
        b, above = _pick_digit(hist, k_sel, NBINS)
        need = k_sel - above
        prefix = (b ^ (1 << (NBITS - 1))) << S0
        pmask = tl.full([], NBINS - 1, tl.int32) << S0
        for i in tl.static_range(1, 32 // NBITS):
            need, prefix, pmask = _refine_digit(row_ptr, lo, hi, prefix, pmask, need, i, NBITS,
                                                HIST_CMP, BLOCK)
        thr = prefix  # the exact key of the k_sel-th largest entry
        need_eq = need  # how many entries equal to it are selected (the first by position)

    # Compaction: positions of the selected entries, in position order, into the output row.
    taken = zero
    eq_seen = zero
    c_lo = (lo // BLOCK) * BLOCK
    for c0 in range(c_lo, hi, BLOCK):
        pos, key, ok = _row_keys(row_ptr, c0, lo, hi, BLOCK)
        eq = ok & (key == thr)
        eq_rank = eq_seen + tl.cumsum(eq.to(tl.int32), axis=0) - 1
        sel = ok & ((key > thr) | (eq & (eq_rank < need_eq)))
        eq_seen += tl.sum(eq.to(tl.int32), axis=0)
        sel_i = sel.to(tl.int32)
        slot = taken + tl.cumsum(sel_i, axis=0) - 1
        tl.store(out_ptr + slot, pos, mask=sel & (slot < k_sel))  # never past the row
        taken += tl.sum(sel_i, axis=0)
    if not SORT:  # timing experiments only: the contract orders the positions by logit
        for j0 in range(0, k_out, BLOCK):
            jb = j0 + tl.arange(0, BLOCK)
            tl.store(out_ptr + jb, tl.full([BLOCK], -1, tl.int32), mask=(jb >= taken) & (jb < k_out))
    else:
        tl.debug_barrier()  # the positions written above are read back by other threads
        _sort_write(row_ptr, out_ptr, out_ptr, taken, taken, k_out, K_P2, LOG_K, K_P2, LOG_K,
                    BLOCK)


@triton.jit
def _sort_write(row_ptr, src_ptr, out_ptr, m, m_out, k_out, N: tl.constexpr,
                LOG_N: tl.constexpr, K_P2: tl.constexpr, LOG_K: tl.constexpr,
                BLOCK: tl.constexpr):
    """Reads m <= N positions of the row (from ``src_ptr``), sorts them by (logit desc, position
    asc) as int64 keys with the position's complement in the low word (unique per position),
    and writes the first m_out <= min(m, K_P2) of them to the output row, then -1 up to k_out."""
    jj = tl.arange(0, N)
    have = jj < m
    pos = tl.load(src_ptr + jj, mask=have, other=0)
    key, _ = ordered_keys(tl.load(row_ptr + pos, mask=have, other=0.0))
    full = (key.to(tl.int64) << 32) | (4294967295 - pos.to(tl.int64))
    full = tl.where(have, full, -9223372036854775807 - 1)
    full = _top_sorted(full, N, LOG_N, K_P2, LOG_K)  # the K_P2 largest, descending
    pos = (4294967295 - (full & 4294967295)).to(tl.int32)
    tl.debug_barrier()  # every thread has read its positions before they are overwritten
    ko = tl.arange(0, K_P2)
    tl.store(out_ptr + ko, tl.where(ko < m_out, pos, -1), mask=ko < k_out)
    for j0 in range(K_P2, k_out, BLOCK):
        jb = j0 + tl.arange(0, BLOCK)
        tl.store(out_ptr + jb, tl.full([BLOCK], -1, tl.int32), mask=jb < k_out)


@triton.jit
def _top_sorted(x, N: tl.constexpr, LOG_N: tl.constexpr, M: tl.constexpr, LOG_M: tl.constexpr):
    """The M largest of ``x [N]`` in descending order (M <= N, powers of two): bitonic stages
    up to merge size M leave sorted runs of M alternately descending and ascending; each
    halving keeps the elementwise max of a descending run and its ascending neighbour (a
    bitonic sequence holding the M largest of the two runs) and merges it. M == N: a plain
    descending sort. Cheaper than sorting all N: the last merges run on N/2, N/4, ... only."""
    for kk in tl.static_range(1, LOG_M + 1):
        for t in tl.static_range(kk):
            x = _bitonic_stage(x, N, kk, t)
    for h in tl.static_range(LOG_N - LOG_M):
        x = _halve_runs(x, N >> h, M, LOG_M)
    return x


@triton.jit
def _halve_runs(x, N: tl.constexpr, M: tl.constexpr, LOG_M: tl.constexpr):
    # A function per halving: Triton 3.6 refuses a constexpr assigned again in an unrolled loop.
    a, b = tl.split(tl.permute(tl.reshape(x, [N // (2 * M), 2, M]), 0, 2, 1))
    y = tl.reshape(tl.maximum(a, b), [N // 2])
    for t in tl.static_range(LOG_M):  # merge each bitonic run (descending once only one is left)
        y = _bitonic_stage(y, N // 2, LOG_M, t)
    return y


@triton.jit
def _sample_threshold(row_ptr, lo, hi, k_sel, S: tl.constexpr, OVER256: tl.constexpr,
                      MARGIN: tl.constexpr):
    """A key t such that about OVER256 / 256 * k_sel of the window's selectable keys are >= t:
    the r-th largest of S keys at evenly spaced positions of the window [lo, hi), or of all of
    it when it has at most S positions (then r = k_sel: t is the exact k_sel-th largest key).
    Non-selectable keys count as INT32_MIN, the smallest, so t = INT32_MIN means "every
    selectable key"; it is also t when r > S (the sample asks for about the whole window).
    Only an estimate: the caller checks what it gives."""
    n = hi - lo
    i = tl.arange(0, S)
    covered = n <= S
    nn = tl.maximum(n, 1).to(tl.int64)
    spread = lo + ((i.to(tl.int64) * nn) // S).to(tl.int32)  # n > S: evenly spaced, distinct
    pos = tl.where(covered, lo + i, spread)
    inside = i < n
    key, finite = ordered_keys(tl.load(row_ptr + pos, mask=inside, other=float("-inf")))
    key = tl.where(inside & finite, key, -2147483648)
    # r = ceil(k_sel * over * S / n) + MARGIN: the keys >= the sample's r-th largest are about
    # r * n / S of the window's, over * k_sel plus a margin in expectation.
    r = (k_sel.to(tl.int64) * (OVER256 * S) + nn * 256 - 1) // (nn * 256) + MARGIN
    r = tl.where(covered, k_sel, r)
    t = _kth_largest(key, tl.minimum(r, S).to(tl.int32), S, 8)
    return tl.where(r > S, -2147483648, t)


@triton.jit
def _kth_largest(key, need, N: tl.constexpr, NBITS: tl.constexpr):
    """The need-th largest (1 <= need <= N) of the int32 ``key [N]`` held in registers: radix
    select, one tl.histogram of NBITS-bit digits per step (the row passes' method, no sort)."""
    prefix = tl.zeros([], tl.int32)
    pmask = tl.zeros([], tl.int32)
    for i in tl.static_range(32 // NBITS):
        need, prefix, pmask = _kth_digit(key, need, prefix, pmask, i, N, NBITS)
    return prefix


@triton.jit
def _kth_digit(key, need, prefix, pmask, I: tl.constexpr, N: tl.constexpr,
               NBITS: tl.constexpr):
    # A function per step: Triton 3.6 refuses a constexpr assigned again in an unrolled loop.
    SHIFT: tl.constexpr = 32 - NBITS * (I + 1)
    NB: tl.constexpr = 1 << NBITS
    ok = (key & pmask) == prefix
    bins = tl.arange(0, NB)
    hist = tl.histogram(tl.where(ok, _digit(key, SHIFT, NBITS), 0), NB)
    hist -= tl.where(bins == 0, N - tl.sum(ok.to(tl.int32), axis=0), 0)
    b, above = _pick_digit(hist, need, NB)
    if SHIFT + NBITS == 32:
        b = b ^ (1 << (NBITS - 1))  # the top digit's sign bit back
    return (need - above, prefix | (b << SHIFT),
            pmask | (tl.full([], NB - 1, tl.int32) << SHIFT))


@triton.jit
def _collect_at_least(row_ptr, buf_ptr, lo, hi, t, CAP: tl.constexpr, BLOCK: tl.constexpr):
    """One pass over the window: the number of selectable keys >= t, and the positions of the
    first CAP of them, in position order, at ``buf_ptr`` (never written past CAP)."""
    taken = tl.zeros([], tl.int32)
    c_lo = (lo // BLOCK) * BLOCK
    for c0 in range(c_lo, hi, BLOCK):
        pos, key, ok = _row_keys(row_ptr, c0, lo, hi, BLOCK)
        sel_i = (ok & (key >= t)).to(tl.int32)
        slot = taken + tl.cumsum(sel_i, axis=0) - 1
        tl.store(buf_ptr + slot, pos, mask=(sel_i != 0) & (slot < CAP))
        taken += tl.sum(sel_i, axis=0)
    return taken


@triton.jit
def _topk_kernel(LOGITS, KSTART, KEND, OUT, BUF, PATHS, s_k, stride_l, stride_o, k_sel, k_out,
                 HAS_START: tl.constexpr, HAS_END: tl.constexpr, BLOCK: tl.constexpr,
                 K_P2: tl.constexpr, LOG_K: tl.constexpr, NBITS: tl.constexpr,
                 HIST_CMP: tl.constexpr, SORT: tl.constexpr, FAST: tl.constexpr,
                 S: tl.constexpr, OVER256: tl.constexpr,
                 MARGIN: tl.constexpr, CAP: tl.constexpr, LOG_CAP: tl.constexpr,
                 RECORD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride_l
    out_ptr = OUT + row * stride_o
    lo = 0
    hi = s_k
    if HAS_START:
        lo = tl.maximum(tl.load(KSTART + row), 0)
    if HAS_END:
        hi = tl.minimum(tl.load(KEND + row), s_k)

    if FAST:
        # Fast path (see the module docstring): threshold from a sample, one collecting pass.
        buf_ptr = BUF + row * CAP
        t = _sample_threshold(row_ptr, lo, hi, k_sel, S, OVER256, MARGIN)
        count = _collect_at_least(row_ptr, buf_ptr, lo, hi, t, CAP, BLOCK)
        # Exact when every candidate fits and the candidates hold the answer: at least k_sel
        # of them (then every key of the top k_sel, ties at the k_sel-th included, is >= t),
        # or all selectable keys (t = INT32_MIN).
        use_fast = (count <= CAP) & ((count >= k_sel) | (t == -2147483648))
        if RECORD:
            tl.store(PATHS + row, use_fast.to(tl.int32))
        if use_fast:  # (if / else: nothing of the radix path stays live across the sort)
            tl.debug_barrier()  # the positions written above are read back by other threads
            _sort_write(row_ptr, buf_ptr, out_ptr, count, tl.minimum(count, k_sel), k_out,
                        CAP, LOG_CAP, K_P2, LOG_K, BLOCK)
        else:
            _radix_topk(row_ptr, out_ptr, lo, hi, k_sel, k_out, BLOCK, K_P2, LOG_K, NBITS,
                        HIST_CMP, SORT)
    else:
        if RECORD:
            tl.store(PATHS + row, 0)
        _radix_topk(row_ptr, out_ptr, lo, hi, k_sel, k_out, BLOCK, K_P2, LOG_K, NBITS,
                    HIST_CMP, SORT)


def _topk_sample(s_k: int, k_sel: int) -> int:
    want = triton.next_power_of_2(-(-TOPK_SAMPLE_RANK * s_k // k_sel))
    return max(16, min(max(want, TOPK_SAMPLE_MIN), TOPK_SAMPLE_MAX,
                       triton.next_power_of_2(s_k)))


def _topk_cap(k_p2: int) -> int:
    return max(k_p2, min(max(TOPK_CAP_FACTOR * k_p2, TOPK_CAP_MIN), TOPK_CAP_MAX))


def indexer_topk(logits, k, k_start=None, k_end=None):
    s_q, s_k = logits.shape
    out = torch.empty((s_q, k), dtype=torch.int32, device=logits.device)
    if s_q == 0 or k == 0:
        return out
    k_sel = min(k, s_k)
    if k_sel == 0:
        return out.fill_(-1)
    x = logits if logits.stride(1) == 1 else logits.contiguous()
    ks = k_start.contiguous() if k_start is not None else out
    ke = k_end.contiguous() if k_end is not None else out
    k_p2 = triton.next_power_of_2(k_sel)
    fast = TOPK_FAST and _TOPK_SORT
    cap = _topk_cap(k_p2)
    sample = _topk_sample(s_k, k_sel)
    # Fast-path scratch: CAP int32 candidate positions per row (bounded: CAP <= TOPK_CAP_MAX,
    # 2 * next_pow2(k) by default, i.e. about twice the output's size; 64 MB at 4096 rows and
    # k 2048). Never read past what the same program wrote.
    buf = torch.empty((s_q, cap), dtype=torch.int32, device=logits.device) if fast else out
    paths = out
    if _topk_paths is not None:  # tests / tuning: which rows took the fast path
        paths = torch.zeros(s_q, dtype=torch.int32, device=logits.device)
        _topk_paths.append(paths)
    _topk_kernel[(s_q,)](
        x, ks, ke, out, buf, paths, s_k, x.stride(0), out.stride(0), k_sel, k,
        HAS_START=k_start is not None, HAS_END=k_end is not None, BLOCK=TOPK_BLOCK,
        K_P2=k_p2, LOG_K=k_p2.bit_length() - 1, NBITS=TOPK_DIGIT_BITS, HIST_CMP=TOPK_HIST_CMP,
        SORT=_TOPK_SORT, FAST=fast, S=sample,
        OVER256=round(TOPK_OVERSAMPLE * 256), MARGIN=TOPK_SAMPLE_MARGIN, CAP=cap,
        LOG_CAP=cap.bit_length() - 1, RECORD=_topk_paths is not None, num_warps=TOPK_WARPS,
        **({} if TOPK_MAXNREG is None or k_p2 > TOPK_MAXNREG_UP_TO_K
           else {"maxnreg": TOPK_MAXNREG}))
    return out


def _topk_supports(logits, k, k_start=None, k_end=None) -> List[str]:
    if min(k, logits.shape[1]) > MAX_TOPK:
        return [f"k = {k} > {MAX_TOPK}: the selected entries are sorted in registers"]
    return []


register("indexer_quantize", indexer_quantize, _quantize_supports)
register("write_indexer_cache", write_indexer_cache, _write_supports)
register("indexer_logits", indexer_logits, _logits_supports)
register("indexer_logits_paged", indexer_logits_paged, _paged_supports)
register("indexer_topk", indexer_topk, _topk_supports)

from . import _indexer_train  # noqa: E402,F401  (registers the training ops)
