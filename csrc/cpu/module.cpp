// The Python module purified_ops._cpu_<capability>: the CPU kernels of one CPU capability register
// themselves (TORCH_LIBRARY_IMPL in purify_cpu.cpp) when purified_ops imports it; this adds the
// output cache's controls, the settings purified_ops/_extension.py passes from the environment,
// and what the module was compiled for. Only one such module is loaded in a process, so there is
// one output cache.
#include <torch/extension.h>

#include "bf16_conversion.h"
#include "output_cache.h"
#include "streaming_stores.h"

#ifndef PURIFIED_OPS_CPU_CAPABILITY
#define PURIFIED_OPS_CPU_CAPABILITY "unknown"
#endif
#ifndef PURIFIED_OPS_CXX_FLAGS
#define PURIFIED_OPS_CXX_FLAGS ""
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("empty_cpu_output_cache", &purified_ops::empty_cpu_output_cache,
        "Frees the CPU output cache's blocks; returns the bytes released.");
  m.def("cpu_output_cache_bytes", &purified_ops::cpu_output_cache_bytes,
        "Bytes the CPU output cache holds for reuse.");
  m.def("set_output_cache_limit", &purified_ops::set_cpu_output_cache_limit,
        "The most bytes the CPU output cache keeps for reuse (0: none).");
  m.def("set_streaming_stores", [](std::optional<bool> always) {
    purified_ops::set_streaming_stores(!always.has_value() ? purified_ops::StreamingStores::kBySize
                                       : *always           ? purified_ops::StreamingStores::kAlways
                                                           : purified_ops::StreamingStores::kNever);
  }, "Non-temporal stores for every output (True), none (False), or by size (None, the default).",
        pybind11::arg("always"));
  m.def("set_bf16_hardware_conversion", &purified_ops::set_bf16_hardware_conversion,
        "Rounds float to bfloat16 with the CPU's AVX512_BF16 instruction (True, where it has it; the "
        "default) or in software (False); the outputs are bitwise the same.");
  m.def("bf16_hardware_conversion", &purified_ops::bf16_hardware_conversion,
        "Whether float rounds to bfloat16 with the CPU's AVX512_BF16 instruction now.");
  m.def("build_info", [] {
    pybind11::dict info;
    info["cpu_capability"] = PURIFIED_OPS_CPU_CAPABILITY;
    info["cxx_flags"] = PURIFIED_OPS_CXX_FLAGS;
    info["cpu_bf16_conversion"] = purified_ops::cpu_has_bf16_conversion() ? "avx512_bf16" : "software";
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    return info;
  });
}
