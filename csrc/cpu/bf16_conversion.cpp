#include "bf16_conversion.h"

#include <atomic>

#if defined(CPU_CAPABILITY_AVX512) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

namespace purified_ops {
namespace {

bool detect() {
#if defined(CPU_CAPABILITY_AVX512) && (defined(__GNUC__) || defined(__clang__))
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  // CPUID leaf 7, sub-leaf 1: EAX bit 5 is AVX512_BF16. The AVX-512 state itself is enabled by
  // the OS wherever these kernels run (torch chose its AVX512 capability).
  if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) return false;
  return (eax >> 5) & 1u;
#else
  return false;
#endif
}

const bool has_conversion = detect();
std::atomic<bool> enabled{has_conversion};

}  // namespace

bool cpu_has_bf16_conversion() { return has_conversion; }

bool bf16_hardware_conversion() { return enabled.load(std::memory_order_relaxed); }

void set_bf16_hardware_conversion(bool on) { enabled.store(on && has_conversion, std::memory_order_relaxed); }

}  // namespace purified_ops
