// Unit tests of the bootstrap core (bem/bootstrap.h): kernels agree bit for bit, results do not
// depend on threads, draws are uniform, permutations tie exactly, the closed-form jackknife matches
// the explicit one, and bad arguments are named.
#include "bem/bootstrap.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "bem/common.h"
#include "bem/parallel.h"

namespace {

int g_failures = 0;

#define CHECK(cond)                                                              \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                              \
    }                                                                            \
  } while (0)

template <class F>
void check_argument_error(F&& f, const std::string& arg, int line) {
  try {
    f();
    std::fprintf(stderr, "line %d: expected ArgumentError naming '%s', nothing thrown\n", line,
                 arg.c_str());
    ++g_failures;
  } catch (const bem::ArgumentError& e) {
    if (e.arg() != arg) {
      std::fprintf(stderr, "line %d: expected ArgumentError naming '%s', got '%s'\n", line,
                   arg.c_str(), e.what());
      ++g_failures;
    }
  }
}
#define CHECK_ARGUMENT_ERROR(expr, arg) check_argument_error([&] { expr; }, arg, __LINE__)

std::vector<double> normal_data(int64_t n, uint64_t seed, double scale = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> dist(0.3, scale);
  std::vector<double> x(static_cast<size_t>(n));
  for (auto& v : x) v = dist(rng);
  return x;
}

std::vector<double> run(const std::vector<double>& x, const std::vector<double>* w, int64_t b,
                        uint64_t seed, bem::BootstrapKernel kernel = bem::BootstrapKernel::Best,
                        double* observed = nullptr) {
  std::vector<double> out(static_cast<size_t>(b));
  bem::LinearBootstrapParams p;
  p.n = static_cast<int64_t>(x.size());
  p.values = x.data();
  p.weights = w ? w->data() : nullptr;
  p.n_resamples = b;
  p.seed = seed;
  p.out = out.data();
  p.kernel = kernel;
  const double obs = bem::bootstrap_linear(p);
  if (observed) *observed = obs;
  return out;
}

// Every supported kernel returns exactly the portable kernel's statistics. n = 100003 makes
// Lemire rejections (probability (2^32 mod n) / 2^32 per draw) certain over the draws made, so the
// slow path is compared too; odd n exercise the final single draw; B = 37 leaves a partial block.
void test_kernels_agree() {
  const bem::BootstrapKernel kernels[] = {bem::BootstrapKernel::Best, bem::BootstrapKernel::Avx2,
                                          bem::BootstrapKernel::Avx512};
  for (const int64_t n : {2, 3, 17, 1000, 100003}) {
    const auto x = normal_data(n, 11 + n);
    const auto w = normal_data(n, 7 + n, 0.1);
    std::vector<double> weights(w.size());
    for (size_t i = 0; i < w.size(); ++i) weights[i] = 0.5 + std::fabs(w[i]);
    const int64_t b = n > 10000 ? 181 : 37;
    for (const bool weighted : {false, true}) {
      const auto* wp = weighted ? &weights : nullptr;
      const auto ref = run(x, wp, b, 42, bem::BootstrapKernel::Portable);
      for (const auto k : kernels) {
        if (!bem::bootstrap_kernel_supported(k)) continue;
        const auto got = run(x, wp, b, 42, k);
        if (got != ref) {
          std::fprintf(stderr, "kernel %s differs from portable (n=%lld, weighted=%d)\n",
                       bem::bootstrap_kernel_name(k), static_cast<long long>(n), weighted);
          ++g_failures;
        }
      }
    }
  }
}

void test_threads_and_seeds() {
  const auto x = normal_data(513, 3);
  bem::set_num_threads(1);
  const auto one = run(x, nullptr, 1001, 9);
  bem::set_num_threads(3);
  const auto three = run(x, nullptr, 1001, 9);
  CHECK(one == three);
  CHECK(run(x, nullptr, 1001, 9) == one);
  const auto other = run(x, nullptr, 1001, 10);
  CHECK(other != one);
  // A resample's statistic depends on (seed, its index) only: a shorter run is a prefix.
  const auto prefix = run(x, nullptr, 100, 9);
  CHECK(std::equal(prefix.begin(), prefix.end(), one.begin()));
}

// Values {0, 1, 4}: each multiset of 3 draws has a distinct sum, so the distribution of resample
// means must be the multinomial one. Pearson's chi-square (9 degrees of freedom) stays below its
// 0.9999 quantile 33.72 for uniform draws; a biased index generator would blow it up.
void test_draws_are_uniform() {
  const std::vector<double> x = {0.0, 1.0, 4.0};
  const int64_t b = 300000;
  const auto out = run(x, nullptr, b, 2024);
  std::map<double, int64_t> seen;
  for (const double v : out) ++seen[v * 3.0];
  std::map<double, double> expected;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j)
      for (int k = 0; k < 3; ++k) expected[x[i] + x[j] + x[k]] += static_cast<double>(b) / 27.0;
  CHECK(seen.size() == expected.size());
  double chi2 = 0.0;
  for (const auto& [sum, e] : expected) {
    const double o = static_cast<double>(seen.count(sum) ? seen[sum] : 0);
    chi2 += (o - e) * (o - e) / e;
  }
  CHECK(chi2 < 33.72);

  // n = 7 has a non-zero rejection threshold (2^32 mod 7 = 4); the mean of each value's share
  // must be 1/7 — checked through the bootstrap mean of one-hot data.
  const std::vector<double> one_hot = {1, 0, 0, 0, 0, 0, 0};
  const auto hot = run(one_hot, nullptr, 200000, 5);
  double mean = 0.0;
  for (const double v : hot) mean += v;
  mean /= static_cast<double>(hot.size());
  // sd of a resample mean is sqrt(p(1-p)/n) = 0.1323; of the average over B, /sqrt(B).
  CHECK(std::fabs(mean - 1.0 / 7.0) < 5 * 0.1323 / std::sqrt(200000.0));
}

// Decimal values whose double sum depends on the order: every resample that is a permutation of
// the data must still equal the observed mean bit for bit.
void test_permutations_tie_exactly() {
  const std::vector<double> x = {0.1, 0.7, 0.2};
  const std::vector<double> reversed = {0.2, 0.7, 0.1};
  double observed = 0.0, observed_reversed = 0.0;
  const int64_t b = 54000;
  const auto out = run(x, nullptr, b, 77, bem::BootstrapKernel::Best, &observed);
  run(reversed, nullptr, 8, 1, bem::BootstrapKernel::Best, &observed_reversed);
  CHECK(observed == observed_reversed);
  CHECK((0.1 + 0.7) + 0.2 != (0.2 + 0.7) + 0.1);  // the data really is order-sensitive
  const int64_t ties = std::count(out.begin(), out.end(), observed);
  // 6 of the 27 equally likely draws are permutations; sd of the count is sqrt(B·p(1−p)).
  const double p = 6.0 / 27.0;
  CHECK(std::fabs(static_cast<double>(ties) - b * p) < 5 * std::sqrt(b * p * (1 - p)));
  std::vector<double> distinct(out);
  std::sort(distinct.begin(), distinct.end());
  distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
  CHECK(distinct.size() == 10);  // multisets of size 3 from 3 values
}

void test_moments() {
  const auto x = normal_data(1001, 5, 2.0);
  double observed = 0.0;
  const int64_t b = 20000;
  const auto out = run(x, nullptr, b, 3, bem::BootstrapKernel::Best, &observed);
  double mean_x = 0.0;
  for (const double v : x) mean_x += v;
  mean_x /= static_cast<double>(x.size());
  CHECK(std::fabs(observed - mean_x) < 1e-14);
  double var_x = 0.0;
  for (const double v : x) var_x += (v - mean_x) * (v - mean_x);
  var_x /= static_cast<double>(x.size());  // the bootstrap variance of the mean is σ²_plug-in / n
  double m = 0.0, v2 = 0.0;
  for (const double v : out) m += v;
  m /= static_cast<double>(b);
  for (const double v : out) v2 += (v - m) * (v - m);
  v2 /= static_cast<double>(b - 1);
  const double se = std::sqrt(var_x / static_cast<double>(x.size()));
  CHECK(std::fabs(m - observed) < 5 * se / std::sqrt(static_cast<double>(b)));
  CHECK(std::fabs(v2 / (se * se) - 1.0) < 0.05);
}

void test_weighted() {
  const auto x = normal_data(257, 8);
  const std::vector<double> twos(x.size(), 2.0);
  double observed_plain = 0.0, observed_weighted = 0.0;
  const auto plain = run(x, nullptr, 333, 4, bem::BootstrapKernel::Best, &observed_plain);
  const auto weighted = run(x, &twos, 333, 4, bem::BootstrapKernel::Best, &observed_weighted);
  for (size_t i = 0; i < plain.size(); ++i) CHECK(std::fabs(plain[i] - weighted[i]) < 1e-14);
  CHECK(std::fabs(observed_plain - observed_weighted) < 1e-14);

  std::vector<double> w(x.size());
  std::mt19937_64 rng(1);
  std::uniform_real_distribution<double> u(0.1, 3.0);
  for (auto& v : w) v = u(rng);
  double observed = 0.0, sw = 0.0, swx = 0.0;
  run(x, &w, 8, 4, bem::BootstrapKernel::Best, &observed);
  for (size_t i = 0; i < x.size(); ++i) {
    sw += w[i];
    swx += w[i] * x[i];
  }
  CHECK(std::fabs(observed - swx / sw) < 1e-14);
}

// Explicit leave-one-out jackknife with scipy's formula, for comparison.
double explicit_acceleration(const std::vector<double>& x, const std::vector<double>* w) {
  const size_t n = x.size();
  std::vector<double> theta(n);
  for (size_t i = 0; i < n; ++i) {
    double num = 0.0, den = 0.0;
    for (size_t j = 0; j < n; ++j) {
      if (j == i) continue;
      const double wj = w ? (*w)[j] : 1.0;
      num += wj * x[j];
      den += wj;
    }
    theta[i] = num / den;
  }
  double mean = 0.0;
  for (const double t : theta) mean += t;
  mean /= static_cast<double>(n);
  double s2 = 0.0, s3 = 0.0;
  for (const double t : theta) {
    const double u = (static_cast<double>(n) - 1) * (mean - t);
    s2 += u * u;
    s3 += u * u * u;
  }
  return s3 / (6.0 * std::pow(s2, 1.5));
}

void test_jackknife() {
  std::mt19937_64 rng(12);
  std::exponential_distribution<double> expo(1.0);
  std::vector<double> skewed(97);
  for (auto& v : skewed) v = expo(rng);
  const double a = bem::jackknife_acceleration(97, skewed.data(), nullptr);
  CHECK(a > 0.0);  // right skew
  CHECK(std::fabs(a - explicit_acceleration(skewed, nullptr)) < 1e-10 * std::fabs(a));
  std::vector<double> w(97);
  std::uniform_real_distribution<double> u(0.2, 2.0);
  for (auto& v : w) v = u(rng);
  const double aw = bem::jackknife_acceleration(97, skewed.data(), w.data());
  CHECK(std::fabs(aw - explicit_acceleration(skewed, &w)) < 1e-9 * std::fabs(aw));
  // Scale and shift invariance, including magnitudes whose cubes overflow a double.
  std::vector<double> big(skewed);
  for (auto& v : big) v = v * 1e120 - 5e119;
  CHECK(std::fabs(bem::jackknife_acceleration(97, big.data(), nullptr) - a) < 1e-9 * std::fabs(a));
  const std::vector<double> constant(13, 0.1);
  CHECK(std::isnan(bem::jackknife_acceleration(13, constant.data(), nullptr)));
  const std::vector<double> two = {1.0, 2.0};
  CHECK(bem::jackknife_acceleration(2, two.data(), nullptr) == 0.0);  // symmetric
}

void test_argument_errors() {
  std::vector<double> x = {1.0, 2.0, 3.0};
  std::vector<double> out(4);
  bem::LinearBootstrapParams p;
  p.n = 3;
  p.values = x.data();
  p.n_resamples = 4;
  p.out = out.data();
  CHECK(std::isfinite(bem::bootstrap_linear(p)));
  auto q = p;
  q.n = 1;
  CHECK_ARGUMENT_ERROR(bem::bootstrap_linear(q), "values");
  q = p;
  q.values = nullptr;
  CHECK_ARGUMENT_ERROR(bem::bootstrap_linear(q), "values");
  q = p;
  q.n_resamples = 0;
  CHECK_ARGUMENT_ERROR(bem::bootstrap_linear(q), "n_resamples");
  q = p;
  q.out = nullptr;
  CHECK_ARGUMENT_ERROR(bem::bootstrap_linear(q), "out");
  std::vector<double> bad = {1.0, NAN, 3.0};
  q = p;
  q.values = bad.data();
  CHECK_ARGUMENT_ERROR(bem::bootstrap_linear(q), "values");
  bad[1] = INFINITY;
  CHECK_ARGUMENT_ERROR(bem::bootstrap_linear(q), "values");
  CHECK_ARGUMENT_ERROR(bem::jackknife_acceleration(3, bad.data(), nullptr), "values");
  std::vector<double> w = {1.0, 0.0, 2.0};
  q = p;
  q.weights = w.data();
  CHECK_ARGUMENT_ERROR(bem::bootstrap_linear(q), "weights");
  w[1] = -1.0;
  CHECK_ARGUMENT_ERROR(bem::jackknife_acceleration(3, x.data(), w.data()), "weights");
  w = {1.0, 1e-300, 1.0};  // rounds to zero in fixed point
  q.weights = w.data();
  CHECK_ARGUMENT_ERROR(bem::bootstrap_linear(q), "weights");
  w = {1e300, 1e300, 1e300};
  std::vector<double> huge = {1e300, 1.0, 1.0};
  q.weights = w.data();
  q.values = huge.data();
  CHECK_ARGUMENT_ERROR(bem::bootstrap_linear(q), "weights");  // w·x overflows
  for (const auto k : {bem::BootstrapKernel::Avx2, bem::BootstrapKernel::Avx512}) {
    if (bem::bootstrap_kernel_supported(k)) continue;
    q = p;
    q.kernel = k;
    CHECK_ARGUMENT_ERROR(bem::bootstrap_linear(q), "kernel");
  }
  // Nothing is written when a check fails.
  std::fill(out.begin(), out.end(), -7.0);
  q = p;
  q.values = bad.data();
  CHECK_ARGUMENT_ERROR(bem::bootstrap_linear(q), "values");
  CHECK(std::all_of(out.begin(), out.end(), [](double v) { return v == -7.0; }));
}

}  // namespace

int main() {
  test_kernels_agree();
  test_threads_and_seeds();
  test_draws_are_uniform();
  test_permutations_tie_exactly();
  test_moments();
  test_weighted();
  test_jackknife();
  test_argument_errors();
  if (g_failures != 0) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("test_bootstrap: all checks passed\n");
  return 0;
}
