#include "purify_host.h"

#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace purified_ops {

at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

double arithmetic_tiny(at::ScalarType acc) {
  return acc == at::kDouble ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
}

double arithmetic_max(at::ScalarType acc) {
  return acc == at::kDouble ? std::numeric_limits<double>::max() : std::numeric_limits<float>::max();
}

// The saved per-row and per-z-row values: [*x.shape[:-1], K] and [*z.shape[:-2], K, K].
static std::vector<int64_t> coeff_shape(const at::Tensor& x, const at::Tensor& z) {
  auto shape = x.sizes().vec();
  shape.back() = z.size(-2);
  return shape;
}

static std::vector<int64_t> chol_shape(const at::Tensor& z) {
  auto shape = z.sizes().vec();
  shape.back() = z.size(-2);
  return shape;
}

// `t` must be a contiguous tensor of this shape and dtype on `device` (no tensors made: these
// checks run on every call).
static void check_matches(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef sizes,
                          at::ScalarType dtype, c10::Device device) {
  TORCH_CHECK_VALUE(t.sizes() == sizes && t.scalar_type() == dtype && t.is_contiguous() && t.device() == device,
                    op, ": ", name, " must be a contiguous ", sizes, " ", dtype, " tensor on ", device, ", got ",
                    t.sizes(), " ", t.scalar_type(), " on ", t.device(), t.is_contiguous() ? "" : " (not contiguous)");
}

static bool is_supported_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

at::Tensor Strength::as_tensor(const at::TensorOptions& options) const {
  return tensor_ != nullptr ? *tensor_ : at::scalar_tensor(value_, options);
}

// The raw ops' contract: the canonical form that purified_ops::purify (purify_public.cpp, which
// owns the public API's checks and messages) passes on. These checks own what a direct caller of
// torch.ops.purified_ops.purify_* gets: messages name the op and the canonical form. Through the
// public API they never fire.
static void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& z, Strength strength,
                         c10::DeviceType device_type) {
  TORCH_CHECK_TYPE(is_supported_dtype(x.scalar_type()),
                   op, ": x must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_TYPE(z.scalar_type() == x.scalar_type(), op, ": z must have x's dtype ", x.scalar_type(),
                   ", got ", z.scalar_type(), " (purified_ops.purify promotes)");
  TORCH_CHECK_VALUE(x.dim() >= 1 && z.dim() == x.dim() + 1 && z.size(-1) == x.size(-1) && z.size(-2) >= 1,
                    op, ": x must be [..., D] and z [..., K, D] with one dim more, the same D and K >= 1; got x ",
                    x.sizes(), " and z ", z.sizes(), " (purified_ops.purify also takes z [..., D])");
  for (const auto i : c10::irange(x.dim() - 1)) {
    TORCH_CHECK_VALUE(z.size(i) == x.size(i) || z.size(i) == 1, op, ": z's dim ", i, " (", z.size(i),
                      ") must be x's (", x.size(i), ") or 1; got x ", x.sizes(), " and z ", z.sizes());
  }
  TORCH_CHECK_VALUE(x.device() == z.device(), op, ": x and z must be on one device; got ", x.device(), " and ",
                    z.device());
  TORCH_CHECK_VALUE(x.device().type() == device_type, op, ": this kernel serves ", device_type,
                    " tensors, got ", x.device());
  const auto acc = accumulate_type(x.scalar_type());
  if (const at::Tensor* s = strength.tensor()) {
    TORCH_CHECK_VALUE(s->device() == x.device(), op, ": strength must be on x's device (", x.device(), "), got ",
                      s->device());
    TORCH_CHECK_VALUE(s->dim() == 0 && s->scalar_type() == acc, op, ": strength must be a 0-dim ", acc,
                      " tensor, got shape ", s->sizes(), " and dtype ", s->scalar_type());
  } else {
    // The kernels cast it to the arithmetic dtype: it must stay finite there.
    TORCH_CHECK_VALUE(std::abs(strength.value()) <= arithmetic_max(acc), op, ": strength must be finite in ", acc,
                      ", got ", strength.value());
  }
}

void check_forward_args(const char* op, const at::Tensor& x, const at::Tensor& z, Strength strength,
                        double eps, c10::DeviceType device_type) {
  check_inputs(op, x, z, strength, device_type);
  // A normal number of the arithmetic dtype: CUDA flushes a subnormal one to zero (and G of a
  // zero z would be singular).
  const auto acc = accumulate_type(x.scalar_type());
  TORCH_CHECK_VALUE(eps >= arithmetic_tiny(acc) && eps <= arithmetic_max(acc), op, ": eps must be a normal ", acc,
                    " number, in [", arithmetic_tiny(acc), ", ", arithmetic_max(acc), "], got ", eps);
}

void check_backward_args(const char* op, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& z,
                         const at::Tensor& strength, const at::Tensor& coeff,
                         const at::Tensor& chol, c10::DeviceType device_type) {
  check_inputs(op, x, z, strength, device_type);
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type() &&
                        grad_y.device() == x.device(),
                    op, ": grad_y must match x (", x.sizes(), ", ", x.scalar_type(),
                    "); got ", grad_y.sizes(), ", ", grad_y.scalar_type(), " on ", grad_y.device());
  const auto acc = accumulate_type(x.scalar_type());
  check_matches(op, "coeff", coeff, coeff_shape(x, z), acc, x.device());
  check_matches(op, "chol", chol, chol_shape(z), acc, x.device());
}

void check_forward_outputs(const at::Tensor& x, const at::Tensor& z, const at::Tensor& y,
                           const at::Tensor& coeff, const at::Tensor& chol) {
  const auto acc = accumulate_type(x.scalar_type());
  check_matches("purify_forward_out", "y", y, x.sizes(), x.scalar_type(), x.device());
  check_matches("purify_forward_out", "coeff", coeff, coeff_shape(x, z), acc, x.device());
  check_matches("purify_forward_out", "chol", chol, chol_shape(z), acc, x.device());
}

void check_backward_outputs(const at::Tensor& x, const at::Tensor& z, bool compute_grad_z,
                            const at::Tensor& dx, const at::Tensor& dz, const at::Tensor& ds) {
  check_matches("purify_backward_out", "grad_x", dx, x.sizes(), x.scalar_type(), x.device());
  const std::vector<int64_t> no_dz{0};
  check_matches("purify_backward_out", "grad_z", dz, compute_grad_z ? z.sizes() : at::IntArrayRef(no_dz),
                z.scalar_type(), x.device());
  check_matches("purify_backward_out", "grad_strength", ds, {}, accumulate_type(x.scalar_type()), x.device());
}

at::Tensor unit_last_stride(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// Appends the next outer dim to `dims` (filled inner to outer), merged into the previous,
// inner one when every tensor's strides make the two one dim; false when `dims` is full.
static bool push_outer_dim(DimList& dims, int64_t size, int64_t xs, int64_t gs, int64_t rs,
                           int64_t zs) {
  if (dims.ndim > 0) {
    const int p = dims.ndim - 1;
    const int64_t n = dims.size[p];
    if (xs == dims.x_stride[p] * n && gs == dims.g_stride[p] * n &&
        rs == dims.row_stride[p] * n && zs == dims.z_stride[p] * n) {
      dims.size[p] *= size;
      return true;
    }
  }
  if (dims.ndim == kMaxGridDims) return false;
  dims.size[dims.ndim] = size;
  dims.x_stride[dims.ndim] = xs;
  dims.g_stride[dims.ndim] = gs;
  dims.row_stride[dims.ndim] = rs;
  dims.z_stride[dims.ndim] = zs;
  ++dims.ndim;
  return true;
}

// Reverses a list filled inner to outer, since decode_offsets reads outermost first.
static DimList outer_first(const DimList& r) {
  DimList d;
  for (int k = r.ndim - 1; k >= 0; --k) {
    d.size[d.ndim] = r.size[k];
    d.x_stride[d.ndim] = r.x_stride[k];
    d.g_stride[d.ndim] = r.g_stride[k];
    d.row_stride[d.ndim] = r.row_stride[k];
    d.z_stride[d.ndim] = r.z_stride[k];
    ++d.ndim;
  }
  return d;
}

bool try_make_row_grid(const at::Tensor& x, const at::Tensor& z, const at::Tensor* grad_y, RowGrid* out) {
  RowGrid& grid = *out;
  grid = RowGrid();
  grid.D = x.size(-1);
  grid.K = static_cast<int>(z.size(-2));
  grid.z_dir_stride = z.stride(-2);
  grid.groups = 1;
  grid.group_size = 1;
  const int64_t lead = x.dim() - 1;
  int64_t row_stride = 1;
  // Walk from the innermost leading dim outwards: row strides are then the contiguous ones.
  DimList group_rev, shared_rev;
  for (int64_t i = lead - 1; i >= 0; --i) {
    const int64_t n = x.size(i);
    if (n != 1) {
      const int64_t gs = grad_y ? grad_y->stride(i) : 0;
      if (z.size(i) == 1) {
        if (!push_outer_dim(shared_rev, n, x.stride(i), gs, row_stride, 0)) return false;
        grid.group_size *= n;
      } else {
        if (!push_outer_dim(group_rev, n, x.stride(i), gs, row_stride, z.stride(i))) return false;
        grid.groups *= n;
      }
    }
    row_stride *= n;
  }
  grid.group = outer_first(group_rev);
  grid.shared = outer_first(shared_rev);
  return true;
}

RowGrid make_row_grid(const at::Tensor& x, const at::Tensor& z, const at::Tensor* grad_y) {
  RowGrid grid;
  TORCH_CHECK(try_make_row_grid(x, z, grad_y, &grid), "purify: internal error: x ", x.sizes(), " ", x.strides(),
              " and z ", z.sizes(), " ", z.strides(), " reached a kernel without being grouped for the row grid");
  return grid;
}

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
  int64_t last = -1;  // the order of x's rows is the order of its non-unit dims
  for (const int64_t i : r.perm) {
    if (x.size(i) == 1) continue;
    r.in_order = r.in_order && i > last;
    last = i;
  }
  return r;
}

at::Tensor to_grouped(const at::Tensor& t, const GroupedRows& r, at::ScalarType dtype) {
  std::vector<int64_t> perm = r.perm;
  perm.push_back(t.dim() - 1);
  return t.permute(perm).reshape({r.G, r.T, t.size(-1)}).to(dtype);
}

at::Tensor z_grouped(const at::Tensor& z, const GroupedRows& r, at::ScalarType dtype) {
  std::vector<int64_t> perm = r.perm;
  perm.push_back(z.dim() - 2);
  perm.push_back(z.dim() - 1);
  return z.permute(perm).reshape({r.G, z.size(-2), z.size(-1)}).to(dtype);
}

// [G, T, last] with x's leading dims (x's sizes), in x's order (a view of t3).
static at::Tensor ungrouped(const at::Tensor& t3, at::IntArrayRef x_sizes, const GroupedRows& r) {
  std::vector<int64_t> shape, inverse(r.perm.size() + 1);
  for (size_t j = 0; j < r.perm.size(); ++j) {
    shape.push_back(x_sizes[r.perm[j]]);
    inverse[r.perm[j]] = static_cast<int64_t>(j);
  }
  shape.push_back(t3.size(-1));
  inverse.back() = static_cast<int64_t>(r.perm.size());
  return t3.reshape(shape).permute(inverse);
}

at::Tensor from_grouped(const at::Tensor& t3, const at::Tensor& x, const GroupedRows& r, at::ScalarType dtype) {
  return ungrouped(t3, x.sizes(), r).to(dtype).contiguous();
}

at::Tensor GroupedCall::rows(const at::Tensor& t) const {
  return to_grouped(t, rows_, t.scalar_type()).contiguous();
}

at::Tensor GroupedCall::directions(const at::Tensor& z) const {
  return z_grouped(z, rows_, z.scalar_type()).unsqueeze(1);
}

at::Tensor GroupedCall::per_z_row(const at::Tensor& t) const {
  return t.view({rows_.G, 1, t.size(-2), t.size(-1)});
}

at::Tensor GroupedCall::output(const at::Tensor& out) const {
  if (rows_.in_order) return out.view({rows_.G, rows_.T, out.size(-1)});
  return at::empty({rows_.G, rows_.T, out.size(-1)}, out.options());
}

void GroupedCall::finish(const at::Tensor& out, const at::Tensor& written) const {
  if (!rows_.in_order) out.copy_(ungrouped(written, x_sizes_, rows_));
}

at::Tensor empty_like_device(at::IntArrayRef sizes, at::ScalarType dtype, const at::Tensor& like) {
  return at::empty(sizes, like.options().dtype(dtype));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_forward_outputs(const at::Tensor& x,
                                                                        const at::Tensor& z, EmptyFn empty) {
  const auto acc = x.options().dtype(accumulate_type(x.scalar_type()));
  return {empty(x.sizes(), x.scalar_type(), x), at::empty(coeff_shape(x, z), acc), at::empty(chol_shape(z), acc)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_backward_outputs(const at::Tensor& x,
                                                                         const at::Tensor& z,
                                                                         bool compute_grad_z, EmptyFn empty) {
  const auto acc = x.options().dtype(accumulate_type(x.scalar_type()));
  return {empty(x.sizes(), x.scalar_type(), x),
          compute_grad_z ? empty(z.sizes(), z.scalar_type(), z) : at::empty({0}, z.options()),
          at::empty({}, acc)};
}

}  // namespace purified_ops
