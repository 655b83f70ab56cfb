// Tests of the bounded FiLM CPU kernels (bem/film.h) against a float64 reference: per-token,
// per-sequence and global γ/β, values on and beyond the bounds, NaN and infinite bounds, aliasing
// y = x, the streaming-store path, every dtype and SIMD level, thread-count independence and the
// argument checks.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "bem/film.h"
#include "bem/parallel.h"
#include "test_util.h"

using bem::DType;
using bem::detail::SimdLevel;
using namespace bem_test;

namespace {

struct Case {
  int64_t rows, d, groups;
  float lo, hi, bb;
};

std::string describe(const Case& c) {
  char buf[160];
  std::snprintf(buf, sizeof(buf), "rows=%lld d=%lld groups=%lld bounds=(%g, %g, %g)", (long long)c.rows,
                (long long)c.d, (long long)c.groups, c.lo, c.hi, c.bb);
  return buf;
}

struct Data {
  Case c;
  Buf x, gamma, beta, dy;
};

// γ spans [0, 3] and β [−1, 1] so both bounds clip; a few entries sit exactly on a bound (their
// gradient passes, as torch.clamp's does).
Data make_data(Rng& rng, const Case& c, DType dt) {
  Data d;
  d.c = c;
  d.x = Buf(dt, uniform(rng, c.rows * c.d, -2.0f, 2.0f));
  std::vector<float> g = uniform(rng, c.groups * c.d, 0.0f, 3.0f), b = uniform(rng, c.groups * c.d, -1.0f, 1.0f);
  for (size_t i = 0; i < g.size(); i += 7) g[i] = (i / 7) % 2 ? c.hi : c.lo;
  for (size_t i = 3; i < b.size(); i += 11) b[i] = (i / 11) % 2 ? c.bb : -c.bb;
  for (float& v : g) v = std::isfinite(v) ? v : 1.5f;
  for (float& v : b) v = std::isfinite(v) ? v : 0.25f;
  d.gamma = Buf(dt, g);
  d.beta = Buf(dt, b);
  d.dy = Buf(dt, uniform(rng, c.rows * c.d));
  return d;
}

double clip(double v, double lo, double hi) { return std::isnan(v) ? v : std::min(std::max(v, lo), hi); }

bem::FilmForwardParams forward_params(Data& d, void* y) {
  bem::FilmForwardParams p;
  p.rows = d.c.rows;
  p.d = d.c.d;
  p.groups = d.c.groups;
  p.dtype = d.x.dtype;
  p.gamma_lo = d.c.lo;
  p.gamma_hi = d.c.hi;
  p.beta_bound = d.c.bb;
  p.x = d.x.data();
  p.gamma = d.gamma.data();
  p.beta = d.beta.data();
  p.y = y;
  return p;
}

struct Grads {
  Buf gx;
  std::vector<float> gg, gb;
};

Grads run_backward(Data& d, bool want_x, bool want_g, bool want_b) {
  const Case& c = d.c;
  Grads g;
  g.gx = Buf(d.x.dtype, std::vector<float>(c.rows * c.d, NAN));
  g.gg.assign(c.groups * c.d, NAN);
  g.gb.assign(c.groups * c.d, NAN);
  bem::FilmBackwardParams b;
  b.rows = c.rows;
  b.d = c.d;
  b.groups = c.groups;
  b.dtype = d.x.dtype;
  b.gamma_lo = c.lo;
  b.gamma_hi = c.hi;
  b.beta_bound = c.bb;
  b.x = d.x.data();
  b.gamma = d.gamma.data();
  b.beta = d.beta.data();
  b.grad_y = d.dy.data();
  b.grad_x = want_x ? g.gx.data() : nullptr;
  b.grad_gamma = want_g ? g.gg.data() : nullptr;
  b.grad_beta = want_b ? g.gb.data() : nullptr;
  bem::film_backward_cpu(b);
  return g;
}

void check_case(Data& d, const std::string& label) {
  const Case& c = d.c;
  const DType dt = d.x.dtype;
  const int64_t rpg = c.rows / c.groups;
  const size_t n = static_cast<size_t>(c.rows * c.d);
  std::vector<double> y_ref(n), y_tol(n), gx_ref(n), gx_tol(n);
  std::vector<double> gg_ref(c.groups * c.d, 0.0), gb_ref(c.groups * c.d, 0.0), gg_abs(c.groups * c.d, 0.0),
      gb_abs(c.groups * c.d, 0.0);
  const double u = unit_roundoff(dt);
  for (int64_t r = 0; r < c.rows; ++r) {
    const int64_t g = r / rpg;
    for (int64_t j = 0; j < c.d; ++j) {
      const size_t i = static_cast<size_t>(r * c.d + j), gi = static_cast<size_t>(g * c.d + j);
      const double gam = d.gamma.value(gi), bet = d.beta.value(gi), xv = d.x.value(i), dyv = d.dy.value(i);
      y_ref[i] = clip(gam, c.lo, c.hi) * xv + clip(bet, -c.bb, c.bb);
      y_tol[i] = 0x1p-23 * (std::fabs(clip(gam, c.lo, c.hi) * xv) + std::fabs(clip(bet, -c.bb, c.bb))) + u * std::fabs(y_ref[i]) * 1.01 +
                 subnormal_half_ulp(dt);
      gx_ref[i] = clip(gam, c.lo, c.hi) * dyv;
      gx_tol[i] = (0x1p-23 + u * 1.01) * std::fabs(gx_ref[i]) + subnormal_half_ulp(dt);
      const bool g_in = gam >= c.lo && gam <= c.hi, b_in = std::fabs(bet) <= c.bb;
      if (g_in) gg_ref[gi] += dyv * xv, gg_abs[gi] += std::fabs(dyv * xv);
      if (b_in) gb_ref[gi] += dyv, gb_abs[gi] += std::fabs(dyv);
    }
  }
  Buf y(dt, n);
  bem::FilmForwardParams p = forward_params(d, y.data());
  CHECK(bem::film_forward_cpu(p), "%s: finite inputs reported non-finite", label.c_str());
  check_close(label + " y", n, [&](size_t i) { return y.value(i); }, y_ref, y_tol);
  // In place (y aliases x).
  Buf xy = d.x;
  p.x = xy.data();
  p.y = xy.data();
  bem::film_forward_cpu(p);
  CHECK(xy.same_bits(y), "%s: in-place result differs", label.c_str());

  const Grads g = run_backward(d, true, true, true);
  check_close(label + " grad_x", n, [&](size_t i) { return g.gx.value(i); }, gx_ref, gx_tol);
  std::vector<double> gg_tol(gg_ref.size()), gb_tol(gb_ref.size());
  for (size_t i = 0; i < gg_ref.size(); ++i) {
    gg_tol[i] = (rpg + 4) * 0x1p-24 * gg_abs[i] + 1e-30;
    gb_tol[i] = (rpg + 4) * 0x1p-24 * gb_abs[i] + 1e-30;
  }
  check_close(label + " grad_gamma", gg_ref.size(), [&](size_t i) { return static_cast<double>(g.gg[i]); }, gg_ref, gg_tol);
  check_close(label + " grad_beta", gb_ref.size(), [&](size_t i) { return static_cast<double>(g.gb[i]); }, gb_ref, gb_tol);
  const Grads only_beta = run_backward(d, false, false, true);
  CHECK(only_beta.gb == g.gb, "%s: grad_beta alone differs", label.c_str());
  bool untouched = true;
  for (float v : only_beta.gg) untouched &= std::isnan(v);
  CHECK(untouched, "%s: unrequested grad_gamma was written", label.c_str());
}

void test_against_reference() {
  Rng rng(99);
  const float inf = INFINITY;
  const std::vector<Case> cases = {
      {1, 1, 1, 0.5f, 2.0f, 0.5f},       {7, 59, 7, 0.5f, 2.0f, 0.5f},     {300, 111, 300, 0.5f, 2.0f, 0.5f},
      {300, 111, 3, 0.5f, 2.0f, 0.5f},   {300, 111, 1, 0.5f, 2.0f, 0.5f},  {64, 17, 4, -inf, inf, inf},
      {30, 33, 5, 1.0f, 1.0f, 0.0f},     {2, 4099, 2, 0.25f, 1.75f, 0.75f},
  };
  for (SimdLevel level : simd_levels()) {
    bem::detail::set_simd_level_cap(level);
    for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
      for (const Case& c : cases) {
        Data d = make_data(rng, c, dt);
        check_case(d, std::string(bem::detail::simd_level_name(level)) + " " + name(dt) + " " + describe(c));
      }
    }
  }
  // Outputs large enough for non-temporal stores (16 MB): per sequence and per token with rows a
  // multiple of the vector width (streamed), and with ragged rows (stored normally).
  for (const Case& c : {Case{1100, 4096, 11, 0.5f, 2.0f, 0.5f}, Case{1024, 4096, 1024, 0.5f, 2.0f, 0.5f},
                        Case{1000, 4099, 4, 0.5f, 2.0f, 0.5f}}) {
    Data big = make_data(rng, c, DType::F32);
    check_case(big, std::string(bem::detail::simd_level_name(bem::detail::simd_level())) + " float32 large " +
                        describe(big.c));
  }
  bem::detail::set_simd_level_cap(SimdLevel::Avx512);
}

void test_nan_and_flag() {
  Rng rng(1);
  for (SimdLevel level : simd_levels()) {
    bem::detail::set_simd_level_cap(level);
    for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
      const std::string label = std::string(bem::detail::simd_level_name(level)) + " " + name(dt);
      Data d = make_data(rng, {10, 21, 2, 0.5f, 2.0f, 0.5f}, dt);
      d.gamma.set(4, NAN);
      Buf y(dt, static_cast<size_t>(10 * 21));
      bem::FilmForwardParams p = forward_params(d, y.data());
      CHECK(!bem::film_forward_cpu(p), "%s: NaN γ not reported", label.c_str());
      CHECK(std::isnan(y.value(4)) && std::isnan(y.value(21 * 3 + 4)), "%s: NaN γ must give NaN y (as torch.clamp)",
            label.c_str());
      const Grads g = run_backward(d, true, true, true);
      CHECK(g.gg[4] == 0.0f, "%s: NaN γ must get a zero gradient", label.c_str());
      if (dt == DType::F16) {
        Data big = make_data(rng, {4, 9, 4, 0.5f, 2.0f, 0.5f}, dt);
        for (size_t i = 0; i < big.x.size(); ++i) big.x.set(i, 60000.0f);
        Buf yb(dt, big.x.size());
        p = forward_params(big, yb.data());
        CHECK(!bem::film_forward_cpu(p), "float16 overflow on store not reported");
      }
    }
  }
  bem::detail::set_simd_level_cap(SimdLevel::Avx512);
}

void test_thread_count_independence() {
  Rng rng(12);
  const std::vector<Case> cases = {{512, 1031, 512, 0.5f, 2.0f, 0.5f}, {512, 1031, 2, 0.5f, 2.0f, 0.5f},
                                   {256, 3001, 1, 0.5f, 2.0f, 0.5f}};
  for (const Case& c : cases) {
    for (DType dt : {DType::F32, DType::BF16}) {
      Data d = make_data(rng, c, dt);
      for (int64_t threshold : {int64_t{0}, int64_t{-1}}) {
        bem::detail::g_parallel_threshold_override.store(threshold);
        Buf y[2];
        Grads g[2];
        for (int n = 1; n <= 2; ++n) {
          bem::set_num_threads(n);
          y[n - 1] = Buf(dt, static_cast<size_t>(c.rows * c.d));
          bem::FilmForwardParams p = forward_params(d, y[n - 1].data());
          bem::film_forward_cpu(p);
          g[n - 1] = run_backward(d, true, true, true);
        }
        const std::string label = std::string(name(dt)) + " " + describe(c);
        CHECK(y[0].same_bits(y[1]), "%s: forward differs between 1 and 2 threads", label.c_str());
        CHECK(g[0].gx.same_bits(g[1].gx), "%s: grad_x differs between 1 and 2 threads", label.c_str());
        CHECK(g[0].gg == g[1].gg, "%s: grad_gamma differs between 1 and 2 threads", label.c_str());
        CHECK(g[0].gb == g[1].gb, "%s: grad_beta differs between 1 and 2 threads", label.c_str());
      }
    }
  }
  bem::detail::g_parallel_threshold_override.store(-1);
  bem::set_num_threads(2);
}

void test_argument_errors() {
  Rng rng(2);
  Data d = make_data(rng, {6, 5, 3, 0.5f, 2.0f, 0.5f}, DType::F32);
  Buf y(DType::F32, 30);
  struct Bad {
    const char* arg;
    void (*edit)(bem::FilmForwardParams&);
  };
  const Bad bad[] = {
      {"rows", [](bem::FilmForwardParams& p) { p.rows = 0; }},
      {"d", [](bem::FilmForwardParams& p) { p.d = 0; }},
      {"groups", [](bem::FilmForwardParams& p) { p.groups = 4; }},
      {"groups", [](bem::FilmForwardParams& p) { p.groups = 0; }},
      {"groups", [](bem::FilmForwardParams& p) { p.groups = 12; }},
      {"gamma_bounds", [](bem::FilmForwardParams& p) { p.gamma_lo = 3.0f; }},
      {"gamma_bounds", [](bem::FilmForwardParams& p) { p.gamma_hi = NAN; }},
      {"beta_bound", [](bem::FilmForwardParams& p) { p.beta_bound = -0.1f; }},
      {"x", [](bem::FilmForwardParams& p) { p.x = nullptr; }},
      {"gamma", [](bem::FilmForwardParams& p) { p.gamma = nullptr; }},
      {"beta", [](bem::FilmForwardParams& p) { p.beta = nullptr; }},
      {"y", [](bem::FilmForwardParams& p) { p.y = nullptr; }},
      {"dtype", [](bem::FilmForwardParams& p) { p.dtype = static_cast<DType>(-1); }},
  };
  for (const Bad& b : bad) {
    bem::FilmForwardParams p = forward_params(d, y.data());
    b.edit(p);
    CHECK(throws_argument_error([&] { bem::film_forward_cpu(p); }, b.arg, false), "forward: expected error on %s", b.arg);
  }
  bem::FilmBackwardParams bp;
  bp.rows = 6;
  bp.d = 5;
  bp.groups = 3;
  bp.x = d.x.data();
  bp.gamma = d.gamma.data();
  bp.beta = d.beta.data();
  CHECK(throws_argument_error([&] { bem::film_backward_cpu(bp); }, "grad_y", false), "backward: null grad_y");
}

}  // namespace

int main() {
  bem::set_num_threads(2);
  test_against_reference();
  test_nan_and_flag();
  test_thread_count_independence();
  test_argument_errors();
  return finish("test_film_cpu");
}
