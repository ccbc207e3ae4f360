// The fused kernels' 16-byte packs: W elements of T in four 32-bit words, their elements in the
// accumulate type and back as raw bits (round to nearest even), and a pack's load and store at a
// row's column (one 16-byte access, or element by element; zeros past the row's end).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../row_math.h"
#include "device_hooks.cuh"

namespace purified_ops {
namespace cuda {

// 16 bytes of W elements of T, kept as four 32-bit words: two 16-bit values share a register
// (as separate 16-bit values each would take a whole register, doubling the cached tile).
template <typename T>
struct alignas(16) Pack {
  static constexpr int W = 16 / static_cast<int>(sizeof(T));
  uint32_t u[4];
};

template <typename T>
struct Bits;
template <>
struct Bits<__half> {
  using type = uint16_t;
};
template <>
struct Bits<__nv_bfloat16> {
  using type = uint16_t;
};
template <>
struct Bits<float> {
  using type = uint32_t;
};
template <>
struct Bits<double> {
  using type = uint64_t;
};

// Element w of a pack in the accumulate type.
template <typename T>
__device__ __forceinline__ accumulate_t<T> pack_get(const Pack<T>& p, int w) {
  if constexpr (sizeof(T) == 2) {
    const uint32_t word = p.u[w >> 1];
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
      return __uint_as_float((w & 1) ? (word & 0xffff0000u) : (word << 16));
    } else {
      return __half2float(__ushort_as_half(static_cast<unsigned short>((w & 1) ? (word >> 16) : (word & 0xffffu))));
    }
  } else if constexpr (sizeof(T) == 4) {
    return __uint_as_float(p.u[w]);
  } else {
    return __hiloint2double(static_cast<int>(p.u[2 * w + 1]), static_cast<int>(p.u[2 * w]));
  }
}

// Raw bits of one element of T, from the accumulate type (round to nearest even).
template <typename T>
__device__ __forceinline__ typename Bits<T>::type to_bits(accumulate_t<T> v) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  } else if constexpr (std::is_same<T, __half>::value) {
    return __half_as_ushort(__float2half_rn(v));
  } else if constexpr (sizeof(T) == 4) {
    return __float_as_uint(v);
  } else {
    return static_cast<uint64_t>(__double_as_longlong(v));
  }
}

// Sets element w from raw bits (elements set in increasing w on a zeroed pack).
template <typename T>
__device__ __forceinline__ void pack_set_bits(Pack<T>& p, int w, typename Bits<T>::type b) {
  if constexpr (sizeof(T) == 2) {
    p.u[w >> 1] |= static_cast<uint32_t>(b) << (16 * (w & 1));
  } else if constexpr (sizeof(T) == 4) {
    p.u[w] = b;
  } else {
    p.u[2 * w] = static_cast<uint32_t>(b);
    p.u[2 * w + 1] = static_cast<uint32_t>(b >> 32);
  }
}

template <typename T>
__device__ __forceinline__ void zero_pack(Pack<T>& p) {
#pragma unroll
  for (int i = 0; i < 4; ++i) p.u[i] = 0u;
}

// W accumulate-type values (a partial dz vector), 16-byte aligned.
template <typename A, int W>
struct alignas(16) APack {
  A v[W];
};

// Loads the W elements at row[col, col + W): one 16-byte load when `vec` (then D % W == 0,
// so a vector is wholly inside or outside the row), else element by element; zeros past D.
template <typename T>
__device__ __forceinline__ void load_pack(Pack<T>& p, const T* __restrict__ row, int64_t col,
                                          int64_t D, bool vec) {
  constexpr int W = Pack<T>::W;
  if (vec) {
    Pack<T> zero;
    zero_pack(zero);
    p = global_load_or(col < D, reinterpret_cast<const Pack<T>*>(row + col), zero);
  } else {
    using B = typename Bits<T>::type;
    const B* r = reinterpret_cast<const B*>(row);
    zero_pack(p);
#pragma unroll
    for (int w = 0; w < W; ++w) pack_set_bits(p, w, global_load_or(col + w < D, r + col + w, B(0)));
  }
}

template <typename T>
__device__ __forceinline__ void store_pack(const Pack<T>& p, T* __restrict__ row, int64_t col,
                                           int64_t D, bool vec) {
  constexpr int W = Pack<T>::W;
  if (vec) {
    global_store_if(col < D, reinterpret_cast<Pack<T>*>(row + col), p);
  } else {
    using B = typename Bits<T>::type;
    B* r = reinterpret_cast<B*>(row);
#pragma unroll
    for (int w = 0; w < W; ++w) {
      B b;
      if constexpr (sizeof(T) == 2) {
        b = static_cast<B>(p.u[w >> 1] >> (16 * (w & 1)));
      } else if constexpr (sizeof(T) == 4) {
        b = p.u[w];
      } else {
        b = (static_cast<uint64_t>(p.u[2 * w + 1]) << 32) | p.u[2 * w];
      }
      global_store_if(col + w < D, r + col + w, b);
    }
  }
}

}  // namespace cuda
}  // namespace purified_ops
