// Bounded FiLM: y = clip(γ, γ_lo, γ_hi) · x + clip(β, −β_b, β_b), elementwise over (rows, d), with
// γ and β given per group of consecutive rows (per token: groups = rows; per sequence: one group
// per sequence; global: one group).
#pragma once
#include <cstdint>

#include "bem/common.h"

namespace bem {

struct FilmForwardParams {
  int64_t rows = 0;             // ≥ 1
  int64_t d = 0;                // ≥ 1
  int64_t groups = 0;           // divides rows; γ/β row g applies to rows [g·rows/groups, (g+1)·rows/groups)
  DType dtype = DType::F32;     // of x, gamma, beta, y
  float gamma_lo = 0.5f, gamma_hi = 2.0f;  // may be ∓inf (no clipping)
  float beta_bound = 0.5f;                 // may be +inf
  const void* x = nullptr;      // (rows, d) contiguous
  const void* gamma = nullptr;  // (groups, d) contiguous
  const void* beta = nullptr;   // (groups, d) contiguous
  void* y = nullptr;            // (rows, d) contiguous; may alias x
};

struct FilmBackwardParams {
  int64_t rows = 0, d = 0, groups = 0;
  DType dtype = DType::F32;
  float gamma_lo = 0.5f, gamma_hi = 2.0f, beta_bound = 0.5f;
  const void* x = nullptr;       // (rows, d)
  const void* gamma = nullptr;   // (groups, d)
  const void* beta = nullptr;    // (groups, d)
  const void* grad_y = nullptr;  // (rows, d)
  void* grad_x = nullptr;        // (rows, d) dtype, or null
  float* grad_gamma = nullptr;   // (groups, d) fp32, or null: Σ over the group's rows of dy·x where
                                 // γ_lo ≤ γ ≤ γ_hi, else 0 (torch.clamp's convention at the bounds)
  float* grad_beta = nullptr;    // (groups, d) fp32, or null: likewise with |β| ≤ β_b
};

// Returns true when every written value of y is finite.
bool film_forward_cpu(const FilmForwardParams& p);
void film_backward_cpu(const FilmBackwardParams& p);

}  // namespace bem
