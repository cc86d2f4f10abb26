"""The measuring sticks: FlashMLA (when ``import flash_mla`` succeeds: the caller puts the prebuilt
peer on PYTHONPATH), PyTorch SDPA and FlexAttention. Only this benchmark package imports them,
and only here, guarded: torch_mla itself never does."""

from __future__ import annotations

import functools
from typing import Optional, Tuple


@functools.lru_cache(maxsize=None)
def flashmla() -> Tuple[Optional[object], Optional[str]]:
    """(the flash_mla module, None) or (None, why it is unavailable)."""
    try:
        import flash_mla  # noqa: PLC0415 - optional peer, benchmark only
    except Exception as exc:  # ImportError, or a binary built for another torch/CUDA
        return None, f"flash_mla is not importable ({type(exc).__name__}: {str(exc)[:100]})"
    return flash_mla, None


@functools.lru_cache(maxsize=None)
def flex_attention():
    """(compiled flex_attention, create_block_mask) or raises ImportError."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention as flex

    return torch.compile(flex, dynamic=False), create_block_mask
