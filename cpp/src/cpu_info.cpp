#include "bem/cpu_info.h"

#include "cpu_features.h"

namespace bem {

std::string kernel_simd_level() { return detail::simd_level_name(detail::simd_level()); }

}  // namespace bem
