"""``python -m torch_mla.build``: compile csrc/ into the native library ``libtorch_mla_native.so``.

The library has a plain C ABI (csrc/include/torch_mla_native.h) and links the static CUDA runtime
and no PyTorch, so it builds on a machine without a GPU and one binary serves every PyTorch
version. Each ``.cu`` file under csrc/ is one translation unit; they compile in parallel
(``--jobs``, default ``os.cpu_count()``), then link with ``nvcc -shared -cudart static``. Only the
``tmla_*`` C symbols are exported (a linker version script hides the static runtime's).

Where the library goes:
- default: ``$TORCH_MLA_NATIVE_DIR/<key>/libtorch_mla_native.so`` (``TORCH_MLA_NATIVE_DIR``
  defaults to ``~/.cache/torch_mla/native``), where ``<key>`` hashes the sources and the flags;
  torch_mla.native finds it there, and a source change builds a new one;
- ``--out DIR``: ``DIR/libtorch_mla_native.so`` (e.g. ``--out .native`` in the repository, a
  folder that ignores itself in git so it can be carried to another machine); point
  ``TORCH_MLA_NATIVE_LIB`` at the file to use it.

This module imports neither torch nor CUDA: it is safe anywhere, and the CPU tests use it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

LIB_NAME = "libtorch_mla_native.so"
ENV_DIR = "TORCH_MLA_NATIVE_DIR"  # cache root of hash-keyed builds
ENV_LIB = "TORCH_MLA_NATIVE_LIB"  # an explicit library file (read by torch_mla.native)
# Bump when this script changes how a library is produced (part of the cache key).
BUILD_SCRIPT_VERSION = 1
SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".hpp")
# Architectures with kernels; each gets its own "arch-specific" (a) cubin.
ARCHS = ("90a",)

Log = Callable[[str], None]


class BuildError(RuntimeError):
    pass


def _default_log(msg: str) -> None:
    print(f"[torch_mla.build] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# where things are
# ---------------------------------------------------------------------------------------------

def csrc_dir() -> Path:
    """The CUDA sources: torch_mla/csrc in an installed wheel, <repo>/csrc in a checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if (cand / "include" / "torch_mla_native.h").is_file():
            return cand
    raise BuildError(f"torch_mla CUDA sources not found (looked in {here / 'csrc'} and "
                     f"{here.parent / 'csrc'})")


def find_nvcc() -> Optional[str]:
    """nvcc from $CUDACXX, $CUDA_HOME / $CUDA_PATH, PATH, or /usr/local/cuda (None if absent)."""
    cands = [os.environ.get("CUDACXX")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(os.path.join(os.environ[var], "bin", "nvcc"))
    cands += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def cutlass_include() -> Path:
    """CUTLASS / CuTe headers of the ``nvidia-cutlass`` wheel (or ``$CUTLASS_PATH/include``)."""
    cands = []
    if os.environ.get("CUTLASS_PATH"):
        cands.append(Path(os.environ["CUTLASS_PATH"]) / "include")
    try:
        import cutlass_library  # the nvidia-cutlass wheel

        cands.append(Path(cutlass_library.__file__).resolve().parent / "source" / "include")
    except ImportError:
        pass
    for c in cands:
        if (c / "cute" / "tensor.hpp").is_file():
            return c
    raise BuildError("CUTLASS/CuTe headers not found: pip install nvidia-cutlass "
                     "(or set CUTLASS_PATH to a CUTLASS checkout)")


def cache_root() -> Path:
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torch_mla" / "native"


# ---------------------------------------------------------------------------------------------
# what gets built
# ---------------------------------------------------------------------------------------------

def gencode_flags() -> List[str]:
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]


def compile_flags() -> List[str]:
    """nvcc flags of every translation unit (include paths are added at build time; they do not
    change the result and are not part of the cache key)."""
    return [
        "-std=c++17", "-O3", "-DNDEBUG", *gencode_flags(),
        "--expt-relaxed-constexpr",
        "-lineinfo",  # source lines in profilers; no effect on the code
        "-Xcompiler=-fPIC", "-Xcompiler=-fvisibility=hidden",
        # No fast-math: the FP8 dequantization must match PyTorch bit for bit (no FTZ).
    ]


def link_flags() -> List[str]:
    return ["-shared", "-cudart", "static", *gencode_flags()]


def source_files(root: Optional[Path] = None) -> List[Path]:
    root = root or csrc_dir()
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES)


def translation_units(root: Optional[Path] = None) -> List[Path]:
    return [p for p in source_files(root) if p.suffix == ".cu"]


def source_key(root: Optional[Path] = None) -> str:
    """Hash of every source file (path and bytes), the flags and this script's version."""
    root = root or csrc_dir()
    h = hashlib.sha256()
    h.update(f"torch_mla-native-v{BUILD_SCRIPT_VERSION}\0".encode())
    h.update(json.dumps([compile_flags(), link_flags()]).encode())
    for p in source_files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:20]


def cached_library_path(root: Optional[Path] = None) -> Path:
    """Where the default build of the current sources lives (it may not exist yet)."""
    return cache_root() / source_key(root) / LIB_NAME


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown"


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock across processes (two first uses on one machine build once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        yield


def _run(cmd: List[str], what: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BuildError(f"{what} failed (exit {proc.returncode}):\n$ {' '.join(cmd)}\n"
                         f"{proc.stdout}{proc.stderr}")
    return time.perf_counter() - t0


def build(out_dir: Optional[os.PathLike] = None, *, jobs: Optional[int] = None,
          force: bool = False, log: Optional[Log] = _default_log,
          extra_flags: Optional[List[str]] = None) -> Path:
    """Compile and link the library; return its path. Without ``out_dir`` the library goes to
    the hash-keyed cache (and an existing build of the same sources is reused unless ``force``).
    ``extra_flags`` (e.g. ``["-Xptxas=-v"]``) are added to every compile and make a forced,
    uncached build only into ``out_dir``."""
    log = log or (lambda msg: None)
    root = csrc_dir()
    key = source_key(root)
    if out_dir is None:
        if extra_flags:
            raise BuildError("extra_flags need an explicit out_dir")
        target_dir = cache_root() / key
    else:
        target_dir = Path(out_dir).expanduser().resolve()
    target = target_dir / LIB_NAME

    target_dir.mkdir(parents=True, exist_ok=True)
    if out_dir is not None and not (target_dir / ".gitignore").exists():
        # a build folder inside a repository ignores itself (and its lock file)
        (target_dir / ".gitignore").write_text("*\n")
    with _file_lock(target_dir / ".lock"):
        if target.is_file() and not force and not extra_flags and _built_key(target_dir) == key:
            log(f"up to date: {target}")
            return target
        cached = cache_root() / key
        if (out_dir is not None and not force and not extra_flags and cached != target_dir
                and (cached / LIB_NAME).is_file() and _built_key(cached) == key):
            # the same sources and flags were built into the cache already: copy, don't compile
            shutil.copy2(cached / LIB_NAME, target_dir / f".{LIB_NAME}.tmp")
            os.replace(target_dir / f".{LIB_NAME}.tmp", target)
            shutil.copy2(cached / "build.json", target_dir / "build.json")
            log(f"copied the cached build {cached / LIB_NAME} to {target}")
            return target
        nvcc = find_nvcc()
        if nvcc is None:
            raise BuildError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
        include = cutlass_include()
        units = translation_units(root)
        jobs = max(1, min(jobs or os.cpu_count() or 1, len(units)))
        flags = compile_flags() + list(extra_flags or []) + [
            f"-I{root / 'include'}", f"-I{root}", f"-I{include}"]
        log(f"compiling {len(units)} CUDA translation units for {', '.join('sm_' + a for a in ARCHS)}"
            f" with {jobs} job(s) ({nvcc_version(nvcc)})")
        t_start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target_dir))
        try:
            objs: Dict[Path, Path] = {}
            for i, u in enumerate(units):
                objs[u] = tmp / f"{i:03d}_{u.stem}.o"
            done = 0

            def compile_one(u: Path):
                cmd = [nvcc, *flags, "-c", str(u), "-o", str(objs[u])]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    raise BuildError(f"compiling {u.relative_to(root)} failed "
                                     f"(exit {proc.returncode}):\n$ {' '.join(cmd)}\n"
                                     f"{proc.stdout}{proc.stderr}")
                return u, time.perf_counter() - t0, proc.stdout + proc.stderr

            with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
                futures = [pool.submit(compile_one, u) for u in units]
                for fut in concurrent.futures.as_completed(futures):
                    u, dt, text = fut.result()
                    done += 1
                    log(f"[{done}/{len(units)}] {u.relative_to(root)} ({dt:.1f} s)")
                    if text.strip() and extra_flags:
                        log(text.rstrip())
            script = tmp / "exports.map"
            script.write_text("{\n  global: tmla_*;\n  local: *;\n};\n")
            lib_tmp = tmp / LIB_NAME
            dt = _run([nvcc, *link_flags(), f"-Xlinker=--version-script={script}", "-o",
                       str(lib_tmp), *[str(objs[u]) for u in units]], "linking")
            log(f"linked {LIB_NAME} ({dt:.1f} s)")
            info = {
                "key": key,
                "nvcc": nvcc_version(nvcc),
                "cutlass_include": str(include),
                "archs": list(ARCHS),
                "compile_flags": compile_flags() + list(extra_flags or []),
                "link_flags": link_flags(),
                "units": [u.relative_to(root).as_posix() for u in units],
                "seconds": round(time.perf_counter() - t_start, 1),
                "jobs": jobs,
            }
            os.replace(lib_tmp, target)  # atomic: a reader sees the old file or the new one
            (target_dir / "build.json").write_text(json.dumps(info, indent=2) + "\n")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"built {target} in {time.perf_counter() - t_start:.1f} s")
    return target


def _built_key(target_dir: Path) -> Optional[str]:
    try:
        return json.loads((target_dir / "build.json").read_text()).get("key")
    except (OSError, ValueError):
        return None


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m torch_mla.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="build into this folder (default: the hash-keyed cache, "
                    f"${ENV_DIR} or ~/.cache/torch_mla/native)")
    ap.add_argument("-j", "--jobs", type=int, default=None,
                    help="parallel nvcc processes (default: os.cpu_count())")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    ap.add_argument("--verbose-ptxas", action="store_true",
                    help="print registers / spills / shared memory of every kernel (needs --out)")
    ap.add_argument("--print-path", action="store_true",
                    help="print where the default build of the current sources is and exit")
    args = ap.parse_args(argv)
    if args.print_path:
        print(cached_library_path())
        return 0
    extra = ["-Xptxas=-v"] if args.verbose_ptxas else None
    try:
        path = build(args.out, jobs=args.jobs, force=args.force, extra_flags=extra)
    except BuildError as e:
        print(f"torch_mla.build: {e}", file=sys.stderr)
        return 1
    print(path)
    if args.out is not None:
        print(f"use it with: export {ENV_LIB}={path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
