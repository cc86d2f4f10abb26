"""decode_schedule: every (batch, block) of work is covered exactly once, split indices agree."""

import pytest
import torch

import torch_mla


def _expand(meta, num_splits, seqlens, block_n):
    """Walk the schedule like a kernel would; return {(batch, block): (part, split index)}."""
    b = seqlens.numel()
    nblocks = [(int(s) + block_n - 1) // block_n for s in seqlens]
    seen = {}
    for p, row in enumerate(meta.tolist()):
        bb, blk, eb, eblk, split = row[:5]
        if bb == b:
            continue
        for i in range(bb, eb + 1):
            lo = blk if i == bb else 0
            hi = eblk if i == eb else nblocks[i]
            if lo >= hi:
                continue
            for j in range(lo, hi):
                assert (i, j) not in seen, f"block {(i, j)} covered twice"
                seen[(i, j)] = (p, split)
            assert int(num_splits[i]) <= split < int(num_splits[i + 1]), (p, i, split)
            split += 1
    return seen, nblocks


@pytest.mark.parametrize("seed", range(6))
def test_schedule_covers_all_work_once(seed):
    g = torch.Generator().manual_seed(seed)
    b = int(torch.randint(1, 20, (1,), generator=g))
    seqlens = torch.randint(0, 700, (b,), generator=g, dtype=torch.int32)
    seqlens[torch.rand(b, generator=g) < 0.2] = 0
    num_parts = int(torch.randint(1, 40, (1,), generator=g))
    block_n = int(torch.tensor([16, 64])[seed % 2])
    sched = torch_mla.decode_schedule(seqlens, num_parts=num_parts, block_n=block_n)
    assert sched.metadata.shape == (num_parts, 8) and sched.metadata.dtype == torch.int32
    assert sched.num_splits.shape == (b + 1,) and sched.num_splits.dtype == torch.int32
    assert (sched.metadata[:, 5] == block_n).all()
    seen, nblocks = _expand(sched.metadata, sched.num_splits, seqlens, block_n)
    assert set(seen) == {(i, j) for i in range(b) for j in range(nblocks[i])}
    # each batch element gets as many splits as distinct parts touching it, numbered densely
    for i in range(b):
        parts = {seen[(i, j)][0] for j in range(nblocks[i])}
        assert int(sched.num_splits[i + 1] - sched.num_splits[i]) == len(parts)
    # the work is balanced: no part holds more than ceil(total / num_parts) blocks
    total = sum(nblocks)
    per_part = {}
    for p, _ in seen.values():
        per_part[p] = per_part.get(p, 0) + 1
    assert max(per_part.values(), default=0) <= max(1, -(-total // num_parts))


def test_schedule_all_empty():
    seqlens = torch.zeros(3, dtype=torch.int32)
    sched = torch_mla.decode_schedule(seqlens, num_parts=4)
    assert sched.num_splits.tolist() == [0, 0, 0, 0]
    assert (sched.metadata[:, 0] == 3).all()


def test_default_parts_follow_the_head_blocks(monkeypatch):
    """Without num_parts the schedule has one part per SM, divided by the 64-head blocks of h_q
    and by s_q when given (one wave of the decode kernels' programs)."""
    import torch_mla._device as dev

    monkeypatch.setattr(dev, "sm_count", lambda device: 132)
    lens = torch.full((4,), 300, dtype=torch.int32)
    assert torch_mla.decode_schedule(lens).metadata.shape[0] == 132
    assert torch_mla.decode_schedule(lens, h_q=128).metadata.shape[0] == 66
    assert torch_mla.decode_schedule(lens, h_q=64).metadata.shape[0] == 132
    assert torch_mla.decode_schedule(lens, h_q=16).metadata.shape[0] == 132
    assert torch_mla.decode_schedule(lens, h_q=192).metadata.shape[0] == 44
    assert torch_mla.decode_schedule(lens, h_q=128, num_parts=7).metadata.shape[0] == 7
    # s_q counts as FlashMLA's metadata counts s_q * h_q query rows: one job per SM
    assert torch_mla.decode_schedule(lens, h_q=128, s_q=2).metadata.shape[0] == 33
    assert torch_mla.decode_schedule(lens, h_q=64, s_q=4).metadata.shape[0] == 33
    assert torch_mla.decode_schedule(lens, h_q=128, s_q=1).metadata.shape[0] == 66
    assert torch_mla.decode_schedule(lens, h_q=128, s_q=200).metadata.shape[0] == 1
