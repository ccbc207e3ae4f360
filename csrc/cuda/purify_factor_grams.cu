// The per-matrix kernels of the K > kMaxCudaFusedK path, one thread per matrix, by row_math.h's
// code, so that path treats dependent directions and large directions like every other: the
// scales of the direction sets (direction_scale), the factors with their pivot order
// (cholesky_inplace), and the order of a factor read back (factor_order).
#include <cuda_runtime.h>

#include <cstdint>

#include "../row_math.h"
#include "device_hooks.cuh"
#include "purify_launch.h"

namespace purified_ops {
namespace cuda {
namespace {

constexpr int kThreads = 128;

inline unsigned blocks_for(int64_t count) { return static_cast<unsigned>((count + kThreads - 1) / kThreads); }

template <typename A>
__global__ void direction_scales_kernel(const A* amax, int64_t count, int64_t D, A eps, A* inv_m, A* eps_scaled) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const A a = global_load(amax + i);
  if (eps_scaled != nullptr) {
    const DirectionScale<A> s = direction_scale(a, D, eps);
    global_store(inv_m + i, s.inv_m);
    global_store(eps_scaled + i, s.eps);
  } else {
    global_store(inv_m + i, normalizing_scale(a).inv_m);
  }
}

template <typename A>
__global__ void factor_grams_kernel(A* gram, int* order, int64_t count, int K, const A* eps) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) cholesky_inplace(gram + i * K * K, K, eps[i], order + i * K);
}

template <typename A>
__global__ void factor_orders_kernel(const A* chol, int* order, int64_t count, int K) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) factor_order(chol + i * K * K, K, order + i * K);
}

template <typename A>
cudaError_t start_direction_scales(const A* amax, int64_t count, int64_t D, double eps, A* inv_m, A* eps_scaled,
                                    cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  return launch_kernel("direction_scales", direction_scales_kernel<A>, blocks_for(count), kThreads, 0, stream, false, amax, count, D,
                       static_cast<A>(eps), inv_m, eps_scaled);
}

template <typename A>
cudaError_t start_factor_grams(A* gram, int* order, int64_t count, int K, const A* eps, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  return launch_kernel("factor_grams", factor_grams_kernel<A>, blocks_for(count), kThreads, 0, stream, false, gram, order, count, K,
                       eps);
}

template <typename A>
cudaError_t start_factor_orders(const A* chol, int* order, int64_t count, int K, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  return launch_kernel("factor_orders", factor_orders_kernel<A>, blocks_for(count), kThreads, 0, stream, false, chol, order, count, K);
}

}  // namespace

#define PURIFY_DEFINE_GRAM_LAUNCHERS(NAME, A)                                                                   \
  cudaError_t launch_direction_scales_##NAME(const A* amax, int64_t count, int64_t D, double eps, A* inv_m,    \
                                             A* eps_scaled, cudaStream_t stream) {                              \
    return start_direction_scales(amax, count, D, eps, inv_m, eps_scaled, stream);                            \
  }                                                                                                             \
  cudaError_t launch_factor_grams_##NAME(A* gram, int* order, int64_t count, int K, const A* eps,              \
                                         cudaStream_t stream) {                                                 \
    return start_factor_grams(gram, order, count, K, eps, stream);                                             \
  }                                                                                                             \
  cudaError_t launch_factor_orders_##NAME(const A* chol, int* order, int64_t count, int K, cudaStream_t stream) { \
    return start_factor_orders(chol, order, count, K, stream);                                                 \
  }
PURIFY_DEFINE_GRAM_LAUNCHERS(f32, float)
PURIFY_DEFINE_GRAM_LAUNCHERS(f64, double)
#undef PURIFY_DEFINE_GRAM_LAUNCHERS

}  // namespace cuda
}  // namespace purified_ops
