// A caching allocator for the CPU kernels' large outputs (y, dx, dz).
//
// torch allocates CPU memory with malloc, which hands large blocks (tens of MB) back to the OS
// on free; the next step's outputs then fault in fresh, zeroed pages, which on a 2-core VM costs
// as much as the kernel itself (measured: 20 ms of a 30 ms backward at 8192 x 1024 float32).
// Like torch's CUDA allocator, this keeps freed blocks for reuse, up to a cap
// (512 MiB unless set: PURIFIED_OPS_CPU_CACHE_MB, parsed by purified_ops/_settings.py and set
// when the module is loaded; 0 turns it off; the blocks freed longest ago make room for newer
// ones), in 2 MiB-aligned blocks with transparent huge pages requested. Blocks below 1 MiB go to
// torch's allocator.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>

namespace purified_ops {

// An uninitialized contiguous CPU tensor from the cache (torch's allocator for small ones).
at::Tensor empty_cpu_output(at::IntArrayRef sizes, at::ScalarType dtype);

// Frees every cached block; returns the bytes released.
std::size_t empty_cpu_output_cache();

// Bytes held in the cache now (not in tensors).
std::size_t cpu_output_cache_bytes();

// The most bytes the cache holds for reuse (freed blocks beyond it go back to the OS).
void set_cpu_output_cache_limit(std::size_t bytes);

}  // namespace purified_ops
