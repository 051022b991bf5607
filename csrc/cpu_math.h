// Shared by the CPU kernels (gated_residual.cpp, nonlocal_attention.cpp): the function
// attributes their vectorised loops are built with, and the bit cast their polynomial exps use
// to form 2^k. Each file keeps its own exp: the gate's exp_f32 (natural base, clamped to normal
// floats for the sigmoid) and the attention's exp2_f32 (base 2, exp2(0) = 1 exactly, 0 below
// 2^-127) are fitted to different needs.
#pragma once

#include <cstdint>
#include <cstring>

// Runtime dispatch for the CPU loops: GCC compiles each annotated function for a baseline, an
// AVX2+FMA and an AVX-512 target and picks one at load time, so the wheel runs on any x86-64
// and the loops vectorise on the machines that have the wider units.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RNAN_CPU_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define RNAN_CPU_CLONES
#endif
#if defined(__GNUC__)
#define RNAN_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define RNAN_ALWAYS_INLINE inline
#endif

namespace rnan_fast {
namespace cpu {

// The float with these bits (std::bit_cast is C++20; the extension also builds as C++17, the
// default of older PyTorch releases).
RNAN_ALWAYS_INLINE float float_from_bits(int32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace cpu
}  // namespace rnan_fast
