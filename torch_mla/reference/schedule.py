"""Reference (and device-agnostic) ``decode_schedule``: pure tensor ops, so it runs on the GPU
without a host sync and inside CUDA-graph capture. Layout documented in meta/schedule.py."""

from __future__ import annotations

import torch

from ..meta.schedule import SCHEDULE_WIDTH


def decode_schedule(seqlens: torch.Tensor, num_parts: int, block_n: int = 64):
    dev = seqlens.device
    b = seqlens.shape[0]
    nblocks = (seqlens.to(torch.int64).clamp_min(0) + block_n - 1) // block_n  # [b]
    ends = torch.cumsum(nblocks, 0)  # exclusive end of each batch in the global block list
    starts = ends - nblocks
    total = ends[-1:] if b > 0 else torch.zeros(1, dtype=torch.int64, device=dev)
    per = torch.clamp_min((total + num_parts - 1) // num_parts, 1)  # blocks per part, [1]

    p = torch.arange(num_parts, device=dev, dtype=torch.int64)
    g_begin = torch.minimum(p * per, total)
    g_end = torch.minimum(g_begin + per, total)
    empty = g_begin >= g_end
    # the batch holding global block g is the first whose end exceeds g
    begin_b = torch.searchsorted(ends, g_begin, right=True)
    last_b = torch.searchsorted(ends, (g_end - 1).clamp_min(0), right=True)
    begin_b_c = begin_b.clamp_max(max(b - 1, 0))
    last_b_c = last_b.clamp_max(max(b - 1, 0))
    begin_block = g_begin - (starts[begin_b_c] if b > 0 else 0)
    end_block = g_end - (starts[last_b_c] if b > 0 else 0)

    # parts touching batch i: those from floor(start/per) to floor((end-1)/per)
    splits = torch.where(nblocks > 0, (ends - 1) // per - starts // per + 1,
                         torch.zeros_like(nblocks))
    num_splits = torch.zeros(b + 1, dtype=torch.int64, device=dev)
    num_splits[1:] = torch.cumsum(splits, 0)
    first_part_of_batch = starts // per
    first_split = (num_splits[begin_b_c] if b > 0 else torch.zeros_like(p)) + (
        p - (first_part_of_batch[begin_b_c] if b > 0 else 0))

    meta = torch.zeros(num_parts, SCHEDULE_WIDTH, dtype=torch.int64, device=dev)
    meta[:, 0] = torch.where(empty, torch.full_like(p, b), begin_b)
    meta[:, 1] = torch.where(empty, torch.zeros_like(p), begin_block)
    meta[:, 2] = torch.where(empty, torch.full_like(p, b), last_b)
    meta[:, 3] = torch.where(empty, torch.zeros_like(p), end_block)
    meta[:, 4] = torch.where(empty, num_splits[-1].expand(num_parts), first_split)
    meta[:, 5] = block_n  # kernels read block counts in these units
    return meta.to(torch.int32), num_splits.to(torch.int32)
