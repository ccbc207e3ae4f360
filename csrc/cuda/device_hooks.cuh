// The places where the kernels need more than CUDA C++ itself: the named barrier (inline PTX),
// the kernel launch, and the global loads and stores, which the emulated build records. The
// emulated build (PURIFIED_OPS_CUDA_EMU, csrc/cuda_emu/) compiles the same kernel sources with
// the host compiler and supplies all three.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#if defined(PURIFIED_OPS_CUDA_EMU)
#include "../cuda_emu/cuda_emu.h"
#endif

namespace purified_ops {
namespace cuda {

// bar.sync id, count: the `count` threads (whole warps) that use barrier `id` wait for each other.
__device__ __forceinline__ void named_barrier_sync(int id, int count) {
#if defined(PURIFIED_OPS_CUDA_EMU)
  ::cuda_emu::bar_sync(id, count, __LINE__);
#else
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
#endif
}

// Global memory accesses: plain loads and stores; the emulated build also records each lane's
// access at its call site (csrc/cuda_emu/memory_traffic.cpp counts sectors and distinct bytes per
// warp instruction). The guarded forms are one instruction with some lanes predicated off:
// `active` false loads `otherwise` or stores nothing, and touches no memory.
#if defined(PURIFIED_OPS_CUDA_EMU)
#define PURIFY_ACCESS_SITE , int line = __builtin_LINE(), const char* file = __builtin_FILE()
#define PURIFY_RECORD_ACCESS(ptr, store, active) \
  ::cuda_emu::record_global_access(ptr, sizeof(T), store, active, file, line)
#else
#define PURIFY_ACCESS_SITE
#define PURIFY_RECORD_ACCESS(ptr, store, active) ((void)0)
#endif

template <typename T>
__device__ __forceinline__ T global_load(const T* p PURIFY_ACCESS_SITE) {
  PURIFY_RECORD_ACCESS(p, false, true);
  return *p;
}

template <typename T>
__device__ __forceinline__ T global_load_or(bool active, const T* p, T otherwise PURIFY_ACCESS_SITE) {
  PURIFY_RECORD_ACCESS(p, false, active);
  return active ? *p : otherwise;
}

template <typename T>
__device__ __forceinline__ void global_store(T* p, const T& v PURIFY_ACCESS_SITE) {
  PURIFY_RECORD_ACCESS(p, true, true);
  *p = v;
}

template <typename T>
__device__ __forceinline__ void global_store_if(bool active, T* p, const T& v PURIFY_ACCESS_SITE) {
  PURIFY_RECORD_ACCESS(p, true, active);
  if (active) *p = v;
}

#undef PURIFY_ACCESS_SITE
#undef PURIFY_RECORD_ACCESS

// kernel<<<grid, block, smem, stream>>>(args...), then the launch's error. `name` names the
// launch in the emulation's memory-traffic records. `grid_stride`: the
// kernel's loops stride over the grid, so any grid size gives the same result (the emulation
// may shrink it to make every block serve several work items).
template <typename... P, typename... Args>
cudaError_t launch_kernel(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, bool grid_stride, Args&&... args) {
#if defined(PURIFIED_OPS_CUDA_EMU)
  (void)stream;
  return ::cuda_emu::launch_kernel(name, kernel, grid, block, smem, grid_stride, std::forward<Args>(args)...);
#else
  (void)grid_stride, (void)name;
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
#endif
}

}  // namespace cuda
}  // namespace purified_ops
