// The op schemas of purified_ops and the build-info binding of purified_ops._C.
//
// Where the ops are registered, one file per piece:
//   C++     csrc/purify.cpp                 schemas (TORCH_LIBRARY), this file
//           csrc/purify_public.cpp          purify's checks (CompositeImplicitAutograd)
//           csrc/purify_autograd.h          Autograd kernels (here and in purify_emu.cpp)
//           csrc/purify_autocast.cpp        Autocast kernels (AutocastCPU, AutocastCUDA)
//           csrc/cpu/purify_cpu.cpp         CPU kernels (TORCH_LIBRARY_IMPL CPU, at its end)
//           csrc/cuda/purify_cuda.cpp       CUDA kernels (TORCH_LIBRARY_IMPL CUDA)
//           csrc/cuda_emu/purify_emu.cpp    the emulated CUDA backend's namespace, same schemas
//   Python  purified_ops/ops.py             loading, fake kernels, PurifyFunction, purify
//           purified_ops/_derivatives.py    the derivatives (called by the Autograd kernels) and
//                                           batching rules of both ops
#include <torch/extension.h>
#include <torch/library.h>

#include "purify_autograd.h"
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
  m.def(purified_ops::kForwardFloatSchema);
  m.def(purified_ops::kBackwardSchema);
  m.def(purified_ops::kForwardOutSchema);
  m.def(purified_ops::kBackwardOutSchema);
  m.def(purified_ops::kPurifySchema);
  m.def(purified_ops::kPurifyTensorSchema);
}

namespace {
struct LibraryOps {
  static constexpr const char* kForward = "purified_ops::purify_forward";
  static constexpr const char* kBackward = "purified_ops::purify_backward";
};
using LibraryAutograd = purified_ops::autograd::Kernels<LibraryOps>;
}  // namespace

// The derivatives are Python (purified_ops/_derivatives.py, with the batching rules); these
// kernels run them only where a derivative is taken (purify_autograd.h).
TORCH_LIBRARY_IMPL(purified_ops, Autograd, m) {
  LibraryAutograd::register_kernels(m);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  LibraryAutograd::bind(m);
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
