// How a block of the fused kernels is laid out: the sizes by direction bucket (vectors per
// thread, blocks per SM), the teams of a block, a team's slice of shared memory, and the work
// items and column tiles a team walks (TeamTiles).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../row_grid.h"
#include "device_hooks.cuh"
#include "packs.cuh"

namespace purified_ops {
namespace cuda {

constexpr int kBlock = 256;

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
    return warps * kStride + KB * KB + 3 * KB + warps + 5;
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
  // the strength (the forward reads it from global memory once)
  __device__ static constexpr int strength(int warps) { return warps * kStride + KB * KB + 3 * KB + warps + 4; }
};

// The per-item prologue of both fused kernels: a team's work item (row_grid.h: a z row and the
// rows [begin, end) of it the item serves), the base of its K directions, and the offsets of
// each of its rows (x, grad_y, the output row).
template <typename T>
struct WorkItem {
  ItemRows r;
  RowOffsets base;
  const T* zbase;
  __device__ __forceinline__ WorkItem(const RowGrid& grid, int64_t chunks, int64_t item, const T* z_data)
      : r(item_rows(grid, chunks, item)), base(decode_offsets(grid.group, r.group)), zbase(z_data + base.z) {}
  __device__ __forceinline__ RowOffsets row(const RowGrid& grid, int64_t j) const {
    const RowOffsets o = decode_offsets(grid.shared, j);
    RowOffsets sum;
    sum.x = base.x + o.x;
    sum.g = base.g + o.g;
    sum.row = base.row + o.row;
    sum.z = base.z + o.z;
    return sum;
  }
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

}  // namespace cuda
}  // namespace purified_ops
