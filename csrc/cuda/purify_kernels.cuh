// Fused CUDA kernels of purify_forward and purify_backward. No torch headers (fast nvcc).
//
// Work. The rows of a call are work items (z row m, x rows [b, e) it serves); a "team" of
// 32..256 threads of a 256-thread block takes one item at a time (grid-stride). Each thread
// owns V 16-byte vectors of W elements per row tile (TEAM * V * W columns), coalesced across
// the team. Pass 1 loads a tile of Z (K directions) and x (or g), accumulates the per-thread
// dot products (Gram entries and Z x), reduces them across the warp (reduce-scatter
// butterfly) and adds each warp's totals into shared memory; warp 0 then sums the warps in a
// fixed order, factors G = Z Z^T + eps I (lane-parallel, the operation order of
// row_math.h's cholesky_inplace) and solves with row_math.h's cholesky_solve_inplace. Pass 2
// writes the outputs tile by tile in reverse order: the last tile is still in registers, the
// others come back from L2 (a row longer than one tile is the only case that re-reads).
// With one tile per row and several rows per z row, Z stays in registers across the rows.
//
// Directions are padded to a compile-time bucket KB in {1, 2, 4, 8, 16} with zero rows:
// G becomes blockdiag(G, eps I) and Z x gets zeros, so the real c is unchanged (exactly).
//
// Determinism: every sum has a fixed order that depends only on the shapes (team size and
// tiling are functions of D, K and the dtype; the 16-byte and the scalar path load the same
// values into the same registers). No atomics. dz of a z row shared by several x rows is
// summed per item into a float partial and the partials of a z row summed in item order by
// the finalize kernel, which also sums the per-item <g, p> for ds.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../row_grid.h"
#include "../row_math.h"
#include "device_hooks.cuh"
#include "purify_launch.h"

namespace purified_ops {
namespace cuda {

constexpr int kBlock = 256;
constexpr unsigned kFull = 0xffffffffu;

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

// 16-byte vectors per thread per tile, by direction bucket: (KB + 2) * V * 16 bytes of
// cached data per thread stays within ~300 bytes (registers, no spills).
__host__ __device__ constexpr int vectors_per_thread(int KB) { return KB == 1 ? 4 : KB == 2 ? 2 : 1; }
__host__ __device__ constexpr int pow2_ceil(int n) { return n <= 1 ? 1 : 2 * pow2_ceil((n + 1) / 2); }
__host__ __device__ constexpr int log2_exact(int n) { return n <= 1 ? 0 : 1 + log2_exact(n / 2); }
__host__ __device__ constexpr int round_up32(int n) { return (n + 31) / 32 * 32; }
// Blocks per SM the fused kernels are compiled for (__launch_bounds__): two (at most 128
// registers a thread) for up to 4 directions, where the cached tile is small and the kernels
// fit that without spilling (unbounded, the scaled path's code takes some past 128, which
// halves their occupancy); one beyond.
__host__ __device__ constexpr int min_blocks(int KB) { return KB <= 4 ? 2 : 1; }
// Entries reduced together (accumulators live at once): 8 for the Gram at K = 16 keeps the
// forward within the register file; a reduce-scatter costs ~1 shuffle per entry either way.
__host__ __device__ constexpr int group_entries(int KB, bool gram) { return KB >= 16 ? (gram ? 8 : 16) : 32; }

// Loads the W elements at row[col, col + W): one 16-byte load when `vec` (then D % W == 0,
// so a vector is wholly inside or outside the row), else element by element; zeros past D.
template <typename T>
__device__ __forceinline__ void load_pack(Pack<T>& p, const T* __restrict__ row, int64_t col,
                                          int64_t D, bool vec) {
  constexpr int W = Pack<T>::W;
  if (vec) {
    if (col < D) {
      p = *reinterpret_cast<const Pack<T>*>(row + col);
    } else {
      zero_pack(p);
    }
  } else {
    using B = typename Bits<T>::type;
    const B* r = reinterpret_cast<const B*>(row);
    zero_pack(p);
#pragma unroll
    for (int w = 0; w < W; ++w) pack_set_bits(p, w, (col + w < D) ? r[col + w] : B(0));
  }
}

template <typename T>
__device__ __forceinline__ void store_pack(const Pack<T>& p, T* __restrict__ row, int64_t col,
                                           int64_t D, bool vec) {
  constexpr int W = Pack<T>::W;
  if (vec) {
    if (col < D) *reinterpret_cast<Pack<T>*>(row + col) = p;
  } else {
    using B = typename Bits<T>::type;
    B* r = reinterpret_cast<B*>(row);
#pragma unroll
    for (int w = 0; w < W; ++w) {
      if (col + w < D) {
        if constexpr (sizeof(T) == 2) {
          r[col + w] = static_cast<B>(p.u[w >> 1] >> (16 * (w & 1)));
        } else if constexpr (sizeof(T) == 4) {
          r[col + w] = p.u[w];
        } else {
          r[col + w] = (static_cast<uint64_t>(p.u[2 * w + 1]) << 32) | p.u[2 * w];
        }
      }
    }
  }
}

// Team layout of a block: kBlock / team teams of `team` threads (a multiple of 32).
struct Team {
  int size, id, tid, warp, warps, lane;
  __device__ __forceinline__ explicit Team(int team_size) {
    size = team_size;
    id = threadIdx.x / team_size;
    tid = threadIdx.x % team_size;
    warp = tid / 32;
    warps = team_size / 32;
    lane = threadIdx.x & 31;
  }
  __device__ __forceinline__ void sync() const {
    if (size == 32) {
      __syncwarp();
    } else {
      // Named barrier per team (id 0 is __syncthreads); orders shared memory among its threads.
      named_barrier_sync(id + 1, size);
    }
  }
};

// Shared-memory layout of one team, in accumulate-type elements.
template <int KB>
struct TeamSmem {
  static constexpr int kEntries = KB * (KB + 1) / 2 + KB;  // Gram lower triangle + one solve rhs
  static constexpr int kStride = round_up32(kEntries);     // per warp
  __host__ __device__ static constexpr int elems(int warps) {
    return warps * kStride + KB * KB + 3 * KB + warps + 4;
  }
  // offsets
  __device__ static constexpr int wacc(int warp) { return warp * kStride; }
  __device__ static constexpr int chol(int warps) { return warps * kStride; }  // the factor in pivot order
  __device__ static constexpr int vec_c(int warps) { return warps * kStride + KB * KB; }
  __device__ static constexpr int vec_u(int warps) { return warps * kStride + KB * KB + KB; }
  // the direction factored at each step (pivot order), as small integers in the accumulate type
  __device__ static constexpr int order(int warps) { return warps * kStride + KB * KB + 2 * KB; }
  __device__ static constexpr int wsum(int warps) { return warps * kStride + KB * KB + 3 * KB; }
  // one flag for the team (the scaled path)
  __device__ static constexpr int flag(int warps) { return warps * kStride + KB * KB + 3 * KB + warps; }
  // the scaled path's 1 / m, m and eps / m^2 (kept here, not in registers, by the fused kernels)
  __device__ static constexpr int scale(int warps) { return warps * kStride + KB * KB + 3 * KB + warps + 1; }
};

// What both fused kernels derive from their launch: the team and its slice of shared memory,
// the walk over work items (grid-stride, one item per team at a time) and the column tiling of
// a row. A tile is team_size * V * W columns; thread tid's vector v of tile t starts at column
// t * tile_cols + tid * W + v * team_size * W (coalesced across the team).
template <typename T, int KB>
struct TeamTiles {
  using A = accumulate_t<T>;
  static constexpr int V = vectors_per_thread(KB);
  static constexpr int W = Pack<T>::W;
  Team team;
  A* sm;
  int64_t D, tile_cols, teams_per_block;
  int ntiles;
  bool vec;

  __device__ __forceinline__ TeamTiles(int team_size, int64_t row_length, bool vector_path)
      : team(team_size), D(row_length), vec(vector_path) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    sm = reinterpret_cast<A*>(smem_raw) + team.id * TeamSmem<KB>::elems(team.warps);
    tile_cols = static_cast<int64_t>(team_size) * V * W;
    ntiles = D <= tile_cols ? 1 : static_cast<int>((D + tile_cols - 1) / tile_cols);
    teams_per_block = kBlock / team_size;
  }
  __device__ __forceinline__ int64_t first_item() const { return blockIdx.x * teams_per_block + team.id; }
  __device__ __forceinline__ int64_t item_stride() const {
    return static_cast<int64_t>(gridDim.x) * teams_per_block;
  }
  // This thread's first column in tile t, and that of its vector v.
  __device__ __forceinline__ int64_t col0(int t) const {
    return t * tile_cols + static_cast<int64_t>(team.tid) * W;
  }
  __device__ __forceinline__ int64_t col(int64_t c0, int v) const { return c0 + v * team.size * W; }
  // The tile at c0 of a row (x or grad_y) into vr and, when with_z, of the K directions at
  // zbase into zr (the bucket's rows from K on are zero).
  __device__ __forceinline__ void load(Pack<T> (&zr)[KB][V], Pack<T> (&vr)[V], const T* zbase,
                                       int64_t z_dir_stride, int K, const T* row, int64_t c0,
                                       bool with_z) const {
    if (with_z) {
#pragma unroll
      for (int k = 0; k < KB; ++k)
#pragma unroll
        for (int v = 0; v < V; ++v) {
          if (k < K)
            load_pack(zr[k][v], zbase + k * z_dir_stride, col(c0, v), D, vec);
          else
            zero_pack(zr[k][v]);
        }
    }
#pragma unroll
    for (int v = 0; v < V; ++v) load_pack(vr[v], row, col(c0, v), D, vec);
  }
};

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

// Z / m in place in the cached tile (m a power of two: exact for float, double and bfloat16,
// whose exponent range is float's; half never takes the scaled path, nothing it holds
// overflowing float). The padding rows and columns stay zero.
template <typename T, int KB>
__device__ __forceinline__ void scale_tile(Pack<T> (&zr)[KB][vectors_per_thread(KB)], accumulate_t<T> inv_m) {
  constexpr int V = vectors_per_thread(KB);
  constexpr int W = Pack<T>::W;
#pragma unroll
  for (int k = 0; k < KB; ++k)
#pragma unroll
    for (int v = 0; v < V; ++v) {
      Pack<T> out;
      zero_pack(out);
#pragma unroll
      for (int w = 0; w < W; ++w) pack_set_bits(out, w, to_bits<T>(pack_get(zr[k][v], w) * inv_m));
      zr[k][v] = out;
    }
}

// The larger of a and b, a NaN winning (the largest |z| entry is NaN where any is).
template <typename A>
__device__ __forceinline__ A max_or_nan(A a, A b) {
  return (b > a || b != b) ? b : a;
}

template <typename A>
__device__ __forceinline__ bool is_finite(A v) {
  return v - v == A(0);
}

// Warp-lane-parallel Cholesky factor of G, in the operation order of cholesky_inplace
// (row_math.h): its lazy pivoting (the remaining direction of lowest index unless its remaining
// pivot is below pivot_fraction of its G_jj, then the largest such fraction, ties to the lowest
// index; padded directions, which are orthogonal to all, only after the real ones), its pivot
// rule (dependent directions dropped, rel = 4 K u for the real K; padded rows have G_jj = eps, so
// their pivot is sqrt(eps)) and its clamp of each entry to sqrt(G_ii - sum_{p<j} L_ip^2), which a
// lane keeps as a running value in the same order. `gsm`: G's lower triangle (row a, column
// b <= a at a (a + 1) / 2 + b), KB x KB. Lane i < KB gets direction i's row of the factor
// (column t: step t) in m[] and the step it was factored at in `step`; order_sm[t] (written by
// lane 0) is the direction factored at step t.
template <typename A, int KB>
__device__ __forceinline__ void warp_cholesky(const A* gsm, A eps, int K, int lane, A (&m)[KB], int& step,
                                              A* order_sm) {
  // Few registers live across the steps (the caller's cached tile is live too): G_ii is read
  // from gsm where needed, whether this lane is done from the (uniform) mask.
  const A rel = A(4) * A(K) * unit_roundoff<A>();
  const int diag = lane < KB ? lane * (lane + 1) / 2 + lane : 0;
  A rem = lane < KB ? gsm[diag] : A(0);  // G_ii - sum_{p<j} L_ip^2: this lane's pivot if taken next
  unsigned done_mask = 0u;  // the directions factored so far (the same on every lane)
#pragma unroll
  for (int t = 0; t < KB; ++t) m[t] = A(0);
#pragma unroll
  for (int t = 0; t < KB; ++t) {
    int natural = -1;  // the remaining direction of lowest index, the real ones first
#pragma unroll
    for (int q = KB - 1; q >= 0; --q)
      if (!((done_mask >> q) & 1u)) natural = q;
#pragma unroll
    for (int q = KB - 1; q >= 0; --q)
      if (q < K && !((done_mask >> q) & 1u)) natural = q;
    const bool done = lane >= KB || ((done_mask >> lane) & 1u);
    int p = natural;
    const A key = (!done && lane < K) ? pivot_key(rem, gsm[diag]) : -FloatLimits<A>::largest;
    if (natural < K && !(__shfl_sync(kFull, key, natural) >= pivot_fraction<A>())) {
      A best = key;  // butterfly all-reduce of the largest (key, -lane): every lane gets the pivot
      int best_lane = lane;
#pragma unroll
      for (int off = 16; off >= 1; off >>= 1) {
        const A other = __shfl_xor_sync(kFull, best, off);
        const int other_lane = __shfl_xor_sync(kFull, best_lane, off);
        if (other > best || (other == best && other_lane < best_lane)) {
          best = other;
          best_lane = other_lane;
        }
      }
      p = best_lane;
    }
    done_mask |= 1u << p;
    const A gjj = gsm[p * (p + 1) / 2 + p];
    const A d = __shfl_sync(kFull, rem, p);
    const A r = pivot_root(d, gjj, eps, rel);
    const A inv = A(1) / r;
    A v = lane < KB ? (lane >= p ? gsm[lane * (lane + 1) / 2 + p] : gsm[p * (p + 1) / 2 + lane]) : A(0);
#pragma unroll
    for (int q = 0; q < t; ++q) v -= m[q] * __shfl_sync(kFull, m[q], p);
    const A bound = sqrt(rem > A(0) ? rem : A(0));
    const A l = v * inv;
    const A lc = l < -bound ? -bound : (l > bound ? bound : l);
    if (lane == p) {
      m[t] = r;
    } else if (!done) {
      m[t] = lc;
      rem -= lc * lc;
    }
    if (lane == 0) order_sm[t] = A(p);
  }
  __syncwarp();
  step = lane;
  for (int t = 0; t < KB; ++t)
    if (static_cast<int>(order_sm[t]) == lane) step = t;
}

// The direction factored at step t (TeamSmem::order).
template <typename A>
__device__ __forceinline__ int order_at(const A* order_sm, int t) {
  return static_cast<int>(order_sm[t]);
}

// Size of the solves: the padded bucket KB (a compile-time size: fully unrolled, b[] in
// registers) up to K = 8; the real K at K = 16, where unrolling made the compiler hoist all
// K (K + 1) / 2 factor entries while the cached tile is live, and spill (b[] then lives in
// local memory, 64 bytes of L1-cached stack). The factor in shared memory has stride ks.
template <int KB>
__device__ __forceinline__ int solve_size(int K) {
  return KB >= 16 ? K : KB;
}

// Warp 0 of a team: sums the warps' entries (fixed order), factors G (when `factor`, into the
// team's chol slot in pivot order with the order beside it and, when `chol_out`, to global
// memory in direction rows), and solves for the rhs entries. Returns the solution on every lane
// of warp 0 in pivot order: b[t] belongs to direction order_at(t).
//
// Returns whether the factor (when `factor`) and the solution are finite (the same on every
// lane); chol_out gets the factor times chol_scale (m, where the scaled path factors Z / m).
template <typename A, int KB>
__device__ __forceinline__ bool team_solve(A* sm, int warps, int lane, bool factor, A eps,
                                           A* __restrict__ chol_out, A chol_scale, int K, A (&b)[KB]) {
  using S = TeamSmem<KB>;
  constexpr int NT = KB * (KB + 1) / 2;
  A* Ls = sm + S::chol(warps);
  A* order_sm = sm + S::order(warps);
  const int ks = solve_size<KB>(K);
  bool finite = true;
  if (factor) {
    // G's lower triangle summed over the warps, each lane its own row, into warp 0's slots.
    if (lane < KB) {
#pragma unroll
      for (int p = 0; p < KB; ++p) {
        if (p <= lane) {
          const int e = lane * (lane + 1) / 2 + p;
          A t = A(0);
          for (int w = 0; w < warps; ++w) t += sm[S::wacc(w) + e];
          if (p == lane) t += eps;
          sm[S::wacc(0) + e] = t;
        }
      }
    }
    __syncwarp();
    A m[KB];
    int step;
    warp_cholesky<A, KB>(sm + S::wacc(0), eps, K, lane, m, step, order_sm);
    int bad = 0;
#pragma unroll
    for (int q = 0; q < KB; ++q) bad |= is_finite(m[q]) ? 0 : 1;
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) bad |= __shfl_xor_sync(kFull, bad, off);
    finite = bad == 0;
    if (lane < ks) {
#pragma unroll
      for (int q = 0; q < KB; ++q)
        if (q < ks) Ls[step * ks + q] = m[q];
      if (chol_out != nullptr && lane < K) {
#pragma unroll
        for (int q = 0; q < KB; ++q)
          if (q < K) chol_out[lane * K + q] = m[q] * chol_scale;
      }
    }
    __syncwarp();
  }
  const int rhs = factor ? NT : 0;
#pragma unroll
  for (int k = 0; k < KB; ++k) {
    const int dir = order_at(order_sm, k);
    A t = A(0);
    for (int w = 0; w < warps; ++w) t += sm[S::wacc(w) + rhs + dir];
    b[k] = t;
  }
  cholesky_solve_inplace<A>(Ls, ks, b);
#pragma unroll
  for (int k = 0; k < KB; ++k) finite = finite && is_finite(b[k]);
  return finite;
}

// The largest |z| entry of the item's K directions over the team (for direction_scale): this
// thread's columns, one 16-byte vector at a time (the cached tile is left alone, and few
// registers are live), then the warp's, then the warps' in order.
template <typename T, int KB>
__device__ __forceinline__ accumulate_t<T> team_amax(const TeamTiles<T, KB>& tiles, const T* zbase,
                                                     int64_t z_dir_stride, int K) {
  using A = accumulate_t<T>;
  using S = TeamSmem<KB>;
  constexpr int W = Pack<T>::W;
  A amax = A(0);
  for (int t = 0; t < tiles.ntiles; ++t)
    for (int k = 0; k < K; ++k)
      for (int v = 0; v < TeamTiles<T, KB>::V; ++v) {
        Pack<T> p;
        load_pack(p, zbase + k * z_dir_stride, tiles.col(tiles.col0(t), v), tiles.D, tiles.vec);
#pragma unroll
        for (int w = 0; w < W; ++w) amax = max_or_nan(amax, static_cast<A>(fabs(pack_get(p, w))));
      }
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) amax = max_or_nan(amax, __shfl_xor_sync(kFull, amax, off));
  A* wsum = tiles.sm + S::wsum(tiles.team.warps);
  if (tiles.team.lane == 0) wsum[tiles.team.warp] = amax;
  tiles.team.sync();
  A total = A(0);
  for (int w = 0; w < tiles.team.warps; ++w) total = max_or_nan(total, wsum[w]);
  tiles.team.sync();  // wsum is written again later in the item
  return total;
}

// ---------------------------------------------------------------------------------------
// Forward: y = x - s Z^T c, c = G^{-1} Z x; coeff = c; chol = L (written once per z row).
template <typename T, int KB>
__global__ void __launch_bounds__(kBlock, min_blocks(KB)) purify_forward_kernel(const __grid_constant__ ForwardParams p, int team_size,
                                                                int64_t items) {
  using A = accumulate_t<T>;
  using S = TeamSmem<KB>;
  constexpr int V = vectors_per_thread(KB);
  constexpr int W = Pack<T>::W;
  const RowGrid& grid = p.grid;
  const int K = grid.K;
  const int64_t D = grid.D;
  const TeamTiles<T, KB> tiles(team_size, D, p.vec);
  const Team& team = tiles.team;
  A* sm = tiles.sm;
  const T* __restrict__ x_data = static_cast<const T*>(p.x);
  const T* __restrict__ z_data = static_cast<const T*>(p.z);
  T* __restrict__ y_data = static_cast<T*>(p.y);
  A* __restrict__ coeff_data = static_cast<A*>(p.coeff);
  A* __restrict__ chol_data = static_cast<A*>(p.chol);
  const A eps = static_cast<A>(p.eps);
  const int ntiles = tiles.ntiles;

  Pack<T> zr[KB][V], xr[V];
  for (int64_t item = tiles.first_item(); item < items; item += tiles.item_stride()) {
    const ItemRows r = item_rows(grid, p.chunks, item);
    const RowOffsets go = decode_offsets(grid.group, r.group);
    const T* zbase = z_data + go.z;
    // The scaled path (row_math.h's direction_scale): where the factor or a row's solution
    // comes out non-finite (|z|^2 or z.x overflowed), the row is done again, and the rest of the
    // item too, with Z / m and eps / m^2 (z scaled as it enters the sums): c = c' / m, and the
    // factor returned is m L'. The row loop steps back to redo the row through the same pass 1
    // and solve (a second copy of them, or an inner loop around them, made the K = 16 kernels
    // spill); 1 / m, m and eps / m^2 stay in shared memory (TeamSmem::scale). `rescaled`: this
    // row is the one redone, so it factors again whichever row it is.
    bool scaled = false, rescaled = false;
    A* const scale_sm = sm + S::scale(team.warps);
    for (int64_t j = r.begin; j < r.end; ++j) {
      const bool first = j == r.begin;
      const RowOffsets so = decode_offsets(grid.shared, j);
      const T* xrow = x_data + go.x + so.x;
      const int64_t row = go.row + so.row;
      const bool gram = first || rescaled;
      rescaled = false;
      // Pass 1: Gram (first row of the item, or the row redone scaled) and Z x.
      for (int t = 0; t < ntiles; ++t) {
        tiles.load(zr, xr, zbase, grid.z_dir_stride, K, xrow, tiles.col0(t), first || ntiles > 1 || scaled);
        if (scaled) scale_tile<T, KB>(zr, scale_sm[0]);
        accumulate_tile<T, KB>(zr, xr, sm + S::wacc(team.warp), t == 0, team.lane, gram);
      }
      team.sync();
      // Warp 0: factor and solve; lane 0 writes c by direction and whether to rescale.
      if (team.warp == 0) {
        A b[KB];
        A* chol_out = (first && r.begin == 0) ? chol_data + r.group * K * K : nullptr;
        const bool ok = team_solve<A, KB>(sm, team.warps, team.lane, gram, scaled ? scale_sm[2] : eps, chol_out,
                                          scaled ? scale_sm[1] : A(1), K, b);
        if (team.lane == 0) {
          const A inv_m = scaled ? scale_sm[0] : A(1);
#pragma unroll
          for (int k = 0; k < KB; ++k) {
            const int dir = order_at(sm + S::order(team.warps), k);
            const A c = b[k] * inv_m;
            sm[S::vec_c(team.warps) + dir] = c;
            if (dir < K) coeff_data[row * K + dir] = c;
          }
          sm[S::flag(team.warps)] = ok || scaled ? A(0) : A(1);
        }
      }
      team.sync();
      if (sm[S::flag(team.warps)] != A(0)) {
        const DirectionScale<A> sc =
            direction_scale(team_amax<T, KB>(tiles, zbase, grid.z_dir_stride, K), D, eps);
        if (team.tid == 0) {
          scale_sm[0] = sc.inv_m;
          scale_sm[1] = sc.m;
          scale_sm[2] = sc.eps;
        }
        team.sync();
        scaled = rescaled = true;
        --j;  // the row again, scaled
        continue;
      }
      const A s = *static_cast<const A*>(p.strength);  // read here: not held across pass 1 and the solve
      A w[KB];
#pragma unroll
      for (int k = 0; k < KB; ++k) w[k] = s * sm[S::vec_c(team.warps) + k];

      // Pass 2, last tile first (it is in registers, scaled where the scaled path ran: loaded again).
      T* yrow = y_data + row * D;
      for (int t = ntiles - 1; t >= 0; --t) {
        const int64_t col0 = tiles.col0(t);
        if (t != ntiles - 1 || scaled) tiles.load(zr, xr, zbase, grid.z_dir_stride, K, xrow, col0, true);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          Pack<T> out;
          zero_pack(out);
#pragma unroll
          for (int e = 0; e < W; ++e) {
            A acc = pack_get(xr[v], e);
#pragma unroll
            for (int k = 0; k < KB; ++k) acc = fma(-w[k], pack_get(zr[k][v], e), acc);
            pack_set_bits(out, e, to_bits<T>(acc));
          }
          store_pack(out, yrow, tiles.col(col0, v), D, tiles.vec);
        }
      }
      // Registers now hold tile 0: with one tile, Z stays valid for the item's next row.
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward: u = G^{-1} Z g; p = Z^T c, q = Z^T u; dx = g - s q; dz = -s (c (g-q)^T + u (x-p)^T)
// (written directly for a z row of its own, else summed per item into dz_partial);
// gdotp_partial[item] = sum over the item's rows of <g, p>.
template <typename T, int KB>
__global__ void __launch_bounds__(kBlock, min_blocks(KB)) purify_backward_kernel(const __grid_constant__ BackwardParams p, int team_size,
                                                                 int64_t items) {
  using A = accumulate_t<T>;
  using S = TeamSmem<KB>;
  constexpr int V = vectors_per_thread(KB);
  constexpr int W = Pack<T>::W;
  const RowGrid& grid = p.grid;
  const int K = grid.K;
  const int64_t D = grid.D;
  const TeamTiles<T, KB> tiles(team_size, D, p.vec);
  const Team& team = tiles.team;
  A* sm = tiles.sm;
  const int64_t Dp = p.Dp;
  const T* __restrict__ g_data = static_cast<const T*>(p.g);
  const T* __restrict__ x_data = static_cast<const T*>(p.x);
  const T* __restrict__ z_data = static_cast<const T*>(p.z);
  const A* __restrict__ coeff_data = static_cast<const A*>(p.coeff);
  const A* __restrict__ chol_data = static_cast<const A*>(p.chol);
  T* __restrict__ dx_data = static_cast<T*>(p.dx);
  T* __restrict__ dz_data = static_cast<T*>(p.dz);
  A* __restrict__ dz_part_data = static_cast<A*>(p.dz_partial);
  A* __restrict__ gdotp_data = static_cast<A*>(p.gdotp_partial);
  const A s = *static_cast<const A*>(p.strength);
  const bool want_dz = dz_data != nullptr;
  const bool direct_dz = want_dz && grid.group_size == 1;
  const int ntiles = tiles.ntiles;

  Pack<T> zr[KB][V], gr[V];
  for (int64_t item = tiles.first_item(); item < items; item += tiles.item_stride()) {
    const ItemRows r = item_rows(grid, p.chunks, item);
    const RowOffsets go = decode_offsets(grid.group, r.group);
    const T* zbase = z_data + go.z;
    A* Ls = sm + S::chol(team.warps);
    A* order_sm = sm + S::order(team.warps);
    const int ks = solve_size<KB>(K);
    if (team.warp == 0) {
      // The factor in direction rows (row_math.h's factor_order): direction i was factored at
      // the step of its row's last nonzero entry; its row goes to that row of Ls (pivot order).
      // The order starts as the identity, so any chol gives valid indices.
      if (team.lane < KB) order_sm[team.lane] = A(team.lane);
      __syncwarp();
      if (team.lane < ks) {
        const A* L = chol_data + r.group * K * K;
        int step = team.lane;
        if (team.lane < K) {
          step = 0;
          for (int q = K - 1; q > 0; --q)
            if (L[team.lane * K + q] != A(0)) {
              step = q;
              break;
            }
        }
#pragma unroll
        for (int q = 0; q < KB; ++q)
          if (q < ks)
            Ls[step * ks + q] = (team.lane < K && q < K) ? (q <= step ? L[team.lane * K + q] : A(0))
                                                         : (team.lane == q ? A(1) : A(0));
        order_sm[step] = A(team.lane);
      }
    }
    // The scaled path: where a row's Z g overflows, the row is done again (the row loop steps
    // back, as in the forward), and the rest of the item too, with Z / m and the factor / m (m
    // bringing the largest |z| entry to [1, 2), row_math.h's normalizing_scale; 1 / m in
    // TeamSmem::scale): u = u' / m.
    bool scaled = false;
    A* const scale_sm = sm + S::scale(team.warps);
    A gdotp_acc = A(0);
    for (int64_t j = r.begin; j < r.end; ++j) {
      const bool first = j == r.begin;
      const RowOffsets so = decode_offsets(grid.shared, j);
      const T* grow = g_data + go.g + so.g;
      const T* xrow = x_data + go.x + so.x;
      const int64_t row = go.row + so.row;
      // Pass 1: Z g.
      for (int t = 0; t < ntiles; ++t) {
        tiles.load(zr, gr, zbase, grid.z_dir_stride, K, grow, tiles.col0(t), first || ntiles > 1 || scaled);
        if (scaled) scale_tile<T, KB>(zr, scale_sm[0]);
        accumulate_tile<T, KB>(zr, gr, sm + S::wacc(team.warp), t == 0, team.lane, false);
      }
      team.sync();  // also publishes Ls (written before the first row)
      // Warp 0 solves; lane 0 writes u and c by direction and whether to rescale.
      if (team.warp == 0) {
        A b[KB];
        const bool ok = team_solve<A, KB>(sm, team.warps, team.lane, false, A(0), nullptr, A(1), K, b);
        if (team.lane == 0) {
          const A inv_m = scaled ? scale_sm[0] : A(1);
#pragma unroll
          for (int k = 0; k < KB; ++k) {
            sm[S::vec_u(team.warps) + order_at(order_sm, k)] = b[k] * inv_m;
            sm[S::vec_c(team.warps) + k] = k < K ? coeff_data[row * K + k] : A(0);
          }
          sm[S::flag(team.warps)] = ok || scaled ? A(0) : A(1);
        }
      }
      team.sync();
      if (sm[S::flag(team.warps)] != A(0)) {
        const A inv_m = normalizing_scale(team_amax<T, KB>(tiles, zbase, grid.z_dir_stride, K)).inv_m;
        if (team.tid == 0) scale_sm[0] = inv_m;
        if (team.warp == 0 && team.lane < ks)
          for (int q = 0; q < ks; ++q) Ls[team.lane * ks + q] *= inv_m;
        team.sync();
        scaled = true;
        --j;  // the row again, scaled
        continue;
      }
      A c[KB], u[KB];
#pragma unroll
      for (int k = 0; k < KB; ++k) {
        c[k] = sm[S::vec_c(team.warps) + k];
        u[k] = sm[S::vec_u(team.warps) + k];
      }

      // Pass 2, last tile first (in registers, scaled where the scaled path ran: loaded again).
      T* dxrow = dx_data + row * D;
      for (int t = ntiles - 1; t >= 0; --t) {
        const int64_t col0 = tiles.col0(t);
        if (t != ntiles - 1 || scaled) tiles.load(zr, gr, zbase, grid.z_dir_stride, K, grow, col0, true);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const int64_t col = tiles.col(col0, v);
          Pack<T> xv;
          load_pack(xv, xrow, col, D, tiles.vec);
          A g_minus_q[W], x_minus_p[W];
          Pack<T> out;
          zero_pack(out);
#pragma unroll
          for (int e = 0; e < W; ++e) {
            A pv = A(0), qv = A(0);
#pragma unroll
            for (int k = 0; k < KB; ++k) {
              const A zv = pack_get(zr[k][v], e);
              pv = fma(c[k], zv, pv);
              qv = fma(u[k], zv, qv);
            }
            const A gv = pack_get(gr[v], e);
            pack_set_bits(out, e, to_bits<T>(fma(-s, qv, gv)));
            gdotp_acc = fma(gv, pv, gdotp_acc);
            g_minus_q[e] = gv - qv;
            x_minus_p[e] = pack_get(xv, e) - pv;
          }
          store_pack(out, dxrow, col, D, tiles.vec);
          if (want_dz && col < Dp) {
#pragma unroll
            for (int k = 0; k < KB; ++k) {
              if (k >= K) continue;
              if (direct_dz) {
                Pack<T> o;
                zero_pack(o);
#pragma unroll
                for (int e = 0; e < W; ++e)
                  pack_set_bits(o, e, to_bits<T>(-s * fma(c[k], g_minus_q[e], u[k] * x_minus_p[e])));
                store_pack(o, dz_data + (r.group * K + k) * D, col, D, tiles.vec);
              } else {
                APack<A, W>* dst =
                    reinterpret_cast<APack<A, W>*>(dz_part_data + (item * K + k) * Dp + col);
                APack<A, W> acc;
                if (first) {
#pragma unroll
                  for (int e = 0; e < W; ++e) acc.v[e] = fma(c[k], g_minus_q[e], u[k] * x_minus_p[e]);
                } else {
                  acc = *dst;
#pragma unroll
                  for (int e = 0; e < W; ++e) acc.v[e] += fma(c[k], g_minus_q[e], u[k] * x_minus_p[e]);
                }
                *dst = acc;
              }
            }
          }
        }
      }
    }
    // The item's <g, p>: warp butterfly, then warps in order.
    const A wsum = warp_sum(gdotp_acc);
    if (team.lane == 0) sm[S::wsum(team.warps) + team.warp] = wsum;
    team.sync();
    if (team.tid == 0) {
      A total = A(0);
      for (int w = 0; w < team.warps; ++w) total += sm[S::wsum(team.warps) + w];
      gdotp_data[item] = total;
    }
    team.sync();  // wsum and Ls are rewritten by the next item
  }
}

// dz[m] = -s * sum over the z row's items (in order) of the partials; ds = -sum of gdotp_partial.
// Blocks [0, dz_blocks) do dz, the last block does ds.
template <typename T>
__global__ void __launch_bounds__(kBlock) purify_backward_finalize(const __grid_constant__ BackwardParams p, int64_t items,
                                                                   int64_t dz_blocks) {
  using A = accumulate_t<T>;
  const A s = *static_cast<const A*>(p.strength);
  if (blockIdx.x < dz_blocks) {
    const int64_t K = p.grid.K, D = p.grid.D, Dp = p.Dp, chunks = p.chunks;
    const int64_t total = p.grid.groups * K * D;
    const A* __restrict__ part = static_cast<const A*>(p.dz_partial);
    using B = typename Bits<T>::type;
    B* __restrict__ dz = static_cast<B*>(p.dz);
    for (int64_t i = blockIdx.x * static_cast<int64_t>(kBlock) + threadIdx.x; i < total;
         i += dz_blocks * kBlock) {
      const int64_t mk = i / D, d = i % D;  // mk = m * K + k
      const int64_t m = mk / K, k = mk % K;
      A sum = A(0);
      for (int64_t c = 0; c < chunks; ++c) sum += part[((m * chunks + c) * K + k) * Dp + d];
      dz[i] = to_bits<T>(-s * sum);
    }
    return;
  }
  __shared__ A red[kBlock];
  const A* __restrict__ gdotp_part = static_cast<const A*>(p.gdotp_partial);
  A t = A(0);
  for (int64_t i = threadIdx.x; i < items; i += kBlock) t += gdotp_part[i];
  red[threadIdx.x] = t;
  __syncthreads();
#pragma unroll
  for (int n = kBlock / 2; n >= 1; n /= 2) {
    if (threadIdx.x < n) red[threadIdx.x] += red[threadIdx.x + n];
    __syncthreads();
  }
  if (threadIdx.x == 0) *static_cast<A*>(p.ds) = -red[0];
}

// ---------------------------------------------------------------------------------------
// Launch configuration: the smallest team whose tile covers D (shape-only, so the reduction
// order, and with it every bit of the result, depends on the shapes alone).
template <typename T, int KB>
inline int team_size_for(int64_t D) {
  const int64_t per_thread = static_cast<int64_t>(vectors_per_thread(KB)) * Pack<T>::W;
  int team = 32;
  while (team < kBlock && team * per_thread < D) team *= 2;
  return team;
}

inline unsigned grid_blocks(int64_t items, int teams_per_block) {
  const int64_t blocks = (items + teams_per_block - 1) / teams_per_block;
  return static_cast<unsigned>(blocks < (int64_t{1} << 20) ? (blocks > 0 ? blocks : 1) : (int64_t{1} << 20));
}

// Dynamic shared memory of one block: its teams' TeamSmem. A launch asking for more than 48 KB
// fails (cudaErrorInvalidValue) unless the kernel opts in with cudaFuncSetAttribute
// (cudaFuncAttributeMaxDynamicSharedMemorySize). The most a block asks for is with teams of one
// warp (kBlock / 32 teams: the K x K factor and vectors are per team); at KB = 16 in float64
// that is 28.7 KB, so no opt-in is needed; this keeps it so for every bucket and dtype.
template <typename A, int KB>
constexpr size_t block_smem_bytes(int team) {
  return sizeof(A) * (kBlock / team) * TeamSmem<KB>::elems(team / 32);
}
template <typename A, int KB>
constexpr bool smem_fits_without_opt_in() {
  return block_smem_bytes<A, KB>(32) <= 48 * 1024 && block_smem_bytes<A, KB>(64) <= 48 * 1024 &&
         block_smem_bytes<A, KB>(128) <= 48 * 1024 && block_smem_bytes<A, KB>(256) <= 48 * 1024;
}

template <typename T, int KB>
cudaError_t launch_forward_kb(const ForwardParams& p, cudaStream_t stream) {
  using A = accumulate_t<T>;
  static_assert(smem_fits_without_opt_in<A, KB>(), "dynamic shared memory above 48 KB needs an opt-in");
  const int team = team_size_for<T, KB>(p.grid.D);
  const int tpb = kBlock / team;
  const size_t smem = block_smem_bytes<A, KB>(team);
  const int64_t items = p.grid.groups * p.chunks;
  return launch_kernel(purify_forward_kernel<T, KB>, grid_blocks(items, tpb), kBlock, smem, stream, true, p, team,
                       items);
}

template <typename T, int KB>
cudaError_t launch_backward_kb(const BackwardParams& p, cudaStream_t stream) {
  using A = accumulate_t<T>;
  static_assert(smem_fits_without_opt_in<A, KB>(), "dynamic shared memory above 48 KB needs an opt-in");
  const int team = team_size_for<T, KB>(p.grid.D);
  const int tpb = kBlock / team;
  const size_t smem = block_smem_bytes<A, KB>(team);
  const int64_t items = p.grid.groups * p.chunks;
  cudaError_t err = launch_kernel(purify_backward_kernel<T, KB>, grid_blocks(items, tpb), kBlock, smem, stream,
                                  true, p, team, items);
  if (err != cudaSuccess) return err;
  int64_t dz_blocks = 0;
  if (p.dz != nullptr && p.grid.group_size > 1) {
    const int64_t total = p.grid.groups * p.grid.K * p.grid.D;
    dz_blocks = (total + kBlock - 1) / kBlock;
    if (dz_blocks > (int64_t{1} << 20)) dz_blocks = int64_t{1} << 20;
  }
  return launch_kernel(purify_backward_finalize<T>, static_cast<unsigned>(dz_blocks + 1), kBlock, 0, stream, false, p,
                       items, dz_blocks);
}

inline int direction_bucket(int K) { return K <= 1 ? 1 : K <= 2 ? 2 : K <= 4 ? 4 : K <= 8 ? 8 : 16; }

template <typename T>
cudaError_t launch_forward_t(const ForwardParams& p, cudaStream_t stream) {
  switch (direction_bucket(p.grid.K)) {
    case 1: return launch_forward_kb<T, 1>(p, stream);
    case 2: return launch_forward_kb<T, 2>(p, stream);
    case 4: return launch_forward_kb<T, 4>(p, stream);
    case 8: return launch_forward_kb<T, 8>(p, stream);
    default: return launch_forward_kb<T, 16>(p, stream);
  }
}

template <typename T>
cudaError_t launch_backward_t(const BackwardParams& p, cudaStream_t stream) {
  switch (direction_bucket(p.grid.K)) {
    case 1: return launch_backward_kb<T, 1>(p, stream);
    case 2: return launch_backward_kb<T, 2>(p, stream);
    case 4: return launch_backward_kb<T, 4>(p, stream);
    case 8: return launch_backward_kb<T, 8>(p, stream);
    default: return launch_backward_kb<T, 16>(p, stream);
  }
}

}  // namespace cuda
}  // namespace purified_ops

#define PURIFY_DEFINE_LAUNCHERS(NAME, T)                                                     \
  namespace purified_ops {                                                                   \
  namespace cuda {                                                                           \
  cudaError_t launch_forward_##NAME(const ForwardParams& p, cudaStream_t stream) {           \
    return launch_forward_t<T>(p, stream);                                                   \
  }                                                                                          \
  cudaError_t launch_backward_##NAME(const BackwardParams& p, cudaStream_t stream) {         \
    return launch_backward_t<T>(p, stream);                                                  \
  }                                                                                          \
  }                                                                                          \
  }
