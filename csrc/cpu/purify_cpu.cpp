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
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include <type_traits>
#include <utility>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "../purify_host.h"
#include "../row_math.h"
#include "bf16_conversion.h"
#include "output_cache.h"
#include "streaming_stores.h"

namespace purified_ops {
namespace {

using at::vec::Vectorized;

// Calls f(std::integral_constant<int, I>{}) for I = 0 .. N-1, in order: a loop body with
// compile-time indices, so that arrays of vectors indexed by them live in registers (with
// run-time indices the compiler keeps them in memory: a store and a load per multiply-add).
template <typename F, int... I>
inline void static_for_each(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
inline void static_for(F&& f) {
  static_for_each(f, std::make_integer_sequence<int, N>{});
}

// Directions up to this many get loops with compile-time K.
constexpr int kMaxFixedK = 4;

// For the per-vector helpers, which the compiler would otherwise sometimes call (a call per
// vector: the bfloat16 store, with its inline assembly, was not inlined).
#if defined(__GNUC__) || defined(__clang__)
#define PURIFY_VECTOR_INLINE inline __attribute__((always_inline))
#else
#define PURIFY_VECTOR_INLINE inline
#endif

#if defined(CPU_CAPABILITY_AVX512)
// VCVTNE2PS2BF16 (AVX512_BF16): 32 floats to bfloat16, rounded to nearest even. It differs from
// at::vec's rounding only where a value is subnormal (it flushes those to zero) or NaN (it keeps
// the payload; at::vec writes 0xffff). Inline assembly: the instruction runs only where
// bf16_hardware_conversion() said so, and no other code of this module is compiled for it.
PURIFY_VECTOR_INLINE __m512i bf16_hardware(const __m512& lo, const __m512& hi) {
  __m512i r;
  asm("vcvtne2ps2bf16 %2, %1, %0" : "=v"(r) : "v"(hi), "v"(lo));
  return r;
}
// _mm512_fpclass_ps_mask classes: quiet NaN, subnormal, signalling NaN.
constexpr int kNaNOrSubnormal = 0x01 | 0x20 | 0x80;
#endif

// Loads and stores one block of T as accumulate-type vectors (kSub of them: two for 16-bit T).
// kHw: 16-bit stores round with the CPU's bfloat16 conversion (bf16_hardware_conversion()).
template <typename T, bool kHw = false>
struct Block {
  using acc_t = accumulate_t<T>;
  using AVec = Vectorized<acc_t>;
  static constexpr int64_t kSize = Vectorized<T>::size();
  static constexpr int kSub = static_cast<int>(kSize / AVec::size());

  static PURIFY_VECTOR_INLINE void load(const T* p, AVec* out) {
    if constexpr (kSub == 1) {
      out[0] = AVec::loadu(p);
    } else {
      auto halves = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
      out[0] = std::get<0>(halves);
      out[1] = std::get<1>(halves);
    }
  }
  // One block of a widened row (WidenedDirections): the same values as load() of the 16-bit row.
  template <typename U = T, std::enable_if_t<!std::is_same_v<U, accumulate_t<U>>, int> = 0>
  static PURIFY_VECTOR_INLINE void load(const acc_t* p, AVec* out) {
    for (int s = 0; s < kSub; ++s) out[s] = AVec::loadu(p + s * AVec::size());
  }
  static PURIFY_VECTOR_INLINE Vectorized<T> to_16bit(const AVec* in) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kHw && std::is_same_v<T, c10::BFloat16>) {
      if ((_mm512_fpclass_ps_mask(in[0], kNaNOrSubnormal) | _mm512_fpclass_ps_mask(in[1], kNaNOrSubnormal)) == 0)
        return bf16_hardware(in[0], in[1]);
    }
#endif
    return at::vec::convert_from_float<T>(in[0], in[1]);
  }
  static PURIFY_VECTOR_INLINE void store(T* p, const AVec* in) {
    if constexpr (kSub == 1) {
      in[0].store(p);
    } else {
      to_16bit(in).store(p);
    }
  }
  // A non-temporal store (p aligned to the vector size): the line is written without first
  // being read, a third less traffic for outputs that will not be read again from cache.
  static PURIFY_VECTOR_INLINE void store_stream(T* p, const AVec* in) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      _mm512_stream_ps(p, in[0]);
    } else if constexpr (std::is_same_v<T, double>) {
      _mm512_stream_pd(p, in[0]);
    } else {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p), to_16bit(in));
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      _mm256_stream_ps(p, in[0]);
    } else if constexpr (std::is_same_v<T, double>) {
      _mm256_stream_pd(p, in[0]);
    } else {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_16bit(in));
    }
#else
    store(p, in);
#endif
  }
  static PURIFY_VECTOR_INLINE void store_to(T* p, const AVec* in, bool stream) {
    if (stream) {
      store_stream(p, in);
    } else {
      store(p, in);
    }
  }
};

// A z row's K directions as the kernels read them: the rows of z themselves for float and
// double; for 16-bit T, widened to float once per item into a per-thread buffer (values and
// block layout as Block<T>::load gives them), so that the passes over them (the Gram, the dot
// products and the output of every x row the z row serves) load floats instead of converting
// each time. Rows above kMaxWidened elements in all are read (and converted) in place.
template <typename T>
struct WidenedDirections {
  using acc_t = accumulate_t<T>;
  static constexpr bool kWidens = !std::is_same_v<T, acc_t>;
  static constexpr int64_t kMaxWidened = int64_t{1} << 18;  // 1 MiB of float per thread
  std::vector<acc_t> buffer;
  std::vector<const acc_t*> rows;

  static bool fits(int K, int64_t D) { return kWidens && static_cast<int64_t>(K) * D <= kMaxWidened; }

  const acc_t* const* assign(const T* const* dirs, int K, int64_t D) {
    using B = Block<T>;
    constexpr int64_t kAlign = 64 / static_cast<int64_t>(sizeof(acc_t));
    const int64_t stride = (D + kAlign - 1) / kAlign * kAlign;  // rows start on a cache line
    buffer.resize(static_cast<size_t>(K * stride + kAlign));
    acc_t* base = buffer.data();
    while (reinterpret_cast<uintptr_t>(base) % 64 != 0) ++base;
    rows.resize(K);
    for (int k = 0; k < K; ++k) {
      acc_t* out = base + k * stride;
      typename B::AVec v[B::kSub];
      int64_t d = 0;
      for (; d + B::kSize <= D; d += B::kSize) {
        B::load(dirs[k] + d, v);
        for (int s = 0; s < B::kSub; ++s) v[s].store(out + d + s * B::AVec::size());
      }
      for (; d < D; ++d) out[d] = static_cast<acc_t>(dirs[k][d]);
      rows[k] = out;
    }
    return rows.data();
  }
  // A work item's K direction rows (z_item, z_item + dir_stride, ...) as the kernels read them
  // as Z: in place where Z is T, else widened here. `z_rows` holds K pointers.
  template <typename Z>
  const Z* const* directions(const T* z_item, int64_t dir_stride, int K, int64_t D, std::vector<const T*>& z_rows) {
    for (int k = 0; k < K; ++k) z_rows[k] = z_item + k * dir_stride;
    if constexpr (std::is_same_v<Z, T>) {
      return z_rows.data();
    } else {
      return assign(z_rows.data(), K, D);
    }
  }
};

// The last-level cache this machine may count on: what the OS reports (a VM's share can be far
// below what cpuid says), and at most kCachePerCore per online CPU, since a VM may also be told
// the host's whole cache (measured: a 2-CPU VM told 480 MiB, where outputs of 16 MiB and more
// were written faster with non-temporal stores, and of 8 MiB as fast or slower;
// benchmarks/README.md).
constexpr int64_t kCachePerCore = int64_t{8} << 20;

inline int64_t last_level_cache_bytes() {
  int64_t bytes = int64_t{8} << 20;
  if (FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
    long kib = 0;
    const int n = std::fscanf(f, "%ldK", &kib);
    std::fclose(f);
    if (n == 1 && kib > 0) bytes = static_cast<int64_t>(kib) << 10;
  } else if (const long v = sysconf(_SC_LEVEL3_CACHE_SIZE); v > 0) {
    bytes = static_cast<int64_t>(v);
  }
  const long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  return cpus > 0 ? std::min(bytes, kCachePerCore * cpus) : bytes;
}

// Whether to write outputs with non-temporal stores: only when they are larger than half the
// last-level cache (smaller ones are better left in cache for their consumer) and every row
// starts on a vector boundary.
template <typename T>
bool use_streaming_stores(const void* out, int64_t D, int64_t total_bytes) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  const StreamingStores mode = streaming_stores();  // PURIFIED_OPS_STREAMING_STORES overrides the size rule
  if (mode == StreamingStores::kNever) return false;
  const bool always = mode == StreamingStores::kAlways;
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

  with_direction_type<T>(K, D, [&](auto z_type) {
    using Z = decltype(z_type);
    at::parallel_for(0, grid.groups * chunks, item_grain(grid, chunks), [&](int64_t begin, int64_t end) {
      std::vector<const T*> z_rows(K);
      WidenedDirections<T> widened;
      std::vector<acc_t> L(static_cast<size_t>(K) * K), c(K), w(K), work(K);
      std::vector<int> order(K);
      ScaledDirections<T, Z> scaled_dirs;
      const T* streams[kMaxPrefetchedDirections + 2];
      const RowCursor cursor{grid, chunks, end};
      for (int64_t item = begin; item < end; ++item) {
        const ItemRows r = item_rows(grid, chunks, item);
        const RowOffsets go = decode_offsets(grid.group, r.group);
        const Z* const* dirs = widened.template directions<Z>(z_data + go.z, grid.z_dir_stride, K, D, z_rows);
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
          const auto next = next_row_streams<T>(grid, cursor, item, j, r.end, r.group, x_data, nullptr, z_data, streams);
          subtract_combination<T, kHw>(xr, dirs, w.data(), K, D, y_data + row * D, next, stream);
        }
      }
      if (stream) fence_streaming_stores();
    });
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

  with_direction_type<T>(K, D, [&](auto z_type) {
    using Z = decltype(z_type);
    at::parallel_for(0, items, item_grain(grid, chunks), [&](int64_t begin, int64_t end) {
      std::vector<const T*> z_rows(K);
      WidenedDirections<T> widened;
      std::vector<acc_t> u(K), L(static_cast<size_t>(K) * K), work(K);
      std::vector<int> order(K);
      ScaledDirections<T, Z> scaled_dirs;
      const T* streams[kMaxPrefetchedDirections + 2];
      const RowCursor cursor{grid, chunks, end};
      for (int64_t item = begin; item < end; ++item) {
        const ItemRows r = item_rows(grid, chunks, item);
        const RowOffsets go = decode_offsets(grid.group, r.group);
        const Z* const* dirs = widened.template directions<Z>(z_data + go.z, grid.z_dir_stride, K, D, z_rows);
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
          const auto next = next_row_streams<T>(grid, cursor, item, j, r.end, r.group, x_data, g_data, z_data, streams);
          gdotp_sum += backward_row<T, kHw>(gr, xr, dirs, coeff_data + row * K, u.data(), K, D, s,
                                            dx_data + row * D, dz_row, D, acc_dz, next, stream);
        }
        gdotp_part[item] = gdotp_sum;
      }
      if (stream) fence_streaming_stores();
    });
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

// The forward into given outputs, for checked arguments (x and z with unit last stride); the
// functional and the _out op differ only in where the outputs come from. A layout the row grid
// cannot address runs grouped (forward_in_row_grid, purify_host.h).
void forward_into(const at::Tensor& x, const at::Tensor& z, const at::Tensor& strength, double eps,
                  at::Tensor& y, at::Tensor& coeff, at::Tensor& chol) {
  if (x.numel() == 0 && x.size(-1) != 0) {
    chol.zero_();  // no rows: nothing reads the factor, but it is defined
    return;
  }
  const double s = strength.item<double>();
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
  const double s = strength.item<double>();
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

// The CPU kernels of the ops; the other registrations are listed at the top of csrc/purify.cpp.
TORCH_LIBRARY_IMPL(purified_ops, CPU, m) {
  m.impl("purify_forward", &purify_forward_cpu);
  m.impl("purify_backward", &purify_backward_cpu);
  m.impl("purify_forward_out", &purify_forward_out_cpu);
  m.impl("purify_backward_out", &purify_backward_out_cpu);
}

}  // namespace purified_ops
