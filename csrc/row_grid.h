// How the kernels address rows. x's leading dims split into "group" dims, where z has its own
// rows, and "shared" dims, where z has size 1 and one z row serves many x rows (tokens, pixels).
// A row is addressed as (m, j): m the z row (group), j the row within the group. Offsets come
// from per-tensor strides, so x, grad_y and z are read in place: any strides, any storage
// offset, and a broadcast z is never materialized. No torch headers here (nvcc-friendly).
#pragma once

#include <cstdint>

#include "row_math.h"

namespace purified_ops {

// Dims of one kind (group or shared) left after dropping size-1 dims and merging neighbours;
// a call that needs more (a permuted x with many leading dims) is grouped by the host first
// (purify_host.h, GroupedCall), so the kernels see at most one dim of each kind.
constexpr int kMaxGridDims = 12;

struct DimList {
  int ndim = 0;
  int64_t size[kMaxGridDims] = {};
  int64_t x_stride[kMaxGridDims] = {};     // elements of x
  int64_t g_stride[kMaxGridDims] = {};     // elements of grad_y (backward only)
  int64_t row_stride[kMaxGridDims] = {};   // rows of the contiguous outputs (y, dx, coeff)
  int64_t z_stride[kMaxGridDims] = {};     // elements of z (group dims only)
};

struct RowGrid {
  int64_t groups = 0;      // z rows actually used (product of group dims)
  int64_t group_size = 0;  // x rows per z row (product of shared dims)
  int64_t D = 0;           // feature length
  int K = 0;               // directions per row
  int64_t z_dir_stride = 0;  // elements between the K directions of one z row
  DimList group, shared;
};

// The offsets of one multi-index, decoded from a linear index over `dims`.
struct RowOffsets {
  int64_t x = 0, g = 0, row = 0, z = 0;
};

PURIFY_HD RowOffsets decode_offsets(const DimList& dims, int64_t linear) {
  RowOffsets o;
  if (dims.ndim == 1) {  // the common case (one merged dim): no division
    o.x = linear * dims.x_stride[0];
    o.g = linear * dims.g_stride[0];
    o.row = linear * dims.row_stride[0];
    o.z = linear * dims.z_stride[0];
    return o;
  }
  for (int d = dims.ndim - 1; d >= 0; --d) {
    const int64_t i = linear % dims.size[d];
    linear /= dims.size[d];
    o.x += i * dims.x_stride[d];
    o.g += i * dims.g_stride[d];
    o.row += i * dims.row_stride[d];
    o.z += i * dims.z_stride[d];
  }
  return o;
}

// A call's rows are split into work items: each z row (group) into `chunks` items of
// consecutive rows within it, so that a z row shared by many x rows is spread over threads.
// Item `item` serves z row `group`, rows [begin, end) of that group.
struct ItemRows {
  int64_t group, begin, end;
};

PURIFY_HD ItemRows item_rows(const RowGrid& grid, int64_t chunks, int64_t item) {
  const int64_t c = item % chunks;
  return {item / chunks, c * grid.group_size / chunks, (c + 1) * grid.group_size / chunks};
}

// Items per z row: enough for about `target_items` items in a call, each of at least
// `min_rows` rows (an item's fixed cost, a factorization or a K x D partial, is amortized
// over its rows). Shape-only, so results never depend on the machine.
PURIFY_HD int64_t chunks_per_group(const RowGrid& grid, int64_t target_items, int64_t min_rows) {
  if (grid.groups <= 0 || grid.group_size <= 1) return 1;
  const int64_t want = (target_items + grid.groups - 1) / grid.groups;
  const int64_t most = grid.group_size / min_rows;
  return want < most ? (want > 1 ? want : 1) : (most > 1 ? most : 1);
}

}  // namespace purified_ops
