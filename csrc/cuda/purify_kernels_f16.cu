// Instantiates the fused purification kernels for one dtype (one .cu per dtype, so that
// a parallel build compiles them side by side).
#include "purify_kernels.cuh"

PURIFY_DEFINE_LAUNCHERS(f16, __half)
