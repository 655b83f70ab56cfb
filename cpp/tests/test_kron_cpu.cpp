// Tests of the Kronecker delta CPU kernels (bem/kron.h) against a float64 reference written from
// the definition (kron(A, B) @ x), on odd shapes that select both association orders, every dtype
// and SIMD level, accumulation, thread-count independence, the finite flag, argument checks, and
// the spectral norm against matrices with known singular values.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "bem/kron.h"
#include "bem/parallel.h"
#include "test_util.h"

using bem::DType;
using bem::detail::SimdLevel;
using namespace bem_test;

namespace {

struct Shape {
  int64_t T, o1, i1, o2, i2;
};

std::string describe(const Shape& s) {
  char buf[128];
  std::snprintf(buf, sizeof(buf), "T=%lld A=%lldx%lld B=%lldx%lld", (long long)s.T, (long long)s.o1, (long long)s.i1,
                (long long)s.o2, (long long)s.i2);
  return buf;
}

struct Data {
  Shape s;
  Buf x, A, B, dy;
  std::vector<double> xd, Ad, Bd, dyd;
};

Data make_data(Rng& rng, const Shape& s, DType dt) {
  Data d;
  d.s = s;
  d.x = Buf(dt, uniform(rng, s.T * s.i1 * s.i2));
  d.A = Buf(dt, uniform(rng, s.o1 * s.i1));
  d.B = Buf(dt, uniform(rng, s.o2 * s.i2));
  d.dy = Buf(dt, uniform(rng, s.T * s.o1 * s.o2));
  for (const auto& [buf, out] : {std::pair<const Buf*, std::vector<double>*>{&d.x, &d.xd}, {&d.A, &d.Ad},
                                 {&d.B, &d.Bd}, {&d.dy, &d.dyd}}) {
    out->resize(buf->size());
    for (size_t i = 0; i < buf->size(); ++i) (*out)[i] = buf->value(i);
  }
  return d;
}

struct Reference {
  std::vector<double> y, y_abs, gx, gx_abs, gA, gA_abs, gB, gB_abs;
};

Reference reference(const Data& d, double scale) {
  const Shape& s = d.s;
  const int64_t din = s.i1 * s.i2, dout = s.o1 * s.o2;
  Reference R;
  R.y.assign(s.T * dout, 0.0);
  R.y_abs = R.y;
  R.gx.assign(s.T * din, 0.0);
  R.gx_abs = R.gx;
  R.gA.assign(s.o1 * s.i1, 0.0);
  R.gA_abs = R.gA;
  R.gB.assign(s.o2 * s.i2, 0.0);
  R.gB_abs = R.gB;
  for (int64_t t = 0; t < s.T; ++t) {
    for (int64_t a = 0; a < s.o1; ++a) {
      for (int64_t b = 0; b < s.o2; ++b) {
        for (int64_t c = 0; c < s.i1; ++c) {
          for (int64_t k = 0; k < s.i2; ++k) {
            // kron(A, B)[a·o2 + b, c·i2 + k] = A[a, c]·B[b, k]
            const double w = scale * d.Ad[a * s.i1 + c] * d.Bd[b * s.i2 + k];
            const double xv = d.xd[t * din + c * s.i2 + k], g = d.dyd[t * dout + a * s.o2 + b];
            R.y[t * dout + a * s.o2 + b] += w * xv;
            R.y_abs[t * dout + a * s.o2 + b] += std::fabs(w * xv);
            R.gx[t * din + c * s.i2 + k] += w * g;
            R.gx_abs[t * din + c * s.i2 + k] += std::fabs(w * g);
            R.gA[a * s.i1 + c] += scale * d.Bd[b * s.i2 + k] * xv * g;
            R.gA_abs[a * s.i1 + c] += std::fabs(scale * d.Bd[b * s.i2 + k] * xv * g);
            R.gB[b * s.i2 + k] += scale * d.Ad[a * s.i1 + c] * xv * g;
            R.gB_abs[b * s.i2 + k] += std::fabs(scale * d.Ad[a * s.i1 + c] * xv * g);
          }
        }
      }
    }
  }
  return R;
}

std::vector<double> tolerance(const std::vector<double>& ref, const std::vector<double>& abs_sum, double n_terms,
                              double u_out, double abs_floor) {
  std::vector<double> tol(ref.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    const double acc = (n_terms + 4) * 0x1p-24 * abs_sum[i];
    tol[i] = acc + u_out * (std::fabs(ref[i]) + acc) + abs_floor + 1e-30;
  }
  return tol;
}

bem::KronForwardParams forward_params(Data& d, float scale, Buf& y, int64_t ld_y) {
  bem::KronForwardParams p;
  p.tokens = d.s.T;
  p.o1 = d.s.o1;
  p.i1 = d.s.i1;
  p.o2 = d.s.o2;
  p.i2 = d.s.i2;
  p.dtype = d.x.dtype;
  p.scale = scale;
  p.x = d.x.data();
  p.A = d.A.data();
  p.B = d.B.data();
  p.y = y.data();
  p.ld_y = ld_y;
  return p;
}

struct Grads {
  Buf gx;
  std::vector<float> gA, gB;
};

Grads run_backward(Data& d, float scale, bool want_x, bool want_A, bool want_B) {
  const Shape& s = d.s;
  Grads g;
  g.gx = Buf(d.x.dtype, std::vector<float>(s.T * s.i1 * s.i2, NAN));
  g.gA.assign(s.o1 * s.i1, NAN);
  g.gB.assign(s.o2 * s.i2, NAN);
  bem::KronBackwardParams b;
  b.tokens = s.T;
  b.o1 = s.o1;
  b.i1 = s.i1;
  b.o2 = s.o2;
  b.i2 = s.i2;
  b.dtype = d.x.dtype;
  b.scale = scale;
  b.x = d.x.data();
  b.A = d.A.data();
  b.B = d.B.data();
  b.grad_y = d.dy.data();
  b.grad_x = want_x ? g.gx.data() : nullptr;
  b.grad_A = want_A ? g.gA.data() : nullptr;
  b.grad_B = want_B ? g.gB.data() : nullptr;
  bem::kron_backward_cpu(b);
  return g;
}

void test_against_reference() {
  Rng rng(2024);
  // (3·5 ⊗ 7·4) picks A·X first, (5·3 ⊗ 2·9) picks X·Bᵀ first; the others cross SIMD widths.
  const std::vector<Shape> shapes = {{1, 3, 5, 7, 4},   {17, 3, 5, 7, 4},  {40, 5, 3, 2, 9}, {3, 5, 3, 2, 9},
                                     {5, 37, 19, 11, 23}, {2, 32, 64, 32, 64}, {1, 1, 1, 1, 1}, {33, 9, 17, 33, 1}};
  for (SimdLevel level : simd_levels()) {
    bem::detail::set_simd_level_cap(level);
    for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
      for (const Shape& s : shapes) {
        Data d = make_data(rng, s, dt);
        const float scale = 0.75f;
        const Reference R = reference(d, scale);
        const std::string label = std::string(bem::detail::simd_level_name(level)) + " " + name(dt) + " " + describe(s);
        const int64_t dout = s.o1 * s.o2;
        const double u = unit_roundoff(dt);
        // Plain store.
        Buf y(dt, static_cast<size_t>(s.T * dout));
        bem::KronForwardParams p = forward_params(d, scale, y, dout);
        CHECK(bem::kron_forward_cpu(p), "%s: finite inputs reported non-finite", label.c_str());
        check_close(label + " y", y.size(), [&](size_t i) { return y.value(i); }, R.y,
                    tolerance(R.y, R.y_abs, s.i1 + s.i2, u, subnormal_half_ulp(dt)));
        // Accumulate into a strided output; the padding stays untouched.
        const int64_t ld = dout + 3;
        Buf ys(dt, static_cast<size_t>(s.T * ld));
        std::vector<double> ref(ys.size()), abs_sum(ys.size(), 0.0);
        for (size_t i = 0; i < ys.size(); ++i) {
          ys.set(i, 0.25f * static_cast<float>(i % 7) - 0.5f);
          const int64_t t = static_cast<int64_t>(i) / ld, o = static_cast<int64_t>(i) % ld;
          ref[i] = ys.value(i) + (o < dout ? R.y[t * dout + o] : 0.0);
          abs_sum[i] = o < dout ? R.y_abs[t * dout + o] + std::fabs(ys.value(i)) : 0.0;
        }
        p = forward_params(d, scale, ys, ld);
        p.accumulate = true;
        bem::kron_forward_cpu(p);
        check_close(label + " y (accumulate, strided)", ys.size(), [&](size_t i) { return ys.value(i); }, ref,
                    tolerance(ref, abs_sum, s.i1 + s.i2, u, subnormal_half_ulp(dt)));
        // Backward, all gradients and each alone.
        const Grads g = run_backward(d, scale, true, true, true);
        check_close(label + " grad_x", g.gx.size(), [&](size_t i) { return g.gx.value(i); }, R.gx,
                    tolerance(R.gx, R.gx_abs, s.o1 + s.o2, u, subnormal_half_ulp(dt)));
        check_close(label + " grad_A", g.gA.size(), [&](size_t i) { return static_cast<double>(g.gA[i]); }, R.gA,
                    tolerance(R.gA, R.gA_abs, 16 * s.i2 + s.o2 + s.T, 0.0, 0.0));
        check_close(label + " grad_B", g.gB.size(), [&](size_t i) { return static_cast<double>(g.gB[i]); }, R.gB,
                    tolerance(R.gB, R.gB_abs, 16 * s.o1 + s.i1 + s.T, 0.0, 0.0));
        const Grads gb = run_backward(d, scale, false, false, true);
        CHECK(std::memcmp(gb.gB.data(), g.gB.data(), g.gB.size() * 4) == 0, "%s: grad_B alone differs", label.c_str());
        bool untouched = true;
        for (size_t i = 0; i < gb.gA.size(); ++i) untouched &= std::isnan(gb.gA[i]);
        for (size_t i = 0; i < gb.gx.size(); ++i) untouched &= std::isnan(gb.gx.value(i));
        CHECK(untouched, "%s: unrequested gradients were written", label.c_str());
        const Grads ga = run_backward(d, scale, false, true, false);
        CHECK(std::memcmp(ga.gA.data(), g.gA.data(), g.gA.size() * 4) == 0, "%s: grad_A alone differs", label.c_str());
      }
    }
  }
  bem::detail::set_simd_level_cap(SimdLevel::Avx512);
}

void test_thread_count_independence() {
  Rng rng(8);
  const std::vector<Shape> shapes = {{100, 32, 64, 32, 64}, {77, 5, 3, 2, 9}, {50, 3, 5, 7, 4}};
  for (SimdLevel level : simd_levels()) {
    bem::detail::set_simd_level_cap(level);
    for (const Shape& s : shapes) {
      Data d = make_data(rng, s, DType::F32);
      for (int64_t threshold : {int64_t{0}, int64_t{-1}}) {
        bem::detail::g_parallel_threshold_override.store(threshold);
        Buf y[2];
        Grads g[2];
        for (int n = 1; n <= 2; ++n) {
          bem::set_num_threads(n);
          y[n - 1] = Buf(DType::F32, static_cast<size_t>(s.T * s.o1 * s.o2));
          bem::KronForwardParams p = forward_params(d, 1.5f, y[n - 1], s.o1 * s.o2);
          bem::kron_forward_cpu(p);
          g[n - 1] = run_backward(d, 1.5f, true, true, true);
        }
        const std::string label = std::string(bem::detail::simd_level_name(level)) + " " + describe(s);
        CHECK(y[0].same_bits(y[1]), "%s: forward differs between 1 and 2 threads", label.c_str());
        CHECK(g[0].gx.same_bits(g[1].gx), "%s: grad_x differs between 1 and 2 threads", label.c_str());
        CHECK(g[0].gA == g[1].gA, "%s: grad_A differs between 1 and 2 threads", label.c_str());
        CHECK(g[0].gB == g[1].gB, "%s: grad_B differs between 1 and 2 threads", label.c_str());
      }
    }
  }
  bem::detail::g_parallel_threshold_override.store(-1);
  bem::set_num_threads(2);
  bem::detail::set_simd_level_cap(SimdLevel::Avx512);
}

void test_finite_flag_and_errors() {
  Rng rng(4);
  const Shape s{6, 3, 5, 7, 4};
  for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
    Data d = make_data(rng, s, dt);
    Buf y(dt, static_cast<size_t>(s.T * s.o1 * s.o2));
    d.x.set(2 * s.i1 * s.i2 + 3, INFINITY);
    bem::KronForwardParams p = forward_params(d, 1.0f, y, s.o1 * s.o2);
    CHECK(!bem::kron_forward_cpu(p), "%s: inf input not reported", name(dt));
    if (dt == DType::F16) {
      Data big = make_data(rng, s, dt);
      p = forward_params(big, 1e6f, y, s.o1 * s.o2);
      CHECK(!bem::kron_forward_cpu(p), "float16 overflow on store not reported");
    }
  }
  Data d = make_data(rng, s, DType::F32);
  Buf y(DType::F32, static_cast<size_t>(s.T * s.o1 * s.o2));
  struct Bad {
    const char* arg;
    void (*edit)(bem::KronForwardParams&);
  };
  const Bad bad[] = {
      {"tokens", [](bem::KronForwardParams& p) { p.tokens = 0; }},
      {"o1", [](bem::KronForwardParams& p) { p.o1 = 0; }},
      {"i1", [](bem::KronForwardParams& p) { p.i1 = -2; }},
      {"o2", [](bem::KronForwardParams& p) { p.o2 = 0; }},
      {"i2", [](bem::KronForwardParams& p) { p.i2 = 0; }},
      {"x", [](bem::KronForwardParams& p) { p.x = nullptr; }},
      {"A", [](bem::KronForwardParams& p) { p.A = nullptr; }},
      {"B", [](bem::KronForwardParams& p) { p.B = nullptr; }},
      {"y", [](bem::KronForwardParams& p) { p.y = nullptr; }},
      {"ld_y", [](bem::KronForwardParams& p) { p.ld_y = 2; }},
      {"dtype", [](bem::KronForwardParams& p) { p.dtype = static_cast<DType>(3); }},
  };
  for (const Bad& b : bad) {
    bem::KronForwardParams p = forward_params(d, 1.0f, y, s.o1 * s.o2);
    b.edit(p);
    CHECK(throws_argument_error([&] { bem::kron_forward_cpu(p); }, b.arg, false), "forward: expected error on %s", b.arg);
  }
  bem::KronBackwardParams bp;
  bp.tokens = s.T;
  bp.o1 = s.o1;
  bp.i1 = s.i1;
  bp.o2 = s.o2;
  bp.i2 = s.i2;
  bp.x = d.x.data();
  bp.A = d.A.data();
  bp.B = d.B.data();
  CHECK(throws_argument_error([&] { bem::kron_backward_cpu(bp); }, "grad_y", false), "backward: null grad_y");
}

// M = Q1 · diag(sv) · Q2 with Householder reflections Q1, Q2: singular values known exactly.
std::vector<float> with_singular_values(Rng& rng, int64_t rows, int64_t cols, const std::vector<double>& sv) {
  auto householder = [&](int64_t n) {
    const std::vector<float> v = uniform(rng, n);
    double nn = 0;
    for (float e : v) nn += double(e) * e;
    std::vector<double> Q(n * n);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) Q[i * n + j] = (i == j ? 1.0 : 0.0) - 2.0 * v[i] * v[j] / nn;
    return Q;
  };
  const std::vector<double> Q1 = householder(rows), Q2 = householder(cols);
  std::vector<float> M(rows * cols);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      double acc = 0;
      for (size_t q = 0; q < sv.size(); ++q) acc += Q1[i * rows + q] * sv[q] * Q2[q * cols + j];
      M[i * cols + j] = static_cast<float>(acc);
    }
  }
  return M;
}

void test_spectral_norm() {
  Rng rng(6);
  {
    const std::vector<float> M = with_singular_values(rng, 9, 7, {5.0, 4.5, 1.0, 0.5, 0.1});
    const double s = bem::spectral_norm_cpu(M.data(), 9, 7, 1e-12, 10000);
    CHECK(std::fabs(s - 5.0) < 1e-5, "spectral norm %.9f, expected 5", s);
    const double loose = bem::spectral_norm_cpu(M.data(), 9, 7, 1e-2, 10000);
    CHECK(loose <= 5.0 + 1e-6 && loose > 4.0, "loose tolerance gives %.6f", loose);
    CHECK(bem::spectral_norm_cpu(M.data(), 9, 7, 0.0, 3) <= 5.0 + 1e-6, "power iteration overshoots");
  }
  {
    const std::vector<float> M = with_singular_values(rng, 33, 64, {2.0, 0.25});
    const double s = bem::spectral_norm_cpu(M.data(), 33, 64, 1e-10, 1000);
    CHECK(std::fabs(s - 2.0) < 1e-5, "spectral norm %.9f, expected 2", s);
  }
  {
    // Rank one u·vᵀ with an alternating-sign right factor: σ = ‖u‖·‖v‖.
    std::vector<float> M(4 * 6);
    const float u[4] = {1, -2, 0.5f, 3}, v[6] = {1, -1, 1, -1, 1, -1};
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 6; ++j) M[i * 6 + j] = u[i] * v[j];
    const double expect = std::sqrt(1 + 4 + 0.25 + 9) * std::sqrt(6.0);
    const double s = bem::spectral_norm_cpu(M.data(), 4, 6, 1e-12, 100);
    CHECK(std::fabs(s - expect) < 1e-5 * expect, "rank-one spectral norm %.9f, expected %.9f", s, expect);
  }
  {
    // Only the last column is non-zero.
    std::vector<float> M(5 * 3, 0.0f);
    M[2] = 3.0f;
    M[5] = 4.0f;
    const double s = bem::spectral_norm_cpu(M.data(), 5, 3, 1e-12, 100);
    CHECK(std::fabs(s - 5.0) < 1e-6, "single-column spectral norm %.9f, expected 5", s);
  }
  const std::vector<float> Z(12, 0.0f);
  CHECK(bem::spectral_norm_cpu(Z.data(), 3, 4, 1e-6, 10) == 0.0, "zero matrix");
  CHECK(bem::spectral_norm_cpu(nullptr, 0, 4, 1e-6, 10) == 0.0, "empty matrix");
  std::vector<float> N(12, 1.0f);
  N[5] = NAN;
  CHECK(std::isnan(bem::spectral_norm_cpu(N.data(), 3, 4, 1e-6, 10)), "NaN must propagate");
  CHECK(throws_argument_error([&] { bem::spectral_norm_cpu(Z.data(), 3, 4, -1.0, 10); }, "tol", false), "bad tol");
  CHECK(throws_argument_error([&] { bem::spectral_norm_cpu(Z.data(), 3, 4, 1e-6, 0); }, "max_iter", false),
        "bad max_iter");
  CHECK(throws_argument_error([&] { bem::spectral_norm_cpu(nullptr, 3, 4, 1e-6, 5); }, "m", false), "null m");
}

}  // namespace

int main() {
  bem::set_num_threads(2);
  test_against_reference();
  test_thread_count_independence();
  test_finite_flag_and_errors();
  test_spectral_norm();
  return finish("test_kron_cpu");
}
