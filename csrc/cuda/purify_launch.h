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
  const void* strength = nullptr;  // acc_t, 0-dim, device memory
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

// In place: `count` contiguous K x K Gram matrices (float32 or float64) become their Cholesky
// factors, by row_math's cholesky_inplace (the K > kMaxCudaFusedK path).
cudaError_t launch_factor_grams_f32(float* gram, int64_t count, int K, double eps, cudaStream_t stream);
cudaError_t launch_factor_grams_f64(double* gram, int64_t count, int K, double eps, cudaStream_t stream);

// Largest K served by the fused kernels; larger K takes the ATen path of purify_cuda_ops.h.
constexpr int kMaxCudaFusedK = 16;

}  // namespace cuda
}  // namespace purified_ops
