"""Tutorial 4: DeepSeek Sparse Attention with the real lightning indexer: train it, then decode.

DeepSeek-V3.2's attention reads, for each query, only the top-k past tokens chosen by a small
"lightning indexer". This script builds such a block at toy size: the MLA attention of
``torch_mla.toy_model.ToyMLABlock`` (absorbed queries, one shared latent row per token) and an
indexer of its own, then:

1. selects tokens the inference way: ``indexer_quantize`` (Hadamard rotation + FP8 e4m3 with one
   scale per row) -> ``indexer_logits`` (FP8 scores over the causal window) -> ``indexer_topk``
   -> ``sparse_prefill`` over the selected tokens;
2. trains in DeepSeek's two stages, each step compiled with ``torch.compile(fullgraph=True)``:
   - dense warm-up: only the indexer learns, distilled from the (frozen) main attention over
     every causal key: target ``dense_attn_scores``, loss ``torch_mla.dsa.indexer_kl_loss`` of
     the differentiable ``indexer_scores``;
   - sparse stage: the attention runs over the indexer's top-k and trains on its task (imitating
     a dense-attention teacher) while the indexer keeps distilling, now over the selected tokens
     only (target ``sparse_attn_scores``); the indexer sees detached inputs, so it learns from
     its KL loss alone, and the selection is not differentiable, so the attention learns from its
     task loss alone;
3. decodes over paged caches: each new token is written with ``write_kv_cache`` (FP8 MLA cache)
   and ``write_indexer_cache`` (FP8 indexer keys), scored with ``indexer_logits_paged``, selected
   with ``indexer_topk``, mapped to cache slots with ``indexer_topk_to_cache_indices`` and
   attended with ``sparse_decode``, reproducing the prefill up to FP8 rounding.

On the CPU the ops run torch_mla's reference backend. The compiler backend is "aot_eager": it
traces each step into one graph (fullgraph=True: no graph break, the mla ops included) without
generating code, which keeps the CPU compile fast; the default ``backend="inductor"`` works too
and is the one to use on a GPU. Runs in about ten seconds:  python tutorials/04_dsa_indexer.py
"""

import torch
from torch import nn

import torch_mla
from torch_mla import dsa
from torch_mla.toy_model import PagedCache, ToyConfig, ToyMLABlock, rotate

torch.manual_seed(0)
COMPILE = dict(backend="aot_eager", fullgraph=True)

# d_qk = 448 + 64 = 512: the MODEL1 FP8 cache layout, which sparse_decode reads.
cfg = ToyConfig(hidden=64, n_heads=4, q_rank=32, d_latent=448, d_rope=64, d_head=16, topk=8)
SEQ = 40  # tokens per training sequence; each query attends to at most topk = 8 of them


class LightningIndexer(nn.Module):
    """DeepSeek-V3.2's indexer at toy size: ``heads`` query vectors per token (from the block's
    low-rank query latent), one key per token, a weight per head, rotary embedding on the first
    ``d_rope`` dims. Score of query t for key s: ``sum_h w[t, h] * ReLU(q[t, h] . k[s])``."""

    def __init__(self, cfg: ToyConfig, heads: int = 4, dim: int = 32, d_rope: int = 16):
        super().__init__()
        self.heads, self.dim, self.d_rope, self.theta = heads, dim, d_rope, cfg.rope_theta
        self.w_q = nn.Linear(cfg.q_rank, heads * dim, bias=False)
        self.w_k = nn.Linear(cfg.hidden, dim, bias=False)
        self.k_norm = nn.LayerNorm(dim)
        self.w_w = nn.Linear(cfg.hidden, heads, bias=False)
        # 1/sqrt(dim) (the logits' softmax scale) and 1/sqrt(heads) folded into the weights
        self.scale = (dim * heads) ** -0.5

    def _rope(self, x, positions):
        r = self.d_rope
        return torch.cat((rotate(x[..., :r], positions, self.theta), x[..., r:]), dim=-1)

    def forward(self, x, q_latent, positions):
        """-> q ``[n, heads, dim]``, k ``[n, dim]``, weights ``[n, heads]`` (f32)."""
        q = self.w_q(q_latent).view(-1, self.heads, self.dim)
        q = self._rope(q, positions.unsqueeze(-1))
        k = self._rope(self.k_norm(self.w_k(x)), positions)
        return q, k, self.w_w(x) * self.scale


block = ToyMLABlock(cfg)
indexer = LightningIndexer(cfg)
teacher = ToyMLABlock(cfg).requires_grad_(False)  # dense-attention teacher for the task loss


def q_latent(blk, x):
    return blk.q_norm(blk.w_qa(x))


def causal_window(s, device=None):
    return (torch.zeros(s, dtype=torch.int32, device=device),
            torch.arange(1, s + 1, dtype=torch.int32, device=device))


def select(q_i, k_i, w, k_start, k_end):
    """The inference selection: FP8 indexer logits over each query's window, then top-k."""
    q_fp8, q_scale = torch_mla.indexer_quantize(q_i)  # Hadamard + e4m3, scale [s, heads]
    k_fp8, k_scale = torch_mla.indexer_quantize(k_i)
    # q's scale folds into the weights (exact: ReLU commutes with a positive factor)
    logits = torch_mla.indexer_logits(q_fp8, k_fp8, k_scale, w * q_scale, k_start, k_end)
    return torch_mla.indexer_topk(logits, cfg.topk, k_start=k_start, k_end=k_end)  # -1 padded


def dense_teacher(x):
    positions = torch.arange(x.shape[0])
    k_start, k_end = causal_window(x.shape[0])
    idx = dsa.window_indices(k_start, k_end, x.shape[0])
    out, _, _ = torch_mla.sparse_prefill(teacher.queries(x, positions),
                                         teacher.latent_kv(x, positions).unsqueeze(1),
                                         idx[:, None], teacher.sm_scale, cfg.d_latent)
    return teacher.output(out)


# ---- stage 1: dense warm-up (indexer only) -------------------------------------------------

def dense_warmup_loss(x):
    s = x.shape[0]
    positions = torch.arange(s)
    k_start, k_end = causal_window(s)
    with torch.no_grad():  # the main attention is frozen in this stage
        q = block.queries(x, positions)
        kv = block.latent_kv(x, positions).unsqueeze(1)
        idx = dsa.window_indices(k_start, k_end, s)  # every causal key
        _, _, lse = torch_mla.sparse_prefill(q, kv, idx[:, None], block.sm_scale, cfg.d_latent)
        target = torch_mla.dense_attn_scores(q, kv, lse, block.sm_scale, k_start, k_end)
    q_i, k_i, w = indexer(x, q_latent(block, x).detach(), positions)
    return dsa.indexer_kl_loss(torch_mla.indexer_scores(q_i, k_i, w, idx), target)


# ---- stage 2: sparse training (attention on its task, indexer on its KL) ---------------------

def sparse_losses(x, target):
    s = x.shape[0]
    positions = torch.arange(s)
    k_start, k_end = causal_window(s)
    q_i, k_i, w = indexer(x.detach(), q_latent(block, x).detach(), positions)
    idx = select(q_i.detach(), k_i.detach(), w.detach(), k_start, k_end)  # [s, topk] int32
    q = block.queries(x, positions)
    kv = block.latent_kv(x, positions).unsqueeze(1)
    out, _, lse = torch_mla.sparse_prefill(q, kv, idx[:, None], block.sm_scale, cfg.d_latent)
    task = (block.output(out) - target).pow(2).mean() / target.pow(2).mean()
    p = torch_mla.sparse_attn_scores(q.detach(), kv.detach(), idx[:, None], lse.detach(),
                                     block.sm_scale)
    kl = dsa.indexer_kl_loss(torch_mla.indexer_scores(q_i, k_i, w, idx), p)
    return task, kl


data = [torch.randn(SEQ, cfg.hidden) for _ in range(2)]
with torch.no_grad():
    targets = [dense_teacher(x) for x in data]


def mean(v):
    return sum(v) / len(v)


warmup = torch.compile(dense_warmup_loss, **COMPILE)
opt = torch.optim.Adam(indexer.parameters(), lr=1e-2)
kl_dense = []
for step in range(30):
    loss = warmup(data[step % 2])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    kl_dense.append(loss.item())
    if step % 10 == 0 or step == 29:
        print(f"dense warm-up step {step:2d}  KL {loss.item():.4f}")
assert all(p.grad is None for p in block.parameters())  # the attention did not train
print(f"dense warm-up: KL {mean(kl_dense[:4]):.4f} -> {mean(kl_dense[-4:]):.4f}")
assert mean(kl_dense[-4:]) < 0.7 * mean(kl_dense[:4]), kl_dense

sparse = torch.compile(sparse_losses, **COMPILE)
opt = torch.optim.Adam([{"params": block.parameters(), "lr": 1e-3},
                        {"params": indexer.parameters(), "lr": 1e-2}])
tasks, kls = [], []
for step in range(40):
    task, kl = sparse(data[step % 2], targets[step % 2])
    opt.zero_grad(set_to_none=True)
    (task + kl).backward()  # disjoint graphs: the task trains the block, the KL the indexer
    opt.step()
    tasks.append(task.item())
    kls.append(kl.item())
    if step % 10 == 0 or step == 39:
        print(f"sparse step {step:2d}  task {task.item():.4f}  KL {kl.item():.4f}")
print(f"sparse stage: task {mean(tasks[:4]):.4f} -> {mean(tasks[-4:]):.4f}, "
      f"KL {mean(kls[:4]):.4f} -> {mean(kls[-4:]):.4f}")
assert mean(tasks[-4:]) < 0.5 * mean(tasks[:4]), tasks
# The KL jumps in the first steps (the attention it imitates starts to move), then the indexer
# catches up.
assert mean(kls[-4:]) < 0.8 * mean(kls[:4]), kls

# ---- inference: prefill, then decoding over paged FP8 caches --------------------------------
block.eval()
prompt = data[0]
with torch.no_grad():
    positions = torch.arange(SEQ)
    k_start, k_end = causal_window(SEQ)
    q_i, k_i, w = indexer(prompt, q_latent(block, prompt), positions)
    idx_prefill = select(q_i, k_i, w, k_start, k_end)
    out, _, _ = torch_mla.sparse_prefill(block.queries(prompt, positions),
                                         block.latent_kv(prompt, positions).unsqueeze(1),
                                         idx_prefill[:, None], block.sm_scale, cfg.d_latent)
    y_prefill = block.output(out)

# Two sequences (both the same prompt, so both must reproduce the prefill), blocks of 16 tokens
# in shuffled order. The MLA cache and the indexer cache share the block table.
cache = PagedCache.new(cfg, batch=2, max_len=SEQ, block_size=16)
icache = torch_mla.new_indexer_cache(cache.k_cache.shape[0], cache.block_size, indexer.dim)
MAX_LEN = cache.block_table.shape[1] * cache.block_size


def write_tokens(x, positions, seqs):
    """Write tokens into both caches (their FP8 MLA row and their FP8 indexer key)."""
    slots = cache.slots(seqs, positions)
    torch_mla.write_kv_cache(cache.k_cache, block.latent_kv(x, positions), slots, cache.layout)
    _, k_new, _ = indexer(x, q_latent(block, x), positions)
    torch_mla.write_indexer_cache(icache, k_new, slots)  # rotated + quantized on the way in


@torch.no_grad()
def decode_step(x_t, positions):
    """One new token per sequence (``x_t [b, hidden]`` at ``positions [b]``) -> ``[b, hidden]``;
    also returns the selected positions."""
    b = x_t.shape[0]
    seqs = torch.arange(b)
    write_tokens(x_t, positions, seqs)
    q_i, _, w = indexer(x_t, q_latent(block, x_t), positions)
    q_fp8, q_scale = torch_mla.indexer_quantize(q_i[:, None])  # [b, next_n = 1, heads, dim]
    logits = torch_mla.indexer_logits_paged(
        q_fp8, icache, w * q_scale[:, 0], (positions + 1).to(torch.int32), cache.block_table,
        MAX_LEN)  # [b, MAX_LEN]: -inf past each sequence's length
    chosen = torch_mla.indexer_topk(logits, cfg.topk)  # positions, -1 padded
    slots = torch_mla.indexer_topk_to_cache_indices(chosen[:, None], cache.block_table,
                                                    cache.block_size,
                                                    batch_ids=seqs[:, None])  # [b, 1, topk]
    q = block.queries(x_t, positions)[:, None]
    out, _ = torch_mla.sparse_decode(q, cache.k_cache, slots, d_v=cfg.d_latent,
                                     sm_scale=block.sm_scale)
    return block.output(out[:, 0]), chosen


start = 24  # tokens written at once (the prompt's prefill), the rest decoded one by one
with torch.no_grad():
    for seq in (0, 1):
        write_tokens(prompt[:start], torch.arange(start), torch.full((start,), seq))
step_fn = torch.compile(decode_step, **COMPILE)
ys, same = [], 0
for t in range(start, SEQ):
    pos = torch.tensor([t, t])
    y, chosen = step_fn(prompt[[t, t]], pos)
    ys.append(y[0])
    same += int(torch.equal(chosen[0].sort().values, idx_prefill[t].sort().values))
    assert torch.equal(y[0], y[1]) or torch.allclose(y[0], y[1], atol=1e-6)
y_dec = torch.stack(ys)
err = ((y_dec - y_prefill[start:]).norm() / y_prefill[start:].norm()).item()
print(f"decode: same top-k as the prefill for {same}/{SEQ - start} tokens, "
      f"relative error vs prefill {err:.4f} (FP8 caches)")
assert same >= SEQ - start - 1 and err < 0.06, (same, err)
print(torch_mla.explain("indexer_topk", torch.zeros(2, MAX_LEN), cfg.topk))
print("ok")
