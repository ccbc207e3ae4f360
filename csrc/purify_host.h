// Host-side pieces shared by the CPU and CUDA implementations of the registered ops:
// argument checks (a raw op call gets a clear error too, not only the Python API),
// the row grid of a call, and the outputs' allocation. Compiled by the host compiler only.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

#include "row_grid.h"

namespace purified_ops {

// The accumulate type of an input dtype (accumulate_t in row_math.h, at compile time).
at::ScalarType accumulate_type(at::ScalarType t);
// The smallest normal and the largest finite number of an accumulate type.
double arithmetic_tiny(at::ScalarType acc);
double arithmetic_max(at::ScalarType acc);

// The strength as the forward takes it: a 0-dim accumulate-dtype tensor on x's device
// (purify_forward), or a number (purify_forward.float_strength). Refers to the caller's tensor:
// lives for one call.
class Strength {
 public:
  Strength(const at::Tensor& tensor) : tensor_(&tensor) {}  // NOLINT: a tensor is a strength
  explicit Strength(double value) : value_(value) {}
  const at::Tensor* tensor() const { return tensor_; }  // null: the strength is value()
  double value() const { return value_; }
  // The strength as a 0-dim tensor with these options (the tensor itself where there is one).
  at::Tensor as_tensor(const at::TensorOptions& options) const;

 private:
  const at::Tensor* tensor_ = nullptr;
  double value_ = 0;
};

// The raw ops' argument checks, shared by every backend's implementation (purify_host.cpp
// says what they own). `op` names the op in messages; `device_type` is the backend's.
void check_forward_args(const char* op, const at::Tensor& x, const at::Tensor& z, Strength strength,
                        double eps, c10::DeviceType device_type);
void check_backward_args(const char* op, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& z,
                         const at::Tensor& strength, const at::Tensor& coeff,
                         const at::Tensor& chol, c10::DeviceType device_type);

// Out tensors of the .out overloads must be exactly what allocate_*_outputs would return.
void check_forward_outputs(const at::Tensor& x, const at::Tensor& z, const at::Tensor& y,
                           const at::Tensor& coeff, const at::Tensor& chol);
void check_backward_outputs(const at::Tensor& x, const at::Tensor& z, bool compute_grad_z,
                            const at::Tensor& dx, const at::Tensor& dz, const at::Tensor& ds);

// The row grid of a call (x and grad_y with unit stride in the last dim, see unit_last_stride),
// or false where its layout needs more than kMaxGridDims dims of one kind after merging.
bool try_make_row_grid(const at::Tensor& x, const at::Tensor& z, const at::Tensor* grad_y, RowGrid* grid);
// The same for a call that fits (forward_in_row_grid and backward_in_row_grid see to it).
RowGrid make_row_grid(const at::Tensor& x, const at::Tensor& z, const at::Tensor* grad_y);

// x's leading dims split into z's own (group) dims, first, and the dims z broadcasts over
// (shared) after them, each kind in its order: x's rows as [G, T] (G z rows, T x rows each one
// serves), and z as [G, K, D], a z row shared by many x rows never expanded.
struct GroupedRows {
  std::vector<int64_t> perm;  // x's leading dims, group dims first
  int64_t G = 1, T = 1;
  bool in_order = true;       // the permutation keeps the order of x's rows (size-1 dims aside)
};
GroupedRows group_rows(const at::Tensor& x, const at::Tensor& z);
// [..., last] tensor t with x's leading dims as [G, T, last] in `dtype` (a view where possible).
at::Tensor to_grouped(const at::Tensor& t, const GroupedRows& r, at::ScalarType dtype);
// z [..., K, D] as [G, K, D] in `dtype` (a view where possible).
at::Tensor z_grouped(const at::Tensor& z, const GroupedRows& r, at::ScalarType dtype);
// The inverse of to_grouped: [G, T, last] back to x's leading dims, contiguous, in `dtype`.
at::Tensor from_grouped(const at::Tensor& t3, const at::Tensor& x, const GroupedRows& r, at::ScalarType dtype);

// A call whose rows the grid cannot address in place (a permuted x with many leading dims; more
// than kMaxGridDims alternations of z's own and broadcast dims) runs grouped: x and grad_y as
// [G, T, D] and coeff as [G, T, K] (contiguous: views where they are, else copies), z as
// [G, 1, K, D] (a view or a z-sized copy, never expanded). Row-indexed outputs are views of
// the given ones where the grouping keeps row order, else [G, T, ...] buffers copied back after
// the kernel; z-row-indexed ones (chol, dz) keep their order and are written in place.
class GroupedCall {
 public:
  GroupedCall(const at::Tensor& x, const at::Tensor& z) : x_sizes_(x.sizes().vec()), rows_(group_rows(x, z)) {}
  at::Tensor rows(const at::Tensor& t) const;        // an input with x's leading dims
  at::Tensor directions(const at::Tensor& z) const;  // z
  at::Tensor per_z_row(const at::Tensor& t) const;   // chol or dz: [*z.shape[:-2], a, b] as [G, 1, a, b]
  at::Tensor output(const at::Tensor& out) const;    // where the kernel writes `out`'s rows
  void finish(const at::Tensor& out, const at::Tensor& written) const;  // copies `written` back

 private:
  std::vector<int64_t> x_sizes_;
  GroupedRows rows_;
};

// Runs `run(x, z, y, coeff, chol)` on tensors the row grid addresses: the given ones, or their
// grouped form (GroupedCall). x and z have unit last stride; the outputs are contiguous.
template <typename Run>
void forward_in_row_grid(const at::Tensor& x, const at::Tensor& z, at::Tensor& y, at::Tensor& coeff,
                         at::Tensor& chol, Run&& run) {
  RowGrid grid;
  if (try_make_row_grid(x, z, nullptr, &grid)) {
    run(x, z, y, coeff, chol);
    return;
  }
  const GroupedCall call(x, z);
  at::Tensor y_rows = call.output(y), coeff_rows = call.output(coeff), chol_rows = call.per_z_row(chol);
  run(call.rows(x), call.directions(z), y_rows, coeff_rows, chol_rows);
  call.finish(y, y_rows);
  call.finish(coeff, coeff_rows);
}

// Runs `run(g, x, z, coeff, chol, dx, dz)` likewise (dz is [0] unless compute_grad_z).
template <typename Run>
void backward_in_row_grid(const at::Tensor& g, const at::Tensor& x, const at::Tensor& z, const at::Tensor& coeff,
                          const at::Tensor& chol, bool compute_grad_z, at::Tensor& dx, at::Tensor& dz, Run&& run) {
  RowGrid grid;
  if (try_make_row_grid(x, z, &g, &grid)) {
    run(g, x, z, coeff, chol, dx, dz);
    return;
  }
  const GroupedCall call(x, z);
  at::Tensor dx_rows = call.output(dx), dz_rows = compute_grad_z ? call.per_z_row(dz) : dz;
  run(call.rows(g), call.rows(x), call.directions(z), call.rows(coeff), call.per_z_row(chol), dx_rows, dz_rows);
  call.finish(dx, dx_rows);
}

// `t` itself when its last dim is contiguous (or has one element), else a contiguous copy.
at::Tensor unit_last_stride(const at::Tensor& t);

// Makes an uninitialized contiguous tensor of this shape and dtype on `like`'s device.
using EmptyFn = at::Tensor (*)(at::IntArrayRef sizes, at::ScalarType dtype, const at::Tensor& like);
at::Tensor empty_like_device(at::IntArrayRef sizes, at::ScalarType dtype, const at::Tensor& like);

// y (x's shape and dtype), coeff ([*x.shape[:-1], K]) and chol ([*z.shape[:-2], K, K]),
// all contiguous, coeff and chol in the accumulate dtype. The Python fake kernel mirrors this.
// `empty` makes the large outputs (y here; dx and dz below).
std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_forward_outputs(const at::Tensor& x,
                                                                        const at::Tensor& z,
                                                                        EmptyFn empty = empty_like_device);
// dx (x's shape), dz (z's shape, or an empty [0] tensor when not wanted), ds (0-dim accumulate).
std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_backward_outputs(const at::Tensor& x,
                                                                         const at::Tensor& z,
                                                                         bool compute_grad_z,
                                                                         EmptyFn empty = empty_like_device);

}  // namespace purified_ops
