"""The roof, measured in the same run: memory bandwidth from a large device-to-device copy
(read + write bytes counted), the tensor-core rate from a large bf16 matmul and, where the GPU
has FP8 tensor cores, the FP8 rate from a large e4m3 x e4m3 -> bf16 ``torch._scaled_mm``. A case's
roof time is max(FLOPs / rate, bytes / bandwidth) with the rate its ``kind`` names:

- ``"matmul"``: the bf16 matmul rate (every attention op);
- ``"fp8"``: the FP8 rate (the indexer's FP8 logits); no FP8 roof measured -> no percentage;
- ``"bytes"``: bytes / bandwidth alone (memory-bound ops whose FLOPs run at another precision
  than the probe's, e.g. the paged indexer logits).

On a CPU (``--tiny`` runs) the copy and bf16 probes run small, in float32, timed by the host
clock: numbers to exercise the code, not to quote. There is no FP8 probe on a CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from . import timing


KINDS = ("matmul", "fp8", "bytes")


@dataclasses.dataclass
class Roof:
    bandwidth: float  # bytes / s
    flops: float  # FLOP / s (bf16 matmul)
    how: str
    fp8_flops: Optional[float] = None  # FLOP / s of the FP8 matmul; None: not measured
    fp8_how: str = "not measured"  # how it was measured, or why there is none

    def time(self, flops: float, nbytes: float, kind: str = "matmul") -> Optional[float]:
        """Seconds the roofline allows for this much work (None: no roof of that kind)."""
        if kind == "bytes":
            return nbytes / self.bandwidth
        if kind == "fp8":
            if not self.fp8_flops:
                return None
            return max(flops / self.fp8_flops, nbytes / self.bandwidth)
        if kind != "matmul":
            raise ValueError(f"unknown roof kind {kind!r}; choose from {KINDS}")
        return max(flops / self.flops, nbytes / self.bandwidth)

    def percent(self, flops: float, nbytes: float, seconds: Optional[float],
                kind: str = "matmul") -> Optional[float]:
        if not seconds or seconds <= 0 or (flops <= 0 and nbytes <= 0):
            return None
        t = self.time(flops, nbytes, kind)
        return None if t is None else 100.0 * t / seconds


def fp8_matmul_rate(device: torch.device, quick: bool = False,
                    m: int = 8192) -> Tuple[Optional[float], str]:
    """(FLOP / s of an ``m^3`` e4m3 x e4m3 -> bf16 ``torch._scaled_mm`` with per-tensor scales,
    how) on a CUDA device with FP8 tensor cores, else (None, why not). Never raises."""
    if device.type != "cuda":
        return None, f"no FP8 roof on {device.type} (measured on CUDA only)"
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return None, f"no FP8 roof: torch {torch.__version__} lacks torch._scaled_mm"
    cap = torch.cuda.get_device_capability(device)
    if tuple(cap) < (8, 9):
        return None, (f"no FP8 roof: {torch.cuda.get_device_name(device)} (sm_{cap[0]}{cap[1]}) "
                      f"has no FP8 tensor cores (sm_89+)")
    try:
        a = torch.randn(m, m, device=device).to(torch.float8_e4m3fn)
        # cuBLASLt's FP8 GEMM wants the second operand column-major: the transpose of a
        # row-major tensor
        b = torch.randn(m, m, device=device).to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=device, dtype=torch.float32)

        def mm(fast):
            out = torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                   use_fast_accum=fast)
            return out[0] if isinstance(out, tuple) else out  # torch < 2.4: (out, amax)

        # fast accumulation (no periodic promotion to f32) is the tensor cores' peak, and what
        # DeepGEMM's indexer kernels and ours (FP8_IMPRECISE_ACC = None) use
        fast = True
        try:
            mm(fast)
        except Exception:
            fast = False
            mm(fast)
        torch.cuda.synchronize(device)
        t_mm, _ = timing.cuda_graph_time(lambda: mm(fast), replays=10 if quick else 30,
                                         target_s=0.02)
        a = b = None  # free them (mm's closure holds the same cells)
        torch.cuda.empty_cache()
    except Exception as exc:  # e.g. a cuBLAS without FP8 kernels for this GPU
        try:
            torch.cuda.synchronize(device)
        except Exception:  # a sticky error: the cases will report it themselves
            pass
        return None, f"no FP8 roof: _scaled_mm failed ({type(exc).__name__}: {str(exc)[:120]})"
    how = (f"e4m3 x e4m3 -> bf16 torch._scaled_mm {m}^3, per-tensor scales, "
           f"{'fast' if fast else 'f32-promoted'} accumulation, CUDA-graph replay")
    return 2.0 * m ** 3 / t_mm, how


def measure(device: torch.device, quick: bool = False) -> Roof:
    if device.type == "cuda":
        n = 1 << 30  # bytes copied
        src = torch.ones(n, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        t_copy, _ = timing.cuda_graph_time(lambda: dst.copy_(src), replays=10 if quick else 30,
                                           target_s=0.02)
        del src, dst
        m = 8192
        a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        c = torch.empty(m, m, device=device, dtype=torch.bfloat16)
        t_mm, _ = timing.cuda_graph_time(lambda: torch.matmul(a, b, out=c),
                                         replays=10 if quick else 30, target_s=0.02)
        del a, b, c
        torch.cuda.empty_cache()
        how = (f"copy of {n >> 20} MiB (2x bytes), bf16 matmul {m}^3, CUDA-graph replay, "
               f"on {torch.cuda.get_device_name(device)}")
        fp8, fp8_how = fp8_matmul_rate(device, quick)
        return Roof(2.0 * n / t_copy, 2.0 * m ** 3 / t_mm, how, fp8, fp8_how)
    n = 1 << 24
    src = torch.ones(n, dtype=torch.uint8)
    dst = torch.empty_like(src)
    t_copy, _ = timing.wall_time(lambda: dst.copy_(src), replays=5)
    m = 256
    a = torch.randn(m, m)
    b = torch.randn(m, m)
    t_mm, _ = timing.wall_time(lambda: a @ b, replays=5)
    fp8, fp8_how = fp8_matmul_rate(device, quick)
    return Roof(2.0 * n / t_copy, 2.0 * m ** 3 / t_mm,
                f"CPU: copy of {n >> 20} MiB, fp32 matmul {m}^3, host clock (indicative only)",
                fp8, fp8_how)
