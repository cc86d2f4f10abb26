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
# tests from inside tests/: the repo root must not shadow the assembled package; the peer is on
# the path so that the FlashMLA cross-checks run
(cd "$repo/tests" && PYTHONPATH="$PYTHONPATH$peer" python3 -m pytest -q -p no:cacheprovider gpu "$@" 2>&1 \
  | tee "$out/gpu_tests.txt")
(cd /tmp && PYTHONPATH="$PYTHONPATH$peer" python3 -m torch_mla.bench --quick --out "$out/bench" 2>&1 | tee "$out/bench.txt")
