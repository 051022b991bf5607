// The process-wide choice of the CPU attention kernel's inner loops (csrc/nonlocal_attention.cpp),
// bound in the extension's Python module: "avx512" (the default where the CPU has AVX-512F and DQ) or
// "portable" (MKL sgemm tiles and compiler-vectorised loops, the path of every other x86-64).
#pragma once

#include <string>

namespace rnan_fast {

std::string cpu_attention_isa();
void set_cpu_attention_isa(const std::string& isa);

}  // namespace rnan_fast
