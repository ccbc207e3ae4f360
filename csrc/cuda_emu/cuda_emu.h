// CUDA's execution model on the CPU, so that the unmodified kernel sources (csrc/cuda/*.cuh,
// *.cu) compile with the host compiler and run with CUDA's semantics: every CUDA thread is a
// fiber, the fibers of a block share one OS thread (so `__shared__` is `thread_local`), blocks
// run one after another. Barriers, __syncwarp and the shuffles are collectives that check
// what CUDA requires of them (see cuda_emu.cpp) and report a violation or a deadlock as a
// launch error. Included first by the emulated build (-include), before any CUDA header.
#pragma once

#if defined(__CUDACC__)
#error "cuda_emu.h is for the host compiler's emulated build, not for nvcc"
#endif

// Before the toolkit's headers, which keep these when already defined.
#define __host__
#define __device__
#define __global__
#define __grid_constant__
#define __shared__ thread_local

#include <cuda_runtime.h>  // dim3, uint3, cudaError_t, cudaStream_t (types only; no libcudart)

#include <math.h>  // the float overloads (sqrt, fma) in the global namespace, as in CUDA

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#undef __launch_bounds__
#define __launch_bounds__(...)

namespace cuda_emu {

// Where the calling fiber is (valid inside an emulated kernel only).
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

// Collectives. `line` names the call site: every participant must be at the same one.
void bar_sync(int id, int count, int line);  // count <= 0: the whole block (__syncthreads)
void syncwarp(unsigned mask, int line);
enum class Shuffle { kIndex, kXor };
uint64_t shuffle_bits(unsigned mask, uint64_t bits, Shuffle kind, int arg, int width, int line);

// Runs body() once per thread of each block of the grid; returns cudaSuccess, or an error
// whose description last_error() gives (a launch limit, a violated collective, a deadlock).
cudaError_t launch(const char* name, dim3 grid, dim3 block, size_t dynamic_smem, bool grid_stride,
                   const std::function<void()>& body);
const char* last_error();

// Test knobs (per process). The order in which the fibers of a block run (cuda_emu.cpp says
// how each one orders them): thread order, forward or reverse; warp-granular round robin; a
// random runnable warp at each step, seeded per block from `seed` (the other orders ignore it).
// A cap on the grid of grid-stride kernels (0: none) so that every team serves several work
// items. And the byte dynamic shared memory starts as in each block: 0xff (NaN in every float
// format) by default; a GPU leaves what earlier blocks wrote, finite values that a read before
// the write turns into a wrong but plausible result.
enum class Schedule { kForward, kReverse, kRoundRobin, kRandom };
void set_schedule(Schedule schedule, uint64_t seed);
void set_max_grid_stride_blocks(unsigned blocks);
void set_shared_memory_fill(unsigned char byte);

// Largest dynamic shared memory of a launch without an opt-in (as on every CUDA GPU).
constexpr size_t kMaxDynamicSmem = 48 * 1024;

template <typename... P, typename... Args>
cudaError_t launch_kernel(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                          bool grid_stride, Args&&... args) {
  // Each thread gets its own copy of the arguments, as from the kernel parameter space.
  std::tuple<std::decay_t<P>...> params(std::forward<Args>(args)...);
  return launch(name, grid, block, smem, grid_stride, [&] { std::apply(kernel, params); });
}

// The global memory traffic of the launches (memory_traffic.cpp), recorded while enabled: every
// lane's global access (`active` false: the lane is predicated off at a guarded access, which
// keeps the lanes' count of the call site in step), at its call site. The lanes of a warp at
// one call site's one dynamic execution (the same count of collectives passed and of
// executions of the site since) form one warp instruction.
void record_global_access(const void* p, size_t bytes, bool store, bool active, const char* file, int line);
// Where the calling fiber is: thread in the block, warp, and how many collectives it passed.
struct FiberPlace {
  int linear, warp;
  uint64_t collectives;
};
FiberPlace fiber_place();
// Called by launch(): a launch starts, one of its blocks ends, the launch ends.
void traffic_launch_begin(const char* name, dim3 grid, dim3 block, size_t dynamic_smem);
void traffic_block_end();
void traffic_launch_end();

template <typename T>
T shuffle(unsigned mask, T v, Shuffle kind, int arg, int width, int line) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of 1..8-byte values");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = shuffle_bits(mask, bits, kind, arg, width, line);
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (::cuda_emu::block_idx())
#define blockDim (::cuda_emu::block_dim())
#define gridDim (::cuda_emu::grid_dim())

inline void __syncthreads(int line = __builtin_LINE()) { ::cuda_emu::bar_sync(0, 0, line); }
inline void __syncwarp(unsigned mask = 0xffffffffu, int line = __builtin_LINE()) {
  ::cuda_emu::syncwarp(mask, line);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32, int line = __builtin_LINE()) {
  return ::cuda_emu::shuffle(mask, v, ::cuda_emu::Shuffle::kIndex, src, width, line);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, int line = __builtin_LINE()) {
  return ::cuda_emu::shuffle(mask, v, ::cuda_emu::Shuffle::kXor, lane_mask, width, line);
}

// Bit casts of the device intrinsics.
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline long long __double_as_longlong(double d) { long long v; std::memcpy(&v, &d, 8); return v; }
inline double __hiloint2double(int hi, int lo) {
  const uint64_t v = (static_cast<uint64_t>(static_cast<uint32_t>(hi)) << 32) | static_cast<uint32_t>(lo);
  double d;
  std::memcpy(&d, &v, 8);
  return d;
}

#include <cuda_bf16.h>  // host-side conversions of the toolkit
#include <cuda_fp16.h>
