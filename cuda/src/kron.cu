// CUDA kernels of the Kronecker-factored delta (bem/kron.h): per token Y = scale·A·X·Bᵀ, with X and
// Y the token's row viewed as (i1, i2) and (o1, o2) matrices, as two small GEMMs in shared memory
// (A ⊗ B is never formed). CTAs stage A and B once and loop over tokens; the backward keeps its
// CTA's share of grad_A, grad_B in shared memory and adds it to the outputs once at the end.
#include <algorithm>
#include <cstdint>
#include <string>

#include "bem/cuda_ops.h"
#include "common.cuh"

namespace bem::cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;

// Row stride of a staged matrix with n columns: odd, so that walking down a column touches a
// different shared-memory bank on every row.
__host__ __device__ inline int odd_stride(int n) { return n | 1; }

// For every (m, n) in [0, M)×[0, N): out(m, n, Σ_k L[m·lm + k·lk] · R[k·rk + n·rn]). Consecutive
// threads take consecutive n, so L entries are broadcasts and R rows (rn = 1) are conflict-free.
template <typename Out>
__device__ __forceinline__ void block_gemm(int M, int N, int K, const float* L, int lm, int lk, const float* R,
                                           int rk, int rn, Out out) {
  for (int idx = threadIdx.x; idx < M * N; idx += blockDim.x) {
    const int m = idx / N, n = idx - (idx / N) * N;
    const float* lrow = L + m * lm;
    const float* rcol = R + n * rn;
    float acc = 0.0f;
    for (int k = 0; k < K; ++k) acc = fmaf(lrow[k * lk], rcol[k * rk], acc);
    out(m, n, acc);
  }
}

// dst[r·ld + c] = src[r·cols + c] (or dst[c·ld + r] when transposed), converted to fp32.
template <typename T>
__device__ __forceinline__ void stage(const T* src, int rows, int cols, float* dst, int ld, bool transposed) {
  for (int idx = threadIdx.x; idx < rows * cols; idx += blockDim.x) {
    const int r = idx / cols, c = idx - (idx / cols) * cols;
    dst[transposed ? c * ld + r : r * ld + c] = to_f32(src[idx]);
  }
}

struct KronShape {
  int o1, i1, o2, i2;
};

template <typename T>
struct KronForwardArgs {
  int64_t tokens;
  KronShape s;
  float scale;
  const T* x;
  const T* A;
  const T* B;
  T* y;
  int64_t ld_y;
  bool accumulate;
  int* nonfinite;
};

// Shared memory (floats): A (o1, i1) | Bᵀ (i2, o2) | X (i1, i2) | Z = X·Bᵀ (i1, o2), odd strides.
inline size_t forward_smem_floats(const KronShape& s) {
  return static_cast<size_t>(s.o1) * odd_stride(s.i1) + static_cast<size_t>(s.i2) * odd_stride(s.o2) +
         static_cast<size_t>(s.i1) * odd_stride(s.i2) + static_cast<size_t>(s.i1) * odd_stride(s.o2);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) kron_forward_kernel(const KronForwardArgs<T> a) {
  extern __shared__ float s_mem[];
  const KronShape s = a.s;
  const int lda = odd_stride(s.i1), ldbt = odd_stride(s.o2), ldx = odd_stride(s.i2), ldz = odd_stride(s.o2);
  float* As = s_mem;
  float* Bt = As + s.o1 * lda;
  float* Xs = Bt + s.i2 * ldbt;
  float* Zs = Xs + s.i1 * ldx;
  stage(a.A, s.o1, s.i1, As, lda, false);
  stage(a.B, s.o2, s.i2, Bt, ldbt, true);
  const int64_t d_in = static_cast<int64_t>(s.i1) * s.i2;
  bool finite = true;
  for (int64_t t = blockIdx.x; t < a.tokens; t += gridDim.x) {
    __syncthreads();  // weights staged; the previous token is done with Xs and Zs
    stage(a.x + t * d_in, s.i1, s.i2, Xs, ldx, false);
    __syncthreads();
    // Z[a][q] = Σ_b X[a][b] · B[q][b]
    block_gemm(s.i1, s.o2, s.i2, Xs, ldx, 1, Bt, ldbt, 1, [&](int m, int n, float v) { Zs[m * ldz + n] = v; });
    __syncthreads();
    // Y[p][q] = scale · Σ_a A[p][a] · Z[a][q], stored at y[t][p·o2 + q]
    T* yrow = a.y + t * a.ld_y;
    block_gemm(s.o1, s.o2, s.i1, As, lda, 1, Zs, ldz, 1, [&](int m, int n, float v) {
      T* out = yrow + m * s.o2 + n;
      float value = a.scale * v;
      if (a.accumulate) value += to_f32(*out);
      finite = store_scalar(out, value) && finite;
    });
  }
  raise_flag(a.nonfinite, finite);
}

template <typename T>
struct KronBackwardArgs {
  int64_t tokens;
  KronShape s;
  float scale;
  const T* x;
  const T* A;
  const T* B;
  const T* grad_y;
  T* grad_x;       // or null
  float* grad_A;   // zeroed, or null
  float* grad_B;   // zeroed, or null
};

// Shared memory (floats): A (o1, i1) | B (o2, i2) | G (o1, o2) | X (i1, i2) | W (o1, i2) |
// dA (o1, i1) | dB (o2, i2), odd strides (X, dA, dB are reserved even when unused).
inline size_t backward_smem_floats(const KronShape& s) {
  return static_cast<size_t>(s.o1) * odd_stride(s.i1) * 2 + static_cast<size_t>(s.o2) * odd_stride(s.i2) * 2 +
         static_cast<size_t>(s.o1) * odd_stride(s.o2) + static_cast<size_t>(s.i1) * odd_stride(s.i2) +
         static_cast<size_t>(s.o1) * odd_stride(s.i2);
}

// With G = grad_y[t] as (o1, o2): W = G·B, grad_x[t] = scale·Aᵀ·W, grad_A += scale·W·Xᵀ,
// V = A·X, grad_B += scale·Gᵀ·V.
template <typename T>
__global__ void __launch_bounds__(kThreads) kron_backward_kernel(const KronBackwardArgs<T> a) {
  extern __shared__ float s_mem[];
  const KronShape s = a.s;
  const int lda = odd_stride(s.i1), ldb = odd_stride(s.i2), ldg = odd_stride(s.o2), ldx = odd_stride(s.i2),
            ldw = odd_stride(s.i2);
  float* As = s_mem;
  float* Bs = As + s.o1 * lda;
  float* Gs = Bs + s.o2 * ldb;
  float* Xs = Gs + s.o1 * ldg;
  float* Ws = Xs + s.i1 * ldx;
  float* dAs = Ws + s.o1 * ldw;
  float* dBs = dAs + s.o1 * lda;
  const bool need_w = a.grad_x != nullptr || a.grad_A != nullptr;
  const bool need_x = a.grad_A != nullptr || a.grad_B != nullptr;
  stage(a.A, s.o1, s.i1, As, lda, false);
  stage(a.B, s.o2, s.i2, Bs, ldb, false);
  for (int idx = threadIdx.x; idx < s.o1 * lda; idx += blockDim.x) dAs[idx] = 0.0f;
  for (int idx = threadIdx.x; idx < s.o2 * ldb; idx += blockDim.x) dBs[idx] = 0.0f;
  const int64_t d_in = static_cast<int64_t>(s.i1) * s.i2, d_out = static_cast<int64_t>(s.o1) * s.o2;
  for (int64_t t = blockIdx.x; t < a.tokens; t += gridDim.x) {
    __syncthreads();  // staging done; the previous token is done with G, X and W
    stage(a.grad_y + t * d_out, s.o1, s.o2, Gs, ldg, false);
    if (need_x) stage(a.x + t * d_in, s.i1, s.i2, Xs, ldx, false);
    __syncthreads();
    if (need_w) {
      // W[p][b] = Σ_q G[p][q] · B[q][b]
      block_gemm(s.o1, s.i2, s.o2, Gs, ldg, 1, Bs, ldb, 1, [&](int m, int n, float v) { Ws[m * ldw + n] = v; });
      __syncthreads();
      if (a.grad_x != nullptr) {  // grad_x[t][a·i2 + b] = scale · Σ_p A[p][a] · W[p][b]
        T* gx = a.grad_x + t * d_in;
        block_gemm(s.i1, s.i2, s.o1, As, 1, lda, Ws, ldw, 1,
                   [&](int m, int n, float v) { gx[m * s.i2 + n] = from_f32<T>(a.scale * v); });
      }
      if (a.grad_A != nullptr) {  // dA[p][a] += Σ_b W[p][b] · X[a][b]
        block_gemm(s.o1, s.i1, s.i2, Ws, ldw, 1, Xs, 1, ldx, [&](int m, int n, float v) { dAs[m * lda + n] += v; });
      }
      __syncthreads();
    }
    if (a.grad_B != nullptr) {
      // V[p][b] = Σ_a A[p][a] · X[a][b], kept in W's place
      block_gemm(s.o1, s.i2, s.i1, As, lda, 1, Xs, ldx, 1, [&](int m, int n, float v) { Ws[m * ldw + n] = v; });
      __syncthreads();
      // dB[q][b] += Σ_p G[p][q] · V[p][b]
      block_gemm(s.o2, s.i2, s.o1, Gs, 1, ldg, Ws, ldw, 1, [&](int m, int n, float v) { dBs[m * ldb + n] += v; });
    }
  }
  __syncthreads();
  if (a.grad_A != nullptr) {
    for (int idx = threadIdx.x; idx < s.o1 * s.i1; idx += blockDim.x) {
      const int p = idx / s.i1, q = idx - (idx / s.i1) * s.i1;
      atomicAdd(a.grad_A + idx, a.scale * dAs[p * lda + q]);
    }
  }
  if (a.grad_B != nullptr) {
    for (int idx = threadIdx.x; idx < s.o2 * s.i2; idx += blockDim.x) {
      const int q = idx / s.i2, b = idx - (idx / s.i2) * s.i2;
      atomicAdd(a.grad_B + idx, a.scale * dBs[q * ldb + b]);
    }
  }
}

KronShape check_kron_sizes(int64_t tokens, int64_t o1, int64_t i1, int64_t o2, int64_t i2) {
  if (tokens < 1) throw ArgumentError("tokens", "must be at least 1, got " + std::to_string(tokens));
  auto dim = [](int64_t v, const char* name) {
    if (v < 1 || v > (1 << 20)) {
      throw ArgumentError(name, "must be in [1, 2^20], got " + std::to_string(v));
    }
    return static_cast<int>(v);
  };
  const KronShape shape{dim(o1, "o1"), dim(i1, "i1"), dim(o2, "o2"), dim(i2, "i2")};
  if (o1 * o2 > 0x7FFFFFFF || i1 * i2 > 0x7FFFFFFF) {
    throw ArgumentError("o1", "o1*o2 and i1*i2 must stay below 2^31 for the CUDA kernels");
  }
  return shape;
}

void require(const void* p, const char* name) {
  if (p == nullptr) throw ArgumentError(name, "must not be null");
}

}  // namespace

void kron_forward(const KronForwardParams& p, int* nonfinite_flag, void* stream) {
  const KronShape shape = check_kron_sizes(p.tokens, p.o1, p.i1, p.o2, p.i2);
  require(p.x, "x");
  require(p.A, "A");
  require(p.B, "B");
  require(p.y, "y");
  if (p.ld_y < p.o1 * p.o2) throw ArgumentError("ld_y", "must be at least o1*o2");
  const auto s = static_cast<cudaStream_t>(stream);
  const size_t smem = forward_smem_floats(shape) * sizeof(float);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(p.tokens, int64_t{sm_count()} * 4));
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const KronForwardArgs<T> a{p.tokens, shape, p.scale, static_cast<const T*>(p.x), static_cast<const T*>(p.A),
                               static_cast<const T*>(p.B), static_cast<T*>(p.y), p.ld_y, p.accumulate,
                               nonfinite_flag};
    allow_dynamic_smem(kron_forward_kernel<T>, smem, "kron_forward", "the factors and one token's X and X·B^T");
    kron_forward_kernel<T><<<blocks, kThreads, smem, s>>>(a);
    check_launch("kron_forward");
  });
}

void kron_backward(const KronBackwardParams& p, void* stream) {
  const KronShape shape = check_kron_sizes(p.tokens, p.o1, p.i1, p.o2, p.i2);
  require(p.x, "x");
  require(p.A, "A");
  require(p.B, "B");
  require(p.grad_y, "grad_y");
  if (p.grad_x == nullptr && p.grad_A == nullptr && p.grad_B == nullptr) return;
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.grad_A != nullptr) {
    check_cuda(cudaMemsetAsync(p.grad_A, 0, static_cast<size_t>(p.o1 * p.i1) * sizeof(float), s), "zeroing grad_A");
  }
  if (p.grad_B != nullptr) {
    check_cuda(cudaMemsetAsync(p.grad_B, 0, static_cast<size_t>(p.o2 * p.i2) * sizeof(float), s), "zeroing grad_B");
  }
  const size_t smem = backward_smem_floats(shape) * sizeof(float);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(p.tokens, int64_t{sm_count()} * 2));
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const KronBackwardArgs<T> a{p.tokens, shape, p.scale, static_cast<const T*>(p.x), static_cast<const T*>(p.A),
                                static_cast<const T*>(p.B), static_cast<const T*>(p.grad_y),
                                static_cast<T*>(p.grad_x), p.grad_A, p.grad_B};
    allow_dynamic_smem(kron_backward_kernel<T>, smem, "kron_backward", "the factors, one token's X, G, G·B and the "
                                                                       "factor gradients");
    kron_backward_kernel<T><<<blocks, kThreads, smem, s>>>(a);
    check_launch("kron_backward");
  });
}

}  // namespace bem::cuda
