// Whether the CPU kernels round float to bfloat16 with the AVX512_BF16 instruction
// VCVTNE2PS2BF16 (one instruction for 32 values instead of about fifteen). Only the AVX512
// kernels use it, and only where the CPU has it (cpuid, checked once when the module loads);
// vectors holding a subnormal or a NaN still round in software, so the outputs are bitwise
// those of the software rounding either way (purify_cpu.cpp, Block::to_16bit). The tests turn
// it off to compare both.
#pragma once

namespace purified_ops {

// The CPU has AVX512_BF16 and these kernels are built to use it (the AVX512 capability).
bool cpu_has_bf16_conversion();

// Whether the kernels use it now: cpu_has_bf16_conversion() unless turned off.
bool bf16_hardware_conversion();

// Turns it off (false) or back on (true; stays off where the CPU lacks it).
void set_bf16_hardware_conversion(bool on);

}  // namespace purified_ops
