#!/usr/bin/env bash
# Everything a GPU session checks, in one device call (the GPU machine cannot pip-install the
# package: it has no network and no build backend for an editable install).
#
# On the CPU machine first:
#   python -m torch_mla.build --out .native          # the native library, carried, never built there
#   cp -r ../shared/peers .peers                      # FlashMLA, for the ratio column (optional)
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl expecttest==0.3.0
# Then, through the device tool, with carry [".native", ".peers", ".whl"]:
#   bash tests/gpu/run_on_device.sh
# Results land in $OUT: gpu_tests.txt (pytest), bench/results.{md,json,png}, bench.txt.
set -uo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-/tmp/torch_mla_out}
mkdir -p "$out" /tmp/torch_mla_site
rm -rf /tmp/torch_mla_site/torch_mla
cp -r "$repo/torch_mla" /tmp/torch_mla_site/
cp -r "$repo/meta" /tmp/torch_mla_site/torch_mla/meta
if ls "$repo"/.whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/torch_mla_whl "$repo"/.whl/*.whl
fi
export PYTHONPATH=/tmp/torch_mla_site:/tmp/torch_mla_whl
[ -f "$repo/.native/libtorch_mla_native.so" ] && export TORCH_MLA_NATIVE_LIB="$repo/.native/libtorch_mla_native.so"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
git -C "$repo" rev-parse HEAD 2>/dev/null | tee -a "$out/device.txt"
peer=""; [ -d "$repo/.peers/flashmla" ] && peer=":$repo/.peers/flashmla"
# Triton's compile cache: a carried .triton_cache saves the compile time of an earlier call;
# it goes back as $OUT/triton_cache.tgz: copy that to .cache/ and carry .cache next time
export TRITON_CACHE_DIR="$repo/.triton_cache"; mkdir -p "$TRITON_CACHE_DIR"
[ -f "$repo/.cache/triton_cache.tgz" ] && tar xzf "$repo/.cache/triton_cache.tgz" -C "$TRITON_CACHE_DIR"
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
if [[ " $steps " == *" bench "* ]]; then
  (cd /tmp && PYTHONPATH="$PYTHONPATH$peer" python3 -m torch_mla.bench --quick ${BENCH_ARGS:-} \
    --out "$out/bench" 2>&1 | tee "$out/bench.txt")
fi
tar czf "$out/triton_cache.tgz" -C "$TRITON_CACHE_DIR" . 2>/dev/null
