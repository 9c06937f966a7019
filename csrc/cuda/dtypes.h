// Storage types of 16-bit floats in the CUDA kernels: raw bits, so that the same kernel source
// compiles under nvcc and, for the CPU emulation, under a host compiler.
#pragma once

#include <cstdint>

namespace kdk::dev {

struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

}  // namespace kdk::dev
