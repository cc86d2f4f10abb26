"""What every Triton kernel module shares: where Triton may run, and the interpreter flag.

Triton decides at decoration time whether ``@triton.jit`` kernels are interpreted: with
``TRITON_INTERPRET=1`` set before torch_mla is imported, the kernels run on CPU tensors (slowly;
CI uses this on small shapes). The interpreter multiplies bf16/fp16 ``tl.dot`` operands as raw
bits, so kernels upcast dot operands to fp32 when ``DOT_F32`` (a constexpr) is set; the GPU build
never does. (Seen with Triton 3.9: bf16 x bf16 elementwise products are wrong there too, so do
elementwise math on 16-bit values in fp32.)
"""

from __future__ import annotations

import os
from typing import List, Sequence

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DOT_F32 = INTERPRET  # pass as a tl.constexpr to every kernel that calls tl.dot


def first_tensor(args: Sequence) -> torch.Tensor:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    raise ValueError("no tensor argument")


def device_reasons(args: Sequence) -> List[str]:
    """Why Triton cannot run on the device of these arguments (empty: it can)."""
    dev = first_tensor(args).device
    if dev.type == "cuda":
        return []
    if dev.type == "cpu":
        return [] if INTERPRET else ["CPU tensors run Triton kernels only under TRITON_INTERPRET=1"]
    return [f"Triton runs on CUDA devices, not {dev.type}"]
