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
//
// The helpers, each in a header of its own: packs.cuh (16-byte packs, their loads and stores),
// team_layout.cuh (teams, shared memory, tiles), warp_reductions.cuh (fixed-order warp sums,
// pass 1's accumulation), factor_solve.cuh (warp 0's factor and solve, the scaled path).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../row_grid.h"
#include "../row_math.h"
#include "device_hooks.cuh"
#include "factor_solve.cuh"
#include "packs.cuh"
#include "purify_launch.h"
#include "team_layout.cuh"
#include "warp_reductions.cuh"

namespace purified_ops {
namespace cuda {

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
  // The strength, once per team (the first team.sync publishes it): no global round trip per row.
  if (team.tid == 0) {
    sm[S::strength(team.warps)] =
        p.strength != nullptr ? global_load(static_cast<const A*>(p.strength)) : static_cast<A>(p.strength_value);
  }

  Pack<T> zr[KB][V], xr[V];
  for (int64_t item = tiles.first_item(); item < items; item += tiles.item_stride()) {
    const WorkItem<T> it(grid, p.chunks, item, z_data);
    const ItemRows& r = it.r;
    const T* zbase = it.zbase;
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
      const RowOffsets ro = it.row(grid, j);
      const T* xrow = x_data + ro.x;
      const int64_t row = ro.row;
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
        const bool ok = team_solve<A, KB>(sm, team.warps, team.lane, gram, scaled ? scale_sm[2] : eps, K, b);
        if (team.lane == 0) {
          const A inv_m = scaled ? scale_sm[0] : A(1);
#pragma unroll
          for (int k = 0; k < KB; ++k) {
            const int dir = order_at(sm + S::order(team.warps), k);
            const A c = b[k] * inv_m;
            sm[S::vec_c(team.warps) + dir] = c;
            if (dir < K) global_store(coeff_data + row * K + dir, c);
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
      const A s = sm[S::strength(team.warps)];  // read here: not held across pass 1 and the solve
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
      // The factor, once per z row (the first row of its first item), in direction rows: here,
      // after pass 2, where fewer registers are live than in the solve.
      if (first && r.begin == 0 && team.warp == 0)
        store_factor<A, KB>(sm, team.warps, team.lane, K, scaled ? scale_sm[1] : A(1), chol_data + r.group * K * K);
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
  const A s = global_load(static_cast<const A*>(p.strength));
  const bool want_dz = dz_data != nullptr;
  const bool direct_dz = want_dz && grid.group_size == 1;
  const int ntiles = tiles.ntiles;

  Pack<T> zr[KB][V], gr[V];
  for (int64_t item = tiles.first_item(); item < items; item += tiles.item_stride()) {
    const WorkItem<T> it(grid, p.chunks, item, z_data);
    const ItemRows& r = it.r;
    const T* zbase = it.zbase;
    A* Ls = sm + S::chol(team.warps);
    A* order_sm = sm + S::order(team.warps);
    const int ks = solve_size<KB>(K);
    if (team.warp == 0) {
      // The factor in direction rows (row_math.h's factor_order): direction i was factored at
      // the step of its row's last nonzero entry; its row goes to that row of Ls (pivot order).
      // The order starts as the identity, so any chol gives valid indices. The factor comes in
      // coalesced, into Ls in direction rows (stride ks); each lane takes its row into registers,
      // then writes it to the row of its step.
      if (team.lane < KB) order_sm[team.lane] = A(team.lane);
      const A* L = chol_data + r.group * K * K;
      for (int base = 0; base < K * K; base += 32) {
        const int e = base + team.lane;
        if (e < K * K) Ls[(e / K) * ks + e % K] = global_load(L + e);
      }
      __syncwarp();
      A lrow[KB];
      int step = team.lane < K ? 0 : team.lane;
#pragma unroll
      for (int q = 0; q < KB; ++q) {
        lrow[q] = team.lane < K && q < K ? Ls[team.lane * ks + q] : A(0);
        if (team.lane < K && q > 0 && q < K && lrow[q] != A(0)) step = q;
      }
      __syncwarp();
      if (team.lane < ks) {
#pragma unroll
        for (int q = 0; q < KB; ++q)
          if (q < ks)
            Ls[step * ks + q] = team.lane < K ? (q <= step ? lrow[q] : A(0)) : (team.lane == q ? A(1) : A(0));
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
      const RowOffsets ro = it.row(grid, j);
      const T* grow = g_data + ro.g;
      const T* xrow = x_data + ro.x;
      const int64_t row = ro.row;
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
        const bool ok = team_solve<A, KB>(sm, team.warps, team.lane, false, A(0), K, b);
        if (team.lane == 0) {
          const A inv_m = scaled ? scale_sm[0] : A(1);
#pragma unroll
          for (int k = 0; k < KB; ++k) {
            sm[S::vec_u(team.warps) + order_at(order_sm, k)] = b[k] * inv_m;
            sm[S::vec_c(team.warps) + k] = k < K ? global_load(coeff_data + row * K + k) : A(0);
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
                  acc = global_load(dst);
#pragma unroll
                  for (int e = 0; e < W; ++e) acc.v[e] += fma(c[k], g_minus_q[e], u[k] * x_minus_p[e]);
                }
                global_store(dst, acc);
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
      global_store(gdotp_data + item, total);
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
  const A s = global_load(static_cast<const A*>(p.strength));
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
      for (int64_t c = 0; c < chunks; ++c) sum += global_load(part + ((m * chunks + c) * K + k) * Dp + d);
      global_store(dz + i, to_bits<T>(-s * sum));
    }
    return;
  }
  __shared__ A red[kBlock];
  const A* __restrict__ gdotp_part = static_cast<const A*>(p.gdotp_partial);
  A t = A(0);
  for (int64_t i = threadIdx.x; i < items; i += kBlock) t += global_load(gdotp_part + i);
  red[threadIdx.x] = t;
  __syncthreads();
#pragma unroll
  for (int n = kBlock / 2; n >= 1; n /= 2) {
    if (threadIdx.x < n) red[threadIdx.x] += red[threadIdx.x + n];
    __syncthreads();
  }
  if (threadIdx.x == 0) global_store(static_cast<A*>(p.ds), -red[0]);
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
  return launch_kernel("forward", purify_forward_kernel<T, KB>, grid_blocks(items, tpb), kBlock, smem, stream, true, p, team,
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
  cudaError_t err = launch_kernel("backward", purify_backward_kernel<T, KB>, grid_blocks(items, tpb), kBlock, smem, stream,
                                  true, p, team, items);
  if (err != cudaSuccess) return err;
  int64_t dz_blocks = 0;
  if (p.dz != nullptr && p.grid.group_size > 1) {
    const int64_t total = p.grid.groups * p.grid.K * p.grid.D;
    dz_blocks = (total + kBlock - 1) / kBlock;
    if (dz_blocks > (int64_t{1} << 20)) dz_blocks = int64_t{1} << 20;
  }
  return launch_kernel("backward_finalize", purify_backward_finalize<T>, static_cast<unsigned>(dz_blocks + 1), kBlock, 0, stream, false, p,
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
