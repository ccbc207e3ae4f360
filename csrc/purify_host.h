// Host-side pieces shared by the CPU and CUDA implementations of the registered ops:
// argument checks (a raw op call gets a clear error too, not only the Python API),
// the row grid of a call, and the outputs' allocation. Compiled by the host compiler only.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "row_grid.h"

namespace purified_ops {

// The accumulate type of an input dtype (accumulate_t in row_math.h, at compile time).
at::ScalarType accumulate_type(at::ScalarType t);

// The raw ops' argument checks, shared by every backend's implementation (purify_host.cpp
// says what they own). `op` names the op in messages; `device_type` is the backend's.
void check_forward_args(const char* op, const at::Tensor& x, const at::Tensor& z, const at::Tensor& strength,
                        double eps, c10::DeviceType device_type);
void check_backward_args(const char* op, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& z,
                         const at::Tensor& strength, const at::Tensor& coeff,
                         const at::Tensor& chol, c10::DeviceType device_type);

// Out tensors of the .out overloads must be exactly what allocate_*_outputs would return.
void check_forward_outputs(const at::Tensor& x, const at::Tensor& z, const at::Tensor& y,
                           const at::Tensor& coeff, const at::Tensor& chol);
void check_backward_outputs(const at::Tensor& x, const at::Tensor& z, bool compute_grad_z,
                            const at::Tensor& dx, const at::Tensor& dz, const at::Tensor& ds);

// x and grad_y must have unit stride in the last dim (see unit_last_stride).
RowGrid make_row_grid(const at::Tensor& x, const at::Tensor& z, const at::Tensor* grad_y);

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
