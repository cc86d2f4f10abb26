# Sourced by run_on_device.sh, or by hand on the GPU machine before any other command there:
#   source tests/gpu/device_env.sh && python3 tools/diag_sparse_prefill.py
# assembles the package on PYTHONPATH (the GPU machine cannot pip-install it: no network, no
# build backend for an editable install), points at the carried native library, Triton cache and
# FlashMLA peer ($peer: append it to PYTHONPATH where the peer is wanted), records the device.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
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
