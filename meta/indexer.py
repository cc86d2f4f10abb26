"""Contracts of the DSA lightning indexer ops (DeepSeek Sparse Attention, DeepSeek-V3.2).

The indexer scores, for query token t, every past token s:

    index_score[t, s] = sum_h w[t, h] * ReLU(q_I[t, h] . k_I[s])

(64 indexer heads of dim 128 in DeepSeek-V3.2), and the attention of t then reads only the top-k
(2048) tokens by that score. For inference q_I and k_I are rotated by a normalised Hadamard
transform and quantized to FP8 e4m3 with one fp32 scale per row. For training the indexer is
distilled from the main attention: KL(p_t || softmax(I_t)), with p_t the attention distribution
summed over heads and renormalised (over all tokens in the dense warm-up stage, over the selected
tokens in the sparse stage).

Inference ops
-------------
``indexer_quantize(x [..., d], hadamard=True, scale_format='fp32') -> (x_fp8, scale [...])``
    y = x @ H / sqrt(d) (H the d x d Sylvester Hadamard matrix, H_1 = [1],
    H_2n = [[H_n, H_n], [H_n, -H_n]]; d must be a power of two when hadamard is on), or y = x;
    then per row: ``scale = max(amax|y|, 1e-4) / 448`` ('ue8m0': rounded up to a power of two,
    2 ** ceil(log2(.))) and ``x_fp8 = e4m3(y / scale)`` (round to nearest even, |.| <= 448).
    So ``y ~= x_fp8 * scale``. The 1e-4 floor on amax is the convention of DeepSeek's and vLLM's
    indexer quantizers: an all-zero row gets scale 1e-4 / 448 and zero bytes (no NaN, no inf),
    and caches written here match theirs byte for byte for hadamard=False.
    x_fp8 is float8_e4m3fn of x's shape; scale is float32 of x.shape[:-1].

``indexer_logits(q_fp8 [s_q, h, d], k_fp8 [s_k, d], k_scale [s_k] f32, weights [s_q, h] f32,
k_start [s_q] int32, k_end [s_q] int32) -> logits [s_q, s_k] f32``
    ``logits[t, s] = sum_h weights[t, h] * ReLU(q_fp8[t, h] . k_fp8[s]) * k_scale[s]`` for
    ``max(k_start[t], 0) <= s < min(k_end[t], s_k)``, ``-inf`` elsewhere (ragged batches packed
    along s_k, causal windows), as DeepGEMM's ``fp8_mqa_logits``. q's own scale is NOT an input:
    the caller folds it into weights (``weights = w * q_scale * softmax_scale``; q_scale is
    ``[s_q, h]`` from indexer_quantize of q ``[s_q, h, d]``), which is exact because ReLU commutes
    with a positive factor.

``write_indexer_cache(cache!, k [n, d], slot_mapping [n] int64, hadamard=True,
scale_format='fp32')``
    Quantizes k exactly as indexer_quantize and writes row i into slot ``slot_mapping[i]``
    (``block * block_size + offset``) of a paged indexer cache. Slots < 0 or >= num_blocks *
    block_size are skipped; no other byte of the cache changes; when several rows name one slot
    the last row wins.

``indexer_logits_paged(q_fp8 [b, n, h, d], cache, weights [b * n, h] f32, context_lens [b] int32,
block_table [b, max_blocks] int32, max_context_len) -> logits [b * n, max_context_len] f32``
    Row ``i * n + j`` (query j of the n = next_n MTP queries of batch element i) holds the
    indexer_logits formula over position p of sequence i (token ``block_table[i, p // bs]``,
    offset ``p % bs``) for ``p < context_lens[i] - n + j + 1``; ``-inf`` elsewhere, and also
    where the block-table entry of p is outside [0, num_blocks) or ``p // bs >= max_blocks``.
    As DeepGEMM's ``fp8_paged_mqa_logits`` (with clean_logits). The caller makes
    max_context_len >= max(context_lens): columns past it are not produced.

``indexer_topk(logits [s_q, s_k] f32, k, k_start=None, k_end=None) -> int32 [s_q, k]``
    Positions of the k largest finite logits of each row within ``[k_start, k_end)`` (the whole
    row when absent), by descending logit, ties by ascending position (-0.0 ties with +0.0),
    then -1 where fewer than k are valid. +-inf and NaN logits are never selected.

Paged indexer cache bytes
-------------------------
A cache is ``[num_blocks, block_size, 1, d + 4]`` uint8 or float8_e4m3fn; only its byte content
matters. Within one block (base = ``block * stride(0)`` bytes; blocks may be padded, never
overlap) the layout is NOT token-major: first the FP8 values of all tokens, then all scales:

    byte base + t * d + i                 : e4m3 value i of token t   (0 <= t < block_size)
    bytes base + block_size * d + 4 * t.. : float32 scale of token t (native byte order,
                                            little-endian on every supported device)

This is the grouping of DeepGEMM's paged MQA logits and of vLLM's indexer cache
(``block_size * (d + 4)`` bytes per block; for d = 128, 132 bytes per token).

Training ops
------------
``indexer_scores(q [s_q, h, d], k [s_k, d], weights [s_q, h], indices [s_q, topk] int32)
-> [s_q, topk]`` f32 (f64 for f64 q): ``sum_h weights[t, h] * ReLU(q[t, h] . k[indices[t, j]])``,
``-inf`` where the index is < 0 or >= s_k. Differentiable in q, k and weights (through
``indexer_scores_backward``); gradients arriving at -inf entries are ignored.

``sparse_attn_scores(q [s_q, h, d], kv [s_kv, 1, d], indices [s_q, 1, topk] int32, lse [s_q, h],
sm_scale, topk_length [s_q] int32?) -> [s_q, topk]`` f32 (f64 for f64 q)
    The arguments of ``sparse_prefill`` (h_kv = 1), plus the lse it returned.
    ``p[t, j] = sum_h exp(sm_scale * q[t, h] . kv[indices[t, 0, j], 0] - lse[t, h])`` over valid
    entries (sparse_prefill's rules: index < 0, >= s_kv or at position >= topk_length[t] is
    invalid and gets 0), then divided by its sum over j (a row without valid entries stays 0).
    A duplicated index gets its share once per occurrence, as in sparse_prefill. A target: not
    differentiable (its output never requires grad).

``dense_attn_scores(q [s_q, h, d], kv [s_k, 1, d], lse [s_q, h], sm_scale, k_start [s_q]?,
k_end [s_q]?) -> [s_q, s_k]`` f32 (f64 for f64 q)
    The same over every key s in ``[k_start[t], k_end[t])`` (whole row when absent), 0 outside
    (the dense warm-up stage). Not differentiable.
"""

from __future__ import annotations

import torch

from .common import (FLOAT_DTYPES, check, check_device, check_dtype, check_finite_scale,
                     check_index, check_last_dim_contiguous, check_optional_index, check_rank,
                     check_same_dtype, check_shape, check_size, define, stats_dtype)

# FP8 tensors are float8_e4m3fn, or uint8 holding the same bytes (opcheck and some frameworks
# cannot handle float8 tensors as inputs; the bytes are what the kernels read).
FP8_DTYPES = (torch.float8_e4m3fn, torch.uint8)
SCALE_FORMATS = ("fp32", "ue8m0")
SCALE_BYTES = 4  # one float32 scale per token in the paged cache
FP8_MAX = 448.0  # largest finite e4m3
AMAX_FLOOR = 1e-4  # amax is clamped to at least this before dividing by FP8_MAX

QUANTIZE = define(
    "indexer_quantize(Tensor x, bool hadamard=True, str scale_format='fp32') "
    "-> (Tensor x_fp8, Tensor scale)")
LOGITS = define(
    "indexer_logits(Tensor q_fp8, Tensor k_fp8, Tensor k_scale, Tensor weights, Tensor k_start, "
    "Tensor k_end) -> Tensor")
WRITE = define(
    "write_indexer_cache(Tensor(a!) cache, Tensor k, Tensor slot_mapping, bool hadamard=True, "
    "str scale_format='fp32') -> ()")
PAGED = define(
    "indexer_logits_paged(Tensor q_fp8, Tensor cache, Tensor weights, Tensor context_lens, "
    "Tensor block_table, SymInt max_context_len) -> Tensor")
TOPK = define("indexer_topk(Tensor logits, int k, Tensor? k_start=None, Tensor? k_end=None) -> Tensor")
SCORES = define(
    "indexer_scores(Tensor q, Tensor k, Tensor weights, Tensor indices) -> Tensor")
SCORES_BWD = define(
    "indexer_scores_backward(Tensor grad, Tensor q, Tensor k, Tensor weights, Tensor indices) "
    "-> (Tensor dq, Tensor dk, Tensor dweights)")
SPARSE_ATTN = define(
    "sparse_attn_scores(Tensor q, Tensor kv, Tensor indices, Tensor lse, float sm_scale, "
    "Tensor? topk_length=None) -> Tensor")
DENSE_ATTN = define(
    "dense_attn_scores(Tensor q, Tensor kv, Tensor lse, float sm_scale, Tensor? k_start=None, "
    "Tensor? k_end=None) -> Tensor")


# ---------------------------------------------------------------------------------------------
# shared checks
# ---------------------------------------------------------------------------------------------

def check_quant_options(d, hadamard: bool, scale_format: str, name: str = "x") -> None:
    check(
        isinstance(scale_format, str) and scale_format in SCALE_FORMATS,
        lambda: f"scale_format must be one of {SCALE_FORMATS}, got {scale_format!r}",
    )
    check(d >= 1, lambda: f"{name}.shape[-1] (d) must be at least 1, got {d}")
    if hadamard:
        # The Sylvester Hadamard matrix exists for powers of two only.
        check(
            d >= 1 and (d & (d - 1)) == 0,
            lambda: f"{name}.shape[-1] (d) must be a power of two for the Hadamard rotation "
            f"(or pass hadamard=False), got {d}",
        )


def check_indexer_cache(name: str, cache: torch.Tensor, d) -> None:
    """A paged indexer cache ``[num_blocks, block_size, 1, d + 4]`` (bytes grouped per block)."""
    check_rank(name, cache, 4, f"[num_blocks, block_size, 1, {d} + {SCALE_BYTES}]")
    check_dtype(name, cache, FP8_DTYPES)
    check(cache.shape[2] == 1,
                 lambda: f"{name}.shape[2] must be 1, got {cache.shape[2]}")
    check(
        cache.shape[3] == d + SCALE_BYTES,
        lambda: f"{name}.shape[3] must be d + {SCALE_BYTES} = {d + SCALE_BYTES} bytes per token "
        f"(d = {d} FP8 values and one float32 scale), got {cache.shape[3]}",
    )
    bytes_per_token = d + SCALE_BYTES
    check(
        cache.stride(3) == 1 and (cache.shape[1] <= 1 or cache.stride(1) == bytes_per_token),
        lambda: f"{name} must be packed within a block (strides (*, {bytes_per_token}, *, 1)), "
        f"got strides {tuple(cache.stride())}",
    )
    check(
        cache.shape[0] <= 1 or cache.stride(0) >= cache.shape[1] * bytes_per_token,
        lambda: f"{name}.stride(0) must be at least {cache.shape[1] * bytes_per_token} bytes "
        f"(one block of {cache.shape[1]} tokens), got {cache.stride(0)}",
    )


def _check_window(name: str, t, s_q, ref_name: str, ref: torch.Tensor) -> None:
    check_optional_index(name, t, (s_q,), "[s_q]", ref_name, ref)


# ---------------------------------------------------------------------------------------------
# indexer_quantize
# ---------------------------------------------------------------------------------------------

def check_indexer_quantize(x, hadamard=True, scale_format="fp32"):
    check(x.dim() >= 1, lambda: f"x must have at least 1 dimension [..., d], got shape "
                 f"{tuple(x.shape)}")
    check_dtype("x", x, FLOAT_DTYPES)
    check_quant_options(x.shape[-1], hadamard, scale_format)


@torch.library.register_fake(QUANTIZE)
def _quantize_fake(x, hadamard=True, scale_format="fp32"):
    check_indexer_quantize(x, hadamard, scale_format)
    return (x.new_empty(x.shape, dtype=torch.float8_e4m3fn),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


# ---------------------------------------------------------------------------------------------
# indexer_logits
# ---------------------------------------------------------------------------------------------

def check_indexer_logits(q_fp8, k_fp8, k_scale, weights, k_start, k_end):
    check_rank("q_fp8", q_fp8, 3, "[s_q, h, d]")
    check_dtype("q_fp8", q_fp8, FP8_DTYPES)
    check_last_dim_contiguous("q_fp8", q_fp8)
    s_q, h, d = q_fp8.shape
    check_rank("k_fp8", k_fp8, 2, "[s_k, d]")
    check_dtype("k_fp8", k_fp8, FP8_DTYPES)
    check_device("k_fp8", k_fp8, "q_fp8", q_fp8)
    check_last_dim_contiguous("k_fp8", k_fp8)
    check_size("k_fp8", k_fp8, 1, d, "d of q_fp8")
    s_k = k_fp8.shape[0]
    check_dtype("k_scale", k_scale, (torch.float32,))
    check_shape("k_scale", k_scale, (s_k,), "[s_k]")
    check_device("k_scale", k_scale, "q_fp8", q_fp8)
    check_dtype("weights", weights, (torch.float32,))
    check_shape("weights", weights, (s_q, h), "[s_q, h]")
    check_device("weights", weights, "q_fp8", q_fp8)
    check_index("k_start", k_start, 1, "[s_q]", "q_fp8", q_fp8)
    check_shape("k_start", k_start, (s_q,), "[s_q]")
    check_index("k_end", k_end, 1, "[s_q]", "q_fp8", q_fp8)
    check_shape("k_end", k_end, (s_q,), "[s_q]")


@torch.library.register_fake(LOGITS)
def _logits_fake(q_fp8, k_fp8, k_scale, weights, k_start, k_end):
    check_indexer_logits(q_fp8, k_fp8, k_scale, weights, k_start, k_end)
    return q_fp8.new_empty((q_fp8.shape[0], k_fp8.shape[0]), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# write_indexer_cache
# ---------------------------------------------------------------------------------------------

def check_write_indexer_cache(cache, k, slot_mapping, hadamard=True, scale_format="fp32"):
    check_rank("k", k, 2, "[n, d]")
    check_dtype("k", k, FLOAT_DTYPES)
    check_quant_options(k.shape[1], hadamard, scale_format, "k")
    check_indexer_cache("cache", cache, k.shape[1])
    check_device("k", k, "cache", cache)
    check_rank("slot_mapping", slot_mapping, 1, "[n]")
    check_dtype("slot_mapping", slot_mapping, (torch.int64,))
    check_size("slot_mapping", slot_mapping, 0, k.shape[0], "rows of k")
    check_device("slot_mapping", slot_mapping, "cache", cache)


@torch.library.register_fake(WRITE)
def _write_fake(cache, k, slot_mapping, hadamard=True, scale_format="fp32"):
    check_write_indexer_cache(cache, k, slot_mapping, hadamard, scale_format)


# ---------------------------------------------------------------------------------------------
# indexer_logits_paged
# ---------------------------------------------------------------------------------------------

def check_indexer_logits_paged(q_fp8, cache, weights, context_lens, block_table, max_context_len):
    check_rank("q_fp8", q_fp8, 4, "[b, next_n, h, d]")
    check_dtype("q_fp8", q_fp8, FP8_DTYPES)
    check_last_dim_contiguous("q_fp8", q_fp8)
    b, n, h, d = q_fp8.shape
    check_indexer_cache("cache", cache, d)
    check_device("cache", cache, "q_fp8", q_fp8)
    check_dtype("weights", weights, (torch.float32,))
    check_shape("weights", weights, (b * n, h), "[b * next_n, h]")
    check_device("weights", weights, "q_fp8", q_fp8)
    check_index("context_lens", context_lens, 1, "[b]", "q_fp8", q_fp8)
    check_shape("context_lens", context_lens, (b,), "[b]")
    check_index("block_table", block_table, 2, "[b, max_blocks]", "q_fp8", q_fp8)
    check_size("block_table", block_table, 0, b, "b of q_fp8")
    check(max_context_len >= 0,
                 lambda: f"max_context_len must be >= 0, got {max_context_len}")


@torch.library.register_fake(PAGED)
def _paged_fake(q_fp8, cache, weights, context_lens, block_table, max_context_len):
    check_indexer_logits_paged(q_fp8, cache, weights, context_lens, block_table, max_context_len)
    b, n = q_fp8.shape[0], q_fp8.shape[1]
    return q_fp8.new_empty((b * n, max_context_len), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# indexer_topk
# ---------------------------------------------------------------------------------------------

def check_indexer_topk(logits, k, k_start=None, k_end=None):
    check_rank("logits", logits, 2, "[s_q, s_k]")
    check_dtype("logits", logits, (torch.float32,))
    check(k >= 0, lambda: f"k must be >= 0, got {k}")
    s_q = logits.shape[0]
    _check_window("k_start", k_start, s_q, "logits", logits)
    _check_window("k_end", k_end, s_q, "logits", logits)


@torch.library.register_fake(TOPK)
def _topk_fake(logits, k, k_start=None, k_end=None):
    check_indexer_topk(logits, k, k_start, k_end)
    return logits.new_empty((logits.shape[0], k), dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# indexer_scores (+ backward)
# ---------------------------------------------------------------------------------------------

def check_indexer_scores(q, k, weights, indices):
    check_rank("q", q, 3, "[s_q, h, d]")
    check_dtype("q", q, FLOAT_DTYPES)
    check_last_dim_contiguous("q", q)
    s_q, h, d = q.shape
    check_rank("k", k, 2, "[s_k, d]")
    check_same_dtype("k", k, "q", q)
    check_device("k", k, "q", q)
    check_last_dim_contiguous("k", k)
    check_size("k", k, 1, d, "d of q")
    check_dtype("weights", weights, FLOAT_DTYPES)
    check_shape("weights", weights, (s_q, h), "[s_q, h]")
    check_device("weights", weights, "q", q)
    check_index("indices", indices, 2, "[s_q, topk]", "q", q)
    check_size("indices", indices, 0, s_q, "s_q of q")


@torch.library.register_fake(SCORES)
def _scores_fake(q, k, weights, indices):
    check_indexer_scores(q, k, weights, indices)
    return q.new_empty((q.shape[0], indices.shape[1]), dtype=stats_dtype(q))


def check_indexer_scores_backward(grad, q, k, weights, indices):
    check_indexer_scores(q, k, weights, indices)
    check_dtype("grad", grad, (stats_dtype(q),))
    check_shape("grad", grad, (q.shape[0], indices.shape[1]), "[s_q, topk]")
    check_device("grad", grad, "q", q)


@torch.library.register_fake(SCORES_BWD)
def _scores_backward_fake(grad, q, k, weights, indices):
    check_indexer_scores_backward(grad, q, k, weights, indices)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(weights)


def _scores_setup_context(ctx, inputs, output):
    q, k, weights, indices = inputs
    ctx.save_for_backward(q, k, weights, indices)


def _scores_backward(ctx, grad):
    q, k, weights, indices = ctx.saved_tensors
    dq, dk, dw = torch.ops.mla.indexer_scores_backward(grad.contiguous(), q, k, weights, indices)
    return dq, dk, dw, None


torch.library.register_autograd(SCORES, _scores_backward, setup_context=_scores_setup_context)


# ---------------------------------------------------------------------------------------------
# sparse_attn_scores / dense_attn_scores (targets: not differentiable)
# ---------------------------------------------------------------------------------------------

def _check_attn_common(q, kv, lse, sm_scale):
    check_rank("q", q, 3, "[s_q, h, d_qk]")
    check_dtype("q", q, FLOAT_DTYPES)
    check_last_dim_contiguous("q", q)
    s_q, h, d = q.shape
    check_rank("kv", kv, 3, "[s_kv, 1, d_qk]")
    check_same_dtype("kv", kv, "q", q)
    check_device("kv", kv, "q", q)
    check_last_dim_contiguous("kv", kv)
    check(
        kv.shape[1] == 1,
        lambda: f"kv.shape[1] (h_kv) must be 1 (the head-summed scores need one key set shared by "
        f"all heads), got {kv.shape[1]}",
    )
    check_size("kv", kv, 2, d, "d_qk of q")
    check_dtype("lse", lse, (torch.float32, torch.float64))
    check_shape("lse", lse, (s_q, h), "[s_q, h]")
    check_device("lse", lse, "q", q)
    check_finite_scale(sm_scale)


def check_sparse_attn_scores(q, kv, indices, lse, sm_scale, topk_length=None):
    _check_attn_common(q, kv, lse, sm_scale)
    s_q = q.shape[0]
    check_index("indices", indices, 3, "[s_q, 1, topk]", "q", q)
    check_size("indices", indices, 0, s_q, "s_q of q")
    check_size("indices", indices, 1, 1, "h_kv of kv")
    check_optional_index("topk_length", topk_length, (s_q,), "[s_q]", "q", q)


@torch.library.register_fake(SPARSE_ATTN)
def _sparse_attn_fake(q, kv, indices, lse, sm_scale, topk_length=None):
    check_sparse_attn_scores(q, kv, indices, lse, sm_scale, topk_length)
    return q.new_empty((q.shape[0], indices.shape[2]), dtype=stats_dtype(q))


def check_dense_attn_scores(q, kv, lse, sm_scale, k_start=None, k_end=None):
    _check_attn_common(q, kv, lse, sm_scale)
    s_q = q.shape[0]
    _check_window("k_start", k_start, s_q, "q", q)
    _check_window("k_end", k_end, s_q, "q", q)


@torch.library.register_fake(DENSE_ATTN)
def _dense_attn_fake(q, kv, lse, sm_scale, k_start=None, k_end=None):
    check_dense_attn_scores(q, kv, lse, sm_scale, k_start, k_end)
    return q.new_empty((q.shape[0], kv.shape[0]), dtype=stats_dtype(q))


def _target_setup_context(ctx, inputs, output):
    # A distillation target: the main attention gets no gradient from the indexer loss.
    ctx.mark_non_differentiable(output)


def _no_backward(ctx, grad):  # pragma: no cover - the output never requires grad
    raise RuntimeError("sparse_attn_scores / dense_attn_scores are not differentiable")


torch.library.register_autograd(SPARSE_ATTN, _no_backward, setup_context=_target_setup_context)
torch.library.register_autograd(DENSE_ATTN, _no_backward, setup_context=_target_setup_context)
