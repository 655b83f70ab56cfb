// Kronecker-factored delta on the CPU: checks, the association order, token blocks on the thread
// pool, the block-ordered reduction of the factor gradients, and the spectral norm by power
// iteration. Kernels per SIMD level come from kron_kernels.inl.
#include "bem/kron.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>
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

struct KronArgs {
  int64_t tokens = 0, o1 = 0, i1 = 0, o2 = 0, i2 = 0;
  float scale = 1.0f;
  const void* x = nullptr;   // (T, i1·i2)
  const void* A = nullptr;   // (o1, i1)
  const void* B = nullptr;   // (o2, i2)
  const float* Bt = nullptr; // forward: Bᵀ packed fp32 (i2, o2)
  int order = 1;             // forward association order (see kron_forward_block)
  void* y = nullptr;         // forward output, row stride ld_y
  int64_t ld_y = 0;
  bool accumulate = false;
  const void* dy = nullptr;  // backward: (T, o1·o2)
  void* grad_x = nullptr;
  float* partial_A = nullptr;  // backward: (blocks, i1, o1) per-block sums of X_t P_tᵀ, or null
  float* partial_B = nullptr;  // backward: (blocks, o2, i2) per-block sums of dY_tᵀ Q_t, or null
  int64_t block = 16;          // backward tokens per block (fixed: the reduction order is per block)
};

struct KronKernels {
  bool (*forward_block)(const KronArgs&, int64_t t0, int64_t t1);
  void (*backward_block)(const KronArgs&, int64_t blk);
};

}  // namespace
}  // namespace bem

#define BEM_ISA_KERNELS "kron_kernels.inl"
#define BEM_ISA_WITH_GEMM
#include "isa_instantiate.inl"

namespace bem {
namespace {

const KronKernels& kernels_for(DType dtype) {
  switch (detail::simd_level()) {
#ifdef BEM_SIMD_X86
    case detail::SimdLevel::Avx512: return isa_avx512::kron_kernels(dtype);
    case detail::SimdLevel::Avx2: return isa_avx2::kron_kernels(dtype);
#endif
    default: return isa_scalar::kron_kernels(dtype);
  }
}

constexpr int64_t kParallelMacs = int64_t{1} << 19;
constexpr int64_t kForwardBlock = 8;  // tokens per forward work item: its scratch stays in L2

struct KronScratch {
  std::vector<float> Bt, partials;
};

KronScratch& kron_scratch() {
  thread_local KronScratch s;
  return s;
}

void check_shape(int64_t tokens, int64_t o1, int64_t i1, int64_t o2, int64_t i2, DType dtype) {
  BEM_REQUIRE(tokens >= 1, "tokens", "expected at least one token, " + got(tokens));
  BEM_REQUIRE(o1 >= 1, "o1", "expected >= 1, " + got(o1));
  BEM_REQUIRE(i1 >= 1, "i1", "expected >= 1, " + got(i1));
  BEM_REQUIRE(o2 >= 1, "o2", "expected >= 1, " + got(o2));
  BEM_REQUIRE(i2 >= 1, "i2", "expected >= 1, " + got(i2));
  require_dtype(dtype);
}

float load_as_float(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::BF16: return to_float(static_cast<const bf16*>(p)[i]);
    case DType::F16: return to_float(static_cast<const f16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

}  // namespace

bool kron_forward_cpu(const KronForwardParams& p) {
  check_shape(p.tokens, p.o1, p.i1, p.o2, p.i2, p.dtype);
  BEM_REQUIRE(p.x != nullptr, "x", "is null");
  BEM_REQUIRE(p.A != nullptr, "A", "is null");
  BEM_REQUIRE(p.B != nullptr, "B", "is null");
  BEM_REQUIRE(p.y != nullptr, "y", "is null");
  BEM_REQUIRE(p.ld_y >= p.o1 * p.o2, "ld_y", "expected >= d_out=" + std::to_string(p.o1 * p.o2) + ", " + got(p.ld_y));
  KronScratch& s = kron_scratch();
  KronArgs a;
  a.tokens = p.tokens;
  a.o1 = p.o1;
  a.i1 = p.i1;
  a.o2 = p.o2;
  a.i2 = p.i2;
  a.scale = p.scale;
  a.x = p.x;
  a.A = p.A;
  a.B = p.B;
  a.y = p.y;
  a.ld_y = p.ld_y;
  a.accumulate = p.accumulate;
  float* Bt = tls_buffer(s.Bt, p.i2 * p.o2);
  for (int64_t b = 0; b < p.o2; ++b)
    for (int64_t k = 0; k < p.i2; ++k) Bt[k * p.o2 + b] = load_as_float(p.B, p.dtype, b * p.i2 + k);
  a.Bt = Bt;
  // Multiply-adds per token of each association order.
  const int64_t cost1 = p.i1 * p.i2 * p.o2 + p.o1 * p.i1 * p.o2;  // (X Bᵀ) first
  const int64_t cost2 = p.o1 * p.i1 * p.i2 + p.o1 * p.i2 * p.o2;  // (A X) first
  a.order = cost1 <= cost2 ? 1 : 2;
  const KronKernels& kern = kernels_for(p.dtype);
  const int64_t macs = p.tokens * std::min(cost1, cost2);
  const int64_t blocks = (p.tokens + kForwardBlock - 1) / kForwardBlock;
  if (blocks == 1 || macs < detail::parallel_threshold(kParallelMacs) || num_threads() == 1) {
    bool finite = true;
    for (int64_t t = 0; t < p.tokens; t += kForwardBlock)
      finite &= kern.forward_block(a, t, std::min(p.tokens, t + kForwardBlock));
    return finite;
  }
  std::atomic<bool> all_finite{true};
  parallel_for(blocks, 1, [&](int64_t b, int64_t e) {
    bool ok = true;
    for (int64_t i = b; i < e; ++i) ok &= kern.forward_block(a, i * kForwardBlock, std::min(p.tokens, (i + 1) * kForwardBlock));
    if (!ok) all_finite.store(false, std::memory_order_relaxed);
  });
  return all_finite.load();
}

void kron_backward_cpu(const KronBackwardParams& p) {
  check_shape(p.tokens, p.o1, p.i1, p.o2, p.i2, p.dtype);
  BEM_REQUIRE(p.x != nullptr, "x", "is null");
  BEM_REQUIRE(p.A != nullptr, "A", "is null");
  BEM_REQUIRE(p.B != nullptr, "B", "is null");
  BEM_REQUIRE(p.grad_y != nullptr, "grad_y", "is null");
  if (!p.grad_x && !p.grad_A && !p.grad_B) return;
  KronScratch& s = kron_scratch();
  KronArgs a;
  a.tokens = p.tokens;
  a.o1 = p.o1;
  a.i1 = p.i1;
  a.o2 = p.o2;
  a.i2 = p.i2;
  a.scale = p.scale;
  a.x = p.x;
  a.A = p.A;
  a.B = p.B;
  a.dy = p.grad_y;
  a.grad_x = p.grad_x;
  const int64_t blocks = (p.tokens + a.block - 1) / a.block;
  const int64_t nA = p.i1 * p.o1, nB = p.o2 * p.i2;
  float* partials = tls_buffer(s.partials, blocks * ((p.grad_A ? nA : 0) + (p.grad_B ? nB : 0)));
  a.partial_A = p.grad_A ? partials : nullptr;
  a.partial_B = p.grad_B ? partials + (p.grad_A ? blocks * nA : 0) : nullptr;
  const KronKernels& kern = kernels_for(p.dtype);
  const int64_t macs = p.tokens * 4 * std::min(p.i1 * p.i2 * p.o2 + p.o1 * p.i1 * p.o2, p.o1 * p.i1 * p.i2 + p.o1 * p.i2 * p.o2);
  const bool parallel = blocks > 1 && macs >= detail::parallel_threshold(kParallelMacs);
  if (parallel) {
    parallel_for(blocks, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) kern.backward_block(a, i);
    });
  } else {
    for (int64_t i = 0; i < blocks; ++i) kern.backward_block(a, i);
  }
  // Block partials summed in block order (independent of the thread count), then scaled; grad_A
  // comes out of the blocks transposed (i1, o1).
  if (p.grad_A) {
    for (int64_t r = 0; r < p.o1; ++r) {
      for (int64_t c = 0; c < p.i1; ++c) {
        float acc = 0.0f;
        for (int64_t b = 0; b < blocks; ++b) acc += a.partial_A[b * nA + c * p.o1 + r];
        p.grad_A[r * p.i1 + c] = p.scale * acc;
      }
    }
  }
  if (p.grad_B) {
    for (int64_t i = 0; i < nB; ++i) {
      float acc = 0.0f;
      for (int64_t b = 0; b < blocks; ++b) acc += a.partial_B[b * nB + i];
      p.grad_B[i] = p.scale * acc;
    }
  }
  if (s.partials.capacity() > (size_t{1} << 22)) std::vector<float>().swap(s.partials);
}

double spectral_norm_cpu(const float* m, int64_t rows, int64_t cols, double tol, int max_iter) {
  BEM_REQUIRE(rows >= 0, "rows", "expected >= 0, " + got(rows));
  BEM_REQUIRE(cols >= 0, "cols", "expected >= 0, " + got(cols));
  BEM_REQUIRE(tol >= 0.0 && std::isfinite(tol), "tol", "expected a finite tolerance >= 0, got " + std::to_string(tol));
  BEM_REQUIRE(max_iter >= 1, "max_iter", "expected >= 1, " + got(max_iter));
  if (rows == 0 || cols == 0) return 0.0;
  BEM_REQUIRE(m != nullptr, "m", "is null");
  std::vector<double> v(static_cast<size_t>(cols)), w(static_cast<size_t>(rows));
  // Deterministic start: positive pseudo-random entries in [0.5, 1.5) (a fixed hash of the index),
  // unlikely to be orthogonal to the top right singular vector.
  for (int64_t j = 0; j < cols; ++j) {
    uint64_t h = static_cast<uint64_t>(j) * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
    h ^= h >> 31;
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 29;
    v[j] = 0.5 + static_cast<double>(h >> 11) * 0x1p-53;
  }
  auto normalise = [](std::vector<double>& u) {
    double n = 0;
    for (double e : u) n += e * e;
    n = std::sqrt(n);
    if (n > 0) for (double& e : u) e /= n;
    return n;
  };
  // ‖M v‖ for the unit vector v, leaving M v in w.
  auto apply = [&]() {
    double n2 = 0;
    for (int64_t i = 0; i < rows; ++i) {
      const float* row = m + i * cols;
      double acc = 0;
      for (int64_t j = 0; j < cols; ++j) acc += static_cast<double>(row[j]) * v[j];
      w[i] = acc;
      n2 += acc * acc;
    }
    return std::sqrt(n2);
  };
  normalise(v);
  double sigma = apply();
  if (sigma == 0.0) {
    // The start vector is in the null space: restart from the column of largest norm (M ≠ 0), or
    // M is zero.
    int64_t best = -1;
    double best_n = 0;
    for (int64_t j = 0; j < cols; ++j) {
      double n = 0;
      for (int64_t i = 0; i < rows; ++i) n += static_cast<double>(m[i * cols + j]) * m[i * cols + j];
      if (n > best_n) {
        best_n = n;
        best = j;
      }
    }
    if (best < 0) return 0.0;
    std::fill(v.begin(), v.end(), 0.0);
    v[best] = 1.0;
    sigma = apply();
  }
  for (int it = 0; it < max_iter; ++it) {
    // v ← Mᵀ(M v) / ‖·‖, then σ = ‖M v‖ (increases monotonically to σ_max).
    std::fill(v.begin(), v.end(), 0.0);
    for (int64_t i = 0; i < rows; ++i) {
      const float* row = m + i * cols;
      for (int64_t j = 0; j < cols; ++j) v[j] += static_cast<double>(row[j]) * w[i];
    }
    if (normalise(v) == 0.0) break;
    const double previous = sigma;
    sigma = apply();
    if (std::fabs(sigma - previous) <= tol * sigma) break;
  }
  return sigma;
}

}  // namespace bem
