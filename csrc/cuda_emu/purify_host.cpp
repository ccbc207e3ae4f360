// The host-side checks and allocation of csrc, for the emulated module (own object file).
#include "../purify_host.cpp"
