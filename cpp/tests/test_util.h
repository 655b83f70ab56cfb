// Helpers shared by the C++ kernel tests: a CHECK macro that counts failures, seeded random data,
// buffers of each element type, tolerance comparisons, and the SIMD levels this CPU can run.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../src/cpu_features.h"
#include "bem/common.h"
#include "bem/dtype.h"

namespace bem_test {

inline int g_checks = 0;
inline int g_failures = 0;

#define CHECK(cond, ...)                                                              \
  do {                                                                                \
    ++bem_test::g_checks;                                                             \
    if (!(cond)) {                                                                    \
      ++bem_test::g_failures;                                                         \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond);   \
      std::fprintf(stderr, __VA_ARGS__);                                              \
      std::fprintf(stderr, "\n");                                                     \
    }                                                                                 \
  } while (0)

inline int finish(const char* name) {
  std::printf("%s: %d checks, %d failures\n", name, g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}

using Rng = std::mt19937_64;

inline std::vector<float> uniform(Rng& rng, size_t n, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// A buffer of one element type; values are rounded to that type on the way in, and `value(i)`
// reads back exactly what the kernel sees.
struct Buf {
  bem::DType dtype = bem::DType::F32;
  std::vector<float> f;
  std::vector<uint16_t> h;

  Buf() = default;
  Buf(bem::DType t, size_t n) : dtype(t) {
    if (t == bem::DType::F32) f.assign(n, 0.0f); else h.assign(n, 0);
  }
  Buf(bem::DType t, const std::vector<float>& v) : Buf(t, v.size()) {
    for (size_t i = 0; i < v.size(); ++i) set(i, v[i]);
  }
  size_t size() const { return dtype == bem::DType::F32 ? f.size() : h.size(); }
  void* data() { return dtype == bem::DType::F32 ? static_cast<void*>(f.data()) : static_cast<void*>(h.data()); }
  const void* data() const {
    return dtype == bem::DType::F32 ? static_cast<const void*>(f.data()) : static_cast<const void*>(h.data());
  }
  void set(size_t i, float v) {
    if (dtype == bem::DType::F32) f[i] = v;
    else if (dtype == bem::DType::BF16) h[i] = bem::from_float<bem::bf16>(v).bits;
    else h[i] = bem::from_float<bem::f16>(v).bits;
  }
  double value(size_t i) const {
    if (dtype == bem::DType::F32) return f[i];
    if (dtype == bem::DType::BF16) return bem::to_float(bem::bf16{h[i]});
    return bem::to_float(bem::f16{h[i]});
  }
  bool same_bits(const Buf& o) const {
    return dtype == o.dtype && f == o.f && h == o.h;
  }
};

// Unit roundoff of the storage type (outputs are rounded once to it).
inline double unit_roundoff(bem::DType t) {
  return t == bem::DType::F32 ? 0x1p-24 : (t == bem::DType::BF16 ? 0x1p-8 : 0x1p-11);
}

// Half the spacing of the storage type's subnormals: the absolute error of rounding a tiny value
// (float16's subnormals start at 6e-5, within reach of ordinary outputs).
inline double subnormal_half_ulp(bem::DType t) { return t == bem::DType::F16 ? 0x1p-25 : 0x1p-150; }

inline const char* name(bem::DType t) { return bem::dtype_name(t); }

// Elementwise |got − ref| ≤ tol[i]; one CHECK per array, listing the first mismatches.
template <class Get>
void check_close(const std::string& what, size_t n, Get got, const std::vector<double>& ref,
                 const std::vector<double>& tol) {
  int bad = 0;
  for (size_t i = 0; i < n; ++i) {
    const double g = got(i);
    if (!(std::fabs(g - ref[i]) <= tol[i])) {
      if (bad < 5) {
        std::fprintf(stderr, "  %s[%zu]: got %.9g, expected %.9g (tolerance %.3g)\n", what.c_str(), i, g,
                     ref[i], tol[i]);
      }
      ++bad;
    }
  }
  CHECK(bad == 0, "%s: %d of %zu elements out of tolerance", what.c_str(), bad, n);
}

// SIMD levels this CPU runs, lowest first (every one is tested).
inline std::vector<bem::detail::SimdLevel> simd_levels() {
  std::vector<bem::detail::SimdLevel> out;
  const int top = static_cast<int>(bem::detail::detected_simd_level());
  for (int l = 0; l <= top; ++l) out.push_back(static_cast<bem::detail::SimdLevel>(l));
  return out;
}

// Runs fn and reports whether it threw bem::ArgumentError naming `arg` with the given flavour.
template <class Fn>
bool throws_argument_error(Fn fn, const std::string& arg, bool index_error) {
  try {
    fn();
  } catch (const bem::ArgumentError& e) {
    if (e.arg() != arg || e.index_error() != index_error) {
      std::fprintf(stderr, "  wrong error: arg=%s index_error=%d (%s)\n", e.arg().c_str(), e.index_error(), e.what());
      return false;
    }
    return true;
  }
  return false;
}

}  // namespace bem_test
