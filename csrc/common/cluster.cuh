// Thread-block-cluster helpers (sm_90): bulk copies into a peer CTA's shared memory that signal
// the peer's mbarrier, cluster-wide barrier. Written as PTX because they take the 32-bit shared::cluster
// addresses mapa returns.
#pragma once

#include <cstdint>

namespace tmla {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// This CTA's rank in its cluster.
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}

// The shared::cluster address of the same offset (`a`, a shared::cta address) in CTA `rank`.
__device__ __forceinline__ uint32_t peer_smem_u32(uint32_t a, uint32_t rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
  return r;
}

// `bytes` (a multiple of 16) from this CTA's shared memory at `src` (shared::cta address) to a
// peer's at `dst` (shared::cluster address) by the bulk-copy engine; once written they count on
// the peer's mbarrier `bar` (shared::cluster address) as `bytes` of its transaction count. The
// source is read through the async proxy: generic stores to it need fence.proxy.async first.
__device__ __forceinline__ void bulk_copy_to_peer(uint32_t dst, uint32_t src, uint32_t bytes,
                                                  uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
      "r"(src), "r"(bytes), "r"(bar)
      : "memory");
}

// Every thread of every CTA of the cluster (release / acquire): used after mbarrier init, so a
// peer never arrives on an uninitialized barrier, and before exit, so no peer still writes into
// a CTA whose shared memory is gone.
__device__ __forceinline__ void cluster_sync_all() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
}

}  // namespace tmla
