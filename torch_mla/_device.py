"""Facts about a device that kernels size their grids by, read once per device (a
get_device_properties call on every op call would be host work in the hot path)."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device, cpu_default: int = 8) -> int:
    """Streaming multiprocessors of a CUDA device; ``cpu_default`` for any other device (the
    reference, and Triton's interpreter, have no SMs but still split work)."""
    if device.type != "cuda":
        return cpu_default
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
