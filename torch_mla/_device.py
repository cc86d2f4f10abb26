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


DECODE_HEAD_BLOCK = 64  # query heads one program of the decode kernels covers (Triton and native)


def decode_parts(device: torch.device, h_q: int = None, s_q: int = None) -> int:
    """Default part count of a decode schedule: one wave of the decode kernels' programs of 64
    heads of one query token, SM count // (ceil(h_q / 64) * s_q), as FlashMLA's metadata counts
    them (all SMs when h_q is unknown; s_q unknown counts 1). On the H100 at V32 b=64 s_q=2
    h_q=128 topk=2048 (2026-11-25), 66 parts ran Triton in 509 us and native in 454, against
    591 / 488 at 132 parts and 987 / 465 at 33 -- when neither kernel spread the s_q tokens over
    programs. The native kernel now runs (part, query token) jobs, one per CTA slot at best (V32
    b=128: 395 us with 33 parts, ~426 with 66), and the Triton grid has an s_q axis for the SMs
    the parts leave idle, so a schedule for s_q > 1 counts the tokens."""
    blocks = 1 if h_q is None else max(1, -(-int(h_q) // DECODE_HEAD_BLOCK))
    if s_q is not None:
        blocks *= max(1, int(s_q))
    return max(1, sm_count(device) // blocks)
