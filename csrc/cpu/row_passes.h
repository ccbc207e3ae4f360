// The passes over a row that the CPU kernels are made of: the K dot products of a row with the
// directions (one pass, every direction at once) and the output y = x - sum_k w_k z_k (a second
// pass), vectorized by vector_block.h's blocks. Included by purify_cpu.cpp only, compiled once
// per CPU capability.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>

#include "../row_math.h"
#include "cache_policy.h"
#include "vector_block.h"

namespace purified_ops {
namespace {  // per CPU capability: no helper shared between capabilities' modules

using at::vec::Vectorized;

template <typename acc_t>
inline acc_t sum_lanes(const Vectorized<acc_t>& v) {
  alignas(64) acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t s = 0;
  for (int i = 0; i < Vectorized<acc_t>::size(); ++i) s += lanes[i];
  return s;
}

// out[k] = <v, dirs[k]> for k < NB, in one pass over v (two accumulator chains for latency).
// kSelf: dirs[NB - 1] is v itself (a Gram's diagonal), loaded once. V and Z are T (rows read
// in place) or accumulate_t<T> (widened rows), in T's block layout either way.
template <typename T, int NB, bool kSelf, typename V, typename Z>
inline void dots_block(const V* v, const Z* const* dirs, int64_t D, accumulate_t<T>* out) {
  using B = Block<T>;
  using AVec = typename B::AVec;
  using acc_t = accumulate_t<T>;
  constexpr int S = B::kSub;
  const Z* z[NB];
  AVec acc0[NB][S], acc1[NB][S];
  static_for<NB>([&](auto k) {
    z[k] = dirs[k];
    static_for<S>([&](auto s) { acc0[k][s] = acc1[k][s] = AVec(0); });
  });
  const auto accumulate = [&](int64_t d, AVec(&acc)[NB][S]) {
    AVec vv[S];
    B::load(v + d, vv);
    static_for<NB>([&](auto k) {
      if constexpr (kSelf && decltype(k)::value == NB - 1) {
        static_for<S>([&](auto s) { acc[k][s] = at::vec::fmadd(vv[s], vv[s], acc[k][s]); });
      } else {
        AVec zz[S];
        B::load(z[k] + d, zz);
        static_for<S>([&](auto s) { acc[k][s] = at::vec::fmadd(vv[s], zz[s], acc[k][s]); });
      }
    });
  };
  int64_t d = 0;
  for (; d + 2 * B::kSize <= D; d += 2 * B::kSize) {
    accumulate(d, acc0);
    accumulate(d + B::kSize, acc1);
  }
  if (d + B::kSize <= D) {
    accumulate(d, acc0);
    d += B::kSize;
  }
  static_for<NB>([&](auto k) {
    AVec total = acc0[k][0] + acc1[k][0];
    static_for<S - 1>([&](auto s) { total = total + acc0[k][s + 1] + acc1[k][s + 1]; });
    acc_t r = sum_lanes(total);
    for (int64_t t = d; t < D; ++t) r += static_cast<acc_t>(v[t]) * static_cast<acc_t>(z[k][t]);
    out[k] = r;
  });
}

// dots_block over n directions, at most four per pass; the last pass takes the rest.
template <typename T, bool kSelf, typename V, typename Z>
inline void dots_blocks(const V* v, const Z* const* dirs, int n, int64_t D, accumulate_t<T>* out) {
  int k = 0;
  for (; n - k > 4; k += 4) dots_block<T, 4, false>(v, dirs + k, D, out + k);
  switch (n - k) {
    case 4: dots_block<T, 4, kSelf>(v, dirs + k, D, out + k); break;
    case 3: dots_block<T, 3, kSelf>(v, dirs + k, D, out + k); break;
    case 2: dots_block<T, 2, kSelf>(v, dirs + k, D, out + k); break;
    case 1: dots_block<T, 1, kSelf>(v, dirs + k, D, out + k); break;
    default: break;
  }
}

// out[k] = <v, dirs[k]> for k < n.
template <typename T, typename V, typename Z>
inline void dots(const V* v, const Z* const* dirs, int n, int64_t D, accumulate_t<T>* out) {
  dots_blocks<T, false>(v, dirs, n, D, out);
}

// y = x - sum_k w[k] dirs[k], for K = NK directions (coefficients and pointers in registers).
template <typename T, bool kHw, int NK, typename Z>
inline void subtract_fixed(const T* x, const Z* const* dirs, const accumulate_t<T>* w, int64_t D, T* y,
                           const NextRow<T>& next, bool stream) {
  using B = Block<T, kHw>;
  using AVec = typename B::AVec;
  using acc_t = accumulate_t<T>;
  constexpr int S = B::kSub;
  const Z* z[NK];
  AVec neg_w[NK];
  static_for<NK>([&](auto k) {
    z[k] = dirs[k];
    neg_w[k] = AVec(-w[k]);
  });
  int64_t d = 0;
  for (; d + B::kSize <= D; d += B::kSize) {
    next.prefetch(d);
    AVec a[S];
    B::load(x + d, a);
    static_for<NK>([&](auto k) {
      AVec zz[S];
      B::load(z[k] + d, zz);
      static_for<S>([&](auto s) { a[s] = at::vec::fmadd(neg_w[k], zz[s], a[s]); });
    });
    B::store_to(y + d, a, stream);
  }
  for (; d < D; ++d) {
    acc_t r = static_cast<acc_t>(x[d]);
    for (int k = 0; k < NK; ++k) r = std::fma(-w[k], static_cast<acc_t>(z[k][d]), r);
    y[d] = static_cast<T>(r);
  }
}

// y = x - sum_k w[k] dirs[k], any K.
template <typename T, bool kHw, typename Z>
inline void subtract_combination(const T* x, const Z* const* dirs, const accumulate_t<T>* w, int K, int64_t D,
                                 T* y, const NextRow<T>& next, bool stream) {
  switch (K) {
    case 1: return subtract_fixed<T, kHw, 1>(x, dirs, w, D, y, next, stream);
    case 2: return subtract_fixed<T, kHw, 2>(x, dirs, w, D, y, next, stream);
    case 3: return subtract_fixed<T, kHw, 3>(x, dirs, w, D, y, next, stream);
    case 4: return subtract_fixed<T, kHw, 4>(x, dirs, w, D, y, next, stream);
    default: break;
  }
  static_assert(kMaxFixedK == 4, "subtract_combination dispatches K = 1 .. kMaxFixedK");
  using B = Block<T, kHw>;
  using AVec = typename B::AVec;
  using acc_t = accumulate_t<T>;
  int64_t d = 0;
  AVec a[B::kSub], zz[B::kSub];
  for (; d + B::kSize <= D; d += B::kSize) {
    next.prefetch(d);
    B::load(x + d, a);
    for (int k = 0; k < K; ++k) {
      const AVec neg_w(-w[k]);
      B::load(dirs[k] + d, zz);
      for (int s = 0; s < B::kSub; ++s) a[s] = at::vec::fmadd(neg_w, zz[s], a[s]);
    }
    B::store_to(y + d, a, stream);
  }
  for (; d < D; ++d) {
    acc_t r = static_cast<acc_t>(x[d]);
    for (int k = 0; k < K; ++k) r = std::fma(-w[k], static_cast<acc_t>(dirs[k][d]), r);
    y[d] = static_cast<T>(r);
  }
}

}  // namespace
}  // namespace purified_ops
