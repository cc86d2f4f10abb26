// SM90 sparse_decode, V32 cache layout, warp-specialized wgmma kernel (kernel_wgmma.cuh).
// One instantiation per translation unit, so the build compiles them in parallel.
#include "sm90/sparse_decode/kernel_wgmma.cuh"

namespace tmla::sm90 {
template cudaError_t launch_sparse_decode_wgmma<TMLA_LAYOUT_V32>(const SparseDecodeArgs&,
                                                                  cudaStream_t);
}  // namespace tmla::sm90
