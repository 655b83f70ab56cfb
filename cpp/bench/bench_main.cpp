// bem_bench: times bem's CPU kernels without Python (medians over repeats, after warm-up) and
// prints a Markdown table with µs per call, GFLOP/s and GB/s, plus same-run baselines (a GEMV of
// the decode base layer, a memcpy of FiLM's input) to compare against.
//
//   bem_bench [--filter SUBSTRING] [--repeats N] [--threads N] [--min] [--cpu-time]
//             [--expand rowdot|packed|lanes] [--shrink gemm|dot] [--split fused|phases] [--forms]
//
// --expand / --shrink force one form of the LoRA kernels' expand / shrink (instead of the cost
// model's choice per run), --split one split of a parallel LoRA forward (fused token blocks or
// the two phases), to refit those choices on a new CPU. --forms times the LoRA forward shapes only,
// with each expand form forced and with the cost model's choice, interleaved call batch by call
// batch so that a busy machine disturbs them alike.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <time.h>
#include <vector>

#include "../src/cpu_features.h"
#include "bem/dtype.h"
#include "bem/film.h"
#include "bem/kron.h"
#include "bem/lora.h"
#include "bem/parallel.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  std::string filter;
  int repeats = 15;
  int threads = 0;
  bool minimum = false;   // report the fastest sample instead of the median
  bool cpu_time = false;  // time with the calling thread's CPU clock (with --threads 1: immune to
                          // other processes on a busy machine)
  bool forms = false;     // LoRA forward only: every expand form, interleaved
};

Options g_options;

double now_seconds() {
  if (g_options.cpu_time) {
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
  }
  return std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
}

// Median seconds per call: calls are batched so one sample lasts at least ~2 ms.
double time_call(const std::function<void()>& fn, int repeats) {
  for (int i = 0; i < 3; ++i) fn();
  const double t0 = now_seconds();
  fn();
  const double once = now_seconds() - t0;
  const int batch = std::max(1, static_cast<int>(2e-3 / std::max(once, 1e-9)));
  std::vector<double> samples;
  for (int r = 0; r < repeats; ++r) {
    const double s = now_seconds();
    for (int i = 0; i < batch; ++i) fn();
    samples.push_back((now_seconds() - s) / batch);
  }
  if (g_options.minimum) return *std::min_element(samples.begin(), samples.end());
  std::nth_element(samples.begin(), samples.begin() + samples.size() / 2, samples.end());
  return samples[samples.size() / 2];
}

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown CPU";
}

struct Row {
  std::string kernel, shape;
  double seconds, flops, bytes;
  std::string note;
};

void print_row(const Row& r) {
  char gflops[32] = "–";
  if (r.flops > 0) std::snprintf(gflops, sizeof(gflops), "%.1f", r.flops / r.seconds / 1e9);
  std::printf("| %s | %s | %.2f | %s | %.1f | %s |\n", r.kernel.c_str(), r.shape.c_str(), r.seconds * 1e6, gflops,
              r.bytes / r.seconds / 1e9, r.note.c_str());
  std::fflush(stdout);
}

std::vector<float> random_floats(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

bool selected(const Options& o, const std::string& name) {
  return o.filter.empty() || name.find(o.filter) != std::string::npos;
}

// ---- LoRA ---------------------------------------------------------------------------------------------
struct LoraData {
  int64_t T, d, r, k, E;
  std::vector<float> x, A, B, y, gate, dy, S, gx, gA, gB, gg;
  std::vector<int64_t> ei, ri;
};

LoraData make_lora(int64_t T, int64_t d, int64_t r, int64_t k, int64_t E) {
  LoraData L{T, d, r, k, E, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  L.x = random_floats(T * d, 1);
  L.A = random_floats(E * r * d, 2);
  L.B = random_floats(E * d * r, 3);
  L.y.assign(T * d, 0.0f);
  L.gate = std::vector<float>(T * k, 1.0f);
  L.dy = random_floats(T * d, 4);
  L.S.assign(T * k, 0.0f);
  for (int64_t t = 0; t < T; ++t) L.ei.push_back((t / 64) % E);
  if (k < r) {  // one rank set per 64-token chunk, as the router produces
    std::mt19937_64 rng(5);
    std::vector<int64_t> set(static_cast<size_t>(r));
    for (int64_t t = 0; t < T; ++t) {
      if (t % 64 == 0) {
        std::iota(set.begin(), set.end(), 0);
        std::shuffle(set.begin(), set.end(), rng);
      }
      L.ri.insert(L.ri.end(), set.begin(), set.begin() + k);
    }
  }
  return L;
}

bem::LoraForwardParams lora_params(LoraData& L) {
  bem::LoraForwardParams p;
  p.tokens = L.T;
  p.d_in = L.d;
  p.d_out = L.d;
  p.rank = L.r;
  p.active = L.k;
  p.experts = L.E;
  p.scale = 0.5f;
  p.x = L.x.data();
  p.ld_x = L.d;
  p.A = L.A.data();
  p.B = L.B.data();
  p.expert_index = L.E > 1 ? L.ei.data() : nullptr;
  p.rank_index = L.k < L.r ? L.ri.data() : nullptr;
  p.y = L.y.data();
  p.ld_y = L.d;
  return p;
}

// Bytes the delta must move: x, y, and the A rows / B matrices of the experts used.
double lora_bytes(const LoraData& L) {
  const int64_t experts_used = std::min<int64_t>(L.E, (L.T + 63) / 64);
  return 4.0 * (2.0 * L.T * L.d + experts_used * (double(L.k) * L.d + double(L.d) * L.r));
}

// --forms: medians of the forward with the row-dot, packed and lanes expands forced and with the
// cost model's choice (the last column), sampled in turn so that drift hits all four alike.
void compare_forms(const char* shape, const std::function<void()>& fn, int repeats) {
  constexpr int kForms = 4;  // override values 0, 1, 2, then -1 (cost model)
  auto use = [](int f) { bem::detail::g_lora_expand_override.store(f < 3 ? f : -1); };
  int batch = 1;
  for (int f = 0; f < kForms; ++f) {
    use(f);
    for (int i = 0; i < 3; ++i) fn();
    const double t0 = now_seconds();
    fn();
    batch = std::max(batch, static_cast<int>(1e-3 / std::max(now_seconds() - t0, 1e-9)));
  }
  std::vector<double> samples[kForms];
  for (int r = 0; r < repeats; ++r) {
    for (int f = 0; f < kForms; ++f) {
      use(f);
      const double t0 = now_seconds();
      for (int i = 0; i < batch; ++i) fn();
      samples[f].push_back((now_seconds() - t0) / batch);
    }
  }
  use(3);
  std::printf("| %s |", shape);
  for (std::vector<double>& v : samples) {
    std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
    std::printf(" %.2f |", v[v.size() / 2] * 1e6);
  }
  std::printf("\n");
  std::fflush(stdout);
}

void bench_lora(const Options& o) {
  // Baseline for the decode budget: a 1024×1024 fp32 GEMV (the base layer), run through bem's own
  // shrink path (r = 1024 rows, d_out = 1), i.e. 4 MB of weights streamed once.
  if (!o.forms && (selected(o, "gemv baseline") || selected(o, "lora_forward"))) {
    LoraData G = make_lora(1, 1024, 1024, 1024, 1);
    G.B = random_floats(1024, 9);
    bem::LoraForwardParams p = lora_params(G);
    p.d_out = 1;
    p.ld_y = 1;
    const double s = time_call([&] { bem::lora_forward_cpu(p); }, o.repeats);
    print_row({"gemv baseline", "1024×1024 fp32, T=1", s, 2.0 * 1024 * 1024, 4.0 * 1024 * 1024, "base layer at decode"});
  }
  for (int64_t d : {1024, 4096}) {
    for (int64_t T : {1, 16, 128, 1024}) {
      for (int64_t r : {8, 16, 64}) {
        for (int64_t E : {1, 8}) {
          for (int dense = 1; dense >= 0; --dense) {
            const int64_t k = dense ? r : r / 2;
            char shape[160];
            std::snprintf(shape, sizeof(shape), "T=%lld d=%lld r=%lld k=%lld E=%lld", (long long)T, (long long)d,
                          (long long)r, (long long)k, (long long)E);
            if (!selected(o, std::string("lora_forward ") + shape)) continue;
            LoraData L = make_lora(T, d, r, k, E);
            bem::LoraForwardParams p = lora_params(L);
            if (o.forms) {
              compare_forms(shape, [&] { bem::lora_forward_cpu(p); }, o.repeats);
              continue;
            }
            const double s = time_call([&] { bem::lora_forward_cpu(p); }, o.repeats);
            print_row({"lora_forward", shape, s, 2.0 * T * k * 2 * d, lora_bytes(L), dense ? "dense" : "k=r/2"});
          }
        }
      }
    }
  }
  if (o.forms) return;
  // Backward (all four gradients, shrink saved by the forward).
  for (int64_t T : {1, 128, 1024}) {
    for (int64_t r : {8, 64}) {
      const int64_t d = 4096, E = 8, k = r / 2;
      char shape[160];
      std::snprintf(shape, sizeof(shape), "T=%lld d=%lld r=%lld k=%lld E=%lld", (long long)T, (long long)d,
                    (long long)r, (long long)k, (long long)E);
      if (!selected(o, std::string("lora_backward ") + shape)) continue;
      LoraData L = make_lora(T, d, r, k, E);
      bem::LoraForwardParams f = lora_params(L);
      f.shrink_out = L.S.data();
      bem::lora_forward_cpu(f);
      L.gx.assign(T * d, 0.0f);
      L.gA.assign(E * r * d, 0.0f);
      L.gB.assign(E * d * r, 0.0f);
      L.gg.assign(T * k, 0.0f);
      bem::LoraBackwardParams b;
      b.tokens = T;
      b.d_in = d;
      b.d_out = d;
      b.rank = r;
      b.active = k;
      b.experts = E;
      b.scale = 0.5f;
      b.x = L.x.data();
      b.A = L.A.data();
      b.B = L.B.data();
      b.expert_index = L.ei.data();
      b.rank_index = L.ri.data();
      b.rank_gate = L.gate.data();
      b.shrink = L.S.data();
      b.grad_y = L.dy.data();
      b.grad_x = L.gx.data();
      b.grad_A = L.gA.data();
      b.grad_B = L.gB.data();
      b.grad_gate = L.gg.data();
      const double s = time_call([&] { bem::lora_backward_cpu(b); }, o.repeats);
      // grad_s: T·r·d, grad_x: T·k·d, grad_A: T·r·d, grad_B: T·r·d multiply-adds.
      const double flops = 2.0 * T * d * (3.0 * r + k);
      const int64_t experts_used = std::min<int64_t>(E, (T + 63) / 64);
      const double bytes = 4.0 * (3.0 * T * d + 4.0 * E * r * d) + 0.0 * experts_used;
      print_row({"lora_backward", shape, s, flops, bytes, "grad x, A, B, gate"});
    }
  }
}

// ---- Kronecker ---------------------------------------------------------------------------------------
void bench_kron(const Options& o) {
  const int64_t o1 = 32, i1 = 64, o2 = 32, i2 = 64, d_in = i1 * i2, d_out = o1 * o2;
  const std::vector<float> A = random_floats(o1 * i1, 11), B = random_floats(o2 * i2, 12);
  // Cheaper association order, as the kernel picks it.
  const double macs_per_token = std::min(double(i1 * i2 * o2 + o1 * i1 * o2), double(o1 * i1 * i2 + o1 * i2 * o2));
  for (int64_t T : {1, 16, 128, 1024}) {
    char shape[160];
    std::snprintf(shape, sizeof(shape), "T=%lld d_out=%lld d_in=%lld A,B 32×64", (long long)T, (long long)d_out,
                  (long long)d_in);
    const std::vector<float> x = random_floats(T * d_in, 13), dy = random_floats(T * d_out, 14);
    std::vector<float> y(T * d_out), gx(T * d_in), gA(o1 * i1), gB(o2 * i2);
    if (selected(o, std::string("kron_forward ") + shape)) {
      bem::KronForwardParams p;
      p.tokens = T;
      p.o1 = o1;
      p.i1 = i1;
      p.o2 = o2;
      p.i2 = i2;
      p.scale = 0.5f;
      p.x = x.data();
      p.A = A.data();
      p.B = B.data();
      p.y = y.data();
      p.ld_y = d_out;
      const double s = time_call([&] { bem::kron_forward_cpu(p); }, o.repeats);
      print_row({"kron_forward", shape, s, 2.0 * T * macs_per_token, 4.0 * (T * (d_in + d_out) + o1 * i1 + o2 * i2), ""});
    }
    if (selected(o, std::string("kron_backward ") + shape)) {
      bem::KronBackwardParams b;
      b.tokens = T;
      b.o1 = o1;
      b.i1 = i1;
      b.o2 = o2;
      b.i2 = i2;
      b.scale = 0.5f;
      b.x = x.data();
      b.A = A.data();
      b.B = B.data();
      b.grad_y = dy.data();
      b.grad_x = gx.data();
      b.grad_A = gA.data();
      b.grad_B = gB.data();
      const double s = time_call([&] { bem::kron_backward_cpu(b); }, o.repeats);
      // P = dY·B, grad_x = Aᵀ·P, grad_A from X·Pᵀ, Q = A·X, grad_B from dYᵀ·Q (multiply-adds per token).
      const double bwd_macs = double(o1 * o2 * i2 + 3 * i1 * o1 * i2 + o2 * o1 * i2);
      print_row({"kron_backward", shape, s, 2.0 * T * bwd_macs, 4.0 * T * (2 * d_in + 2 * d_out), "grad x, A, B"});
    }
  }
  if (selected(o, "spectral_norm")) {
    const std::vector<float> M = random_floats(64 * 64, 15);
    const double s = time_call([&] { bem::spectral_norm_cpu(M.data(), 64, 64, 1e-6, 200); }, o.repeats);
    print_row({"spectral_norm", "64×64, tol 1e-6", s, 0, 4.0 * 64 * 64, "power iteration"});
  }
}

// ---- FiLM -----------------------------------------------------------------------------------------------
void bench_film(const Options& o) {
  const int64_t rows = 4096, d = 4096;
  const size_t n = static_cast<size_t>(rows * d);
  std::vector<float> x = random_floats(n, 21), y(n), gtok = random_floats(n, 22), btok = random_floats(n, 23);
  const double xy_bytes = 8.0 * n;
  if (selected(o, "copy")) {
    const double s1 = time_call([&] { std::memcpy(y.data(), x.data(), n * 4); }, o.repeats);
    print_row({"copy baseline", "memcpy 4096×4096 fp32, 1 thread", s1, 0, xy_bytes, "read x + write y"});
    const double s2 = time_call(
        [&] {
          bem::parallel_for(static_cast<int64_t>(rows), 64, [&](int64_t b, int64_t e) {
            std::memcpy(y.data() + b * d, x.data() + b * d, static_cast<size_t>((e - b) * d) * 4);
          });
        },
        o.repeats);
    print_row({"copy baseline", "memcpy 4096×4096 fp32, pool", s2, 0, xy_bytes, "read x + write y"});
  }
  for (int64_t groups : {rows, int64_t{8}, int64_t{1}}) {
    char shape[160];
    std::snprintf(shape, sizeof(shape), "4096×4096 fp32, groups=%lld", (long long)groups);
    if (!selected(o, std::string("film_forward ") + shape)) continue;
    bem::FilmForwardParams p;
    p.rows = rows;
    p.d = d;
    p.groups = groups;
    p.x = x.data();
    p.gamma = gtok.data();
    p.beta = btok.data();
    p.y = y.data();
    const double s = time_call([&] { bem::film_forward_cpu(p); }, o.repeats);
    print_row({"film_forward", shape, s, 3.0 * n, xy_bytes + 8.0 * groups * d,
               groups == rows ? "γ, β per token" : (groups == 1 ? "γ, β global" : "γ, β per sequence")});
  }
  for (int64_t groups : {rows, int64_t{8}}) {
    char shape[160];
    std::snprintf(shape, sizeof(shape), "4096×4096 fp32, groups=%lld", (long long)groups);
    if (!selected(o, std::string("film_backward ") + shape)) continue;
    std::vector<float> gx(n), gg(groups * d), gb(groups * d);
    bem::FilmBackwardParams b;
    b.rows = rows;
    b.d = d;
    b.groups = groups;
    b.x = x.data();
    b.gamma = gtok.data();
    b.beta = btok.data();
    b.grad_y = y.data();
    b.grad_x = gx.data();
    b.grad_gamma = gg.data();
    b.grad_beta = gb.data();
    const double s = time_call([&] { bem::film_backward_cpu(b); }, o.repeats);
    print_row({"film_backward", shape, s, 4.0 * n, 12.0 * n + 16.0 * groups * d, "grad x, γ, β"});
  }
}

}  // namespace

// --expand's value: the g_lora_expand_override code of a LoRA expand form, or -1.
int expand_form(const char* name) {
  const char* names[] = {"rowdot", "packed", "lanes"};
  for (int i = 0; i < 3; ++i) {
    if (std::strcmp(name, names[i]) == 0) return i;
  }
  return -1;
}

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--filter" && i + 1 < argc) {
      o.filter = argv[++i];
    } else if (a == "--repeats" && i + 1 < argc) {
      o.repeats = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--threads" && i + 1 < argc) {
      o.threads = std::atoi(argv[++i]);
    } else if (a == "--forms") {
      o.forms = true;
    } else if (a == "--min") {
      o.minimum = true;
    } else if (a == "--cpu-time") {
      o.cpu_time = true;
    } else if (a == "--expand" && i + 1 < argc && expand_form(argv[i + 1]) >= 0) {
      bem::detail::g_lora_expand_override.store(expand_form(argv[++i]));
    } else if (a == "--shrink" && i + 1 < argc && (std::strcmp(argv[i + 1], "gemm") == 0 || std::strcmp(argv[i + 1], "dot") == 0)) {
      bem::detail::g_lora_shrink_override.store(std::strcmp(argv[++i], "gemm") == 0 ? 1 : 0);
    } else if (a == "--split" && i + 1 < argc && (std::strcmp(argv[i + 1], "fused") == 0 || std::strcmp(argv[i + 1], "phases") == 0)) {
      bem::detail::g_lora_split_override.store(std::strcmp(argv[++i], "fused") == 0 ? 1 : 0);
    } else {
      std::fprintf(stderr, "usage: bem_bench [--filter SUBSTRING] [--repeats N] [--threads N] [--min] [--cpu-time] "
                           "[--expand rowdot|packed|lanes] [--shrink gemm|dot] [--split fused|phases] [--forms]\n");
      return 2;
    }
  }
  g_options = o;
  if (o.threads > 0) bem::set_num_threads(o.threads);
  std::printf("bem_bench on %s, %u CPUs, bem threads %d, SIMD %s; %s of %d repeats (%s)\n\n",
              cpu_model().c_str(), std::thread::hardware_concurrency(), bem::num_threads(),
              bem::detail::simd_level_name(bem::detail::simd_level()), o.minimum ? "minimum" : "medians", o.repeats,
              o.cpu_time ? "thread CPU time" : "wall clock");
  if (o.forms) {
    std::printf("| lora_forward shape | rowdot µs | packed µs | lanes µs | cost model µs |\n|---|---:|---:|---:|---:|\n");
    bench_lora(o);
    return 0;
  }
  std::printf("| kernel | shape | µs/call | GFLOP/s | GB/s | note |\n|---|---|---:|---:|---:|---|\n");
  bench_lora(o);
  bench_kron(o);
  bench_film(o);
  return 0;
}
