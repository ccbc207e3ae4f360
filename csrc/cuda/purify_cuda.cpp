// CUDA implementations of purify_forward and purify_backward (TORCH_LIBRARY_IMPL CUDA): the
// device guard, the current stream and CUDA's error check around purify_cuda_ops.h.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "purify_cuda_ops.h"

namespace purified_ops {
namespace cuda {
namespace {

struct CudaDevice {
  static constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;
  using Guard = c10::cuda::CUDAGuard;
  static cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
  static void check(cudaError_t err) { C10_CUDA_CHECK(err); }
};

}  // namespace

TORCH_LIBRARY_IMPL(purified_ops, CUDA, m) {
  m.impl("purify_forward", &purify_forward_impl<CudaDevice>);
  m.impl("purify_backward", &purify_backward_impl<CudaDevice>);
  m.impl("purify_forward_out", &purify_forward_out_impl<CudaDevice>);
  m.impl("purify_backward_out", &purify_backward_out_impl<CudaDevice>);
}

}  // namespace cuda
}  // namespace purified_ops
