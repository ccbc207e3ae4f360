// The K > 16 factor kernel of csrc/cuda, compiled by the host compiler against cuda_emu.h.
#include "../cuda/purify_factor_grams.cu"
