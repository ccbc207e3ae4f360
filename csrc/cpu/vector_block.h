// The CPU kernels' vector blocks: one block of a row loaded and stored as accumulate-type vectors
// (16-bit rows widened in registers, rounded back to nearest even: in software, or by the CPU's
// AVX512_BF16 conversion where the AVX512 kernels may use it), a z row widened once into a
// float buffer (WidenedDirections), and loops with compile-time indices (static_for).
// Included by purify_cpu.cpp only, which is compiled once per CPU capability.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "../row_math.h"

namespace purified_ops {
namespace {  // per CPU capability: no helper shared between capabilities' modules

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

}  // namespace
}  // namespace purified_ops
