"""Triton FP8 KV-cache kernels on a CUDA device against the reference on the same device, byte for
byte over the caches' whole storage: production sizes, block sizes 2/61/64/576, padded stride(0),
uint8 caches, both duplicate-resolution paths of write_kv_cache under real concurrency (repeated:
a race between duplicate writers would show as a varying winner), no host sync, CUDA-graph capture.
Skipped without CUDA.
"""

import pytest
import torch

import torch_mla
from torch_mla.meta.layouts import MODEL1, V32
from torch_mla.reference import kv_cache as ref_kv

from oracles import bit_mismatches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LAYOUTS = {"v32": V32, "model1": MODEL1}
DEV = "cuda"


def _storage(t):
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def _kv(n, lay, seed, dtype=torch.bfloat16):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(n, lay.d, generator=g, device=DEV, dtype=torch.float32)
    mags = torch.randint(-30, 31, (n, lay.num_tiles), generator=g, device=DEV).float().exp2()
    x[:, : lay.d_nope] *= mags.repeat_interleave(lay.tile, dim=1)
    if n > 3:
        x[0, : lay.tile] = 0
        x[1, : lay.tile] = 448 * 2.0 ** -9  # amax / 448 exactly a power of two
        x[2] *= 1e-30
    return x.to(dtype)


def _store(lay, nb, bs, extra, seed, dtype=torch.float8_e4m3fn):
    g = torch.Generator(device=DEV).manual_seed(seed)
    stride0 = lay.block_bytes(bs) + extra
    flat = torch.randint(0, 256, (nb * stride0 + 3,), dtype=torch.uint8, generator=g, device=DEV)
    cache = flat[: nb * stride0].view(nb, stride0)[:, : bs * lay.bytes_per_token]
    cache = cache.view(nb, bs, 1, lay.bytes_per_token)
    return flat, (cache if dtype == torch.uint8 else cache.view(dtype))


def _twin(flat, cache):
    """A copy of the store and the same cache view into it."""
    f2 = flat.clone()
    c2 = torch.empty(0, dtype=torch.uint8, device=DEV).set_(
        f2.untyped_storage(), cache.storage_offset(), cache.shape, cache.stride())
    return f2, c2.view(cache.dtype)


def _triton(fn, *args):
    with torch_mla.use_backend("triton"):
        return fn(*args)


@pytest.fixture(params=["int", "hw"])
def e4m3_path(request, monkeypatch):
    """The integer f32 -> e4m3 conversion (default) and the hardware one (SM89+)."""
    from torch_mla.triton import kv_cache as tri_kv

    if request.param == "hw":
        if torch.cuda.get_device_capability() < (8, 9):
            pytest.skip("the hardware e4m3 conversion needs SM89+")
        monkeypatch.setattr(tri_kv, "USE_HW_E4M3", True)
    return request.param


@pytest.mark.parametrize("layout", ["v32", "model1"])
@pytest.mark.parametrize("nb,bs", [(4096, 64), (256, 256), (7, 2), (5, 61), (3, 576)])
def test_quantize_bytes(layout, nb, bs, e4m3_path):
    lay = LAYOUTS[layout]
    kv = _kv(nb * bs, lay, nb + bs).view(nb, bs, 1, lay.d)
    got = _triton(torch_mla.quantize_kv_cache, kv, layout)
    with torch_mla.use_backend("reference"):
        want = torch_mla.quantize_kv_cache(kv, layout)
    assert got.stride() == want.stride()
    assert torch.equal(_storage(got), _storage(want))
    # float32 rows quantize as their bf16 cast
    got32 = _triton(torch_mla.quantize_kv_cache, kv[:2].float(), layout)
    assert torch.equal(_storage(got32), _storage(ref_kv.quantize_kv_cache(kv[:2], layout)))


@pytest.mark.parametrize("layout", ["v32", "model1"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.uint8])
def test_dequantize_random_bytes(layout, dtype):
    lay = LAYOUTS[layout]
    flat, cache = _store(lay, 300, 61, 576 + 3, 1, dtype)
    before = flat.clone()
    got = _triton(torch_mla.dequantize_kv_cache, cache, layout)
    want = ref_kv.dequantize_kv_cache(cache, layout)
    # the reference on the CPU is the oracle; the CUDA reference must agree with it too
    want_cpu = ref_kv.dequantize_kv_cache(cache.cpu(), layout).to(DEV)
    gn, wn = torch.isnan(got.float()), torch.isnan(want.float())
    assert torch.equal(torch.isnan(want_cpu.float()), wn), "reference: CUDA vs CPU NaN pattern"
    assert torch.equal(want[~wn].view(torch.int16), want_cpu[~wn].view(torch.int16)), (
        "reference: CUDA vs CPU\n" + bit_mismatches(want[~wn], want_cpu[~wn]))
    assert torch.equal(gn, wn), f"NaN pattern: {(gn != wn).sum().item()} elements differ"
    assert torch.equal(got.view(torch.int16)[~gn], want.view(torch.int16)[~wn]), (
        bit_mismatches(got[~gn], want[~wn]))
    assert torch.equal(flat, before)


@pytest.mark.parametrize("layout", ["v32", "model1"])
@pytest.mark.parametrize("n,num_slots_mult", [(128, 4), (1000, 1), (16384, 2), (40000, 1)])
def test_write_against_reference_repeated(layout, n, num_slots_mult, e4m3_path):
    """n <= 1024 takes the in-kernel scan, larger n the device sort; many duplicates (n rows
    over n * mult / 2 slots, plus skipped and out-of-range ones), run several times."""
    lay = LAYOUTS[layout]
    bs = 64 if lay is V32 else 256
    nb = max(2, n * num_slots_mult // (2 * bs))
    g = torch.Generator(device=DEV).manual_seed(n)
    slots = torch.randint(-2, nb * bs + 5, (n,), generator=g, device=DEV)
    kv = _kv(n, lay, n + 1)
    flat, cache = _store(lay, nb, bs, 17, 2)
    for _ in range(5):
        f_ref, c_ref = _twin(flat, cache)
        f_tri, c_tri = _twin(flat, cache)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _triton(torch_mla.write_kv_cache, c_tri, kv, slots, layout)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        ref_kv.write_kv_cache(c_ref, kv, slots, layout)
        bad = (f_tri != f_ref).nonzero().flatten()
        assert bad.numel() == 0, f"{bad.numel()} bytes differ, first at {bad[:8].tolist()}"


@pytest.mark.parametrize("layout", ["v32", "model1"])
@pytest.mark.parametrize("bs", [2, 61, 64, 576])
def test_write_block_sizes_uint8_padded(layout, bs):
    lay = LAYOUTS[layout]
    nb = 9
    n_slots = nb * bs
    slots = torch.tensor([0, -1, n_slots - 1, n_slots, 5 % n_slots, -9, 5 % n_slots, 1,
                          n_slots + 1000, 0], device=DEV)
    kv = _kv(len(slots), lay, bs)
    for dtype, extra in ((torch.uint8, 17), (torch.float8_e4m3fn, 0)):
        flat, cache = _store(lay, nb, bs, extra, bs, dtype)
        f_ref, c_ref = _twin(flat, cache)
        _triton(torch_mla.write_kv_cache, cache, kv, slots, layout)
        ref_kv.write_kv_cache(c_ref, kv, slots, layout)
        assert torch.equal(flat, f_ref)


@pytest.mark.parametrize("layout", ["v32", "model1"])
def test_write_captures_in_cuda_graph(layout):
    lay = LAYOUTS[layout]
    nb, bs, n = 64, 64, 96
    flat, cache = _store(lay, nb, bs, 0, 5)
    kv = _kv(n, lay, 6)
    slots = torch.zeros(n, dtype=torch.int64, device=DEV)
    with torch_mla.use_backend("triton"):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            torch_mla.write_kv_cache(cache, kv, slots, layout)  # warm-up (compiles)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            torch_mla.write_kv_cache(cache, kv, slots, layout)
    for seed in range(3):
        g = torch.Generator(device=DEV).manual_seed(seed)
        slots.copy_(torch.randint(-1, nb * bs, (n,), generator=g, device=DEV))
        kv.copy_(_kv(n, lay, 100 + seed))
        f_ref, c_ref = _twin(flat, cache)
        graph.replay()
        ref_kv.write_kv_cache(c_ref, kv, slots, layout)
        torch.cuda.synchronize()
        assert torch.equal(flat, f_ref)


def test_quantize_inf_nan_same_as_reference_up_to_nan_sign(e4m3_path):
    for layout, lay in LAYOUTS.items():
        kv = _kv(6, lay, 9)
        kv[0, 3] = float("nan")
        kv[1, 5] = float("inf")
        kv[2, lay.tile + 1] = -float("inf")
        kv = kv.view(2, 3, 1, lay.d)
        got = _storage(_triton(torch_mla.quantize_kv_cache, kv, layout))
        want = _storage(ref_kv.quantize_kv_cache(kv, layout))
        bad = (got != want).nonzero().flatten()
        # NaN signs/payloads may differ (V32 NaN scale: 0x7FC00000 here, CUDA's canonical NaN
        # in the reference): only NaN top bytes / NaN scale mantissa bytes may differ
        if lay is V32:
            sc_got = got.view(2, -1)[0, 512:516].view(torch.float32)
            sc_want = want.view(2, -1)[0, 512:516].view(torch.float32)
            assert torch.isnan(sc_got).all() and torch.isnan(sc_want).all()
            scale_bytes = set(range(512, 516))
            bad = torch.tensor([b for b in bad.tolist() if b not in scale_bytes], dtype=torch.long)
        if bad.numel():
            top = lambda b: (b == 0x7F) | (b == 0xFF)  # noqa: E731
            assert bool((top(got[bad.to(DEV)]) & top(want[bad.to(DEV)])).all())
