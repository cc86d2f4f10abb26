"""The native library (csrc/) on a machine without a GPU: it builds with nvcc, exports exactly the
C ABI, loads through ctypes without a CUDA driver, reports errors instead of crashing, its
kernels use tensor-core MMA (mma.sync and wgmma) without spilling, the wgmma kernel's producer
writes the swizzled layout its wgmma reads, and the native backend explains why it does not
apply to CPU tensors. Skipped (with the reason) where nvcc is missing; CI has nvcc 13.0.

The build goes to the shared hash-keyed cache (torch_mla.build), so it compiles once per source
change on a machine (about 15 s on 2 cores) and later sessions reuse it.
"""

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import torch_mla
from torch_mla import build
from torch_mla.native import _lib
from torch_mla.native import sparse_decode as nsd

NVCC = build.find_nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found: the native library cannot be built here (CI has nvcc 13.0)")


@pytest.fixture(scope="module")
def lib_path():
    if NVCC is None:
        pytest.skip("nvcc not found: the native library cannot be built here")
    return build.build(log=None)


def _cuda_tool(name):
    """A CUDA binary tool from PATH, next to nvcc, or the nvidia-cuda-* pip wheels."""
    cands = [shutil.which(name)]
    if NVCC:
        cands.append(os.path.join(os.path.dirname(os.path.realpath(NVCC)), name))
    try:
        import nvidia

        for p in nvidia.__path__:
            cands += [str(x) for x in Path(p).glob(f"cu*/bin/{name}")]
    except ImportError:
        pass
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


# ---------------------------------------------------------------------------------------------
# the build and the binary
# ---------------------------------------------------------------------------------------------

def test_cache_key_follows_sources(tmp_path, monkeypatch):
    key = build.source_key()
    assert re.fullmatch(r"[0-9a-f]{20}", key) and build.source_key() == key
    monkeypatch.setenv(build.ENV_DIR, str(tmp_path))
    assert build.cached_library_path() == tmp_path / key / build.LIB_NAME
    # a copy of the sources with one byte changed gets another key
    src = tmp_path / "csrc"
    shutil.copytree(build.csrc_dir(), src)
    assert build.source_key(src) == key
    f = src / "common" / "utils.cuh"
    f.write_text(f.read_text() + "\n")
    assert build.source_key(src) != key
    # one translation unit per kernel instantiation, compiled in parallel
    units = [u.relative_to(build.csrc_dir()).as_posix() for u in build.translation_units()]
    assert "sm90/sparse_decode/instantiations/v32.cu" in units
    assert "sm90/sparse_decode/instantiations/model1.cu" in units


@needs_nvcc
def test_exports_only_the_c_abi(lib_path):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("binutils nm not found")
    out = subprocess.run([nm, "-D", "--defined-only", str(lib_path)], capture_output=True,
                         text=True, check=True).stdout
    names = sorted(line.split()[-1] for line in out.splitlines() if line.strip())
    assert names == ["tmla_abi_version", "tmla_build_info", "tmla_sparse_decode",
                     "tmla_sparse_decode_workspace_bytes"], names
    # the CUDA runtime is linked statically: no libcudart / libtorch dependency
    needed = subprocess.run(["readelf", "-d", str(lib_path)], capture_output=True, text=True,
                            check=False).stdout if shutil.which("readelf") else ""
    assert "libcudart" not in needed and "libtorch" not in needed and "libc10" not in needed


@needs_nvcc
def test_loads_without_a_driver_and_reports_errors(lib_path):
    lib = _lib.NativeLibrary(str(lib_path))  # dlopen: libcuda is only loaded on first CUDA call
    assert lib.cdll.tmla_abi_version() == _lib.ABI_VERSION
    assert "sm_90a" in lib.build_info and "cutlass" in lib.build_info
    # the workspace formula is the same on both sides
    for args in [(64, 2, 128, 33), (1, 1, 64, 132), (7, 3, 16, 5), (0, 1, 1, 1)]:
        for has in (0, 1):
            assert lib.sparse_decode_workspace_bytes(*args, has) == nsd.workspace_bytes(*args, bool(has))

    err = _lib.err_buffer()
    fields = [_lib.ABI_VERSION, nsd._STRUCT_BYTES, 2, 1, 64, 576, 512, 64, 0, 0.1,
              4096, 576 * 64, 576 * 64, 576,  # q
              4096, 4, 64, 656 * 64,  # k_cache
              4096, 64, 64, 0,  # indices, topk_length
              0, 0, 0, 0, 0, 0, 0, 0,  # no extra
              0, 0, 0, 4,  # no sink, no schedule, 4 parts
              4096, 4096, 4096, 1 << 30]  # out, lse, workspace
    # wrong ABI version / struct size: refused before anything touches CUDA
    rc = lib.sparse_decode(nsd._FMT.pack(99, *fields[1:]), None, err, len(err))
    assert rc == 1 and b"ABI mismatch" in err.value
    rc = lib.sparse_decode(nsd._FMT.pack(fields[0], 8, *fields[2:]), None, err, len(err))
    assert rc == 1 and b"ABI mismatch" in err.value
    # invalid arguments name the problem
    bad = list(fields)
    bad[5] = 320  # d_qk
    assert lib.sparse_decode(nsd._FMT.pack(*bad), None, err, len(err)) == 1
    assert b"d_qk" in err.value
    bad = list(fields)
    bad[6] = 513  # d_v
    assert lib.sparse_decode(nsd._FMT.pack(*bad), None, err, len(err)) == 2 and b"d_v" in err.value
    bad = list(fields)
    bad[-1] = 100  # workspace too small
    assert lib.sparse_decode(nsd._FMT.pack(*bad), None, err, len(err)) == 1
    assert b"workspace" in err.value
    if not torch.cuda.is_available():
        # valid arguments: the first CUDA call fails cleanly without a driver
        rc = lib.sparse_decode(nsd._FMT.pack(*fields), None, err, len(err))
        assert rc == 3 and b"CUDA error" in err.value, err.value


@needs_nvcc
def test_kernels_use_tensor_cores_without_spills(lib_path):
    cuobjdump = _cuda_tool("cuobjdump")
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    res = subprocess.run([cuobjdump, "--dump-resource-usage", str(lib_path)], capture_output=True,
                         text=True, check=True).stdout
    funcs = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", res)
    names = " ".join(f[0] for f in funcs)
    assert "sparse_decode_kernel" in names and "decode_combine" in names, res
    for name, reg, stack, local in funcs:
        assert int(stack) == 0 and int(local) == 0, f"{name} uses local memory: {res}"
        assert int(reg) <= 255, (name, reg)
    nvdisasm = _cuda_tool("nvdisasm")
    if nvdisasm is None:
        pytest.skip("nvdisasm not found: SASS not checked")
    env = dict(os.environ, PATH=os.path.dirname(nvdisasm) + os.pathsep + os.environ.get("PATH", ""))
    sass = subprocess.run([cuobjdump, "--dump-sass", str(lib_path)], capture_output=True,
                          text=True, check=True, env=env).stdout
    assert "HMMA.16816.F32.BF16" in sass  # mma.sync m16n8k16 bf16 -> f32
    assert "LDSM.16.MT88.4" in sass and "LDSM.16.M88.4" in sass  # ldmatrix (.trans for V)
    assert "LDGSTS" in sass  # cp.async gather
    assert "F2FP.F16.E4M3.UNPACK" in sass  # hardware e4m3 -> f16
    assert not re.search(r"\b(LDL|STL)\b", sass)  # no local memory
    # the default warp-specialized kernel: wgmma for QK^T (one warpgroup, 64x64x16) and PV
    # (64x256x16, V read transposed), register hand-over between the warpgroups, mbarrier
    # pipeline
    assert "sparse_decode_wgmma_kernel" in names
    assert "HGMMA.64x64x16.F32.BF16" in sass
    assert re.search(r"HGMMA\.64x256x16\.F32\.BF16 .*tnspB", sass)
    assert "USETMAXREG.DEALLOC" in sass and "USETMAXREG.TRY_ALLOC" in sass
    assert "SYNCS.PHASECHK.TRANS64.TRYWAIT" in sass and "SYNCS.ARRIVE.TRANS64" in sass
    # its crossover (clusters of two CTAs): bulk copies into the peer's shared memory, remote
    # mbarrier arrivals, cluster barriers; RoPE copies tracked by the stage's mbarrier
    assert "UBLKCP.S.S" in sass and "SYNCS.ARRIVE.TRANS64.RED" in sass
    assert "UCGABAR_ARV" in sass and "UCGABAR_WAIT" in sass
    assert "ARRIVES.LDGSTSBAR.64" in sass


_LAYOUT_CHECK = r"""
#include <cstdio>
#include "sm90/sparse_decode/kernel_wgmma.cuh"
using namespace tmla::sm90::sparse_decode_wgmma;
template <int LAYOUT> int check() {
  using P = Plan<LAYOUT>;
  constexpr int D = P::kD;
  alignas(1024) static cbf16 buf[64 * D];
  auto k = cute::make_tensor(cute::make_smem_ptr(buf), typename P::LayoutQK{});
  auto vt = cute::make_tensor(cute::make_smem_ptr(buf), typename P::LayoutVt{});
  int bad = 0;
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < D; ++c) {
      const long off = reinterpret_cast<char*>(&k(r, c)) - reinterpret_cast<char*>(buf);
      bad += off != sw128(r, c);                     // the producer's stores = wgmma's layout
      bad += c < 512 && &vt(c, r) != &k(r, c);       // V^T view = the same element
    }
  return bad;
}
int main() {
  const int bad = check<TMLA_LAYOUT_V32>() + check<TMLA_LAYOUT_MODEL1>();
  std::printf("mismatches %d\n", bad);
  return bad != 0;
}
"""


@needs_nvcc
def test_producer_swizzle_matches_the_wgmma_layout(tmp_path):
    # the wgmma kernel's producer writes K rows with the hand-written sw128() map, while wgmma
    # reads them through CuTe's 128-byte-swizzle layout (and V through a transposed view of the
    # same stage): compiled and checked on the host, every element of both layouts
    src = tmp_path / "layout_check.cu"
    src.write_text(_LAYOUT_CHECK)
    exe = tmp_path / "layout_check"
    csrc = build.csrc_dir()
    subprocess.run([NVCC, "-std=c++17", "--expt-relaxed-constexpr", f"-I{csrc / 'include'}",
                    f"-I{csrc}", f"-I{build.cutlass_include()}", "-o", str(exe), str(src)],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    assert out.returncode == 0 and "mismatches 0" in out.stdout, out.stdout + out.stderr


@needs_nvcc
def test_out_dir_build_ignores_itself(lib_path, tmp_path):
    out = tmp_path / "native_out"
    path = build.build(out, log=None)  # same sources: copied from the cache, not recompiled
    assert path == out / build.LIB_NAME and path.read_bytes() == Path(lib_path).read_bytes()
    assert (out / ".gitignore").read_text().strip() == "*"
    assert build.build(out, log=None) == path  # up to date


# ---------------------------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------------------------

def _decode_args(dtype=torch.bfloat16):
    q = torch.randn(2, 1, 64, 576, dtype=dtype)
    kv = torch.randn(4, 16, 1, 576).to(torch.bfloat16)
    cache = torch_mla.quantize_kv_cache(kv, "v32")
    idx = torch.randint(0, 64, (2, 1, 32), dtype=torch.int32)
    return q, cache, idx


def test_supports_says_why_not_on_cpu():
    from torch_mla import _dispatch

    q, cache, idx = _decode_args()
    backend = _dispatch._BACKENDS["native"]
    reasons = backend.reasons("sparse_decode", (q, cache, idx))
    assert reasons and "CUDA" in reasons[0] and "cpu" in reasons[0], reasons
    assert backend.reasons("dense_prefill", (q,)) == ["native has no kernel for dense_prefill"]
    # the kernel's own limits are explained too
    from torch_mla.native.sparse_decode import supports

    r = supports(*_decode_args(torch.float16))
    assert any("bf16" in x for x in r), r
    r = supports(q, cache, idx, d_v=576)
    assert any("d_v=576" in x for x in r), r
    # forcing the native backend on CPU tensors raises with that reason
    with torch_mla.use_backend("native"):
        with pytest.raises(RuntimeError, match="native kernels run on CUDA devices"):
            torch_mla.sparse_decode(q, cache, idx)


def test_import_loads_nothing():
    code = ("import torch_mla, sys; from torch_mla.native import _lib; "
            "assert not _lib._tried and 'torch_mla.build' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_library_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv(build.ENV_LIB, str(tmp_path / "nope.so"))
    _lib.reset()
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert _lib.get() is None and _lib.get() is None
        assert len([x for x in w if "native CUDA kernels unavailable" in str(x.message)]) == 1
        assert "nope.so" in _lib.reason() and _lib.NOT_BUILT in _lib.reason()
    finally:
        _lib.reset()


@needs_nvcc
def test_explicit_library_path_loads(lib_path, monkeypatch):
    monkeypatch.setenv(build.ENV_LIB, str(lib_path))
    _lib.reset()
    try:
        lib = _lib.get()
        assert lib is not None and lib.path == str(lib_path)
    finally:
        _lib.reset()


def test_not_gpu_verified_is_chosen_only_when_forced(monkeypatch):
    """Until its GPU suite has passed, the native kernel runs on a GPU only when forced, and an
    unforced call neither loads nor builds the library."""
    import torch_mla.native as native

    monkeypatch.setattr(native, "device_reasons", lambda args: [])
    monkeypatch.setitem(native.SUPPORTS, "sparse_decode", lambda *a: [])
    monkeypatch.setattr(native, "GPU_VERIFIED", frozenset())
    loads = []
    monkeypatch.setattr(native._lib, "get", lambda: loads.append(1) or object())
    reasons = native._supports("sparse_decode", ())
    assert "has not passed its GPU tests" in " ".join(reasons) and not loads
    with torch_mla.use_backend("native"):
        assert native._supports("sparse_decode", ()) == [] and loads == [1]
    monkeypatch.setattr(native, "GPU_VERIFIED", frozenset({"sparse_decode"}))
    assert native._supports("sparse_decode", ()) == []
