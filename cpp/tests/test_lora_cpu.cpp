// Tests of the masked multi-expert LoRA CPU kernels (bem/lora.h) against a float64 reference:
// odd sizes, random runs of experts with −1 gaps, every dtype, every SIMD level, both expand
// strategies, strided x/y, accumulation, thread-count independence and the argument checks.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "bem/lora.h"
#include "bem/parallel.h"
#include "test_util.h"

using bem::DType;
using bem::detail::SimdLevel;
using namespace bem_test;

namespace {

struct Case {
  int64_t T, d_in, d_out, r, k, E;
  bool rank_index;    // else all r ranks
  bool shared_ranks;  // one rank set per 64-token chunk (else per token)
  bool gate;
  bool expert_index;  // else every token uses expert 0
  float scale;
};

std::string describe(const Case& c) {
  char buf[200];
  std::snprintf(buf, sizeof(buf), "T=%lld d_in=%lld d_out=%lld r=%lld k=%lld E=%lld%s%s%s%s",
                (long long)c.T, (long long)c.d_in, (long long)c.d_out, (long long)c.r, (long long)c.k,
                (long long)c.E, c.rank_index ? (c.shared_ranks ? " chunk-ranks" : " token-ranks") : " dense",
                c.gate ? " gate" : "", c.expert_index ? "" : " no-expert-index", "");
  return buf;
}

struct Problem {
  Case c;
  std::vector<float> x, A, B, gate, dy, y0;
  std::vector<int64_t> ei, ri;
};

std::vector<int64_t> distinct_ranks(Rng& rng, int64_t r, int64_t k) {
  std::vector<int64_t> all(static_cast<size_t>(r));
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  all.resize(static_cast<size_t>(k));
  return all;
}

Problem make_problem(Rng& rng, const Case& c) {
  Problem p;
  p.c = c;
  p.x = uniform(rng, c.T * c.d_in);
  p.A = uniform(rng, c.E * c.r * c.d_in);
  p.B = uniform(rng, c.E * c.d_out * c.r);
  p.gate = uniform(rng, c.T * c.k, 0.2f, 1.5f);
  p.dy = uniform(rng, c.T * c.d_out);
  p.y0 = uniform(rng, c.T * c.d_out);
  if (c.expert_index) {
    // Random runs (mostly 64-token chunks, some short) with −1 gaps.
    std::uniform_int_distribution<int> len_pick(0, 3), short_len(1, 9), expert(-1, static_cast<int>(c.E) - 1);
    int64_t t = 0;
    while (t < c.T) {
      const int64_t len = len_pick(rng) == 0 ? short_len(rng) : 64;
      const int64_t e = expert(rng);
      for (int64_t i = 0; i < len && t < c.T; ++i, ++t) p.ei.push_back(e);
    }
  }
  if (c.rank_index) {
    std::vector<int64_t> chunk_set;
    for (int64_t t = 0; t < c.T; ++t) {
      if (!c.shared_ranks || t % 64 == 0) chunk_set = distinct_ranks(rng, c.r, c.k);
      p.ri.insert(p.ri.end(), chunk_set.begin(), chunk_set.end());
    }
  }
  return p;
}

int64_t expert_of(const Problem& p, int64_t t) { return p.c.expert_index ? p.ei[t] : 0; }
int64_t rank_of(const Problem& p, int64_t t, int64_t j) { return p.c.rank_index ? p.ri[t * p.c.k + j] : j; }
double gate_of(const Problem& p, int64_t t, int64_t j) { return p.c.gate ? p.gate[t * p.c.k + j] : 1.0; }

// Inputs as the kernel sees them (rounded to the dtype).
struct Inputs {
  Buf x, A, B, dy;
  std::vector<double> xd, Ad, Bd, dyd;
};

std::vector<double> values(const Buf& b) {
  std::vector<double> v(b.size());
  for (size_t i = 0; i < v.size(); ++i) v[i] = b.value(i);
  return v;
}

Inputs make_inputs(const Problem& p, DType dt) {
  Inputs in;
  in.x = Buf(dt, p.x);
  in.A = Buf(dt, p.A);
  in.B = Buf(dt, p.B);
  in.dy = Buf(dt, p.dy);
  in.xd = values(in.x);
  in.Ad = values(in.A);
  in.Bd = values(in.B);
  in.dyd = values(in.dy);
  return in;
}

// float64 reference: values and |terms| sums (for error bounds) of the forward and the gradients.
struct Reference {
  std::vector<double> S, S_abs, delta, delta_abs;
  std::vector<double> u, u_abs;  // u[t, j] = B[e][:, i]·dy[t]
  std::vector<double> gx, gx_abs, gA, gA_abs, gB, gB_abs, gg, gg_abs;
};

Reference reference(const Problem& p, const Inputs& in) {
  const Case& c = p.c;
  Reference R;
  R.S.assign(c.T * c.k, 0.0);
  R.S_abs = R.S;
  R.u = R.S;
  R.u_abs = R.S;
  R.gg = R.S;
  R.gg_abs = R.S;
  R.delta.assign(c.T * c.d_out, 0.0);
  R.delta_abs = R.delta;
  R.gx.assign(c.T * c.d_in, 0.0);
  R.gx_abs = R.gx;
  R.gA.assign(c.E * c.r * c.d_in, 0.0);
  R.gA_abs = R.gA;
  R.gB.assign(c.E * c.d_out * c.r, 0.0);
  R.gB_abs = R.gB;
  const double s = c.scale;
  for (int64_t t = 0; t < c.T; ++t) {
    const int64_t e = expert_of(p, t);
    if (e < 0) continue;
    for (int64_t j = 0; j < c.k; ++j) {
      const int64_t i = rank_of(p, t, j);
      const double g = gate_of(p, t, j);
      double S = 0, Sa = 0, u = 0, ua = 0;
      for (int64_t q = 0; q < c.d_in; ++q) {
        const double v = in.Ad[(e * c.r + i) * c.d_in + q] * in.xd[t * c.d_in + q];
        S += v;
        Sa += std::fabs(v);
      }
      for (int64_t o = 0; o < c.d_out; ++o) {
        const double v = in.Bd[(e * c.d_out + o) * c.r + i] * in.dyd[t * c.d_out + o];
        u += v;
        ua += std::fabs(v);
      }
      R.S[t * c.k + j] = S;
      R.S_abs[t * c.k + j] = Sa;
      R.u[t * c.k + j] = u;
      R.u_abs[t * c.k + j] = ua;
      R.gg[t * c.k + j] = s * S * u;
      R.gg_abs[t * c.k + j] = std::fabs(s) * Sa * ua;
      for (int64_t o = 0; o < c.d_out; ++o) {
        const double b = in.Bd[(e * c.d_out + o) * c.r + i];
        R.delta[t * c.d_out + o] += s * g * b * S;
        R.delta_abs[t * c.d_out + o] += std::fabs(s * g * b) * Sa;
        R.gB[(e * c.d_out + o) * c.r + i] += s * g * S * in.dyd[t * c.d_out + o];
        R.gB_abs[(e * c.d_out + o) * c.r + i] += std::fabs(s * g * in.dyd[t * c.d_out + o]) * Sa;
      }
      for (int64_t q = 0; q < c.d_in; ++q) {
        const double a = in.Ad[(e * c.r + i) * c.d_in + q];
        R.gx[t * c.d_in + q] += s * g * u * a;
        R.gx_abs[t * c.d_in + q] += std::fabs(s * g * a) * ua;
        R.gA[(e * c.r + i) * c.d_in + q] += s * g * u * in.xd[t * c.d_in + q];
        R.gA_abs[(e * c.r + i) * c.d_in + q] += std::fabs(s * g * in.xd[t * c.d_in + q]) * ua;
      }
    }
  }
  return R;
}

// fp32 accumulation error bound n·eps·Σ|terms| plus one rounding of the stored value.
std::vector<double> tolerance(const std::vector<double>& ref, const std::vector<double>& abs_sum,
                              double n_terms, double u_out, double abs_floor) {
  std::vector<double> tol(ref.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    const double acc = (n_terms + 4) * 0x1p-24 * abs_sum[i];
    tol[i] = acc + u_out * (std::fabs(ref[i]) + acc) + abs_floor + 1e-30;
  }
  return tol;
}

bem::LoraForwardParams forward_params(const Problem& p, const Inputs& in, Buf& y, int64_t ld_x, const Buf& x_strided,
                                      int64_t ld_y) {
  const Case& c = p.c;
  bem::LoraForwardParams f;
  f.tokens = c.T;
  f.d_in = c.d_in;
  f.d_out = c.d_out;
  f.rank = c.r;
  f.active = c.k;
  f.experts = c.E;
  f.dtype = in.x.dtype;
  f.scale = c.scale;
  f.x = ld_x == c.d_in ? in.x.data() : x_strided.data();
  f.ld_x = ld_x;
  f.A = in.A.data();
  f.B = in.B.data();
  f.expert_index = c.expert_index ? p.ei.data() : nullptr;
  f.rank_index = c.rank_index ? p.ri.data() : nullptr;
  f.rank_gate = c.gate ? p.gate.data() : nullptr;
  f.y = y.data();
  f.ld_y = ld_y;
  return f;
}

// x copied into rows of ld_x elements (padding filled with NaN, which must never be read).
Buf strided_copy(const Buf& src, int64_t rows, int64_t cols, int64_t ld) {
  Buf out(src.dtype, static_cast<size_t>(rows * ld));
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t q = 0; q < ld; ++q) out.set(t * ld + q, q < cols ? static_cast<float>(src.value(t * cols + q)) : NAN);
  return out;
}

void test_forward(const Problem& p, DType dt, const std::string& label) {
  const Case& c = p.c;
  const Inputs in = make_inputs(p, dt);
  const Reference R = reference(p, in);
  const double u = unit_roundoff(dt);
  for (int variant = 0; variant < 2; ++variant) {
    const bool accumulate = variant == 1;
    const int64_t ld_x = accumulate ? c.d_in + 3 : c.d_in;
    const int64_t ld_y = accumulate ? c.d_out + 5 : c.d_out;
    const Buf xs = strided_copy(in.x, c.T, c.d_in, ld_x);
    Buf y(dt, static_cast<size_t>(c.T * ld_y));
    std::vector<double> y_before(y.size(), 0.0);
    for (size_t i = 0; i < y.size(); ++i) {
      y.set(i, p.y0[i % p.y0.size()]);
      y_before[i] = y.value(i);
    }
    std::vector<float> S(c.T * c.k, NAN);
    bem::LoraForwardParams f = forward_params(p, in, y, ld_x, xs, ld_y);
    f.accumulate = accumulate;
    f.shrink_out = S.data();
    const bool finite = bem::lora_forward_cpu(f);
    CHECK(finite, "%s: finite inputs reported non-finite output", label.c_str());

    std::vector<double> ref(c.T * ld_y), abs_sum(c.T * ld_y, 0.0);
    for (int64_t t = 0; t < c.T; ++t) {
      for (int64_t o = 0; o < ld_y; ++o) {
        const size_t i = t * ld_y + o;
        const bool routed = expert_of(p, t) >= 0;
        if (o >= c.d_out) {
          ref[i] = y_before[i];  // padding untouched
        } else if (accumulate) {
          ref[i] = y_before[i] + R.delta[t * c.d_out + o];
          abs_sum[i] = R.delta_abs[t * c.d_out + o] + std::fabs(y_before[i]);
        } else {
          ref[i] = routed ? R.delta[t * c.d_out + o] : 0.0;
          abs_sum[i] = R.delta_abs[t * c.d_out + o];
        }
      }
    }
    check_close(label + (accumulate ? " y(accumulate, strided)" : " y"), ref.size(),
                [&](size_t i) { return y.value(i); }, ref, tolerance(ref, abs_sum, c.d_in + c.k + 1, u, subnormal_half_ulp(dt)));
    check_close(label + " shrink_out", S.size(), [&](size_t i) { return static_cast<double>(S[i]); }, R.S,
                tolerance(R.S, R.S_abs, c.d_in, 0.0, 0.0));
  }
}

struct Grads {
  Buf gx;
  std::vector<float> gA, gB, gg;
};

Grads run_backward(const Problem& p, const Inputs& in, const float* shrink) {
  const Case& c = p.c;
  Grads g;
  g.gx = Buf(in.x.dtype, std::vector<float>(c.T * c.d_in, NAN));
  g.gA.assign(c.E * c.r * c.d_in, NAN);
  g.gB.assign(c.E * c.d_out * c.r, NAN);
  g.gg.assign(c.T * c.k, NAN);
  bem::LoraBackwardParams b;
  b.tokens = c.T;
  b.d_in = c.d_in;
  b.d_out = c.d_out;
  b.rank = c.r;
  b.active = c.k;
  b.experts = c.E;
  b.dtype = in.x.dtype;
  b.scale = c.scale;
  b.x = in.x.data();
  b.A = in.A.data();
  b.B = in.B.data();
  b.expert_index = c.expert_index ? p.ei.data() : nullptr;
  b.rank_index = c.rank_index ? p.ri.data() : nullptr;
  b.rank_gate = c.gate ? p.gate.data() : nullptr;
  b.shrink = shrink;
  b.grad_y = in.dy.data();
  b.grad_x = g.gx.data();
  b.grad_A = g.gA.data();
  b.grad_B = g.gB.data();
  b.grad_gate = g.gg.data();
  bem::lora_backward_cpu(b);
  return g;
}

void test_backward(const Problem& p, DType dt, const std::string& label) {
  const Case& c = p.c;
  const Inputs in = make_inputs(p, dt);
  const Reference R = reference(p, in);
  // The saved shrink of a forward pass, and the recomputing path (shrink = null).
  Buf y(dt, static_cast<size_t>(c.T * c.d_out));
  std::vector<float> S(c.T * c.k);
  bem::LoraForwardParams f = forward_params(p, in, y, c.d_in, in.x, c.d_out);
  f.shrink_out = S.data();
  bem::lora_forward_cpu(f);
  for (int saved = 0; saved < 2; ++saved) {
    const Grads g = run_backward(p, in, saved ? S.data() : nullptr);
    const std::string l = label + (saved ? " (saved shrink)" : " (recomputed shrink)");
    check_close(l + " grad_x", g.gx.size(), [&](size_t i) { return g.gx.value(i); }, R.gx,
                tolerance(R.gx, R.gx_abs, c.d_out + c.k, unit_roundoff(dt), subnormal_half_ulp(dt)));
    check_close(l + " grad_A", g.gA.size(), [&](size_t i) { return static_cast<double>(g.gA[i]); }, R.gA,
                tolerance(R.gA, R.gA_abs, c.d_out + c.T + 2, 0.0, 0.0));
    check_close(l + " grad_B", g.gB.size(), [&](size_t i) { return static_cast<double>(g.gB[i]); }, R.gB,
                tolerance(R.gB, R.gB_abs, c.d_in + c.T + 2, 0.0, 0.0));
    check_close(l + " grad_gate", g.gg.size(), [&](size_t i) { return static_cast<double>(g.gg[i]); }, R.gg,
                tolerance(R.gg, R.gg_abs, c.d_in + c.d_out + 2, 0.0, 0.0));
  }
  // Only some gradients requested: the others are skipped (null), the requested ones unchanged.
  bem::LoraBackwardParams b;
  std::vector<float> gA(c.E * c.r * c.d_in, NAN);
  b.tokens = c.T;
  b.d_in = c.d_in;
  b.d_out = c.d_out;
  b.rank = c.r;
  b.active = c.k;
  b.experts = c.E;
  b.dtype = dt;
  b.scale = c.scale;
  b.x = in.x.data();
  b.A = in.A.data();
  b.B = in.B.data();
  b.expert_index = c.expert_index ? p.ei.data() : nullptr;
  b.rank_index = c.rank_index ? p.ri.data() : nullptr;
  b.rank_gate = c.gate ? p.gate.data() : nullptr;
  b.grad_y = in.dy.data();
  b.grad_A = gA.data();
  bem::lora_backward_cpu(b);
  check_close(label + " grad_A alone", gA.size(), [&](size_t i) { return static_cast<double>(gA[i]); }, R.gA,
              tolerance(R.gA, R.gA_abs, c.d_out + c.T + 2, 0.0, 0.0));
}

// The float64 reference gradients against central differences of the float64 forward, on a tiny
// problem: this is what makes the analytic reference above trustworthy.
void test_reference_against_finite_differences() {
  Rng rng(11);
  const Case c{9, 6, 5, 4, 2, 3, true, false, true, true, 0.7f};
  Problem p = make_problem(rng, c);
  // Make sure at least two experts and a gap appear.
  p.ei = {0, 0, 0, -1, 2, 2, 1, 1, 1};
  Inputs in = make_inputs(p, DType::F32);
  const Reference R = reference(p, in);
  auto loss = [&](const Inputs& q, const std::vector<float>& gate) {
    Problem pp = p;
    pp.gate = gate;
    const Reference r2 = reference(pp, q);
    double L = 0;
    for (int64_t i = 0; i < c.T * c.d_out; ++i) L += r2.delta[i] * q.dyd[i];
    return L;
  };
  const double h = 1e-6;
  auto fd = [&](std::vector<double>& vec, size_t i, const std::vector<float>& gate, Inputs& q) {
    const double keep = vec[i];
    vec[i] = keep + h;
    const double lp = loss(q, gate);
    vec[i] = keep - h;
    const double lm = loss(q, gate);
    vec[i] = keep;
    return (lp - lm) / (2 * h);
  };
  double worst = 0;
  for (size_t i = 0; i < in.xd.size(); ++i) worst = std::max(worst, std::fabs(fd(in.xd, i, p.gate, in) - R.gx[i]));
  for (size_t i = 0; i < in.Ad.size(); ++i) worst = std::max(worst, std::fabs(fd(in.Ad, i, p.gate, in) - R.gA[i]));
  for (size_t i = 0; i < in.Bd.size(); ++i) worst = std::max(worst, std::fabs(fd(in.Bd, i, p.gate, in) - R.gB[i]));
  // The gate enters through `gate_of`, which reads the float vector: differentiate it in double by
  // linearity instead (delta is linear in each gate): dL/dg = scale·S·u.
  for (int64_t t = 0; t < c.T; ++t) {
    for (int64_t j = 0; j < c.k; ++j) {
      std::vector<float> g1 = p.gate, g0 = p.gate;
      g1[t * c.k + j] = 1.0f;
      g0[t * c.k + j] = 0.0f;
      const double slope = loss(in, g1) - loss(in, g0);
      worst = std::max(worst, std::fabs(slope - R.gg[t * c.k + j]));
    }
  }
  CHECK(worst < 1e-6, "reference gradients differ from finite differences by %g", worst);
}

std::vector<Case> odd_cases() {
  std::vector<Case> cs;
  for (int64_t T : {1, 2, 3, 5, 17, 64, 65, 130, 300}) cs.push_back({T, 59, 111, 7, 3, 5, true, false, true, true, 0.75f});
  cs.push_back({300, 59, 111, 7, 3, 5, true, true, true, true, 1.25f});
  cs.push_back({129, 59, 111, 7, 3, 5, true, true, false, true, -0.5f});
  for (int64_t T : {1, 7, 300}) cs.push_back({T, 59, 111, 7, 7, 5, false, false, false, true, 0.75f});
  cs.push_back({33, 59, 111, 7, 7, 1, false, false, true, false, 2.0f});
  cs.push_back({21, 37, 45, 1, 1, 2, true, false, true, true, 1.0f});
  cs.push_back({150, 37, 45, 33, 17, 3, true, true, true, true, 0.5f});
  cs.push_back({70, 16, 32, 20, 20, 2, false, false, true, true, 1.0f});
  // r = 4 and 8 take the packed-rows path of the short-run expand under AVX2/AVX-512.
  cs.push_back({9, 59, 111, 8, 8, 3, false, false, true, true, 0.75f});
  cs.push_back({9, 59, 111, 8, 3, 3, true, false, true, true, 0.75f});
  cs.push_back({6, 59, 111, 4, 4, 2, false, false, false, true, 1.5f});
  cs.push_back({6, 59, 111, 4, 2, 2, true, false, true, true, 1.5f});
  // r = 9..32 under AVX-512 takes the 256-bit row-dot expand.
  cs.push_back({5, 59, 111, 16, 16, 2, false, false, true, true, 0.5f});
  cs.push_back({5, 59, 111, 32, 11, 2, true, false, true, true, 0.5f});
  return cs;
}

void test_against_reference() {
  Rng rng(1234);
  const std::vector<Case> cases = odd_cases();
  std::vector<Problem> problems;
  for (const Case& c : cases) problems.push_back(make_problem(rng, c));
  for (SimdLevel level : simd_levels()) {
    bem::detail::set_simd_level_cap(level);
    for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
      for (const Problem& p : problems) {
        // Each expand form (row-dot, packed, lanes) and both shrink forms, forced, and the cost
        // model's choice.
        for (int mode = -1; mode <= 2; ++mode) {
          for (int shrink = -1; shrink <= 1; ++shrink) {
            bem::detail::g_lora_expand_override.store(mode);
            bem::detail::g_lora_shrink_override.store(shrink);
            const std::string label = std::string(bem::detail::simd_level_name(level)) + " " + name(dt) + " " +
                                      describe(p.c) + " expand=" + std::to_string(mode) +
                                      " shrink=" + std::to_string(shrink);
            test_forward(p, dt, label);
            if (mode == -1) test_backward(p, dt, label);
          }
        }
        bem::detail::g_lora_expand_override.store(-1);
        bem::detail::g_lora_shrink_override.store(-1);
      }
    }
  }
  bem::detail::set_simd_level_cap(SimdLevel::Avx512);
}

// Results do not depend on the number of threads (bitwise), on the pool path and the serial one,
// with either split of the parallel forward (two-phase or fused token blocks).
void test_thread_count_independence() {
  Rng rng(77);
  const std::vector<Case> cases = {
      {300, 515, 1031, 24, 10, 4, true, false, true, true, 0.8f},
      {300, 515, 1031, 24, 10, 4, true, true, true, true, 0.8f},
      {200, 259, 517, 16, 16, 3, false, false, false, true, 1.0f},
      {1, 1031, 2053, 64, 64, 2, false, false, true, true, 1.0f},
      {3, 1031, 2053, 64, 32, 2, true, false, true, true, 1.0f},
      // k < W over long segments (dot-product shrink tiles), dense and chunk-shared ranks.
      {260, 515, 1031, 8, 8, 1, false, false, false, false, 1.0f},
      {300, 515, 1031, 24, 6, 4, true, true, true, true, 0.8f},
      // A few dozen tokens with k ≥ 16: the lanes expand (work items choose it or the packed one).
      {16, 515, 1031, 64, 64, 1, false, false, false, false, 1.0f},
      {40, 515, 1031, 32, 20, 2, true, true, true, false, 0.9f},
      {100, 259, 517, 48, 48, 3, false, false, true, true, 1.1f},
  };
  for (SimdLevel level : simd_levels()) {
    bem::detail::set_simd_level_cap(level);
    for (const Case& c : cases) {
      const Problem p = make_problem(rng, c);
      for (DType dt : {DType::F32, DType::BF16}) {
        const Inputs in = make_inputs(p, dt);
        for (int variant = 0; variant < 6; ++variant) {  // split -1/0/1 × pool forced or not
          const int split = variant / 2 - 1;
          const int64_t threshold = variant % 2 == 0 ? 0 : -1;
          bem::detail::g_lora_split_override.store(split);
          bem::detail::g_parallel_threshold_override.store(threshold);
          Buf y[2];
          Grads g[2];
          std::vector<float> S[2];
          for (int n = 1; n <= 2; ++n) {
            bem::set_num_threads(n);
            y[n - 1] = Buf(dt, static_cast<size_t>(c.T * c.d_out));
            S[n - 1].assign(c.T * c.k, 0.0f);
            bem::LoraForwardParams f = forward_params(p, in, y[n - 1], c.d_in, in.x, c.d_out);
            f.shrink_out = S[n - 1].data();
            bem::lora_forward_cpu(f);
            g[n - 1] = run_backward(p, in, nullptr);
          }
          const std::string label = std::string(bem::detail::simd_level_name(level)) + " " + name(dt) + " " +
                                    describe(c) + (threshold == 0 ? " (pool forced)" : "") +
                                    " split=" + std::to_string(split);
          CHECK(y[0].same_bits(y[1]), "%s: forward differs between 1 and 2 threads", label.c_str());
          CHECK(S[0] == S[1], "%s: shrink_out differs between 1 and 2 threads", label.c_str());
          CHECK(g[0].gx.same_bits(g[1].gx), "%s: grad_x differs between 1 and 2 threads", label.c_str());
          CHECK(std::memcmp(g[0].gA.data(), g[1].gA.data(), g[0].gA.size() * 4) == 0,
                "%s: grad_A differs between 1 and 2 threads", label.c_str());
          CHECK(std::memcmp(g[0].gB.data(), g[1].gB.data(), g[0].gB.size() * 4) == 0,
                "%s: grad_B differs between 1 and 2 threads", label.c_str());
          CHECK(std::memcmp(g[0].gg.data(), g[1].gg.data(), g[0].gg.size() * 4) == 0,
                "%s: grad_gate differs between 1 and 2 threads", label.c_str());
          if (threshold == 0) {  // also correct, not only reproducible
            const Reference R = reference(p, in);
            check_close(label + " y", y[1].size(), [&](size_t i) { return y[1].value(i); }, R.delta,
                        tolerance(R.delta, R.delta_abs, c.d_in + c.k + 1, unit_roundoff(dt), subnormal_half_ulp(dt)));
            check_close(label + " grad_A", g[1].gA.size(), [&](size_t i) { return static_cast<double>(g[1].gA[i]); },
                        R.gA, tolerance(R.gA, R.gA_abs, c.d_out + c.T + 2, 0.0, 0.0));
            check_close(label + " grad_B", g[1].gB.size(), [&](size_t i) { return static_cast<double>(g[1].gB[i]); },
                        R.gB, tolerance(R.gB, R.gB_abs, c.d_in + c.T + 2, 0.0, 0.0));
          }
        }
      }
    }
  }
  bem::detail::g_parallel_threshold_override.store(-1);
  bem::detail::g_lora_split_override.store(-1);
  bem::set_num_threads(2);
  bem::detail::set_simd_level_cap(SimdLevel::Avx512);
}

// The packed and lanes expands do the same arithmetic in the same order, which is what lets each
// work item pick either: forced, they give bitwise-identical outputs on every case, dtype and level.
void test_packed_and_lanes_agree() {
  Rng rng(4242);
  std::vector<Case> cases = odd_cases();
  cases.push_back({40, 515, 1031, 32, 20, 2, true, true, true, true, 0.9f});
  cases.push_back({33, 259, 517, 64, 64, 1, false, false, false, false, 1.0f});
  for (SimdLevel level : simd_levels()) {
    bem::detail::set_simd_level_cap(level);
    for (const Case& c : cases) {
      const Problem p = make_problem(rng, c);
      for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
        const Inputs in = make_inputs(p, dt);
        Buf y[2];
        for (int form = 1; form <= 2; ++form) {
          bem::detail::g_lora_expand_override.store(form);
          y[form - 1] = Buf(dt, static_cast<size_t>(c.T * c.d_out));
          bem::LoraForwardParams f = forward_params(p, in, y[form - 1], c.d_in, in.x, c.d_out);
          bem::lora_forward_cpu(f);
        }
        CHECK(y[0].same_bits(y[1]), "%s %s %s: packed and lanes expands differ", bem::detail::simd_level_name(level),
              name(dt), describe(c).c_str());
      }
    }
  }
  bem::detail::g_lora_expand_override.store(-1);
  bem::detail::set_simd_level_cap(SimdLevel::Avx512);
}

void test_finite_flag() {
  Rng rng(5);
  const Case c{40, 59, 111, 7, 3, 5, true, false, true, true, 1.0f};
  Problem p = make_problem(rng, c);
  p.ei.assign(c.T, 1);
  p.ei[3] = -1;
  for (SimdLevel level : simd_levels()) {
    bem::detail::set_simd_level_cap(level);
    for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
      const std::string label = std::string(bem::detail::simd_level_name(level)) + " " + name(dt);
      Problem q = p;
      q.x[3 * c.d_in + 5] = NAN;  // an unrouted token's NaN is never read
      Inputs in = make_inputs(q, dt);
      Buf y(dt, static_cast<size_t>(c.T * c.d_out));
      bem::LoraForwardParams f = forward_params(q, in, y, c.d_in, in.x, c.d_out);
      CHECK(bem::lora_forward_cpu(f), "%s: NaN in an unrouted token must not flag the output", label.c_str());
      q.x[7 * c.d_in + 2] = INFINITY;
      in = make_inputs(q, dt);
      f = forward_params(q, in, y, c.d_in, in.x, c.d_out);
      CHECK(!bem::lora_forward_cpu(f), "%s: inf in a routed token not reported", label.c_str());
      if (dt == DType::F16) {  // finite in fp32, overflows float16 on store
        Problem big = p;
        big.c.scale = 1e5f;
        in = make_inputs(big, dt);
        f = forward_params(big, in, y, c.d_in, in.x, c.d_out);
        CHECK(!bem::lora_forward_cpu(f), "%s: float16 overflow on store not reported", label.c_str());
      }
      Problem acc = p;
      in = make_inputs(acc, dt);
      for (size_t i = 0; i < y.size(); ++i) y.set(i, 0.5f);
      y.set(20 * c.d_out + 7, INFINITY);  // accumulating into an inf is reported
      f = forward_params(acc, in, y, c.d_in, in.x, c.d_out);
      f.accumulate = true;
      CHECK(!bem::lora_forward_cpu(f), "%s: accumulated non-finite value not reported", label.c_str());
    }
  }
  bem::detail::set_simd_level_cap(SimdLevel::Avx512);
}

void test_unused_experts_get_zero_gradients() {
  Rng rng(9);
  const Case c{50, 59, 111, 7, 3, 5, true, false, true, true, 1.0f};
  Problem p = make_problem(rng, c);
  p.ei.assign(c.T, 2);
  const Inputs in = make_inputs(p, DType::F32);
  const Grads g = run_backward(p, in, nullptr);
  bool zeros = true;
  for (int64_t e = 0; e < c.E; ++e) {
    if (e == 2) continue;
    for (int64_t i = 0; i < c.r * c.d_in; ++i) zeros &= g.gA[e * c.r * c.d_in + i] == 0.0f;
    for (int64_t i = 0; i < c.d_out * c.r; ++i) zeros &= g.gB[e * c.d_out * c.r + i] == 0.0f;
  }
  CHECK(zeros, "experts no token used must get exact zero gradients");
}

void test_argument_errors() {
  Rng rng(3);
  const Case c{10, 59, 111, 7, 3, 5, true, false, true, true, 1.0f};
  const Problem p0 = make_problem(rng, c);
  const Inputs in = make_inputs(p0, DType::F32);
  auto forward_with = [&](Problem p) {
    Buf y(DType::F32, std::vector<float>(c.T * c.d_out, 42.0f));
    bem::LoraForwardParams f = forward_params(p, in, y, c.d_in, in.x, c.d_out);
    bool threw = false;
    try {
      bem::lora_forward_cpu(f);
    } catch (const bem::ArgumentError&) {
      threw = true;
      bool untouched = true;
      for (float v : y.f) untouched &= v == 42.0f;
      CHECK(untouched, "a rejected call must leave y untouched");
    }
    CHECK(threw, "expected an error");
  };
  auto expect = [&](Problem p, const std::string& arg, bool index_error) {
    forward_with(p);
    CHECK(throws_argument_error(
              [&] {
                bem::validate_lora_indices(c.T, c.E, c.r, c.k, p.ei.data(), p.ri.data());
              },
              arg, index_error),
          "validate_lora_indices: expected %s error on %s", index_error ? "index" : "value", arg.c_str());
  };
  Problem p = p0;
  p.ei[4] = c.E;
  expect(p, "expert_index", true);
  p = p0;
  p.ei[0] = -2;
  expect(p, "expert_index", true);
  p = p0;
  p.ri[5] = c.r;
  expect(p, "rank_index", true);
  p = p0;
  p.ri[2] = -1;
  expect(p, "rank_index", true);
  p = p0;
  p.ri[3 * c.k + 1] = p.ri[3 * c.k + 2];
  expect(p, "rank_index", false);
  CHECK(throws_argument_error([&] { bem::validate_lora_indices(c.T, c.E, c.r, c.k, p0.ei.data(), p0.ri.data()); },
                              "none", false) == false,
        "valid indices must pass");

  // Shape and pointer checks name the parameter.
  Buf y(DType::F32, static_cast<size_t>(c.T * c.d_out));
  auto fp = [&] { return forward_params(p0, in, y, c.d_in, in.x, c.d_out); };
  struct Bad {
    const char* arg;
    void (*edit)(bem::LoraForwardParams&);
  };
  const Bad bad[] = {
      {"tokens", [](bem::LoraForwardParams& f) { f.tokens = 0; }},
      {"d_in", [](bem::LoraForwardParams& f) { f.d_in = 0; }},
      {"d_out", [](bem::LoraForwardParams& f) { f.d_out = -1; }},
      {"rank", [](bem::LoraForwardParams& f) { f.rank = 0; }},
      {"experts", [](bem::LoraForwardParams& f) { f.experts = 0; }},
      {"rank_index", [](bem::LoraForwardParams& f) { f.active = f.rank + 1; }},
      {"rank_index", [](bem::LoraForwardParams& f) { f.rank_index = nullptr; }},
      {"x", [](bem::LoraForwardParams& f) { f.x = nullptr; }},
      {"y", [](bem::LoraForwardParams& f) { f.y = nullptr; }},
      {"ld_x", [](bem::LoraForwardParams& f) { f.ld_x = f.d_in - 1; }},
      {"ld_y", [](bem::LoraForwardParams& f) { f.ld_y = 3; }},
      {"dtype", [](bem::LoraForwardParams& f) { f.dtype = static_cast<DType>(7); }},
  };
  for (const Bad& b : bad) {
    bem::LoraForwardParams f = fp();
    b.edit(f);
    CHECK(throws_argument_error([&] { bem::lora_forward_cpu(f); }, b.arg, false), "forward: expected error on %s",
          b.arg);
  }
  bem::LoraBackwardParams bp;
  bp.tokens = c.T;
  bp.d_in = c.d_in;
  bp.d_out = c.d_out;
  bp.rank = c.r;
  bp.active = c.k;
  bp.experts = c.E;
  bp.x = in.x.data();
  bp.A = in.A.data();
  bp.B = in.B.data();
  bp.expert_index = p0.ei.data();
  bp.rank_index = p0.ri.data();
  CHECK(throws_argument_error([&] { bem::lora_backward_cpu(bp); }, "grad_y", false), "backward: null grad_y");
  bp.grad_y = in.dy.data();
  std::vector<int64_t> bad_ei = p0.ei;
  bad_ei[1] = 99;
  bp.expert_index = bad_ei.data();
  CHECK(throws_argument_error([&] { bem::lora_backward_cpu(bp); }, "expert_index", true), "backward: bad expert");
}

// Several threads calling the kernels at once (as several Python threads may) get exactly the
// results of serial calls: scratch is per thread and the pool serialises its regions.
void test_concurrent_callers() {
  Rng rng(31);
  const std::vector<Case> cases = {{300, 515, 1031, 24, 10, 4, true, false, true, true, 0.8f},
                                   {1, 1031, 2053, 64, 64, 2, false, false, true, true, 1.0f},
                                   {77, 59, 111, 7, 3, 5, true, false, true, true, 0.75f}};
  std::vector<Problem> problems;
  std::vector<Inputs> inputs;
  for (const Case& c : cases) {
    problems.push_back(make_problem(rng, c));
    inputs.push_back(make_inputs(problems.back(), DType::F32));
  }
  auto run = [&](size_t i, Buf& y, Grads& g) {
    const Case& c = problems[i].c;
    y = Buf(DType::F32, static_cast<size_t>(c.T * c.d_out));
    bem::LoraForwardParams f = forward_params(problems[i], inputs[i], y, c.d_in, inputs[i].x, c.d_out);
    bem::lora_forward_cpu(f);
    g = run_backward(problems[i], inputs[i], nullptr);
  };
  std::vector<Buf> y_serial(cases.size());
  std::vector<Grads> g_serial(cases.size());
  for (size_t i = 0; i < cases.size(); ++i) run(i, y_serial[i], g_serial[i]);
  std::vector<Buf> y_conc(cases.size() * 2);
  std::vector<Grads> g_conc(cases.size() * 2);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < cases.size() * 2; ++i) {
    threads.emplace_back([&, i] {
      for (int rep = 0; rep < 3; ++rep) run(i % cases.size(), y_conc[i], g_conc[i]);
    });
  }
  for (std::thread& t : threads) t.join();
  for (size_t i = 0; i < cases.size() * 2; ++i) {
    const size_t q = i % cases.size();
    CHECK(y_conc[i].same_bits(y_serial[q]), "concurrent forward %zu differs from serial", i);
    CHECK(g_conc[i].gx.same_bits(g_serial[q].gx) && g_conc[i].gA == g_serial[q].gA && g_conc[i].gB == g_serial[q].gB &&
              g_conc[i].gg == g_serial[q].gg,
          "concurrent backward %zu differs from serial", i);
  }
}

// BEM_CPU_SIMD caps the dispatch level (read once, at the first call).
void test_simd_environment_cap() {
  using bem::detail::env_simd_cap;
  setenv("BEM_CPU_SIMD", "scalar", 1);
  CHECK(env_simd_cap() == SimdLevel::Scalar, "BEM_CPU_SIMD=scalar");
  setenv("BEM_CPU_SIMD", "avx2", 1);
  CHECK(env_simd_cap() == SimdLevel::Avx2, "BEM_CPU_SIMD=avx2");
  setenv("BEM_CPU_SIMD", "avx512", 1);
  CHECK(env_simd_cap() == SimdLevel::Avx512, "BEM_CPU_SIMD=avx512");
  unsetenv("BEM_CPU_SIMD");
  CHECK(env_simd_cap() == SimdLevel::Avx512, "no BEM_CPU_SIMD: no cap");
  CHECK(bem::detail::set_simd_level_cap(SimdLevel::Scalar) == SimdLevel::Scalar, "cap to scalar");
  CHECK(bem::detail::set_simd_level_cap(SimdLevel::Avx512) == bem::detail::detected_simd_level(),
        "cap above the CPU's level gives the CPU's level");
}

}  // namespace

int main() {
  bem::set_num_threads(2);
  test_reference_against_finite_differences();
  test_against_reference();
  test_thread_count_independence();
  test_packed_and_lanes_agree();
  test_finite_flag();
  test_unused_experts_get_zero_gradients();
  test_argument_errors();
  test_concurrent_callers();
  test_simd_environment_cap();
  return finish("test_lora_cpu");
}
