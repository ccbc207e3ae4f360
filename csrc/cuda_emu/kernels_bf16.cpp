// The bf16 kernels of csrc/cuda, compiled by the host compiler against cuda_emu.h.
#include "../cuda/purify_kernels_bf16.cu"
