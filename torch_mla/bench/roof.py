"""The roof, measured in the same run: memory bandwidth from a large device-to-device copy
(read + write bytes counted) and the tensor-core rate from a large bf16 matmul. A case's roof time
is max(FLOPs / rate, bytes / bandwidth); "% of roof" is that time over the measured time.

On a CPU (``--tiny`` runs) the same two probes run small, in float32, timed by the host clock:
numbers to exercise the code, not to quote.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import timing


@dataclasses.dataclass
class Roof:
    bandwidth: float  # bytes / s
    flops: float  # FLOP / s
    how: str

    def time(self, flops: float, nbytes: float) -> float:
        """Seconds the roofline allows for this much work."""
        return max(flops / self.flops, nbytes / self.bandwidth)

    def percent(self, flops: float, nbytes: float, seconds: Optional[float]) -> Optional[float]:
        if not seconds or seconds <= 0 or (flops <= 0 and nbytes <= 0):
            return None
        return 100.0 * self.time(flops, nbytes) / seconds


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
        return Roof(2.0 * n / t_copy, 2.0 * m ** 3 / t_mm, how)
    n = 1 << 24
    src = torch.ones(n, dtype=torch.uint8)
    dst = torch.empty_like(src)
    t_copy, _ = timing.wall_time(lambda: dst.copy_(src), replays=5)
    m = 256
    a = torch.randn(m, m)
    b = torch.randn(m, m)
    t_mm, _ = timing.wall_time(lambda: a @ b, replays=5)
    return Roof(2.0 * n / t_copy, 2.0 * m ** 3 / t_mm,
                f"CPU: copy of {n >> 20} MiB, fp32 matmul {m}^3, host clock (indicative only)")
