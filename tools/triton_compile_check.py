#!/usr/bin/env python
"""Compile every Triton kernel launch of torch_mla ahead of time for an H100 (sm_90), without a GPU.

What it catches before a device run: kernels that pass the CPU interpreter tests but do not
compile under the GPU's Triton (front-end errors such as "constexpr cannot be reassigned", MLIR /
LLVM / ptxas failures), and launches whose shared memory exceeds the H100's 232448 bytes (at
launch Triton raises ``OutOfResources: shared memory, Required: N, Hardware limit: 232448``).
It also reports registers and spills per launch.

How:

1. Triton's interpreter is switched off (``TRITON_INTERPRET`` is removed from the environment
   before anything imports Triton), so ``@triton.jit`` makes real ``JITFunction`` s and the
   kernel modules evaluate their module-level configuration as on the GPU (``INTERPRET`` /
   ``DOT_F32`` False: ``QUANT_ELEMS``, ``LOGITS_CONFIG``, ``FWD_CFG``, ``_TOK`` ... take their GPU
   values).
2. Tool-only patches (nothing in the library changes) make the host code take its CUDA path on
   CPU tensors: ``_common.device_reasons`` accepts CPU tensors; ``sm_count`` answers the H100's
   132 SMs; ``sparse_decode._num_parts`` is asked about a CUDA device; ``_hw_e4m3`` answers as on
   an SM90 device (i.e. ``USE_HW_E4M3``). Launches through ``_common.launch`` fall back to
   ``kernel[grid]`` for CPU tensors, so they are captured too.
3. Triton's active driver is replaced by a stand-in that reports the target ``cuda:90`` (warp
   32), and ``JITFunction._do_compile`` by a recorder. So every ``kernel[grid](*args, **kw)``
   goes through the installed Triton's own ``JITFunction.run``: its binder specializes the
   arguments exactly as on the GPU (pointer dtypes, 16-byte alignment, ints divisible by 16, ints
   equal to 1 as constexpr 1, i32 / i64 by value), parses the options (num_warps, num_stages,
   ...), and hands (signature, constexprs, attrs, options) to the recorder; nothing runs.
4. The public ops (``torch.ops.mla.*``, forward and backward) run under
   ``torch_mla.use_backend("triton")`` at production shapes (small batch / s_q where the launch
   configuration does not depend on them), each case recording its launches.
5. Every distinct launch is compiled with ``triton.compile(ASTSource(fn, signature, constexprs,
   attrs), target=GPUTarget("cuda", 90, 32), options=...)`` (what ``_do_compile`` does on the
   GPU), each in a forked process of its own (a compiler crash or hang becomes that launch's
   result); ``metadata.shared`` is compared with the H100 limit, and the registers and the stack
   frame (where ptxas puts spills) come from ``cuobjdump --dump-resource-usage`` on the cubin
   (REG, STACK), or ``ptxas -v`` on the PTX, with the cuobjdump / ptxas that Triton itself uses.
   "spills" is the stack frame / 4, what Triton reports as ``n_spills`` on the GPU.

Triton 3.6 and 3.9 share the two entry points used here (``ASTSource(fn, signature,
constexprs, attrs)``, ``compile(src, target, options)``); what differs between them (3.9 adds
options such as ``fpsan_homomorphic_casts`` and attrs entries for constexpr parameters, and
assembles sm_90 with its CUDA 13 ``ptxas-blackwell`` where 3.6 uses its CUDA 12.8 ``ptxas``) is
inside ``JITFunction.run`` / the backend, which is why launches go through the installed
Triton's own ``run`` rather than a signature rebuilt here. The Triton compile cache is used
(``--fresh`` bypasses it): a second run takes seconds.

Usage::

    python tools/triton_compile_check.py                       # the installed Triton
    pip install --no-deps --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36 python tools/triton_compile_check.py   # the GPU machine's Triton
    python tools/triton_compile_check.py --triton-path /tmp/triton36 --only 'dense_attn|topk'
    python tools/triton_compile_check.py --list                # the launches, no compiling
    python tools/triton_compile_check.py --json out.json       # + machine-readable results
    python tools/triton_compile_check.py --only prefill --prefill-fwd all --dots
        # + the sparse_prefill forward candidates of tools/diag_sparse_prefill.py (FWD_CANDIDATES)
        # at the production shapes, and the TTGIR layout of every dot (warps per CTA, whether
        # the A operand comes from registers or shared memory, wgmma instruction shape)
    python tools/triton_compile_check.py --only 'prefill bwd' --prefill-bwd new --dots
        # the sparse_prefill backward candidates (BWD_CANDIDATES; 'new': BWD_TIME_DEFAULT)

Exit status: 0 when every case ran and every launch compiled with shared memory within the
limit; 1 otherwise (a compile error, shared > limit, or a case whose host code raised); 2 for
usage errors. Spills are reported, never a failure.
"""

from __future__ import annotations

import argparse
import os
import sys

H100_SHARED_LIMIT = 232448  # bytes of dynamic shared memory per block (227 KB), sm_90
H100_SMS = 132  # H100 SXM


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--triton-path", help="directory holding the triton package to use "
                   "(put first on sys.path; same as PYTHONPATH=DIR)")
    p.add_argument("--only", help="regular expression: only cases whose name matches")
    p.add_argument("--list", action="store_true", help="list the cases' launches, compile nothing")
    p.add_argument("--jobs", "-j", type=int, default=0,
                   help="parallel compiles (default: CPU count, at most 8)")
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--sms", type=int, default=H100_SMS, help="SM count the host code sees (132)")
    p.add_argument("--shared-limit", type=int, default=H100_SHARED_LIMIT)
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per compile (600)")
    p.add_argument("--fresh", action="store_true",
                   help="ignore Triton's compile cache (TRITON_ALWAYS_COMPILE=1)")
    p.add_argument("--verbose", "-v", action="store_true", help="full error texts")
    p.add_argument("--dots", action="store_true",
                   help="print the TTGIR layout of each launch's dots (warpsPerCTA, operands)")
    p.add_argument("--prefill-fwd", metavar="NAMES",
                   help="also capture the sparse_prefill forward candidates NAMES (comma-separated "
                   "keys of tools/diag_sparse_prefill.py FWD_CANDIDATES, or 'all')")
    p.add_argument("--prefill-bwd", metavar="NAMES",
                   help="also capture the sparse_prefill backward candidates NAMES (comma-"
                   "separated keys of tools/diag_sparse_prefill.py BWD_CANDIDATES, 'new' for "
                   "its BWD_TIME_DEFAULT, or 'all')")
    return p.parse_args(argv)


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.triton_path:
    sys.path.insert(0, os.path.abspath(ARGS.triton_path))
if ARGS is not None and ARGS.fresh:
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"

# Before anything imports Triton or torch_mla: @triton.jit decides at decoration time whether a
# kernel is interpreted, and torch_mla's kernel modules pick their configurations from it.
_INTERPRET_WAS = os.environ.pop("TRITON_INTERPRET", None)

import contextlib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Dict, List, Optional  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.driver import driver as _DRIVER  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET: GPUTarget = GPUTarget("cuda", 90, 32)


# ---------------------------------------------------------------------------------------------
# capturing launches
# ---------------------------------------------------------------------------------------------

class Launch:
    """One ``kernel[grid](...)`` call as the GPU's JIT would compile it."""

    def __init__(self, case, fn, key, signature, constexprs, attrs, options, grid):
        self.case = case
        self.fn = fn
        self.key = key
        self.signature = signature
        self.constexprs = constexprs
        self.attrs = attrs
        self.options = options
        self.grid = grid
        self.result: Optional[dict] = None
        self.same_as: Optional[int] = None  # row number of an identical earlier launch

    @property
    def kernel(self) -> str:
        return self.fn.fn.__name__

    @property
    def uid(self):
        return (self.fn.module, self.fn.fn.__qualname__, str(self.key))

    def config(self) -> str:
        names = self.fn.arg_names
        parts = [f"w{self.options.num_warps}", f"s{self.options.num_stages}"]
        for path, val in sorted(self.constexprs.items()):
            name = names[path[0]] if isinstance(path, tuple) else str(path)
            if name == "DOT_F32":
                continue
            if isinstance(path, tuple) and not self.fn.params[path[0]].is_constexpr:
                name += "(=1 spec)"  # a runtime int Triton specialized to the constant 1
            parts.append(f"{name}={val}")
        return " ".join(parts)


_CAPTURE: Dict[str, object] = {"case": None, "grid": None, "launches": []}


class _H100Driver:
    """Stands in for Triton's CUDA driver while launches are captured: the JIT asks it for the
    current device, stream and target only."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("cpu")


def _recording_do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
    _CAPTURE["launches"].append(Launch(_CAPTURE["case"], self, key, dict(signature),
                                       dict(constexprs), attrs, options, _CAPTURE["grid"]))
    return None  # JITFunction.run returns right away: nothing is launched


_orig_run = JITFunction.run
_orig_do_compile = JITFunction._do_compile


def _recording_run(self, *args, grid, warmup, **kwargs):
    _CAPTURE["grid"] = tuple(grid) if isinstance(grid, (tuple, list)) else grid
    return _orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)


@contextlib.contextmanager
def capturing():
    drv = _DRIVER
    prev_active = getattr(drv, "_active", None)
    drv.set_active(_H100Driver())
    JITFunction._do_compile = _recording_do_compile
    JITFunction.run = _recording_run
    try:
        yield
    finally:
        JITFunction.run = _orig_run
        JITFunction._do_compile = _orig_do_compile
        drv._active = prev_active


# ---------------------------------------------------------------------------------------------
# making torch_mla's host code take its CUDA path on CPU tensors (tool-only patches)
# ---------------------------------------------------------------------------------------------

def patch_torch_mla(sms: int) -> List[str]:
    """Apply the patches; returns notes about any that could not be applied."""
    import importlib
    import pkgutil

    import torch_mla  # noqa: F401  (defines the ops, registers the backends)
    import torch_mla._device as dev_mod
    import torch_mla.triton as tri
    from torch_mla.triton import _common

    notes = []
    if _common.INTERPRET or getattr(_common, "DOT_F32", False):
        raise SystemExit("torch_mla.triton._common.INTERPRET is set: TRITON_INTERPRET reached "
                         "torch_mla before this tool removed it")
    if not getattr(tri, "AVAILABLE", True):
        raise SystemExit("torch_mla's Triton backend did not register (Triton import failed)")

    # 1. the Triton backend accepts CPU tensors (it would on CUDA ones)
    _common.device_reasons = lambda args: []

    # 2. SM count of an H100, wherever a module imported sm_count
    real_sm_count = dev_mod.sm_count

    def h100_sm_count(device, cpu_default=8):
        return sms

    dev_mod.sm_count = h100_sm_count
    mods = [importlib.import_module(f"torch_mla.triton.{m.name}")
            for m in pkgutil.iter_modules(tri.__path__)]
    for mod in mods:
        if getattr(mod, "sm_count", None) is real_sm_count:
            mod.sm_count = h100_sm_count

    # 3. host functions that branch on the device type
    sd = sys.modules.get("torch_mla.triton.sparse_decode")
    if sd is not None and hasattr(sd, "_num_parts"):
        orig_parts = sd._num_parts
        sd._num_parts = lambda device, head_blocks: orig_parts(torch.device("cuda", 0),
                                                               head_blocks)
    else:
        notes.append("torch_mla.triton.sparse_decode._num_parts not found (not patched)")
    for mod in mods:
        if hasattr(mod, "_hw_e4m3"):
            # on an SM90 GPU outside the interpreter the hardware conversion is used iff the
            # module's USE_HW_E4M3 knob is on
            mod._hw_e4m3 = (lambda m: (lambda t: bool(getattr(m, "USE_HW_E4M3", False))))(mod)
    return notes


# ---------------------------------------------------------------------------------------------
# cases: the ops at production shapes
# ---------------------------------------------------------------------------------------------

CASES: List[tuple] = []  # (name, thunk)


def case(name: str, fn, *args, **kwargs):
    CASES.append((name, functools.partial(fn, *args, **kwargs)))


BF16 = torch.bfloat16
I32 = torch.int32
I64 = torch.int64
F32 = torch.float32
FP8 = torch.float8_e4m3fn
mla = torch.ops.mla


def _z(*shape, dtype=BF16):
    return torch.zeros(shape, dtype=dtype)


def _fp8_cache(layout: str, num_blocks: int, block_size: int = 64):
    from torch_mla.meta.layouts import LAYOUTS, empty_cache
    return empty_cache(num_blocks, block_size, LAYOUTS[layout])


# sparse_decode: V32 (d_qk 576, topk 2048) and MODEL1 (d_qk 512, topk + extra topk); d_v 512
def _sparse_decode(layout, h_q, s_q, topk, lens=False, sink=False, extra_topk=0, b=2):
    d = 576 if layout == "v32" else 512
    nb = 64
    q = _z(b, s_q, h_q, d)
    cache = _fp8_cache(layout, nb)
    idx = torch.randint(0, nb * 64, (b, s_q, topk), dtype=I32)
    lengths = torch.full((b,), topk, dtype=I32) if lens else None
    sk = torch.zeros(h_q, dtype=F32) if sink else None
    ec = eidx = elens = None
    if extra_topk:
        ec = _fp8_cache(layout, 32)
        eidx = torch.randint(0, 32 * 64, (b, s_q, extra_topk), dtype=I32)
        elens = torch.full((b,), extra_topk, dtype=I32) if lens else None
    mla.sparse_decode(q, cache, idx, lengths, sk, ec, eidx, elens, 512, d ** -0.5, None, None)


for _h in (128, 64):
    for _sq in (1, 2):
        case(f"sparse_decode v32 h{_h} s_q{_sq}", _sparse_decode, "v32", _h, _sq, 2048)
case("sparse_decode v32 h128 s_q4 lens+sink", _sparse_decode, "v32", 128, 4, 2048, lens=True,
     sink=True)
for _h in (128, 64):
    for _sq in (1, 2):
        case(f"sparse_decode model1 h{_h} s_q{_sq} extra+lens+sink", _sparse_decode, "model1",
             _h, _sq, 128, lens=True, sink=True, extra_topk=512 if _h == 64 else 1024)
case("sparse_decode model1 h64 s_q2 no-extra sink", _sparse_decode, "model1", 64, 2, 512,
     sink=True)
case("sparse_decode model1 h128 s_q1 no-extra", _sparse_decode, "model1", 128, 1, 512)


# sparse_decode's other kernels (its VARIANT knob; the cases above run whatever VARIANT is: the
# split-scores default, or TORCH_MLA_SPARSE_DECODE_VARIANT): the chunked kernel (None), still
# selectable, and the split variant's other settings
def _sparse_decode_variant(variant, *args, **kwargs):
    import torch_mla.triton.sparse_decode as sd
    old = sd.VARIANT
    sd.VARIANT = variant
    try:
        _sparse_decode(*args, **kwargs)
    finally:
        sd.VARIANT = old


case("sparse_decode chunked v32 h128 s_q2", _sparse_decode_variant, None, "v32", 128, 2, 2048)
case("sparse_decode chunked v32 h64 s_q1 lens+sink", _sparse_decode_variant, None, "v32", 64, 1,
     2048, lens=True, sink=True)
for _h in (128, 64):
    case(f"sparse_decode chunked model1 h{_h} s_q2 extra+lens+sink", _sparse_decode_variant,
         None, "model1", _h, 2, 128, lens=True, sink=True, extra_topk=512 if _h == 64 else 1024)
case("sparse_decode split v32 h128 s_q2 (chained, row sums)", _sparse_decode_variant,
     {"split_s": False, "defer_sum": False}, "v32", 128, 2, 2048)


# sparse_prefill forward + backward (topk 2048, h_kv 1)
def _sparse_prefill(h_q, d_qk, d_v, sink=False, lens=False, s_q=2, s_kv=8192, topk=2048):
    q = _z(s_q, h_q, d_qk)
    kv = _z(s_kv, 1, d_qk)
    idx = torch.randint(0, s_kv, (s_q, 1, topk), dtype=I32)
    sk = torch.zeros(h_q, dtype=F32) if sink else None
    lengths = torch.full((s_q,), topk, dtype=I32) if lens else None
    scale = d_qk ** -0.5
    mla.sparse_prefill(q, kv, idx, scale, d_v, sk, lengths)
    stats = torch.zeros((s_q, h_q), dtype=F32)
    mla.sparse_prefill_backward(_z(s_q, h_q, d_v), stats, q, kv, idx, _z(s_q, h_q, d_v), stats,
                                scale, d_v, sk, lengths)


for _h in (128, 64):
    case(f"sparse_prefill fwd+bwd d576/512 h{_h}", _sparse_prefill, _h, 576, 512)
    case(f"sparse_prefill fwd+bwd d512/512 h{_h} sink+lens", _sparse_prefill, _h, 512, 512,
         sink=True, lens=True)
case("sparse_prefill fwd+bwd d576/512 h128 sink+lens", _sparse_prefill, 128, 576, 512, sink=True,
     lens=True)
# under 64 heads a kv head: the "small" launch configurations (4 warps, MMA v2)
case("sparse_prefill fwd+bwd d576/512 h16 sink+lens", _sparse_prefill, 16, 576, 512, sink=True,
     lens=True)


# dense_decode: bf16 paged cache (block 64), h_kv 1, 4096 keys per sequence
def _dense_decode(h_q, d_qk, d_v, s_q, causal, b=2, seqlen=4096, bs=64):
    q = _z(b, s_q, h_q, d_qk)
    nblk = seqlen // bs
    cache = _z(b * nblk, bs, 1, d_qk)
    table = torch.arange(b * nblk, dtype=I32).view(b, nblk)
    seqlens = torch.full((b,), seqlen, dtype=I32)
    mla.dense_decode(q, cache, table, seqlens, d_v, d_qk ** -0.5, causal, None, None)


for _d in (576, 512):
    case(f"dense_decode h128 d{_d}/512 s_q1", _dense_decode, 128, _d, 512, 1, False)
    case(f"dense_decode h128 d{_d}/512 s_q2 causal", _dense_decode, 128, _d, 512, 2, True)
# block size 32: 64-key tiles do not divide it, so the gather kernel runs (the paged one, the
# default, above)
case("dense_decode h128 d576/512 s_q2 causal bs32 (gather kernel)", _dense_decode, 128, 576, 512,
     2, True, bs=32)


# dense_prefill forward + backward (MHA: h_q = h_k = 128; two sequences of 512)
def _dense_prefill(d_qk, d_v, causal, h=128, lens=(512, 512)):
    t = sum(lens)
    q, k, v = _z(t, h, d_qk), _z(t, h, d_qk), _z(t, h, d_v)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=I32)
    scale = d_qk ** -0.5
    stats = torch.zeros((t, h), dtype=F32)
    mla.dense_prefill(q, k, v, cu, cu, max(lens), max(lens), scale, causal)
    mla.dense_prefill_backward(_z(t, h, d_v), stats, q, k, v, _z(t, h, d_v), stats, cu, cu,
                               max(lens), max(lens), scale, causal)


case("dense_prefill fwd+bwd d192/128 causal", _dense_prefill, 192, 128, True)
case("dense_prefill fwd+bwd d128/128 causal", _dense_prefill, 128, 128, True)
case("dense_prefill fwd+bwd d128/128 noncausal", _dense_prefill, 128, 128, False)


# FP8 KV cache: quantize / dequantize / write (the in-kernel scan for n <= 1024 rows, the
# sorted path above)
def _kv_cache(layout, n_write):
    from torch_mla.meta.layouts import LAYOUTS
    lay = LAYOUTS[layout]
    cache = mla.quantize_kv_cache(_z(16, 64, 1, lay.d), layout)
    mla.dequantize_kv_cache(cache, layout)
    slots = torch.randint(0, 16 * 64, (n_write,), dtype=I64)
    mla.write_kv_cache(cache, _z(n_write, lay.d), slots, layout)


for _lay in ("v32", "model1"):
    case(f"kv_cache {_lay} quantize/dequantize/write n128", _kv_cache, _lay, 128)
    case(f"kv_cache {_lay} write n4096 (sorted)", _kv_cache, _lay, 4096)


# DSA indexer (h 64, d 128)
def _indexer_quantize(hadamard, fmt):
    mla.indexer_quantize(_z(256, 64, 128), hadamard, fmt)  # q
    mla.indexer_quantize(_z(4096, 128), hadamard, fmt)  # k


for _had in (True, False):
    for _fmt in ("fp32", "ue8m0"):
        case(f"indexer_quantize hadamard={_had} {_fmt}", _indexer_quantize, _had, _fmt)


def _write_indexer_cache(n, hadamard, fmt):
    import torch_mla
    cache = torch_mla.new_indexer_cache(64, 64, 128)
    mla.write_indexer_cache(cache, _z(n, 128), torch.arange(n, dtype=I64), hadamard, fmt)


case("write_indexer_cache n128 hadamard fp32", _write_indexer_cache, 128, True, "fp32")
case("write_indexer_cache n128 hadamard ue8m0", _write_indexer_cache, 128, True, "ue8m0")
case("write_indexer_cache n4096 (sorted) hadamard fp32", _write_indexer_cache, 4096, True, "fp32")
case("write_indexer_cache n128 no-hadamard fp32", _write_indexer_cache, 128, False, "fp32")


def _indexer_logits(s_q=8, s_k=4096, h=64, d=128):
    start = torch.zeros(s_q, dtype=I32)
    end = torch.full((s_q,), s_k, dtype=I32)
    mla.indexer_logits(_z(s_q, h, d, dtype=FP8), _z(s_k, d, dtype=FP8),
                       torch.ones(s_k, dtype=F32), _z(s_q, h, dtype=F32), start, end)


case("indexer_logits h64 d128", _indexer_logits)


def _indexer_logits_paged(next_n, b=2, h=64, d=128, ctx=32768, bs=64):
    import torch_mla
    nblk = ctx // bs
    cache = torch_mla.new_indexer_cache(b * nblk, bs, d)
    lens = torch.full((b,), ctx, dtype=I32)
    table = torch.arange(b * nblk, dtype=I32).view(b, nblk)
    mla.indexer_logits_paged(_z(b, next_n, h, d, dtype=FP8), cache,
                             _z(b * next_n, h, dtype=F32), lens, table, ctx)


for _n in (1, 2, 4):
    case(f"indexer_logits_paged next_n{_n} ctx32768", _indexer_logits_paged, _n)


def _indexer_topk(windows, s_q=4, s_k=32768, k=2048):
    ks = torch.zeros(s_q, dtype=I32) if windows else None
    ke = torch.full((s_q,), s_k, dtype=I32) if windows else None
    mla.indexer_topk(_z(s_q, s_k, dtype=F32), k, ks, ke)


case("indexer_topk k2048 s_k32768", _indexer_topk, False)
case("indexer_topk k2048 s_k32768 windows", _indexer_topk, True)


def _indexer_scores(dtype, s_q=4, h=64, d=128, s_k=4096, topk=2048):
    q, k, w = _z(s_q, h, d, dtype=dtype), _z(s_k, d, dtype=dtype), _z(s_q, h, dtype=dtype)
    idx = torch.randint(0, s_k, (s_q, topk), dtype=I32)
    mla.indexer_scores(q, k, w, idx)
    mla.indexer_scores_backward(_z(s_q, topk, dtype=F32), q, k, w, idx)


case("indexer_scores fwd+bwd bf16 h64 d128 topk2048", _indexer_scores, BF16)
case("indexer_scores fwd+bwd fp32 h64 d128 topk2048", _indexer_scores, F32)


# the indexer's distillation targets: main attention's heads and d_qk (h 128, 576)
def _attn_scores(kind, masked, s_q=4, h=128, d=576, s_kv=8192, topk=2048):
    q, kv, lse = _z(s_q, h, d), _z(s_kv, 1, d), _z(s_q, h, dtype=F32)
    if kind == "sparse":
        idx = torch.randint(0, s_kv, (s_q, 1, topk), dtype=I32)
        lengths = torch.full((s_q,), topk, dtype=I32) if masked else None
        mla.sparse_attn_scores(q, kv, idx, lse, d ** -0.5, lengths)
    else:
        ks = torch.zeros(s_q, dtype=I32) if masked else None
        ke = torch.full((s_q,), s_kv, dtype=I32) if masked else None
        mla.dense_attn_scores(q, kv, lse, d ** -0.5, ks, ke)


case("sparse_attn_scores h128 d576 topk2048", _attn_scores, "sparse", False)
case("sparse_attn_scores h128 d576 topk2048 lens", _attn_scores, "sparse", True)
case("dense_attn_scores h128 d576", _attn_scores, "dense", False)
case("dense_attn_scores h128 d576 windows", _attn_scores, "dense", True)


# the sparse_prefill forward candidates (FWD_VARIANT settings) named in tools/
# diag_sparse_prefill.py, forward only, at the production shapes; added by --prefill-fwd
def _sparse_prefill_fwd_variant(variant, h_q, d_qk, d_v, sink=False, lens=False, s_q=2,
                                s_kv=8192, topk=2048):
    import torch_mla.triton.sparse_prefill as sp
    old = sp.FWD_VARIANT
    sp.FWD_VARIANT = variant
    try:
        q = _z(s_q, h_q, d_qk)
        idx = torch.randint(0, s_kv, (s_q, 1, topk), dtype=I32)
        mla.sparse_prefill(q, _z(s_kv, 1, d_qk), idx, d_qk ** -0.5, d_v,
                           torch.zeros(h_q, dtype=F32) if sink else None,
                           torch.full((s_q,), topk, dtype=I32) if lens else None)
    finally:
        sp.FWD_VARIANT = old


def add_prefill_fwd_cases(names: str):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from diag_sparse_prefill import FWD_CANDIDATES
    wanted = list(FWD_CANDIDATES) if names == "all" else names.split(",")
    for name in wanted:
        var = FWD_CANDIDATES[name]
        for h in (128, 64):
            case(f"sparse_prefill fwd {name} d576/512 h{h}", _sparse_prefill_fwd_variant, var, h,
                 576, 512)
            case(f"sparse_prefill fwd {name} d512/512 h{h} sink+lens", _sparse_prefill_fwd_variant,
                 var, h, 512, 512, sink=True, lens=True)


# the sparse_prefill backward candidates (module settings) named in tools/
# diag_sparse_prefill.py BWD_CANDIDATES, forward + backward at the production shapes; added by
# --prefill-bwd
def _sparse_prefill_bwd_variant(settings, *args, **kwargs):
    import torch_mla.triton.sparse_prefill as sp
    old = {k: getattr(sp, k) for k in settings}
    try:
        for k, v in settings.items():
            setattr(sp, k, v)
        _sparse_prefill(*args, **kwargs)
    finally:
        for k, v in old.items():
            setattr(sp, k, v)


def add_prefill_bwd_cases(names: str):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from diag_sparse_prefill import BWD_CANDIDATES, BWD_TIME_DEFAULT
    wanted = (list(BWD_CANDIDATES) if names == "all" else BWD_TIME_DEFAULT if names == "new"
              else names.split(","))
    for name in wanted:
        settings = BWD_CANDIDATES[name]
        case(f"sparse_prefill bwd {name} d576/512 h128", _sparse_prefill_bwd_variant, settings,
             128, 576, 512)
        case(f"sparse_prefill bwd {name} d576/512 h64 sink+lens", _sparse_prefill_bwd_variant,
             settings, 64, 576, 512, sink=True, lens=True)
        case(f"sparse_prefill bwd {name} d512/512 h128 sink+lens", _sparse_prefill_bwd_variant,
             settings, 128, 512, 512, sink=True, lens=True)


def _launched_kernels() -> Dict[str, List[str]]:
    """module -> names of its @triton.jit functions that the module's host code launches
    (``name[grid](...)`` or ``launch(name, ...)`` appears in its source)."""
    import importlib
    import inspect
    import pkgutil

    import torch_mla.triton as tri
    out = {}
    for m in pkgutil.iter_modules(tri.__path__):
        mod = importlib.import_module(f"torch_mla.triton.{m.name}")
        try:
            src = inspect.getsource(mod)
        except OSError:
            continue
        names = [n for n, v in vars(mod).items() if isinstance(v, JITFunction)
                 and v.module == mod.__name__
                 and re.search(rf"\b{re.escape(n)}\[|launch\(\s*{re.escape(n)}\s*,", src)]
        if names:
            out[mod.__name__] = sorted(names)
    return out


def capture_cases(only: Optional[str]):
    """Run the (selected) cases; returns (launches, case errors {name: text}, Triton ops that
    ran)."""
    import torch_mla
    import torch_mla.triton as tri
    errors = {}
    ops_run = set()
    pat = re.compile(only) if only else None
    impls = dict(tri.IMPLS)
    for op, fn in impls.items():  # the backend looks its impls up per call: count the ops
        tri.IMPLS[op] = (lambda op, fn: lambda *a, **k: (ops_run.add(op), fn(*a, **k))[1])(op, fn)
    try:
        with capturing(), torch.no_grad(), torch_mla.use_backend("triton"):
            for name, thunk in CASES:
                if pat is not None and not pat.search(name):
                    continue
                _CAPTURE["case"] = name
                n0 = len(_CAPTURE["launches"])
                torch.manual_seed(0)
                try:
                    thunk()
                except Exception as e:  # the host code refused or failed: report, go on
                    errors[name] = f"{type(e).__name__}: {e}\n" + traceback.format_exc()
                if len(_CAPTURE["launches"]) == n0 and name not in errors:
                    errors[name] = "no Triton launch was captured"
    finally:
        tri.IMPLS.update(impls)
    return list(_CAPTURE["launches"]), errors, ops_run


# ---------------------------------------------------------------------------------------------
# compiling and reading resources
# ---------------------------------------------------------------------------------------------

def _tool(name: str) -> Optional[str]:
    """A CUDA binary as the Triton in use finds it (its knobs: TRITON_<NAME>_PATH, else the one
    it bundles; ptxas as Triton picks it for the target arch), else PATH, else the toolkit."""
    cands = []
    try:
        if name == "ptxas":
            from triton.backends.nvidia.compiler import get_ptxas
            cands.append(get_ptxas(TARGET.arch).path)
        else:
            cands.append(getattr(triton.knobs.nvidia, name).path)
    except Exception:  # noqa: BLE001 - older/newer Triton: search below
        pass
    cands += [os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name),
              shutil.which(name), f"/usr/local/cuda/bin/{name}"]
    for cand in cands:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


CUOBJDUMP: Optional[str] = None
PTXAS: Optional[str] = None


def find_tools():
    global CUOBJDUMP, PTXAS
    CUOBJDUMP, PTXAS = _tool("cuobjdump"), _tool("ptxas")


def resource_usage(cubin: bytes, ptx: Optional[str]) -> dict:
    """Registers and local memory (bytes per thread) of the kernel's cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        if CUOBJDUMP and cubin:
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(cubin)
            r = subprocess.run([CUOBJDUMP, "--dump-resource-usage", path], capture_output=True,
                               text=True)
            # STACK is the per-thread stack frame, where ptxas puts spilled registers (what
            # ptxas -v calls "bytes stack frame", the driver's LOCAL_SIZE_BYTES); LOCAL counts
            # .local arrays only
            m = re.search(r"REG:(\d+)\s+STACK:(\d+)", r.stdout)
            if m:
                return dict(regs=int(m.group(1)), local=int(m.group(2)), via="cuobjdump")
        if PTXAS and ptx:
            path = os.path.join(tmp, "k.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            arch = re.search(r"^\s*\.target\s+(\w+)", ptx, re.M)
            r = subprocess.run([PTXAS, "-v", f"--gpu-name={arch.group(1) if arch else 'sm_90a'}",
                                path, "-o", os.path.join(tmp, "k.o")], capture_output=True,
                               text=True)
            regs = re.search(r"Used (\d+) registers", r.stderr)
            stack = re.search(r"(\d+) bytes stack frame", r.stderr)
            if regs:
                return dict(regs=int(regs.group(1)), local=int(stack.group(1)) if stack else 0,
                            via="ptxas -v")
    return dict(regs=None, local=None, via=None)


def dot_layouts(ttgir: Optional[str]) -> List[str]:
    """One line per dot of the TTGIR: M x N x K, where A and B come from (registers / shared
    memory), the MMA layout's warpsPerCTA and instruction shape."""
    if not ttgir:
        return []
    aliases = dict(re.findall(r"^(#\w+) = (#ttg\.\w+<\{.*\}>)\s*$", ttgir, re.M))
    out = []
    for line in ttgir.splitlines():
        m = re.search(r"= (ttng\.warp_group_dot|tt\.dot) [^{:]*(?:\{[^}]*\})?\s*: (.*?) -> "
                      r"tensor<(\d+)x(\d+)x\w+, "
                      r"(#[\w.]+(?:<\{.*?\}>)?)>", line)
        if not m:
            continue
        a_type, b_type = m.group(2).split(" * ", 1)
        k = re.search(r"<(\d+)x(\d+)x", a_type)
        lay = aliases.get(m.group(5), m.group(5))
        warps = re.search(r"warpsPerCTA = \[([\d, ]+)\]", lay)
        instr = re.search(r"instrShape = \[([\d, ]+)\]", lay)

        def src(t):
            return "smem" if t.lstrip().startswith("!ttg.memdesc") else "regs"
        out.append(f"{m.group(3)}x{m.group(4)}x{k.group(2) if k else '?'} "
                   f"A:{src(a_type)} B:{src(b_type)} "
                   f"warps[{warps.group(1).replace(' ', '') if warps else '?'}] "
                   f"instr[{instr.group(1).replace(' ', '') if instr else '?'}]")
    return out


def _error_summary(e: BaseException) -> str:
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # Triton's CompilationError: source excerpt, then the message; keep the message line(s)
    head = f"{type(e).__name__}"
    if not lines:
        return head
    msg = lines[-1].strip()
    # CompilationError: "at L:C:" (relative to the def), the def's source, the message
    loc = re.search(r"at (\d+:\d+):", text)
    fn = re.search(r"^\s*def (\w+)\(", text, re.M)
    where = (f" in {fn.group(1)}()" if fn else "") + (f" at {loc.group(1)}" if loc else "")
    return f"{head}{where}: {msg}"


def compile_launch(ln: Launch, shared_limit: int) -> dict:
    t0 = time.time()
    try:
        src = ASTSource(ln.fn, ln.signature, ln.constexprs, ln.attrs)
        k = triton.compile(src, target=TARGET, options=ln.options.__dict__)
    except Exception as e:  # noqa: BLE001 - any compile failure is a result
        return dict(ok=False, error=_error_summary(e),
                    detail=f"{type(e).__name__}: {e}", seconds=time.time() - t0)
    md = k.metadata
    res = dict(ok=True, shared=int(md.shared), num_warps=md.num_warps,
               num_stages=md.num_stages, seconds=None)
    asm = k.asm
    res.update(resource_usage(asm.get("cubin", b""), asm.get("ptx")))
    res["dots"] = dot_layouts(asm.get("ttgir"))
    res["spills"] = None if res["local"] is None else res["local"] // 4
    res["shared_ok"] = res["shared"] <= shared_limit
    res["seconds"] = time.time() - t0
    return res


@triton.jit
def _warm_up_kernel(X):
    tl_ = triton.language
    tl_.store(X + tl_.arange(0, 16), tl_.load(X + tl_.arange(0, 16)) + 1)


def _warm_up(launches: List[Launch]):
    """Compute what every compile needs once, before forking: Triton's own key (a hash of its
    libraries, ~0.4 s), the backend's hash and tool versions (one tiny compile), and each
    kernel's source key."""
    try:
        triton.compile(ASTSource(_warm_up_kernel, {"X": "*fp32"}, {}, {}), target=TARGET,
                       options={"num_warps": 1})
    except Exception:  # noqa: BLE001 - only a warm-up; the real compiles report errors
        pass
    for ln in launches:
        try:
            ln.fn.cache_key
        except Exception:  # noqa: BLE001
            pass


def _compile_child(ln: Launch, shared_limit: int, conn):
    try:
        res = compile_launch(ln, shared_limit)
    except BaseException as e:  # noqa: BLE001 - report whatever happened
        res = dict(ok=False, error=_error_summary(e), detail=traceback.format_exc(), seconds=0.0)
    conn.send(res)
    conn.close()


def compile_all(launches: List[Launch], jobs: int, shared_limit: int, timeout: float,
                progress=True):
    """Compile each distinct launch once (identical ones share the result), each in a forked
    process of its own, ``jobs`` at a time: a compiler crash (an LLVM / MLIR abort, a segfault)
    or a hang then shows up as that launch's result instead of taking the tool down."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    first: Dict[tuple, int] = {}
    todo = []
    for i, ln in enumerate(launches):
        j = first.setdefault(ln.uid, i)
        if j != i:
            ln.same_as = j
        else:
            todo.append(i)
    _warm_up(launches)
    ctx = mp.get_context("fork")  # children inherit the captured launches; no pickling
    results: Dict[int, dict] = {}
    running: Dict[int, tuple] = {}  # index -> (process, connection, start time)
    t0 = time.time()
    pending = list(todo)
    while pending or running:
        while pending and len(running) < max(1, jobs):
            i = pending.pop(0)
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_compile_child, args=(launches[i], shared_limit, send),
                               daemon=True)
            proc.start()
            send.close()
            running[i] = (proc, recv, time.time())
        wait([c for _, c, _ in running.values()] + [p.sentinel for p, _, _ in running.values()],
             timeout=1.0)
        for i, (proc, conn, start) in list(running.items()):
            res = None
            if conn.poll():
                try:
                    res = conn.recv()
                except EOFError:
                    res = None
                else:
                    proc.join()
            if res is None and not proc.is_alive():
                proc.join()
                code = proc.exitcode
                why = f"was killed by signal {-code}" if code is not None and code < 0 \
                    else f"exited with status {code}"
                res = dict(ok=False, error=f"compiler process crashed ({why})",
                           detail=f"the process compiling this launch {why} before it "
                                  "returned a result (see its output above)",
                           seconds=time.time() - start)
            if res is None and time.time() - start > timeout:
                proc.kill()
                proc.join()
                res = dict(ok=False, error=f"compile timed out after {timeout:.0f}s",
                           detail="", seconds=time.time() - start)
            if res is not None:
                conn.close()
                del running[i]
                results[i] = res
                if progress:
                    _progress(len(results), len(todo), launches[i], res, t0)
    for i, ln in enumerate(launches):
        ln.result = results[i if ln.same_as is None else ln.same_as]


def _progress(n, total, ln, res, t0):
    status = "ok" if res["ok"] else "ERROR"
    print(f"  [{n}/{total}] {ln.kernel:<22} {status:<5} {res['seconds']:6.1f}s "
          f"(elapsed {time.time() - t0:.0f}s)", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

def _status(res: dict, limit: int) -> str:
    if not res["ok"]:
        return "COMPILE ERROR"
    if not res["shared_ok"]:
        return "SHARED > LIMIT"
    return "ok"


def report(launches: List[Launch], errors: Dict[str, str], limit: int, verbose: bool,
           dots: bool = False) -> int:
    """Print the table and the problems; returns the number of problems."""
    ver = triton.__version__
    rows = []
    seen = set()
    for i, ln in enumerate(launches):
        # one row per distinct (case, launch); repeats inside a case (e.g. three fills) collapse
        k = (ln.case, ln.uid)
        if k not in seen:
            seen.add(k)
            rows.append((i, ln, ln.result))
    cw = max([len(ln.case) for _, ln, _ in rows] + [4])
    kw = max([len(ln.kernel) for _, ln, _ in rows] + [6])
    hdr = (f"{'#':>3}  {'case':<{cw}}  {'kernel':<{kw}}  {'triton':<6}  {'result':<14} "
           f"{'shared':>7} {'regs':>4} {'spills':>6}  config (w: num_warps, s: num_stages)")
    print(hdr)
    print("-" * len(hdr))
    for i, ln, r in rows:
        st = _status(r, limit)
        ok = r["ok"]
        shared = str(r["shared"]) if ok else "-"
        regs = str(r["regs"]) if ok and r.get("regs") is not None else "-"
        spills = str(r["spills"]) if ok and r.get("spills") is not None else "-"
        dup = f"  (= #{ln.same_as})" if ln.same_as is not None else ""
        print(f"{i:>3}  {ln.case:<{cw}}  {ln.kernel:<{kw}}  {ver:<6}  {st:<14} {shared:>7} "
              f"{regs:>4} {spills:>6}  {ln.config()}{dup}")
    print()
    if dots:
        print("Dots (TTGIR; M x N x K, operand sources, warpsPerCTA, wgmma instrShape):")
        for i, ln, r in rows:
            if ln.same_as is None and r["ok"] and r.get("dots"):
                print(f"  #{i} {ln.kernel} [{ln.case}]")
                for d in r["dots"]:
                    print(f"      {d}")
        print()
    failures = 0
    problems = [(i, ln, r) for i, ln, r in rows if _status(r, limit) != "ok"]
    if problems or errors:
        print("PROBLEMS:")
    for i, ln, r in problems:
        failures += 1
        if ln.same_as is not None:
            print(f"  #{i} {ln.kernel} [{ln.case}]: as #{ln.same_as}")
            continue
        if not r["ok"]:
            print(f"  #{i} {ln.kernel} [{ln.case}] grid={ln.grid}: {r['error']}")
            if verbose and r.get("detail"):
                print("    " + r["detail"].strip().replace("\n", "\n    "))
        else:
            print(f"  #{i} {ln.kernel} [{ln.case}] grid={ln.grid}: shared memory {r['shared']} B "
                  f"> {limit} B: the launch raises OutOfResources")
        print(f"      ({ln.fn.module}; {ln.config()})")
    for name, err in errors.items():
        failures += 1
        print(f"  case '{name}' failed on the host: {err.splitlines()[0]}")
        if verbose:
            print("    " + err.strip().replace("\n", "\n    "))
    spilling = sorted({(ln.kernel, ln.fn.module, r["spills"]) for _, ln, r in rows
                       if r["ok"] and r.get("spills")}, key=lambda x: -x[2])
    if spilling:
        print("Spills (stack frame / 4 per thread, as n_spills; not a failure): " + ", ".join(
            f"{k} {n}" for k, _, n in spilling))
    return failures


def main(args) -> int:
    global TARGET
    TARGET = GPUTarget("cuda", args.arch, 32)
    t_start = time.time()
    print(f"triton {triton.__version__} ({os.path.dirname(triton.__file__)}), torch "
          f"{torch.__version__}; target {TARGET.backend} sm_{TARGET.arch} "
          f"(warp {TARGET.warp_size}), shared memory limit {args.shared_limit} B, {args.sms} SMs")
    if _INTERPRET_WAS is not None:
        print(f"note: TRITON_INTERPRET={_INTERPRET_WAS} was removed from the environment")
    find_tools()
    print(f"registers/spills via: {CUOBJDUMP or '-'} (else ptxas -v: {PTXAS or '-'})")
    import torch_mla  # noqa: F401  (after TRITON_INTERPRET is gone)
    for note in patch_torch_mla(args.sms):
        print("note:", note)
    if args.prefill_fwd:
        add_prefill_fwd_cases(args.prefill_fwd)
    if args.prefill_bwd:
        add_prefill_bwd_cases(args.prefill_bwd)
    launches, errors, ops_run = capture_cases(args.only)
    print(f"captured {len(launches)} launches ({len({l.uid for l in launches})} distinct) in "
          f"{len({l.case for l in launches})} cases in {time.time() - t_start:.1f}s")
    if not args.only:  # coverage: every Triton op and every launched kernel seen
        import torch_mla.triton as tri
        missing_ops = sorted(set(tri.IMPLS) - ops_run)
        seen = {(l.fn.module, l.fn.fn.__name__) for l in launches}
        missing_k = [f"{m}.{n}" for m, names in _launched_kernels().items() for n in names
                     if (m, n) not in seen]
        if missing_ops:
            print(f"WARNING: Triton ops no case runs: {', '.join(missing_ops)}")
        if missing_k:
            print(f"WARNING: kernels no case launches (other host paths or tuning knobs): "
                  f"{', '.join(missing_k)}")
    if args.list:
        for i, ln in enumerate(launches):
            print(f"{i:>3}  {ln.case:<48} {ln.kernel:<22} grid={ln.grid} {ln.config()}")
        for name, err in errors.items():
            print(f"case '{name}' failed on the host: {err.splitlines()[0]}")
        return 1 if errors else 0
    jobs = args.jobs or min(8, os.cpu_count() or 1)
    compile_all(launches, jobs, args.shared_limit, args.timeout)
    print()
    failures = report(launches, errors, args.shared_limit, args.verbose, args.dots)
    total = time.time() - t_start
    if args.json:
        out = dict(triton=triton.__version__, target=str(TARGET), shared_limit=args.shared_limit,
                   seconds=total, case_errors=errors,
                   launches=[dict(index=i, case=ln.case, kernel=ln.kernel, module=ln.fn.module,
                                  grid=ln.grid, config=ln.config(), same_as=ln.same_as,
                                  status=_status(ln.result, args.shared_limit), **ln.result)
                             for i, ln in enumerate(launches)])
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    print(f"triton {triton.__version__}: {len(launches)} launches in "
          f"{len({l.case for l in launches})} cases; "
          f"{'%d problem(s)' % failures if failures else 'all compile, shared memory within limit'}"
          f"; {total:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
