// Bootstrap resampling of the (weighted) mean: per-resample xoshiro256** streams, Lemire bounded
// draws, exact 64-bit fixed-point sums, eight resamples in lock-step so the generator vectorises.
#include "bem/bootstrap.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "bem/parallel.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define BEM_BOOTSTRAP_X86 1
#include <immintrin.h>
#else
#define BEM_BOOTSTRAP_X86 0
#endif

#if defined(__GNUC__)
#define BEM_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define BEM_ALWAYS_INLINE inline
#endif

namespace bem {
namespace {

// Resamples advanced together: their generators fill one AVX-512 register or two AVX2 ones.
constexpr int kLanes = 8;

// ---- random numbers ---------------------------------------------------------------------------

inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

// Output `position` of the SplitMix64 sequence started at `seed`: the generator the xoshiro authors
// recommend for seeding. Resample b takes outputs 4b..4b+3, so every stream starts from distinct
// words of one sequence and any resample can be seeded without generating the ones before it.
inline uint64_t splitmix64_at(uint64_t seed, uint64_t position) {
  uint64_t z = seed + (position + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// xoshiro256** (Blackman & Vigna) for kLanes independent streams, stored as one array per state
// word so the vector kernels load a word of all lanes with one instruction.
struct LaneGenerators {
  uint64_t s[4][kLanes];  // s[w][l]: state word w of lane l

  void seed(uint64_t seed, int64_t first_resample) {
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t base = 4 * static_cast<uint64_t>(first_resample + l);
      for (int w = 0; w < 4; ++w) s[w][l] = splitmix64_at(seed, base + w);
    }
  }

  BEM_ALWAYS_INLINE uint64_t next(int l) {
    const uint64_t x1 = s[1][l] + (s[1][l] << 2);  // s1 · 5, written as shifts as the vector
    const uint64_t r = rotl(x1, 7);                // kernels compute it
    const uint64_t result = r + (r << 3);          // · 9
    const uint64_t t = s[1][l] << 17;
    s[2][l] ^= s[0][l];
    s[3][l] ^= s[1][l];
    s[1][l] ^= s[2][l];
    s[0][l] ^= s[3][l];
    s[2][l] ^= t;
    s[3][l] = rotl(s[3][l], 45);
    return result;
  }

  // Lemire's nearly-divisionless method: an unbiased index in [0, n) from 32-bit words of lane l's
  // stream, rejecting the low word below 2^32 mod n. Used on the rare rejection path only.
  uint32_t bounded(int l, uint32_t n, uint32_t reject_below) {
    for (;;) {
      const uint64_t m = (next(l) & 0xFFFFFFFFull) * n;
      if (static_cast<uint32_t>(m) >= reject_below) return static_cast<uint32_t>(m >> 32);
    }
  }
};

// ---- fixed-point terms -----------------------------------------------------------------------

// ceil(log2(n)) for n ≥ 1.
int ceil_log2(uint64_t n) {
  int bits = 0;
  while ((uint64_t{1} << bits) < n) ++bits;
  return bits;
}

// Rounds x[i] to integers v[i] = round(x[i] · 2^shift), with the largest shift for which no sum of
// n terms exceeds 2^62 in magnitude. Integer sums are exact and associative: the sum of any
// multiset of terms is one fixed number, whatever the order.
struct FixedPointTerms {
  std::vector<int64_t> v;  // empty: no terms (the denominator of the plain mean)
  int shift = 0;

  FixedPointTerms() = default;
  FixedPointTerms(const double* x, int64_t n) : v(static_cast<size_t>(n)) {
    double largest = 0.0;
    for (int64_t i = 0; i < n; ++i) largest = std::max(largest, std::fabs(x[i]));
    int exponent = 0;  // largest < 2^exponent
    std::frexp(largest, &exponent);
    shift = 62 - ceil_log2(static_cast<uint64_t>(n)) - exponent;
    for (int64_t i = 0; i < n; ++i) v[i] = std::llrint(std::ldexp(x[i], shift));
  }

  double to_double(int64_t sum) const { return std::ldexp(static_cast<double>(sum), -shift); }
};

// What a resample's statistic is computed from: the terms of the numerator (x, or w·x) and, for
// the weighted mean, of the denominator (w); without weights the denominator is n.
struct LinearTerms {
  FixedPointTerms numerator;
  FixedPointTerms denominator;  // no terms without weights
  double n = 0;

  double statistic(int64_t num_sum, int64_t den_sum) const {
    if (denominator.v.empty()) return numerator.to_double(num_sum) / n;
    return numerator.to_double(num_sum) / denominator.to_double(den_sum);
  }
};

// ---- the resampling kernels -------------------------------------------------------------------
//
// A block is kLanes resamples, first .. first+kLanes-1; lanes past the last resample run and are
// discarded. Each step draws two indices per lane from the two 32-bit halves of one 64-bit output
// (Lemire: index = (half · n) >> 32). A half that Lemire's test rejects (probability < n / 2^32)
// is replaced by lane l's next draws (LaneGenerators::bounded), and an odd n ends with one draw
// per lane the same way. The portable, AVX2 and AVX-512 kernels consume every stream identically,
// so they return bit-identical statistics; only their speed differs.

// Per-lane fixed-point sums of one block.
struct BlockSums {
  int64_t num[kLanes] = {};
  int64_t den[kLanes] = {};
};

// Adds the terms of indices drawn from products m = half · n (index m >> 32), replacing the ones
// whose low word Lemire's test rejects: the rare slow path of every kernel.
template <bool kWeighted>
void add_checked_draws(LaneGenerators& g, const LinearTerms& terms, uint32_t n,
                       uint32_t reject_below, const uint64_t* m_lo, const uint64_t* m_hi,
                       BlockSums& sums) {
  for (int l = 0; l < kLanes; ++l) {
    for (const uint64_t m : {m_lo[l], m_hi[l]}) {
      const uint32_t i = static_cast<uint32_t>(m) < reject_below ? g.bounded(l, n, reject_below)
                                                                 : static_cast<uint32_t>(m >> 32);
      sums.num[l] += terms.numerator.v[i];
      if (kWeighted) sums.den[l] += terms.denominator.v[i];
    }
  }
}

// The odd draw of an odd n, then the statistics of the block's live lanes.
template <bool kWeighted>
void finish_block(LaneGenerators& g, const LinearTerms& terms, uint32_t n, uint32_t reject_below,
                  BlockSums& sums, int count, double* out) {
  if (n & 1u) {
    for (int l = 0; l < kLanes; ++l) {
      const uint32_t i = g.bounded(l, n, reject_below);
      sums.num[l] += terms.numerator.v[i];
      if (kWeighted) sums.den[l] += terms.denominator.v[i];
    }
  }
  for (int l = 0; l < count; ++l) out[l] = terms.statistic(sums.num[l], sums.den[l]);
}

template <bool kWeighted>
void resample_block_portable(const LinearTerms& terms, uint32_t n, uint32_t reject_below,
                             uint64_t seed, int64_t first, int count, double* out) {
  LaneGenerators g;
  g.seed(seed, first);
  BlockSums sums;
  uint64_t m_lo[kLanes], m_hi[kLanes];
  for (uint32_t j = 0; j + 1 < n; j += 2) {
    uint32_t any_rejected = 0;
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t x = g.next(l);
      m_lo[l] = (x & 0xFFFFFFFFull) * n;
      m_hi[l] = (x >> 32) * n;
      any_rejected |= static_cast<uint32_t>(static_cast<uint32_t>(m_lo[l]) < reject_below) |
                      static_cast<uint32_t>(static_cast<uint32_t>(m_hi[l]) < reject_below);
    }
    if (any_rejected) {
      add_checked_draws<kWeighted>(g, terms, n, reject_below, m_lo, m_hi, sums);
      continue;
    }
    for (int l = 0; l < kLanes; ++l) {
      const uint32_t a = static_cast<uint32_t>(m_lo[l] >> 32), b = static_cast<uint32_t>(m_hi[l] >> 32);
      sums.num[l] += terms.numerator.v[a] + terms.numerator.v[b];
      if (kWeighted) sums.den[l] += terms.denominator.v[a] + terms.denominator.v[b];
    }
  }
  finish_block<kWeighted>(g, terms, n, reject_below, sums, count, out);
}

#if BEM_BOOTSTRAP_X86
// AVX2: two registers of four lanes; hardware gathers add the drawn terms into vector sums.
template <int k>
__attribute__((target("avx2"), always_inline)) inline __m256i rotl_avx2(__m256i x) {
  return _mm256_or_si256(_mm256_slli_epi64(x, k), _mm256_srli_epi64(x, 64 - k));
}

// The generator states of all lanes: state[w][h] holds word w of lanes 4h .. 4h+3.
__attribute__((target("avx2"), always_inline)) inline void load_avx2(const LaneGenerators& g,
                                                                     __m256i (&state)[4][2]) {
  for (int w = 0; w < 4; ++w)
    for (int h = 0; h < 2; ++h)
      state[w][h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.s[w] + 4 * h));
}

__attribute__((target("avx2"), always_inline)) inline void store_avx2(const __m256i (&state)[4][2],
                                                                      LaneGenerators& g) {
  for (int w = 0; w < 4; ++w)
    for (int h = 0; h < 2; ++h)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(g.s[w] + 4 * h), state[w][h]);
}

template <bool kWeighted>
__attribute__((target("avx2"))) void resample_block_avx2(const LinearTerms& terms, uint32_t n,
                                                         uint32_t reject_below, uint64_t seed,
                                                         int64_t first, int count, double* out) {
  LaneGenerators g;
  g.seed(seed, first);
  BlockSums sums;
  const long long* num = reinterpret_cast<const long long*>(terms.numerator.v.data());
  const long long* den = reinterpret_cast<const long long*>(terms.denominator.v.data());
  const __m256i vn = _mm256_set1_epi64x(n);
  const __m256i vreject = _mm256_set1_epi64x(reject_below);
  const __m256i low_word = _mm256_set1_epi64x(0xFFFFFFFFll);
  __m256i state[4][2];
  load_avx2(g, state);
  __m256i num_acc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
  __m256i den_acc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
  for (uint32_t j = 0; j + 1 < n; j += 2) {
    __m256i m_lo[2], m_hi[2];
    int rejected = 0;
    for (int h = 0; h < 2; ++h) {
      __m256i &s0 = state[0][h], &s1 = state[1][h], &s2 = state[2][h], &s3 = state[3][h];
      const __m256i r = rotl_avx2<7>(_mm256_add_epi64(s1, _mm256_slli_epi64(s1, 2)));
      const __m256i x = _mm256_add_epi64(r, _mm256_slli_epi64(r, 3));
      const __m256i t = _mm256_slli_epi64(s1, 17);
      s2 = _mm256_xor_si256(s2, s0);
      s3 = _mm256_xor_si256(s3, s1);
      s1 = _mm256_xor_si256(s1, s2);
      s0 = _mm256_xor_si256(s0, s3);
      s2 = _mm256_xor_si256(s2, t);
      s3 = rotl_avx2<45>(s3);
      m_lo[h] = _mm256_mul_epu32(x, vn);  // low word · n
      m_hi[h] = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), vn);
      // Both sides are below 2^32, so the signed 64-bit comparison is the unsigned one.
      const __m256i bad = _mm256_or_si256(
          _mm256_cmpgt_epi64(vreject, _mm256_and_si256(m_lo[h], low_word)),
          _mm256_cmpgt_epi64(vreject, _mm256_and_si256(m_hi[h], low_word)));
      rejected |= _mm256_movemask_pd(_mm256_castsi256_pd(bad));
    }
    if (rejected) {
      uint64_t lo[kLanes], hi[kLanes];
      for (int h = 0; h < 2; ++h) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + 4 * h), m_lo[h]);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + 4 * h), m_hi[h]);
      }
      store_avx2(state, g);
      add_checked_draws<kWeighted>(g, terms, n, reject_below, lo, hi, sums);
      load_avx2(g, state);
      continue;
    }
    for (int h = 0; h < 2; ++h) {
      const __m256i a = _mm256_srli_epi64(m_lo[h], 32), b = _mm256_srli_epi64(m_hi[h], 32);
      num_acc[h] = _mm256_add_epi64(num_acc[h], _mm256_add_epi64(_mm256_i64gather_epi64(num, a, 8),
                                                                 _mm256_i64gather_epi64(num, b, 8)));
      if (kWeighted) {
        den_acc[h] = _mm256_add_epi64(den_acc[h], _mm256_add_epi64(_mm256_i64gather_epi64(den, a, 8),
                                                                   _mm256_i64gather_epi64(den, b, 8)));
      }
    }
  }
  store_avx2(state, g);
  for (int h = 0; h < 2; ++h) {
    alignas(32) int64_t part[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(part), num_acc[h]);
    for (int l = 0; l < 4; ++l) sums.num[4 * h + l] += part[l];
    _mm256_store_si256(reinterpret_cast<__m256i*>(part), den_acc[h]);
    for (int l = 0; l < 4; ++l) sums.den[4 * h + l] += part[l];
  }
  finish_block<kWeighted>(g, terms, n, reject_below, sums, count, out);
}

// AVX-512: all eight lanes in one register, native rotates, mask-register rejection test.
// GCC 12's AVX-512 intrinsic headers trip -Wmaybe-uninitialized on their own internals (GCC bug
// 105593), hence the pragma.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"), always_inline)) inline void load_avx512(const LaneGenerators& g,
                                                                         __m512i (&state)[4]) {
  for (int w = 0; w < 4; ++w) state[w] = _mm512_loadu_si512(g.s[w]);
}

__attribute__((target("avx512f"), always_inline)) inline void store_avx512(const __m512i (&state)[4],
                                                                          LaneGenerators& g) {
  for (int w = 0; w < 4; ++w) _mm512_storeu_si512(g.s[w], state[w]);
}

template <bool kWeighted>
__attribute__((target("avx512f"))) void resample_block_avx512(const LinearTerms& terms, uint32_t n,
                                                              uint32_t reject_below, uint64_t seed,
                                                              int64_t first, int count, double* out) {
  LaneGenerators g;
  g.seed(seed, first);
  BlockSums sums;
  const long long* num = reinterpret_cast<const long long*>(terms.numerator.v.data());
  const long long* den = reinterpret_cast<const long long*>(terms.denominator.v.data());
  const __m512i vn = _mm512_set1_epi64(n);
  const __m512i vreject = _mm512_set1_epi64(reject_below);
  const __m512i low_word = _mm512_set1_epi64(0xFFFFFFFFll);
  __m512i state[4];
  load_avx512(g, state);
  __m512i &s0 = state[0], &s1 = state[1], &s2 = state[2], &s3 = state[3];
  __m512i num_acc = _mm512_setzero_si512(), den_acc = _mm512_setzero_si512();
  for (uint32_t j = 0; j + 1 < n; j += 2) {
    const __m512i r = _mm512_rol_epi64(_mm512_add_epi64(s1, _mm512_slli_epi64(s1, 2)), 7);
    const __m512i x = _mm512_add_epi64(r, _mm512_slli_epi64(r, 3));
    const __m512i t = _mm512_slli_epi64(s1, 17);
    s2 = _mm512_xor_si512(s2, s0);
    s3 = _mm512_xor_si512(s3, s1);
    s1 = _mm512_xor_si512(s1, s2);
    s0 = _mm512_xor_si512(s0, s3);
    s2 = _mm512_xor_si512(s2, t);
    s3 = _mm512_rol_epi64(s3, 45);
    const __m512i m_lo = _mm512_mul_epu32(x, vn);
    const __m512i m_hi = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), vn);
    const __mmask8 bad = _mm512_cmplt_epu64_mask(_mm512_and_si512(m_lo, low_word), vreject) |
                         _mm512_cmplt_epu64_mask(_mm512_and_si512(m_hi, low_word), vreject);
    if (bad) {
      uint64_t lo[kLanes], hi[kLanes];
      _mm512_storeu_si512(lo, m_lo);
      _mm512_storeu_si512(hi, m_hi);
      store_avx512(state, g);
      add_checked_draws<kWeighted>(g, terms, n, reject_below, lo, hi, sums);
      load_avx512(g, state);
      continue;
    }
    const __m512i a = _mm512_srli_epi64(m_lo, 32), b = _mm512_srli_epi64(m_hi, 32);
    num_acc = _mm512_add_epi64(num_acc, _mm512_add_epi64(_mm512_i64gather_epi64(a, num, 8),
                                                         _mm512_i64gather_epi64(b, num, 8)));
    if (kWeighted) {
      den_acc = _mm512_add_epi64(den_acc, _mm512_add_epi64(_mm512_i64gather_epi64(a, den, 8),
                                                           _mm512_i64gather_epi64(b, den, 8)));
    }
  }
  store_avx512(state, g);
  int64_t part[kLanes];
  _mm512_storeu_si512(part, num_acc);
  for (int l = 0; l < kLanes; ++l) sums.num[l] += part[l];
  _mm512_storeu_si512(part, den_acc);
  for (int l = 0; l < kLanes; ++l) sums.den[l] += part[l];
  finish_block<kWeighted>(g, terms, n, reject_below, sums, count, out);
}
#pragma GCC diagnostic pop
#endif  // BEM_BOOTSTRAP_X86

using BlockKernel = void (*)(const LinearTerms&, uint32_t, uint32_t, uint64_t, int64_t, int, double*);

bool kernel_supported(BootstrapKernel k) {
  switch (k) {
    case BootstrapKernel::Best:
    case BootstrapKernel::Portable:
      return true;
#if BEM_BOOTSTRAP_X86
    case BootstrapKernel::Avx2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2");
    case BootstrapKernel::Avx512:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx512f");
#else
    case BootstrapKernel::Avx2:
    case BootstrapKernel::Avx512:
      return false;
#endif
  }
  return false;
}

template <bool kWeighted>
BlockKernel block_kernel(BootstrapKernel k) {
  if (k == BootstrapKernel::Best) {
    k = kernel_supported(BootstrapKernel::Avx512) ? BootstrapKernel::Avx512
        : kernel_supported(BootstrapKernel::Avx2) ? BootstrapKernel::Avx2
                                                  : BootstrapKernel::Portable;
  }
#if BEM_BOOTSTRAP_X86
  if (k == BootstrapKernel::Avx512) return &resample_block_avx512<kWeighted>;
  if (k == BootstrapKernel::Avx2) return &resample_block_avx2<kWeighted>;
#endif
  return &resample_block_portable<kWeighted>;
}

// ---- argument checks -------------------------------------------------------------------------

void check_data(int64_t n, const double* values, const double* weights) {
  if (values == nullptr) throw ArgumentError("values", "expected a buffer, got a null pointer");
  if (n < 2) {
    throw ArgumentError("values", "expected at least 2 observations, got " + std::to_string(n));
  }
  if (n > static_cast<int64_t>(std::numeric_limits<uint32_t>::max())) {
    throw ArgumentError("values", "expected fewer than 2^32 observations, got " + std::to_string(n));
  }
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(values[i])) {
      throw ArgumentError("values", "expected finite values, got " + std::to_string(values[i]) +
                                        " at index " + std::to_string(i));
    }
  }
  if (weights == nullptr) return;
  for (int64_t i = 0; i < n; ++i) {
    if (!(std::isfinite(weights[i]) && weights[i] > 0.0)) {
      throw ArgumentError("weights", "expected finite values > 0, got " +
                                         std::to_string(weights[i]) + " at index " + std::to_string(i));
    }
  }
}

LinearTerms make_terms(int64_t n, const double* values, const double* weights) {
  if (weights == nullptr) return LinearTerms{FixedPointTerms(values, n), {}, static_cast<double>(n)};
  std::vector<double> products(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    products[i] = weights[i] * values[i];
    if (!std::isfinite(products[i])) {
      throw ArgumentError("weights", "weights[i] * values[i] overflows at index " + std::to_string(i));
    }
  }
  FixedPointTerms w(weights, n);
  for (int64_t i = 0; i < n; ++i) {
    if (w.v[i] == 0) {
      throw ArgumentError("weights", "the ratio of the largest to the smallest weight is too large "
                                     "for 64-bit fixed-point sums (weight " +
                                         std::to_string(weights[i]) + " at index " +
                                         std::to_string(i) + " rounds to 0)");
    }
  }
  return LinearTerms{FixedPointTerms(products.data(), n), std::move(w), static_cast<double>(n)};
}

}  // namespace

bool bootstrap_kernel_supported(BootstrapKernel kernel) { return kernel_supported(kernel); }

const char* bootstrap_kernel_name(BootstrapKernel kernel) {
  switch (kernel) {
    case BootstrapKernel::Best: return "best";
    case BootstrapKernel::Portable: return "portable";
    case BootstrapKernel::Avx2: return "AVX2";
    case BootstrapKernel::Avx512: return "AVX-512";
  }
  return "unknown";
}

double bootstrap_linear(const LinearBootstrapParams& p) {
  check_data(p.n, p.values, p.weights);
  if (p.n_resamples < 1) {
    throw ArgumentError("n_resamples", "expected >= 1, got " + std::to_string(p.n_resamples));
  }
  if (p.out == nullptr) throw ArgumentError("out", "expected a buffer, got a null pointer");
  if (!kernel_supported(p.kernel)) {
    throw ArgumentError("kernel", std::string("the ") + bootstrap_kernel_name(p.kernel) +
                                      " kernel is not supported by this CPU or build");
  }
  const LinearTerms terms = make_terms(p.n, p.values, p.weights);
  const bool weighted = p.weights != nullptr;

  int64_t num_total = 0, den_total = 0;
  for (int64_t i = 0; i < p.n; ++i) {
    num_total += terms.numerator.v[i];
    if (weighted) den_total += terms.denominator.v[i];
  }

  const BlockKernel kernel = weighted ? block_kernel<true>(p.kernel) : block_kernel<false>(p.kernel);
  const uint32_t n = static_cast<uint32_t>(p.n);
  const uint32_t reject_below = static_cast<uint32_t>(-n) % n;  // 2^32 mod n
  const int64_t blocks = (p.n_resamples + kLanes - 1) / kLanes;
  // About 64k draws per task keeps scheduling overhead small for tiny n.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (kLanes * p.n));
  parallel_for(blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = b * kLanes;
      const int count = static_cast<int>(std::min<int64_t>(kLanes, p.n_resamples - first));
      kernel(terms, n, reject_below, p.seed, first, count, p.out + first);
    }
  });
  return terms.statistic(num_total, den_total);
}

double jackknife_acceleration(int64_t n, const double* values, const double* weights) {
  check_data(n, values, weights);
  const double first = values[0];
  if (std::all_of(values, values + n, [first](double v) { return v == first; })) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  auto weight = [weights](int64_t i) { return weights == nullptr ? 1.0 : weights[i]; };
  double total_weight = 0.0, weighted_sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    total_weight += weight(i);
    weighted_sum += weight(i) * values[i];
  }
  const double theta = weighted_sum / total_weight;
  // θ_(i) − θ̂ = w_i (θ̂ − x_i) / (W − w_i): exact algebra that avoids subtracting two nearly
  // equal leave-one-out statistics.
  std::vector<double> d(static_cast<size_t>(n));
  double mean_d = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    d[i] = weight(i) * (theta - values[i]) / (total_weight - weight(i));
    mean_d += d[i];
  }
  mean_d /= static_cast<double>(n);
  double largest = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    d[i] = mean_d - d[i];  // D_i = mean_j θ_(j) − θ_(i)
    largest = std::max(largest, std::fabs(d[i]));
  }
  // a is scale-free; dividing by max|D| keeps Σ D³ clear of overflow and underflow.
  double sum2 = 0.0, sum3 = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double u = d[i] / largest;
    sum2 += u * u;
    sum3 += u * u * u;
  }
  return sum3 / (6.0 * std::pow(sum2, 1.5));
}

}  // namespace bem
