// The interface between the torch glue (purify_cuda.cpp, host compiler) and the CUDA
// launchers (purify_kernels_*.cu, nvcc). Plain types only: no torch, no ATen, so that the .cu
// files compile fast and the .cpp needs no CUDA device code.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../row_grid.h"

namespace purified_ops {
namespace cuda {

// Rows of one call are split into work items: (z row m, rows [b, e) of the x rows it serves).
// The split depends on the shapes alone (never on the device), so reductions are bitwise stable.
struct ForwardParams {
  const void* x = nullptr;       // T, read in place through grid's strides
  const void* z = nullptr;       // T
  const void* strength = nullptr;  // acc_t, 0-dim, device memory; null: strength_value
  double strength_value = 0;
  void* y = nullptr;             // T, contiguous [rows, D]
  void* coeff = nullptr;         // acc_t, contiguous [rows, K]
  void* chol = nullptr;          // acc_t, contiguous [groups, K, K]
  RowGrid grid;
  double eps = 0;
  int64_t chunks = 1;            // work items per z row
  bool vec = false;              // 16-byte accesses allowed (pointers and strides aligned)
};

struct BackwardParams {
  const void* g = nullptr;       // T
  const void* x = nullptr;       // T
  const void* z = nullptr;       // T
  const void* strength = nullptr;  // acc_t
  const void* coeff = nullptr;   // acc_t [rows, K]
  const void* chol = nullptr;    // acc_t [groups, K, K]
  void* dx = nullptr;            // T, contiguous [rows, D]
  void* dz = nullptr;            // T, contiguous [groups, K, D], or null (not wanted)
  void* dz_partial = nullptr;    // acc_t [items, K, Dp] when a z row serves several x rows
  void* gdotp_partial = nullptr; // acc_t [items]: per item sum of <g, p>
  void* ds = nullptr;            // acc_t, 0-dim
  RowGrid grid;
  int64_t chunks = 1;
  int64_t Dp = 0;                // D rounded up to the vector width (partial row stride)
  bool vec = false;
};

// Each returns the first error seen (cudaGetLastError after every launch), cudaSuccess else.
#define PURIFY_DECLARE_LAUNCHERS(NAME)                                          \
  cudaError_t launch_forward_##NAME(const ForwardParams& p, cudaStream_t stream); \
  cudaError_t launch_backward_##NAME(const BackwardParams& p, cudaStream_t stream);
PURIFY_DECLARE_LAUNCHERS(f16)
PURIFY_DECLARE_LAUNCHERS(bf16)
PURIFY_DECLARE_LAUNCHERS(f32)
PURIFY_DECLARE_LAUNCHERS(f64)
#undef PURIFY_DECLARE_LAUNCHERS

// The per-matrix steps of the K > kMaxCudaFusedK path (purify_factor_grams.cu), float32 or
// float64, by row_math.h's code:
//  - direction_scales: per direction set, from its largest |z| entry, 1 / m and eps / m^2
//    (direction_scale); with eps_scaled null, 1 / m alone (normalizing_scale, the backward's);
//  - factor_grams: in place, `count` contiguous K x K Gram matrices G + eps[i] I become their
//    Cholesky factors in pivot order, with order[i * K + t] the direction of step t
//    (cholesky_inplace);
//  - factor_orders: the order of factors in direction rows, as the ops return them (factor_order).
#define PURIFY_DECLARE_GRAM_LAUNCHERS(NAME, A)                                                                  \
  cudaError_t launch_direction_scales_##NAME(const A* amax, int64_t count, int64_t D, double eps, A* inv_m,     \
                                             A* eps_scaled, cudaStream_t stream);                                \
  cudaError_t launch_factor_grams_##NAME(A* gram, int* order, int64_t count, int K, const A* eps,               \
                                         cudaStream_t stream);                                                   \
  cudaError_t launch_factor_orders_##NAME(const A* chol, int* order, int64_t count, int K, cudaStream_t stream);
PURIFY_DECLARE_GRAM_LAUNCHERS(f32, float)
PURIFY_DECLARE_GRAM_LAUNCHERS(f64, double)
#undef PURIFY_DECLARE_GRAM_LAUNCHERS

// The same, overloaded on the accumulate type.
#define PURIFY_GRAM_OVERLOADS(NAME, A)                                                                          \
  inline cudaError_t launch_direction_scales(const A* amax, int64_t count, int64_t D, double eps, A* inv_m,     \
                                             A* eps_scaled, cudaStream_t stream) {                               \
    return launch_direction_scales_##NAME(amax, count, D, eps, inv_m, eps_scaled, stream);                      \
  }                                                                                                              \
  inline cudaError_t launch_factor_grams(A* gram, int* order, int64_t count, int K, const A* eps,               \
                                         cudaStream_t stream) {                                                  \
    return launch_factor_grams_##NAME(gram, order, count, K, eps, stream);                                      \
  }                                                                                                              \
  inline cudaError_t launch_factor_orders(const A* chol, int* order, int64_t count, int K, cudaStream_t stream) { \
    return launch_factor_orders_##NAME(chol, order, count, K, stream);                                          \
  }
PURIFY_GRAM_OVERLOADS(f32, float)
PURIFY_GRAM_OVERLOADS(f64, double)
#undef PURIFY_GRAM_OVERLOADS

// Largest K served by the fused kernels; larger K takes the ATen path of purify_cuda_ops.h.
constexpr int kMaxCudaFusedK = 16;

}  // namespace cuda
}  // namespace purified_ops
