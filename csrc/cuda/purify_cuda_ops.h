// The torch side of the CUDA ops, shared by the CUDA build (purify_cuda.cpp) and the emulated
// one (csrc/cuda_emu/purify_emu.cpp): outputs, the launch plan (purify_launch_plan.h) into the
// launchers of purify_kernels_*.cu, and the K > 16 path (ATen batched products around
// launch_factor_grams). No host sync anywhere (a strength tensor is read by the kernels from
// device memory, a number is passed by value), so the ops can be captured in a CUDA graph.
//
// `Dev` is where the kernels run:
//   kDeviceType         the tensors' device type (CUDA; CPU for the emulation)
//   Guard               a device guard constructed from a c10::Device
//   stream()            the cudaStream_t to launch on
//   check(cudaError_t)  raises on a launch error
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "../purify_host.h"
#include "purify_launch.h"
#include "purify_launch_plan.h"

namespace purified_ops {
namespace cuda {

inline int64_t leading_rows(const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) rows *= x.size(i);
  return rows;
}

#define PURIFY_DISPATCH_LAUNCH(DTYPE, KIND, P, STREAM)                               \
  [&]() -> cudaError_t {                                                             \
    switch (DTYPE) {                                                                 \
      case at::kHalf: return launch_##KIND##_f16(P, STREAM);                         \
      case at::kBFloat16: return launch_##KIND##_bf16(P, STREAM);                    \
      case at::kFloat: return launch_##KIND##_f32(P, STREAM);                        \
      case at::kDouble: return launch_##KIND##_f64(P, STREAM);                       \
      default: TORCH_CHECK(false, "purify: unsupported dtype ", DTYPE);              \
    }                                                                                \
  }()

// K > kMaxCudaFusedK (uses_fused_kernels false): the same math through ATen ops (correct, not
// fused; no host sync). The factor comes from row_math's Cholesky (launch_factor_grams), its
// rule for dependent directions included.
//
// A z row shared by many x rows (size-1 leading dims of z) is never expanded per row: x's
// leading dims are permuted group-first (GroupedRows, purify_host.h), so x is [G, T, D] (G the
// z rows, T the x rows each one serves; a view when the layout allows, else one copy of x) and
// z is [G, K, D] (a view or a z-sized copy). Every product is then a batched matmul over the G z
// rows with the T x rows as columns; at::matmul on [.., 1, K, D] against [.., T, D, 1] would
// instead expand z to [.., T, K, D] and copy it (N K D elements), and the factor to
// [.., T, K, K] for the solve. dz of a shared z row, the sum over its T x rows, is one bmm
// reduction over T (cuBLAS: a fixed order for given shapes and device, no atomics), not an
// [N, K, D] tensor then summed.
// Per z row, 1 / m of the power of two the directions are divided by (row_math.h), and with
// `eps_scaled` also eps / m^2 into it ([G] each): the set's factor and solves are computed
// scaled, exactly the unscaled ones wherever nothing over- or underflows.
template <typename Dev>
at::Tensor direction_scales(const at::Tensor& zg, double eps, at::Tensor* eps_scaled) {
  const at::Tensor amax = zg.numel() == 0 ? at::zeros({zg.size(0)}, zg.options()) : zg.abs().amax({1, 2}).contiguous();
  at::Tensor inv_m = at::empty_like(amax);
  if (eps_scaled != nullptr) *eps_scaled = at::empty_like(amax);
  const int64_t G = amax.size(0), D = zg.size(2);
  AT_DISPATCH_FLOATING_TYPES(amax.scalar_type(), "direction_scales", [&] {
    Dev::check(launch_direction_scales(amax.const_data_ptr<scalar_t>(), G, D, eps, inv_m.mutable_data_ptr<scalar_t>(),
                                       eps_scaled ? eps_scaled->mutable_data_ptr<scalar_t>() : nullptr, Dev::stream()));
  });
  return inv_m.view({G, 1, 1});
}

// (L L^T)^{-1} rhs per z row for a factor L in pivot order with its order ([G, K] int64): rhs
// [G, K, T] is permuted into pivot order and the solution back.
// The result keeps cholesky_solve's layout (the products after it then take the same path as
// without pivoting: bitwise the same results where the order is the identity).
inline at::Tensor pivoted_solve(const at::Tensor& rhs, const at::Tensor& lower, const at::Tensor& order) {
  const at::Tensor idx = order.unsqueeze(-1).expand_as(rhs);
  const at::Tensor sol = at::cholesky_solve(rhs.gather(1, idx), lower);
  return at::empty_like(sol).scatter_(1, idx, sol);
}

template <typename Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_unfused(const at::Tensor& x, const at::Tensor& z,
                                                               Strength strength, double eps) {
  // The products below are cuBLAS matmuls: with torch.backends.cuda.matmul.allow_tf32 (or
  // float32 matmul precision "high") they would round float32 to TF32's 10-bit mantissa, and the
  // Gram matrix would lose the accuracy the op promises. Off for this thread, for this call.
  const at::NoTF32Guard no_tf32;
  const auto acc = accumulate_type(x.scalar_type());
  const GroupedRows r = group_rows(x, z);
  const at::Tensor xg = to_grouped(x, r, acc), zg = z_grouped(z, r, acc);  // [G, T, D], [G, K, D]
  const int64_t K = z.size(-2);
  // Every z row scaled (like the reference): G = Z Z^T cannot overflow, nor can Z x where x's
  // norm is representable.
  at::Tensor eps_s;
  const at::Tensor inv_m = direction_scales<Dev>(zg, eps, &eps_s);
  const at::Tensor zs = zg * inv_m;
  at::Tensor L = (at::bmm(zs, zs.transpose(1, 2)) + eps_s.view({r.G, 1, 1}) * at::eye(K, zg.options())).contiguous();
  at::Tensor order = at::empty({r.G, K}, zg.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(acc, "factor_grams", [&] {
    Dev::check(launch_factor_grams(L.mutable_data_ptr<scalar_t>(), order.mutable_data_ptr<int>(), r.G,
                                   static_cast<int>(K), eps_s.const_data_ptr<scalar_t>(), Dev::stream()));
  });
  const at::Tensor idx = order.to(at::kLong);
  // c = c' / m: y and the backward work with the unscaled z
  const at::Tensor c = (pivoted_solve(at::bmm(zs, xg.transpose(1, 2)), L, idx) * inv_m).transpose(1, 2);  // [G, T, K]
  const at::Tensor y = xg - strength.as_tensor(xg.options().dtype(acc)) * at::bmm(c, zg);
  // The factor in direction rows (row_math.h's factor_rows_by_direction), of the unscaled G: m L'.
  const at::Tensor chol = at::zeros_like(L).scatter_(1, idx.unsqueeze(-1).expand_as(L), L) / inv_m;
  std::vector<int64_t> chol_shape = z.sizes().vec();
  chol_shape.back() = K;
  return {from_grouped(y, x, r, x.scalar_type()), from_grouped(c, x, r, acc), chol.reshape(chol_shape)};
}

template <typename Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_unfused(const at::Tensor& g, const at::Tensor& x,
                                                                const at::Tensor& z, const at::Tensor& strength,
                                                                const at::Tensor& coeff, const at::Tensor& chol,
                                                                bool compute_grad_z) {
  const at::NoTF32Guard no_tf32;  // as in forward_unfused
  const auto acc = accumulate_type(x.scalar_type());
  const GroupedRows r = group_rows(x, z);
  const int64_t K = z.size(-2);
  const at::Tensor xg = to_grouped(x, r, acc), gg = to_grouped(g, r, acc), zg = z_grouped(z, r, acc);
  const at::Tensor cg = to_grouped(coeff, r, acc);                                    // [G, T, K]
  // u = G^{-1} Z g with Z / m and the factor / m (m brings the largest |z| entry to [1, 2)):
  // Z g cannot overflow where g's norm is representable. The factor is in direction rows.
  const at::Tensor inv_m = direction_scales<Dev>(zg, 0.0, nullptr);
  const at::Tensor chol_g = chol.reshape({r.G, K, K}).contiguous();
  at::Tensor order = at::empty({r.G, K}, zg.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(acc, "factor_orders", [&] {
    Dev::check(launch_factor_orders(chol_g.const_data_ptr<scalar_t>(), order.mutable_data_ptr<int>(), r.G,
                                    static_cast<int>(K), Dev::stream()));
  });
  const at::Tensor idx = order.to(at::kLong);
  const at::Tensor lower = chol_g.gather(1, idx.unsqueeze(-1).expand_as(chol_g)) * inv_m;  // pivot order
  const at::Tensor u = pivoted_solve(at::bmm(zg * inv_m, gg.transpose(1, 2)), lower, idx) * inv_m;  // [G, K, T]
  const at::Tensor p = at::bmm(cg, zg);                                               // [G, T, D]
  const at::Tensor q = at::bmm(u.transpose(1, 2), zg);
  at::Tensor dx = from_grouped(gg - strength * q, x, r, x.scalar_type());
  at::Tensor dz = at::empty({0}, z.options());
  if (compute_grad_z) {
    // sum over the T rows of c (g - q)^T + u (x - p)^T, as two [K, T] x [T, D] products
    const at::Tensor sum = at::baddbmm(at::bmm(cg.transpose(1, 2), gg - q), u, xg - p);  // [G, K, D]
    dz = (-strength * sum).reshape(z.sizes()).to(z.scalar_type()).contiguous();
  }
  at::Tensor ds = -(gg * p).sum();
  return {dx, dz, ds};
}

// The fused forward into given outputs (K <= kMaxCudaFusedK); x and z have unit last stride,
// the device guard is held.
template <typename Dev>
void fused_forward_into(const at::Tensor& x_in, const at::Tensor& z_in, Strength strength, double eps,
                        at::Tensor& y_out, at::Tensor& coeff_out, at::Tensor& chol_out) {
  if (leading_rows(x_in) == 0) {
    chol_out.zero_();  // no rows: nothing reads the factor, but it is defined
    return;
  }
  forward_in_row_grid(x_in, z_in, y_out, coeff_out, chol_out,
                      [&](const at::Tensor& x, const at::Tensor& z, at::Tensor& y, at::Tensor& coeff,
                          at::Tensor& chol) {
    ForwardParams p;
    p.x = x.const_data_ptr();
    p.z = z.const_data_ptr();
    if (const at::Tensor* s = strength.tensor()) {
      p.strength = s->const_data_ptr();
    } else {
      p.strength_value = strength.value();
    }
    p.y = y.mutable_data_ptr();
    p.coeff = coeff.mutable_data_ptr();
    p.chol = chol.mutable_data_ptr();
    p.grid = make_row_grid(x, z, nullptr);
    p.eps = eps;
    p.chunks = forward_chunks(p.grid);
    p.vec = vector_ok(p.grid, x.element_size(), {p.x, p.z, p.y}, false);
    Dev::check(PURIFY_DISPATCH_LAUNCH(x.scalar_type(), forward, p, Dev::stream()));
  });
}

// The fused backward into given outputs (dz unused unless compute_grad_z); same preconditions.
template <typename Dev>
void fused_backward_into(const at::Tensor& g_in, const at::Tensor& x_in, const at::Tensor& z_in,
                         const at::Tensor& strength, const at::Tensor& coeff_in, const at::Tensor& chol_in,
                         bool compute_grad_z, at::Tensor& dx_out, at::Tensor& dz_out, at::Tensor& ds) {
  if (leading_rows(x_in) == 0) {
    if (compute_grad_z) dz_out.zero_();
    ds.zero_();
    return;
  }
  backward_in_row_grid(g_in, x_in, z_in, coeff_in, chol_in, compute_grad_z, dx_out, dz_out,
                       [&](const at::Tensor& g, const at::Tensor& x, const at::Tensor& z, const at::Tensor& coeff,
                           const at::Tensor& chol, at::Tensor& dx, at::Tensor& dz) {
    BackwardParams p;
    p.grid = make_row_grid(x, z, &g);
    const int64_t K = p.grid.K;
    p.Dp = padded_row(p.grid.D, x.element_size());
    p.chunks = backward_chunks(p.grid);
    const int64_t items = p.grid.groups * p.chunks;
    const auto acc_opts = x.options().dtype(accumulate_type(x.scalar_type()));
    at::Tensor gdotp_partial = at::empty({items}, acc_opts);
    at::Tensor dz_partial;
    if (compute_grad_z && p.grid.group_size > 1) {
      dz_partial = at::empty({items * K * p.Dp}, acc_opts);
      p.dz_partial = dz_partial.mutable_data_ptr();
    }
    p.g = g.const_data_ptr();
    p.x = x.const_data_ptr();
    p.z = z.const_data_ptr();
    p.strength = strength.const_data_ptr();
    p.coeff = coeff.const_data_ptr();
    p.chol = chol.const_data_ptr();
    p.dx = dx.mutable_data_ptr();
    p.dz = compute_grad_z ? dz.mutable_data_ptr() : nullptr;
    p.gdotp_partial = gdotp_partial.mutable_data_ptr();
    p.ds = ds.mutable_data_ptr();
    p.vec = vector_ok(p.grid, x.element_size(), {p.g, p.x, p.z, p.dx, p.dz}, true);
    Dev::check(PURIFY_DISPATCH_LAUNCH(x.scalar_type(), backward, p, Dev::stream()));
  });
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// The one place K picks the path, for either direction: the fused kernels up to kMaxCudaFusedK
// (`fused(outputs)` into `*out` where given, the _out ops, else into `allocate()`), the ATen
// products beyond (`unfused()`, copied into `*out` where given). Returns the outputs.
template <typename Unfused, typename Allocate, typename Fused>
Outputs run_path(int64_t K, Outputs* out, Unfused&& unfused, Allocate&& allocate, Fused&& fused) {
  if (!uses_fused_kernels(K)) {
    Outputs r = unfused();
    if (out == nullptr) return r;
    std::get<0>(*out).copy_(std::get<0>(r));
    std::get<1>(*out).copy_(std::get<1>(r));  // dz not wanted: both are empty
    std::get<2>(*out).copy_(std::get<2>(r));
    return *out;
  }
  Outputs o = out != nullptr ? *out : allocate();
  fused(std::get<0>(o), std::get<1>(o), std::get<2>(o));
  return o;
}

// x and z (and g) have unit last stride and the device guard is held.
template <typename Dev>
Outputs run_forward(const at::Tensor& x, const at::Tensor& z, Strength strength, double eps, Outputs* out) {
  return run_path(
      z.size(-2), out, [&] { return forward_unfused<Dev>(x, z, strength, eps); },
      [&] { return allocate_forward_outputs(x, z); },
      [&](at::Tensor& y, at::Tensor& coeff, at::Tensor& chol) {
        fused_forward_into<Dev>(x, z, strength, eps, y, coeff, chol);
      });
}

template <typename Dev>
Outputs run_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& z, const at::Tensor& strength,
                     const at::Tensor& coeff, const at::Tensor& chol, bool compute_grad_z, Outputs* out) {
  return run_path(
      z.size(-2), out, [&] { return backward_unfused<Dev>(g, x, z, strength, coeff, chol, compute_grad_z); },
      [&] { return allocate_backward_outputs(x, z, compute_grad_z); },
      [&](at::Tensor& dx, at::Tensor& dz, at::Tensor& ds) {
        fused_backward_into<Dev>(g, x, z, strength, coeff, chol, compute_grad_z, dx, dz, ds);
      });
}

template <typename Dev>
Outputs forward_impl(const at::Tensor& x, const at::Tensor& z, Strength strength, double eps) {
  check_forward_args("purify_forward", x, z, strength, eps, Dev::kDeviceType);
  const typename Dev::Guard guard(x.device());
  return run_forward<Dev>(unit_last_stride(x), unit_last_stride(z), strength, eps, nullptr);
}

template <typename Dev>
Outputs purify_forward_impl(const at::Tensor& x, const at::Tensor& z, const at::Tensor& strength, double eps) {
  return forward_impl<Dev>(x, z, strength, eps);
}

template <typename Dev>
Outputs purify_forward_float_impl(const at::Tensor& x, const at::Tensor& z, double strength, double eps) {
  return forward_impl<Dev>(x, z, Strength(strength), eps);
}

template <typename Dev>
void purify_forward_out_impl(const at::Tensor& x, const at::Tensor& z, const at::Tensor& strength,
                             double eps, at::Tensor& y, at::Tensor& coeff, at::Tensor& chol) {
  check_forward_args("purify_forward_out", x, z, strength, eps, Dev::kDeviceType);
  check_forward_outputs(x, z, y, coeff, chol);
  const typename Dev::Guard guard(x.device());
  Outputs out{y, coeff, chol};
  run_forward<Dev>(unit_last_stride(x), unit_last_stride(z), strength, eps, &out);
}

template <typename Dev>
Outputs purify_backward_impl(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& z,
                             const at::Tensor& strength, const at::Tensor& coeff, const at::Tensor& chol,
                             bool compute_grad_z) {
  check_backward_args("purify_backward", grad_y, x, z, strength, coeff, chol, Dev::kDeviceType);
  const typename Dev::Guard guard(x.device());
  return run_backward<Dev>(unit_last_stride(grad_y), unit_last_stride(x), unit_last_stride(z), strength, coeff,
                           chol, compute_grad_z, nullptr);
}

template <typename Dev>
void purify_backward_out_impl(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& z,
                              const at::Tensor& strength, const at::Tensor& coeff, const at::Tensor& chol,
                              bool compute_grad_z, at::Tensor& dx, at::Tensor& dz, at::Tensor& ds) {
  check_backward_args("purify_backward_out", grad_y, x, z, strength, coeff, chol, Dev::kDeviceType);
  check_backward_outputs(x, z, compute_grad_z, dx, dz, ds);
  const typename Dev::Guard guard(x.device());
  Outputs out{dx, dz, ds};
  run_backward<Dev>(unit_last_stride(grad_y), unit_last_stride(x), unit_last_stride(z), strength, coeff, chol,
                    compute_grad_z, &out);
}

}  // namespace cuda
}  // namespace purified_ops
