// CUDA kernels of bounded FiLM (bem/film.h): y = clip(γ)·x + clip(β) with γ, β per group of rows.
// The forward is a bandwidth-bound elementwise pass (a warp per row, 16-byte vectors when aligned);
// the backward writes grad_x and sums grad_γ, grad_β over each group's rows with one atomic add per
// (group, column, row chunk). Design notes: docs/kernels-cuda.md.
#include <algorithm>
#include <cstdint>
#include <string>

#include "bem/cuda_ops.h"
#include "common.cuh"

namespace bem::cuda {
namespace {

using namespace detail;

constexpr int kRowsPerBlock = 8;  // forward: blocks of (32, 8) threads, one warp per row
constexpr int kBackwardThreads = 256;

template <typename T>
struct FilmForwardArgs {
  int64_t rows, d, rows_per_group;
  float gamma_lo, gamma_hi, beta_bound;
  const T* x;
  const T* gamma;
  const T* beta;
  T* y;  // may be x
  int* nonfinite;
};

template <typename T, bool kVec>
__global__ void __launch_bounds__(kWarpSize* kRowsPerBlock) film_forward_kernel(const FilmForwardArgs<T> a) {
  constexpr int V = kVec ? kVecWidth<T> : 1;
  const int64_t chunks = a.d / V;  // kVec implies d % V == 0
  bool finite = true;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y; row < a.rows;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t g = row / a.rows_per_group;
    const T* xr = a.x + row * a.d;
    const T* gr = a.gamma + g * a.d;
    const T* br = a.beta + g * a.d;
    T* yr = a.y + row * a.d;
#pragma unroll 4
    for (int64_t v = threadIdx.x; v < chunks; v += kWarpSize) {
      const int64_t c = v * V;
      if constexpr (kVec) {
        float xv[V], gv[V], bv[V], out[V];
        load_vec16(xr + c, xv);
        load_vec16(gr + c, gv);
        load_vec16(br + c, bv);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          out[i] = fmaf(clamp_nan(gv[i], a.gamma_lo, a.gamma_hi), xv[i], clamp_nan(bv[i], -a.beta_bound, a.beta_bound));
        }
        finite = store_vec16(yr + c, out) && finite;
      } else {
        const float out = fmaf(clamp_nan(to_f32(gr[c]), a.gamma_lo, a.gamma_hi), to_f32(xr[c]),
                               clamp_nan(to_f32(br[c]), -a.beta_bound, a.beta_bound));
        finite = store_scalar(yr + c, out) && finite;
      }
    }
  }
  raise_flag(a.nonfinite, finite);
}

template <typename T>
struct FilmBackwardArgs {
  int64_t rows, d, rows_per_group, rows_per_chunk;
  float gamma_lo, gamma_hi, beta_bound;
  const T* x;
  const T* gamma;
  const T* beta;
  const T* grad_y;
  T* grad_x;           // or null
  float* grad_gamma;   // zeroed, or null
  float* grad_beta;    // zeroed, or null
};

// Grid (ceil(d / 256), row chunks): a thread walks one column down a chunk of rows, keeping the sums
// of its current group in registers and adding them when the group (or the chunk) ends.
template <typename T>
__global__ void __launch_bounds__(kBackwardThreads) film_backward_kernel(const FilmBackwardArgs<T> a) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kBackwardThreads + threadIdx.x;
  if (c >= a.d) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * a.rows_per_chunk;
  const int64_t r1 = a.rows - r0 < a.rows_per_chunk ? a.rows : r0 + a.rows_per_chunk;
  int64_t g = r0 / a.rows_per_group;
  int64_t group_end = (g + 1) * a.rows_per_group;
  float gamma_clipped = 0.0f, sum_gamma = 0.0f, sum_beta = 0.0f;
  bool gamma_passes = false, beta_passes = false;
  auto load_group = [&] {
    const float gamma = to_f32(a.gamma[g * a.d + c]);
    gamma_clipped = clamp_nan(gamma, a.gamma_lo, a.gamma_hi);
    const float beta = to_f32(a.beta[g * a.d + c]);
    gamma_passes = gamma >= a.gamma_lo && gamma <= a.gamma_hi;  // torch.clamp: bounds pass gradient
    beta_passes = fabsf(beta) <= a.beta_bound;
    sum_gamma = 0.0f;
    sum_beta = 0.0f;
  };
  auto flush = [&] {
    if (a.grad_gamma != nullptr && gamma_passes) atomicAdd(a.grad_gamma + g * a.d + c, sum_gamma);
    if (a.grad_beta != nullptr && beta_passes) atomicAdd(a.grad_beta + g * a.d + c, sum_beta);
  };
  load_group();
  for (int64_t row = r0; row < r1; ++row) {
    if (row == group_end) {
      flush();
      ++g;
      group_end += a.rows_per_group;
      load_group();
    }
    const int64_t at = row * a.d + c;
    const float dy = to_f32(a.grad_y[at]);
    if (a.grad_x != nullptr) a.grad_x[at] = from_f32<T>(gamma_clipped * dy);
    if (a.grad_gamma != nullptr && gamma_passes) sum_gamma = fmaf(dy, to_f32(a.x[at]), sum_gamma);
    if (a.grad_beta != nullptr && beta_passes) sum_beta += dy;
  }
  flush();
}

void check_film_sizes(int64_t rows, int64_t d, int64_t groups) {
  if (rows < 1) throw ArgumentError("rows", "must be at least 1, got " + std::to_string(rows));
  if (d < 1) throw ArgumentError("d", "must be at least 1, got " + std::to_string(d));
  if (groups < 1 || rows % groups != 0) {
    throw ArgumentError("groups", "must be at least 1 and divide rows=" + std::to_string(rows) + ", got " +
                                      std::to_string(groups));
  }
}

void require(const void* p, const char* name) {
  if (p == nullptr) throw ArgumentError(name, "must not be null");
}

}  // namespace

void film_forward(const FilmForwardParams& p, int* nonfinite_flag, void* stream) {
  check_film_sizes(p.rows, p.d, p.groups);
  require(p.x, "x");
  require(p.gamma, "gamma");
  require(p.beta, "beta");
  require(p.y, "y");
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const FilmForwardArgs<T> a{p.rows, p.d, p.rows / p.groups, p.gamma_lo, p.gamma_hi, p.beta_bound,
                               static_cast<const T*>(p.x), static_cast<const T*>(p.gamma),
                               static_cast<const T*>(p.beta), static_cast<T*>(p.y), nonfinite_flag};
    const bool vec = aligned16(p.x) && aligned16(p.gamma) && aligned16(p.beta) && aligned16(p.y) &&
                     (p.d * sizeof(T)) % 16 == 0;
    const int64_t blocks = std::min<int64_t>(ceil_div(p.rows, kRowsPerBlock), int64_t{sm_count()} * 16);
    const dim3 block(kWarpSize, kRowsPerBlock);
    if (vec) {
      film_forward_kernel<T, true><<<static_cast<unsigned>(blocks), block, 0, s>>>(a);
    } else {
      film_forward_kernel<T, false><<<static_cast<unsigned>(blocks), block, 0, s>>>(a);
    }
    check_launch("film_forward");
  });
}

void film_backward(const FilmBackwardParams& p, void* stream) {
  check_film_sizes(p.rows, p.d, p.groups);
  require(p.x, "x");
  require(p.gamma, "gamma");
  require(p.beta, "beta");
  require(p.grad_y, "grad_y");
  if (p.grad_x == nullptr && p.grad_gamma == nullptr && p.grad_beta == nullptr) return;
  const auto s = static_cast<cudaStream_t>(stream);
  const size_t param_bytes = static_cast<size_t>(p.groups * p.d) * sizeof(float);
  if (p.grad_gamma != nullptr) check_cuda(cudaMemsetAsync(p.grad_gamma, 0, param_bytes, s), "zeroing grad_gamma");
  if (p.grad_beta != nullptr) check_cuda(cudaMemsetAsync(p.grad_beta, 0, param_bytes, s), "zeroing grad_beta");
  const int64_t column_blocks = ceil_div(p.d, kBackwardThreads);
  if (column_blocks > 0x7FFFFFFF) throw ArgumentError("d", "too large for the CUDA kernel");
  // About eight CTAs per SM; a chunk never spans more rows than needed.
  const int64_t chunks = std::clamp<int64_t>(ceil_div(int64_t{sm_count()} * 8, column_blocks), 1,
                                             std::min<int64_t>(p.rows, 65535));
  const int64_t rows_per_chunk = ceil_div(p.rows, chunks);
  const dim3 grid(static_cast<unsigned>(column_blocks), static_cast<unsigned>(ceil_div(p.rows, rows_per_chunk)));
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const FilmBackwardArgs<T> a{p.rows, p.d, p.rows / p.groups, rows_per_chunk, p.gamma_lo, p.gamma_hi, p.beta_bound,
                                static_cast<const T*>(p.x), static_cast<const T*>(p.gamma),
                                static_cast<const T*>(p.beta), static_cast<const T*>(p.grad_y),
                                static_cast<T*>(p.grad_x), p.grad_gamma, p.grad_beta};
    film_backward_kernel<T><<<grid, kBackwardThreads, 0, s>>>(a);
    check_launch("film_backward");
  });
}

}  // namespace bem::cuda
