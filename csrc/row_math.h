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
// For G = A + eps I with A positive semi-definite, in exact arithmetic every pivot is >= eps and
// every entry obeys |L_ij| <= sqrt(G_ii - sum_{p<j} L_ip^2) (Cauchy-Schwarz on the Schur
// complement). Where a direction is (numerically) dependent on earlier ones, rounding breaks both:
// a pivot is noise at the level K u G_jj, and dividing the column's residuals (noise too) by it
// makes entries far beyond the bound, which the next columns square and amplify into Inf or NaN.
// So pivots are floored at max(eps, 4 K u G_jj) and each entry is clamped to its bound. Where G
// is resolvable in this precision neither acts (exact math); where not (|z|^2 / eps beyond 1/u,
// dependent directions, K > D), L is the factor of G plus a rounding-level perturbation, so it
// stays finite and the solves are as accurate as the conditioning of G allows.
// Operation order is mirrored exactly by warp_cholesky (cuda/purify_kernels.cuh).
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
      T rem = a[i * K + i];  // G_ii, then G_ii - sum_{p<j} L_ip^2
      for (int p = 0; p < j; ++p) {
        v -= a[i * K + p] * a[j * K + p];
        rem -= a[i * K + p] * a[i * K + p];
      }
      const T bound = std::sqrt(rem > T(0) ? rem : T(0));
      const T l = v * inv;
      a[i * K + j] = l < -bound ? -bound : (l > bound ? bound : l);  // a NaN bound (NaN row) keeps l
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
