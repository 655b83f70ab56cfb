// Kronecker-factored delta without materialising A ⊗ B:
//   y[t] = scale · (A ⊗ B) x[t]  ⇔  Y_t = scale · A X_t Bᵀ,
// X_t = x[t] viewed row-major as (i1, i2), Y_t = y[t] viewed row-major as (o1, o2); the same
// convention as torch.kron(A, B) @ x[t].
#pragma once
#include <cstdint>

#include "bem/common.h"

namespace bem {

struct KronForwardParams {
  int64_t tokens = 0;             // T ≥ 1
  int64_t o1 = 0, i1 = 0;         // A: (o1, i1)
  int64_t o2 = 0, i2 = 0;         // B: (o2, i2); d_out = o1·o2, d_in = i1·i2
  DType dtype = DType::F32;       // of x, A, B, y
  float scale = 1.0f;
  const void* x = nullptr;        // (T, i1·i2) contiguous
  const void* A = nullptr;        // (o1, i1) contiguous
  const void* B = nullptr;        // (o2, i2) contiguous
  void* y = nullptr;              // (T, o1·o2), row stride ld_y elements
  int64_t ld_y = 0;               // ≥ o1·o2
  bool accumulate = false;        // y += delta
};

struct KronBackwardParams {
  int64_t tokens = 0, o1 = 0, i1 = 0, o2 = 0, i2 = 0;
  DType dtype = DType::F32;
  float scale = 1.0f;
  const void* x = nullptr;        // (T, i1·i2)
  const void* A = nullptr;        // (o1, i1)
  const void* B = nullptr;        // (o2, i2)
  const void* grad_y = nullptr;   // (T, o1·o2) contiguous
  void* grad_x = nullptr;         // (T, i1·i2) dtype, or null
  float* grad_A = nullptr;        // (o1, i1) fp32, or null
  float* grad_B = nullptr;        // (o2, i2) fp32, or null
};

// Returns true when every written value of y is finite.
bool kron_forward_cpu(const KronForwardParams& p);
void kron_backward_cpu(const KronBackwardParams& p);

// Largest singular value of a (rows, cols) fp32 matrix by power iteration on MᵀM, to relative
// tolerance `tol` or `max_iter` iterations.
double spectral_norm_cpu(const float* m, int64_t rows, int64_t cols, double tol, int max_iter);

}  // namespace bem
