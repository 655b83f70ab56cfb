// Bootstrap resampling of linear statistics (the mean and the weighted mean) and their closed-form
// jackknife, the core of bem.stats.bca_interval. No index matrix is ever materialised.
//
// Exactness convention. Sums are taken in 64-bit fixed point: every term is rounded once to an
// integer multiple of 2^-s (s chosen from the data so that no sum of n terms can overflow), and the
// integer sums are exact, so a resample's statistic depends only on the multiset of observations it
// drew. A resample that is a permutation of the data gives bit-for-bit the observed statistic (a
// tie for the BCa bias correction), whatever the thread count or draw order. Data on a dyadic grid
// (integers, exact-match deltas, k/2^m) is represented exactly.
#pragma once
#include <cstdint>

#include "bem/common.h"

namespace bem {

// Implementations of the resampling loop. All consume the random streams identically and return
// bit-identical results; Best picks the fastest the CPU supports (chosen at run time).
enum class BootstrapKernel : int { Best = 0, Portable = 1, Avx2 = 2, Avx512 = 3 };

bool bootstrap_kernel_supported(BootstrapKernel kernel);
const char* bootstrap_kernel_name(BootstrapKernel kernel);

struct LinearBootstrapParams {
  int64_t n = 0;                  // observations, 2 ≤ n < 2^32
  const double* values = nullptr;   // (n,) finite
  const double* weights = nullptr;  // (n,) finite and > 0, or null: the plain mean
  int64_t n_resamples = 0;        // B ≥ 1
  uint64_t seed = 0;              // resample b uses its own stream derived from (seed, b)
  double* out = nullptr;          // (B,) written: the statistic of each resample
  BootstrapKernel kernel = BootstrapKernel::Best;  // tests pin one to compare them
};

// Fills p.out with the statistic (mean, or Σwx/Σw) of B resamples drawn with replacement, and
// returns the observed statistic computed the same way (see the exactness convention above).
// Resample b draws n indices uniformly (xoshiro256** seeded by SplitMix64 at (seed, b); Lemire's
// unbiased bounded integers), so the output is a function of (data, seed) only: the thread count
// and the order of the work do not change it. Runs on bem::parallel_for. Throws ArgumentError
// naming "values", "weights", "n_resamples", "out" or "kernel" for a bad argument, before writing anything.
double bootstrap_linear(const LinearBootstrapParams& p);

// Acceleration of the BCa interval from the leave-one-out jackknife of the (weighted) mean, in
// closed form and O(n):  a = Σ D_i³ / (6 (Σ D_i²)^{3/2}),  D_i = mean_j θ_(j) − θ_(i),
// θ_(i) = Σ_{j≠i} w_j x_j / Σ_{j≠i} w_j (w ≡ 1 without weights, so D_i ∝ x_i − x̄). This is the
// value scipy.stats.bootstrap obtains by recomputing the statistic n times. Returns NaN when all
// values are equal (every θ_(i) is the same: the acceleration is 0/0). Same argument checks as
// bootstrap_linear for n, values and weights.
double jackknife_acceleration(int64_t n, const double* values, const double* weights);

}  // namespace bem
