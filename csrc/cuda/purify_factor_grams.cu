// Factors many K x K Gram matrices in place with row_math's cholesky_inplace (its rule for
// dependent directions included), one thread per matrix: the factorization of the
// K > kMaxCudaFusedK path, so that path treats dependent directions like every other.
#include <cuda_runtime.h>

#include <cstdint>

#include "../row_math.h"
#include "device_hooks.cuh"
#include "purify_launch.h"

namespace purified_ops {
namespace cuda {
namespace {

template <typename A>
__global__ void factor_grams_kernel(A* gram, int64_t count, int K, A eps) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) cholesky_inplace(gram + i * K * K, K, eps);
}

template <typename A>
cudaError_t launch_factor_grams(A* gram, int64_t count, int K, double eps, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  constexpr int kThreads = 128;
  const auto blocks = static_cast<unsigned int>((count + kThreads - 1) / kThreads);
  return launch_kernel(factor_grams_kernel<A>, blocks, kThreads, 0, stream, false, gram, count, K,
                       static_cast<A>(eps));
}

}  // namespace

cudaError_t launch_factor_grams_f32(float* gram, int64_t count, int K, double eps, cudaStream_t stream) {
  return launch_factor_grams(gram, count, K, eps, stream);
}

cudaError_t launch_factor_grams_f64(double* gram, int64_t count, int K, double eps, cudaStream_t stream) {
  return launch_factor_grams(gram, count, K, eps, stream);
}

}  // namespace cuda
}  // namespace purified_ops
