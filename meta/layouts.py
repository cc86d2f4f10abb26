"""The FP8 paged KV-cache layouts, byte-compatible with FlashMLA. One place for these facts.

V32 (DeepSeek-V3.2, d_qk 576), per token, 656 B:
    512 x e4m3 NoPE | 4 x f32 scales (one per 128 NoPE values) | 64 x bf16 RoPE
MODEL1 (DeepSeek-V4, d_qk 512), per token 584 B, but grouped per block:
    all tokens' [448 x e4m3 NoPE | 64 x bf16 RoPE] (576 B each), then
    all tokens' [7 x ue8m0 scales (one per 64 NoPE values) | 1 pad byte] (8 B each);
    each block padded to a multiple of 576 B.

Scales are "scale_inv" (stored value x scale = original), computed as amax / 448 rounded up to a
power of two (amax clamped to >= 448e-4 first), in both layouts; V32 stores them as f32.

A cache tensor is ``[num_blocks, block_size, 1, bytes_per_token]`` of float8_e4m3fn (or uint8).
Its block stride (``stride(0)``) may exceed ``block_size * bytes_per_token`` (FlashMLA pads every
MODEL1 block to a multiple of 576 B, and its V32 quantizer allocates one spare token per block):
kernels address a block by ``stride(0)``, never by ``block_size * bytes_per_token``.
"""

from __future__ import annotations

import dataclasses

import torch

from .common import check, FP8_CACHE_DTYPES, check_dtype, check_rank


@dataclasses.dataclass(frozen=True)
class FP8Layout:
    name: str
    d: int  # d_qk of a token
    d_nope: int  # quantized part
    d_rope: int  # bf16 part
    tile: int  # NoPE values per scale
    bytes_per_token: int
    scale_bytes: int  # bytes of one scale (4 for f32, 1 for ue8m0)
    block_align: int  # block byte size is padded to a multiple of this

    @property
    def num_tiles(self) -> int:
        return self.d_nope // self.tile

    def block_bytes(self, block_size: int) -> int:
        """Bytes one block occupies at least (its minimal stride(0))."""
        raw = block_size * self.bytes_per_token
        return (raw + self.block_align - 1) // self.block_align * self.block_align


V32 = FP8Layout("v32", d=576, d_nope=512, d_rope=64, tile=128, bytes_per_token=656,
                scale_bytes=4, block_align=1)
MODEL1 = FP8Layout("model1", d=512, d_nope=448, d_rope=64, tile=64, bytes_per_token=584,
                   scale_bytes=1, block_align=576)
LAYOUTS = {V32.name: V32, MODEL1.name: MODEL1}
LAYOUT_BY_D = {V32.d: V32, MODEL1.d: MODEL1}
# MODEL1 per-block sections
MODEL1_DATA_BYTES = MODEL1.d_nope + 2 * MODEL1.d_rope  # 576: NoPE e4m3 + RoPE bf16
MODEL1_SCALE_STRIDE = 8  # 7 ue8m0 scales + 1 pad byte


def get_layout(layout: str) -> FP8Layout:
    check(
        isinstance(layout, str) and layout.lower() in LAYOUTS,
        lambda: f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}",
    )
    return LAYOUTS[layout.lower()]


def layout_for_d_qk(d_qk, name: str = "q") -> FP8Layout:
    # compared one by one (not a dict lookup): d_qk may be a SymInt under dynamic shapes
    check(
        d_qk == V32.d or d_qk == MODEL1.d,
        lambda: f"{name}.shape[-1] (d_qk) must be 576 (V32 FP8 cache) or 512 (MODEL1 FP8 cache), "
        f"got {d_qk}",
    )
    return V32 if d_qk == V32.d else MODEL1


def check_fp8_cache(name: str, cache: torch.Tensor, layout: FP8Layout) -> None:
    """A packed cache ``[num_blocks, block_size, 1, bytes]`` whose byte width matches ``layout``."""
    check_rank(name, cache, 4, f"[num_blocks, block_size, 1, {layout.bytes_per_token}]")
    check_dtype(name, cache, FP8_CACHE_DTYPES)
    check(
        cache.shape[2] == 1,
        lambda: f"{name}.shape[2] (h_kv) must be 1 for an FP8 cache, got {cache.shape[2]}",
    )
    check(
        cache.shape[3] == layout.bytes_per_token,
        lambda: f"{name}.shape[3] must be {layout.bytes_per_token} bytes per token for the "
        f"{layout.name} layout (d_qk {layout.d}), got {cache.shape[3]}",
    )
    check(
        cache.stride(3) == 1 and cache.stride(1) == layout.bytes_per_token,
        lambda: f"{name} must be packed within a block (strides (*, {layout.bytes_per_token}, *, 1)),"
        f" got strides {tuple(cache.stride())}",
    )
    # Blocks must not overlap. FlashMLA pads MODEL1 blocks to 576 B (empty_cache does too), but
    # a copy made by clone() is dense; the bytes within a block are the same either way.
    check(
        cache.shape[0] <= 1 or cache.stride(0) >= cache.shape[1] * layout.bytes_per_token,
        lambda: f"{name}.stride(0) must be at least {cache.shape[1] * layout.bytes_per_token} bytes "
        f"(one {layout.name} block of {cache.shape[1]} tokens), got {cache.stride(0)}",
    )


def block_view(cache: torch.Tensor, layout: FP8Layout) -> torch.Tensor:
    """The cache as uint8 ``[num_blocks, block_bytes]`` rows (a view, honouring stride(0))."""
    nb, bs = cache.shape[0], cache.shape[1]
    raw = cache.view(torch.uint8)
    stride0 = raw.stride(0) if nb > 1 else layout.block_bytes(bs)
    return raw.as_strided((nb, bs * layout.bytes_per_token), (stride0, 1))


def empty_cache(num_blocks: int, block_size: int, layout: FP8Layout, device=None,
                dtype=torch.float8_e4m3fn) -> torch.Tensor:
    """A new cache tensor as FlashMLA lays it out (MODEL1 blocks padded to 576 B)."""
    row = layout.block_bytes(block_size)
    store = torch.empty((num_blocks, row), dtype=dtype, device=device)
    used = store[:, : block_size * layout.bytes_per_token]
    return used.view(num_blocks, block_size, 1, layout.bytes_per_token)


def alignment_reasons(name: str, cache: torch.Tensor, why: str, align: int = 16) -> list:
    """Why ``cache`` cannot be read with ``align``-byte vector loads (empty: it can). Kernels that
    gather whole tokens need the base address and the block stride aligned; every cache made by
    ``empty_cache`` or by FlashMLA is. A contract check would be too strict (the reference reads
    any layout-valid cache), so backends report this from their supports()."""
    reasons = []
    if cache.data_ptr() % align:
        reasons.append(f"{name} does not start at a {align}-byte aligned address ({why})")
    if cache.shape[0] > 1 and cache.stride(0) % align:
        reasons.append(f"{name}.stride(0) ({cache.stride(0)} bytes) is not a multiple of {align} "
                       f"({why})")
    return reasons
