// Scalar conversions between float32 and the 16-bit storage types (bfloat16, float16).
// Kernels load 16-bit values, compute in float32 and round back to nearest-even on store.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "bem/common.h"

namespace bem {

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

inline float to_float(float v) { return v; }

inline float to_float(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float to_float(f16 v) {
  const uint32_t h = v.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t u;
  if (exp == 0x1F) {
    u = sign | 0x7F800000u | (mant << 13);  // inf / nan
  } else if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do { mant <<= 1; ++e; } while ((mant & 0x400u) == 0);
      u = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3FFu) << 13);
    }
  } else {
    u = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T> inline T from_float(float v);

template <> inline float from_float<float>(float v) { return v; }

template <> inline bf16 from_float<bf16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet nan
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even
  return bf16{static_cast<uint16_t>(u >> 16)};
}

template <> inline f16 from_float<f16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return f16{static_cast<uint16_t>(sign | 0x7E00u)};  // nan
  if (a >= 0x477FF000u) return f16{static_cast<uint16_t>(sign | 0x7C00u)};  // overflow -> inf
  if (a < 0x38800000u) {  // subnormal or zero in half precision
    float af;
    std::memcpy(&af, &a, 4);
    const float scaled = af * 16777216.0f;  // 2^24: one half-subnormal ulp becomes 1
    return f16{static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(scaled)))};
  }
  const uint32_t rounded = a + 0xFFFu + ((a >> 13) & 1u);
  return f16{static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13))};
}

}  // namespace bem
