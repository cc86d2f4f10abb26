// What the sparse_decode kernels receive (by value), and the host-side launchers that the API
// layer calls. Filled from tmla_sparse_decode_params by csrc/api/api.cu after validation.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace tmla {

// Keys per schedule block (decode_schedule's block_n) = keys per kernel tile.
constexpr int kDecodeBlockN = 64;
// Value columns the kernels accumulate (d_v <= 512); also the workspace row width.
constexpr int kDecodeDvMax = 512;
// One row of schedule metadata (meta/schedule.py).
constexpr int kScheduleWidth = 8;

struct KeySet {
  const uint8_t* cache;  // block 0, byte 0
  int64_t stride_block;  // bytes between blocks
  int64_t num_slots;     // num_blocks * block_size: an index is valid iff 0 <= idx < num_slots
  int block_size;
  int topk;              // row length of indices
  const int* indices;    // [b, s_q, topk]
  int64_t stride_b, stride_s;
  const int* lengths;    // [b] or nullptr (then every row uses topk positions)
};

struct SparseDecodeArgs {
  int b, s_q, h_q, d_v;
  float scale_log2;  // sm_scale * log2(e): logits are kept in the log2 domain
  const __nv_bfloat16* q;
  int64_t q_stride_b, q_stride_s, q_stride_h;
  KeySet main, extra;  // extra.indices == nullptr: no extra keys
  const float* attn_sink;  // [h_q] or nullptr
  const int* sched;        // [num_parts, 8]
  const int* num_splits;   // [b + 1]
  int num_parts;
  __nv_bfloat16* out;  // [b, s_q, h_q, d_v]
  float* lse;          // [b, h_q, s_q]
  float* ws_o;         // [n_ws, s_q, h_q, 512] normalized partial outputs
  float* ws_lse;       // [n_ws, s_q, h_q] partial log2-sum-exp (-inf: no key)
  int n_ws;            // b + num_parts: bound on the number of splits of any valid schedule
  // Profiling only (TORCH_MLA_NATIVE_DECODE_PROBE, wgmma kernel), bits: 1 = the producer skips
  // its global loads, 2 = it skips the dequantization, 16 = it writes nothing (only the
  // handshakes: the consumers' time alone), 128 = no crossover copies to the peer, 256 = no NoPE
  // stores, 1024 = the consumers skip their math (only the handshakes: the producer's time
  // alone) -- results are wrong under these six; 32 = no crossover (no clusters), 64 = one CTA
  // slot a job (several waves instead of one persistent wave) -- results stay exact under these
  // two (the GPU tests run with 32).
  int probe;
};

// Workspace carving (must match tmla_sparse_decode_workspace_bytes and torch_mla/native).
struct DecodeWorkspace {
  static constexpr int64_t kAlign = 256;
  static int64_t o_bytes(int64_t n_ws, int64_t s_q, int64_t h_q) {
    return (n_ws * s_q * h_q * kDecodeDvMax * 4 + kAlign - 1) / kAlign * kAlign;
  }
  static int64_t lse_bytes(int64_t n_ws, int64_t s_q, int64_t h_q) {
    return (n_ws * s_q * h_q * 4 + kAlign - 1) / kAlign * kAlign;
  }
  static int64_t sched_bytes(int64_t b, int64_t num_parts) {
    // metadata [num_parts, 8] + num_splits [b + 1] + per-batch block ends [b]
    return ((num_parts * kScheduleWidth + (b + 1) + b) * 4 + kAlign - 1) / kAlign * kAlign;
  }
};

// Device-side schedule (same semantics as torch_mla.reference.schedule.decode_schedule over
// the per-set-rounded key counts cdiv(Lm, 64) + cdiv(Le, 64)); one CTA, no host sync.
cudaError_t launch_decode_schedule(const SparseDecodeArgs& a, int* metadata, int* num_splits,
                                   int* scratch, cudaStream_t stream);

// Merges the split-KV partials of batch elements with 0 or >= 2 splits into out / lse.
cudaError_t launch_decode_combine(const SparseDecodeArgs& a, cudaStream_t stream);

namespace sm90 {
// layout: TMLA_LAYOUT_V32 or TMLA_LAYOUT_MODEL1 (one instantiation per translation unit).
// launch_sparse_decode: the serial mma.sync kernel (sparse_decode/kernel.cuh);
// launch_sparse_decode_wgmma: the warp-specialized wgmma kernel (sparse_decode/kernel_wgmma.cuh).
template <int LAYOUT>
cudaError_t launch_sparse_decode(const SparseDecodeArgs& a, cudaStream_t stream);
template <int LAYOUT>
cudaError_t launch_sparse_decode_wgmma(const SparseDecodeArgs& a, cudaStream_t stream);
}  // namespace sm90

}  // namespace tmla
