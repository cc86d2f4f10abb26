"""Small pieces shared by the Triton kernel modules."""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # kernels run the softmax in exp2 with log2(e) folded into the scale


def pow2(n: int, lo: int = 16) -> int:
    """Smallest power of two >= n (and >= lo): tl.arange and tl.dot tile sizes."""
    return max(lo, triton.next_power_of_2(max(1, n)))


@triton.jit
def mm(a, b, acc, DOT_F32: tl.constexpr):
    # The interpreter multiplies 16-bit dot operands as raw bits: upcast there, never on the GPU.
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)
