// The op schemas, one copy for the library (purify.cpp) and the emulated CUDA backend
// (csrc/cuda_emu/purify_emu.cpp), which registers the same ops in a namespace of its own.
#pragma once

namespace purified_ops {

// y = x - s Z^T (Z Z^T + eps I)^{-1} Z x per row; also returns the per-row coefficients c
// and the per-z-row Cholesky factor of the Gram matrix (accumulate dtype) for the backward.
constexpr const char* kForwardSchema =
    "purify_forward(Tensor x, Tensor z, Tensor strength, float eps) -> (Tensor, Tensor, Tensor)";
// The same with the strength by value (a float strength allocates nothing per call): what
// purified_ops::purify calls for one. Not differentiable in the strength.
constexpr const char* kForwardFloatSchema =
    "purify_forward.float_strength(Tensor x, Tensor z, float strength, float eps) -> (Tensor, Tensor, Tensor)";
// (dx, dz, ds); dz is an empty [0] tensor when compute_grad_z is false.
constexpr const char* kBackwardSchema =
    "purify_backward(Tensor grad_y, Tensor x, Tensor z, Tensor strength, Tensor coeff, "
    "Tensor chol, bool compute_grad_z) -> (Tensor, Tensor, Tensor)";
// The same into preallocated outputs (exactly the shapes, dtypes and layout the functional
// ops return), for callers that reuse buffers and for kernel-only timing. They return
// nothing: torch.compile functionalizes custom ops only without aliased outputs.
constexpr const char* kForwardOutSchema =
    "purify_forward_out(Tensor x, Tensor z, Tensor strength, float eps, Tensor(a!) y, "
    "Tensor(b!) coeff, Tensor(c!) chol) -> ()";
constexpr const char* kBackwardOutSchema =
    "purify_backward_out(Tensor grad_y, Tensor x, Tensor z, Tensor strength, Tensor coeff, "
    "Tensor chol, bool compute_grad_z, Tensor(a!) grad_x, Tensor(b!) grad_z, "
    "Tensor(c!) grad_strength) -> ()";

// The public entry point (purify_public.cpp): checks, then the canonical form of purify_forward's
// arguments and its y. Library namespace only; a float strength has an overload of its own.
constexpr const char* kPurifySchema = "purify(Tensor x, Tensor z, float strength, float eps) -> Tensor";
constexpr const char* kPurifyTensorSchema =
    "purify.strength_tensor(Tensor x, Tensor z, Tensor strength, float eps) -> Tensor";

}  // namespace purified_ops
