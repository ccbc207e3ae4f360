// Fused CPU kernels of purify_forward and purify_backward.
//
// Work is split into items: one z row (group) and a fixed share of the x rows it serves.
// Per item the K x K Gram of z is factored once; per x row, the K dot products are one pass
// over the row and the output is a second pass while the row is still in L1/L2, so no N x D
// intermediate is written. 16-bit inputs are widened to float32 in registers; a 16-bit z row
// is widened once per item into a per-thread float buffer (WidenedDirections), which every
// later pass reads instead of converting it again.
// dz of a z row shared by many x rows is summed in float32 (float64) per item and the item
// partials in a fixed order, so results do not depend on the thread count.
//
// The loops over D keep the directions' coefficients, pointers and accumulators in registers
// for K <= kMaxFixedK (loop bodies with compile-time indices, static_for); a larger K runs the
// same operations in the same order with run-time indices. Every output is bitwise the same
// either way: each value is computed by the same operations in the same order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../purify_host.h"
#include "../row_math.h"
#include "bf16_conversion.h"
#include "cache_policy.h"   // non-temporal stores, prefetching the next row
#include "output_cache.h"
#include "row_passes.h"     // dot products and the output pass
#include "vector_block.h"   // vector blocks, bfloat16 rounding, widened directions

namespace purified_ops {
namespace {

using at::vec::Vectorized;

// The K x K Cholesky factor of Z Z^T + eps I in pivot order, into `chol` (row-major, upper part
// zero), and its order (row_math.h's cholesky_inplace). Row a of the Gram is one pass over z_a
// per four directions, z_a itself loaded once.
template <typename T, typename Z>
inline void factor_gram(const Z* const* dirs, int K, int64_t D, accumulate_t<T> eps,
                        accumulate_t<T>* chol, int* order) {
  for (int a = 0; a < K; ++a) {
    dots_blocks<T, true>(dirs[a], dirs, a + 1, D, chol + a * K);
    chol[a * K + a] += eps;
  }
  cholesky_inplace(chol, K, eps, order);
}

template <typename A>
inline bool all_finite(const A* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(v[i])) return false;
  return true;
}

// A z row's directions divided by a power of two (row_math.h's direction_scale), for the rows
// whose factor or solution overflows unscaled. The slow path: a copy of the K x D directions,
// made at most once per work item; the fast path never touches it.
template <typename T, typename Z>
struct ScaledDirections {
  using acc_t = accumulate_t<T>;
  std::vector<Z> data;
  std::vector<const Z*> dirs;

  // The largest |z| entry of the directions.
  static acc_t largest(const Z* const* dirs, int K, int64_t D) {
    acc_t amax = 0;
    for (int k = 0; k < K; ++k)
      for (int64_t d = 0; d < D; ++d) {
        const acc_t v = std::abs(static_cast<acc_t>(dirs[k][d]));
        amax = v > amax || v != v ? v : amax;  // a NaN is kept: no scale then
      }
    return amax;
  }
  // dirs / m (exact: a power of two, within the range of Z for bfloat16, float and double; half
  // never gets here, its |z|^2 cannot overflow float).
  void assign(const Z* const* src, int K, int64_t D, acc_t inv_m) {
    data.resize(static_cast<size_t>(K) * D);
    dirs.resize(K);
    for (int k = 0; k < K; ++k) {
      Z* out = data.data() + k * D;
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<Z>(static_cast<acc_t>(src[k][d]) * inv_m);
      dirs[k] = out;
    }
  }
};

// The forward's scaled path for a work item: its directions divided by direction_scale's m
// (into `scaled`) and factored again, into L and order. Out of line, as is backward_scale: the
// rare path's code stays out of the row loops, whose dot products the compiler then inlines
// (with it inline, the forward was ~30% slower at K = 4 in the DEFAULT build).
template <typename T, typename Z>
C10_NOINLINE DirectionScale<accumulate_t<T>> forward_scale(const Z* const* dirs, int K, int64_t D,
                                                            accumulate_t<T> eps, ScaledDirections<T, Z>& scaled,
                                                            accumulate_t<T>* L, int* order) {
  const DirectionScale<accumulate_t<T>> sc = direction_scale(ScaledDirections<T, Z>::largest(dirs, K, D), D, eps);
  scaled.assign(dirs, K, D, sc.inv_m);
  factor_gram<T>(scaled.dirs.data(), K, D, sc.eps, L, order);
  return sc;
}

// The backward's scaled path: the directions divided by normalizing_scale's m (into `scaled`)
// and the factor L (K x K) by m; returns 1 / m.
template <typename T, typename Z>
C10_NOINLINE accumulate_t<T> backward_scale(const Z* const* dirs, int K, int64_t D, ScaledDirections<T, Z>& scaled,
                                            accumulate_t<T>* L) {
  const accumulate_t<T> inv_m = normalizing_scale(ScaledDirections<T, Z>::largest(dirs, K, D)).inv_m;
  scaled.assign(dirs, K, D, inv_m);
  for (int i = 0; i < K * K; ++i) L[i] *= inv_m;
  return inv_m;
}

// Items per z row: enough for any thread count we meet (>= 64 items in all), each with enough
// rows (>= 8) to amortize its K x D partial; a group's partials are summed in a fixed order.
inline int64_t cpu_chunks(const RowGrid& grid) { return chunks_per_group(grid, 64, 8); }

inline int64_t item_grain(const RowGrid& grid, int64_t chunks) {
  const int64_t rows = std::max<int64_t>(1, grid.group_size / chunks);
  const int64_t cost = rows * std::max<int64_t>(1, grid.D) * (grid.K + 2);
  return std::max<int64_t>(1, (int64_t{1} << 15) / cost);
}

// Where the rows of a range of work items live, in visiting order; used to find the next row.
struct RowCursor {
  const RowGrid& grid;
  int64_t chunks, end_item;

  // The row after (item, j) within [item, end_item), or false at the end.
  bool next(int64_t item, int64_t j, int64_t row_end, int64_t* n_item, int64_t* n_j) const {
    if (j + 1 < row_end) {
      *n_item = item;
      *n_j = j + 1;
      return true;
    }
    for (int64_t i = item + 1; i < end_item; ++i) {
      const ItemRows r = item_rows(grid, chunks, i);
      if (r.begin < r.end) {
        *n_item = i;
        *n_j = r.begin;
        return true;
      }
    }
    return false;
  }
};

// Fills `streams` with the next row's x (and grad_y when g is given) and, when its z row
// differs from the current one, its K directions (at most kMaxPrefetchedDirections of them).
template <typename T>
inline NextRow<T> next_row_streams(const RowGrid& grid, const RowCursor& cursor, int64_t item, int64_t j,
                                   int64_t row_end, int64_t group, const T* x_data, const T* g_data, const T* z_data,
                                   const T** streams) {
  NextRow<T> next{streams, 0};
  int64_t n_item, n_j;
  if (!cursor.next(item, j, row_end, &n_item, &n_j)) return next;
  const int64_t n_group = item_rows(grid, cursor.chunks, n_item).group;
  const RowOffsets go = decode_offsets(grid.group, n_group);
  const RowOffsets so = decode_offsets(grid.shared, n_j);
  streams[next.n++] = x_data + go.x + so.x;
  if (g_data != nullptr) streams[next.n++] = g_data + go.g + so.g;
  if (n_group != group)
    for (int k = 0; k < std::min(grid.K, kMaxPrefetchedDirections); ++k) streams[next.n++] = z_data + go.z + k * grid.z_dir_stride;
  return next;
}

// Runs body(Z{}), where Z is the type the kernels read directions as: the widened float rows
// (WidenedDirections) for 16-bit T where a z row fits them, else T itself.
template <typename T, typename Body>
inline void with_direction_type(int K, int64_t D, Body&& body) {
  if constexpr (WidenedDirections<T>::kWidens) {
    if (WidenedDirections<T>::fits(K, D)) return body(accumulate_t<T>{});
  }
  body(T{});
}

// The per-thread buffers of a kernel's work items, reused from item to item: Z is the type the
// directions are read as (with_direction_type).
template <typename T, typename Z_>
struct ItemBuffers {
  using Z = Z_;
  using acc_t = accumulate_t<T>;
  explicit ItemBuffers(int K)
      : z_rows(K), L(static_cast<size_t>(K) * K), solution(K), weights(K), work(K), order(K) {}
  std::vector<const T*> z_rows;
  WidenedDirections<T> widened;
  // The item's factor and its pivot order; a row's solution (c or u) and the forward's weights.
  std::vector<acc_t> L, solution, weights, work;
  std::vector<int> order;
  ScaledDirections<T, Z> scaled_dirs;
  const T* streams[kMaxPrefetchedDirections + 2];
};

// One work item, as its prologue finds it: the rows it serves, its z row's offsets, and its
// directions as the kernels read them (a 16-bit z row widened once, here).
template <typename Z>
struct WorkItem {
  int64_t index;
  ItemRows r;
  RowOffsets go;
  const Z* const* dirs;
};

// The loop both kernels share: the work items over the threads, each thread with its buffers,
// body(item, buffers, cursor) per item after the prologue; then this thread's non-temporal
// stores fenced where the kernel streams its outputs.
template <typename T, typename Body>
inline void for_each_work_item(const RowGrid& grid, int64_t chunks, const T* z_data, bool stream, Body&& body) {
  with_direction_type<T>(grid.K, grid.D, [&](auto z_type) {
    using Z = decltype(z_type);
    at::parallel_for(0, grid.groups * chunks, item_grain(grid, chunks), [&](int64_t begin, int64_t end) {
      ItemBuffers<T, Z> buffers(grid.K);
      const RowCursor cursor{grid, chunks, end};
      for (int64_t item = begin; item < end; ++item) {
        const ItemRows r = item_rows(grid, chunks, item);
        const RowOffsets go = decode_offsets(grid.group, r.group);
        const Z* const* dirs =
            buffers.widened.template directions<Z>(z_data + go.z, grid.z_dir_stride, grid.K, grid.D, buffers.z_rows);
        body(WorkItem<Z>{item, r, go, dirs}, buffers, cursor);
      }
      if (stream) fence_streaming_stores();
    });
  });
}

template <typename T, bool kHw>
void forward_kernel(const at::Tensor& x, const at::Tensor& z, double strength, double eps,
                    at::Tensor& y, at::Tensor& coeff, at::Tensor& chol) {
  using acc_t = accumulate_t<T>;
  const RowGrid grid = make_row_grid(x, z, nullptr);
  const int K = grid.K;
  const int64_t D = grid.D;
  const int64_t chunks = cpu_chunks(grid);
  const T* x_data = x.const_data_ptr<T>();
  const T* z_data = z.const_data_ptr<T>();
  T* y_data = y.mutable_data_ptr<T>();
  acc_t* coeff_data = coeff.mutable_data_ptr<acc_t>();
  acc_t* chol_data = chol.mutable_data_ptr<acc_t>();
  const acc_t s = static_cast<acc_t>(strength);
  const acc_t e = static_cast<acc_t>(eps);
  const bool stream = use_streaming_stores<T>(y_data, D, y.numel() * static_cast<int64_t>(sizeof(T)));

  for_each_work_item<T>(grid, chunks, z_data, stream, [&](const auto& it, auto& b, const RowCursor& cursor) {
    using Z = typename std::remove_reference_t<decltype(b)>::Z;
    const ItemRows& r = it.r;
    const RowOffsets& go = it.go;
    const Z* const* dirs = it.dirs;
    std::vector<acc_t>&L = b.L, &c = b.solution, &w = b.weights, &work = b.work;
    std::vector<int>& order = b.order;
    ScaledDirections<T, Z>& scaled_dirs = b.scaled_dirs;
    factor_gram<T>(dirs, K, D, e, L.data(), order.data());
    // Where the factor overflowed (|z|^2 beyond the accumulate type) or, below, a row's
    // solution did (z.x), that row and the rest of the item work with Z / m, eps / m^2
    // (row_math.h): c = c' / m, and the factor returned is m L'.
    bool scaled = false;
    acc_t m = 1, inv_m = 1;
    const auto scale_item = [&] {
      const DirectionScale<acc_t> sc = forward_scale<T>(dirs, K, D, e, scaled_dirs, L.data(), order.data());
      scaled = true;
      m = sc.m;
      inv_m = sc.inv_m;
    };
    if (!all_finite(L.data(), static_cast<int64_t>(K) * K)) scale_item();
    if (r.begin == 0) {
      acc_t* chol_out = chol_data + r.group * K * K;
      factor_rows_by_direction(L.data(), order.data(), K, chol_out);
      if (scaled)
        for (int i = 0; i < K * K; ++i) chol_out[i] *= m;
    }
    for (int64_t j = r.begin; j < r.end; ++j) {
      const RowOffsets so = decode_offsets(grid.shared, j);
      const T* xr = x_data + go.x + so.x;
      const int64_t row = go.row + so.row;
      dots<T>(xr, scaled ? scaled_dirs.dirs.data() : dirs, K, D, c.data());
      pivoted_solve_inplace(L.data(), order.data(), K, c.data(), work.data());
      if (!scaled && !all_finite(c.data(), K)) {
        scale_item();
        --j;  // the row again, scaled
        continue;
      }
      for (int k = 0; k < K; ++k) {
        const acc_t ck = scaled ? c[k] * inv_m : c[k];
        coeff_data[row * K + k] = ck;
        w[k] = s * ck;
      }
      const auto next = next_row_streams<T>(grid, cursor, it.index, j, r.end, r.group, x_data, nullptr, z_data,
                                            b.streams);
      subtract_combination<T, kHw>(xr, dirs, w.data(), K, D, y_data + row * D, next, stream);
    }
  });
}

// The elements of a backward row from d on (past its last whole block), one at a time, any K;
// returns gdotp plus their <g, p>. The same operations as a vector lane of backward_row_k,
// each multiply-add an explicit fused one (std::fma), so that no element depends on which
// products the compiler chooses to contract.
template <typename T, typename Z>
inline accumulate_t<T> backward_row_tail(int64_t d, const T* g, const T* x, const Z* const* dirs,
                                         const accumulate_t<T>* c, const accumulate_t<T>* u, int K, int64_t D,
                                         accumulate_t<T> s, T* dx, T* dz_out, int64_t dz_dir_stride,
                                         accumulate_t<T>* dz_acc, accumulate_t<T> gdotp) {
  using acc_t = accumulate_t<T>;
  for (; d < D; ++d) {
    acc_t pv = 0, qv = 0;
    for (int k = 0; k < K; ++k) {
      const acc_t zv = static_cast<acc_t>(dirs[k][d]);
      pv = std::fma(c[k], zv, pv);
      qv = std::fma(u[k], zv, qv);
    }
    const acc_t gv = static_cast<acc_t>(g[d]), xv = static_cast<acc_t>(x[d]);
    dx[d] = static_cast<T>(std::fma(-s, qv, gv));
    gdotp = std::fma(gv, pv, gdotp);
    const acc_t g_minus_q = gv - qv, x_minus_p = xv - pv;
    for (int k = 0; k < K; ++k) {
      const acc_t term = std::fma(c[k], g_minus_q, u[k] * x_minus_p);
      if (dz_out != nullptr) dz_out[k * dz_dir_stride + d] = static_cast<T>(-s * term);
      else if (dz_acc != nullptr) dz_acc[k * D + d] += term;
    }
  }
  return gdotp;
}

// One row of the backward, second pass, for K = NK directions (NK = 0: K at run time): dx =
// g - s q, the row's <g, p>, and its dz terms c (g - q)^T + u (x - p)^T, either written scaled
// by -s (dz_out, a z row of its own) or added to the float partial dz_acc (a z row shared by
// several x rows).
template <typename T, bool kHw, int NK, typename Z>
inline accumulate_t<T> backward_row_k(const T* g, const T* x, const Z* const* dirs, const accumulate_t<T>* c,
                                      const accumulate_t<T>* u, int K, int64_t D, accumulate_t<T> s, T* dx,
                                      T* dz_out, int64_t dz_dir_stride, accumulate_t<T>* dz_acc,
                                      const NextRow<T>& next, bool stream) {
  using B = Block<T, kHw>;
  using AVec = typename B::AVec;
  using acc_t = accumulate_t<T>;
  constexpr int S = B::kSub;
  constexpr int kRegs = NK > 0 ? NK : 1;  // NK = 0: the coefficients are broadcast in the loop
  const AVec neg_s(-s);
  AVec gdotp_acc(0);
  const Z* z[kRegs];
  AVec cv[kRegs], uv[kRegs];
  if constexpr (NK > 0) {
    static_for<NK>([&](auto k) {
      z[k] = dirs[k];
      cv[k] = AVec(c[k]);
      uv[k] = AVec(u[k]);
    });
  }
  // Runs f(k, c_k, u_k, z_k) for every direction, in order.
  const auto for_each_direction = [&](auto&& f) {
    if constexpr (NK > 0) {
      static_for<NK>([&](auto k) { f(k, cv[k], uv[k], z[k]); });
    } else {
      for (int k = 0; k < K; ++k) f(k, AVec(c[k]), AVec(u[k]), dirs[k]);
    }
  };
  int64_t d = 0;
  AVec gg[S], xx[S], p[S], q[S], g_minus_q[S], x_minus_p[S], out[S];
  for (; d + B::kSize <= D; d += B::kSize) {
    next.prefetch(d);
    B::load(g + d, gg);
    B::load(x + d, xx);
    for (int t = 0; t < S; ++t) p[t] = q[t] = AVec(0);
    for_each_direction([&](auto, const AVec& ck, const AVec& uk, const Z* zk) {
      AVec zz[S];
      B::load(zk + d, zz);
      for (int t = 0; t < S; ++t) {
        p[t] = at::vec::fmadd(ck, zz[t], p[t]);
        q[t] = at::vec::fmadd(uk, zz[t], q[t]);
      }
    });
    for (int t = 0; t < S; ++t) {
      out[t] = at::vec::fmadd(neg_s, q[t], gg[t]);
      gdotp_acc = at::vec::fmadd(gg[t], p[t], gdotp_acc);
      g_minus_q[t] = gg[t] - q[t];
      x_minus_p[t] = xx[t] - p[t];
    }
    B::store_to(dx + d, out, stream);
    if (dz_out != nullptr) {
      for_each_direction([&](auto k, const AVec& ck, const AVec& uk, const Z*) {
        for (int t = 0; t < S; ++t) out[t] = neg_s * at::vec::fmadd(ck, g_minus_q[t], uk * x_minus_p[t]);
        B::store_to(dz_out + k * dz_dir_stride + d, out, stream);
      });
    } else if (dz_acc != nullptr) {
      for_each_direction([&](auto k, const AVec& ck, const AVec& uk, const Z*) {
        acc_t* a = dz_acc + k * D + d;
        for (int t = 0; t < S; ++t) {
          const int64_t o = t * AVec::size();
          (AVec::loadu(a + o) + at::vec::fmadd(ck, g_minus_q[t], uk * x_minus_p[t])).store(a + o);
        }
      });
    }
  }
  return backward_row_tail(d, g, x, dirs, c, u, K, D, s, dx, dz_out, dz_dir_stride, dz_acc, sum_lanes(gdotp_acc));
}

template <typename T, bool kHw, typename Z>
inline accumulate_t<T> backward_row(const T* g, const T* x, const Z* const* dirs, const accumulate_t<T>* c,
                                    const accumulate_t<T>* u, int K, int64_t D, accumulate_t<T> s, T* dx,
                                    T* dz_out, int64_t dz_dir_stride, accumulate_t<T>* dz_acc,
                                    const NextRow<T>& next, bool stream) {
  static_assert(kMaxFixedK == 4, "backward_row dispatches K = 1 .. kMaxFixedK");
  switch (K) {
    case 1: return backward_row_k<T, kHw, 1>(g, x, dirs, c, u, K, D, s, dx, dz_out, dz_dir_stride, dz_acc, next, stream);
    case 2: return backward_row_k<T, kHw, 2>(g, x, dirs, c, u, K, D, s, dx, dz_out, dz_dir_stride, dz_acc, next, stream);
    case 3: return backward_row_k<T, kHw, 3>(g, x, dirs, c, u, K, D, s, dx, dz_out, dz_dir_stride, dz_acc, next, stream);
    case 4: return backward_row_k<T, kHw, 4>(g, x, dirs, c, u, K, D, s, dx, dz_out, dz_dir_stride, dz_acc, next, stream);
    default: return backward_row_k<T, kHw, 0>(g, x, dirs, c, u, K, D, s, dx, dz_out, dz_dir_stride, dz_acc, next, stream);
  }
}

template <typename T, bool kHw>
void backward_kernel(const at::Tensor& g, const at::Tensor& x, const at::Tensor& z,
                     double strength, const at::Tensor& coeff, const at::Tensor& chol,
                     at::Tensor& dx, at::Tensor* dz, at::Tensor& ds) {
  using acc_t = accumulate_t<T>;
  const RowGrid grid = make_row_grid(x, z, &g);
  const int K = grid.K;
  const int64_t D = grid.D;
  const int64_t chunks = cpu_chunks(grid);
  const int64_t items = grid.groups * chunks;
  const bool direct_dz = dz != nullptr && grid.group_size == 1;
  const T* g_data = g.const_data_ptr<T>();
  const T* x_data = x.const_data_ptr<T>();
  const T* z_data = z.const_data_ptr<T>();
  const acc_t* coeff_data = coeff.const_data_ptr<acc_t>();
  const acc_t* chol_data = chol.const_data_ptr<acc_t>();
  T* dx_data = dx.mutable_data_ptr<T>();
  T* dz_data = dz != nullptr ? dz->mutable_data_ptr<T>() : nullptr;
  const acc_t s = static_cast<acc_t>(strength);

  // Per-item partial sums: <g, p> always, and dz (K x D each) for z rows shared by rows.
  std::vector<acc_t> gdotp_part(items);
  const bool partial_dz = dz != nullptr && !direct_dz;
  // dx and a directly written dz (as large as x, times K) share one decision.
  const bool stream = use_streaming_stores<T>(dx_data, D, dx.numel() * static_cast<int64_t>(sizeof(T))) &&
                      (!direct_dz || reinterpret_cast<uintptr_t>(dz_data) % sizeof(Vectorized<T>) == 0);
  at::Tensor dz_part;
  acc_t* dz_part_data = nullptr;
  if (partial_dz) {
    dz_part = at::zeros({items, K, D}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    dz_part_data = dz_part.mutable_data_ptr<acc_t>();
  }

  for_each_work_item<T>(grid, chunks, z_data, stream, [&](const auto& it, auto& b, const RowCursor& cursor) {
    using Z = typename std::remove_reference_t<decltype(b)>::Z;
    const ItemRows& r = it.r;
    const RowOffsets& go = it.go;
    const Z* const* dirs = it.dirs;
    std::vector<acc_t>&L = b.L, &u = b.solution, &work = b.work;
    std::vector<int>& order = b.order;
    ScaledDirections<T, Z>& scaled_dirs = b.scaled_dirs;
    const acc_t* chol_m = chol_data + r.group * K * K;
    factor_order(chol_m, K, order.data());
    factor_in_pivot_order(chol_m, order.data(), K, L.data());
    // Where a row's Z g overflows, that row and the rest of the item solve with Z / m and
    // L / m (m a power of two bringing the largest |z| entry to [1, 2)): u = u' / m.
    bool scaled = false;
    acc_t inv_m = 1;
    acc_t* acc_dz = partial_dz ? dz_part_data + it.index * K * D : nullptr;
    acc_t gdotp_sum = 0;
    for (int64_t j = r.begin; j < r.end; ++j) {
      const RowOffsets so = decode_offsets(grid.shared, j);
      const T* gr = g_data + go.g + so.g;
      const T* xr = x_data + go.x + so.x;
      const int64_t row = go.row + so.row;
      dots<T>(gr, scaled ? scaled_dirs.dirs.data() : dirs, K, D, u.data());
      pivoted_solve_inplace(L.data(), order.data(), K, u.data(), work.data());
      if (!scaled && !all_finite(u.data(), K)) {
        inv_m = backward_scale<T>(dirs, K, D, scaled_dirs, L.data());
        scaled = true;
        --j;  // the row again, scaled
        continue;
      }
      if (scaled)
        for (int k = 0; k < K; ++k) u[k] *= inv_m;
      T* dz_row = direct_dz ? dz_data + r.group * K * D : nullptr;
      const auto next = next_row_streams<T>(grid, cursor, it.index, j, r.end, r.group, x_data, g_data, z_data,
                                            b.streams);
      gdotp_sum += backward_row<T, kHw>(gr, xr, dirs, coeff_data + row * K, u.data(), K, D, s,
                                        dx_data + row * D, dz_row, D, acc_dz, next, stream);
    }
    gdotp_part[it.index] = gdotp_sum;
  });

  if (partial_dz) {
    // dz[m] = -s * sum over the group's items, in item order, for fixed-size column blocks.
    constexpr int64_t kCols = 256;
    const int64_t col_blocks = (static_cast<int64_t>(K) * D + kCols - 1) / kCols;
    at::parallel_for(0, grid.groups * col_blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(kCols);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t m = t / col_blocks;
        const int64_t lo = (t % col_blocks) * kCols;
        const int64_t hi = std::min<int64_t>(lo + kCols, static_cast<int64_t>(K) * D);
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t c = 0; c < chunks; ++c) {
          const acc_t* part = dz_part_data + (m * chunks + c) * K * D;
          for (int64_t i = lo; i < hi; ++i) sum[i - lo] += part[i];
        }
        T* out = dz_data + m * K * D;
        for (int64_t i = lo; i < hi; ++i) out[i] = static_cast<T>(-s * sum[i - lo]);
      }
    });
  }

  acc_t gdotp_total = 0;
  for (const acc_t v : gdotp_part) gdotp_total += v;
  ds.fill_(-gdotp_total);
}

// Runs run(std::bool_constant<kHw>{}) with kHw true where 16-bit outputs of type T round with the
// CPU's bfloat16 conversion (bf16_hardware_conversion()), else false.
template <typename T, typename Run>
inline void with_bf16_conversion(Run&& run) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (bf16_hardware_conversion()) return run(std::true_type{});
  }
#endif
  run(std::false_type{});
}

at::Tensor cached_output(at::IntArrayRef sizes, at::ScalarType dtype, const at::Tensor&) {
  return empty_cpu_output(sizes, dtype);
}

// The value of a checked strength: the number, or the 0-dim float or double CPU tensor read in
// place (item() would dispatch an op on every call).
double strength_value(Strength strength) {
  const at::Tensor* s = strength.tensor();
  if (s == nullptr) return strength.value();
  if (s->is_neg()) return s->item<double>();  // a lazily negated view
  return s->scalar_type() == at::kDouble ? *s->const_data_ptr<double>()
                                         : static_cast<double>(*s->const_data_ptr<float>());
}

// The forward into given outputs, for checked arguments (x and z with unit last stride); the
// functional and the _out op differ only in where the outputs come from. A layout the row grid
// cannot address runs grouped (forward_in_row_grid, purify_host.h).
void forward_into(const at::Tensor& x, const at::Tensor& z, Strength strength, double eps,
                  at::Tensor& y, at::Tensor& coeff, at::Tensor& chol) {
  if (x.numel() == 0 && x.size(-1) != 0) {
    chol.zero_();  // no rows: nothing reads the factor, but it is defined
    return;
  }
  const double s = strength_value(strength);
  forward_in_row_grid(x, z, y, coeff, chol, [&](const at::Tensor& xr, const at::Tensor& zr, at::Tensor& yr,
                                                at::Tensor& coeffr, at::Tensor& cholr) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "purify_forward_cpu", [&] {
      with_bf16_conversion<scalar_t>([&](auto hw) {
        forward_kernel<scalar_t, decltype(hw)::value>(xr, zr, s, eps, yr, coeffr, cholr);
      });
    });
  });
}

void backward_into(const at::Tensor& g, const at::Tensor& x, const at::Tensor& z, const at::Tensor& strength,
                   const at::Tensor& coeff, const at::Tensor& chol, bool compute_grad_z, at::Tensor& dx,
                   at::Tensor& dz, at::Tensor& ds) {
  const double s = strength_value(strength);
  backward_in_row_grid(g, x, z, coeff, chol, compute_grad_z, dx, dz,
                       [&](const at::Tensor& gr, const at::Tensor& xr, const at::Tensor& zr, const at::Tensor& coeffr,
                           const at::Tensor& cholr, at::Tensor& dxr, at::Tensor& dzr) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "purify_backward_cpu", [&] {
      with_bf16_conversion<scalar_t>([&](auto hw) {
        backward_kernel<scalar_t, decltype(hw)::value>(gr, xr, zr, s, coeffr, cholr, dxr,
                                                       compute_grad_z ? &dzr : nullptr, ds);
      });
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x_in, const at::Tensor& z_in,
                                                           Strength strength, double eps) {
  check_forward_args("purify_forward", x_in, z_in, strength, eps, c10::DeviceType::CPU);
  const at::Tensor x = unit_last_stride(x_in);
  const at::Tensor z = unit_last_stride(z_in);
  auto [y, coeff, chol] = allocate_forward_outputs(x, z, cached_output);
  forward_into(x, z, strength, eps, y, coeff, chol);
  return {y, coeff, chol};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> purify_forward_cpu(const at::Tensor& x, const at::Tensor& z,
                                                                 const at::Tensor& strength, double eps) {
  return forward_cpu(x, z, strength, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> purify_forward_float_cpu(const at::Tensor& x, const at::Tensor& z,
                                                                       double strength, double eps) {
  return forward_cpu(x, z, Strength(strength), eps);
}

void purify_forward_out_cpu(const at::Tensor& x_in, const at::Tensor& z_in, const at::Tensor& strength,
                            double eps, at::Tensor& y, at::Tensor& coeff, at::Tensor& chol) {
  check_forward_args("purify_forward_out", x_in, z_in, strength, eps, c10::DeviceType::CPU);
  check_forward_outputs(x_in, z_in, y, coeff, chol);
  forward_into(unit_last_stride(x_in), unit_last_stride(z_in), strength, eps, y, coeff, chol);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> purify_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& z_in, const at::Tensor& strength,
    const at::Tensor& coeff, const at::Tensor& chol, bool compute_grad_z) {
  check_backward_args("purify_backward", grad_y_in, x_in, z_in, strength, coeff, chol, c10::DeviceType::CPU);
  const at::Tensor g = unit_last_stride(grad_y_in);
  const at::Tensor x = unit_last_stride(x_in);
  const at::Tensor z = unit_last_stride(z_in);
  auto [dx, dz, ds] = allocate_backward_outputs(x, z, compute_grad_z, cached_output);
  backward_into(g, x, z, strength, coeff, chol, compute_grad_z, dx, dz, ds);
  return {dx, dz, ds};
}

void purify_backward_out_cpu(const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& z_in,
                             const at::Tensor& strength, const at::Tensor& coeff, const at::Tensor& chol,
                             bool compute_grad_z, at::Tensor& dx, at::Tensor& dz, at::Tensor& ds) {
  check_backward_args("purify_backward_out", grad_y_in, x_in, z_in, strength, coeff, chol, c10::DeviceType::CPU);
  check_backward_outputs(x_in, z_in, compute_grad_z, dx, dz, ds);
  backward_into(unit_last_stride(grad_y_in), unit_last_stride(x_in), unit_last_stride(z_in), strength, coeff,
                chol, compute_grad_z, dx, dz, ds);
}

}  // namespace

// The CPU kernels of the ops; the other registrations are listed at the top of csrc/purify.cpp.
TORCH_LIBRARY_IMPL(purified_ops, CPU, m) {
  m.impl("purify_forward", &purify_forward_cpu);
  m.impl("purify_forward.float_strength", &purify_forward_float_cpu);
  m.impl("purify_backward", &purify_backward_cpu);
  m.impl("purify_forward_out", &purify_forward_out_cpu);
  m.impl("purify_backward_out", &purify_backward_out_cpu);
}

}  // namespace purified_ops
