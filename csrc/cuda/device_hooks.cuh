// The two places where the kernels need more than CUDA C++ itself: the named barrier (inline
// PTX) and the kernel launch. The emulated build (PURIFIED_OPS_CUDA_EMU, csrc/cuda_emu/)
// compiles the same kernel sources with the host compiler and supplies both.
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

// kernel<<<grid, block, smem, stream>>>(args...), then the launch's error. `grid_stride`: the
// kernel's loops stride over the grid, so any grid size gives the same result (the emulation
// may shrink it to make every block serve several work items).
template <typename... P, typename... Args>
cudaError_t launch_kernel(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          bool grid_stride, Args&&... args) {
#if defined(PURIFIED_OPS_CUDA_EMU)
  (void)stream;
  return ::cuda_emu::launch_kernel(kernel, grid, block, smem, grid_stride, std::forward<Args>(args)...);
#else
  (void)grid_stride;
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
#endif
}

}  // namespace cuda
}  // namespace purified_ops
