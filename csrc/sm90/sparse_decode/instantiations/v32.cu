// SM90 sparse_decode, V32 cache layout (d_qk 576). One instantiation per translation unit, so
// the build compiles them in parallel.
#include "sm90/sparse_decode/kernel.cuh"

namespace tmla::sm90 {
template cudaError_t launch_sparse_decode<TMLA_LAYOUT_V32>(const SparseDecodeArgs&, cudaStream_t);
}  // namespace tmla::sm90
