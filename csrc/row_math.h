// Per-row small linear algebra of the purification op: the K x K Cholesky factor of
// G = Z Z^T + eps I and the solves with it. Written once for host and device so that the
// CPU build exercises exactly what the CUDA kernels run. No torch headers here.
#pragma once

#if defined(__CUDACC__)
#define PURIFY_HD __host__ __device__ __forceinline__
#else
#define PURIFY_HD inline
#endif

#include <cmath>

namespace purified_ops {

// K up to this is fused with per-row register/stack storage (G is K x K).
constexpr int kMaxFusedK = 16;

template <typename T>
PURIFY_HD T unit_roundoff();
template <>
PURIFY_HD float unit_roundoff<float>() { return 1.1920929e-07f; }
template <>
PURIFY_HD double unit_roundoff<double>() { return 2.220446049250313e-16; }

// In place: the lower triangle of the row-major K x K matrix `a` (holding G) becomes its
// Cholesky factor L (G = L L^T); the strict upper triangle is set to zero.
//
// Pivot floor: for G = A + eps I with A positive semi-definite every pivot is >= eps in exact
// arithmetic. A computed pivot can still fall below that when a direction is (numerically)
// dependent on the earlier ones, since rounding in G is ~K u G_jj; the noise then grows through
// the factor into Inf or NaN. So pivots are floored at max(eps, 4 K u G_jj): exact math where G
// is resolvable in this precision, and where it is not (|z|^2 / eps beyond 1/u), the factor of a
// G whose dependent directions get a regularization at the rounding level, which stays finite.
template <typename T>
PURIFY_HD void cholesky_inplace(T* a, int K, T eps) {
  const T rel = T(4) * T(K) * unit_roundoff<T>();
  for (int j = 0; j < K; ++j) {
    const T gjj = a[j * K + j];
    T d = gjj;
    for (int p = 0; p < j; ++p) d -= a[j * K + p] * a[j * K + p];
    const T floor = eps > rel * gjj ? eps : rel * gjj;
    d = d > floor ? d : floor;  // also maps a NaN pivot to the floor; NaN rows still reach c via Z x
    const T r = std::sqrt(d);
    a[j * K + j] = r;
    const T inv = T(1) / r;
    for (int i = j + 1; i < K; ++i) {
      T v = a[i * K + j];
      for (int p = 0; p < j; ++p) v -= a[i * K + p] * a[j * K + p];
      a[i * K + j] = v * inv;
      a[j * K + i] = T(0);
    }
  }
}

// In place: b <- (L L^T)^{-1} b for the factor written by cholesky_inplace.
template <typename T>
PURIFY_HD void cholesky_solve_inplace(const T* L, int K, T* b) {
  for (int i = 0; i < K; ++i) {
    T v = b[i];
    for (int p = 0; p < i; ++p) v -= L[i * K + p] * b[p];
    b[i] = v / L[i * K + i];
  }
  for (int i = K - 1; i >= 0; --i) {
    T v = b[i];
    for (int p = i + 1; p < K; ++p) v -= L[p * K + i] * b[p];
    b[i] = v / L[i * K + i];
  }
}

}  // namespace purified_ops
