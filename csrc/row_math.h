// Per-row small linear algebra of the purification op: the K x K Cholesky factor of
// G = Z Z^T + eps I and the solves with it, and the power-of-two scale of a direction set.
// Written once for host and device so that the CPU build exercises exactly what the CUDA
// kernels run. No torch headers here.
#pragma once

#if defined(__CUDACC__)
#define PURIFY_HD __host__ __device__ __forceinline__
#else
#define PURIFY_HD inline
#endif

#include <cmath>
#include <cstdint>
#include <cstring>

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

// The accumulate types' limits as constants (std::numeric_limits' functions are host-only for
// nvcc): the largest finite number, the smallest normal one, frexp's exponents of those two
// (x = f 2^e, f in [0.5, 1): numeric_limits' max_exponent and min_exponent), the stored
// mantissa bits and the unsigned integer of the same size (Bits).
template <typename A>
struct FloatLimits;
template <>
struct FloatLimits<float> {
  using Bits = uint32_t;
  static constexpr float largest = 3.40282347e+38f;
  static constexpr float smallest_normal = 1.17549435e-38f;
  static constexpr int max_exponent = 128;
  static constexpr int min_exponent = -125;
  static constexpr int mantissa_bits = 23;
};
template <>
struct FloatLimits<double> {
  using Bits = uint64_t;
  static constexpr double largest = 1.7976931348623157e+308;
  static constexpr double smallest_normal = 2.2250738585072014e-308;
  static constexpr int max_exponent = 1024;
  static constexpr int min_exponent = -1021;
  static constexpr int mantissa_bits = 52;
};

// The bits of v, and back (the device's moves; memcpy on the host).
template <typename A>
PURIFY_HD typename FloatLimits<A>::Bits bits_of(A v) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(A) == 4) {
    return __float_as_uint(v);
  } else {
    return static_cast<uint64_t>(__double_as_longlong(v));
  }
#else
  typename FloatLimits<A>::Bits b;
  std::memcpy(&b, &v, sizeof b);
  return b;
#endif
}

template <typename A>
PURIFY_HD A from_bits(typename FloatLimits<A>::Bits b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(A) == 4) {
    return __uint_as_float(b);
  } else {
    return __longlong_as_double(static_cast<long long>(b));
  }
#else
  A v;
  std::memcpy(&v, &b, sizeof v);
  return v;
#endif
}

// floor(log2 v) for a finite normal v > 0 (frexp's exponent minus 1), from the exponent field;
// a subnormal v gives 1 - max_exponent, which is above its true value but negative too.
// (frexp and ldexp are library calls in device code, with registers to match: these are shifts.)
template <typename A>
PURIFY_HD int floor_log2(A v) {
  using lim = FloatLimits<A>;
  constexpr int field_mask = 2 * lim::max_exponent - 1;
  return static_cast<int>((bits_of(v) >> lim::mantissa_bits) & field_mask) - (lim::max_exponent - 1);
}

// 2^e, exactly, for e from the smallest subnormal's exponent (min_exponent - 1 - mantissa_bits)
// to max_exponent - 1.
template <typename A>
PURIFY_HD A pow2(int e) {
  using lim = FloatLimits<A>;
  using B = typename lim::Bits;
  if (e >= lim::min_exponent - 1) return from_bits<A>(static_cast<B>(e + lim::max_exponent - 1) << lim::mantissa_bits);
  return from_bits<A>(B{1} << (e - (lim::min_exponent - 1 - lim::mantissa_bits)));
}

template <typename T>
PURIFY_HD T unit_roundoff();
template <>
PURIFY_HD float unit_roundoff<float>() { return 1.1920929e-07f; }
template <>
PURIFY_HD double unit_roundoff<double>() { return 2.220446049250313e-16; }

// ---- the factorization ------------------------------------------------------------------
//
// For G = A + eps I with A positive semi-definite, in exact arithmetic every pivot is >= eps.
// In precision u a pivot d is resolved only down to rel G_jj (rel = 4 K u); below that it is
// rounding noise. The rule ("drop dependent directions"), per pivot j (pivot_root):
//  - d > max(eps, rel G_jj): exact math, r = sqrt(d);
//  - else, where eps >= rel G_jj: the regularization is resolvable, r = sqrt(eps) (exact math);
//  - else (d <= rel G_jj > eps: direction j is dependent on earlier ones below this
//    precision's resolution), or d is NaN: the direction is dropped, r = sqrt(G_jj) / u, so its
//    coefficient and the entries below it are ~u times their size (finite, no squaring). A
//    direction in the span of the others adds nothing to the span, so y changes by O(eps/|z|^2);
//    a noise-level pivot instead would make its coefficient noise / floor, O(|x|) or larger.
//
// The rule holds only if the directions already factored are themselves well apart: the noise
// in a later pivot grows with the coefficients that express that direction in the earlier
// ones, which are large when two earlier directions are nearly parallel (even where the span
// as a whole is well conditioned: errors up to 0.27 |x| at span condition 1.4 without it).
// So the factorization pivots lazily: the next direction is the remaining one of lowest index
// unless the part of it that the factored directions do not span is below kPivotFraction of
// its G_jj (pivot_key); then it is the remaining one with the largest such fraction (ties: the
// lowest index). Directions far apart (every pivot above the fraction) keep index order.
//
// Each entry is also clamped to its exact-math bound sqrt(G_ii - sum_{p<j} L_ip^2)
// (Cauchy-Schwarz on the Schur complement), which rounding otherwise exceeds (by up to 1% in
// float32 with dependent directions): the factor stays within the bounds exact math obeys.
// A NaN in z (NaN G_jj) keeps r NaN: only the outputs computed from that z are NaN.
// Operation order is mirrored exactly by warp_cholesky (cuda/purify_kernels.cuh); the rule also
// by regularized_cholesky (purified_ops/reference.py).

// The fraction of G_jj below which a remaining pivot is passed over for a larger one.
template <typename T>
PURIFY_HD T pivot_fraction() { return T(0.25); }

// A remaining direction's key for pivoting: its remaining pivot over G_jj; NaN counts as -1,
// so a NaN row never wins a comparison and every backend breaks ties alike.
template <typename T>
PURIFY_HD T pivot_key(T rem, T gjj) {
  const T k = rem / gjj;
  return k == k ? k : T(-1);
}

// The factor's diagonal entry for a pivot d of a direction with G_jj = gjj (the rule above).
template <typename T>
PURIFY_HD T pivot_root(T d, T gjj, T eps, T rel) {
  const T relf = rel * gjj;
  const bool dropped = d != d || (relf > eps && d <= relf);
  return dropped ? std::sqrt(gjj) / unit_roundoff<T>() : std::sqrt(d > eps ? d : eps);
}

template <typename T>
PURIFY_HD void swap_values(T& a, T& b) {
  const T t = a;
  a = b;
  b = t;
}

// Exchanges positions t < p of the partly factored matrix in the lower triangle of `a`: rows t
// and p trade their factor entries (columns < t) and, of the symmetric remainder (rows and
// columns >= t), rows and columns t and p trade places.
template <typename T>
PURIFY_HD void swap_positions(T* a, int K, int t, int p) {
  for (int s = 0; s < t; ++s) swap_values(a[t * K + s], a[p * K + s]);
  swap_values(a[t * K + t], a[p * K + p]);
  for (int s = t + 1; s < p; ++s) swap_values(a[s * K + t], a[p * K + s]);
  for (int s = p + 1; s < K; ++s) swap_values(a[s * K + t], a[s * K + p]);
}

// In place: the lower triangle of the row-major K x K matrix `a` (holding G) becomes the
// Cholesky factor L of G in pivot order (P G P^T = L L^T, L lower triangular; the strict upper
// triangle is set to zero), and order[t] the direction factored at step t (P's rows).
template <typename T>
PURIFY_HD void cholesky_inplace(T* a, int K, T eps, int* order) {
  const T rel = T(4) * T(K) * unit_roundoff<T>();
  for (int i = 0; i < K; ++i) order[i] = i;
  for (int j = 0; j < K; ++j) {
    // The remaining direction of lowest index, its pivot, and whether it is kept in turn.
    int piv = j;
    for (int i = j + 1; i < K; ++i)
      if (order[i] < order[piv]) piv = i;
    T d = a[piv * K + piv];
    for (int p = 0; p < j; ++p) d -= a[piv * K + p] * a[piv * K + p];
    T best = pivot_key(d, a[piv * K + piv]);
    if (!(best >= pivot_fraction<T>())) {
      const int natural = piv;
      for (int i = j; i < K; ++i) {
        if (i == natural) continue;
        T di = a[i * K + i];
        for (int p = 0; p < j; ++p) di -= a[i * K + p] * a[i * K + p];
        const T ki = pivot_key(di, a[i * K + i]);
        if (ki > best || (ki == best && order[i] < order[piv])) {
          best = ki;
          piv = i;
          d = di;
        }
      }
    }
    if (piv != j) {
      swap_positions(a, K, j, piv);
      swap_values(order[j], order[piv]);
    }
    const T gjj = a[j * K + j];
    const T r = pivot_root(d, gjj, eps, rel);
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

// The factor as the ops return it (`chol`): row i is direction i's row of L, M = P^T L, so
// that M M^T = G in direction order. Where no pivoting happened (order[t] = t) M is L.
template <typename T>
PURIFY_HD void factor_rows_by_direction(const T* L, const int* order, int K, T* M) {
  for (int t = 0; t < K; ++t)
    for (int s = 0; s < K; ++s) M[order[t] * K + s] = L[t * K + s];
}

// The inverse, for a factor read back (the backward): direction i was factored at the step of
// its row's last nonzero entry (its pivot: > 0, or NaN). Every entry of `order` is a valid
// index whatever M holds (a matrix that is no such factor gives a wrong order, never a bad one).
template <typename T>
PURIFY_HD void factor_order(const T* M, int K, int* order) {
  for (int t = 0; t < K; ++t) order[t] = t;
  for (int i = 0; i < K; ++i) {
    int step = 0;
    for (int s = K - 1; s > 0; --s)
      if (M[i * K + s] != T(0)) {
        step = s;
        break;
      }
    order[step] = i;
  }
}

// L in pivot order (rows order[t] of M); a valid order keeps it lower triangular.
template <typename T>
PURIFY_HD void factor_in_pivot_order(const T* M, const int* order, int K, T* L) {
  for (int t = 0; t < K; ++t)
    for (int s = 0; s < K; ++s) L[t * K + s] = s <= t ? M[order[t] * K + s] : T(0);
}

// In place: b <- (L L^T)^{-1} b for a factor L in pivot order (written by cholesky_inplace).
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

// In place: b <- G^{-1} b in direction order, for P G P^T = L L^T; `work` holds K values.
template <typename T>
PURIFY_HD void pivoted_solve_inplace(const T* L, const int* order, int K, T* b, T* work) {
  for (int t = 0; t < K; ++t) work[t] = b[order[t]];
  cholesky_solve_inplace(L, K, work);
  for (int t = 0; t < K; ++t) b[order[t]] = work[t];
}

// ---- the scale of a direction set ---------------------------------------------------------
//
// The op is invariant to scaling Z (eps aside): with Z' = Z / m and eps' = eps / m^2,
// G' = G / m^2, c' = G'^{-1} Z' x = m c and Z'^T c' = Z^T c. For a power of two m every one of
// those is exact wherever nothing overflows or underflows, so results are bitwise what they are
// unscaled. The kernels compute unscaled and, where a factor or a solution comes out
// non-finite from finite inputs (|z|^2 or z.x overflowed: |z| from ~1e19 in float32, ~1e154 in
// float64), redo the set scaled by direction_scale's m; the reference always scales by it.
//
// m = 2^e brings the largest |z| entry (amax, in [2^E, 2^(E+1))) to [1, 2) (e = E), but no
// further than keeps eps / m^2 a normal number (e <= e_eps), unless more is needed to keep
// D m^-2 amax^2 (a bound on every Gram entry and partial sum) below 2^(emax - 2) (e >= e_min),
// where eps' is floored at the smallest normal number. Never below 1 (e >= 0): tiny z
// underflows only where its contribution is below eps's anyway.
template <typename A>
struct DirectionScale {
  A m, inv_m, eps;  // m = 2^e, 1 / m, eps' = max(eps / m^2, smallest normal)
};

template <typename A>
PURIFY_HD DirectionScale<A> direction_scale(A amax, int64_t D, A eps) {
  using lim = FloatLimits<A>;
  int e = 0;
  if (amax <= lim::largest && amax > A(0)) {  // NaN and Inf: no scale (the result is NaN anyway)
    const int E = floor_log2(amax);             // amax in [2^E, 2^(E+1)) (only its sign matters if subnormal)
    const int ke = floor_log2(eps) + 1;         // eps >= smallest normal = 2^(min_exponent - 1)
    const int e_eps = (ke - lim::min_exponent) / 2;  // eps * 2^(-2 e_eps) >= 2^(min_exponent - 1)
    int log2_d = 0;
    while (log2_d < 62 && (int64_t{1} << log2_d) < D) ++log2_d;
    const int e_min = E + 1 - ((lim::max_exponent - 3) - log2_d) / 2;
    const int want = e_eps > e_min ? e_eps : e_min;
    e = E < want ? E : want;
    if (e < 0) e = 0;
  }
  DirectionScale<A> s;
  s.m = pow2<A>(e);
  s.inv_m = pow2<A>(-e);
  // eps 2^(-2e) in two exact steps where it is normal; below, both it and this are floored.
  const A scaled = eps * s.inv_m * s.inv_m;
  s.eps = scaled >= lim::smallest_normal ? scaled : lim::smallest_normal;
  return s;
}

// m = 2^E bringing the largest |z| entry to [1, 2) (never below 1), eps' unset: the backward's
// scale, which divides a factor read back instead of refactoring, so eps plays no part.
template <typename A>
PURIFY_HD DirectionScale<A> normalizing_scale(A amax) {
  int e = 0;
  if (amax <= FloatLimits<A>::largest && amax > A(0)) {
    const int E = floor_log2(amax);
    e = E > 0 ? E : 0;
  }
  DirectionScale<A> s;
  s.m = pow2<A>(e);
  s.inv_m = pow2<A>(-e);
  s.eps = A(0);
  return s;
}

}  // namespace purified_ops
