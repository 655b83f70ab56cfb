// What the CPU kernels run on, for diagnostics (`bem info`).
#pragma once
#include <string>

namespace bem {

// The SIMD code path the CPU kernels dispatch to: "avx512", "avx2" or "scalar" — the best the
// CPU supports, capped by the environment variable BEM_CPU_SIMD (read once, at first use).
std::string kernel_simd_level();

}  // namespace bem
