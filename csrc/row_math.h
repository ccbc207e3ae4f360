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

// The accumulate type: float for float, half and bfloat16 inputs, double for double. The rule
// of accumulate_type (purify_host.h, at run time) and of accumulate_dtype (reference.py).
template <typename T>
struct Accumulate {
  using type = float;
};
template <>
struct Accumulate<double> {
  using type = double;
};
template <typename T>
using accumulate_t = typename Accumulate<T>::type;

template <typename T>
PURIFY_HD T unit_roundoff();
template <>
PURIFY_HD float unit_roundoff<float>() { return 1.1920929e-07f; }
template <>
PURIFY_HD double unit_roundoff<double>() { return 2.220446049250313e-16; }

// In place: the lower triangle of the row-major K x K matrix `a` (holding G) becomes its
// Cholesky factor L (G = L L^T); the strict upper triangle is set to zero.
//
// For G = A + eps I with A positive semi-definite, in exact arithmetic every pivot is >= eps.
// In precision u a pivot d is resolved only down to rel G_jj (rel = 4 K u); below that it is
// rounding noise. The rule ("drop dependent directions"), per pivot j:
//  - d > max(eps, rel G_jj): exact math, r = sqrt(d);
//  - else, where eps >= rel G_jj: the regularization is resolvable, r = sqrt(eps) (exact math);
//  - else (d <= rel G_jj > eps: direction j is dependent on earlier ones below this
//    precision's resolution), or d is NaN: the direction is dropped, r = sqrt(G_jj) / u, so its
//    coefficient and the entries below it are ~u times their size (finite, no squaring). A
//    direction in the span of the others adds nothing to the span, so y changes by O(eps/|z|^2);
//    a noise-level pivot instead would make its coefficient noise / floor, O(|x|) or larger.
// Each entry is also clamped to its exact-math bound sqrt(G_ii - sum_{p<j} L_ip^2)
// (Cauchy-Schwarz on the Schur complement), which rounding otherwise exceeds (by up to 1% in
// float32 with dependent directions): the factor stays within the bounds exact math obeys.
// A NaN in z (NaN G_jj) keeps r NaN: only the outputs computed from that z are NaN.
// Operation order is mirrored exactly by warp_cholesky (cuda/purify_kernels.cuh); the rule also
// by regularized_cholesky (purified_ops/reference.py).
template <typename T>
PURIFY_HD void cholesky_inplace(T* a, int K, T eps) {
  const T rel = T(4) * T(K) * unit_roundoff<T>();
  for (int j = 0; j < K; ++j) {
    const T gjj = a[j * K + j];
    T d = gjj;
    for (int p = 0; p < j; ++p) d -= a[j * K + p] * a[j * K + p];
    const T relf = rel * gjj;
    const bool dropped = d != d || (relf > eps && d <= relf);
    const T r = dropped ? std::sqrt(gjj) / unit_roundoff<T>() : std::sqrt(d > eps ? d : eps);
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
