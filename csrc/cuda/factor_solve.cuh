// Warp 0's factor and solve of a team's Gram system (row_math.h's operation order), and the
// scaled path's pieces: the team's largest |z| entry and Z / m in the cached tile.
#pragma once

#include <cuda_runtime.h>

#include "../row_math.h"
#include "packs.cuh"
#include "team_layout.cuh"
#include "warp_reductions.cuh"

namespace purified_ops {
namespace cuda {

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
// team's chol slot in pivot order with the order beside it), and solves for the rhs entries.
// Returns the solution on every lane of warp 0 in pivot order: b[t] belongs to direction
// order_at(t).
//
// Returns whether the factor (when `factor`) and the solution are finite (the same on every
// lane).
template <typename A, int KB>
__device__ __forceinline__ bool team_solve(A* sm, int warps, int lane, bool factor, A eps, int K, A (&b)[KB]) {
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

// Warp 0 of a team: the factor in its chol slot (pivot order) to `out` in direction rows, times
// `scale` (m, where the scaled path factored Z / m), coalesced: entry e (direction e / K,
// column e % K) from the row of the step that factored its direction (the real directions take
// steps 0..K-1).
template <typename A, int KB>
__device__ __forceinline__ void store_factor(const A* sm, int warps, int lane, int K, A scale, A* __restrict__ out) {
  using S = TeamSmem<KB>;
  const A* Ls = sm + S::chol(warps);
  const A* order_sm = sm + S::order(warps);
  const int ks = solve_size<KB>(K);
  for (int base = 0; base < K * K; base += 32) {
    const int e = base + lane;
    if (e < K * K) {
      int at = 0;
      for (int t = 0; t < K; ++t)
        if (order_at(order_sm, t) == e / K) at = t;
      global_store(out + e, Ls[at * ks + e % K] * scale);
    }
  }
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

}  // namespace cuda
}  // namespace purified_ops
