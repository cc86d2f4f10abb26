"""Contract of ``mla::decode_schedule``: how decode work is split across the GPU, on the device.

Given each batch element's number of keys (``seqlens [b]`` int32: cache_seqlens for dense decode,
topk_length (+ extra_topk_length) or topk for sparse decode), the keys are cut into blocks of
``block_n`` and the global list of blocks (batch-major) is cut into ``num_parts`` equal runs, one
per persistent CTA group. Outputs, all int32 and computed with tensor ops (no host sync, graph
capturable, reusable by every layer of a step):

- ``metadata [num_parts, 8]``: per part ``(begin_batch, begin_block, end_batch, end_block,
  first_split, block_n, 0, 0)``; the part covers blocks from (begin_batch, begin_block) up to but not
  including (end_batch, end_block), end_block counted within end_batch; blocks are of block_n
  keys (recorded so that a kernel can refuse or adapt to another unit); an empty part has
  begin_batch == b. ``first_split`` is the index, in the split-KV workspace, of the part's first
  partial result.
- ``num_splits [b + 1]``: exclusive prefix sum of the number of parts touching each batch element
  (0 parts for a batch element with no keys: its output is zeros, lse +inf).
"""

from __future__ import annotations

import torch

from .common import check, check_device, check_dtype, check_rank, check_shape, define

SCHEDULE_WIDTH = 8

FWD = define(
    "decode_schedule(Tensor seqlens, int num_parts, int block_n=64) "
    "-> (Tensor metadata, Tensor num_splits)"
)


def check_decode_schedule(seqlens, num_parts, block_n=64):
    check_rank("seqlens", seqlens, 1, "[b]")
    check_dtype("seqlens", seqlens, (torch.int32,))
    check(num_parts >= 1, lambda: f"num_parts must be >= 1, got {num_parts}")
    check(block_n >= 1, lambda: f"block_n must be >= 1, got {block_n}")


@torch.library.register_fake(FWD)
def _decode_schedule_fake(seqlens, num_parts, block_n=64):
    check_decode_schedule(seqlens, num_parts, block_n)
    b = seqlens.shape[0]
    return (seqlens.new_empty((num_parts, SCHEDULE_WIDTH), dtype=torch.int32),
            seqlens.new_empty((b + 1,), dtype=torch.int32))


def check_schedule(schedule_metadata, num_splits, b, q) -> None:
    """The optional schedule a decode op receives."""
    check(
        (schedule_metadata is None) == (num_splits is None),
        lambda: "schedule_metadata and num_splits must be given together (pass the "
        "DecodeSchedule returned by torch_mla.decode_schedule)",
    )
    if schedule_metadata is None:
        return
    check_rank("schedule_metadata", schedule_metadata, 2, f"[num_parts, {SCHEDULE_WIDTH}]")
    check_dtype("schedule_metadata", schedule_metadata, (torch.int32,))
    check(
        schedule_metadata.shape[1] == SCHEDULE_WIDTH,
        lambda: f"schedule_metadata.shape[1] must be {SCHEDULE_WIDTH}, got {schedule_metadata.shape[1]}",
    )
    check_device("schedule_metadata", schedule_metadata, "q", q)
    check_dtype("num_splits", num_splits, (torch.int32,))
    check_shape("num_splits", num_splits, (b + 1,), "[b + 1] (the schedule was made for another batch)")
    check_device("num_splits", num_splits, "q", q)


def schedule_valid_eager(schedule_metadata, num_splits, b, dev) -> bool:
    """True only if ``check_schedule(schedule_metadata, num_splits, b, q)`` passes for a q on
    ``dev`` (concrete inputs; False: run the checks for the error)."""
    if schedule_metadata is None:
        return num_splits is None
    if num_splits is None:
        return False
    ms = schedule_metadata.shape
    return (len(ms) == 2 and ms[1] == SCHEDULE_WIDTH and schedule_metadata.dtype is torch.int32
            and schedule_metadata.device == dev and num_splits.shape == (b + 1,)
            and num_splits.dtype is torch.int32 and num_splits.device == dev)
