// purified_ops._cuda_emu: the CUDA ops on CPU tensors, through the real kernels and host code
// of csrc/cuda run by the emulation (cuda_emu.h), registered as torch.ops.purified_ops_cuda_emu
// with the schemas of torch.ops.purified_ops. A test backend: slow, exact CUDA semantics. The
// library's own registrations are listed at the top of csrc/purify.cpp; this namespace's Autograd
// kernels are the library's (purify_autograd.h), and its fake kernels, derivatives and batching
// rules come from the same Python (purified_ops/ops.py, purified_ops/_derivatives.py).
#include <torch/extension.h>
#include <torch/library.h>

#include <iterator>
#include <string>
#include <utility>

#include "../cuda/purify_cuda_ops.h"
#include "../purify_autograd.h"
#include "../purify_schema.h"
#include "cuda_emu.h"

namespace purified_ops {
namespace cuda {
namespace {

struct EmulatedDevice {
  static constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;
  struct Guard {
    explicit Guard(c10::Device) {}
  };
  static cudaStream_t stream() { return nullptr; }
  static void check(cudaError_t err) {
    TORCH_CHECK(err == cudaSuccess, "emulated CUDA launch failed: ", ::cuda_emu::last_error());
  }
};

struct EmulatedOps {
  static constexpr const char* kForward = "purified_ops_cuda_emu::purify_forward";
  static constexpr const char* kBackward = "purified_ops_cuda_emu::purify_backward";
};

}  // namespace

using EmulatedAutograd = autograd::Kernels<EmulatedOps>;

void bind_memory_traffic(pybind11::module_& m);  // memory_traffic.cpp

TORCH_LIBRARY(purified_ops_cuda_emu, m) {
  m.def(kForwardSchema);
  m.def(kForwardFloatSchema);
  m.def(kBackwardSchema);
  m.def(kForwardOutSchema);
  m.def(kBackwardOutSchema);
}

TORCH_LIBRARY_IMPL(purified_ops_cuda_emu, CPU, m) {
  m.impl("purify_forward", &purify_forward_impl<EmulatedDevice>);
  m.impl("purify_forward.float_strength", &purify_forward_float_impl<EmulatedDevice>);
  m.impl("purify_backward", &purify_backward_impl<EmulatedDevice>);
  m.impl("purify_forward_out", &purify_forward_out_impl<EmulatedDevice>);
  m.impl("purify_backward_out", &purify_backward_out_impl<EmulatedDevice>);
}

TORCH_LIBRARY_IMPL(purified_ops_cuda_emu, Autograd, m) {
  EmulatedAutograd::register_kernels(m);
}

}  // namespace cuda
}  // namespace purified_ops

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using ::cuda_emu::Schedule;
  static const std::pair<const char*, Schedule> kSchedules[] = {{"forward", Schedule::kForward},
                                                                {"reverse", Schedule::kReverse},
                                                                {"round-robin", Schedule::kRoundRobin},
                                                                {"random", Schedule::kRandom}};
  pybind11::tuple names(std::size(kSchedules));
  static std::string listed;
  for (size_t i = 0; i < std::size(kSchedules); ++i) {
    names[i] = kSchedules[i].first;
    listed += (i ? ", '" : "'") + std::string(kSchedules[i].first) + "'";
  }
  m.attr("schedules") = names;
  m.def(
      "set_schedule",
      [](const std::string& name, uint64_t seed) {
        for (const auto& [known, schedule] : kSchedules) {
          if (name == known) return ::cuda_emu::set_schedule(schedule, seed);
        }
        TORCH_CHECK_VALUE(false, "schedule must be one of ", listed, ", got '", name, "'");
      },
      pybind11::arg("name"), pybind11::arg("seed") = 0,
      "The order in which the threads of a block run (see `schedules`): 'forward' or 'reverse' thread "
      "order, 'round-robin' over the warps, or a 'random' warp at each step (seeded per block from `seed`).");
  m.def("set_max_grid_stride_blocks", &::cuda_emu::set_max_grid_stride_blocks,
        "Caps the grid of grid-stride kernels (0: no cap), so that every team serves several work items.");
  m.def(
      "set_shared_memory_fill",
      [](int byte) {
        TORCH_CHECK_VALUE(byte >= 0 && byte <= 255, "the fill must be a byte (0..255), got ", byte);
        ::cuda_emu::set_shared_memory_fill(static_cast<unsigned char>(byte));
      },
      pybind11::arg("byte"),
      "The byte every block's dynamic shared memory starts as: 0xff (NaN) by default; a byte such "
      "as 0x3c makes it finite, like the stale values a GPU leaves.");
  purified_ops::cuda::bind_memory_traffic(m);
  purified_ops::cuda::EmulatedAutograd::bind(m);
#if defined(__SANITIZE_ADDRESS__)
  m.attr("sanitized") = true;
#else
  m.attr("sanitized") = false;
#endif
}
