// Sums across a warp in a fixed order (no atomics): the reduce-scatter butterfly, the all-reduce,
// and pass 1's accumulation of the Gram entries and Z v over a tile into each warp's slots.
#pragma once

#include <cuda_runtime.h>

#include "packs.cuh"
#include "team_layout.cuh"

namespace purified_ops {
namespace cuda {

constexpr unsigned kFull = 0xffffffffu;

// Butterfly reduce-scatter of N (a power of two <= 32) values over the warp: returns, on each
// lane, the warp total of value index lane >> (5 - log2 N). Fixed order, no atomics.
// Step with lane bit OFF while CNT values are left (template recursion keeps indices constant).
template <typename A, int N, int CNT, int OFF>
__device__ __forceinline__ void reduce_scatter_step(A (&v)[N], int lane) {
  if constexpr (OFF >= 1) {
    if constexpr (CNT > 1) {
      constexpr int H = CNT / 2;
      const bool upper = (lane & OFF) != 0;
#pragma unroll
      for (int i = 0; i < H; ++i) {
        const A send = upper ? v[i] : v[i + H];
        const A keep = upper ? v[i + H] : v[i];
        v[i] = keep + __shfl_xor_sync(kFull, send, OFF);
      }
      reduce_scatter_step<A, N, H, OFF / 2>(v, lane);
    } else {
      v[0] += __shfl_xor_sync(kFull, v[0], OFF);
      reduce_scatter_step<A, N, 1, OFF / 2>(v, lane);
    }
  }
}

template <typename A, int N>
__device__ __forceinline__ A warp_reduce_scatter(A (&v)[N], int lane) {
  reduce_scatter_step<A, N, N, 16>(v, lane);
  return v[0];
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

// One group of up to GS entries: entries [GS GI, GS GI + GS) of
//   GRAM: (Gram lower triangle a >= b at a (a + 1) / 2 + b, then <z_a, v> at NT + a)
//   else: (<z_a, v> at a)
// accumulated over this thread's columns, reduced over the warp, added into the warp's slot.
template <typename T, int KB, bool GRAM, int GI>
__device__ __forceinline__ void accumulate_group(const Pack<T> (&zr)[KB][vectors_per_thread(KB)],
                                                 const Pack<T> (&vr)[vectors_per_thread(KB)],
                                                 accumulate_t<T>* wacc, bool first_tile,
                                                 int lane) {
  using A = accumulate_t<T>;
  constexpr int V = vectors_per_thread(KB);
  constexpr int W = Pack<T>::W;
  constexpr int NT = GRAM ? KB * (KB + 1) / 2 : 0;
  constexpr int NE = NT + KB;
  constexpr int GS = group_entries(KB, GRAM);
  constexpr int CNT = (NE - GS * GI) < GS ? (NE - GS * GI) : GS;
  constexpr int N = pow2_ceil(CNT);
  A acc[N];
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] = A(0);
#pragma unroll
  for (int v = 0; v < V; ++v) {
#pragma unroll
    for (int w = 0; w < W; ++w) {
      A zf[KB];
#pragma unroll
      for (int k = 0; k < KB; ++k) zf[k] = pack_get(zr[k][v], w);
      const A xf = pack_get(vr[v], w);
#pragma unroll
      for (int a = 0; a < KB; ++a) {
        if constexpr (GRAM) {
#pragma unroll
          for (int b = 0; b <= a; ++b) {
            const int e = a * (a + 1) / 2 + b - GS * GI;
            if (e >= 0 && e < CNT) acc[e] = fma(zf[a], zf[b], acc[e]);
          }
        }
        const int e = NT + a - GS * GI;
        if (e >= 0 && e < CNT) acc[e] = fma(zf[a], xf, acc[e]);
      }
    }
  }
  const A total = warp_reduce_scatter<A, N>(acc, lane);
  constexpr int SH = 5 - log2_exact(N);
  const int idx = lane >> SH;
  if ((lane & ((1 << SH) - 1)) == 0 && idx < CNT) {
    A* dst = wacc + GS * GI + idx;
    *dst = first_tile ? total : *dst + total;
  }
  if constexpr (GS * (GI + 1) < NE) {
    accumulate_group<T, KB, GRAM, GI + 1>(zr, vr, wacc, first_tile, lane);
  }
}

// Pass 1 on one tile: the Gram entries (when `gram`) and Z v into this warp's slots.
template <typename T, int KB>
__device__ __forceinline__ void accumulate_tile(const Pack<T> (&zr)[KB][vectors_per_thread(KB)],
                                                const Pack<T> (&vr)[vectors_per_thread(KB)],
                                                accumulate_t<T>* wacc, bool first_tile, int lane, bool gram) {
  if (gram)
    accumulate_group<T, KB, true, 0>(zr, vr, wacc, first_tile, lane);
  else
    accumulate_group<T, KB, false, 0>(zr, vr, wacc, first_tile, lane);
}

}  // namespace cuda
}  // namespace purified_ops
