"""The toy DeepSeek-style block (torch_mla.toy_model), the demo and the tutorials.

- the block computes un-absorbed MLA attention over its top-k selection (float64 formula);
- decoding over the paged FP8 cache reproduces the prefill up to FP8 rounding;
- torch.compile(fullgraph=True) of prefill and decode_step: no graph break, same results, dynamic
  sequence lengths without recompiling, gradients through the compiled prefill, one Inductor build;
- torch.export of the prefill survives save/load in a fresh process;
- the tutorials and ``python -m torch_mla.demo`` run.
"""

import math
import os
import random
import subprocess
import sys

import pytest
import torch

from torch_mla.toy_model import PagedCache, ToyConfig, ToyMLABlock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small enough for quick CPU compiles; prefill does not need an FP8-cache d_qk.
TINY = ToyConfig(hidden=64, n_heads=4, q_rank=32, d_latent=48, d_rope=16, d_head=16, d_index=16,
                 topk=5)
# Decode needs d_qk 512 (MODEL1) or 576 (V32).
DECODE = ToyConfig(hidden=64, n_heads=4, q_rank=32, d_latent=448, d_rope=64, d_head=16,
                   d_index=16, topk=6)


def _seed():
    seed = random.SystemRandom().randrange(2**31)
    print("seed", seed)
    torch.manual_seed(seed)
    return seed


def _block(cfg, dtype=torch.float32):
    return ToyMLABlock(cfg).to(dtype)


# ---------------------------------------------------------------------------------------------
# what the block computes


def test_selection_is_causal_topk():
    _seed()
    block = _block(TINY, torch.float64)
    s = 11
    x = torch.randn(s, TINY.hidden, dtype=torch.float64)
    positions = torch.arange(s)
    kv = block.latent_kv(x, positions)
    idx = block.select(x, kv)
    assert idx.dtype == torch.int32 and idx.shape == (s, 1, TINY.topk)
    scores = (x @ block.w_iq.weight.T) @ (kv[:, :TINY.d_latent] @ block.w_ik.weight.T).T
    for i in range(s):
        got = sorted(int(t) for t in idx[i, 0] if t >= 0)
        n = min(i + 1, TINY.topk)
        assert int((idx[i, 0] < 0).sum()) == TINY.topk - n  # the rest is -1
        want = sorted(torch.topk(scores[i, : i + 1], n).indices.tolist())
        assert got == want


def test_prefill_is_unabsorbed_mla_over_the_selection():
    """Absorbed MLA (queries in latent space, h_kv 1) == per-head keys/values from the latent."""
    _seed()
    cfg = TINY
    block = _block(cfg, torch.float64)
    s = 9
    x = torch.randn(s, cfg.hidden, dtype=torch.float64)
    got = block.prefill(x)

    # Independent float64 MLA: expand the latent into per-head keys and values.
    pos = torch.arange(s, dtype=torch.float64)
    half = cfg.d_rope // 2
    inv_freq = cfg.rope_theta ** (-torch.arange(half, dtype=torch.float64) * 2 / cfg.d_rope)
    ang = pos[:, None] * inv_freq  # [s, half]

    def rope(v):  # v [s, ..., d_rope], pairs (i, i + half)
        c = ang.cos().view(s, *([1] * (v.dim() - 2)), half)
        sn = ang.sin().view(s, *([1] * (v.dim() - 2)), half)
        return torch.cat((v[..., :half] * c - v[..., half:] * sn,
                          v[..., :half] * sn + v[..., half:] * c), -1)

    def rms(v, w):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    qa = rms(x @ block.w_qa.weight.T, block.q_norm.weight)
    q = (qa @ block.w_qb.weight.T).view(s, cfg.n_heads, cfg.d_head + cfg.d_rope)
    q_nope, q_rope = q[..., : cfg.d_head], rope(q[..., cfg.d_head:])
    kva = x @ block.w_kva.weight.T
    latent = rms(kva[:, : cfg.d_latent], block.kv_norm.weight)
    k_rope = rope(kva[:, cfg.d_latent:])
    k_nope = torch.einsum("hdl,sl->shd", block.w_uk, latent)  # [s, h, d_head]
    v = torch.einsum("hld,sl->shd", block.w_uv, latent)
    idx = block.select(x, block.latent_kv(x, torch.arange(s)))[:, 0]
    scale = (cfg.d_head + cfg.d_rope) ** -0.5
    heads = torch.zeros(s, cfg.n_heads, cfg.d_head, dtype=torch.float64)
    for i in range(s):
        sel = idx[i][idx[i] >= 0].long()
        logits = (torch.einsum("hd,nhd->hn", q_nope[i], k_nope[sel])
                  + q_rope[i] @ k_rope[sel].T) * scale
        heads[i] = torch.einsum("hn,nhd->hd", torch.softmax(logits, -1), v[sel])
    want = heads.flatten(1) @ block.w_o.weight.T
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("layout_cfg", ["model1", "v32"])
def test_decode_over_fp8_cache_matches_prefill(layout_cfg):
    _seed()
    cfg = DECODE if layout_cfg == "model1" else ToyConfig(
        hidden=64, n_heads=4, q_rank=32, d_latent=512, d_rope=64, d_head=16, d_index=16, topk=6)
    assert cfg.layout == layout_cfg
    block = _block(cfg)
    s = 20
    xs = [torch.randn(s, cfg.hidden) for _ in range(2)]
    with torch.no_grad():
        refs = [block.prefill(x) for x in xs]
    cache = PagedCache.new(cfg, batch=2, max_len=s, block_size=4)
    starts = torch.tensor([3, 11])  # different lengths; the first is shorter than topk
    for seq in range(2):
        block.fill_cache(cache, xs[seq][: int(starts[seq])], seq)
    for step in range(s - 11):
        pos = (starts + step).clamp(max=s - 1)
        y = block.decode_step(torch.stack([xs[0][pos[0]], xs[1][pos[1]]]), pos, cache)
        for seq in range(2):
            ref = refs[seq][pos[seq]]
            err = ((y[seq] - ref).norm() / ref.norm()).item()
            assert err < 0.08, (seq, int(pos[seq]), err)  # FP8 rounding of the latent rows


def test_decode_indices_point_at_the_selected_tokens():
    _seed()
    cfg = DECODE
    block = _block(cfg)
    cache = PagedCache.new(cfg, batch=2, max_len=24, block_size=4, seed=3)
    x = torch.randn(24, cfg.hidden)
    block.fill_cache(cache, x[:10], 0)
    block.fill_cache(cache, x[:3], 1)
    pos = torch.tensor([9, 2])
    _, idx = block.decode_inputs(x[pos], pos, cache)
    assert idx.shape == (2, 1, cfg.topk) and idx.dtype == torch.int32
    bs = 4
    slot_to_token = {}
    for seq in range(2):
        for t in range(24):
            slot_to_token[(seq, int(cache.block_table[seq, t // bs]) * bs + t % bs)] = t
    for seq in range(2):
        n = min(int(pos[seq]) + 1, cfg.topk)
        valid = [int(i) for i in idx[seq, 0] if i >= 0]
        assert len(valid) == n and len(set(valid)) == n
        tokens = sorted(slot_to_token[(seq, i)] for i in valid)
        assert all(t <= int(pos[seq]) for t in tokens)
        keys = cache.index_keys[seq, : int(pos[seq]) + 1].double()
        scores = keys @ (x[pos[seq]].double() @ block.w_iq.weight.double().T)
        assert tokens == sorted(torch.topk(scores, n).indices.tolist())


# ---------------------------------------------------------------------------------------------
# torch.compile


def _explain(fn, *args):
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args)


def test_prefill_and_decode_have_no_graph_break():
    _seed()
    block = _block(DECODE)
    x = torch.randn(12, DECODE.hidden)
    e = _explain(block.prefill, x)
    assert e.graph_break_count == 0, e.break_reasons
    assert e.graph_count == 1
    cache = PagedCache.new(DECODE, batch=2, max_len=16, block_size=4)
    block.fill_cache(cache, x, 0)
    e = _explain(block.decode_step, x[:2], torch.tensor([12, 0]), cache)
    assert e.graph_break_count == 0, e.break_reasons
    assert e.graph_count == 1


def test_compiled_decode_matches_eager_and_writes_the_same_cache():
    _seed()
    cfg = DECODE
    block = _block(cfg)
    x = torch.randn(16, cfg.hidden)
    caches = [PagedCache.new(cfg, batch=2, max_len=16, block_size=4) for _ in range(2)]
    for c in caches:
        block.fill_cache(c, x[:8], 0)
        block.fill_cache(c, x[:5], 1)
    torch._dynamo.reset()
    step = torch.compile(block.decode_step, fullgraph=True, backend="aot_eager")
    pos = torch.tensor([8, 5])
    for i in range(3):
        xt = torch.randn(2, cfg.hidden)
        want = block.decode_step(xt, pos + i, caches[0])
        got = step(xt, pos + i, caches[1])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(caches[0].k_cache.view(torch.uint8), caches[1].k_cache.view(torch.uint8))
    torch.testing.assert_close(caches[0].index_keys, caches[1].index_keys, rtol=0, atol=0)


def test_compiled_prefill_dynamic_lengths_and_backward():
    _seed()
    block = _block(TINY)
    torch._dynamo.reset()
    compiled = torch.compile(block.prefill, fullgraph=True, dynamic=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for s in (3, 10, 17):  # 3 < topk: rows with -1 indices
            x = torch.randn(s, TINY.hidden, requires_grad=True)
            got = compiled(x)
            want = block.prefill(x)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            dout = torch.randn_like(got)
            params = [p for p in block.parameters() if p.requires_grad]
            g_got = torch.autograd.grad(got, [x, *params], dout, allow_unused=True)
            g_want = torch.autograd.grad(want, [x, *params], dout, allow_unused=True)
            for (name, _), a, b in zip([("x", x), *block.named_parameters()], g_got, g_want):
                if b is None:  # the selector: no gradient through the choice
                    assert a is None and name.startswith(("w_iq", "w_ik")), name
                    continue
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_inductor_prefill_matches_eager():
    _seed()
    block = _block(TINY)
    x = torch.randn(10, TINY.hidden)
    torch._dynamo.reset()
    compiled = torch.compile(block.prefill, fullgraph=True)  # default backend: Inductor
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block.prefill(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# torch.export


def test_export_save_load_in_new_process(tmp_path):
    _seed()
    block = _block(TINY).eval()
    seq = torch.export.Dim("seq", min=2, max=1024)
    with torch.no_grad():
        program = torch.export.export(block, (torch.randn(8, TINY.hidden),),
                                      dynamic_shapes={"x": {0: seq}})
    assert any(str(n.target) == "mla.sparse_prefill.default" for n in program.graph.nodes)
    inputs = [torch.randn(8, TINY.hidden), torch.randn(13, TINY.hidden)]
    with torch.no_grad():
        expected = [block(x) for x in inputs]
    torch.export.save(program, str(tmp_path / "p.pt2"))
    torch.save({"inputs": inputs, "expected": expected}, str(tmp_path / "io.pt"))
    code = (
        "import torch, torch_mla\n"
        f"p = torch.export.load({str(tmp_path / 'p.pt2')!r}).module()\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "for x, want in zip(io['inputs'], io['expected']):\n"
        "    torch.testing.assert_close(p(x), want, rtol=1e-6, atol=1e-6)\n"
        "print('reloaded ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "reloaded ok" in r.stdout


# ---------------------------------------------------------------------------------------------
# scripts


def _run(args, timeout):
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, f"{args} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.mark.parametrize("script", ["01_dsa_block.py", "02_train.py", "03_export.py"])
def test_tutorial_runs(script):
    out = _run([os.path.join("tutorials", script)], timeout=120)
    assert out.rstrip().endswith("ok")


def test_demo_runs():
    out = _run(["-m", "torch_mla.demo"], timeout=170)
    assert "sparse_decode backend" in out and "time / decode step, compiled" in out
    err = float(out.split("max |compiled - eager|")[1].split()[0])
    tol = 5e-2 if "bfloat16" in out else 1e-3  # bf16 on CUDA, f32 on the CPU
    assert math.isfinite(err) and err < tol
