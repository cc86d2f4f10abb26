#!/usr/bin/env bash
# Everything a GPU session checks, in one device call (the GPU machine cannot pip-install the
# package: it has no network and no build backend for an editable install).
#
# On the CPU machine first:
#   python -m torch_mla.build --out .native          # the native library, carried, never built there
#   cp -r ../shared/peers .peers                      # FlashMLA, for the ratio column (optional)
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl expecttest==0.3.0
#   a Triton cache from an earlier call ($OUT/triton_cache.tgz) copied to .cache/ (optional)
# Then, through the device tool, with carry [".native", ".peers", ".whl", ".cache"]:
#   bash tests/gpu/run_on_device.sh
# The device copies the working tree as it is, helpers' uncommitted edits included, and its .git
# does not know this session's commits (a `git stash` there stashed committed files): to run
# exactly a commit, `git archive -o .cache/tree.tar HEAD` here and start the command with
# `tar xf .cache/tree.tar;`.
# Results land in $OUT: gpu_tests.txt (pytest), sanitize.txt, bench/results.{md,json,png},
# bench.txt, triton_cache.tgz. STEPS picks the parts (default "tests bench"; "sanitize" runs
# compute-sanitizer memcheck and racecheck over the native sparse_decode kernels, serial
# and wgmma); GPU_TEST_FILES picks test files.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
steps=${STEPS:-tests bench}
if [[ " $steps " == *" tests "* ]]; then
  # one process per file: a kernel fault leaves a sticky CUDA error that would fail every later
  # test of the same process. Run from inside tests/: the repo root must not shadow the
  # assembled package; the peer is on the path so that the FlashMLA cross-checks run.
  : > "$out/gpu_tests.txt"
  for f in ${GPU_TEST_FILES:-$(cd "$repo/tests" && ls gpu/test_*.py)}; do
    echo "=== $f" | tee -a "$out/gpu_tests.txt"
    (cd "$repo/tests" && PYTHONPATH="$PYTHONPATH$peer" timeout ${FILE_TIMEOUT:-300} \
      python3 -m pytest -q -p no:cacheprovider -rfE --tb=short "$f" "$@" 2>&1 \
      | tee -a "$out/gpu_tests.txt")
  done
fi
if [[ " $steps " == *" sanitize "* ]]; then
  : > "$out/sanitize.txt"
  for wgmma in 0 1; do
    for tool in memcheck racecheck; do
      echo "=== $tool, TORCH_MLA_NATIVE_DECODE_WGMMA=$wgmma" | tee -a "$out/sanitize.txt"
      (cd "$repo/tests" && TORCH_MLA_NATIVE_DECODE_WGMMA=$wgmma timeout ${FILE_TIMEOUT:-300} \
        compute-sanitizer --tool $tool --kernel-name kns=decode python3 gpu/sanitize_native.py \
        2>&1 | tail -5 | tee -a "$out/sanitize.txt")
    done
  done
fi
if [[ " $steps " == *" bench "* ]]; then
  (cd /tmp && PYTHONPATH="$PYTHONPATH$peer" python3 -m torch_mla.bench --quick ${BENCH_ARGS:-} \
    --out "$out/bench" 2>&1 | tee "$out/bench.txt")
fi
tar czf "$out/triton_cache.tgz" -C "$TRITON_CACHE_DIR" . 2>/dev/null
