// The exported C entry points (csrc/include/torch_mla_native.h): argument validation, the
// choice of kernel by device architecture and cache layout, and the launch sequence
// [schedule] -> main kernel -> combine on the caller's stream.
#include <atomic>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <cuda_runtime.h>
#include <cutlass/version.h>

#include "common/sparse_decode.h"
#include "torch_mla_native.h"

#define TMLA_STR2(x) #x
#define TMLA_STR(x) TMLA_STR2(x)

namespace {

int fail(int code, char* err, int64_t err_len, const char* fmt, ...) {
  if (err != nullptr && err_len > 0) {
    va_list args;
    va_start(args, fmt);
    std::vsnprintf(err, static_cast<size_t>(err_len), fmt, args);
    va_end(args);
  }
  return code;
}

int cuda_fail(cudaError_t e, const char* what, char* err, int64_t err_len) {
  return fail(TMLA_ERR_CUDA, err, err_len, "torch_mla native: CUDA error in %s: %s (%s)", what,
              cudaGetErrorString(e), cudaGetErrorName(e));
}

// Compute capability of the current device as 10 * major + minor, cached per device.
cudaError_t device_arch(int* arch) {
  static std::atomic<int> cache[64];  // 0 = unknown
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  if (dev >= 0 && dev < 64) {
    const int c = cache[dev].load(std::memory_order_relaxed);
    if (c != 0) {
      *arch = c;
      return cudaSuccess;
    }
  }
  int major = 0, minor = 0;
  e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  if (e != cudaSuccess) return e;
  *arch = 10 * major + minor;
  if (dev >= 0 && dev < 64) cache[dev].store(*arch, std::memory_order_relaxed);
  return cudaSuccess;
}

// torch_mla/native packs the struct as 38 little-endian 8-byte fields; keep them in step.
static_assert(sizeof(void*) == 8, "the ABI assumes 64-bit pointers");
static_assert(sizeof(tmla_sparse_decode_params) == 38 * 8, "tmla_sparse_decode_params changed: "
              "bump TMLA_ABI_VERSION and update torch_mla/native/sparse_decode.py");

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
bool fits_int(int64_t v) { return v >= 0 && v <= INT32_MAX; }

}  // namespace

extern "C" {

TMLA_API int64_t tmla_abi_version(void) { return TMLA_ABI_VERSION; }

TMLA_API const char* tmla_build_info(void) {
  return "torch_mla native abi " TMLA_STR(TMLA_ABI_VERSION) "; nvcc " TMLA_STR(
      __CUDACC_VER_MAJOR__) "." TMLA_STR(__CUDACC_VER_MINOR__) "." TMLA_STR(__CUDACC_VER_BUILD__)
      "; cutlass " TMLA_STR(CUTLASS_MAJOR) "." TMLA_STR(CUTLASS_MINOR) "." TMLA_STR(CUTLASS_PATCH)
      "; kernels sm_90a (sparse_decode v32, model1)";
}

TMLA_API int64_t tmla_sparse_decode_workspace_bytes(int64_t b, int64_t s_q, int64_t h_q,
                                                    int64_t num_parts, int64_t has_schedule) {
  using tmla::DecodeWorkspace;
  const int64_t n_ws = b + num_parts;
  int64_t bytes = DecodeWorkspace::o_bytes(n_ws, s_q, h_q) + DecodeWorkspace::lse_bytes(n_ws, s_q, h_q);
  if (!has_schedule) bytes += DecodeWorkspace::sched_bytes(b, num_parts);
  return bytes;
}

TMLA_API int tmla_sparse_decode(const tmla_sparse_decode_params* p, void* stream_ptr, char* err,
                                int64_t err_len) {
  if (err != nullptr && err_len > 0) err[0] = '\0';
  if (p == nullptr) return fail(TMLA_ERR_INVALID_ARGUMENT, err, err_len, "params is NULL");
  if (p->abi_version != TMLA_ABI_VERSION ||
      p->struct_bytes != static_cast<int64_t>(sizeof(tmla_sparse_decode_params))) {
    return fail(TMLA_ERR_INVALID_ARGUMENT, err, err_len,
                "ABI mismatch: caller abi %lld / %lld bytes, library abi %d / %zu bytes",
                static_cast<long long>(p->abi_version), static_cast<long long>(p->struct_bytes),
                TMLA_ABI_VERSION, sizeof(tmla_sparse_decode_params));
  }
  const int layout = p->d_qk == 576 ? TMLA_LAYOUT_V32 : p->d_qk == 512 ? TMLA_LAYOUT_MODEL1 : -1;
  if (layout < 0) {
    return fail(TMLA_ERR_INVALID_ARGUMENT, err, err_len, "d_qk must be 576 (V32) or 512 (MODEL1), got %lld",
                static_cast<long long>(p->d_qk));
  }
  if (p->d_v < 1 || p->d_v > tmla::kDecodeDvMax) {
    return fail(TMLA_ERR_UNSUPPORTED, err, err_len, "d_v must be in [1, 512], got %lld",
                static_cast<long long>(p->d_v));
  }
  if (!fits_int(p->b) || !fits_int(p->s_q) || !fits_int(p->h_q) || !fits_int(p->topk) ||
      !fits_int(p->extra_topk) || !fits_int(p->num_parts) || p->num_parts < 1 ||
      p->b * p->s_q > INT32_MAX || p->b + p->num_parts > INT32_MAX) {
    return fail(TMLA_ERR_INVALID_ARGUMENT, err, err_len,
                "sizes out of range (b %lld, s_q %lld, h_q %lld, topk %lld, extra_topk %lld, "
                "num_parts %lld)",
                static_cast<long long>(p->b), static_cast<long long>(p->s_q),
                static_cast<long long>(p->h_q), static_cast<long long>(p->topk),
                static_cast<long long>(p->extra_topk), static_cast<long long>(p->num_parts));
  }
  if (p->b == 0 || p->s_q == 0 || p->h_q == 0) return TMLA_OK;  // nothing to write
  if (p->s_q > 65535 || p->h_q > 65535 || p->num_parts > 65535) {
    return fail(TMLA_ERR_UNSUPPORTED, err, err_len,
                "s_q, h_q and num_parts must be <= 65535 (grid limits), got %lld, %lld, %lld",
                static_cast<long long>(p->s_q), static_cast<long long>(p->h_q),
                static_cast<long long>(p->num_parts));
  }
  if (p->q == nullptr || p->k_cache == nullptr || p->indices == nullptr || p->out == nullptr ||
      p->lse == nullptr || p->workspace == nullptr) {
    return fail(TMLA_ERR_INVALID_ARGUMENT, err, err_len,
                "q, k_cache, indices, out, lse and workspace must be device pointers");
  }
  if ((p->extra_k_cache == nullptr) != (p->extra_indices == nullptr)) {
    return fail(TMLA_ERR_INVALID_ARGUMENT, err, err_len,
                "extra_k_cache and extra_indices must be given together");
  }
  if ((p->schedule_metadata == nullptr) != (p->num_splits == nullptr)) {
    return fail(TMLA_ERR_INVALID_ARGUMENT, err, err_len,
                "schedule_metadata and num_splits must be given together");
  }
  // 16-byte vector loads: q rows, cache blocks and token rows (656 and 576 bytes are multiples
  // of 16).
  if (!aligned16(p->q) || (p->q_stride_b | p->q_stride_s | p->q_stride_h) % 8 != 0) {
    return fail(TMLA_ERR_UNSUPPORTED, err, err_len,
                "q must be 16-byte aligned with strides that are multiples of 8 elements");
  }
  if (!aligned16(p->k_cache) || (p->k_num_blocks > 1 && p->k_stride_block % 16 != 0) ||
      (p->extra_k_cache != nullptr &&
       (!aligned16(p->extra_k_cache) || (p->extra_num_blocks > 1 && p->extra_stride_block % 16 != 0)))) {
    return fail(TMLA_ERR_UNSUPPORTED, err, err_len,
                "caches must be 16-byte aligned with a block stride that is a multiple of 16 bytes");
  }
  if (p->k_block_size < 1 || (p->extra_k_cache != nullptr && p->extra_block_size < 1) ||
      !fits_int(p->k_block_size) || !fits_int(p->extra_block_size)) {
    return fail(TMLA_ERR_INVALID_ARGUMENT, err, err_len, "block sizes must be in [1, 2^31)");
  }
  const bool has_sched = p->schedule_metadata != nullptr;
  const int64_t need =
      tmla_sparse_decode_workspace_bytes(p->b, p->s_q, p->h_q, p->num_parts, has_sched ? 1 : 0);
  if (p->workspace_bytes < need || (reinterpret_cast<uintptr_t>(p->workspace) & 255u) != 0) {
    return fail(TMLA_ERR_INVALID_ARGUMENT, err, err_len,
                "workspace must be 256-byte aligned and hold %lld bytes, got %lld",
                static_cast<long long>(need), static_cast<long long>(p->workspace_bytes));
  }

  int arch = 0;
  cudaError_t e = device_arch(&arch);
  if (e != cudaSuccess) return cuda_fail(e, "device query", err, err_len);
  if (arch != 90) {
    return fail(TMLA_ERR_UNSUPPORTED, err, err_len,
                "this library has sparse_decode kernels for sm_90a only; the current device is sm_%d",
                arch);
  }

  tmla::SparseDecodeArgs a{};
  a.b = static_cast<int>(p->b);
  a.s_q = static_cast<int>(p->s_q);
  a.h_q = static_cast<int>(p->h_q);
  a.d_v = static_cast<int>(p->d_v);
  a.scale_log2 = static_cast<float>(p->sm_scale * 1.4426950408889634);
  a.q = static_cast<const __nv_bfloat16*>(p->q);
  a.q_stride_b = p->q_stride_b;
  a.q_stride_s = p->q_stride_s;
  a.q_stride_h = p->q_stride_h;
  a.main.cache = static_cast<const uint8_t*>(p->k_cache);
  a.main.stride_block = p->k_stride_block;
  a.main.num_slots = p->k_num_blocks * p->k_block_size;
  a.main.block_size = static_cast<int>(p->k_block_size);
  a.main.topk = static_cast<int>(p->topk);
  a.main.indices = static_cast<const int*>(p->indices);
  a.main.stride_b = p->indices_stride_b;
  a.main.stride_s = p->indices_stride_s;
  a.main.lengths = static_cast<const int*>(p->topk_length);
  if (p->extra_k_cache != nullptr) {
    a.extra.cache = static_cast<const uint8_t*>(p->extra_k_cache);
    a.extra.stride_block = p->extra_stride_block;
    a.extra.num_slots = p->extra_num_blocks * p->extra_block_size;
    a.extra.block_size = static_cast<int>(p->extra_block_size);
    a.extra.topk = static_cast<int>(p->extra_topk);
    a.extra.indices = static_cast<const int*>(p->extra_indices);
    a.extra.stride_b = p->extra_indices_stride_b;
    a.extra.stride_s = p->extra_indices_stride_s;
    a.extra.lengths = static_cast<const int*>(p->extra_topk_length);
  } else {
    a.extra.block_size = 1;
  }
  a.attn_sink = static_cast<const float*>(p->attn_sink);
  a.num_parts = static_cast<int>(p->num_parts);
  a.n_ws = static_cast<int>(p->b + p->num_parts);
  a.out = static_cast<__nv_bfloat16*>(p->out);
  a.lse = static_cast<float*>(p->lse);

  // workspace: [ws_o | ws_lse | schedule (metadata, num_splits, scratch)]
  uint8_t* ws = static_cast<uint8_t*>(p->workspace);
  a.ws_o = reinterpret_cast<float*>(ws);
  ws += tmla::DecodeWorkspace::o_bytes(a.n_ws, a.s_q, a.h_q);
  a.ws_lse = reinterpret_cast<float*>(ws);
  ws += tmla::DecodeWorkspace::lse_bytes(a.n_ws, a.s_q, a.h_q);

  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (has_sched) {
    a.sched = static_cast<const int*>(p->schedule_metadata);
    a.num_splits = static_cast<const int*>(p->num_splits);
  } else {
    int* meta = reinterpret_cast<int*>(ws);
    int* splits = meta + a.num_parts * tmla::kScheduleWidth;
    int* scratch = splits + (a.b + 1);
    a.sched = meta;
    a.num_splits = splits;
    e = tmla::launch_decode_schedule(a, meta, splits, scratch, stream);
    if (e != cudaSuccess) return cuda_fail(e, "decode_schedule launch", err, err_len);
  }

  // The warp-specialized wgmma kernel is the default (faster on every benchmark row, same
  // tests); TORCH_MLA_NATIVE_DECODE_WGMMA=0 selects the serial mma.sync kernel (read at every
  // call, so tests and the bench can switch).
  const char* probe_env = std::getenv("TORCH_MLA_NATIVE_DECODE_PROBE");  // profiling only
  a.probe = probe_env != nullptr ? std::atoi(probe_env) : 0;
  const char* wgmma_env = std::getenv("TORCH_MLA_NATIVE_DECODE_WGMMA");
  const bool wgmma = wgmma_env == nullptr || std::strcmp(wgmma_env, "0") != 0;
  using tmla::sm90::launch_sparse_decode;
  using tmla::sm90::launch_sparse_decode_wgmma;
  if (layout == TMLA_LAYOUT_V32) {
    e = wgmma ? launch_sparse_decode_wgmma<TMLA_LAYOUT_V32>(a, stream)
              : launch_sparse_decode<TMLA_LAYOUT_V32>(a, stream);
  } else {
    e = wgmma ? launch_sparse_decode_wgmma<TMLA_LAYOUT_MODEL1>(a, stream)
              : launch_sparse_decode<TMLA_LAYOUT_MODEL1>(a, stream);
  }
  if (e != cudaSuccess) return cuda_fail(e, "sparse_decode launch", err, err_len);
  e = tmla::launch_decode_combine(a, stream);
  if (e != cudaSuccess) return cuda_fail(e, "sparse_decode combine launch", err, err_len);
  return TMLA_OK;
}

}  // extern "C"
