"""FLOPs and bytes of each benchmarked op, counted the way FlashMLA's own tests count them (and
DeepGEMM's tests for the DSA indexer's logits), so that TFLOPS and GB/s are comparable with
their published numbers and with the peer table in shared/peers/flashmla/README.md
(tests/test_bench.py reproduces that table's TFLOPS and GB/s from its times with these formulas).

Sources (deepseek-ai/FlashMLA):
- dense decode: tests/test_flash_mla_dense_decoding.py (earlier tests/test_flash_mla.py)
      FLOPs = 2 * b * s_q * h_q * mean_s_k * (d + d_v)  (= s_q * total_seqlens * h_q * (d + dv) * 2)
      bytes = 2 * (total_seqlens * h_kv * d + b * s_q * h_q * d + b * s_q * h_q * d_v)
  (causal masking is not subtracted, as there.)
- sparse decode: tests/lib.py, count_flop_and_mem_vol_for_decode
      FLOPs = 2 * h_q * attended * (d_qk + d_v),  attended = sum over key sets of b * s_q * topk
              (or s_q * topk_length.sum())
      bytes = 2 * b * s_q * h_q * d_qk + retrieved * token_bytes + 2 * b * s_q * h_q * d_v,
              retrieved = number of distinct in-cache indices (after topk_length masking), per
              key set; token_bytes = 656 for d_qk 576 (V32) and 576 for d_qk 512 (MODEL1: its
              584 - 8 scale bytes, as FlashMLA counts)
- sparse prefill: tests/test_flash_mla_prefill.py get_flop and tests/lib.py count_flop_and_mem_vol
      FLOPs = 2 * total_topk * h_q * (d_qk + d_v),  total_topk = s_q * topk (or topk_length.sum())
      bytes = 2 * valid_indices * d_qk + 2 * s_q * h_q * (d_qk + d_v)
- dense prefill (MHA) forward / backward: tests/test_fmha_sm100.py
      FLOPs fwd = 2 * pairs * h * (d + d_v),  FLOPs bwd = 2 * pairs * h * (3 * d + 2 * d_v),
      pairs = unmasked (query, key) pairs summed over the batch.
Counted here by analogy (FlashMLA has no formula for them):
- sparse prefill backward: FLOPs = 2 * total_topk * h_q * (3 * d_qk + 2 * d_v) (the dense backward
  count per attended pair: S and dQ, dK over d_qk; dP and dV over d_v); bytes: read q, out, dout
  (2 B each), lse and the gathered keys (as the forward), write dq and dkv once.
- dense prefill bytes: read q, k, v and write out once (forward); the backward adds reading
  q, k, v, out, dout and writing dq, dk, dv.
- kv-cache write: bytes = n * (2 * d + 8 + bytes_per_token) (bf16 row and int64 slot read, packed
  token written); no FLOPs.
DSA lightning indexer (FLOPs as deepseek-ai/DeepGEMM's tests/test_attention.py counts them):
- indexer_logits (DeepGEMM's fp8_mqa_logits, test_mqa_logits):
      FLOPs = 2 * visible * h * d, visible = the (query, key) pairs inside the windows
              (their ``ref_cost = mask.sum()``, or ``sum(clamp(ke) - clamp(ks))``); the epilogue
              (ReLU, the weighted head sum, the key scale: ~2 ops per (t, s, h) on the CUDA
              cores) is not counted, there or here. The count over all s_k keys,
              2 * s_q * s_k * h * d, is reported beside it (the Triton kernel's target is
              stated for that rectangle).
      bytes = q (s_q * h * d, e4m3) + k (s_k * d) + k_scale (s_k * 4) + weights (s_q * h * 4)
              + k_start, k_end (2 * s_q * 4) + the output, s_q * s_k * 4. DeepGEMM counts
              visible * 4 for the output of fp8_mqa_logits and the -inf fill separately (its
              clean_logits kernel, (s_q * s_k - visible) * 4); our op writes both, so both count.
- indexer_logits_paged (DeepGEMM's fp8_paged_mqa_logits, test_paged_mqa_logits):
      FLOPs = 2 * sum_lens * next_n * h * d (every position of the context for each of the
              next_n queries; the causal triangle among the last next_n positions is not
              subtracted), sum_lens = sum of context_lens
      bytes = q (b * next_n * h * d) + weights (b * next_n * h * 4) + context_lens (b * 4)
              + cache rows sum_lens * (d + 4) + block-table entries sum_lens / block_size * 4
              + the output b * next_n * max_context_len * 4 (DeepGEMM: sum_lens * next_n * 4,
              the same when every context is max_context_len long)
Counted here (no published formula):
- indexer_topk: bytes = one read of the logits (s_q * s_k * 4) + the int32 output
  (s_q * k * 4); no FLOPs. The other passes of a radix select re-read rows from L2 and are not
  counted. torch.topk is timed on the same input and this same count.
- indexer_quantize: bytes = rows * d * in_bytes read + rows * d (e4m3) + rows * 4 (scales)
  written; no FLOPs (the Hadamard butterflies, d * log2(d) adds per row, are CUDA-core work far
  below the memory time).
- write_indexer_cache: bytes = n * (in_bytes * d + 8 + d + 4) (row and int64 slot read, d e4m3
  bytes and one f32 scale written); no FLOPs.

The roof ("% of roof") uses these bytes too, except for sparse prefill (and its backward), where
FlashMLA counts each query's gathered rows though most of them repeat across queries (L2 hits):
there the roof takes the distinct rows, the least that must come from DRAM.
"""

from __future__ import annotations

from typing import Tuple

BF16 = 2


def kv_token_bytes(d_qk: int) -> int:
    """Bytes of one FP8 cache token as FlashMLA's tests/lib.py counts them."""
    return 656 if d_qk == 576 else 576


def dense_decode(b: int, s_q: int, h_q: int, h_kv: int, total_seqlens: int, d: int = 576,
                 d_v: int = 512, elem: int = BF16) -> Tuple[float, float]:
    flops = 2.0 * s_q * total_seqlens * h_q * (d + d_v)
    nbytes = (total_seqlens * h_kv * d + b * s_q * h_q * d + b * s_q * h_q * d_v) * elem
    return flops, float(nbytes)


def sparse_decode(b: int, s_q: int, h_q: int, d_qk: int, d_v: int, attended: int,
                  retrieved: int) -> Tuple[float, float]:
    flops = 2.0 * h_q * attended * (d_qk + d_v)
    nbytes = (2 * b * s_q * h_q * d_qk + retrieved * kv_token_bytes(d_qk)
              + 2 * b * s_q * h_q * d_v)
    return flops, float(nbytes)


def sparse_prefill(s_q: int, h_q: int, d_qk: int, d_v: int, total_topk: int,
                   valid_indices: int) -> Tuple[float, float]:
    flops = 2.0 * total_topk * h_q * (d_qk + d_v)
    nbytes = valid_indices * d_qk * BF16 + s_q * h_q * (d_qk + d_v) * BF16
    return flops, float(nbytes)


def sparse_prefill_backward(s_q: int, s_kv: int, h_q: int, h_kv: int, d_qk: int, d_v: int,
                            total_topk: int, valid_indices: int) -> Tuple[float, float]:
    flops = 2.0 * total_topk * h_q * (3 * d_qk + 2 * d_v)
    nbytes = (valid_indices * d_qk * BF16  # gathered keys/values
              + s_q * h_q * (d_qk + 2 * d_v) * BF16 + s_q * h_q * 4  # q, out, dout, lse
              + s_q * h_q * d_qk * BF16 + s_kv * h_kv * d_qk * BF16)  # dq, dkv
    return flops, float(nbytes)


def attn_pairs(s_q: int, s_k: int, causal: bool) -> int:
    """Unmasked (query, key) pairs of one sequence; causal is bottom-right aligned (query i sees
    keys j <= i + s_k - s_q), as FlashMLA's get_attn_bias."""
    if not causal:
        return s_q * s_k
    # row i sees i + s_k - s_q + 1 keys (at most s_k, at i = s_q - 1); rows before
    # first = max(0, s_q - s_k) see none: a run of consecutive counts lo .. s_k
    first = max(0, s_q - s_k)
    n = s_q - first
    if n <= 0:
        return 0
    lo = first + s_k - s_q + 1
    return (lo + s_k) * n // 2


def dense_prefill(b: int, s_q: int, s_k: int, h: int, h_k: int, d: int, d_v: int, causal: bool,
                  backward: bool = False) -> Tuple[float, float]:
    """Forward (``backward=False``) or forward + backward of ``b`` equal-length sequences."""
    pairs = b * attn_pairs(s_q, s_k, causal)
    flops = 2.0 * pairs * h * (d + d_v)
    t_q, t_k = b * s_q, b * s_k
    q, k, v, o = t_q * h * d, t_k * h_k * d, t_k * h_k * d_v, t_q * h * d_v
    nbytes = (q + k + v + o) * BF16
    if backward:
        flops += 2.0 * pairs * h * (3 * d + 2 * d_v)
        nbytes += (q + k + v + 2 * o) * BF16 + (q + k + v) * BF16
    return flops, float(nbytes)


def kv_cache_write(n: int, d: int, bytes_per_token: int) -> Tuple[float, float]:
    return 0.0, float(n * (2 * d + 8 + bytes_per_token))


# ---------------------------------------------------------------------------------------------
# DSA lightning indexer
# ---------------------------------------------------------------------------------------------

FP8 = 1
F32 = 4
I32 = 4


def window_pairs(s_q: int, s_k: int, causal: bool) -> int:
    """Visible (query, key) pairs of the bench's indexer windows: ``k_start = 0`` and
    ``k_end = s_k - s_q + t + 1`` (causal: the last s_q tokens of an s_k-token sequence) or
    ``k_end = s_k`` (full), each clamped to [0, s_k] as DeepGEMM's cost count does."""
    return attn_pairs(s_q, s_k, causal)


def indexer_logits(s_q: int, s_k: int, h: int, d: int, visible: int) -> Tuple[float, float]:
    """(FLOPs over the visible pairs, bytes); see the module docstring."""
    flops = 2.0 * visible * h * d
    nbytes = (s_q * h * d * FP8 + s_k * d * FP8 + s_k * F32 + s_q * h * F32 + 2 * s_q * I32
              + s_q * s_k * F32)
    return flops, float(nbytes)


def indexer_logits_all_keys_flops(s_q: int, s_k: int, h: int, d: int) -> float:
    """The rectangle: every query against every key, windows ignored."""
    return 2.0 * s_q * s_k * h * d


def indexer_logits_paged(b: int, next_n: int, h: int, d: int, sum_lens: int, block_size: int,
                         max_context_len: int) -> Tuple[float, float]:
    flops = 2.0 * sum_lens * next_n * h * d
    nbytes = (b * next_n * h * d * FP8 + b * next_n * h * F32 + b * I32
              + sum_lens * (d + 4) + sum_lens / block_size * I32
              + b * next_n * max_context_len * F32)
    return flops, float(nbytes)


def indexer_topk(s_q: int, s_k: int, k: int) -> Tuple[float, float]:
    return 0.0, float(s_q * s_k * F32 + s_q * k * I32)


def indexer_quantize(rows: int, d: int, in_bytes: int = BF16) -> Tuple[float, float]:
    return 0.0, float(rows * d * in_bytes + rows * d * FP8 + rows * F32)


def write_indexer_cache(n: int, d: int, in_bytes: int = BF16) -> Tuple[float, float]:
    return 0.0, float(n * (in_bytes * d + 8 + d + 4))
