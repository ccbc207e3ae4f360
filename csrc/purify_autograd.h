// The Autograd kernels of purify_forward and purify_backward, for a namespace's ops (the
// library's, and the emulated CUDA backend's, which registers the same ops under its own name).
//
// The derivatives themselves are written once, in Python (purified_ops/_derivatives.py): the
// first-order backward of purify_forward is the fused purify_backward op, and every derivative
// of purify_backward is a closed form that calls the fused ops. What this file adds is the
// dispatch around them, so that a plain eager call pays no Python:
//   - nothing to differentiate (grad mode off, or no input requiring grad): the op below
//     autograd, as a built-in op's Autograd kernel does;
//   - purify_forward with inputs requiring grad, no torch.func transform and no forward-mode
//     tangent: a C++ node whose backward calls purify_backward, the same call the Python rule
//     makes (a gradient of coeff, which only a caller of the op's raw outputs has, goes to the
//     Python rule);
//   - anything else (torch.func transforms, forward-mode AD, purify_backward itself being
//     differentiated): the Python kernel, which runs the rules as single-level Functions.
// purify_forward.float_strength (the strength a number) takes the same routes; where the
// Python rules serve, it calls purify_forward with the strength as a tensor, so the rules and
// batching rules of one op serve both (its own batching rule, in _derivatives.py, serves vmap
// without a derivative).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <type_traits>

#include "purify_host.h"

namespace purified_ops {
namespace autograd {

using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using ForwardSignature = Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, double);
using ForwardFloatSignature = Triple(const at::Tensor&, const at::Tensor&, double, double);
using BackwardSignature = Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, bool);

// The Python halves, set once by purified_ops._derivatives.register. Never released: they live
// as long as the ops' registrations, to the end of the process.
struct PythonRules {
  PyObject* forward_kernel = nullptr;   // (keyset, x, z, strength, eps) -> (y, coeff, chol)
  PyObject* backward_kernel = nullptr;  // (keyset, grad_y, x, z, strength, coeff, chol, compute_grad_z)
  PyObject* forward_vjp = nullptr;      // (eps, saved, need_z, need_s, grad_y, grad_coeff) -> (dx, dz, ds)
};

inline bool has_tangent(const at::Tensor& t) {
  return t.defined() && t._fw_grad(/*level=*/0).defined();
}

// Whether a torch.func transform is active: its dynamic-layer keys are in the thread's included
// set (what torch._C._are_functorch_transforms_active reads).
inline bool functorch_transforms_active() {
  const auto included = c10::impl::tls_local_dispatch_key_set().included_;
  return included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode);
}

// torch.func runs each of its levels through the Python rules (single-level Functions); so does
// forward-mode AD, which a C++ node does not support.
inline bool needs_python_rules(std::initializer_list<const at::Tensor*> inputs) {
  if (functorch_transforms_active()) return true;
  for (const at::Tensor* t : inputs) {
    if (has_tangent(*t)) return true;
  }
  return false;
}

inline bool records_graph(std::initializer_list<const at::Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : inputs) {
    if (t->defined() && t->requires_grad()) return true;
  }
  return false;
}

inline Triple as_triple(const pybind11::handle& out) {
  auto t = out.cast<pybind11::tuple>();
  TORCH_CHECK(t.size() == 3, "purified_ops: a Python rule returned ", t.size(), " values, not 3");
  auto tensor = [](const pybind11::handle& v) { return v.is_none() ? at::Tensor() : v.cast<at::Tensor>(); };
  return {tensor(t[0]), tensor(t[1]), tensor(t[2])};
}

template <class... Args>
Triple call_python(PyObject* rule, const char* what, Args&&... args) {
  pybind11::gil_scoped_acquire gil;
  TORCH_CHECK(rule != nullptr, "purified_ops: the Python derivatives of ", what,
              " are not registered (import purified_ops first)");
  return as_triple(pybind11::handle(rule)(std::forward<Args>(args)...));
}

// `Ops` names a namespace's ops: Ops::kForward and Ops::kBackward ("ns::op").
template <class Ops>
struct Kernels {
  static PythonRules& python() {
    static PythonRules rules;
    return rules;
  }

  static const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow(Ops::kForward, "").template typed<ForwardSignature>();
    return op;
  }

  static const c10::TypedOperatorHandle<ForwardFloatSignature>& forward_float_op() {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow(Ops::kForward, "float_strength")
                               .template typed<ForwardFloatSignature>();
    return op;
  }

  static const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow(Ops::kBackward, "").template typed<BackwardSignature>();
    return op;
  }

  // A number strength as the tensor purify_forward and purify_backward take: 0-dim, x's
  // accumulate dtype, on x's device.
  static at::Tensor strength_tensor(double strength, const at::Tensor& x) {
    return at::scalar_tensor(strength, at::TensorOptions().dtype(accumulate_type(x.scalar_type())).device(x.device()));
  }

  // The node of purify_forward (S = at::Tensor: the strength an input, with a gradient) or of
  // purify_forward.float_strength (S = double: a constant, made a tensor for the backward only).
  template <class S>
  struct ForwardNode : public torch::autograd::Function<ForwardNode<S>> {
    static constexpr bool kTensorStrength = std::is_same_v<S, at::Tensor>;

    static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                  const at::Tensor& z, const S& strength, double eps,
                                                  c10::DispatchKeySet keyset) {
      auto [y, coeff, chol] = [&] {
        at::AutoDispatchBelowADInplaceOrView below;
        const auto below_autograd = keyset & c10::after_autograd_keyset;
        if constexpr (kTensorStrength) {
          return forward_op().redispatch(below_autograd, x, z, strength, eps);
        } else {
          return forward_float_op().redispatch(below_autograd, x, z, strength, eps);
        }
      }();
      ctx->mark_non_differentiable({chol});
      ctx->set_materialize_grads(false);
      if constexpr (kTensorStrength) {
        ctx->save_for_backward({x, z, strength, coeff, chol});
      } else {
        ctx->save_for_backward({x, z, coeff, chol});
        ctx->saved_data["strength"] = strength;
      }
      ctx->saved_data["eps"] = eps;
      return {y, coeff, chol};
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                   torch::autograd::variable_list grads) {
      auto saved = ctx->get_saved_variables();  // (x, z, strength, coeff, chol)
      if constexpr (!kTensorStrength) {
        saved.insert(saved.begin() + 2, strength_tensor(ctx->saved_data["strength"].toDouble(), saved[0]));
      }
      // A number's position has no input edge to ask about.
      const bool need_x = ctx->needs_input_grad(0), need_z = ctx->needs_input_grad(1),
                 need_s = kTensorStrength && ctx->needs_input_grad(2);
      const at::Tensor& grad_y = grads[0];
      const at::Tensor& grad_coeff = grads[1];
      at::Tensor dx, dz, ds;
      if (grad_coeff.defined()) {
        pybind11::gil_scoped_acquire gil;
        pybind11::tuple saved_py(saved.size());
        for (size_t i = 0; i < saved.size(); ++i) saved_py[i] = pybind11::cast(saved[i]);
        std::tie(dx, dz, ds) = call_python(python().forward_vjp, Ops::kForward, ctx->saved_data["eps"].toDouble(),
                                           saved_py, need_z, need_s, grad_y, grad_coeff);
      } else if (grad_y.defined()) {
        std::tie(dx, dz, ds) = backward_op().call(grad_y.to(saved[0].scalar_type()), saved[0], saved[1], saved[2],
                                                  saved[3], saved[4], need_z);
      }
      return {need_x ? dx : at::Tensor(), need_z ? dz : at::Tensor(), need_s ? ds : at::Tensor(), at::Tensor(),
              at::Tensor()};
    }
  };

  static Triple forward(c10::DispatchKeySet keyset, const at::Tensor& x, const at::Tensor& z,
                        const at::Tensor& strength, double eps) {
    if (needs_python_rules({&x, &z, &strength})) {
      return call_python(python().forward_kernel, Ops::kForward, keyset, x, z, strength, eps);
    }
    if (records_graph({&x, &z, &strength})) {
      auto out = ForwardNode<at::Tensor>::apply(x, z, strength, eps, keyset);
      return {out[0], out[1], out[2]};
    }
    at::AutoDispatchBelowADInplaceOrView below;
    return forward_op().redispatch(keyset & c10::after_autograd_keyset, x, z, strength, eps);
  }

  static Triple forward_float(c10::DispatchKeySet keyset, const at::Tensor& x, const at::Tensor& z, double strength,
                              double eps) {
    if (needs_python_rules({&x, &z})) {
      return forward_op().call(x, z, strength_tensor(strength, x), eps);
    }
    if (records_graph({&x, &z})) {
      auto out = ForwardNode<double>::apply(x, z, strength, eps, keyset);
      return {out[0], out[1], out[2]};
    }
    at::AutoDispatchBelowADInplaceOrView below;
    return forward_float_op().redispatch(keyset & c10::after_autograd_keyset, x, z, strength, eps);
  }

  static Triple backward(c10::DispatchKeySet keyset, const at::Tensor& grad_y, const at::Tensor& x,
                         const at::Tensor& z, const at::Tensor& strength, const at::Tensor& coeff,
                         const at::Tensor& chol, bool compute_grad_z) {
    const auto inputs = {&grad_y, &x, &z, &strength, &coeff, &chol};
    if (needs_python_rules(inputs) || records_graph(inputs)) {
      return call_python(python().backward_kernel, Ops::kBackward, keyset, grad_y, x, z, strength, coeff, chol,
                         compute_grad_z);
    }
    at::AutoDispatchBelowADInplaceOrView below;
    return backward_op().redispatch(keyset & c10::after_autograd_keyset, grad_y, x, z, strength, coeff, chol,
                                    compute_grad_z);
  }

  static void register_kernels(torch::Library& m) {
    m.impl("purify_forward", torch::dispatch(c10::DispatchKey::Autograd, TORCH_FN(forward)));
    m.impl("purify_forward.float_strength", torch::dispatch(c10::DispatchKey::Autograd, TORCH_FN(forward_float)));
    m.impl("purify_backward", torch::dispatch(c10::DispatchKey::Autograd, TORCH_FN(backward)));
  }

  // purified_ops._derivatives.register hands the Python rules over through this binding.
  static void bind(pybind11::module_& m) {
    m.def("_set_python_rules", [](pybind11::object forward_kernel, pybind11::object backward_kernel,
                                  pybind11::object forward_vjp) {
      auto& rules = python();
      rules.forward_kernel = forward_kernel.release().ptr();
      rules.backward_kernel = backward_kernel.release().ptr();
      rules.forward_vjp = forward_vjp.release().ptr();
    });
  }
};

}  // namespace autograd
}  // namespace purified_ops
