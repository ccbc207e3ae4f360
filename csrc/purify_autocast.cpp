// Autocast policy of the ops: compute in float32 (the kernels accumulate in float32 for 16-bit
// inputs anyway), output in the promoted dtype of x and z, the way torch's binary ops promote.
// So a region that produces bfloat16 features and float32 directions (or the reverse) runs the
// op once, on the promoted dtype, instead of failing on mixed dtypes. The other registrations of
// the ops are listed at the top of csrc/purify.cpp.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace purified_ops {
namespace {

using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

at::ScalarType promoted(const at::Tensor& a, const at::Tensor& b) {
  return at::promote_types(a.scalar_type(), b.scalar_type());
}

template <c10::DispatchKey AutocastKey>
Triple forward_autocast(const at::Tensor& x, const at::Tensor& z, const at::Tensor& strength, double eps) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(AutocastKey);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("purified_ops::purify_forward", "")
                       .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  const auto t = promoted(x, z);
  return op.call(x.to(t), z.to(t), strength, eps);
}

template <c10::DispatchKey AutocastKey>
Triple forward_float_autocast(const at::Tensor& x, const at::Tensor& z, double strength, double eps) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(AutocastKey);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("purified_ops::purify_forward", "float_strength")
                       .typed<Triple(const at::Tensor&, const at::Tensor&, double, double)>();
  const auto t = promoted(x, z);
  return op.call(x.to(t), z.to(t), strength, eps);
}

template <c10::DispatchKey AutocastKey>
Triple backward_autocast(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& z,
                         const at::Tensor& strength, const at::Tensor& coeff, const at::Tensor& chol,
                         bool compute_grad_z) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(AutocastKey);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("purified_ops::purify_backward", "")
                       .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  const auto t = promoted(x, z);
  return op.call(grad_y.to(t), x.to(t), z.to(t), strength, coeff, chol, compute_grad_z);
}

}  // namespace

TORCH_LIBRARY_IMPL(purified_ops, AutocastCPU, m) {
  m.impl("purify_forward", &forward_autocast<c10::DispatchKey::AutocastCPU>);
  m.impl("purify_forward.float_strength", &forward_float_autocast<c10::DispatchKey::AutocastCPU>);
  m.impl("purify_backward", &backward_autocast<c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(purified_ops, AutocastCUDA, m) {
  m.impl("purify_forward", &forward_autocast<c10::DispatchKey::AutocastCUDA>);
  m.impl("purify_forward.float_strength", &forward_float_autocast<c10::DispatchKey::AutocastCUDA>);
  m.impl("purify_backward", &backward_autocast<c10::DispatchKey::AutocastCUDA>);
}

}  // namespace purified_ops
