// Instantiates the fused purification kernels for one dtype (one .cu per dtype, so that
// a parallel build compiles them side by side).
#include "purify_kernels.cuh"

PURIFY_DEFINE_LAUNCHERS(bf16, __nv_bfloat16)
