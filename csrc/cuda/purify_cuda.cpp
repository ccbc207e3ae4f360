// CUDA implementations of purify_forward and purify_backward (TORCH_LIBRARY_IMPL CUDA):
// argument checks, device guard, the current stream, outputs from torch's caching allocator,
// and the launchers of purify_kernels_*.cu. No host sync anywhere (strength is read by the
// kernels from device memory), so the ops can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../purify_host.h"
#include "purify_launch.h"

namespace purified_ops {
namespace cuda {
namespace {

// Work items per z row: shape-only (results never depend on the device). A z row shared by
// many x rows is split so that a call has ~2048 items (enough teams to fill a GPU), each of at
// least `min_rows` rows (the forward refactors G per item; the backward writes a K x D partial).
int64_t cuda_chunks(const RowGrid& grid, int64_t min_rows) {
  if (grid.group_size <= 1 || grid.groups <= 0) return 1;
  constexpr int64_t kTargetItems = 2048;
  const int64_t want = (kTargetItems + grid.groups - 1) / grid.groups;
  return std::max<int64_t>(1, std::min(want, grid.group_size / min_rows));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

bool strides_multiple(const DimList& d, int64_t w, bool g) {
  for (int i = 0; i < d.ndim; ++i) {
    if (d.x_stride[i] % w != 0 || d.z_stride[i] % w != 0) return false;
    if (g && d.g_stride[i] % w != 0) return false;
  }
  return true;
}

// 16-byte accesses need every row start 16-byte aligned: aligned base pointers, and every
// stride between rows (and D, the row stride of the contiguous outputs) a multiple of W.
bool vector_ok(const RowGrid& grid, int64_t elem_size, std::initializer_list<const void*> ptrs,
               bool has_g) {
  const int64_t w = 16 / elem_size;
  if (grid.D % w != 0 || grid.z_dir_stride % w != 0) return false;
  if (!strides_multiple(grid.group, w, has_g) || !strides_multiple(grid.shared, w, has_g)) return false;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return false;
  return true;
}

int64_t leading_rows(const at::Tensor& x) {
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

// K > kMaxCudaFusedK: the same math through ATen ops (correct, not fused; no host sync). The
// factor comes from row_math's Cholesky (launch_factor_grams), pivot floor included.
//
// A z row shared by many x rows (size-1 leading dims of z) is never expanded per row: x's
// leading dims are permuted group-first, so x is [G, T, D] (G the z rows, T the x rows each
// one serves; a view when the layout allows, else one copy of x) and z is [G, K, D] (a view
// or a z-sized copy). Every product is then a batched matmul over the G z rows with the T x
// rows as columns; at::matmul on [.., 1, K, D] against [.., T, D, 1] would instead expand z to
// [.., T, K, D] and copy it (N K D elements), and the factor to [.., T, K, K] for the solve.
// dz of a shared z row, the sum over its T x rows, is one bmm reduction over T (cuBLAS: a
// fixed order for given shapes and device, no atomics), not an [N, K, D] tensor then summed.
struct GroupedRows {
  std::vector<int64_t> perm;  // x's leading dims: z's own (group) dims first, then shared ones
  int64_t G = 1, T = 1;
};

GroupedRows group_rows(const at::Tensor& x, const at::Tensor& z) {
  GroupedRows r;
  const int64_t lead = x.dim() - 1;
  std::vector<int64_t> shared;
  for (int64_t i = 0; i < lead; ++i) {
    if (z.size(i) == 1 && x.size(i) != 1) {
      shared.push_back(i);
      r.T *= x.size(i);
    } else {
      r.perm.push_back(i);
      r.G *= x.size(i);
    }
  }
  r.perm.insert(r.perm.end(), shared.begin(), shared.end());
  return r;
}

// [..., last] tensor t (x's leading dims) as [G, T, last] in the accumulate dtype.
at::Tensor to_grouped(const at::Tensor& t, const GroupedRows& r, at::ScalarType acc) {
  std::vector<int64_t> perm = r.perm;
  perm.push_back(t.dim() - 1);
  return t.permute(perm).reshape({r.G, r.T, t.size(-1)}).to(acc);
}

// z [..., K, D] as [G, K, D] in the accumulate dtype (z's shared dims have size 1).
at::Tensor z_grouped(const at::Tensor& z, const GroupedRows& r, at::ScalarType acc) {
  std::vector<int64_t> perm = r.perm;
  perm.push_back(z.dim() - 2);
  perm.push_back(z.dim() - 1);
  return z.permute(perm).reshape({r.G, z.size(-2), z.size(-1)}).to(acc);
}

// The inverse of to_grouped: [G, T, last] back to x's leading dims, contiguous, dtype `out`.
at::Tensor from_grouped(const at::Tensor& t3, const at::Tensor& x, const GroupedRows& r, at::ScalarType out) {
  std::vector<int64_t> shape, inverse(r.perm.size() + 1);
  for (size_t j = 0; j < r.perm.size(); ++j) {
    shape.push_back(x.size(r.perm[j]));
    inverse[r.perm[j]] = static_cast<int64_t>(j);
  }
  shape.push_back(t3.size(-1));
  inverse.back() = static_cast<int64_t>(r.perm.size());
  return t3.reshape(shape).permute(inverse).to(out).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_unfused(const at::Tensor& x, const at::Tensor& z,
                                                               const at::Tensor& strength, double eps) {
  // The products below are cuBLAS matmuls: with torch.backends.cuda.matmul.allow_tf32 (or
  // float32 matmul precision "high") they would round float32 to TF32's 10-bit mantissa, and the
  // Gram matrix would lose the accuracy the op promises. Off for this thread, for this call.
  const at::NoTF32Guard no_tf32;
  const auto acc = accumulate_type(x.scalar_type());
  const GroupedRows r = group_rows(x, z);
  const at::Tensor xg = to_grouped(x, r, acc), zg = z_grouped(z, r, acc);  // [G, T, D], [G, K, D]
  const int64_t K = z.size(-2);
  at::Tensor L = (at::bmm(zg, zg.transpose(1, 2)) + eps * at::eye(K, zg.options())).contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(acc == at::kDouble
                     ? launch_factor_grams_f64(L.mutable_data_ptr<double>(), r.G, static_cast<int>(K), eps, stream)
                     : launch_factor_grams_f32(L.mutable_data_ptr<float>(), r.G, static_cast<int>(K), eps, stream));
  const at::Tensor c = at::cholesky_solve(at::bmm(zg, xg.transpose(1, 2)), L).transpose(1, 2);  // [G, T, K]
  const at::Tensor y = xg - strength * at::bmm(c, zg);
  std::vector<int64_t> chol_shape = z.sizes().vec();
  chol_shape.back() = K;
  return {from_grouped(y, x, r, x.scalar_type()), from_grouped(c, x, r, acc), L.reshape(chol_shape)};
}

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
  const at::Tensor u = at::cholesky_solve(at::bmm(zg, gg.transpose(1, 2)), chol.reshape({r.G, K, K}));  // [G, K, T]
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

// The forward into given outputs; x and z have unit last stride, the device guard is held.
void forward_into(const at::Tensor& x, const at::Tensor& z, const at::Tensor& strength, double eps,
                  at::Tensor& y, at::Tensor& coeff, at::Tensor& chol) {
  if (z.size(-2) > kMaxCudaFusedK) {
    auto [y_u, coeff_u, chol_u] = forward_unfused(x, z, strength, eps);
    y.copy_(y_u);
    coeff.copy_(coeff_u);
    chol.copy_(chol_u);
    return;
  }
  if (leading_rows(x) == 0) {
    chol.zero_();  // no rows: nothing reads the factor, but it is defined
    return;
  }
  ForwardParams p;
  p.x = x.const_data_ptr();
  p.z = z.const_data_ptr();
  p.strength = strength.const_data_ptr();
  p.y = y.mutable_data_ptr();
  p.coeff = coeff.mutable_data_ptr();
  p.chol = chol.mutable_data_ptr();
  p.grid = make_row_grid(x, z, nullptr);
  p.eps = eps;
  p.chunks = cuda_chunks(p.grid, 16);
  p.vec = vector_ok(p.grid, x.element_size(), {p.x, p.z, p.y}, false);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(PURIFY_DISPATCH_LAUNCH(x.scalar_type(), forward, p, stream));
}

// The backward into given outputs (dz unused unless compute_grad_z); same preconditions.
void backward_into(const at::Tensor& g, const at::Tensor& x, const at::Tensor& z, const at::Tensor& strength,
                   const at::Tensor& coeff, const at::Tensor& chol, bool compute_grad_z, at::Tensor& dx,
                   at::Tensor& dz, at::Tensor& ds) {
  if (z.size(-2) > kMaxCudaFusedK) {
    auto [dx_u, dz_u, ds_u] = backward_unfused(g, x, z, strength, coeff, chol, compute_grad_z);
    dx.copy_(dx_u);
    if (compute_grad_z) dz.copy_(dz_u);
    ds.copy_(ds_u);
    return;
  }
  if (leading_rows(x) == 0) {
    if (compute_grad_z) dz.zero_();
    ds.zero_();
    return;
  }
  BackwardParams p;
  p.grid = make_row_grid(x, z, &g);
  const int64_t K = p.grid.K, D = p.grid.D;
  const int64_t w = 16 / x.element_size();
  p.Dp = (D + w - 1) / w * w;
  p.chunks = cuda_chunks(p.grid, std::max<int64_t>(16, 4 * K));
  const int64_t items = p.grid.groups * p.chunks;
  const auto acc_opts = x.options().dtype(accumulate_type(x.scalar_type()));
  at::Tensor gp_partial = at::empty({items}, acc_opts);
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
  p.gp_partial = gp_partial.mutable_data_ptr();
  p.ds = ds.mutable_data_ptr();
  p.vec = vector_ok(p.grid, x.element_size(), {p.g, p.x, p.z, p.dx, p.dz}, true);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(PURIFY_DISPATCH_LAUNCH(x.scalar_type(), backward, p, stream));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> purify_forward_cuda(const at::Tensor& x_in, const at::Tensor& z_in,
                                                                  const at::Tensor& strength, double eps) {
  check_forward_args(x_in, z_in, strength, eps, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = unit_last_stride(x_in);
  const at::Tensor z = unit_last_stride(z_in);
  if (z.size(-2) > kMaxCudaFusedK) return forward_unfused(x, z, strength, eps);
  auto [y, coeff, chol] = allocate_forward_outputs(x, z);
  forward_into(x, z, strength, eps, y, coeff, chol);
  return {y, coeff, chol};
}

void purify_forward_out_cuda(const at::Tensor& x_in, const at::Tensor& z_in, const at::Tensor& strength,
                             double eps, at::Tensor& y, at::Tensor& coeff, at::Tensor& chol) {
  check_forward_args(x_in, z_in, strength, eps, c10::DeviceType::CUDA);
  check_forward_outputs(x_in, z_in, y, coeff, chol);
  const c10::cuda::CUDAGuard guard(x_in.device());
  forward_into(unit_last_stride(x_in), unit_last_stride(z_in), strength, eps, y, coeff, chol);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> purify_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& z_in,
    const at::Tensor& strength, const at::Tensor& coeff, const at::Tensor& chol,
    bool compute_grad_z) {
  check_backward_args(grad_y_in, x_in, z_in, strength, coeff, chol, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor g = unit_last_stride(grad_y_in);
  const at::Tensor x = unit_last_stride(x_in);
  const at::Tensor z = unit_last_stride(z_in);
  if (z.size(-2) > kMaxCudaFusedK) return backward_unfused(g, x, z, strength, coeff, chol, compute_grad_z);
  auto [dx, dz, ds] = allocate_backward_outputs(x, z, compute_grad_z);
  backward_into(g, x, z, strength, coeff, chol, compute_grad_z, dx, dz, ds);
  return {dx, dz, ds};
}

void purify_backward_out_cuda(const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& z_in,
                              const at::Tensor& strength, const at::Tensor& coeff, const at::Tensor& chol,
                              bool compute_grad_z, at::Tensor& dx, at::Tensor& dz, at::Tensor& ds) {
  check_backward_args(grad_y_in, x_in, z_in, strength, coeff, chol, c10::DeviceType::CUDA);
  check_backward_outputs(x_in, z_in, compute_grad_z, dx, dz, ds);
  const c10::cuda::CUDAGuard guard(x_in.device());
  backward_into(unit_last_stride(grad_y_in), unit_last_stride(x_in), unit_last_stride(z_in), strength, coeff,
                chol, compute_grad_z, dx, dz, ds);
}

}  // namespace

TORCH_LIBRARY_IMPL(purified_ops, CUDA, m) {
  m.impl("purify_forward", &purify_forward_cuda);
  m.impl("purify_backward", &purify_backward_cuda);
  m.impl("purify_forward_out", &purify_forward_out_cuda);
  m.impl("purify_backward_out", &purify_backward_out_cuda);
}

}  // namespace cuda
}  // namespace purified_ops
