// The op schemas of purified_ops and the build-info binding of purified_ops._C. Implementations
// live in cpu/ (one module per CPU capability, see cpu/module.cpp) and cuda/ (TORCH_LIBRARY_IMPL),
// fake kernels and autograd in purified_ops/ops.py.
#include <torch/extension.h>
#include <torch/library.h>

#ifndef PURIFIED_OPS_CPU_CAPABILITIES
#define PURIFIED_OPS_CPU_CAPABILITIES ""
#endif
#ifndef PURIFIED_OPS_NVCC_FLAGS
#define PURIFIED_OPS_NVCC_FLAGS ""
#endif
#ifndef PURIFIED_OPS_CUDA_ARCHS
#define PURIFIED_OPS_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(purified_ops, m) {
  // y = x - s Z^T (Z Z^T + eps I)^{-1} Z x per row; also returns the per-row coefficients c
  // and the per-z-row Cholesky factor of the Gram matrix (accumulate dtype) for the backward.
  m.def("purify_forward(Tensor x, Tensor z, Tensor strength, float eps) -> (Tensor, Tensor, Tensor)");
  // (dx, dz, ds); dz is an empty [0] tensor when compute_grad_z is false.
  m.def(
      "purify_backward(Tensor grad_y, Tensor x, Tensor z, Tensor strength, Tensor coeff, "
      "Tensor chol, bool compute_grad_z) -> (Tensor, Tensor, Tensor)");
  // The same into preallocated outputs (exactly the shapes, dtypes and layout the functional
  // ops return), for callers that reuse buffers and for kernel-only timing. They return
  // nothing: torch.compile functionalizes custom ops only without aliased outputs.
  m.def(
      "purify_forward_out(Tensor x, Tensor z, Tensor strength, float eps, Tensor(a!) y, "
      "Tensor(b!) coeff, Tensor(c!) chol) -> ()");
  m.def(
      "purify_backward_out(Tensor grad_y, Tensor x, Tensor z, Tensor strength, Tensor coeff, "
      "Tensor chol, bool compute_grad_z, Tensor(a!) grad_x, Tensor(b!) grad_z, "
      "Tensor(c!) grad_strength) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", [] {
    pybind11::dict info;
    // The capabilities a purified_ops._cpu_<capability> module was built for, lowest first.
    info["cpu_capabilities"] = PURIFIED_OPS_CPU_CAPABILITIES;
#ifdef PURIFIED_OPS_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["cuda_archs"] = PURIFIED_OPS_CUDA_ARCHS;
    info["nvcc_flags"] = PURIFIED_OPS_NVCC_FLAGS;
    return info;
  });
}
