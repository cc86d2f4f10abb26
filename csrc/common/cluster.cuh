// Thread-block-cluster helpers (sm_90): distributed shared memory stores that signal the peer's
// mbarrier, cluster-wide barrier. Written as PTX because they take the 32-bit shared::cluster
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

// 16 bytes to a peer CTA's shared memory (`a`, a shared::cluster address) that, once written,
// count as 16 bytes of the transaction count of the peer's mbarrier `bar` (shared::cluster
// address): the peer waits on its own barrier for the data, with no cluster-scope fences here.
__device__ __forceinline__ void st_async_16(uint32_t a, uint4 v, uint32_t bar) {
  asm volatile(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];" ::"r"(a),
      "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(bar)
      : "memory");
}

// Every thread of every CTA of the cluster (release / acquire): used after mbarrier init, so a
// peer never arrives on an uninitialized barrier, and before exit, so no peer still writes into
// a CTA whose shared memory is gone.
__device__ __forceinline__ void cluster_sync_all() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
}

}  // namespace tmla
