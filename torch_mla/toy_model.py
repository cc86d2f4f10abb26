"""A small DeepSeek-style sparse MLA attention block, built on torch_mla's ops.

It has the structure of a DeepSeek-V3.2 / V4 attention layer at toy sizes, so it runs on a CPU:

- queries: a low-rank projection with RMSNorm (``W_qa`` -> norm -> ``W_qb``), per head a "nope"
  part and a rotary ("rope") part;
- keys/values: one shared latent per token, ``W_kva`` -> ``[d_latent | d_rope]``, the latent
  RMS-normed, the rope part rotated. That row of ``d_qk = d_latent + d_rope`` numbers is all the
  KV cache holds (``h_kv = 1``);
- absorbed MLA: the per-head key up-projection ``W_uk`` is folded into the query (``q_nope @ W_uk``
  lands in latent space), so attention is multi-query over the latent rows, and the value
  up-projection ``W_uv`` is applied to the attention output (which is in latent space too);
- a top-k selector standing in for DSA's lightning indexer: ``scores = (x W_iq) . (latent W_ik)``
  over the past tokens, the best ``topk`` kept (no gradient flows through the choice);
- ``prefill(x)`` runs ``torch_mla.sparse_prefill`` over the latent rows (differentiable: training
  goes through it); ``decode_step`` writes the new token into a paged FP8 cache
  (``torch_mla.write_kv_cache``) and runs ``torch_mla.sparse_decode`` with in-cache indices.

Everything traces under ``torch.compile(fullgraph=True)`` and ``torch.export``: no ``.item()``, no
Python branch on tensor values, every shape follows from the input shapes. Unavailable top-k
slots are index -1, which every torch_mla op skips.

The FP8 cache fixes ``d_qk``: 512 (``d_latent`` 448 + ``d_rope`` 64, the MODEL1 layout) or 576
(512 + 64, the V32 layout).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import nn

from . import api
from .meta import layouts

Tensor = torch.Tensor


@dataclasses.dataclass
class ToyConfig:
    hidden: int = 256  # model width
    n_heads: int = 16  # h_q
    q_rank: int = 128  # low-rank query bottleneck
    d_latent: int = 448  # KV latent (the values are this wide, before W_uv)
    d_rope: int = 64  # rotary part of each key and query
    d_head: int = 32  # per-head width of the un-absorbed q_nope / value
    d_index: int = 32  # selector ("indexer") key width
    topk: int = 16  # keys each query attends to
    rope_theta: float = 10000.0

    @property
    def d_qk(self) -> int:
        return self.d_latent + self.d_rope

    @property
    def layout(self) -> str:
        """The FP8 cache layout for this d_qk ("model1" for 512, "v32" for 576)."""
        return layouts.layout_for_d_qk(self.d_qk, "d_latent + d_rope").name


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # the mean of squares in f32 at least, also for bf16 models
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def rotate(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotary embedding of ``x [..., d_rope]`` (rotating the pairs (i, i + d_rope/2)) at
    ``positions``, which broadcast against ``x.shape[:-1]`` (``[n]`` for ``x [n, d_rope]``,
    ``[n, 1]`` for per-head ``x [n, h, d_rope]``). Angles are computed in f32 (f64 for f64 x),
    never in bf16, which would round positions past 256."""
    d = x.shape[-1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=dtype) / d)
    angles = positions.to(dtype).unsqueeze(-1) * inv_freq  # [..., d_rope/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


@dataclasses.dataclass
class PagedCache:
    """The decode-time state of one layer for a batch of sequences.

    k_cache:     packed FP8 cache ``[num_blocks, block_size, 1, bytes]`` (``torch_mla`` layout
                 "model1" or "v32"), what ``sparse_decode`` reads;
    index_keys:  ``[b, max_len, d_index]`` f32, the selector's keys per token position;
    block_table: ``[b, max_blocks]`` int32, the cache block holding each sequence's
                 ``block_size`` tokens, so token t of sequence i lives in slot
                 ``block_table[i, t // block_size] * block_size + t % block_size``.
    """

    k_cache: Tensor
    index_keys: Tensor
    block_table: Tensor
    layout: str

    @property
    def block_size(self) -> int:
        return self.k_cache.shape[1]

    @staticmethod
    def new(cfg: ToyConfig, batch: int, max_len: int, block_size: int = 16, device=None,
            seed: int = 0) -> "PagedCache":
        """An empty cache for ``batch`` sequences of up to ``max_len`` tokens. Blocks are handed
        out in a shuffled order, as a paged allocator would, so the paging is really exercised."""
        lay = layouts.LAYOUTS[cfg.layout]
        per_seq = -(-max_len // block_size)
        num_blocks = batch * per_seq
        k_cache = layouts.empty_cache(num_blocks, block_size, lay, device=device)
        k_cache.view(torch.uint8).zero_()
        perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
        block_table = perm.view(batch, per_seq).to(device=device, dtype=torch.int32)
        index_keys = torch.zeros(batch, per_seq * block_size, cfg.d_index, device=device)
        return PagedCache(k_cache, index_keys, block_table, lay.name)

    def slots(self, seqs: Tensor, positions: Tensor) -> Tensor:
        """In-cache slot (int64) of token ``positions`` of sequence ``seqs`` (broadcast together):
        ``block_table[seq, pos // block_size] * block_size + pos % block_size``."""
        bs = self.block_size
        pos = positions.to(torch.int64)
        block = self.block_table[seqs, pos // bs].to(torch.int64)
        return block * bs + pos % bs


def _topk_past(scores: Tensor, visible: Tensor, k: int) -> Tensor:
    """Per row, the column ids of the ``k`` best visible scores, -1 where fewer are visible.

    ``scores``/``visible`` are ``[..., n]``. ``k`` extra always-invisible columns are appended so
    ``topk`` never asks for more columns than exist, whatever n is (no shape-dependent branch);
    any pick that lands on an invisible column becomes -1."""
    neg = torch.full_like(scores, float("-inf"))
    masked = torch.where(visible, scores, neg)
    pad = masked.new_full((*masked.shape[:-1], k), float("-inf"))
    vals, idx = torch.cat((masked, pad), dim=-1).topk(k, dim=-1)
    return torch.where(vals > float("-inf"), idx, torch.full_like(idx, -1))


class ToyMLABlock(nn.Module):
    """One DeepSeek-style sparse MLA attention layer (see the module docstring)."""

    def __init__(self, cfg: Optional[ToyConfig] = None):
        super().__init__()
        cfg = cfg or ToyConfig()
        self.cfg = cfg
        h, dh, dr = cfg.n_heads, cfg.d_head, cfg.d_rope
        self.w_qa = nn.Linear(cfg.hidden, cfg.q_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_rank)
        self.w_qb = nn.Linear(cfg.q_rank, h * (dh + dr), bias=False)
        self.w_kva = nn.Linear(cfg.hidden, cfg.d_latent + dr, bias=False)
        self.kv_norm = RMSNorm(cfg.d_latent)
        # Per-head up-projections of the latent to keys (nope part) and values; absorbed into the
        # query and the output instead of being applied to every cached row.
        self.w_uk = nn.Parameter(torch.randn(h, dh, cfg.d_latent) / math.sqrt(cfg.d_latent))
        self.w_uv = nn.Parameter(torch.randn(h, cfg.d_latent, dh) / math.sqrt(cfg.d_latent))
        self.w_o = nn.Linear(h * dh, cfg.hidden, bias=False)
        # The selector (stand-in for DSA's lightning indexer).
        self.w_iq = nn.Linear(cfg.hidden, cfg.d_index, bias=False)
        self.w_ik = nn.Linear(cfg.d_latent, cfg.d_index, bias=False)
        # The logit scale of the un-absorbed head (q_nope . k_nope + q_rope . k_rope).
        self.sm_scale = (dh + dr) ** -0.5

    # -- the pieces shared by prefill and decode ---------------------------------------------

    def queries(self, x: Tensor, positions: Tensor) -> Tensor:
        """``x [n, hidden]`` -> absorbed queries ``[n, h, d_latent + d_rope]``."""
        cfg = self.cfg
        q = self.w_qb(self.q_norm(self.w_qa(x))).view(-1, cfg.n_heads, cfg.d_head + cfg.d_rope)
        q_nope, q_rope = q.split([cfg.d_head, cfg.d_rope], dim=-1)
        q_latent = torch.einsum("nhd,hdl->nhl", q_nope, self.w_uk)  # into latent space
        q_rope = rotate(q_rope, positions.unsqueeze(-1), cfg.rope_theta)
        return torch.cat((q_latent, q_rope), dim=-1)

    def latent_kv(self, x: Tensor, positions: Tensor) -> Tensor:
        """``x [n, hidden]`` -> the cached rows ``[n, d_latent + d_rope]``."""
        cfg = self.cfg
        latent, k_rope = self.w_kva(x).split([cfg.d_latent, cfg.d_rope], dim=-1)
        k_rope = rotate(k_rope, positions, cfg.rope_theta)
        return torch.cat((self.kv_norm(latent), k_rope), dim=-1)

    def index_keys(self, kv: Tensor) -> Tensor:
        """Selector keys of the cached rows ``kv [n, d_qk]`` -> ``[n, d_index]`` (f32)."""
        return self.w_ik(kv[..., : self.cfg.d_latent]).float()

    def output(self, attn_latent: Tensor) -> Tensor:
        """Attention output in latent space ``[n, h, d_latent]`` -> ``[n, hidden]``."""
        o = torch.einsum("nhl,hld->nhd", attn_latent, self.w_uv)
        return self.w_o(o.flatten(1))

    # -- prefill (training and prompt processing) --------------------------------------------

    @torch.no_grad()
    def select(self, x: Tensor, kv: Tensor) -> Tensor:
        """Top-k causal selection for a whole sequence: ``[s, 1, topk]`` int32 rows of ``kv``."""
        s = x.shape[0]
        scores = self.w_iq(x).float() @ self.index_keys(kv).T  # [s, s]
        pos = torch.arange(s, device=x.device)
        causal = pos.unsqueeze(1) >= pos.unsqueeze(0)
        return _topk_past(scores, causal, self.cfg.topk).to(torch.int32).unsqueeze(1)

    def prefill_inputs(self, x: Tensor):
        """The ``sparse_prefill`` inputs for one sequence ``x [s, hidden]``: queries
        ``[s, h, d_qk]``, latent rows ``[s, 1, d_qk]`` and indices ``[s, 1, topk]``."""
        positions = torch.arange(x.shape[0], device=x.device)
        kv = self.latent_kv(x, positions)
        return self.queries(x, positions), kv.unsqueeze(1), self.select(x, kv)

    def prefill(self, x: Tensor) -> Tensor:
        """Causal sparse attention over one sequence ``x [s, hidden]`` -> ``[s, hidden]``.
        Differentiable with respect to every parameter but the selector's."""
        q, kv, indices = self.prefill_inputs(x)
        out, _, _ = api.sparse_prefill(q, kv, indices, self.sm_scale, self.cfg.d_latent)
        return self.output(out)

    forward = prefill

    # -- decoding over the paged FP8 cache ---------------------------------------------------

    @torch.no_grad()
    def write_cache(self, cache: PagedCache, x: Tensor, positions: Tensor, seqs: Tensor) -> None:
        """Write tokens ``x [n, hidden]`` (token ``positions[i]`` of sequence ``seqs[i]``) into the
        cache: the latent row, quantized to FP8 in its slot, and the selector key."""
        kv = self.latent_kv(x, positions)
        api.write_kv_cache(cache.k_cache, kv.contiguous(), cache.slots(seqs, positions),
                           cache.layout)
        cache.index_keys.index_put_((seqs, positions), self.index_keys(kv))

    def fill_cache(self, cache: PagedCache, x: Tensor, seq: int = 0) -> None:
        """Write a prompt ``x [s, hidden]`` as tokens 0..s-1 of sequence ``seq``."""
        positions = torch.arange(x.shape[0], device=x.device)
        self.write_cache(cache, x, positions, torch.full_like(positions, seq))

    @torch.no_grad()
    def decode_inputs(self, x_t: Tensor, positions: Tensor, cache: PagedCache):
        """The ``sparse_decode`` inputs for new tokens ``x_t [b, hidden]`` at ``positions [b]``
        (already in the cache): queries ``[b, 1, h, d_qk]`` and in-cache indices
        ``[b, 1, topk]`` of the ``topk`` best tokens among each sequence's ``0..positions[i]``."""
        b = x_t.shape[0]
        seqs = torch.arange(b, device=x_t.device)
        # Score every token position of the cache, hide the future (and never-written) ones.
        scores = torch.einsum("bd,btd->bt", self.w_iq(x_t).float(), cache.index_keys)
        t = torch.arange(cache.index_keys.shape[1], device=x_t.device)
        tokens = _topk_past(scores, t.unsqueeze(0) <= positions.unsqueeze(1), self.cfg.topk)
        # Token ids -> in-cache slots through the block table; -1 stays -1 (skipped).
        slots = cache.slots(seqs.unsqueeze(1), tokens.clamp_min(0))
        indices = torch.where(tokens >= 0, slots, torch.full_like(slots, -1)).to(torch.int32)
        q = self.queries(x_t, positions).unsqueeze(1)
        return q, indices.unsqueeze(1)

    @torch.no_grad()
    def decode_step(self, x_t: Tensor, positions: Tensor, cache: PagedCache) -> Tensor:
        """One new token per sequence: ``x_t [b, hidden]`` at ``positions [b]`` (int64, how many
        tokens sequence i already has cached) -> ``[b, hidden]``. Writes the token into ``cache``,
        then attends over the FP8 cache to the ``topk`` best of tokens ``0..positions[i]``."""
        seqs = torch.arange(x_t.shape[0], device=x_t.device)
        self.write_cache(cache, x_t, positions, seqs)
        q, indices = self.decode_inputs(x_t, positions, cache)
        out, _ = api.sparse_decode(q, cache.k_cache, indices, d_v=self.cfg.d_latent,
                                   sm_scale=self.sm_scale)
        return self.output(out.squeeze(1))
