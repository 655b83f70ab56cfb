// Masked multi-expert LoRA (SGMV-style shrink → expand) on the CPU.
//   delta[t] = scale · Σ_{j<k} gate[t,j] · B[e_t][:, i_tj] · (A[e_t][i_tj, :] · x[t])
// with e_t = expert_index[t] (−1: no adapter, delta[t] = 0) and i_tj = rank_index[t, j].
// Tokens come in runs of equal expert (64-token routing chunks); kernels work run by run and only
// the k selected rank components are computed (work ∝ k, not r).
#pragma once
#include <cstdint>

#include "bem/common.h"

namespace bem {

// All pointers are to contiguous row-major buffers unless a leading dimension is given.
// Floating buffers x, A, B, y, grad_y, grad_x share `dtype`; gates and fp32 buffers are float.
struct LoraForwardParams {
  int64_t tokens = 0;    // T ≥ 1
  int64_t d_in = 0;      // columns of x and of each A[e]
  int64_t d_out = 0;     // columns of y, rows of each B[e]
  int64_t rank = 0;      // r: rows of A[e], columns of B[e]
  int64_t active = 0;    // k: rank components used per token; == rank when rank_index is null
  int64_t experts = 0;   // E ≥ 1
  DType dtype = DType::F32;
  float scale = 1.0f;

  const void* x = nullptr;              // (T, d_in), row stride ld_x elements
  int64_t ld_x = 0;                     // ≥ d_in
  const void* A = nullptr;              // (E, r, d_in)
  const void* B = nullptr;              // (E, d_out, r)
  const int64_t* expert_index = nullptr;  // (T,) in [−1, E); null: every token uses expert 0
  const int64_t* rank_index = nullptr;    // (T, k) in [0, r), no duplicates in a row; null: 0..r−1
  const float* rank_gate = nullptr;       // (T, k); null: all ones

  void* y = nullptr;                    // (T, d_out), row stride ld_y elements
  int64_t ld_y = 0;                     // ≥ d_out
  bool accumulate = false;              // y += delta instead of y = delta (rows with e_t = −1
                                        // are left untouched when accumulating, zeroed otherwise)
  float* shrink_out = nullptr;          // optional (T, k) fp32: A[e_t][i_tj]·x[t] (unscaled,
                                        // ungated), saved for the backward; 0 where e_t = −1
};

struct LoraBackwardParams {
  int64_t tokens = 0, d_in = 0, d_out = 0, rank = 0, active = 0, experts = 0;
  DType dtype = DType::F32;
  float scale = 1.0f;

  const void* x = nullptr;                // (T, d_in) contiguous
  const void* A = nullptr;                // (E, r, d_in)
  const void* B = nullptr;                // (E, d_out, r)
  const int64_t* expert_index = nullptr;  // as in the forward
  const int64_t* rank_index = nullptr;
  const float* rank_gate = nullptr;
  const float* shrink = nullptr;          // (T, k) saved shrink_out of the forward; null: recompute
  const void* grad_y = nullptr;           // (T, d_out) contiguous

  // Outputs; a null pointer skips that gradient. Every element of a requested output is written
  // (experts and rank rows no token used get zeros).
  void* grad_x = nullptr;                 // (T, d_in), dtype
  float* grad_A = nullptr;                // (E, r, d_in) fp32
  float* grad_B = nullptr;                // (E, d_out, r) fp32
  float* grad_gate = nullptr;             // (T, k) fp32
};

// Throws ArgumentError (index_error=true) naming "expert_index" or "rank_index" when an index is
// out of range, and ArgumentError naming "rank_index" for a duplicate within a row. Checked before
// anything is written, so a failed call leaves y untouched.
void validate_lora_indices(int64_t tokens, int64_t experts, int64_t rank, int64_t active,
                           const int64_t* expert_index, const int64_t* rank_index);

// Returns true when every written value of y is finite (a cheap by-product of the store loop).
bool lora_forward_cpu(const LoraForwardParams& p);
void lora_backward_cpu(const LoraBackwardParams& p);

}  // namespace bem
