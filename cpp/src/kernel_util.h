// Small helpers shared by the CPU kernel files: argument checks that name the parameter, grow-only
// scratch buffers, and element sizes.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "bem/common.h"

namespace bem {
namespace detail {

// Throws ArgumentError(arg, message) when cond is false; the message is only built then (these
// checks run on every call, including 1-µs decode calls).
#define BEM_REQUIRE(cond, arg, message)                                 \
  do {                                                                  \
    if (!(cond)) throw ::bem::ArgumentError((arg), (message));          \
  } while (0)

inline std::string got(int64_t v) { return "got " + std::to_string(v); }

inline void require_dtype(DType dtype) {
  const int d = static_cast<int>(dtype);
  BEM_REQUIRE(d >= 0 && d <= 2, "dtype", "expected float32, bfloat16 or float16, got code " + std::to_string(d));
}

inline size_t element_size(DType t) { return t == DType::F32 ? 4 : 2; }

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Grow-only scratch (thread_local at the call sites): no allocation once warm.
template <class P>
P* tls_buffer(std::vector<P>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

}  // namespace detail
}  // namespace bem
