// Bounded FiLM on the CPU: checks, row blocks on the thread pool (with non-temporal stores for
// outputs larger than the cache), and the per-group backward reduction. Kernels per SIMD level
// come from film_kernels.inl.
#include "bem/film.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "bem/dtype.h"
#include "bem/parallel.h"
#include "cpu_features.h"
#include "kernel_util.h"
#include "simd.h"

namespace bem {
namespace {

using detail::got;
using detail::require_dtype;
using detail::tls_buffer;

struct FilmArgs {
  int64_t rows = 0, d = 0, rows_per_group = 1;
  float gamma_lo = 0.5f, gamma_hi = 2.0f, beta_bound = 0.5f;
  const void* x = nullptr;
  const void* gamma = nullptr;
  const void* beta = nullptr;
  void* y = nullptr;             // forward
  bool stream = false;           // forward: non-temporal fp32 stores
  const void* dy = nullptr;      // backward
  void* grad_x = nullptr;
  float* grad_gamma = nullptr;
  float* grad_beta = nullptr;
};

struct FilmKernels {
  bool (*forward_rows)(const FilmArgs&, int64_t r0, int64_t r1);
  void (*backward_block)(const FilmArgs&, int64_t g0, int64_t g1, int64_t c0, int64_t c1);
};

}  // namespace
}  // namespace bem

#define BEM_ISA_KERNELS "film_kernels.inl"
#include "isa_instantiate.inl"

namespace bem {
namespace {

const FilmKernels& kernels_for(DType dtype) {
  switch (detail::simd_level()) {
#ifdef BEM_SIMD_X86
    case detail::SimdLevel::Avx512: return isa_avx512::film_kernels(dtype);
    case detail::SimdLevel::Avx2: return isa_avx2::film_kernels(dtype);
#endif
    default: return isa_scalar::film_kernels(dtype);
  }
}

// Elements from which the pool is used (a few hundred KB: below that, waking threads costs more).
constexpr int64_t kParallelElements = int64_t{1} << 16;

// Outputs from this size on are streamed past the cache: half the last-level cache, capped at
// 16 MB because virtual machines often report the host's whole L3.
int64_t stream_threshold_bytes() {
  static const int64_t bytes = [] {
    constexpr int64_t cap = int64_t{16} << 20;
    long l3 = -1;
#ifdef _SC_LEVEL3_CACHE_SIZE
    l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return l3 > 0 ? std::max<int64_t>(int64_t{1} << 20, std::min<int64_t>(cap, static_cast<int64_t>(l3) / 2)) : cap;
  }();
  return bytes;
}

void check_film(int64_t rows, int64_t d, int64_t groups, DType dtype, float gamma_lo, float gamma_hi,
                float beta_bound) {
  BEM_REQUIRE(rows >= 1, "rows", "expected >= 1, " + got(rows));
  BEM_REQUIRE(d >= 1, "d", "expected >= 1, " + got(d));
  BEM_REQUIRE(groups >= 1 && groups <= rows && rows % groups == 0, "groups",
          "expected a divisor of rows=" + std::to_string(rows) + ", " + got(groups));
  require_dtype(dtype);
  BEM_REQUIRE(!std::isnan(gamma_lo) && !std::isnan(gamma_hi) && gamma_lo <= gamma_hi, "gamma_bounds",
          "expected gamma_lo <= gamma_hi, got (" + std::to_string(gamma_lo) + ", " + std::to_string(gamma_hi) + ")");
  BEM_REQUIRE(!std::isnan(beta_bound) && beta_bound >= 0.0f, "beta_bound", "expected >= 0, got " + std::to_string(beta_bound));
}

}  // namespace

bool film_forward_cpu(const FilmForwardParams& p) {
  check_film(p.rows, p.d, p.groups, p.dtype, p.gamma_lo, p.gamma_hi, p.beta_bound);
  BEM_REQUIRE(p.x != nullptr, "x", "is null");
  BEM_REQUIRE(p.gamma != nullptr, "gamma", "is null");
  BEM_REQUIRE(p.beta != nullptr, "beta", "is null");
  BEM_REQUIRE(p.y != nullptr, "y", "is null");
  FilmArgs a;
  a.rows = p.rows;
  a.d = p.d;
  a.rows_per_group = p.rows / p.groups;
  a.gamma_lo = p.gamma_lo;
  a.gamma_hi = p.gamma_hi;
  a.beta_bound = p.beta_bound;
  a.x = p.x;
  a.gamma = p.gamma;
  a.beta = p.beta;
  a.y = p.y;
  const int64_t elements = p.rows * p.d;
  a.stream = p.dtype == DType::F32 && elements * 4 >= stream_threshold_bytes();
  const FilmKernels& kern = kernels_for(p.dtype);
  if (elements < detail::parallel_threshold(kParallelElements) || p.rows == 1) return kern.forward_rows(a, 0, p.rows);
  std::atomic<bool> all_finite{true};
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / p.d);
  parallel_for(p.rows, grain, [&](int64_t b, int64_t e) {
    if (!kern.forward_rows(a, b, e)) all_finite.store(false, std::memory_order_relaxed);
  });
  return all_finite.load();
}

void film_backward_cpu(const FilmBackwardParams& p) {
  check_film(p.rows, p.d, p.groups, p.dtype, p.gamma_lo, p.gamma_hi, p.beta_bound);
  BEM_REQUIRE(p.x != nullptr, "x", "is null");
  BEM_REQUIRE(p.gamma != nullptr, "gamma", "is null");
  BEM_REQUIRE(p.beta != nullptr, "beta", "is null");
  BEM_REQUIRE(p.grad_y != nullptr, "grad_y", "is null");
  if (!p.grad_x && !p.grad_gamma && !p.grad_beta) return;
  FilmArgs a;
  a.rows = p.rows;
  a.d = p.d;
  a.rows_per_group = p.rows / p.groups;
  a.gamma_lo = p.gamma_lo;
  a.gamma_hi = p.gamma_hi;
  a.beta_bound = p.beta_bound;
  a.x = p.x;
  a.gamma = p.gamma;
  a.beta = p.beta;
  a.dy = p.grad_y;
  a.grad_x = p.grad_x;
  a.grad_gamma = p.grad_gamma;
  a.grad_beta = p.grad_beta;
  const FilmKernels& kern = kernels_for(p.dtype);
  const int64_t elements = p.rows * p.d;
  if (elements < detail::parallel_threshold(kParallelElements)) {
    kern.backward_block(a, 0, p.groups, 0, p.d);
    return;
  }
  // Work items: groups × column blocks; each owns its slice of grad_γ / grad_β and sums the
  // group's rows in order, so the result does not depend on the thread count.
  const int64_t want = 4 * static_cast<int64_t>(num_threads());
  const int64_t col_parts = p.groups >= want ? 1 : std::min<int64_t>((want + p.groups - 1) / p.groups, (p.d + 255) / 256);
  const int64_t step = (p.d + col_parts - 1) / col_parts;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / (a.rows_per_group * step));
  parallel_for(p.groups * col_parts, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t g = i / col_parts, c0 = (i % col_parts) * step;
      kern.backward_block(a, g, g + 1, c0, std::min(p.d, c0 + step));
    }
  });
}

}  // namespace bem
