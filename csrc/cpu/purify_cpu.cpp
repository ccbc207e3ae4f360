// Fused CPU kernels of purify_forward and purify_backward.
//
// Work is split into items: one z row (group) and a fixed share of the x rows it serves.
// Per item the K x K Gram of z is factored once; per x row, the K dot products are one pass
// over the row and the output is a second pass while the row is still in L1/L2, so no N x D
// intermediate is written. 16-bit inputs are widened to float32 in registers only.
// dz of a z row shared by many x rows is summed in float32 (float64) per item and the item
// partials in a fixed order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include <vector>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "../purify_host.h"
#include "../row_math.h"
#include "output_cache.h"

namespace purified_ops {
namespace {

using at::vec::Vectorized;

// Loads and stores one block of T as accumulate-type vectors (two for 16-bit T).
template <typename T>
struct Block {
  using acc_t = accumulate_t<T>;
  using AVec = Vectorized<acc_t>;
  static constexpr int64_t kSize = Vectorized<T>::size();
  static constexpr int kSub = static_cast<int>(kSize / AVec::size());

  static inline void load(const T* p, AVec* out) {
    if constexpr (kSub == 1) {
      out[0] = AVec::loadu(p);
    } else {
      auto halves = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
      out[0] = std::get<0>(halves);
      out[1] = std::get<1>(halves);
    }
  }
  static inline void store(T* p, const AVec* in) {
    if constexpr (kSub == 1) {
      in[0].store(p);
    } else {
      at::vec::convert_from_float<T>(in[0], in[1]).store(p);
    }
  }
  // A non-temporal store (p aligned to the vector size): the line is written without first
  // being read, a third less traffic for outputs that will not be read again from cache.
  static inline void store_stream(T* p, const AVec* in) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      _mm512_stream_ps(p, in[0]);
    } else if constexpr (std::is_same_v<T, double>) {
      _mm512_stream_pd(p, in[0]);
    } else {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p), at::vec::convert_from_float<T>(in[0], in[1]));
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      _mm256_stream_ps(p, in[0]);
    } else if constexpr (std::is_same_v<T, double>) {
      _mm256_stream_pd(p, in[0]);
    } else {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), at::vec::convert_from_float<T>(in[0], in[1]));
    }
#else
    store(p, in);
#endif
  }
  static inline void store_to(T* p, const AVec* in, bool stream) {
    if (stream) {
      store_stream(p, in);
    } else {
      store(p, in);
    }
  }
};

// The last-level cache as the OS reports it (a VM's share can be far below what cpuid says).
inline int64_t last_level_cache_bytes() {
  if (FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
    long kib = 0;
    const int n = std::fscanf(f, "%ldK", &kib);
    std::fclose(f);
    if (n == 1 && kib > 0) return static_cast<int64_t>(kib) << 10;
  }
  const long v = sysconf(_SC_LEVEL3_CACHE_SIZE);
  return v > 0 ? static_cast<int64_t>(v) : int64_t{8} << 20;
}

// Whether to write outputs with non-temporal stores: only when they are larger than half the
// last-level cache (smaller ones are better left in cache for their consumer) and every row
// starts on a vector boundary.
template <typename T>
bool use_streaming_stores(const void* out, int64_t D, int64_t total_bytes) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  // PURIFIED_OPS_STREAMING_STORES=0 or 1 overrides the size rule (read once).
  static const int forced = [] {
    const char* v = std::getenv("PURIFIED_OPS_STREAMING_STORES");
    return v == nullptr ? -1 : std::string(v) == "0" ? 0 : std::string(v) == "1" ? 1 : -1;
  }();
  if (forced == 0) return false;
  const bool always = forced == 1;
  static const int64_t llc = last_level_cache_bytes();
  constexpr int64_t kVecBytes = static_cast<int64_t>(sizeof(Vectorized<T>));
  return (always || total_bytes > llc / 2) && reinterpret_cast<uintptr_t>(out) % kVecBytes == 0 &&
         (D * static_cast<int64_t>(sizeof(T))) % kVecBytes == 0;
#else
  (void)out, (void)D, (void)total_bytes;
  return false;
#endif
}

// Orders this thread's non-temporal stores before anything after the parallel region.
inline void fence_streaming_stores() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// The next row's input streams, prefetched a cache line at a time during the current row's
// second pass: that pass reads only what the first pass brought into L1/L2, so without this
// the memory system would idle while it runs.
// Directions of the next z row prefetched (every K is served; beyond this many the rest come
// in on demand): with x and grad_y, at most this + 2 streams.
constexpr int kMaxPrefetchedDirections = 16;

template <typename T>
struct NextRow {
  static constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(T));
  const T* const* streams = nullptr;
  int n = 0;
  inline void prefetch(int64_t d) const {
    if ((d & (kLine - 1)) == 0)
      for (int i = 0; i < n; ++i) __builtin_prefetch(streams[i] + d, 0, 3);
  }
};

template <typename acc_t>
inline acc_t sum_lanes(const Vectorized<acc_t>& v) {
  alignas(64) acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t s = 0;
  for (int i = 0; i < Vectorized<acc_t>::size(); ++i) s += lanes[i];
  return s;
}

// out[k] = <v, dirs[k]> for k < NB, in one pass over v (two accumulator chains for latency).
template <typename T, int NB>
inline void dots_block(const T* v, const T* const* dirs, int64_t D, accumulate_t<T>* out) {
  using B = Block<T>;
  using AVec = typename B::AVec;
  AVec acc0[NB][B::kSub], acc1[NB][B::kSub];
  for (int k = 0; k < NB; ++k)
    for (int s = 0; s < B::kSub; ++s) acc0[k][s] = acc1[k][s] = AVec(0);
  int64_t d = 0;
  AVec vv[B::kSub], zz[B::kSub];
  for (; d + 2 * B::kSize <= D; d += 2 * B::kSize) {
    B::load(v + d, vv);
    for (int k = 0; k < NB; ++k) {
      B::load(dirs[k] + d, zz);
      for (int s = 0; s < B::kSub; ++s) acc0[k][s] = at::vec::fmadd(vv[s], zz[s], acc0[k][s]);
    }
    B::load(v + d + B::kSize, vv);
    for (int k = 0; k < NB; ++k) {
      B::load(dirs[k] + d + B::kSize, zz);
      for (int s = 0; s < B::kSub; ++s) acc1[k][s] = at::vec::fmadd(vv[s], zz[s], acc1[k][s]);
    }
  }
  if (d + B::kSize <= D) {
    B::load(v + d, vv);
    for (int k = 0; k < NB; ++k) {
      B::load(dirs[k] + d, zz);
      for (int s = 0; s < B::kSub; ++s) acc0[k][s] = at::vec::fmadd(vv[s], zz[s], acc0[k][s]);
    }
    d += B::kSize;
  }
  for (int k = 0; k < NB; ++k) {
    AVec total = acc0[k][0] + acc1[k][0];
    for (int s = 1; s < B::kSub; ++s) total = total + acc0[k][s] + acc1[k][s];
    accumulate_t<T> r = sum_lanes(total);
    for (int64_t t = d; t < D; ++t)
      r += static_cast<accumulate_t<T>>(v[t]) * static_cast<accumulate_t<T>>(dirs[k][t]);
    out[k] = r;
  }
}

// out[k] = <v, dirs[k]> for k < n, directions taken four at a time.
template <typename T>
inline void dots(const T* v, const T* const* dirs, int n, int64_t D, accumulate_t<T>* out) {
  int k = 0;
  for (; k + 4 <= n; k += 4) dots_block<T, 4>(v, dirs + k, D, out + k);
  for (; k + 2 <= n; k += 2) dots_block<T, 2>(v, dirs + k, D, out + k);
  if (k < n) dots_block<T, 1>(v, dirs + k, D, out + k);
}

// y = x - sum_k w[k] dirs[k]
template <typename T>
inline void subtract_combination(const T* x, const T* const* dirs, const accumulate_t<T>* w,
                                 int K, int64_t D, T* y, const NextRow<T>& next, bool stream) {
  using B = Block<T>;
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

// The K x K Cholesky factor of Z Z^T + eps I in pivot order, into `chol` (row-major, upper part
// zero), and its order (row_math.h's cholesky_inplace).
template <typename T>
inline void factor_gram(const T* const* dirs, int K, int64_t D, accumulate_t<T> eps,
                        accumulate_t<T>* chol, int* order) {
  for (int a = 0; a < K; ++a) {
    dots(dirs[a], dirs, a + 1, D, chol + a * K);
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
template <typename T>
struct ScaledDirections {
  using acc_t = accumulate_t<T>;
  std::vector<T> data;
  std::vector<const T*> dirs;

  // The largest |z| entry of the directions.
  static acc_t largest(const T* const* dirs, int K, int64_t D) {
    acc_t amax = 0;
    for (int k = 0; k < K; ++k)
      for (int64_t d = 0; d < D; ++d) {
        const acc_t v = std::abs(static_cast<acc_t>(dirs[k][d]));
        amax = v > amax || v != v ? v : amax;  // a NaN is kept: no scale then
      }
    return amax;
  }
  // dirs / m (exact: a power of two, within the range of T for bfloat16, float and double; half
  // never gets here, its |z|^2 cannot overflow float).
  void assign(const T* const* src, int K, int64_t D, acc_t inv_m) {
    data.resize(static_cast<size_t>(K) * D);
    dirs.resize(K);
    for (int k = 0; k < K; ++k) {
      T* out = data.data() + k * D;
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(static_cast<acc_t>(src[k][d]) * inv_m);
      dirs[k] = out;
    }
  }
};

// The forward's scaled path for a work item: its directions divided by direction_scale's m
// (into `scaled`) and factored again, into L and order. Out of line, as is backward_scale: the
// rare path's code stays out of the row loops, whose dot products the compiler then inlines
// (with it inline, the forward was ~30% slower at K = 4 in the DEFAULT build).
template <typename T>
C10_NOINLINE DirectionScale<accumulate_t<T>> forward_scale(const T* const* dirs, int K, int64_t D,
                                                            accumulate_t<T> eps, ScaledDirections<T>& scaled,
                                                            accumulate_t<T>* L, int* order) {
  const DirectionScale<accumulate_t<T>> sc = direction_scale(ScaledDirections<T>::largest(dirs, K, D), D, eps);
  scaled.assign(dirs, K, D, sc.inv_m);
  factor_gram(scaled.dirs.data(), K, D, sc.eps, L, order);
  return sc;
}

// The backward's scaled path: the directions divided by normalizing_scale's m (into `scaled`)
// and the factor L (K x K) by m; returns 1 / m.
template <typename T>
C10_NOINLINE accumulate_t<T> backward_scale(const T* const* dirs, int K, int64_t D, ScaledDirections<T>& scaled,
                                            accumulate_t<T>* L) {
  const accumulate_t<T> inv_m = normalizing_scale(ScaledDirections<T>::largest(dirs, K, D)).inv_m;
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

template <typename T>
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

  at::parallel_for(0, grid.groups * chunks, item_grain(grid, chunks), [&](int64_t begin, int64_t end) {
    std::vector<const T*> dirs(K);
    std::vector<acc_t> L(static_cast<size_t>(K) * K), c(K), w(K), work(K);
    std::vector<int> order(K);
    ScaledDirections<T> scaled_dirs;
    const T* streams[kMaxPrefetchedDirections + 2];
    const RowCursor cursor{grid, chunks, end};
    for (int64_t item = begin; item < end; ++item) {
      const ItemRows r = item_rows(grid, chunks, item);
      const RowOffsets go = decode_offsets(grid.group, r.group);
      for (int k = 0; k < K; ++k) dirs[k] = z_data + go.z + k * grid.z_dir_stride;
      factor_gram(dirs.data(), K, D, e, L.data(), order.data());
      // Where the factor overflowed (|z|^2 beyond the accumulate type) or, below, a row's
      // solution did (z.x), that row and the rest of the item work with Z / m, eps / m^2
      // (row_math.h): c = c' / m, and the factor returned is m L'.
      bool scaled = false;
      acc_t m = 1, inv_m = 1;
      const auto scale_item = [&] {
        const DirectionScale<acc_t> sc = forward_scale(dirs.data(), K, D, e, scaled_dirs, L.data(), order.data());
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
        dots(xr, scaled ? scaled_dirs.dirs.data() : dirs.data(), K, D, c.data());
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
        const auto next = next_row_streams<T>(grid, cursor, item, j, r.end, r.group, x_data, nullptr, z_data, streams);
        subtract_combination(xr, dirs.data(), w.data(), K, D, y_data + row * D, next, stream);
      }
    }
    if (stream) fence_streaming_stores();
  });
}

// One row of the backward, second pass: dx = g - s q, the row's <g, p>, and its dz terms
// c (g - q)^T + u (x - p)^T, either written scaled by -s (dz_out, a z row of its own) or
// added to the float partial dz_acc (a z row shared by several x rows).
template <typename T>
inline accumulate_t<T> backward_row(const T* g, const T* x, const T* const* dirs,
                                    const accumulate_t<T>* c, const accumulate_t<T>* u,
                                    int K, int64_t D, accumulate_t<T> s, T* dx,
                                    T* dz_out, int64_t dz_dir_stride,
                                    accumulate_t<T>* dz_acc, const NextRow<T>& next,
                                    bool stream) {
  using B = Block<T>;
  using AVec = typename B::AVec;
  using acc_t = accumulate_t<T>;
  constexpr int S = B::kSub;
  const AVec neg_s(-s);
  AVec gdotp_acc(0);
  int64_t d = 0;
  AVec gg[S], xx[S], zz[S], p[S], q[S], g_minus_q[S], x_minus_p[S], out[S];
  for (; d + B::kSize <= D; d += B::kSize) {
    next.prefetch(d);
    B::load(g + d, gg);
    B::load(x + d, xx);
    for (int t = 0; t < S; ++t) p[t] = q[t] = AVec(0);
    for (int k = 0; k < K; ++k) {
      const AVec ck(c[k]), uk(u[k]);
      B::load(dirs[k] + d, zz);
      for (int t = 0; t < S; ++t) {
        p[t] = at::vec::fmadd(ck, zz[t], p[t]);
        q[t] = at::vec::fmadd(uk, zz[t], q[t]);
      }
    }
    for (int t = 0; t < S; ++t) {
      out[t] = at::vec::fmadd(neg_s, q[t], gg[t]);
      gdotp_acc = at::vec::fmadd(gg[t], p[t], gdotp_acc);
      g_minus_q[t] = gg[t] - q[t];
      x_minus_p[t] = xx[t] - p[t];
    }
    B::store_to(dx + d, out, stream);
    if (dz_out != nullptr || dz_acc != nullptr) {
      for (int k = 0; k < K; ++k) {
        const AVec ck(c[k]), uk(u[k]);
        for (int t = 0; t < S; ++t) out[t] = at::vec::fmadd(ck, g_minus_q[t], uk * x_minus_p[t]);
        if (dz_out != nullptr) {
          for (int t = 0; t < S; ++t) out[t] = neg_s * out[t];
          B::store_to(dz_out + k * dz_dir_stride + d, out, stream);
        } else {
          acc_t* a = dz_acc + k * D + d;
          for (int t = 0; t < S; ++t) {
            const int64_t o = t * AVec::size();
            (AVec::loadu(a + o) + out[t]).store(a + o);
          }
        }
      }
    }
  }
  acc_t gdotp = sum_lanes(gdotp_acc);
  for (; d < D; ++d) {
    acc_t pv = 0, qv = 0;
    for (int k = 0; k < K; ++k) {
      const acc_t zv = static_cast<acc_t>(dirs[k][d]);
      pv += c[k] * zv;
      qv += u[k] * zv;
    }
    const acc_t gv = static_cast<acc_t>(g[d]), xv = static_cast<acc_t>(x[d]);
    dx[d] = static_cast<T>(gv - s * qv);
    gdotp += gv * pv;
    for (int k = 0; k < K; ++k) {
      const acc_t term = c[k] * (gv - qv) + u[k] * (xv - pv);
      if (dz_out != nullptr) dz_out[k * dz_dir_stride + d] = static_cast<T>(-s * term);
      else if (dz_acc != nullptr) dz_acc[k * D + d] += term;
    }
  }
  return gdotp;
}

template <typename T>
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

  at::parallel_for(0, items, item_grain(grid, chunks), [&](int64_t begin, int64_t end) {
    std::vector<const T*> dirs(K);
    std::vector<acc_t> u(K), L(static_cast<size_t>(K) * K), work(K);
    std::vector<int> order(K);
    ScaledDirections<T> scaled_dirs;
    const T* streams[kMaxPrefetchedDirections + 2];
    const RowCursor cursor{grid, chunks, end};
    for (int64_t item = begin; item < end; ++item) {
      const ItemRows r = item_rows(grid, chunks, item);
      const RowOffsets go = decode_offsets(grid.group, r.group);
      for (int k = 0; k < K; ++k) dirs[k] = z_data + go.z + k * grid.z_dir_stride;
      const acc_t* chol_m = chol_data + r.group * K * K;
      factor_order(chol_m, K, order.data());
      factor_in_pivot_order(chol_m, order.data(), K, L.data());
      // Where a row's Z g overflows, that row and the rest of the item solve with Z / m and
      // L / m (m a power of two bringing the largest |z| entry to [1, 2)): u = u' / m.
      bool scaled = false;
      acc_t inv_m = 1;
      acc_t* acc_dz = partial_dz ? dz_part_data + item * K * D : nullptr;
      acc_t gdotp_sum = 0;
      for (int64_t j = r.begin; j < r.end; ++j) {
        const RowOffsets so = decode_offsets(grid.shared, j);
        const T* gr = g_data + go.g + so.g;
        const T* xr = x_data + go.x + so.x;
        const int64_t row = go.row + so.row;
        dots(gr, scaled ? scaled_dirs.dirs.data() : dirs.data(), K, D, u.data());
        pivoted_solve_inplace(L.data(), order.data(), K, u.data(), work.data());
        if (!scaled && !all_finite(u.data(), K)) {
          inv_m = backward_scale(dirs.data(), K, D, scaled_dirs, L.data());
          scaled = true;
          --j;  // the row again, scaled
          continue;
        }
        if (scaled)
          for (int k = 0; k < K; ++k) u[k] *= inv_m;
        T* dz_row = direct_dz ? dz_data + r.group * K * D : nullptr;
        const auto next = next_row_streams<T>(grid, cursor, item, j, r.end, r.group, x_data, g_data, z_data, streams);
        gdotp_sum += backward_row<T>(gr, xr, dirs.data(), coeff_data + row * K, u.data(), K, D, s,
                                     dx_data + row * D, dz_row, D, acc_dz, next, stream);
      }
      gdotp_part[item] = gdotp_sum;
    }
    if (stream) fence_streaming_stores();
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

at::Tensor cached_output(at::IntArrayRef sizes, at::ScalarType dtype, const at::Tensor&) {
  return empty_cpu_output(sizes, dtype);
}

// The forward into given outputs, for checked arguments (x and z with unit last stride); the
// functional and the _out op differ only in where the outputs come from.
void forward_into(const at::Tensor& x, const at::Tensor& z, const at::Tensor& strength, double eps,
                  at::Tensor& y, at::Tensor& coeff, at::Tensor& chol) {
  if (x.numel() == 0 && x.size(-1) != 0) {
    chol.zero_();  // no rows: nothing reads the factor, but it is defined
    return;
  }
  const double s = strength.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "purify_forward_cpu", [&] {
    forward_kernel<scalar_t>(x, z, s, eps, y, coeff, chol);
  });
}

void backward_into(const at::Tensor& g, const at::Tensor& x, const at::Tensor& z, const at::Tensor& strength,
                   const at::Tensor& coeff, const at::Tensor& chol, bool compute_grad_z, at::Tensor& dx,
                   at::Tensor& dz, at::Tensor& ds) {
  const double s = strength.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "purify_backward_cpu", [&] {
    backward_kernel<scalar_t>(g, x, z, s, coeff, chol, dx, compute_grad_z ? &dz : nullptr, ds);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> purify_forward_cpu(const at::Tensor& x_in, const at::Tensor& z_in,
                                                                 const at::Tensor& strength, double eps) {
  check_forward_args("purify_forward", x_in, z_in, strength, eps, c10::DeviceType::CPU);
  const at::Tensor x = unit_last_stride(x_in);
  const at::Tensor z = unit_last_stride(z_in);
  auto [y, coeff, chol] = allocate_forward_outputs(x, z, cached_output);
  forward_into(x, z, strength, eps, y, coeff, chol);
  return {y, coeff, chol};
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

TORCH_LIBRARY_IMPL(purified_ops, CPU, m) {
  m.impl("purify_forward", &purify_forward_cpu);
  m.impl("purify_backward", &purify_backward_cpu);
  m.impl("purify_forward_out", &purify_forward_out_cpu);
  m.impl("purify_backward_out", &purify_backward_out_cpu);
}

}  // namespace purified_ops
