// CUDA implementations of purify_forward and purify_backward (TORCH_LIBRARY_IMPL CUDA): the
// device guard, the current stream and CUDA's error check around purify_cuda_ops.h. The other
// registrations of the ops are listed at the top of csrc/purify.cpp.
#include <ATen/cuda/CUDAContext.h>
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
  static void check(cudaError_t err) {
    // The runtime reports a kernel not compiled for the GPU with either code.
    if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) raise_no_kernel_image();
    C10_CUDA_CHECK(err);
  }

  // A launch on a GPU that no image of the build serves (purify() falls back before this; the
  // raw ops and PurifyFunction get here): what the build carries and how to build for this GPU.
  static void raise_no_kernel_image() {
    const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
    TORCH_CHECK(false, "purified_ops: the CUDA kernels of this build have no image for ", prop->name,
                " (compute capability ", prop->major, ".", prop->minor, "): it was built for ",
                PURIFIED_OPS_CUDA_ARCHS, ". Build for it with `TORCH_CUDA_ARCH_LIST=\"", prop->major, ".",
                prop->minor, "\" pip install --no-build-isolation .`, or use purify(..., backend='reference')");
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(purified_ops, CUDA, m) {
  m.impl("purify_forward", &purify_forward_impl<CudaDevice>);
  m.impl("purify_forward.float_strength", &purify_forward_float_impl<CudaDevice>);
  m.impl("purify_backward", &purify_backward_impl<CudaDevice>);
  m.impl("purify_forward_out", &purify_forward_out_impl<CudaDevice>);
  m.impl("purify_backward_out", &purify_backward_out_impl<CudaDevice>);
}

}  // namespace cuda
}  // namespace purified_ops
