"""Training the DSA lightning indexer against the main attention (DeepSeek-V3.2's recipe).

The indexer is distilled from the attention: ``L = KL(p_t || softmax(I_t))`` per query t, with
``p_t`` the main attention's distribution summed over heads and renormalised (a target: no
gradient flows into the attention) and ``I_t`` the indexer's logits.

Dense warm-up (the indexer sees every key of the causal window)::

    idx = window_indices(k_start, k_end, s_k)                   # [s_q, s_k], -1 outside
    out, _, lse = torch_mla.sparse_prefill(q, kv, idx[:, None], sm_scale, d_v)  # main attention
    p = torch_mla.dense_attn_scores(q, kv, lse, sm_scale, k_start, k_end)      # [s_q, s_k]
    loss = indexer_kl_loss(torch_mla.indexer_scores(q_i, k_i, w, idx), p)

Sparse stage (the attention reads the indexer's top-k; the KL runs over the selected keys)::

    idx = torch_mla.indexer_topk(index_logits, 2048, k_start=k_start, k_end=k_end)
    out, _, lse = torch_mla.sparse_prefill(q, kv, idx[:, None], sm_scale, d_v)
    p = torch_mla.sparse_attn_scores(q, kv, idx[:, None], lse, sm_scale)        # [s_q, topk]
    loss = indexer_kl_loss(torch_mla.indexer_scores(q_i, k_i, w, idx), p)

(``q_i, k_i, w``: the indexer's own queries, keys and head weights, computed from detached
hidden states in DeepSeek's recipe so the indexer learns from this loss only.)
"""

from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


def window_indices(k_start: Optional[Tensor], k_end: Optional[Tensor], s_k: int,
                   s_q: Optional[int] = None) -> Tensor:
    """int32 ``[s_q, s_k]``: ``s`` where ``k_start[t] <= s < k_end[t]``, else -1. The indices of
    the dense stage, for ``indexer_scores`` (and ``sparse_prefill`` as ``[:, None, :]``).
    ``s_q`` is needed only when both bounds are None."""
    ref = k_start if k_start is not None else k_end
    if ref is not None:
        s_q, device = ref.shape[0], ref.device
    else:
        assert s_q is not None, "window_indices needs s_q when k_start and k_end are both None"
        device = None
    cols = torch.arange(s_k, device=device).unsqueeze(0).expand(s_q, s_k)
    valid = torch.ones((), dtype=torch.bool, device=device)
    if k_start is not None:
        valid = valid & (cols >= k_start.long().unsqueeze(-1))
    if k_end is not None:
        valid = valid & (cols < k_end.long().unsqueeze(-1))
    return torch.where(valid, cols, -1).to(torch.int32)


def indexer_kl_loss(index_logits: Tensor, target_probs: Tensor, reduction: str = "mean") -> Tensor:
    """``KL(p || softmax(I))`` per query: ``sum_j p_j (log p_j - log_softmax(I)_j)``.

    Args:
        index_logits: ``[..., n]`` indexer logits I (-inf allowed, e.g. invalid indices).
        target_probs: ``[..., n]`` target distribution p per row (sums to 1, or a row of zeros
            for a query without keys, which then contributes 0).
        reduction: ``"mean"`` over queries (all leading positions; equals
            ``F.kl_div(log_softmax(I), p, reduction="batchmean")`` for 2-D inputs), ``"sum"``,
            or ``"none"`` (``[...]``).

    Conventions: ``0 * log 0 = 0``, so entries with p = 0 contribute nothing, even where
    I = -inf; no NaN appears in the value or the gradient (a row whose logits are all -inf is
    handled). p > 0 where I = -inf gives +inf (the true KL). Computed in fp32 (fp64 for fp64
    inputs); differentiable in ``index_logits``.
    """
    acc = torch.float64 if torch.float64 in (index_logits.dtype, target_probs.dtype) else torch.float32
    logits = index_logits.to(acc)
    p = target_probs.to(acc)
    # A row without a finite logit has no softmax: give it a finite stand-in for the lse (its
    # log-probabilities stay -inf) so no inf - inf or 0 * inf appears, forward or backward.
    finite = torch.isfinite(logits)
    has_finite = finite.any(-1, keepdim=True)
    lse = torch.logsumexp(torch.where(has_finite, logits, 0.0), dim=-1, keepdim=True)
    pos = p > 0
    # Both logs are taken only where p > 0 (stand-ins elsewhere), so the discarded branch of the
    # final where holds 0 * 0, not 0 * inf: its gradient is 0, not NaN.
    log_q = torch.where(pos, logits - lse, 0.0)
    log_p = torch.log(torch.where(pos, p, 1.0))
    kl = torch.where(pos, p * (log_p - log_q), 0.0).sum(-1)
    if reduction == "none":
        return kl
    if reduction == "sum":
        return kl.sum()
    if reduction == "mean":
        return kl.mean()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
