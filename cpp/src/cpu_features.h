// Which SIMD code path the CPU kernels take: detected once from the CPU, capped by the environment
// variable BEM_CPU_SIMD (scalar|avx2|avx512) or by set_simd_level_cap (tests force every path).
#pragma once
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace bem {
namespace detail {

enum class SimdLevel : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

inline const char* simd_level_name(SimdLevel l) {
  switch (l) {
    case SimdLevel::Scalar: return "scalar";
    case SimdLevel::Avx2: return "avx2";
    case SimdLevel::Avx512: return "avx512";
  }
  return "unknown";
}

// Best level this CPU runs: AVX-512 needs F+BW+VL+DQ (masked 16-bit loads, 256-bit halves), AVX2
// needs FMA and F16C (float16 conversions).
inline SimdLevel detected_simd_level() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return SimdLevel::Avx512;
  }
  if (avx2) return SimdLevel::Avx2;
#endif
  return SimdLevel::Scalar;
}

inline SimdLevel env_simd_cap() {
  const char* env = std::getenv("BEM_CPU_SIMD");
  if (env == nullptr) return SimdLevel::Avx512;
  if (std::strcmp(env, "scalar") == 0) return SimdLevel::Scalar;
  if (std::strcmp(env, "avx2") == 0) return SimdLevel::Avx2;
  return SimdLevel::Avx512;
}

inline SimdLevel min_level(SimdLevel a, SimdLevel b) {
  return static_cast<int>(a) < static_cast<int>(b) ? a : b;
}

// -1: not yet decided. Relaxed atomics: every thread computes the same value.
inline std::atomic<int> g_simd_level{-1};

// The level the kernels dispatch on.
inline SimdLevel simd_level() {
  int l = g_simd_level.load(std::memory_order_relaxed);
  if (l < 0) {
    l = static_cast<int>(min_level(detected_simd_level(), env_simd_cap()));
    g_simd_level.store(l, std::memory_order_relaxed);
  }
  return static_cast<SimdLevel>(l);
}

// Caps the level at `cap` (never above what the CPU runs); returns the level now in force.
inline SimdLevel set_simd_level_cap(SimdLevel cap) {
  const SimdLevel l = min_level(detected_simd_level(), cap);
  g_simd_level.store(static_cast<int>(l), std::memory_order_relaxed);
  return l;
}

// Test hook for the LoRA expand strategy: -1 chooses by cost (the default), 0 forces the row-dot
// expand, 1 the packed expand, 2 the tokens-in-lanes expand, so tests exercise each on any shape.
inline std::atomic<int> g_lora_expand_override{-1};
// Likewise for the LoRA shrink: 0 forces the dot-product tiles, 1 the GEMM form.
inline std::atomic<int> g_lora_shrink_override{-1};
// Likewise for the split of a parallel LoRA forward: 0 forces the two-phase split (shrink items,
// then expand items), 1 the fused token blocks (shrink and expand per block).
inline std::atomic<int> g_lora_split_override{-1};

// Test hook: work (multiply-adds) from which kernels use the thread pool; -1 keeps each kernel's
// own threshold. Tests set 0 to run the threaded paths on small shapes.
inline std::atomic<int64_t> g_parallel_threshold_override{-1};

inline int64_t parallel_threshold(int64_t kernel_default) {
  const int64_t o = g_parallel_threshold_override.load(std::memory_order_relaxed);
  return o >= 0 ? o : kernel_default;
}

}  // namespace detail
}  // namespace bem
