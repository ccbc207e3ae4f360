// How a call is laid out for the CUDA kernels, decided on the host from the shapes, strides and
// pointers alone: which path serves K, the work items per z row, the 16-byte vector path, the
// row stride of the dz partials. Torch-free, so that the CUDA build (purify_cuda.cpp) and the
// emulated one (csrc/cuda_emu/) share this one copy. Team size and grid are chosen by the
// launchers (purify_kernels.cuh), which both builds compile.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "../row_grid.h"
#include "purify_launch.h"

namespace purified_ops {
namespace cuda {

// K <= kMaxCudaFusedK: the fused kernels; larger K: batched products around launch_factor_grams.
inline bool uses_fused_kernels(int64_t K) { return K <= kMaxCudaFusedK; }

// Work items per z row (row_grid.h): a call of ~2048 items has enough teams to fill a GPU;
// an item has at least `min_rows` rows (the forward refactors G per item, the backward writes
// a K x D partial).
inline int64_t forward_chunks(const RowGrid& grid) { return chunks_per_group(grid, 2048, 16); }
inline int64_t backward_chunks(const RowGrid& grid) {
  return chunks_per_group(grid, 2048, std::max<int64_t>(16, 4 * grid.K));
}

// Elements per 16-byte vector.
inline int64_t vector_width(int64_t elem_size) { return 16 / elem_size; }

// D rounded up to the vector width: the row stride of the dz partials.
inline int64_t padded_row(int64_t D, int64_t elem_size) {
  const int64_t w = vector_width(elem_size);
  return (D + w - 1) / w * w;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline bool strides_multiple(const DimList& d, int64_t w, bool g) {
  for (int i = 0; i < d.ndim; ++i) {
    if (d.x_stride[i] % w != 0 || d.z_stride[i] % w != 0) return false;
    if (g && d.g_stride[i] % w != 0) return false;
  }
  return true;
}

// 16-byte accesses need every row start 16-byte aligned: aligned base pointers, and every
// stride between rows (and D, the row stride of the contiguous outputs) a multiple of W.
inline bool vector_ok(const RowGrid& grid, int64_t elem_size, std::initializer_list<const void*> ptrs, bool has_g) {
  const int64_t w = vector_width(elem_size);
  if (grid.D % w != 0 || grid.z_dir_stride % w != 0) return false;
  if (!strides_multiple(grid.group, w, has_g) || !strides_multiple(grid.shared, w, has_g)) return false;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return false;
  return true;
}

}  // namespace cuda
}  // namespace purified_ops
