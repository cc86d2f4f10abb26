"""Tutorial 1: a DeepSeek sparse-attention (DSA) block, from prompt to decoding.

Walks through what ``torch_mla.toy_model.ToyMLABlock`` does with torch_mla's ops:
prefill of a prompt with ``sparse_prefill``, the prompt written into a paged FP8 KV cache with
``write_kv_cache``, then token-by-token decoding with ``sparse_decode``. Runs on the CPU in a few
seconds:  python tutorials/01_dsa_block.py
"""

import torch

import torch_mla
from torch_mla.toy_model import PagedCache, ToyConfig, ToyMLABlock

torch.manual_seed(0)

# A block with DeepSeek's structure at toy sizes: 16 query heads, each key/value one shared latent
# row of d_qk = 448 (latent) + 64 (rotary) = 512 numbers, which is the "MODEL1" FP8 cache layout
# (512 + 64 = 576 would be DeepSeek-V3.2's "V32" layout). Each query attends to its 16 best keys.
cfg = ToyConfig(hidden=256, n_heads=16, d_latent=448, d_rope=64, topk=16)
block = ToyMLABlock(cfg).eval()
print(f"d_qk = {cfg.d_qk}, FP8 cache layout: {cfg.layout}")

# ---- 1. Prefill -------------------------------------------------------------------------------
# One sequence of 40 tokens. prefill_inputs() shows what sparse_prefill receives:
#   q       [s, h_q, d_qk]  queries, absorbed into latent space (+ their rotary part)
#   kv      [s, 1, d_qk]    one latent row per token, shared by all heads (h_kv = 1)
#   indices [s, 1, topk]    int32: for each query, the rows of kv it attends to; -1 = nothing
prompt_len = 40
prompt = torch.randn(prompt_len, cfg.hidden)
q, kv, indices = block.prefill_inputs(prompt)
print("q", tuple(q.shape), "kv", tuple(kv.shape), "indices", tuple(indices.shape))
print("token 3 may only see tokens 0..3, so it has", int((indices[3] >= 0).sum()), "valid indices")
print(torch_mla.explain("sparse_prefill", q, kv, indices, block.sm_scale, cfg.d_latent))

# The op itself: out is in latent space (values are the first d_v = 448 columns of kv), lse and
# max_logits are per query and head.
out, max_logits, lse = torch_mla.sparse_prefill(q, kv, indices, block.sm_scale, d_v=cfg.d_latent)
print("sparse_prefill out", tuple(out.shape), "lse", tuple(lse.shape))
with torch.no_grad():
    y_prefill = block.prefill(prompt)  # = block.output(out): latent -> heads -> hidden

# ---- 2. The paged FP8 cache -------------------------------------------------------------------
# Two sequences, each up to 48 tokens, in blocks of 16 tokens handed out in shuffled order.
# k_cache holds 584 bytes per token (448 e4m3 + 64 bf16 + 8 scale bytes, FlashMLA's bytes).
cache = PagedCache.new(cfg, batch=2, max_len=48, block_size=16)
print("k_cache", tuple(cache.k_cache.shape), cache.k_cache.dtype,
      "block_table", cache.block_table.tolist())
# Sequence 0 gets the prompt's first 32 tokens, sequence 1 its first 36; write_kv_cache quantizes
# each latent row into slot block_table[seq, t // 16] * 16 + t % 16.
block.fill_cache(cache, prompt[:32], seq=0)
block.fill_cache(cache, prompt[:36], seq=1)

# ---- 3. Decoding ------------------------------------------------------------------------------
# Feed both sequences the rest of the prompt one token at a time. decode_step writes the new token
# into the cache, selects its top-k tokens among the cached ones, maps them to in-cache slots and
# runs sparse_decode over the FP8 cache.
start = torch.tensor([32, 36])  # tokens already cached per sequence
outputs = {0: [], 1: []}
for step in range(prompt_len - 32):
    # Sequence 1 runs out of prompt first: it then repeats its last token (rewriting the same
    # slot with the same bytes) and those outputs are ignored.
    positions = (start + step).clamp(max=prompt_len - 1)
    y_t = block.decode_step(prompt[positions], positions, cache)
    for seq in (0, 1):
        if start[seq] + step < prompt_len:
            outputs[seq].append(y_t[seq])

# Decoding the prompt's tokens over the cache reproduces the prefill, up to FP8 rounding of the
# cached latent rows (a few percent).
for seq, start in ((0, 32), (1, 36)):
    y = torch.stack(outputs[seq])
    ref = y_prefill[start:]
    err = ((y - ref).norm() / ref.norm()).item()
    print(f"sequence {seq}: decode vs prefill relative error {err:.4f}")
    assert err < 0.06, err

q_t, idx_t = block.decode_inputs(prompt[[39, 39]], torch.tensor([39, 39]), cache)
print(torch_mla.explain("sparse_decode", q_t, cache.k_cache, idx_t, d_v=cfg.d_latent,
                        sm_scale=block.sm_scale))
print("ok")
