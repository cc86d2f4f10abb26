// torch_mla native library: the plain C ABI.
//
// One shared library (libtorch_mla_native.so), built by `python -m torch_mla.build`, linked
// against the static CUDA runtime and nothing of PyTorch. Every entry point takes raw device
// pointers, sizes and strides, a cudaStream_t (passed as void*), and an error-string buffer; it
// returns 0 on success and a nonzero code with a NUL-terminated message in `err` otherwise.
// Nothing here allocates device memory, synchronizes the host, or keeps state between calls
// (beyond one-time kernel attribute setup), so every call can be captured into a CUDA graph.
//
// The Python side (torch_mla/native/) fills the parameter structs with struct.pack: every field
// is 8 bytes (int64_t, double or a pointer), in declaration order, no padding. Changing a struct
// means bumping TMLA_ABI_VERSION (the loader refuses a library of another version).

#ifndef TORCH_MLA_NATIVE_H_
#define TORCH_MLA_NATIVE_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TMLA_ABI_VERSION 1

#if defined(__GNUC__)
#define TMLA_API __attribute__((visibility("default")))
#else
#define TMLA_API
#endif

// Error codes (the message in `err` says more).
#define TMLA_OK 0
#define TMLA_ERR_INVALID_ARGUMENT 1
#define TMLA_ERR_UNSUPPORTED 2
#define TMLA_ERR_CUDA 3

// FP8 KV-cache layouts (meta/layouts.py): V32 (d_qk 576, 656 B/token) and MODEL1 (d_qk 512,
// 584 B/token, data and ue8m0 scales in separate sections of a block).
#define TMLA_LAYOUT_V32 0
#define TMLA_LAYOUT_MODEL1 1

// mla::sparse_decode. Shapes and semantics: meta/sparse_decode.py (the contract) and
// torch_mla/reference/sparse_decode.py (the definition). Strides are in elements for q and the
// index tensors, in bytes for the caches. All pointers are device pointers.
typedef struct tmla_sparse_decode_params {
  int64_t abi_version;   // TMLA_ABI_VERSION
  int64_t struct_bytes;  // sizeof(tmla_sparse_decode_params)

  int64_t b, s_q, h_q;
  int64_t d_qk;      // 576 (V32) or 512 (MODEL1): selects the cache layout
  int64_t d_v;       // 1..512: out holds the first d_v value columns
  int64_t topk;      // indices.shape[-1] (may be 0)
  int64_t extra_topk;  // extra_indices.shape[-1] (0 without extra keys)
  double sm_scale;

  const void* q;  // bf16 [b, s_q, h_q, d_qk], last dim contiguous, 16-byte aligned rows
  int64_t q_stride_b, q_stride_s, q_stride_h;

  const void* k_cache;  // packed FP8 cache, 16-byte aligned
  int64_t k_num_blocks, k_block_size, k_stride_block;  // stride in bytes, multiple of 16
  const void* indices;  // int32 [b, s_q, topk], last dim contiguous
  int64_t indices_stride_b, indices_stride_s;
  const void* topk_length;  // int32 [b] or NULL

  const void* extra_k_cache;  // NULL without extra keys
  int64_t extra_num_blocks, extra_block_size, extra_stride_block;
  const void* extra_indices;  // int32 [b, s_q, extra_topk]
  int64_t extra_indices_stride_b, extra_indices_stride_s;
  const void* extra_topk_length;  // int32 [b] or NULL

  const void* attn_sink;  // f32 [h_q] or NULL

  // Work split (meta/schedule.py): metadata [num_parts, 8] int32 and num_splits [b + 1] int32
  // from mla::decode_schedule (block_n 64), or both NULL: the library computes a schedule with
  // num_parts parts into the workspace.
  const void* schedule_metadata;
  const void* num_splits;
  int64_t num_parts;

  void* out;  // bf16 [b, s_q, h_q, d_v], contiguous
  void* lse;  // f32 [b, h_q, s_q], contiguous
  void* workspace;  // at least tmla_sparse_decode_workspace_bytes(...) bytes, 256-aligned
  int64_t workspace_bytes;
} tmla_sparse_decode_params;

// Version of this ABI the library was built with (TMLA_ABI_VERSION).
TMLA_API int64_t tmla_abi_version(void);

// A one-line human-readable description: compiler, CUTLASS version, target architectures.
TMLA_API const char* tmla_build_info(void);

// Bytes of device workspace one sparse_decode call needs (split-KV partial outputs and, without
// a caller schedule, the schedule itself). Pure host arithmetic.
TMLA_API int64_t tmla_sparse_decode_workspace_bytes(int64_t b, int64_t s_q, int64_t h_q,
                                                    int64_t num_parts, int64_t has_schedule);

// Launches mla::sparse_decode on `stream` (a cudaStream_t; NULL = legacy default stream).
// Writes every element of out and lse. Returns TMLA_OK or an error code with a message in err.
TMLA_API int tmla_sparse_decode(const tmla_sparse_decode_params* params, void* stream, char* err,
                                int64_t err_len);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // TORCH_MLA_NATIVE_H_
