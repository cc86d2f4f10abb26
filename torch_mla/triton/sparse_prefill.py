"""Triton ``mla::sparse_prefill`` (forward) and ``mla::sparse_prefill_backward``.

Semantics are the reference's (torch_mla/reference/sparse_prefill.py): query i, head h attends to
the rows ``indices[i, h // g, :topk_length[i]]`` of ``kv[:, h // g]`` (g = h_q / h_kv); an index
< 0 or >= s_kv, or at a position >= topk_length[i], is skipped and its row is never read (every
gather is a masked load, so NaN in unused kv rows cannot leak); a duplicated index counts once per
occurrence; a query with no valid key gets out 0, max_logits -inf, lse +inf; a sink scales out by
sigmoid(lse - sink).

Forward. One program per (query, block of ``BLOCK_H`` <= 64 heads of one kv head); the grid puts
the head blocks of one query side by side so they gather the same rows while those sit in L2.
The Q tile [BLOCK_H, d_v] and its tail [BLOCK_H, d_qk - d_v] (the RoPE columns: 576 = 512 + 64 is
not a power of two, so the tail is a second, small dot) stay on chip for the whole loop. Per block
of ``BLOCK_N`` top-k positions: load the indices, gather the K rows [BLOCK_N, d_v] (+ tail) once
and use the same tile as V (V = K[:, :d_v]); S = Q K^T (+ tail) in fp32; online softmax in the
log2 domain with sm_scale * log2(e) folded into one multiply; acc [BLOCK_H, d_v] fp32 += P V.
The loop stops at min(topk, topk_length[i]), so short queries cost only their length. Two
kernels do this: _fwd_split_kernel (the default, ``FWD_VARIANT`` a dict; below) and the first
one, _fwd_kernel (``FWD_VARIANT = None``).

Backward. One program per (query, head block) again. Before the loop it reads dout, out, lse,
dlse (and the sink) of its heads and forms, per head row,
    f = sigmoid(lse - sink) (1 without a sink),  D = sum(dout * out)  (out includes f),
so that, with O_raw = out / f never formed (f may be 0):
    dS_j = P_j * (f * (dout . v_j - D) + dlse)      [the reference's formula with D = f * dL/df]
    dq = scale * sum_j dS_j k_j,   dk_j += scale * dS_j q,   dv_j += f * P_j * dout,
    d_sink[h] = -sum_i D * (1 - f).
P is recomputed from the saved lse (exp2 of the log2-domain logits minus lse * log2(e)), and D
comes from the saved out (rounded to q's dtype, as in FlashAttention; the reference instead
recomputes O_raw in fp32): results agree with it to ~0.2-0.6% relative (bf16). dq
accumulates in registers. dK/dV rows go to an fp32 [s_kv, h_kv, d_qk] buffer through relaxed
``tl.atomic_add`` (masked to valid entries, so duplicated indices and indices shared by several
queries add up), cast to kv's dtype at the end; two ways (``BWD_MODE``):
  * "two_phase" (the default; groups of up to 128 heads per kv head): the kernel above, 64 heads
    per program on 4 warps, computes P and dS only and writes the scaled dS and f * P of each
    block ([query, kv head, key position, head] in q's dtype, the values the GEMMs after it
    would use) to a scratch buffer; then ``_bwd_dkv_kernel``, one program per (query, kv head,
    128 columns of d_qk; the 64 RoPE columns in a second launch), keeps those columns of q and
    dout on chip, gathers those columns of the selected keys, and forms both
    dkv[idx_j] += dS^T q + (fP)^T dout (summed over all heads of the group on chip: one atomic
    per (query, key, column)) and dq[:, cols] = dS K[:, cols]. Queries run in chunks so that the
    scratch stays under 512 MiB (1 MiB per query at h_q 128, topk 2048).
  * "fused": each program (32 heads) also computes its heads' dK/dV partial and adds it
    atomically: one atomic per (query, key, column) per head block. For larger groups.
A head row whose lse is +inf (no valid key) gets no gradient, whatever its dlse holds (even inf
or NaN), as in the reference. d_sink partials are written per (query, head) and summed over
queries by torch (deterministic).

Roof at the production shape (H100 SXM: 989 dense bf16 TFLOPS by datasheet, ~800 measured for a
large cuBLAS GEMM; 3.35 TB/s HBM, L2 50 MB), s_q 4096, h_q 128, h_kv 1, d_qk 576, d_v 512,
topk 2048, s_kv 8192, bf16:
  forward FLOPs (FlashMLA's count) 2 * s_q * h_q * topk * (d_qk + d_v) = 2.34 TFLOP
      -> 2.4 ms at 989 TFLOPS; minimal bytes: q 604 MB + kv 9.4 MB + indices 34 MB + out 537 MB
      ~= 1.18 GB -> 0.35 ms at 3.35 TB/s. Compute bound (~2000 FLOP/B, ridge ~300).
      The gathers re-read kv rows from L2: 2 head blocks x s_q x topk x 1152 B = 19.3 GB of L2
      reads, i.e. 2.3 TB/s at the 280 TFLOPS target (8.4 ms): within L2 bandwidth, not HBM's.
  backward FLOPs counted as 2.5x forward (5 GEMMs of the shapes of the forward's 2: QK^T,
      dO V^T, dS K, dS^T Q, P^T dO) = 5.85 TFLOP -> 5.9 ms at 989; minimal bytes ~2.4 GB
      (q, dout, out, dq, kv, dkv) -> 0.7 ms: compute bound. The two-phase dK/dV atomics add
      s_q x topk x 576 fp32 = 19.3 GB of L2 reductions (the fp32 dkv buffer, 19 MB, stays in
      L2 at s_kv 8192; 75 MB at the benchmark's 32768 does not), and the scratch adds 2 x 1 GB
      of dS / fP writes and reads.

Measured (H100 80GB HBM3, torch 2.11, triton 3.6; one randperm row set per query, no sink /
topk_length; triton.testing.do_bench median), against the targets of 280 / 200:
  forward  (2026-11-25, tools/diag_sparse_prefill.py --time-fwd, s_kv 32768) the default
           split-scores kernel 7.23 ms = 323 TFLOPS at d_qk 576, 6.74 ms = 326 TFLOPS at 512
           (FlashMLA on the same inputs 4.15 / 4.02 ms = 563 / 547 TFLOPS: 0.57 / 0.60x); the
           first kernel (_fwd_kernel) 13.3 / 12.0 ms = 176 / 183 TFLOPS; the other variants in
           the split-scores section below.
  backward (2026-11-25, tools/diag_sparse_prefill.py --time; FLOPs counted as 2.5x forward):
           two-phase, as configured below: 27.4 ms = 213 TFLOPS at s_kv 8192 (first phase alone
           9.0 ms); 33.4 ms = 175 TFLOPS at the benchmark's s_kv 32768 (first phase 11.1 ms),
           33.3 ms = 177 TFLOPS in the benchmark itself (CUDA-graph replay). The second phase is
           the larger part: atomics and the per-column-chunk re-reads of dS / fP and K; at
           32768 its fp32 dkv buffer (75 MB) no longer fits in L2, but that is not what costs
           the extra time: second-phase launches of 256 or 128 value columns each (atomics'
           working set 38 / 19 MB, dS / fP read again per launch) took 32.9 / 33.6 ms.
           Steps that got there, at s_kv 8192: the fused kernel (32 heads, Triton's default
           acq_rel atomics) 161 ms; relaxed atomics 59.1 ms; two phases with dq in the first
           (64 heads, 8 warps) 35.4 ms, BLOCK_N 64 there 30.3 ms; dq moved to the second
           phase, which lets the first run on 4 warps without a [64, 576] accumulator (9.5 ms
           instead of 19.2; with 8 warps both warpgroups computed the same 64-row products),
           and 128-column chunks on 8 warps in the second: 27.9 ms; index prefetch in the
           first: 27.4 ms. Slower: 64-column chunks with dq in the second phase (34.5 ms), 32
           or 128 keys per block (33.6 / 29.3 ms), 1 stage (29.6 ms). The fused kernel
           (groups over 128) with relaxed atomics: 59.1 ms.
           The 64-head fused form with dK/dV computed transposed was built wrongly by Triton 3.6
           (compute-sanitizer: "Invalid __shared__ read of size 1024 bytes" in the transposed
           dot), hence 32 heads there; the two-phase kernels are sanitizer-clean.
What limits them, as far as the compiler reports go: with 64 heads per program the fp32
accumulator [64, 512] alone takes 128 of the 255 registers of each of 256 threads. The default
forward (split scores, BLOCK_N 64, 2 stages, row sums per block) uses 216 KB of shared memory at
d_qk 576 (200 KB at 512; one program per SM), 255 registers and 6-8 spilled words a thread at
576 (0 at 512), all its dots warps [4, 2] (each warp group a 64 x 32 half of the scores,
instrShape [16, 32, 16]; the PV dots [16, 128, 16] from registers); a third stage or wider
blocks do not fit in 227 KB. _fwd_kernel kept BLOCK_N at 32 (its QK^T wgmma then only 16 keys
wide per warp group, and computed twice, see below). Triton does not overlap the softmax of one
block with the GEMMs of the next (no warp specialisation on Hopper in 3.6). The backward's first phase is the forward's two GEMMs (QK^T, dO V^T) with no accumulator;
its second phase reads 1 MiB of dS and fP per query once per 128-column program (mostly from
L2), gathers the keys again (per column chunk), and sends s_q x topk x 576 fp32 values to the
atomics (19.3 GB at s_q 4096, topk 2048). Not tried on a GPU: covering d_qk 576 in one
second-phase launch (4 programs of 128 value + 16 RoPE columns, or 3 of 128 + 64) instead of 4
programs of 128 and a launch for the 64 RoPE columns; Triton 3.6 compiled the two with 22 / 54
spilled registers a thread (written and checked on the CPU, then dropped untimed).
Duplicated dots in the backward (tools/triton_compile_check.py --dots, Triton 3.6): the first
phase on its 4 warps has all dots [4, 1] (no duplication, but one warp group per SM: 208 KB of
shared memory at d_qk 576, 255 registers, 14-26 spilled words); the second phase's dS^T q
(64 keys x 128 columns x 128 heads) feeds (fP)^T dout as its accumulator and gets [8, 1] on 8
warps: both warp groups compute it, then a layout conversion through shared memory to the second
dot's [4, 2] (its dq dot, 128 x 128 x 64, is [8, 1] with 128 rows: not duplicated; the RoPE pass
has no chained dot). Candidates built against that (BWD_DS_SPLIT, BWD_DKV_SPLIT,
BWD_DKV_PREFETCH_IDX; the last two now on by default), compile check at d_qk 576, h_q 128 (h_q
64 with sink + lengths, and d_qk 512, in brackets where they differ), shared KB, registers,
spilled words:
    (diag name)          first phase                     second phase (128 value columns)
    dq2 (old default)    w4 n64 s1 208  255  14 [26]     w8 n64 s2 192  224 [178, 227]  0
    p2split              as dq2                          192  179 [149, 191]  0, all [4, 2]
    p2split_pf           as dq2                          192  181 [146, 197]  0
    p1split_w8           w8 n64 s1 208  221 [235, 214] 0 as dq2; first phase all [4, 2]
    split_both           p1split_w8 + p2split_pf
    split_both_p1n32s2   w8 n32 s2 172 [160 at 512] 174 [179, 162] 0, + p2split_pf
    split_both_p2s1      split_both, second phase 1 stage: 96 KB, 223 [161, 232] registers
(the second phase's registers, 180-230 on 256 threads, keep it at one program per SM even where
its shared memory would allow two). ``tools/diag_sparse_prefill.py --time-bwd`` checks and
times them. H100, 2026-11-25 (Triton 3.6, torch 2.11; s_q 4096, h_q 128, d_qk 576, d_v 512,
topk 2048; do_bench median; each checked against the reference at s_q 64 with sinks, lengths,
invalid and duplicated indices and random dlse, and against dq2 at the full shape), ms and
TFLOPS (2.5x the forward's FLOPs), s_kv 32768 / 8192:
    dq2 (the default before)   33.34 175.2 / 27.46 212.7    (first phase 11.08 / 9.04 ms)
    p2split                    29.54 197.7 / 23.39 249.8
    p2split_pf (the default)   29.25 199.7 / 23.09 253.0    (a second run: 29.22 ms, 199.9)
    p1split_w8                 33.39 174.9 / 27.99 208.7
    split_both                 29.27 199.6 / 23.57 247.8
    split_both_p1n32s2         32.97 177.2 / 26.72 218.6    (first phase 14.81 / 12.68 ms)
    split_both_p2s1            34.09 171.3 / 26.40 221.3
and, around p2split_pf's second phase (s_kv 32768 only): 256 columns in one stage 36.91 ms,
32 keys 34.56, 128 keys in one stage 36.69, 64 columns on 4 warps 36.25 (3 stages of 128
columns exceed shared memory at h_q 128). So the backward is at 199.7-199.9 TFLOPS on the
benchmark's shape (target 200): the first phase (11.1 ms) is the next thing to take on.

The split-scores forward (``FWD_VARIANT`` a dict, ``_fwd_split_kernel``; the default since its
H100 timing below). In _fwd_kernel the QK^T dots feed the PV dot (through P), and Triton 3.6 lays
out such a dot with all warps along M: TTGIR (tools/triton_compile_check.py --dots) shows the
score dots with warpsPerCTA [8, 1] (64 x 32 with 8 warps: both warp groups compute the same
scores, i.e. the QK work, 53% of the FLOPs at d_qk 576, is done twice) and the PV dot [4, 2].
The variant computes each score dot from zero behind an always-true branch (_jit.mm0; the trick of
sparse_decode's split variant), so the scores get [4, 2] (each warp group half of the keys) and
P reaches the PV dots through shared memory; with ``split_v`` the values are two 256-column
halves (two gathers, two [64, 256] accumulators), with ``defer_sum`` the row sums of P are kept
per thread and reduced once, with ``tau`` the rescale is lazy (see _fwd_split_kernel). Compile
check (Triton 3.6, sm_90, 64 heads a program; h_q 64 and 128 compile identically), d_qk 576 /
d_qk 512 with sink + lengths: shared memory in KB, registers, spilled words a thread; then the
H100 timing (2026-11-25, tools/diag_sparse_prefill.py --time-fwd: s_q 4096, h_q 128, h_kv 1,
d_v 512, topk 2048, s_kv 32768, one randperm row set per query, no sink / lengths; do_bench
median; each checked against the reference on the first 1024 queries and a corner case with
sinks, lengths, invalid and duplicated indices), TFLOPS at d_qk 576 / 512 (name in
FWD_CANDIDATES):
                                                                        TFLOPS 576 / 512
    _fwd_kernel n32 s2 ("fwd_kernel") 144 / 128  255 / 255   0 / 0     176.2 / 182.6
    split {} (n32 s2)                 144 / 132  254 / 255   0 / 4     191.7 / 197.1
    split_v off                       144 / 132  254 / 255   0 / 8       -
    defer_sum off ("split_sum")       144 / 132  255 / 255   8 / 0     222.0 / 230.7
    num_stages 3 ("split_s3")         180 / 164  255 / 255   0 / 6     225.9 / 234.1
    block_n 64, num_stages 1          144 / 136  255 / 255   28 / 20   240.6 / 284.3
    block_n 64, num_stages 2          216 / 200  255 / 255   10 / 6    274.7 / 285.7
    block_n 64, defer_sum off         216 / 200  255 / 255   6 / 0     323.1 / 326.1  DEFAULT
      ("split_n64_sum": 7232 / 6744 us)
    block_n 64, split_v off           216 / 200  255 / 255   44 / 48     -
    tau 8 (n32) ("split_lazy")        144 / 132  255 / 255   20 / 16   204.3 / 211.8
    tau 8, block_n 64                 216 / 200  255 / 255   78 / 54   242.3 / 265.8
    FlashMLA flash_mla_sparse_fwd, same inputs                          563.0 / 546.9
With BLOCK_N 32 each warp group's score wgmma is 16 keys wide (instrShape [16, 16, 16]) and
re-reads all of Q from shared memory; BLOCK_N 64 doubles that width. Keeping per-thread sums
(defer_sum) costs a [64, 64] fp32 tile of registers at BLOCK_N 64: the per-block row sums were
faster at both widths. The lazy rescale (tau 8) gained at BLOCK_N 32 (204 vs 192 TFLOPS at
576) and lost at 64 (242 vs 275; 78 spilled words). The "small" head blocks (fewer
than 64 heads, or d_v <= 128) run the same kernel with FWD_CONFIG["small"] (4 warps, MMA v2 on
Hopper; not timed). The named candidates are
tools/diag_sparse_prefill.py's FWD_CANDIDATES; ``--time-fwd`` checks and times them.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import DOT_F32, alert_not_deterministic
from . import register
from ._jit import LOG2E, mm as _mm, mm0, pow2 as _pow2


# Launch configurations, keyed by head-block size ("big": a full head block, 64 heads forward /
# BWD_MAX_BLOCK_H backward, and d_v > 128, the DeepSeek shapes; "small": the rest). Entries:
# (BLOCK_N, num_warps, num_stages). FWD_CONFIG["big"] is _fwd_kernel's (FWD_VARIANT None); the
# split-scores kernel takes its "big" configuration from FWD_VARIANT, its "small" one from here. Module globals so a benchmark can try others. Measured on
# H100 (triton 3.6), production shape, see the docstring:
#   forward  (32, 8, 2) 12.9 ms; + index prefetch 12.05 ms (best); (32, 8, 3) 13.1; (64, 8, 1)
#            12.7 with 116 spilled registers; (32, 8, 1) 16.1; (16, 8, 3) 20.7; 16 warps 29-61 ms
#            (128-register cap, spills); (64, 8, 2) needs 312 KB of shared memory (limit 227 KB).
#   backward (fused mode), 32 heads per program, plain dK/dV (the only form Triton 3.6 builds
#            correctly, see the docstring), acq_rel atomics: (32, 8, 2) 161 ms; (32, 8, 1) 166
#            ms; (16, 8, 2) 188 ms; relaxed atomics (32, 8, 2) 59 ms. Two-phase: see BWD_MODE.
FWD_CONFIG: Dict[str, Tuple[int, int, int]] = {"big": (32, 8, 2), "small": (32, 4, 2)}
BWD_CONFIG: Dict[str, Tuple[int, int, int]] = {"big": (32, 8, 2), "small": (16, 4, 1)}
# Backward: compute the dK/dV rows transposed ([d, BLOCK_N], so the GEMM's M is d rather than
# BLOCK_N, which is < 64) when True. False is the plain [BLOCK_N, d] form. Off: at 64 heads per
# program Triton 3.6 built the transposed form reading shared memory out of bounds (H100,
# compute-sanitizer, 2026-11-25).
BWD_DK_TRANSPOSED = False
# Most heads per program of the fused backward.
BWD_MAX_BLOCK_H = 32
# "two_phase": dS / f*P to a scratch buffer, then dK/dV (reduced over the heads on chip) and dq
# (_backward_two_phase; groups of up to BWD_MAX_G heads per kv head); "fused": one kernel, dq
# and one atomic dK/dV partial per head block (any group).
BWD_MODE = "two_phase"
BWD_MAX_G = 128
BWD_SCRATCH_BYTES = 512 << 20
# first phase: most heads per program, and (BLOCK_N, num_warps, num_stages). Timings of the
# alternatives are in the module docstring.
BWD_DS_MAX_BLOCK_H = 64
BWD_DS_CONFIG: Dict[str, Tuple[int, int, int]] = {"big": (64, 4, 1), "small": (16, 4, 1)}
# second phase: (BLOCK_N keys, DC columns, num_warps, num_stages)
BWD_DKV_CONFIG: Dict[str, Tuple[int, int, int, int]] = {"big": (64, 128, 8, 2),
                                                        "small": (16, 64, 4, 1)}
# dq in the second phase (dS K per column chunk, keys gathered there) instead of the first:
# 27.9 vs 30.3 ms on the H100 (the first phase then needs no [64, d_qk] accumulator).
BWD_DQ_IN_PHASE2 = True
# Split dots (the duplicated-dot fix of the forward's mm0): Triton 3.6 lays out a dot whose result
# reaches another dot with all warps along M, so at M = 64 on 8 warps both warp groups compute
# the same product. First phase (BWD_DS_SPLIT): the score dots (QK^T, its RoPE tail, dO V^T)
# from zero behind always-true branches, so that 8 warps split the keys ([4, 2]) instead of
# repeating them; only with BWD_DS_CONFIG's num_warps 8 does it change the layout. Second phase
# (BWD_DKV_SPLIT): dS^T q, whose result is the accumulator of (fP)^T dout, likewise (TTGIR: it
# was warps [8, 1] on 8 warps, 64 keys: done twice, then converted through shared memory to the
# second dot's [4, 2]). BWD_DKV_PREFETCH_IDX: the second phase reads each block's indices one
# iteration ahead, as the first phase does. The second phase's two are on (H100 timings in the
# module docstring: 33.3 -> 29.2 ms at s_kv 32768); the first phase's split is not (no gain).
BWD_DS_SPLIT = False
BWD_DKV_SPLIT = True
BWD_DKV_PREFETCH_IDX = True
# The dK/dV partial sums are read only after the kernel ends: no ordering is needed between the
# atomics ("relaxed"; Triton's default is "acq_rel").
BWD_ATOMIC_SEM = "relaxed"

# Read each block's indices one loop iteration ahead. Forward: +7% on H100, results checked
# there. Backward: off, because the one H100 run with it on (fused kernel, (32, 8, 1), transposed
# dK) ended in an illegal memory access whose cause is not found (the interpreter finds it
# correct; the same kernel without the prefetch ran and matched the reference).
PREFETCH_IDX = True
BWD_PREFETCH_IDX = False  # the fused backward kernel
BWD_DS_PREFETCH_IDX = True  # the two-phase backward's first phase (9.05 vs 9.47 ms on the H100)

# Which forward kernel runs (read per call). A dict: _fwd_split_kernel (the scores as dots from
# zero behind a branch, each warp group half of the keys; see _jit.mm0), its keys overriding
# FWD_SPLIT_DEFAULTS:
#   split_s    the score dots behind branches (False: plain dots from zero, laid out as chained)
#   split_v    the values (and Q's first d_v columns) as two halves: two accumulators
#   defer_sum  per-thread running sums of P, one row sum after the loop
#   tau        > 0: lazy rescaling, the softmax shift moves only when a row's max grows by more
#              than tau (log2 units; P <= 2**tau); 0: every block (see _fwd_split_kernel)
#   block_n, num_warps, num_stages   for the "big" head blocks (64 heads, d_v > 128); the
#              "small" ones keep FWD_CONFIG["small"]
# None: the first kernel, _fwd_kernel with FWD_CONFIG (the scores' dots chained into the PV dot,
# so at 64 heads on 8 warps both warp groups compute the same scores).
# The default is the fastest candidate timed on the H100 (diag_sparse_prefill's "split_n64_sum":
# 64 keys a block, row sums per block; 323 / 326 TFLOPS at d_qk 576 / 512, see the docstring).
# TORCH_MLA_SPARSE_PREFILL_FWD_VARIANT (JSON, read at import) sets it for a whole process, e.g.
# '{}' (the split defaults) or '{"block_n": 64, "num_stages": 1}'; "none" / "null" selects
# _fwd_kernel, "default" keeps FWD_VARIANT_DEFAULT.
FWD_SPLIT_DEFAULTS = dict(split_s=True, split_v=True, defer_sum=True, tau=0.0, block_n=32,
                          num_warps=8, num_stages=2)
FWD_VARIANT_DEFAULT = {"block_n": 64, "defer_sum": False}
FWD_VARIANT: Optional[dict] = dict(FWD_VARIANT_DEFAULT)
_env_variant = os.environ.get("TORCH_MLA_SPARSE_PREFILL_FWD_VARIANT", "").strip()
if _env_variant and _env_variant.lower() != "default":
    FWD_VARIANT = None if _env_variant.lower() in ("none", "null") else json.loads(_env_variant)

MAX_D_V = 512
MAX_D_TAIL = 128




@triton.jit
def _load_rows(base, rows_ok, offs, D: tl.constexpr, BLOCK: tl.constexpr):
    """[len(rows_ok), BLOCK] tile of ``base[:, offs]``; rows not ok and columns >= D read as 0
    and are never touched. The column mask is only built when BLOCK pads D (constexpr), so the
    production tiles keep plain row masks."""
    if BLOCK == D:
        return tl.load(base + offs[None, :], mask=rows_ok[:, None], other=0.0)
    else:
        return tl.load(base + offs[None, :], mask=rows_ok[:, None] & (offs[None, :] < D), other=0.0)


@triton.jit
def _fwd_kernel(
    Q, KV, IDX, LENS, SINK, OUT, ML, LSE,
    stride_qs, stride_qh, stride_kvs, stride_kvh, stride_is, stride_ih,
    stride_os, stride_oh, stride_ls,
    s_kv, topk, group, scale_log2,
    D_V: tl.constexpr, D_T: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DT: tl.constexpr,
    HAS_TAIL: tl.constexpr, HAS_LEN: tl.constexpr, HAS_SINK: tl.constexpr,
    PREFETCH_IDX: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_h = tl.program_id(0)
    pid_s = tl.program_id(1).to(tl.int64)
    n_hblk = tl.cdiv(group, BLOCK_H)
    kvh = pid_h // n_hblk
    offs_g = (pid_h % n_hblk) * BLOCK_H + tl.arange(0, BLOCK_H)  # head within its kv group
    hmask = offs_g < group
    head = kvh * group + offs_g
    offs_v = tl.arange(0, BLOCK_DV)
    offs_t = tl.arange(0, BLOCK_DT)
    offs_n = tl.arange(0, BLOCK_N)

    q_rows = Q + pid_s * stride_qs + head[:, None] * stride_qh
    q = _load_rows(q_rows, hmask, offs_v, D_V, BLOCK_DV)
    if HAS_TAIL:
        qt = _load_rows(q_rows + D_V, hmask, offs_t, D_T, BLOCK_DT)

    n_keys = topk
    if HAS_LEN:
        n_keys = tl.maximum(tl.minimum(tl.load(LENS + pid_s), topk), 0)
    idx_row = IDX + pid_s * stride_is + kvh * stride_ih
    kv_head = KV + kvh * stride_kvh

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    if PREFETCH_IDX:
        idx_next = tl.load(idx_row + offs_n, mask=offs_n < n_keys, other=-1)
    for start in range(0, n_keys, BLOCK_N):
        pos = start + offs_n
        in_len = pos < n_keys
        if PREFETCH_IDX:
            # The next block's indices are read one iteration ahead, so this block's row gather
            # depends on no load of its own iteration and the pipeliner can issue it early.
            idx = idx_next
            idx_next = tl.load(idx_row + pos + BLOCK_N, mask=pos + BLOCK_N < n_keys, other=-1)
        else:
            idx = tl.load(idx_row + pos, mask=in_len, other=-1)
        valid = in_len & (idx >= 0) & (idx < s_kv)
        k_rows = kv_head + idx.to(tl.int64)[:, None] * stride_kvs
        k = _load_rows(k_rows, valid, offs_v, D_V, BLOCK_DV)  # [BLOCK_N, BLOCK_DV], also V
        s = _mm(q, tl.trans(k), tl.zeros([BLOCK_H, BLOCK_N], tl.float32), DOT_F32)
        if HAS_TAIL:
            kt = _load_rows(k_rows + D_V, valid, offs_t, D_T, BLOCK_DT)
            s = _mm(qt, tl.trans(kt), s, DOT_F32)
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen no valid key keep m = -inf: subtract 0 there instead, so that
        # exp2(-inf - -inf) = NaN never happens (their p and alpha are 0 / irrelevant).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _mm(p.to(k.dtype), k, acc * alpha[:, None], DOT_F32)
        m_i = m_new

    has_key = l_i > 0.0  # the max key alone contributes exp2(0) = 1
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("inf"))
    if HAS_SINK:
        sink = tl.load(SINK + head, mask=hmask, other=0.0).to(tl.float32)
        # sigmoid(lse - sink) = 1 / (1 + exp(sink - lse)): sink +inf -> 0, -inf -> 1, never NaN.
        # Rows with no key use lse 0 (their out is 0 anyway) to keep inf - inf out.
        lse_f = tl.where(has_key, lse, 0.0)
        out = out / (1.0 + tl.exp2((sink - lse_f) * 1.4426950408889634))[:, None]
    o_rows = OUT + pid_s * stride_os + head[:, None] * stride_oh + offs_v[None, :]
    if BLOCK_DV == D_V:
        tl.store(o_rows, out.to(OUT.dtype.element_ty), mask=hmask[:, None])
    else:
        tl.store(o_rows, out.to(OUT.dtype.element_ty),
                 mask=hmask[:, None] & (offs_v[None, :] < D_V))
    tl.store(ML + pid_s * stride_ls + head, m_i * 0.6931471805599453, mask=hmask)
    tl.store(LSE + pid_s * stride_ls + head, lse, mask=hmask)


# ---------------------------------------------------------------------------------------------
# the split-scores forward (FWD_VARIANT a dict; see FWD_VARIANT below)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _load_cols(base, rows_ok, C0: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    """[len(rows_ok), BLOCK] tile of ``base[:, C0:C0 + BLOCK]``; rows not ok and columns >= D
    read as 0 and are never touched (the column mask only where the tile passes D)."""
    offs = C0 + tl.arange(0, BLOCK)
    if C0 + BLOCK <= D:
        return tl.load(base + offs[None, :], mask=rows_ok[:, None], other=0.0)
    else:
        return tl.load(base + offs[None, :], mask=rows_ok[:, None] & (offs[None, :] < D),
                       other=0.0)


@triton.jit
def _store_cols(base, x, rows_ok, C0: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    offs = C0 + tl.arange(0, BLOCK)
    if C0 + BLOCK <= D:
        tl.store(base + offs[None, :], x, mask=rows_ok[:, None])
    else:
        tl.store(base + offs[None, :], x, mask=rows_ok[:, None] & (offs[None, :] < D))


@triton.jit
def _fwd_split_kernel(
    Q, KV, IDX, LENS, SINK, OUT, ML, LSE,
    stride_qs, stride_qh, stride_kvs, stride_kvh, stride_is, stride_ih,
    stride_os, stride_oh, stride_ls,
    s_kv, topk, group, scale_log2,
    D_V: tl.constexpr, D_T: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DT: tl.constexpr,
    HAS_TAIL: tl.constexpr, HAS_LEN: tl.constexpr, HAS_SINK: tl.constexpr,
    PREFETCH_IDX: tl.constexpr, SPLIT_S: tl.constexpr, SPLIT_V: tl.constexpr,
    DEFER_SUM: tl.constexpr, TAU: tl.constexpr, DOT_F32: tl.constexpr,
):
    """_fwd_kernel with the scores computed as independent dots from zero (_jit.mm0) and, with
    SPLIT_V, the values in two halves of BLOCK_DV / 2 columns (two gathers, two score dots, two
    PV dots, two accumulators). With DEFER_SUM, l is [BLOCK_H, BLOCK_N]: per-thread running sums
    of P, reduced over the keys once after the loop (a per-block row sum would cross the two
    warp groups, each holding half of a row's keys).

    TAU > 0: lazy rescaling. The running max m_i (the shift of the exponentials) moves only when
    some row's block max exceeds it by more than TAU (log2 units; one decision for the whole
    program), so most blocks skip the rescale of the accumulators (128 multiplies a thread at
    64 heads on 8 warps); P is then at most 2**TAU, out = acc / l and lse = m_i + log2(l) stay
    exact, and max_logits comes from a separate true running max."""
    HALF: tl.constexpr = BLOCK_DV // 2
    pid_h = tl.program_id(0)
    pid_s = tl.program_id(1).to(tl.int64)
    n_hblk = tl.cdiv(group, BLOCK_H)
    kvh = pid_h // n_hblk
    offs_g = (pid_h % n_hblk) * BLOCK_H + tl.arange(0, BLOCK_H)  # head within its kv group
    hmask = offs_g < group
    head = kvh * group + offs_g
    offs_n = tl.arange(0, BLOCK_N)

    q_rows = Q + pid_s * stride_qs + head[:, None] * stride_qh
    if SPLIT_V:
        q_a = _load_cols(q_rows, hmask, 0, D_V, HALF)
        q_b = _load_cols(q_rows, hmask, HALF, D_V, HALF)
    else:
        q_a = _load_cols(q_rows, hmask, 0, D_V, BLOCK_DV)
    if HAS_TAIL:
        qt = _load_cols(q_rows + D_V, hmask, 0, D_T, BLOCK_DT)

    n_keys = topk
    if HAS_LEN:
        n_keys = tl.maximum(tl.minimum(tl.load(LENS + pid_s), topk), 0)
    gate = n_keys > 0  # true in every iteration of the loop (see _jit.mm0)
    idx_row = IDX + pid_s * stride_is + kvh * stride_ih
    kv_head = KV + kvh * stride_kvh

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    if TAU > 0:
        m_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
    if DEFER_SUM:
        l_i = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
    else:
        l_i = tl.zeros([BLOCK_H], tl.float32)
    if SPLIT_V:
        acc_a = tl.zeros([BLOCK_H, HALF], tl.float32)
        acc_b = tl.zeros([BLOCK_H, HALF], tl.float32)
    else:
        acc_a = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    if PREFETCH_IDX:
        idx_next = tl.load(idx_row + offs_n, mask=offs_n < n_keys, other=-1)
    for start in range(0, n_keys, BLOCK_N):
        pos = start + offs_n
        in_len = pos < n_keys
        if PREFETCH_IDX:
            idx = idx_next
            idx_next = tl.load(idx_row + pos + BLOCK_N, mask=pos + BLOCK_N < n_keys, other=-1)
        else:
            idx = tl.load(idx_row + pos, mask=in_len, other=-1)
        valid = in_len & (idx >= 0) & (idx < s_kv)
        k_rows = kv_head + idx.to(tl.int64)[:, None] * stride_kvs
        if SPLIT_V:
            k_a = _load_cols(k_rows, valid, 0, D_V, HALF)  # also the values
            k_b = _load_cols(k_rows, valid, HALF, D_V, HALF)
            s = mm0(q_a, k_a, gate, BLOCK_H, BLOCK_N, SPLIT_S, DOT_F32, TRANS_B=True)
            s += mm0(q_b, k_b, gate, BLOCK_H, BLOCK_N, SPLIT_S, DOT_F32, TRANS_B=True)
        else:
            k_a = _load_cols(k_rows, valid, 0, D_V, BLOCK_DV)
            s = mm0(q_a, k_a, gate, BLOCK_H, BLOCK_N, SPLIT_S, DOT_F32, TRANS_B=True)
        if HAS_TAIL:
            kt = _load_cols(k_rows + D_V, valid, 0, D_T, BLOCK_DT)
            s += mm0(qt, kt, gate, BLOCK_H, BLOCK_N, SPLIT_S, DOT_F32, TRANS_B=True)
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_blk = tl.max(s, 1)
        m_new = tl.maximum(m_i, m_blk)
        if TAU > 0:
            m_max = tl.maximum(m_max, m_blk)
            # how far each row's max moved (from -inf to a first valid key: ~3e38, a rescale;
            # the finite floor keeps -inf - -inf = NaN out)
            grow = m_new - tl.maximum(m_i, -3.0e38)
            if tl.max(grow, 0) > TAU:
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_use)
                if DEFER_SUM:
                    l_i = l_i * alpha[:, None]
                else:
                    l_i = l_i * alpha
                acc_a = acc_a * alpha[:, None]
                if SPLIT_V:
                    acc_b = acc_b * alpha[:, None]
                m_i = m_new
            m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
            p = tl.exp2(s - m_use[:, None])
            if DEFER_SUM:
                l_i = l_i + p
            else:
                l_i = l_i + tl.sum(p, 1)
            pb = p.to(k_a.dtype)
            acc_a = _mm(pb, k_a, acc_a, DOT_F32)
            if SPLIT_V:
                acc_b = _mm(pb, k_b, acc_b, DOT_F32)
        else:
            # Rows that have seen no valid key keep m = -inf: shift by 0 there (see
            # _fwd_kernel).
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            if DEFER_SUM:
                l_i = l_i * alpha[:, None] + p
            else:
                l_i = l_i * alpha + tl.sum(p, 1)
            pb = p.to(k_a.dtype)
            acc_a = _mm(pb, k_a, acc_a * alpha[:, None], DOT_F32)
            if SPLIT_V:
                acc_b = _mm(pb, k_b, acc_b * alpha[:, None], DOT_F32)
            m_i = m_new

    if DEFER_SUM:
        l_i = tl.sum(l_i, 1)
    has_key = l_i > 0.0  # the max key alone contributes exp2(0) = 1
    l_safe = tl.where(has_key, l_i, 1.0)
    inv = 1.0 / l_safe
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("inf"))
    if HAS_SINK:
        sink = tl.load(SINK + head, mask=hmask, other=0.0).to(tl.float32)
        # sigmoid(lse - sink), rows with no key at lse 0 (see _fwd_kernel)
        lse_f = tl.where(has_key, lse, 0.0)
        inv = inv / (1.0 + tl.exp2((sink - lse_f) * 1.4426950408889634))
    o_rows = OUT + pid_s * stride_os + head[:, None] * stride_oh
    if SPLIT_V:
        _store_cols(o_rows, (acc_a * inv[:, None]).to(OUT.dtype.element_ty), hmask, 0, D_V, HALF)
        _store_cols(o_rows, (acc_b * inv[:, None]).to(OUT.dtype.element_ty), hmask, HALF, D_V,
                    HALF)
    else:
        _store_cols(o_rows, (acc_a * inv[:, None]).to(OUT.dtype.element_ty), hmask, 0, D_V,
                    BLOCK_DV)
    if TAU > 0:
        m_i = m_max
    tl.store(ML + pid_s * stride_ls + head, m_i * 0.6931471805599453, mask=hmask)
    tl.store(LSE + pid_s * stride_ls + head, lse, mask=hmask)


@triton.jit
def _bwd_kernel(
    Q, KV, IDX, LENS, SINK, DO, O, DLSE, LSE, DQ, DKV, DSINK, DS, PF,
    stride_qs, stride_qh, stride_kvs, stride_kvh, stride_is, stride_ih,
    stride_dos, stride_doh, stride_os, stride_oh, stride_dls, stride_dlh, stride_ls, stride_lh,
    stride_dqs, stride_dqh, stride_dkvs, stride_dkvh, stride_dss, stride_dsh,
    s_kv, topk, group, h_q, sm_scale, scale_log2,
    D_V: tl.constexpr, D_T: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DT: tl.constexpr,
    HAS_TAIL: tl.constexpr, HAS_LEN: tl.constexpr, HAS_SINK: tl.constexpr,
    DK_T: tl.constexpr, PREFETCH_IDX: tl.constexpr, STORE_DS: tl.constexpr, G: tl.constexpr,
    DO_DQ: tl.constexpr, SPLIT_S: tl.constexpr, ATOMIC_SEM: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_h = tl.program_id(0)
    pid_s = tl.program_id(1).to(tl.int64)
    n_hblk = tl.cdiv(group, BLOCK_H)
    kvh = pid_h // n_hblk
    offs_g = (pid_h % n_hblk) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = offs_g < group
    head = kvh * group + offs_g
    offs_v = tl.arange(0, BLOCK_DV)
    offs_t = tl.arange(0, BLOCK_DT)
    offs_n = tl.arange(0, BLOCK_N)

    q_rows = Q + pid_s * stride_qs + head[:, None] * stride_qh
    q = _load_rows(q_rows, hmask, offs_v, D_V, BLOCK_DV)
    if HAS_TAIL:
        qt = _load_rows(q_rows + D_V, hmask, offs_t, D_T, BLOCK_DT)
    do_rows = DO + pid_s * stride_dos + head[:, None] * stride_doh
    do = _load_rows(do_rows, hmask, offs_v, D_V, BLOCK_DV)
    o = _load_rows(O + pid_s * stride_os + head[:, None] * stride_oh, hmask, offs_v, D_V, BLOCK_DV)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # D = dout . out (out holds f)
    lse = tl.load(LSE + pid_s * stride_ls + head * stride_lh, mask=hmask, other=float("inf"))
    dl = tl.load(DLSE + pid_s * stride_dls + head * stride_dlh, mask=hmask, other=0.0)
    # lse = +inf marks a row with no valid key: it gets no gradient at all (dlse dropped too).
    row_ok = hmask & (lse < float("inf"))
    lse_ok = tl.where(row_ok, lse, 0.0)
    if HAS_SINK:
        sink = tl.load(SINK + head, mask=hmask, other=0.0).to(tl.float32)
        f = 1.0 / (1.0 + tl.exp2((sink - lse_ok) * 1.4426950408889634))
    else:
        f = tl.full([BLOCK_H], 1.0, tl.float32)
    f = tl.where(row_ok, f, 0.0)
    dl = tl.where(row_ok, dl, 0.0)
    delta = tl.where(row_ok, delta, 0.0)
    if HAS_SINK:
        # dL/dsink of this (query, head): -dL/df * f * (1 - f) = -D * (1 - f); summed by the host.
        tl.store(DSINK + pid_s * h_q + head, -delta * (1.0 - f), mask=hmask)
    lse2 = lse_ok * 1.4426950408889634

    n_keys = topk
    if HAS_LEN:
        n_keys = tl.maximum(tl.minimum(tl.load(LENS + pid_s), topk), 0)
    idx_row = IDX + pid_s * stride_is + kvh * stride_ih
    kv_head = KV + kvh * stride_kvh
    dkv_head = DKV + kvh * stride_dkvh
    gate = n_keys > 0  # true in every iteration of the loop (SPLIT_S, see _jit.mm0)

    if DO_DQ:  # else the second phase computes dq (BWD_DQ_IN_PHASE2)
        dq = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
        if HAS_TAIL:
            dqt = tl.zeros([BLOCK_H, BLOCK_DT], tl.float32)
    if PREFETCH_IDX:
        idx_next = tl.load(idx_row + offs_n, mask=offs_n < n_keys, other=-1)
    for start in range(0, n_keys, BLOCK_N):
        pos = start + offs_n
        in_len = pos < n_keys
        if PREFETCH_IDX:
            # The next block's indices are read one iteration ahead, so this block's row gather
            # depends on no load of its own iteration and the pipeliner can issue it early.
            idx = idx_next
            idx_next = tl.load(idx_row + pos + BLOCK_N, mask=pos + BLOCK_N < n_keys, other=-1)
        else:
            idx = tl.load(idx_row + pos, mask=in_len, other=-1)
        valid = in_len & (idx >= 0) & (idx < s_kv)
        idx64 = idx.to(tl.int64)
        k_rows = kv_head + idx64[:, None] * stride_kvs
        k = _load_rows(k_rows, valid, offs_v, D_V, BLOCK_DV)
        if SPLIT_S:
            s = mm0(q, k, gate, BLOCK_H, BLOCK_N, True, DOT_F32, TRANS_B=True)
            if HAS_TAIL:
                kt = _load_rows(k_rows + D_V, valid, offs_t, D_T, BLOCK_DT)
                s += mm0(qt, kt, gate, BLOCK_H, BLOCK_N, True, DOT_F32, TRANS_B=True)
        else:
            s = _mm(q, tl.trans(k), tl.zeros([BLOCK_H, BLOCK_N], tl.float32), DOT_F32)
            if HAS_TAIL:
                kt = _load_rows(k_rows + D_V, valid, offs_t, D_T, BLOCK_DT)
                s = _mm(qt, tl.trans(kt), s, DOT_F32)
        p = tl.exp2(s * scale_log2 - lse2[:, None])
        p = tl.where(row_ok[:, None] & valid[None, :], p, 0.0)
        dp = mm0(do, k, gate, BLOCK_H, BLOCK_N, SPLIT_S, DOT_F32, TRANS_B=True)
        ds = p * (f[:, None] * (dp - delta[:, None]) + dl[:, None])
        ds_lo = (ds * sm_scale).to(k.dtype)
        if DO_DQ:
            dq = _mm(ds_lo, k, dq, DOT_F32)
            if HAS_TAIL:
                dqt = _mm(ds_lo, kt, dqt, DOT_F32)
        pf_lo = (p * f[:, None]).to(k.dtype)
        if STORE_DS:
            # two-phase backward: this block's scaled dS and f * P, [key position, head] per
            # (query, kv head), for _bwd_dkv_kernel to reduce over all heads of the group
            ds_at = (pid_s * stride_dss + kvh * stride_dsh + pos[None, :].to(tl.int64) * G
                     + offs_g[:, None])
            st_mask = hmask[:, None] & in_len[None, :]
            tl.store(DS + ds_at, ds_lo, mask=st_mask)
            tl.store(PF + ds_at, pf_lo, mask=st_mask)
        elif DK_T:
            # [d, BLOCK_N] so the GEMM's M is d (a multiple of 64) rather than BLOCK_N.
            dkv_cols = dkv_head + idx64[None, :] * stride_dkvs
            dk = _mm(tl.trans(q), ds_lo, tl.zeros([BLOCK_DV, BLOCK_N], tl.float32), DOT_F32)
            dk = _mm(tl.trans(do), pf_lo, dk, DOT_F32)
            if BLOCK_DV == D_V:
                tl.atomic_add(dkv_cols + offs_v[:, None], dk, mask=valid[None, :], sem=ATOMIC_SEM)
            else:
                tl.atomic_add(dkv_cols + offs_v[:, None], dk,
                              mask=valid[None, :] & (offs_v[:, None] < D_V), sem=ATOMIC_SEM)
            if HAS_TAIL:
                dkt = _mm(tl.trans(qt), ds_lo, tl.zeros([BLOCK_DT, BLOCK_N], tl.float32), DOT_F32)
                if BLOCK_DT == D_T:
                    tl.atomic_add(dkv_cols + D_V + offs_t[:, None], dkt, mask=valid[None, :],
                                  sem=ATOMIC_SEM)
                else:
                    tl.atomic_add(dkv_cols + D_V + offs_t[:, None], dkt,
                                  mask=valid[None, :] & (offs_t[:, None] < D_T), sem=ATOMIC_SEM)
        else:
            dkv_rows = dkv_head + idx64[:, None] * stride_dkvs
            dk = _mm(tl.trans(ds_lo), q, tl.zeros([BLOCK_N, BLOCK_DV], tl.float32), DOT_F32)
            dk = _mm(tl.trans(pf_lo), do, dk, DOT_F32)
            if BLOCK_DV == D_V:
                tl.atomic_add(dkv_rows + offs_v[None, :], dk, mask=valid[:, None], sem=ATOMIC_SEM)
            else:
                tl.atomic_add(dkv_rows + offs_v[None, :], dk,
                              mask=valid[:, None] & (offs_v[None, :] < D_V), sem=ATOMIC_SEM)
            if HAS_TAIL:
                dkt = _mm(tl.trans(ds_lo), qt, tl.zeros([BLOCK_N, BLOCK_DT], tl.float32), DOT_F32)
                if BLOCK_DT == D_T:
                    tl.atomic_add(dkv_rows + D_V + offs_t[None, :], dkt, mask=valid[:, None],
                                  sem=ATOMIC_SEM)
                else:
                    tl.atomic_add(dkv_rows + D_V + offs_t[None, :], dkt,
                                  mask=valid[:, None] & (offs_t[None, :] < D_T), sem=ATOMIC_SEM)

    if DO_DQ:
        dq_rows = DQ + pid_s * stride_dqs + head[:, None] * stride_dqh
        if BLOCK_DV == D_V:
            tl.store(dq_rows + offs_v[None, :], dq.to(DQ.dtype.element_ty), mask=hmask[:, None])
        else:
            tl.store(dq_rows + offs_v[None, :], dq.to(DQ.dtype.element_ty),
                     mask=hmask[:, None] & (offs_v[None, :] < D_V))
        if HAS_TAIL:
            if BLOCK_DT == D_T:
                tl.store(dq_rows + D_V + offs_t[None, :], dqt.to(DQ.dtype.element_ty),
                         mask=hmask[:, None])
            else:
                tl.store(dq_rows + D_V + offs_t[None, :], dqt.to(DQ.dtype.element_ty),
                         mask=hmask[:, None] & (offs_t[None, :] < D_T))


@triton.jit
def _bwd_dkv_kernel(
    Q, KV, DO, IDX, LENS, DS, PF, DKV, DQ,
    stride_qs, stride_qh, stride_kvs, stride_kvh, stride_dos, stride_doh, stride_is, stride_ih,
    stride_dss, stride_dsh, stride_dkvs, stride_dkvh, stride_dqs, stride_dqh,
    s_kv, topk, group, col0, col_end, n_chunks,
    G: tl.constexpr, DC: tl.constexpr, BLOCK_N: tl.constexpr, USE_DO: tl.constexpr,
    DO_DQ: tl.constexpr, HAS_LEN: tl.constexpr, SPLIT: tl.constexpr, PREFETCH_IDX: tl.constexpr,
    ATOMIC_SEM: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Second phase of the two-phase backward: for one query, one kv head and the columns
    [c0, c0 + DC) of d_qk (c0 = col0 + chunk * DC, clipped at col_end), the dK/dV rows of every
    selected key summed over all heads of the group on chip,
        dkv[idx_j, c] += sum_h dS[h, j] * q[h, c]  (+ sum_h fP[h, j] * dout[h, c], c < d_v),
    then one atomic add per (query, key, column): the fused kernel sends one per head block.
    q's and dout's columns stay in registers / shared memory for the whole loop; dS and fP come
    from the first phase's scratch ([query, kv head, key position, head], in q's dtype).
    With DO_DQ it also gathers those columns of the keys and forms dq[:, c] = dS K[:, c]: the
    first phase then keeps no [heads, d_qk] accumulator. SPLIT / PREFETCH_IDX: see
    BWD_DKV_SPLIT / BWD_DKV_PREFETCH_IDX."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1).to(tl.int64)
    kvh = pid_c // n_chunks
    offs_c = col0 + (pid_c % n_chunks) * DC + tl.arange(0, DC)
    c_ok = offs_c < col_end
    offs_g = tl.arange(0, G)
    g_ok = offs_g < group
    head = kvh * group + offs_g
    offs_n = tl.arange(0, BLOCK_N)

    qd_mask = g_ok[:, None] & c_ok[None, :]
    q = tl.load(Q + pid_s * stride_qs + head[:, None] * stride_qh + offs_c[None, :],
                mask=qd_mask, other=0.0)  # [G, DC]
    if USE_DO:
        do = tl.load(DO + pid_s * stride_dos + head[:, None] * stride_doh + offs_c[None, :],
                     mask=qd_mask, other=0.0)

    n_keys = topk
    if HAS_LEN:
        n_keys = tl.maximum(tl.minimum(tl.load(LENS + pid_s), topk), 0)
    idx_row = IDX + pid_s * stride_is + kvh * stride_ih
    ds_base = pid_s * stride_dss + kvh * stride_dsh
    dkv_cols = DKV + kvh * stride_dkvh + offs_c[None, :]
    gate = n_keys > 0  # true in every iteration of the loop (SPLIT)
    if DO_DQ:
        dq = tl.zeros([G, DC], tl.float32)
        kv_cols = KV + kvh * stride_kvh + offs_c[None, :]
    if PREFETCH_IDX:
        idx_next = tl.load(idx_row + offs_n, mask=offs_n < n_keys, other=-1)
    for start in range(0, n_keys, BLOCK_N):
        pos = start + offs_n
        in_len = pos < n_keys
        if PREFETCH_IDX:
            idx = idx_next
            idx_next = tl.load(idx_row + pos + BLOCK_N, mask=pos + BLOCK_N < n_keys, other=-1)
        else:
            idx = tl.load(idx_row + pos, mask=in_len, other=-1)
        valid = in_len & (idx >= 0) & (idx < s_kv)
        at = ds_base + pos[:, None].to(tl.int64) * G + offs_g[None, :]
        ld_mask = in_len[:, None] & g_ok[None, :]
        ds = tl.load(DS + at, mask=ld_mask, other=0.0)  # [BLOCK_N, G]
        acc = mm0(ds, q, gate, BLOCK_N, DC, SPLIT and USE_DO, DOT_F32)
        if USE_DO:
            pf = tl.load(PF + at, mask=ld_mask, other=0.0)
            acc = _mm(pf, do, acc, DOT_F32)
        idx64 = idx.to(tl.int64)[:, None]
        if DO_DQ:
            k = tl.load(kv_cols + idx64 * stride_kvs, mask=valid[:, None] & c_ok[None, :],
                        other=0.0)  # [BLOCK_N, DC]
            dq = _mm(tl.trans(ds), k, dq, DOT_F32)
        tl.atomic_add(dkv_cols + idx64 * stride_dkvs, acc, mask=valid[:, None] & c_ok[None, :],
                      sem=ATOMIC_SEM)
    if DO_DQ:
        tl.store(DQ + pid_s * stride_dqs + head[:, None] * stride_dqh + offs_c[None, :],
                 dq.to(DQ.dtype.element_ty), mask=qd_mask)


def _blocks(q: torch.Tensor, kv: torch.Tensor, d_v: int, max_block_h: int = 64):
    h_q, d_qk = q.shape[1], q.shape[2]
    group = h_q // kv.shape[1]
    block_h = min(max_block_h, _pow2(group))
    d_t = d_qk - d_v
    block_dv = _pow2(d_v)
    block_dt = _pow2(d_t) if d_t > 0 else 16
    # "big": a full head block (the most heads one program takes) over wide values, i.e. the
    # DeepSeek shapes (h_q 64 / 128, d_v 512); every other shape is "small"
    big = block_h == max_block_h and block_dv >= 256
    return group, block_h, d_t, block_dv, block_dt, ("big" if big else "small")


def _last_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink=None, topk_length=None):
    s_q, h_q, _ = q.shape
    s_kv, h_kv, _ = kv.shape
    topk = indices.shape[-1]
    out = q.new_empty((s_q, h_q, d_v))
    max_logits = q.new_empty((s_q, h_q), dtype=torch.float32)
    lse = q.new_empty((s_q, h_q), dtype=torch.float32)
    if s_q == 0:
        return out, max_logits, lse
    group, block_h, d_t, block_dv, block_dt, size = _blocks(q, kv, d_v)
    block_n, num_warps, num_stages = FWD_CONFIG[size]
    kernel, extra = _fwd_kernel, {}
    if FWD_VARIANT is not None:
        v = dict(FWD_SPLIT_DEFAULTS, **FWD_VARIANT)
        if size == "big":
            block_n, num_warps, num_stages = v["block_n"], v["num_warps"], v["num_stages"]
        kernel = _fwd_split_kernel
        # halves narrower than 16 columns would not make a dot
        extra = dict(SPLIT_S=bool(v["split_s"]), SPLIT_V=bool(v["split_v"]) and block_dv >= 32,
                     DEFER_SUM=bool(v["defer_sum"]), TAU=float(v["tau"]))
    grid = (h_kv * triton.cdiv(group, block_h), s_q)
    kernel[grid](
        q, kv, indices, topk_length if topk_length is not None else indices,
        attn_sink if attn_sink is not None else q, out, max_logits, lse,
        q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), indices.stride(0), indices.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        s_kv, topk, group, sm_scale * LOG2E,
        D_V=d_v, D_T=d_t, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_DV=block_dv, BLOCK_DT=block_dt,
        HAS_TAIL=d_t > 0, HAS_LEN=topk_length is not None, HAS_SINK=attn_sink is not None,
        PREFETCH_IDX=PREFETCH_IDX, DOT_F32=DOT_F32, num_warps=num_warps, num_stages=num_stages,
        **extra,
    )
    return out, max_logits, lse


def sparse_prefill_backward(dout, dlse, q, kv, indices, out, lse, sm_scale, d_v, attn_sink=None,
                            topk_length=None):
    s_q, h_q, d_qk = q.shape
    s_kv, h_kv, _ = kv.shape
    topk = indices.shape[-1]
    dq = torch.empty_like(q)
    dkv = torch.empty_like(kv)
    sink_dtype = torch.float32 if attn_sink is None else attn_sink.dtype
    if s_q == 0 or s_kv == 0:
        dq.zero_()
        dkv.zero_()
        return dq, dkv, q.new_zeros((h_q,), dtype=sink_dtype)
    alert_not_deterministic("the Triton sparse_prefill backward (dkv)")
    dout = _last_contig(dout)
    out = _last_contig(out)
    # fp32 accumulator: duplicated indices and rows shared by many queries add up atomically.
    dkv_acc = torch.zeros((s_kv, h_kv, d_qk), dtype=torch.float32, device=kv.device)
    dsink_part = (torch.empty((s_q, h_q), dtype=torch.float32, device=q.device)
                  if attn_sink is not None else None)
    args = (dout, dlse, q, indices, out, lse, topk_length, attn_sink, dq, dkv_acc, dsink_part)
    if BWD_MODE == "two_phase" and _pow2(h_q // h_kv) <= BWD_MAX_G:
        _backward_two_phase(kv, sm_scale, d_v, *args)
    else:
        _backward_fused(kv, sm_scale, d_v, *args)
    dkv.copy_(dkv_acc)
    if attn_sink is None:
        d_sink = q.new_zeros((h_q,), dtype=torch.float32)
    else:
        d_sink = dsink_part.sum(0).to(sink_dtype)
    return dq, dkv, d_sink


def _bwd_launch(kv, sm_scale, d_v, dout, dlse, q, indices, out, lse, topk_length, attn_sink, dq,
                dkv_acc, dsink_part, ds, pf, block_h_max, config, prefetch_idx):
    """One launch of _bwd_kernel over the queries of q (a slice of them in the two-phase mode)."""
    s_q, h_q, _ = q.shape
    s_kv, h_kv, _ = kv.shape
    topk = indices.shape[-1]
    group, block_h, d_t, block_dv, block_dt, size = _blocks(q, kv, d_v, block_h_max)
    block_n, num_warps, num_stages = config[size]
    store_ds = ds is not None
    grid = (h_kv * triton.cdiv(group, block_h), s_q)
    _bwd_kernel[grid](
        q, kv, indices, topk_length if topk_length is not None else indices,
        attn_sink if attn_sink is not None else q, dout, out, dlse, lse, dq, dkv_acc,
        dsink_part if dsink_part is not None else dkv_acc,
        ds if store_ds else q, pf if store_ds else q,
        q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), indices.stride(0),
        indices.stride(1), dout.stride(0), dout.stride(1), out.stride(0), out.stride(1),
        dlse.stride(0), dlse.stride(1), lse.stride(0), lse.stride(1),
        dq.stride(0), dq.stride(1), dkv_acc.stride(0), dkv_acc.stride(1),
        ds.stride(0) if store_ds else 0, ds.stride(1) if store_ds else 0,
        s_kv, topk, group, h_q, sm_scale, sm_scale * LOG2E,
        D_V=d_v, D_T=d_t, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_DV=block_dv,
        BLOCK_DT=block_dt, HAS_TAIL=d_t > 0, HAS_LEN=topk_length is not None,
        HAS_SINK=attn_sink is not None, DK_T=BWD_DK_TRANSPOSED,
        PREFETCH_IDX=prefetch_idx, STORE_DS=store_ds,
        G=ds.shape[-1] if store_ds else 16, DO_DQ=not (store_ds and BWD_DQ_IN_PHASE2),
        SPLIT_S=store_ds and BWD_DS_SPLIT, ATOMIC_SEM=BWD_ATOMIC_SEM, DOT_F32=DOT_F32,
        num_warps=num_warps, num_stages=num_stages,
    )


def _backward_fused(kv, sm_scale, d_v, *args):
    """dq and the dK/dV partials of each head block in one kernel (any group size)."""
    _bwd_launch(kv, sm_scale, d_v, *args, None, None, BWD_MAX_BLOCK_H, BWD_CONFIG,
                BWD_PREFETCH_IDX)


def _backward_two_phase(kv, sm_scale, d_v, dout, dlse, q, indices, out, lse, topk_length,
                        attn_sink, dq, dkv_acc, dsink_part):
    """Phase 1 (_bwd_kernel, STORE_DS): dq, and the scaled dS and f * P of every (query, head,
    key position) into a scratch buffer in q's dtype, 64 heads per program as the forward.
    Phase 2 (_bwd_dkv_kernel): dK/dV summed over the heads of each kv head on chip, one atomic
    add per (query, key, column). Queries run in chunks so that the scratch stays under
    BWD_SCRATCH_BYTES (1 MiB per query at h_q 128, topk 2048)."""
    s_q, h_q, d_qk = q.shape
    s_kv, h_kv, _ = kv.shape
    topk = indices.shape[-1]
    group = h_q // h_kv
    g = _pow2(group)
    d_t = d_qk - d_v
    per_query = max(1, 2 * h_kv * topk * g * q.element_size())
    chunk = max(1, min(s_q, BWD_SCRATCH_BYTES // per_query))
    ds = torch.empty((chunk, h_kv, topk, g), dtype=q.dtype, device=q.device)
    pf = torch.empty_like(ds)
    big = g >= 64 and d_v >= 256  # the DeepSeek shapes (h_q 64 / 128 per kv head, d_v 512)
    block_n, dc, num_warps, num_stages = BWD_DKV_CONFIG["big" if big else "small"]
    dc_v = min(dc, _pow2(d_v))
    passes = [(0, d_v, dc_v, True)]
    if d_t > 0:
        passes.append((d_v, d_qk, _pow2(d_t), False))
    for s0 in range(0, s_q, chunk):
        s1 = min(s_q, s0 + chunk)
        sl = slice(s0, s1)
        lens = topk_length[sl] if topk_length is not None else None
        dsink = dsink_part[sl] if dsink_part is not None else None
        _bwd_launch(kv, sm_scale, d_v, dout[sl], dlse[sl], q[sl], indices[sl], out[sl], lse[sl],
                    lens, attn_sink, dq[sl], dkv_acc, dsink, ds, pf, BWD_DS_MAX_BLOCK_H,
                    BWD_DS_CONFIG, BWD_DS_PREFETCH_IDX)
        qs, dos, idx, dqs = q[sl], dout[sl], indices[sl], dq[sl]
        for col0, col_end, width, use_do in passes:
            n_chunks = triton.cdiv(col_end - col0, width)
            _bwd_dkv_kernel[(h_kv * n_chunks, s1 - s0)](
                qs, kv, dos, idx, lens if lens is not None else idx, ds, pf, dkv_acc, dqs,
                qs.stride(0), qs.stride(1), kv.stride(0), kv.stride(1), dos.stride(0),
                dos.stride(1), idx.stride(0), idx.stride(1), ds.stride(0), ds.stride(1),
                dkv_acc.stride(0), dkv_acc.stride(1), dqs.stride(0), dqs.stride(1),
                s_kv, topk, group, col0, col_end, n_chunks,
                G=g, DC=width, BLOCK_N=block_n, USE_DO=use_do, DO_DQ=BWD_DQ_IN_PHASE2,
                HAS_LEN=lens is not None, SPLIT=BWD_DKV_SPLIT,
                PREFETCH_IDX=BWD_DKV_PREFETCH_IDX,
                ATOMIC_SEM=BWD_ATOMIC_SEM, DOT_F32=DOT_F32, num_warps=num_warps,
                num_stages=num_stages,
            )


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _supports(q, kv, d_v) -> List[str]:
    why = []
    if q.dtype not in (torch.bfloat16, torch.float16):
        why.append(f"q dtype {_dtype_name(q.dtype)}: the Triton kernel takes bf16 or fp16 "
                   "(fp32/fp64 run on the reference)")
    d_qk = q.shape[-1]
    if d_v > MAX_D_V:
        why.append(f"d_v {d_v} > {MAX_D_V}: the fp32 [64, d_v] accumulator would not fit in "
                   "registers")
    if d_qk - d_v > MAX_D_TAIL:
        why.append(f"d_qk - d_v = {d_qk - d_v} > {MAX_D_TAIL}: the key columns past the values "
                   "would not fit on chip next to them")
    return why


def supports(q, kv, indices, sm_scale, d_v, attn_sink=None, topk_length=None) -> List[str]:
    return _supports(q, kv, d_v)


def supports_backward(dout, dlse, q, kv, indices, out, lse, sm_scale, d_v, attn_sink=None,
                      topk_length=None) -> List[str]:
    return _supports(q, kv, d_v)


register("sparse_prefill", sparse_prefill, supports)
register("sparse_prefill_backward", sparse_prefill_backward, supports_backward)
