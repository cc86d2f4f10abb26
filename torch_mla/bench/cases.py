"""The benchmark cases: shapes, inputs, FLOP/byte counts and one callable per backend.

Shapes are the rows of the FlashMLA peer table (shared/peers/flashmla/README.md) plus the ops
FlashMLA lacks: sparse backward, the KV-cache writer and the DSA lightning indexer
(DeepSeek-V3.2: 64 heads of dim 128, FP8 q and k, top-2048; the shapes of the targets in
torch_mla/triton/indexer.py). Inputs follow FlashMLA's tests: values ``randn / 10`` clamped to
[-1, 1] (bf16), each batch element owns its cache blocks (a shuffled block table), cache lengths
padded to 4 blocks, sparse indices drawn without replacement within the valid range (per query
row), full lengths (no topk_length, every cache_seqlens = s_k); the indexer's FP8 inputs come
from indexer_quantize of random bf16 (randn, unscaled). ``--tiny`` shrinks every shape (head
dims stay real: the FP8 layouts fix them) so the whole table runs on a CPU in seconds.

A backend is one of ``BACKENDS``: torch_mla's own ("triton", "native", "reference", forced with
``torch_mla.use_backend``; for sparse_decode also "native-serial", the native library's first,
serial mma.sync kernel instead of its default warp-specialized wgmma one, csrc/sm90/
sparse_decode/) and the peers ("flashmla", for dense
prefill "sdpa" and "flex", and "torch": a plain-PyTorch baseline of an indexer op, torch.topk
for indexer_topk and a chunked bf16 formula for indexer_logits; every other case refuses it
with a reason). ``baseline_of``
names the baseline whose time each row is compared with in its note.
``Built.calls`` maps a backend to a zero-argument callable, ``Built.refused`` to the reason it
cannot run the case; a backend that raises when first called is recorded as refusing too.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Dict, List, Optional

import torch

import torch_mla
from torch_mla.meta.layouts import LAYOUTS, empty_cache

from . import flops as F
from .peers import flashmla, flex_attention

OURS = ("triton", "native", "reference")
NATIVE_SERIAL = "native-serial"
BACKENDS = OURS + (NATIVE_SERIAL, "flashmla", "sdpa", "flex", "torch")
INDEXER_OPS = ("indexer_logits", "indexer_logits_paged", "indexer_topk", "indexer_quantize",
               "write_indexer_cache")
OPS = ("dense_decode", "sparse_decode", "sparse_prefill", "sparse_prefill_bwd", "dense_prefill",
       "dense_prefill_bwd", "kv_cache_write", "host_overhead") + INDEXER_OPS

# The reference (fp32 PyTorch, gathers materialised) runs only below these sizes: beyond them a
# case takes minutes and tens of GB.
REF_MAX_FLOPS = 2e10
REF_MAX_BYTES = 4e9


@dataclasses.dataclass
class Case:
    op: str
    name: str
    spec: dict
    # what the timing measures: "device" (time per call on the device) or "host" (host time of
    # one eager call, GPU idle)
    kind: str = "device"


@dataclasses.dataclass
class Built:
    flops: float
    nbytes: float
    calls: Dict[str, Callable[[], object]]
    refused: Dict[str, str]
    ref_ok: bool = True
    note: str = ""
    # bytes the roof is computed from, when FlashMLA's count is not the minimal DRAM traffic
    # (sparse prefill counts every gathered row; distinct rows are what must come from DRAM)
    roof_nbytes: Optional[float] = None
    # which rate bounds the FLOPs (roof.KINDS): "matmul" (bf16), "fp8", or "bytes" (memory only)
    roof: str = "matmul"
    # a second FLOP count shown in the note as TFLOPS (the indexer's logits over all s_k keys)
    alt_flops: Optional[float] = None
    alt_flops_what: str = ""


# ---------------------------------------------------------------------------------------------
# the case table
# ---------------------------------------------------------------------------------------------

def all_cases(tiny: bool = False) -> List[Case]:
    """Every case, in table order. ``tiny``: the same cases at toy sizes."""
    c: List[Case] = []
    dd = [(64, 1, 128, 8192), (128, 1, 128, 8192), (64, 2, 128, 4096)]
    if tiny:
        dd = [(2, 1, 8, 128), (2, 2, 8, 64)]
    for b, s_q, h_q, s_k in dd:
        c.append(Case("dense_decode", f"dense_decode b={b} s_q={s_q} h_q={h_q} s_k={s_k}",
                      dict(b=b, s_q=s_q, h_q=h_q, s_k=s_k, block_size=64 if not tiny else 16)))
    # sparse decode: (layout, b, s_q, h_q, s_k, topk, block_size, extra_topk, extra_s_k, extra_bs)
    sd = [("v32", 64, 2, 128, 32768, 2048, 64, None, None, None),
          ("v32", 128, 2, 128, 32768, 2048, 64, None, None, None),
          ("model1", 128, 2, 64, 16384, 128, 256, 512, 16384, 64),
          ("model1", 128, 2, 128, 16384, 128, 256, 1024, 16384, 64),
          ("v32", 148, 2, 128, 32768, 16384, 64, None, None, None)]
    if tiny:
        sd = [("v32", 2, 2, 8, 256, 32, 16, None, None, None),
              ("model1", 2, 2, 8, 256, 16, 32, 32, 128, 8)]
    for layout, b, s_q, h_q, s_k, topk, bs, etopk, es_k, ebs in sd:
        name = f"sparse_decode {layout.upper()} b={b} s_q={s_q} h_q={h_q} topk={topk}"
        if etopk:
            name += f" + extra {etopk}"
        c.append(Case("sparse_decode", name, dict(
            layout=layout, b=b, s_q=s_q, h_q=h_q, s_k=s_k, topk=topk, block_size=bs,
            extra_topk=etopk, extra_s_k=es_k, extra_block_size=ebs)))
    sp = [(576, 128), (512, 128), (512, 64)]
    s_q, s_kv, topk = (4096, 32768, 2048) if not tiny else (16, 256, 32)
    for d_qk, h_q in sp:
        if tiny:
            h_q //= 8
        c.append(Case("sparse_prefill",
                      f"sparse_prefill d={d_qk} s_q={s_q} h_q={h_q} topk={topk} s_kv={s_kv}",
                      dict(d_qk=d_qk, s_q=s_q, s_kv=s_kv, h_q=h_q, topk=topk)))
    h_q = 128 if not tiny else 8
    c.append(Case("sparse_prefill_bwd",
                  f"sparse_prefill backward d=576 s_q={s_q} h_q={h_q} topk={topk} s_kv={s_kv}",
                  dict(d_qk=576, s_q=s_q, s_kv=s_kv, h_q=h_q, topk=topk)))
    b, h, s = (4, 128, 4096) if not tiny else (2, 4, 64)
    for op, what in (("dense_prefill", "fwd"), ("dense_prefill_bwd", "fwd+bwd")):
        c.append(Case(op, f"dense_prefill {what} causal b={b} h={h} s={s} d=192/128",
                      dict(b=b, h=h, s=s, d=192, d_v=128, causal=True)))
    kw = [("v32", 128, 4096, 64), ("v32", 16384, 4096, 64), ("model1", 16384, 1024, 256)]
    if tiny:
        kw = [("v32", 8, 4, 16), ("model1", 8, 4, 16)]
    for layout, n, nb, bs in kw:
        c.append(Case("kv_cache_write", f"kv_cache_write {layout.upper()} n={n}",
                      dict(layout=layout, n=n, num_blocks=nb, block_size=bs)))
    ho = dict(layout="v32", b=2, s_q=1, h_q=64, s_k=1024, topk=128, block_size=64,
              extra_topk=None, extra_s_k=None, extra_block_size=None)
    if tiny:
        ho.update(h_q=8, s_k=128, topk=32, block_size=16)
    c.append(Case("host_overhead", f"host overhead: one eager sparse_decode b={ho['b']} "
                  f"h_q={ho['h_q']} topk={ho['topk']}", ho, kind="host"))
    c += _indexer_cases(tiny)
    return c


def _indexer_cases(tiny: bool) -> List[Case]:
    """The DSA indexer (d = 128 stays real under --tiny; the rest shrinks)."""
    c: List[Case] = []
    d = 128
    # ragged prefill: one sequence, the last s_q of its s_k tokens (causal), or full windows
    s_q, s_k, h = (4096, 32768, 64) if not tiny else (16, 128, 8)
    for causal in (True, False):
        what = "causal" if causal else "full"
        c.append(Case("indexer_logits",
                      f"indexer_logits {what} s_q={s_q} s_k={s_k} h={h} d={d}",
                      dict(s_q=s_q, s_k=s_k, h=h, d=d, causal=causal)))
    b, n, ctx, h, bs = (128, 2, 32768, 64, 64) if not tiny else (2, 2, 128, 8, 16)
    c.append(Case("indexer_logits_paged",
                  f"indexer_logits_paged b={b} next_n={n} context={ctx} h={h} d={d} "
                  f"block_size={bs}",
                  dict(b=b, next_n=n, context=ctx, h=h, d=d, block_size=bs)))
    rows, s_k, k = (4096, 32768, 2048) if not tiny else (16, 256, 32)
    c.append(Case("indexer_topk", f"indexer_topk rows={rows} s_k={s_k} k={k}",
                  dict(rows=rows, s_k=s_k, k=k)))
    s, h = (4096, 64) if not tiny else (32, 8)
    c.append(Case("indexer_quantize", f"indexer_quantize q [{s}, {h}, {d}] bf16 (Hadamard)",
                  dict(shape=(s, h, d))))
    n, nb, bs = (16384, 4096, 64) if not tiny else (64, 8, 16)
    c.append(Case("write_indexer_cache", f"write_indexer_cache n={n} d={d}",
                  dict(n=n, d=d, num_blocks=nb, block_size=bs)))
    return c


# ---------------------------------------------------------------------------------------------
# input helpers
# ---------------------------------------------------------------------------------------------

def _randn(gen, shape, device, scale=0.1):
    """FlashMLA's test values: randn / 10 clamped to [-1, 1], bf16."""
    return (torch.randn(shape, generator=gen, device=device) * scale).clamp_(-1, 1).to(
        torch.bfloat16)


def _rows_without_replacement(gen, rows: int, high: int, k: int, device) -> torch.Tensor:
    """``[rows, k]`` int32, each row k distinct values in [0, high) (FlashMLA's _randperm_batch:
    the top-k of uniform noise); -1 pads rows when k > high."""
    out = torch.full((rows, k), -1, dtype=torch.int32, device=device)
    kk = min(k, high)
    chunk = max(1, (1 << 26) // max(high, 1))
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        noise = torch.rand((r1 - r0, high), generator=gen, device=device)
        out[r0:r1, :kk] = noise.topk(kk, dim=-1).indices.to(torch.int32)
    return out


def _quantize(x: torch.Tensor, layout: str) -> torch.Tensor:
    try:
        return torch_mla.quantize_kv_cache(x, layout)
    except Exception:  # no device backend took it: the reference always does
        with torch_mla.use_backend("reference"):
            return torch_mla.quantize_kv_cache(x, layout)


def fp8_cache(gen, num_blocks: int, block_size: int, layout: str, device) -> torch.Tensor:
    """A packed cache of random tokens, quantized a chunk of blocks at a time (the bf16 source of
    a production cache would not fit beside it)."""
    lay = LAYOUTS[layout]
    cache = empty_cache(num_blocks, block_size, lay, device=device)
    row = lay.block_bytes(block_size)
    raw = cache.view(torch.uint8)
    full = raw.as_strided((num_blocks, row), (row, 1), raw.storage_offset())
    per = max(1, (1 << 20) // block_size)
    for b0 in range(0, num_blocks, per):
        b1 = min(num_blocks, b0 + per)
        part = _quantize(_randn(gen, (b1 - b0, block_size, 1, lay.d), device), layout)
        praw = part.view(torch.uint8)
        full[b0:b1].copy_(praw.as_strided((b1 - b0, row), (row, 1), praw.storage_offset()))
    return cache


def _schedule(seqlens: torch.Tensor, h_q: int, s_q: int):
    try:  # the default part count, as FlashMLA's get_mla_metadata makes for its own call
        return torch_mla.decode_schedule(seqlens, h_q=h_q, s_q=s_q)
    except Exception:  # the ops compute their own split when none is given
        return None


def _ours(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    def call():
        with torch_mla.use_backend(backend):
            return fn()
    return call


def _with_ours(fn: Callable[[], object], refused: Dict[str, str]) -> Dict[str, Callable]:
    return {b: _ours(b, fn) for b in OURS if b not in refused}


_WGMMA_ENV = "TORCH_MLA_NATIVE_DECODE_WGMMA"  # read by the native library at every call


def _native_serial(fn: Callable[[], object]) -> Callable[[], object]:
    """fn on the native backend with the serial sparse_decode kernel (the environment is set
    around each call, so a CUDA graph captures that kernel)."""
    def call():
        old = os.environ.get(_WGMMA_ENV)
        os.environ[_WGMMA_ENV] = "0"
        try:
            with torch_mla.use_backend("native"):
                return fn()
        finally:
            if old is None:
                del os.environ[_WGMMA_ENV]
            else:
                os.environ[_WGMMA_ENV] = old
    return call


# ---------------------------------------------------------------------------------------------
# builders, one per op
# ---------------------------------------------------------------------------------------------

def _dense_decode(sp, dev, gen) -> Built:
    b, s_q, h_q, s_k, bs = sp["b"], sp["s_q"], sp["h_q"], sp["s_k"], sp["block_size"]
    d, d_v = 576, 512
    causal = s_q > 1
    nblk = math.ceil(s_k / 256) * 256 // bs  # FlashMLA pads cache lengths to 256 tokens
    q = _randn(gen, (b, s_q, h_q, d), dev)
    table = torch.randperm(b * nblk, generator=gen, device=dev).to(torch.int32).view(b, nblk)
    cache = _randn(gen, (b * nblk, bs, 1, d), dev)
    seqlens = torch.full((b,), s_k, dtype=torch.int32, device=dev)
    scale = d ** -0.5
    sched = _schedule(seqlens, h_q, s_q)
    flops, nbytes = F.dense_decode(b, s_q, h_q, 1, b * s_k, d, d_v)
    refused: Dict[str, str] = {}
    calls = _with_ours(lambda: torch_mla.dense_decode(
        q, cache, table, seqlens, d_v=d_v, sm_scale=scale, causal=causal, schedule=sched),
        refused)
    mod, why = flashmla()
    if mod is None:
        refused["flashmla"] = why
    else:
        meta = mod.get_mla_metadata()[0]  # filled by the first (warm-up) call, then reused
        calls["flashmla"] = lambda: mod.flash_mla_with_kvcache(
            q, cache, table, seqlens, d_v, meta, None, softmax_scale=scale, causal=causal)
    return Built(flops, nbytes, calls, refused)


def _sparse_scope(gen, dev, layout, b, s_q, s_k, topk, bs):
    """One key set: (cache, in-cache indices [b, s_q, topk] int32, distinct indices)."""
    nblk = math.ceil(s_k / (4 * bs)) * 4
    table = torch.randperm(b * nblk, generator=gen, device=dev).view(b, nblk)
    cache = fp8_cache(gen, b * nblk, bs, layout, dev)
    pos = _rows_without_replacement(gen, b * s_q, s_k, topk, dev).view(b, s_q, topk).long()
    blk = table.gather(1, (pos.clamp_min(0) // bs).view(b, -1)).view(b, s_q, topk)
    idx = torch.where(pos >= 0, blk * bs + pos % bs, -1).to(torch.int32)
    return cache, idx, int(idx.unique().numel())


def _sparse_decode(sp, dev, gen) -> Built:
    layout, b, s_q, h_q = sp["layout"], sp["b"], sp["s_q"], sp["h_q"]
    lay = LAYOUTS[layout]
    d_qk, d_v = lay.d, 512
    cache, idx, retrieved = _sparse_scope(gen, dev, layout, b, s_q, sp["s_k"], sp["topk"],
                                          sp["block_size"])
    attended = b * s_q * sp["topk"]
    ecache = eidx = None
    if sp.get("extra_topk"):
        ecache, eidx, eret = _sparse_scope(gen, dev, layout, b, s_q, sp["extra_s_k"],
                                           sp["extra_topk"], sp["extra_block_size"])
        retrieved += eret
        attended += b * s_q * sp["extra_topk"]
    q = _randn(gen, (b, s_q, h_q, d_qk), dev, scale=1.0)  # FlashMLA: randn clamped to [-1, 1]
    scale = d_qk ** -0.5
    total = sp["topk"] + (sp.get("extra_topk") or 0)
    sched = _schedule(torch.full((b,), total, dtype=torch.int32, device=dev), h_q, s_q)
    flops, nbytes = F.sparse_decode(b, s_q, h_q, d_qk, d_v, attended, retrieved)
    refused: Dict[str, str] = {}
    call = lambda: torch_mla.sparse_decode(  # noqa: E731
        q, cache, idx, extra_k_cache=ecache, extra_indices=eidx, d_v=d_v, sm_scale=scale,
        schedule=sched)
    calls = _with_ours(call, refused)
    calls[NATIVE_SERIAL] = _native_serial(call)
    mod, why = flashmla()
    if mod is None:
        refused["flashmla"] = why
    else:
        meta = mod.get_mla_metadata()[0]
        calls["flashmla"] = lambda: mod.flash_mla_with_kvcache(
            q, cache, None, None, d_v, meta, None, softmax_scale=scale, is_fp8_kvcache=True,
            indices=idx, extra_k_cache=ecache, extra_indices_in_kvcache=eidx)
    return Built(flops, nbytes, calls, refused)


def _sparse_prefill_inputs(sp, dev, gen):
    s_q, s_kv, h_q, d_qk, topk = sp["s_q"], sp["s_kv"], sp["h_q"], sp["d_qk"], sp["topk"]
    q = _randn(gen, (s_q, h_q, d_qk), dev)
    kv = _randn(gen, (s_kv, 1, d_qk), dev)
    idx = _rows_without_replacement(gen, s_q, s_kv, topk, dev).view(s_q, 1, topk)
    valid = int((idx >= 0).sum())
    distinct = int(idx[idx >= 0].unique().numel())
    return q, kv, idx, valid, distinct


def _sparse_prefill(sp, dev, gen) -> Built:
    q, kv, idx, valid, distinct = _sparse_prefill_inputs(sp, dev, gen)
    s_q, h_q, d_qk, topk, d_v = sp["s_q"], sp["h_q"], sp["d_qk"], sp["topk"], 512
    scale = d_qk ** -0.5
    flops, nbytes = F.sparse_prefill(s_q, h_q, d_qk, d_v, s_q * topk, valid)
    roof_nbytes = F.sparse_prefill(s_q, h_q, d_qk, d_v, s_q * topk, distinct)[1]
    refused: Dict[str, str] = {}
    calls = _with_ours(lambda: torch_mla.sparse_prefill(q, kv, idx, scale, d_v), refused)
    mod, why = flashmla()
    if mod is None:
        refused["flashmla"] = why
    else:
        calls["flashmla"] = lambda: mod.flash_mla_sparse_fwd(q, kv, idx, scale, d_v=d_v)
    return Built(flops, nbytes, calls, refused, roof_nbytes=roof_nbytes)


def _sparse_prefill_bwd(sp, dev, gen) -> Built:
    q, kv, idx, valid, distinct = _sparse_prefill_inputs(sp, dev, gen)
    s_q, s_kv, h_q, d_qk, topk, d_v = (sp["s_q"], sp["s_kv"], sp["h_q"], sp["d_qk"], sp["topk"],
                                       512)
    scale = d_qk ** -0.5
    note = ""
    out = lse = None
    # the backward reads the forward's out and lse: take them from a fast backend (the
    # reference would take minutes here; in --tiny runs it is the only one on a CPU)
    for b in ("native", "triton", "reference"):
        if b == "reference" and q.numel() * topk > 1e9:
            continue
        try:
            with torch_mla.use_backend(b):
                out, _, lse = torch_mla.sparse_prefill(q, kv, idx, scale, d_v)
            break
        except Exception:
            continue
    if out is None:  # nothing computes the forward here: plausible stand-ins (timing only)
        out = _randn(gen, (s_q, h_q, d_v), dev)
        lse = torch.full((s_q, h_q), math.log(topk), device=dev)
        note = "out/lse are stand-ins (no backend ran the forward)"
    dout = _randn(gen, (s_q, h_q, d_v), dev)
    dlse = torch.zeros_like(lse)  # training uses out only
    flops, nbytes = F.sparse_prefill_backward(s_q, s_kv, h_q, 1, d_qk, d_v, s_q * topk, valid)
    roof_nbytes = F.sparse_prefill_backward(s_q, s_kv, h_q, 1, d_qk, d_v, s_q * topk,
                                            distinct)[1]
    refused: Dict[str, str] = {"flashmla": "FlashMLA has no sparse-attention backward"}
    calls = _with_ours(lambda: torch.ops.mla.sparse_prefill_backward(
        dout, dlse, q, kv, idx, out, lse, scale, d_v, None, None), refused)
    return Built(flops, nbytes, calls, refused, note=note, roof_nbytes=roof_nbytes)


def _dense_prefill(sp, dev, gen, backward: bool) -> Built:
    b, h, s, d, d_v, causal = sp["b"], sp["h"], sp["s"], sp["d"], sp["d_v"], sp["causal"]
    t = b * s
    q = _randn(gen, (t, h, d), dev, scale=1.0).requires_grad_(backward)
    k = _randn(gen, (t, h, d), dev, scale=1.0).requires_grad_(backward)
    v = _randn(gen, (t, h, d_v), dev, scale=1.0).requires_grad_(backward)
    dout = _randn(gen, (t, h, d_v), dev, scale=1.0)
    cu = (torch.arange(b + 1, device=dev) * s).to(torch.int32)
    scale = d ** -0.5
    flops, nbytes = F.dense_prefill(b, s, s, h, h, d, d_v, causal, backward)

    def run(fwd, grad_out=dout):
        if not backward:
            return fwd()
        return torch.autograd.grad(fwd(), (q, k, v), grad_out)

    refused: Dict[str, str] = {
        "flashmla": "FlashMLA's dense MHA prefill is SM100-only, absent from the SM90 build"}
    calls = _with_ours(lambda: run(lambda: torch_mla.dense_prefill(
        q, k, v, cu, cu, s, s, sm_scale=scale, causal=causal)[0]), refused)

    def bhsd(x):  # [t, h, d] -> [b, h, s, d] view
        return x.view(b, s, h, x.shape[-1]).transpose(1, 2)

    dout_bhsd = bhsd(dout)  # SDPA and flex return [b, h, s, d_v] views of [t, h, d_v] layouts
    calls["sdpa"] = lambda: run(lambda: torch.nn.functional.scaled_dot_product_attention(
        bhsd(q), bhsd(k), bhsd(v), is_causal=causal, scale=scale), dout_bhsd)
    if dev.type != "cuda":
        refused["flex"] = "FlexAttention is benchmarked on CUDA only"
    else:
        try:
            flex, create_block_mask = flex_attention()
            mask = create_block_mask(lambda bb, hh, qi, ki: qi >= ki, None, None, s, s,
                                     device=dev)
            calls["flex"] = lambda: run(lambda: flex(bhsd(q), bhsd(k), bhsd(v), block_mask=mask,
                                                     scale=scale), dout_bhsd)
        except Exception as exc:
            refused["flex"] = f"FlexAttention unavailable ({type(exc).__name__}: {exc})"[:160]
    return Built(flops, nbytes, calls, refused)


def _kv_cache_write(sp, dev, gen) -> Built:
    layout, n, nb, bs = sp["layout"], sp["n"], sp["num_blocks"], sp["block_size"]
    lay = LAYOUTS[layout]
    cache = empty_cache(nb, bs, lay, device=dev)
    cache.view(torch.uint8).zero_()
    kv = _randn(gen, (n, lay.d), dev, scale=1.0)
    slots = torch.randperm(nb * bs, generator=gen, device=dev)[:n]
    flops, nbytes = F.kv_cache_write(n, lay.d, lay.bytes_per_token)
    refused = {"flashmla": "FlashMLA has no KV-cache writer"}
    calls = _with_ours(lambda: torch_mla.write_kv_cache(cache, kv, slots, layout), refused)
    return Built(flops, nbytes, calls, refused)


def _indexer_any(fn: Callable[[], object]):
    """Input preparation with an indexer op: the default backend, else the reference (which
    always runs; on a GPU the unverified Triton kernels are not picked unless forced)."""
    try:
        return fn()
    except Exception:
        with torch_mla.use_backend("reference"):
            return fn()


_NO_INDEXER_PEER = "FlashMLA has no DSA indexer"


def _fp8_queries(gen, shape, dev):
    """(FP8 queries of ``shape`` from random bf16 through indexer_quantize, f32 indexer
    weights ``shape[:-1]`` with q's scale and the softmax scale folded in, as the caller of the
    logits ops does: meta/indexer.py)."""
    q = _randn(gen, shape, dev, scale=1.0)
    q_fp8, q_scale = _indexer_any(lambda: torch_mla.indexer_quantize(q))
    w = torch.randn(shape[:-1], generator=gen, device=dev)
    weights = w * q_scale * shape[-1] ** -0.5
    return q_fp8, weights


def _torch_logits(q_fp8, k_fp8, k_scale, weights, k_start, k_end):
    """The plain-PyTorch baseline of indexer_logits: bf16 matmuls (e4m3 values are exact in
    bf16) over chunks of queries whose [c, h, s_k] bf16 scores take about 1 GiB, ReLU, the
    weighted head sum as a batched matmul, the key scale, the window mask."""
    s_q, h, d = q_fp8.shape
    s_k = k_fp8.shape[0]
    q = q_fp8.to(torch.bfloat16)
    k_t = k_fp8.to(torch.bfloat16).t()
    w = weights.to(torch.bfloat16).unsqueeze(1)  # [s_q, 1, h]
    cols = torch.arange(s_k, device=q.device)
    step = max(1, min(s_q, (1 << 30) // max(1, h * s_k * 2)))

    def run():
        out = torch.empty((s_q, s_k), dtype=torch.float32, device=q.device)
        for s in range(0, s_q, step):
            e = min(s + step, s_q)
            sc = torch.relu_(torch.matmul(q[s:e].reshape(-1, d), k_t).view(e - s, h, s_k))
            val = torch.bmm(w[s:e], sc).squeeze(1).float() * k_scale
            mask = (cols >= k_start[s:e, None]) & (cols < k_end[s:e, None])
            out[s:e] = torch.where(mask, val, float("-inf"))
        return out
    return run


def _indexer_logits(sp, dev, gen) -> Built:
    s_q, s_k, h, d, causal = sp["s_q"], sp["s_k"], sp["h"], sp["d"], sp["causal"]
    q_fp8, weights = _fp8_queries(gen, (s_q, h, d), dev)
    k = _randn(gen, (s_k, d), dev, scale=1.0)
    k_fp8, k_scale = _indexer_any(lambda: torch_mla.indexer_quantize(k))
    t = torch.arange(s_q, device=dev, dtype=torch.int32)
    k_start = torch.zeros(s_q, dtype=torch.int32, device=dev)
    k_end = (t + (s_k - s_q + 1) if causal else torch.full_like(t, s_k)).clamp(0, s_k)
    visible = F.window_pairs(s_q, s_k, causal)
    flops, nbytes = F.indexer_logits(s_q, s_k, h, d, visible)
    alt = F.indexer_logits_all_keys_flops(s_q, s_k, h, d)
    refused: Dict[str, str] = {"flashmla": _NO_INDEXER_PEER}
    calls = _with_ours(lambda: torch_mla.indexer_logits(q_fp8, k_fp8, k_scale, weights, k_start,
                                                        k_end), refused)
    calls["torch"] = _torch_logits(q_fp8, k_fp8, k_scale, weights, k_start, k_end)
    return Built(flops, nbytes, calls, refused, roof="fp8",
                 alt_flops=alt if alt != flops else None, alt_flops_what="all s_k keys")


def _indexer_logits_paged(sp, dev, gen) -> Built:
    b, n, ctx, h, d, bs = (sp["b"], sp["next_n"], sp["context"], sp["h"], sp["d"],
                           sp["block_size"])
    nblk = math.ceil(ctx / bs)
    q_fp8, weights = _fp8_queries(gen, (b, n, h, d), dev)
    weights = weights.view(b * n, h)
    cache = torch_mla.new_indexer_cache(b * nblk, bs, d, device=dev)
    # every slot gets a random key, written a chunk at a time (the bf16 source of the whole
    # cache would be 1 GB beside it)
    slots = b * nblk * bs
    per = 1 << 20
    for s0 in range(0, slots, per):
        s1 = min(slots, s0 + per)
        kk = _randn(gen, (s1 - s0, d), dev, scale=1.0)
        sl = torch.arange(s0, s1, device=dev)
        _indexer_any(lambda: torch_mla.write_indexer_cache(cache, kk, sl))
    # each batch element owns its blocks, shuffled (as the decode cases)
    table = torch.randperm(b * nblk, generator=gen, device=dev).to(torch.int32).view(b, nblk)
    lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
    flops, nbytes = F.indexer_logits_paged(b, n, h, d, b * ctx, bs, ctx)
    refused: Dict[str, str] = {"flashmla": _NO_INDEXER_PEER}
    calls = _with_ours(lambda: torch_mla.indexer_logits_paged(q_fp8, cache, weights, lens, table,
                                                              ctx), refused)
    # memory bound (FLOPs at FP8 take ~40 % of the bytes' time on an H100): the roof is the
    # copy bandwidth alone, so it does not depend on whether an FP8 roof was measured
    return Built(flops, nbytes, calls, refused, roof="bytes")


def _indexer_topk(sp, dev, gen) -> Built:
    rows, s_k, k = sp["rows"], sp["s_k"], sp["k"]
    logits = torch.randn((rows, s_k), generator=gen, device=dev)
    flops, nbytes = F.indexer_topk(rows, s_k, k)
    refused: Dict[str, str] = {"flashmla": _NO_INDEXER_PEER}
    calls = _with_ours(lambda: torch_mla.indexer_topk(logits, k), refused)
    calls["torch"] = lambda: torch.topk(logits, k, dim=-1)
    return Built(flops, nbytes, calls, refused)


def _indexer_quantize(sp, dev, gen) -> Built:
    shape = tuple(sp["shape"])
    x = _randn(gen, shape, dev, scale=1.0)
    rows, d = math.prod(shape[:-1]), shape[-1]
    flops, nbytes = F.indexer_quantize(rows, d, x.element_size())
    refused: Dict[str, str] = {"flashmla": _NO_INDEXER_PEER}
    calls = _with_ours(lambda: torch_mla.indexer_quantize(x), refused)
    return Built(flops, nbytes, calls, refused)


def _write_indexer_cache(sp, dev, gen) -> Built:
    n, d, nb, bs = sp["n"], sp["d"], sp["num_blocks"], sp["block_size"]
    cache = torch_mla.new_indexer_cache(nb, bs, d, device=dev)
    k = _randn(gen, (n, d), dev, scale=1.0)
    slots = torch.randperm(nb * bs, generator=gen, device=dev)[:n]  # distinct, int64
    flops, nbytes = F.write_indexer_cache(n, d, k.element_size())
    refused: Dict[str, str] = {"flashmla": _NO_INDEXER_PEER}
    calls = _with_ours(lambda: torch_mla.write_indexer_cache(cache, k, slots), refused)
    return Built(flops, nbytes, calls, refused)


def _host_overhead(sp, dev, gen) -> Built:
    built = _sparse_decode(sp, dev, gen)
    built.flops = built.nbytes = 0.0  # host time only
    built.calls.pop(NATIVE_SERIAL)  # the same host path as native
    return built


_BUILDERS = {
    "dense_decode": _dense_decode,
    "sparse_decode": _sparse_decode,
    "sparse_prefill": _sparse_prefill,
    "sparse_prefill_bwd": _sparse_prefill_bwd,
    "dense_prefill": lambda sp, dev, gen: _dense_prefill(sp, dev, gen, False),
    "dense_prefill_bwd": lambda sp, dev, gen: _dense_prefill(sp, dev, gen, True),
    "kv_cache_write": _kv_cache_write,
    "host_overhead": _host_overhead,
    "indexer_logits": _indexer_logits,
    "indexer_logits_paged": _indexer_logits_paged,
    "indexer_topk": _indexer_topk,
    "indexer_quantize": _indexer_quantize,
    "write_indexer_cache": _write_indexer_cache,
}


def build(case: Case, device: torch.device, seed: int = 0) -> Built:
    gen = torch.Generator(device=device).manual_seed(seed)
    built = _BUILDERS[case.op](case.spec, device, gen)
    built.ref_ok = built.flops <= REF_MAX_FLOPS and built.nbytes <= REF_MAX_BYTES
    if "torch" not in built.calls:
        built.refused.setdefault("torch", "no plain-PyTorch baseline for this op (the 'torch' "
                                 "backend is the baseline of indexer_logits and indexer_topk)")
    return built


def peer_of(case: Case) -> Optional[str]:
    """The backend whose time the 'x FlashMLA' column divides by (None: FlashMLA lacks the op)."""
    return "flashmla" if case.op in ("dense_decode", "sparse_decode", "sparse_prefill",
                                     "host_overhead") else None


def baseline_of(case: Case) -> Optional[str]:
    """The plain-PyTorch baseline whose time each row's note is compared with ("N.NNx torch" =
    the baseline's time / this time, > 1: faster than it), None where there is none."""
    return "torch" if case.op in ("indexer_logits", "indexer_topk") else None
