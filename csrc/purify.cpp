// The op schemas of purified_ops and the build-info binding of purified_ops._C. Implementations
// live in cpu/ (one module per CPU capability, see cpu/module.cpp) and cuda/ (TORCH_LIBRARY_IMPL),
// fake kernels in purified_ops/ops.py, purify_forward's autograd and batching rule in _derivatives.py.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "purify_schema.h"

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
  m.def(purified_ops::kForwardSchema);
  m.def(purified_ops::kBackwardSchema);
  m.def(purified_ops::kForwardOutSchema);
  m.def(purified_ops::kBackwardOutSchema);
}

// purify_forward's Autograd kernel and batching rule are registered from Python
// (purified_ops/_derivatives.py): its derivative reuses the op's own outputs and,
// for double backward, the closed form in PyTorch ops. purify_backward has no derivative of its
// own (a double backward recomputes through those ops instead): a raw call with an input that
// requires grad gets an output whose backward raises "derivative for
// purified_ops::purify_backward is not implemented" instead of leaving x.grad silently None.
TORCH_LIBRARY_IMPL(purified_ops, Autograd, m) {
  m.impl("purify_backward", torch::autograd::autogradNotImplementedFallback());
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
