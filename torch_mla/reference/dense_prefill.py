"""Reference ``mla::dense_prefill`` (varlen MHA-mode attention, GQA) and its backward.

Semantics (contract in meta/dense_prefill.py): sequences are packed along the token dimension by
``cu_seqlens_q`` / ``cu_seqlens_k``; query head h reads kv head ``h // (h_q // h_k)``; ``causal``
is bottom-right aligned (query i of a sequence with s_q queries and s_k keys sees key positions
``j <= i + s_k - s_q``). A query with no key, and a padding token past ``cu_seqlens_q[-1]``, gets
``out = 0`` and ``lse = +inf`` and contributes nothing to the gradients.

No value is read on the host: each token's sequence id and position come from
``torch.searchsorted`` on the cu_seqlens, and the attention runs over all t_k keys with a mask
(O(t_q * t_k) work, in chunks of query rows so the [rows, h_q, t_k] logits stay small).
Math in fp32 (fp64 for fp64 inputs, so gradcheck can run); outputs in the input dtypes.
"""

from __future__ import annotations

import math

import torch

from ..meta.common import stats_dtype

# Elements one chunk's [rows, h_q, t_k] intermediates may hold (several live at once in backward).
_BUDGET = 1 << 22


def _tokens(cu_seqlens: torch.Tensor, n: int):
    """Per token of a packed dimension of n tokens: (sequence id, position in it, valid).

    A token outside [cu[0], cu[-1]) is padding (valid False). Empty sequences own no token:
    searchsorted(right=True) puts a token after the last of equal boundaries.
    """
    num_seqs = cu_seqlens.shape[0] - 1
    cu = cu_seqlens.to(torch.int64).contiguous()
    idx = torch.arange(n, device=cu.device, dtype=torch.int64)
    seq = torch.searchsorted(cu, idx, right=True) - 1
    valid = (seq >= 0) & (seq < num_seqs)
    seq = seq.clamp(0, num_seqs - 1)
    pos = idx - cu[seq]
    # Padding tokens get sequence id -1 so that they match no other token.
    seq = torch.where(valid, seq, -1)
    return seq, pos, valid


class _Layout:
    """Token bookkeeping shared by the forward and the backward."""

    def __init__(self, cu_seqlens_q, cu_seqlens_k, t_q, t_k, causal):
        self.seq_q, self.pos_q, self.valid_q = _tokens(cu_seqlens_q, t_q)
        self.seq_k, self.pos_k, self.valid_k = _tokens(cu_seqlens_k, t_k)
        self.causal = causal
        if causal:
            cu_q = cu_seqlens_q.to(torch.int64)
            cu_k = cu_seqlens_k.to(torch.int64)
            s = self.seq_q.clamp_min(0)
            # Bottom-right alignment: query i sees keys j <= i + (s_k - s_q) of its sequence.
            self.last_k = self.pos_q + (cu_k[s + 1] - cu_k[s]) - (cu_q[s + 1] - cu_q[s])

    def mask(self, r0, r1):
        """[rows, t_k] bool: query row r (of r0:r1) sees key token c."""
        m = (self.seq_q[r0:r1, None] == self.seq_k[None, :]) & self.valid_q[r0:r1, None]
        if self.causal:
            m = m & (self.pos_k[None, :] <= self.last_k[r0:r1, None])
        return m

    def zero_padding(self, x, valid, cdt):
        """x in cdt with padding tokens (owned by no sequence) zeroed: whatever they hold, NaN
        included, must not reach a result through a 0 * NaN in a contraction."""
        return torch.where(valid.view(-1, *([1] * (x.dim() - 1))), x.to(cdt), 0.0)


def _row_chunk(h_q, t_k):
    return max(1, _BUDGET // max(1, h_q * t_k))


def _logits(qc, k, mask, sm_scale):
    """Scaled logits [h_k, group, rows, t_k], -inf where masked. qc: [rows, h_k, group, d]."""
    s = torch.einsum("chgd,thd->hgct", qc, k) * sm_scale
    return s.masked_fill(~mask[None, None], -math.inf)


def dense_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sm_scale,
                  causal=False):
    t_q, h_q, d_qk = q.shape
    t_k, h_k, d_v = v.shape
    group = h_q // h_k
    cdt = stats_dtype(q)
    out = q.new_zeros((t_q, h_q, d_v))
    lse = torch.full((t_q, h_q), math.inf, dtype=cdt, device=q.device)
    if t_q == 0 or t_k == 0 or cu_seqlens_q.shape[0] < 2:
        return out, lse  # no key or no sequence: every query sees nothing

    layout = _Layout(cu_seqlens_q, cu_seqlens_k, t_q, t_k, causal)
    qz = layout.zero_padding(q, layout.valid_q, cdt)
    kc = layout.zero_padding(k, layout.valid_k, cdt)
    vc = layout.zero_padding(v, layout.valid_k, cdt)
    rows = _row_chunk(h_q, t_k)
    for r0 in range(0, t_q, rows):
        r1 = min(t_q, r0 + rows)
        n = r1 - r0
        mask = layout.mask(r0, r1)
        s = _logits(qz[r0:r1].view(n, h_k, group, d_qk), kc, mask, sm_scale)
        row_max = s.amax(-1)
        # Rows with no visible key: shift by 0 so that exp(-inf) = 0 rather than NaN.
        shift = torch.where(row_max == -math.inf, 0.0, row_max)
        p = torch.exp(s - shift[..., None])
        denom = p.sum(-1)
        seen = denom > 0
        lse_c = torch.where(seen, shift + torch.log(denom), math.inf)
        o = torch.einsum("hgct,thv->chgv", p, vc)
        o = torch.where(seen.permute(2, 0, 1)[..., None], o / denom.permute(2, 0, 1)[..., None],
                        0.0)
        out[r0:r1] = o.reshape(n, h_q, d_v).to(q.dtype)
        lse[r0:r1] = lse_c.permute(2, 0, 1).reshape(n, h_q)
    return out, lse


def dense_prefill_backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                           max_seqlen_q, max_seqlen_k, sm_scale, causal=False):
    """Gradients of (out, lse) w.r.t. (q, k, v), recomputing P = exp(s - lse) per row chunk:
    ds = P * (dP - D + dlse) with dP = dout @ v^T and D = rowsum(dout * out);
    dq = scale * ds @ k, dk = scale * ds^T @ q, dv = P^T @ dout (dk, dv summed over each kv
    head's query heads)."""
    t_q, h_q, d_qk = q.shape
    t_k, h_k, d_v = v.shape
    group = h_q // h_k
    cdt = stats_dtype(q)
    dq = torch.zeros((t_q, h_q, d_qk), dtype=cdt, device=q.device)
    dk = torch.zeros((t_k, h_k, d_qk), dtype=cdt, device=q.device)
    dv = torch.zeros((t_k, h_k, d_v), dtype=cdt, device=q.device)
    if t_q == 0 or t_k == 0 or cu_seqlens_q.shape[0] < 2:
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

    layout = _Layout(cu_seqlens_q, cu_seqlens_k, t_q, t_k, causal)
    qz = layout.zero_padding(q, layout.valid_q, cdt)
    doz = layout.zero_padding(dout, layout.valid_q, cdt)
    kc = layout.zero_padding(k, layout.valid_k, cdt)
    vc = layout.zero_padding(v, layout.valid_k, cdt)
    rows = _row_chunk(h_q, t_k)
    for r0 in range(0, t_q, rows):
        r1 = min(t_q, r0 + rows)
        n = r1 - r0
        mask = layout.mask(r0, r1)
        qc = qz[r0:r1].view(n, h_k, group, d_qk)
        doc = doz[r0:r1].view(n, h_k, group, d_v)
        # [h_k, group, rows] views of the per-(query, head) statistics
        lse_c = lse[r0:r1].to(cdt).view(n, h_k, group).permute(1, 2, 0)
        dlse_c = dlse[r0:r1].to(cdt).view(n, h_k, group).permute(1, 2, 0)
        delta = (doc * out[r0:r1].to(cdt).view(n, h_k, group, d_v)).sum(-1).permute(1, 2, 0)

        s = _logits(qc, kc, mask, sm_scale)
        # Masked entries (and every entry of a row with no key, whose lse is +inf) are exactly 0;
        # where() also keeps a garbage dlse/lse of such rows from reaching the gradients.
        p = torch.where(mask[None, None], torch.exp(s - lse_c[..., None]), 0.0)
        dp = torch.einsum("chgv,thv->hgct", doc, vc)
        ds = torch.where(mask[None, None], p * (dp - delta[..., None] + dlse_c[..., None]), 0.0)

        dq[r0:r1] = (torch.einsum("hgct,thd->chgd", ds, kc) * sm_scale).reshape(n, h_q, d_qk)
        dk += torch.einsum("hgct,chgd->thd", ds, qc) * sm_scale
        dv += torch.einsum("hgct,chgv->thv", p, doc)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
