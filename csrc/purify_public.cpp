// purified_ops::purify: the public entry point's checks and canonical form, in front of
// purify_forward. It takes what a user passes (z as [..., D] or [..., K, D], x and z of any two
// floating dtypes, the strength as a float or a one-element tensor) and gives each bad input a
// TypeError or ValueError with the message of docs/DESIGN.md ("Errors"), before any kernel runs.
// A CompositeImplicitAutograd kernel: its derivative is purify_forward's, and torch.compile and
// export see the canonical form and purify_forward. Sizes are read as SymInts, so a
// dynamic-shape trace guards on them instead of specializing.
//
// Python keeps only what never reaches a kernel here (purified_ops/ops.py, docs/DESIGN.md):
// non-tensor arguments, nested tensors, and numbers that are not Python floats.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <sstream>
#include <string>

#include "purify_host.h"

namespace purified_ops {
namespace {

// Names as Python prints them (torch.float32, torch.sparse_coo, (3, 8), 1e-06), so the messages
// read as the Python API's.
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kBool: return "torch.bool";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

std::string layout_name(at::Layout layout) {
  switch (layout) {
    case at::kStrided: return "torch.strided";
    case at::kSparse: return "torch.sparse_coo";
    case at::kSparseCsr: return "torch.sparse_csr";
    case at::kSparseCsc: return "torch.sparse_csc";
    case at::kSparseBsr: return "torch.sparse_bsr";
    case at::kSparseBsc: return "torch.sparse_bsc";
    case at::kMkldnn: return "torch._mkldnn";
    case at::kJagged: return "torch.jagged";
    default: {
      std::ostringstream out;
      out << layout;
      return out.str();
    }
  }
}

std::string shape_text(c10::SymIntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (const auto i : c10::irange(sizes.size())) out << (i ? ", " : "") << sizes[i];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

// repr() of a Python float: the shortest digits that read back as v, in positional notation for
// decimal exponents -4 to 15 and scientific notation otherwise.
std::string real_text(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  // The fewest significant digits that read back as v (std::to_chars would do, but not every
  // host compiler a CUDA build meets has its floating-point overloads).
  char buf[64];
  for (int digits = 1; digits <= 17; ++digits) {
    std::snprintf(buf, sizeof(buf), "%.*e", digits - 1, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  std::string sci(buf);  // [-]d[.ddd]e(+|-)XX
  const auto e = sci.find('e');
  const int exponent = std::atoi(sci.c_str() + e + 1);
  if (exponent < -4 || exponent >= 16) return sci;
  const bool negative = sci[0] == '-';
  std::string digits;
  for (size_t i = negative; i < e; ++i) {
    if (sci[i] != '.') digits += sci[i];
  }
  std::string text;
  if (exponent < 0) {
    text = "0." + std::string(-exponent - 1, '0') + digits;
  } else {
    if (digits.size() < static_cast<size_t>(exponent) + 1) digits.append(exponent + 1 - digits.size(), '0');
    text = digits.substr(0, exponent + 1) + "." + (digits.size() > static_cast<size_t>(exponent) + 1
                                                       ? digits.substr(exponent + 1)
                                                       : std::string("0"));
  }
  return negative ? "-" + text : text;
}

void check_tensor(const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, "purify: ", name, " must be a dense (strided) tensor, got layout ",
                   layout_name(t.layout()));
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
                   "purify: ", name, " must be float16, bfloat16, float32 or float64, got ", dtype_name(dtype));
}

void check_shapes(const at::Tensor& x, const at::Tensor& z) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "purify: x must be [..., D], got a 0-dim tensor");
  const auto xs = x.sym_sizes();
  const auto zs = z.sym_sizes();
  TORCH_CHECK_VALUE(z.dim() == x.dim() || z.dim() == x.dim() + 1,
                    "purify: z must be [..., D] (one direction) or [..., K, D] with the same number of dims as x "
                    "or one more; got x ", shape_text(xs), " and z ", shape_text(zs));
  TORCH_CHECK_VALUE(zs.back() == xs.back(), "purify: z's last dim must equal x's (D = ", xs.back(), "); got x ",
                    shape_text(xs), " and z ", shape_text(zs));
  const bool one_direction = z.dim() == x.dim();
  TORCH_CHECK_VALUE(one_direction || zs[zs.size() - 2] >= 1,
                    "purify: z must hold at least one direction (K >= 1); got z ", shape_text(zs));
  for (const auto i : c10::irange(x.dim() - 1)) {
    TORCH_CHECK_VALUE(zs[i] == xs[i] || zs[i] == 1, "purify: z's leading dim ", i,
                      " must equal x's or be 1 (z is broadcast over x's rows, never x over z's); got x ",
                      shape_text(xs), " and z ", shape_text(zs));
  }
}

void check_strength_tensor(const at::Tensor& s) {
  TORCH_CHECK_TYPE(s.layout() == at::kStrided, "purify: strength must be a dense (strided) tensor, got layout ",
                   layout_name(s.layout()));
  TORCH_CHECK_VALUE(s.dim() == 0 || (s.dim() == 1 && s.sym_size(0) == 1),
                    "purify: strength must be a float, a 0-dim tensor or a one-element 1-D tensor, got shape ",
                    shape_text(s.sym_sizes()));
  TORCH_CHECK_TYPE(s.is_floating_point(), "purify: a strength tensor must be floating point, got ",
                   dtype_name(s.scalar_type()));
}

struct Arithmetic {
  at::ScalarType dtype;  // x's and z's promoted dtype
  at::ScalarType acc;    // its accumulate dtype
  double tiny, max;      // the normal numbers of acc
  const char* inputs;    // the input dtypes that compute in acc
};

Arithmetic arithmetic_of(const at::Tensor& x, const at::Tensor& z) {
  const auto dtype = x.scalar_type() == z.scalar_type() ? x.scalar_type()
                                                         : at::promote_types(x.scalar_type(), z.scalar_type());
  const auto acc = accumulate_type(dtype);
  return {dtype, acc, arithmetic_tiny(acc), arithmetic_max(acc),
          acc == at::kDouble ? "float64" : "float16, bfloat16 and float32"};
}

// Every check, in the order of the Python API's, then the canonical form of purify_forward's
// arguments. `strength` is the tensor, or undefined where `strength_value` is the number.
at::Tensor purify_checked(const at::Tensor& x, const at::Tensor& z, const at::Tensor& strength,
                          double strength_value, double eps) {
  check_tensor("x", x);
  check_tensor("z", z);
  TORCH_CHECK_VALUE(x.device() == z.device(), "purify: x and z must be on one device, got ", x.device(), " and ",
                    z.device());
  check_shapes(x, z);
  TORCH_CHECK_VALUE(eps > 0 && eps < std::numeric_limits<double>::infinity(),
                    "purify: eps must be finite and > 0, got ", real_text(eps));
  if (strength.defined()) {
    check_strength_tensor(strength);
  } else {
    TORCH_CHECK_VALUE(std::isfinite(strength_value), "purify: strength must be finite, got ",
                      real_text(strength_value));
  }
  const auto a = arithmetic_of(x, z);
  TORCH_CHECK_VALUE(eps >= a.tiny && eps <= a.max, "purify: eps must be between ", a.tiny, " and ", a.max,
                    " (the normal ", dtype_name(a.acc), " numbers, the arithmetic dtype of ", a.inputs,
                    " inputs), got ", real_text(eps));
  TORCH_CHECK_VALUE(strength.defined() || std::abs(strength_value) <= a.max, "purify: strength must be at most ",
                    a.max, " in magnitude (finite in ", dtype_name(a.acc), ", the arithmetic dtype of ", a.inputs,
                    " inputs), got ", real_text(strength_value));
  TORCH_CHECK_VALUE(!strength.defined() || strength.device() == x.device() || strength.device().is_cpu(),
                    "purify: strength must be on x's device (", x.device(), ") or a CPU scalar, got ",
                    (strength.defined() ? strength.device() : x.device()));

  const at::Tensor z_rows = z.dim() == x.dim() ? z.unsqueeze(-2) : z;
  const at::Tensor x_in = x.scalar_type() == a.dtype ? x : x.to(a.dtype);
  const at::Tensor z_in = z_rows.scalar_type() == a.dtype ? z_rows : z_rows.to(a.dtype);
  using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
  if (!strength.defined()) {
    // The number goes to the kernel as it is: nothing is allocated for it.
    static const auto forward = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("purified_ops::purify_forward", "float_strength")
                                    .typed<Outputs(const at::Tensor&, const at::Tensor&, double, double)>();
    return std::get<0>(forward.call(x_in, z_in, strength_value, eps));
  }
  const auto acc_on_x = at::TensorOptions().dtype(a.acc).device(x.device());
  const at::Tensor s = (strength.dim() == 0 ? strength : strength.reshape({})).to(acc_on_x);
  static const auto forward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("purified_ops::purify_forward", "")
          .typed<Outputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return std::get<0>(forward.call(x_in, z_in, s, eps));
}

at::Tensor purify_float_strength(const at::Tensor& x, const at::Tensor& z, double strength, double eps) {
  return purify_checked(x, z, at::Tensor(), strength, eps);
}

at::Tensor purify_tensor_strength(const at::Tensor& x, const at::Tensor& z, const at::Tensor& strength, double eps) {
  return purify_checked(x, z, strength, 0.0, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(purified_ops, CompositeImplicitAutograd, m) {
  m.impl("purify", &purify_float_strength);
  m.impl("purify.strength_tensor", &purify_tensor_strength);
}

// vmap meets purify before any autograd key (so before the kernel above): the same decomposition
// there, so that purify_forward's batching rule serves instead of a loop over the batch.
TORCH_LIBRARY_IMPL(purified_ops, FuncTorchBatchedDecomposition, m) {
  m.impl("purify", &purify_float_strength);
  m.impl("purify.strength_tensor", &purify_tensor_strength);
}

}  // namespace purified_ops
