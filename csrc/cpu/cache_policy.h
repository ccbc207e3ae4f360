// How the CPU kernels use the cache: outputs larger than half the last-level cache are written
// around it (non-temporal stores), and the next row's inputs are prefetched while the current
// row's second pass runs. Included by purify_cpu.cpp only, compiled once per CPU capability.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>

#include <ATen/cpu/vec/vec.h>

#include "streaming_stores.h"

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <xmmintrin.h>  // _mm_sfence
#endif

namespace purified_ops {
namespace {  // per CPU capability: no helper shared between capabilities' modules

using at::vec::Vectorized;

// The last-level cache this machine may count on: what the OS reports (a VM's share can be far
// below what cpuid says), and at most kCachePerCore per online CPU, since a VM may also be told
// the host's whole cache (measured: a 2-CPU VM told 480 MiB, where outputs of 16 MiB and more
// were written faster with non-temporal stores, and of 8 MiB as fast or slower;
// benchmarks/README.md).
constexpr int64_t kCachePerCore = int64_t{8} << 20;

inline int64_t last_level_cache_bytes() {
  int64_t bytes = int64_t{8} << 20;
  if (FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
    long kib = 0;
    const int n = std::fscanf(f, "%ldK", &kib);
    std::fclose(f);
    if (n == 1 && kib > 0) bytes = static_cast<int64_t>(kib) << 10;
  } else if (const long v = sysconf(_SC_LEVEL3_CACHE_SIZE); v > 0) {
    bytes = static_cast<int64_t>(v);
  }
  const long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  return cpus > 0 ? std::min(bytes, kCachePerCore * cpus) : bytes;
}

// Whether to write outputs with non-temporal stores: only when they are larger than half the
// last-level cache (smaller ones are better left in cache for their consumer) and every row
// starts on a vector boundary.
template <typename T>
bool use_streaming_stores(const void* out, int64_t D, int64_t total_bytes) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  const StreamingStores mode = streaming_stores();  // PURIFIED_OPS_STREAMING_STORES overrides the size rule
  if (mode == StreamingStores::kNever) return false;
  const bool always = mode == StreamingStores::kAlways;
  static const int64_t llc = last_level_cache_bytes();
  constexpr int64_t kVecBytes = static_cast<int64_t>(sizeof(Vectorized<T>));
  return (always || total_bytes > llc / 2) && reinterpret_cast<uintptr_t>(out) % kVecBytes == 0 &&
         (D * static_cast<int64_t>(sizeof(T))) % kVecBytes == 0;
#else
  (void)out, (void)D, (void)total_bytes;
  return false;
#endif
}

// Orders this thread's non-temporal stores before anything after the parallel region.
inline void fence_streaming_stores() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// The next row's input streams, prefetched a cache line at a time during the current row's
// second pass: that pass reads only what the first pass brought into L1/L2, so without this
// the memory system would idle while it runs.
// Directions of the next z row prefetched (every K is served; beyond this many the rest come
// in on demand): with x and grad_y, at most this + 2 streams.
constexpr int kMaxPrefetchedDirections = 16;

template <typename T>
struct NextRow {
  static constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(T));
  const T* const* streams = nullptr;
  int n = 0;
  inline void prefetch(int64_t d) const {
    if ((d & (kLine - 1)) == 0)
      for (int i = 0; i < n; ++i) __builtin_prefetch(streams[i] + d, 0, 3);
  }
};

}  // namespace
}  // namespace purified_ops
