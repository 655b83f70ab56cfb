// CUDA kernels of the masked multi-expert LoRA delta (bem/lora.h). Forward: a shrink kernel puts
// h = A[e_t][i_tj]·x[t] into an fp32 (T, k) buffer, an expand kernel adds scale·gate·h·B[e_t][:, i_tj]
// into y. Backward: the same shrink on grad_y·B gives v (and the gate gradient), then one kernel
// makes grad_x and grad_A, another grad_B. Every kernel cuts the tokens into small tiles and finds the
// runs of equal expert inside a tile on the device (no host metadata, no synchronisation, so CUDA
// graphs can capture it). Design and expected bandwidth: docs/kernels-cuda.md.
#include <algorithm>
#include <cstdint>
#include <string>

#include "bem/cuda_ops.h"
#include "common.cuh"

namespace bem::cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kShrinkTile = 8;  // tokens per shrink CTA
constexpr int kGroupMax = 4;    // tokens per shrink task: they share one pass over the weight rows
constexpr int kCols = 16;       // rank components per shrink task
constexpr int kTile = 16;       // tokens per expand / backward CTA (bit i of a mask is token t0 + i)
constexpr int kSliceSmall = 64;   // output columns per expand / backward CTA: few tokens
constexpr int kSliceLarge = 256;  // many tokens: fewer CTAs, each building its rank tables once

// How a shrink task chooses its (at most kCols) rank components, starting at component `cs` of:
enum ColumnMode : int {
  kSharedRow = 0,   // the rank_index row that every token of the group shares (u = k; h[t][j] = H[j])
  kAllRanks = 1,    // rank_index is null: components 0..r-1 (u = r = k; h[t][j] = H[j])
  kAllRanked = 2,   // rows differ and k ≥ r/2: all r components (u = r; h[t][j] = H[i_tj])
};

// ---- shrink: out[t][j] = weight component i_tj of expert e_t · src[t] ------------------------------

template <typename T>
struct ShrinkArgs {
  int64_t tokens, active, rank;
  int64_t reduce;               // length of the reduced dimension: d_in (x·Aᵀ) or d_out (grad_y·B)
  const T* src;                 // (T, reduce), row stride ld_src: x or grad_y
  int64_t ld_src;
  const T* weight;              // A (E, r, d_in) or B (E, d_out, r)
  const int64_t* expert_index;  // null: expert 0
  const int64_t* rank_index;    // null: 0..r-1
  float* out;                   // (T, k) fp32
  float* grad_gate;             // grad_y·B pass only, may be null: scale·h·v
  const float* shrink;          // h (T, k) when grad_gate is set
  float scale;
};

// One warp's part of an x·Aᵀ task: acc[tt][s] += Σ_c src[tok0+tt][c] · A[e][col_s][c] over its slice
// of c, with col_s = row[cs+s] (row given) or cs+s. Lanes stride over 16-byte chunks of c.
template <typename T, bool kVec, int TG>
__device__ __forceinline__ void shrink_rows(const ShrinkArgs<T>& a, int64_t tok0, int tokens, int expert,
                                            const int* row, int cs, int count, int part, int parts, int lane,
                                            float (&acc)[TG][kCols]) {
  constexpr int V = kVecWidth<T>;
  const int64_t K = a.reduce;
  const int64_t nvec = (K + V - 1) / V;
  const int64_t vbegin = nvec * part / parts, vend = nvec * (part + 1) / parts;
  const T* wrow[kCols];
#pragma unroll
  for (int s = 0; s < kCols; ++s) {
    const int col = s < count ? (row != nullptr ? row[cs + s] : cs + s) : 0;
    wrow[s] = a.weight + (static_cast<int64_t>(expert) * a.rank + col) * K;
  }
  for (int64_t v = vbegin + lane; v < vend; v += kWarpSize) {
    const int64_t c = v * V;
    const int valid = static_cast<int>(K - c < V ? K - c : V);
    float xv[TG][V];
#pragma unroll
    for (int tt = 0; tt < TG; ++tt) {
      if (tt < tokens) {
        load_chunk<T, kVec>(a.src + (tok0 + tt) * a.ld_src + c, valid, xv[tt]);
      } else {
#pragma unroll
        for (int q = 0; q < V; ++q) xv[tt][q] = 0.0f;
      }
    }
#pragma unroll
    for (int s = 0; s < kCols; ++s) {
      if (s >= count) continue;
      float wv[V];
      load_chunk<T, kVec>(wrow[s] + c, valid, wv);
#pragma unroll
      for (int tt = 0; tt < TG; ++tt) {
        if (tt >= tokens) continue;
#pragma unroll
        for (int q = 0; q < V; ++q) acc[tt][s] = fmaf(xv[tt][q], wv[q], acc[tt][s]);
      }
    }
  }
}

// One warp's part of a grad_y·B task: acc[tt][s] += Σ_o src[tok0+tt][o] · B[e][o][col_s] over its
// slice of o. Lanes take consecutive o, so grad_y loads and B rows are both coalesced.
template <typename T, bool kVec, int TG>
__device__ __forceinline__ void shrink_columns(const ShrinkArgs<T>& a, int64_t tok0, int tokens, int expert,
                                               const int* row, int cs, int count, int part, int parts,
                                               int lane, float (&acc)[TG][kCols]) {
  constexpr int V = kVecWidth<T>;
  const int64_t K = a.reduce;
  const int64_t obegin = K * part / parts, oend = K * (part + 1) / parts;
  const T* wbase = a.weight + static_cast<int64_t>(expert) * K * a.rank;
  for (int64_t o = obegin + lane; o < oend; o += kWarpSize) {
    float dv[TG];
#pragma unroll
    for (int tt = 0; tt < TG; ++tt) dv[tt] = tt < tokens ? to_f32(a.src[(tok0 + tt) * a.ld_src + o]) : 0.0f;
    const T* brow = wbase + o * a.rank;
    float wv[kCols];
    if (kVec && row == nullptr) {  // contiguous components; count is a multiple of V here
#pragma unroll
      for (int q = 0; q < kCols; q += V) {
        if (q < count) {
          load_vec16(brow + cs + q, wv + q);
        } else {
#pragma unroll
          for (int i = 0; i < V; ++i) wv[q + i] = 0.0f;
        }
      }
    } else {
#pragma unroll
      for (int s = 0; s < kCols; ++s) {
        wv[s] = s < count ? to_f32(brow[row != nullptr ? row[cs + s] : cs + s]) : 0.0f;
      }
    }
#pragma unroll
    for (int s = 0; s < kCols; ++s) {
      if (s >= count) continue;
#pragma unroll
      for (int tt = 0; tt < TG; ++tt) {
        if (tt < tokens) acc[tt][s] = fmaf(dv[tt], wv[s], acc[tt][s]);
      }
    }
  }
}

// Computes one task part and leaves its warp-reduced (tokens, count) results in slot[tt*kCols + s].
template <typename T, bool kReduceB, bool kVec, int TG>
__device__ __forceinline__ void shrink_task(const ShrinkArgs<T>& a, int64_t tok0, int tokens, int expert,
                                            const int* row, int cs, int count, int part, int parts, int lane,
                                            float* slot) {
  float acc[TG][kCols];
#pragma unroll
  for (int tt = 0; tt < TG; ++tt) {
#pragma unroll
    for (int s = 0; s < kCols; ++s) acc[tt][s] = 0.0f;
  }
  if constexpr (kReduceB) {
    shrink_columns<T, kVec, TG>(a, tok0, tokens, expert, row, cs, count, part, parts, lane, acc);
  } else {
    shrink_rows<T, kVec, TG>(a, tok0, tokens, expert, row, cs, count, part, parts, lane, acc);
  }
#pragma unroll
  for (int tt = 0; tt < TG; ++tt) {
#pragma unroll
    for (int s = 0; s < kCols; ++s) {
      if (tt >= tokens || s >= count) continue;  // uniform across the warp
      const float total = warp_sum(acc[tt][s]);
      if (lane == ((tt * kCols + s) & (kWarpSize - 1))) slot[tt * kCols + s] = total;
    }
  }
}

__device__ __forceinline__ bool same_row(const int* a, const int* b, int k) {
  for (int j = 0; j < k; ++j) {
    if (a[j] != b[j]) return false;
  }
  return true;
}

// Grid (ceil(T / kShrinkTile), ys). A CTA groups its tile's tokens (consecutive, same expert, at most
// kGroupMax), splits each group's rank components into tasks of kCols, takes every ys-th task and
// spreads its tasks over the warps, several warps per task (a split of the reduced dimension, summed
// in a fixed order so results do not depend on scheduling) when it has fewer tasks than warps.
template <typename T, bool kReduceB, bool kVec>
__global__ void __launch_bounds__(kThreads) lora_shrink_kernel(const ShrinkArgs<T> a) {
  extern __shared__ int s_rows[];  // (nt, k) rank_index rows of the tile when rank_index is given
  __shared__ int s_expert[kShrinkTile];
  __shared__ int s_gstart[kShrinkTile], s_glen[kShrinkTile], s_gmode[kShrinkTile];
  __shared__ int s_gtask[kShrinkTile + 1];  // first task of each group; [ngroups] = number of tasks
  __shared__ int s_ngroups;
  __shared__ float s_part[kWarps][kGroupMax * kCols];

  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int k = static_cast<int>(a.active), r = static_cast<int>(a.rank);
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kShrinkTile;
  const int nt = static_cast<int>(a.tokens - t0 < kShrinkTile ? a.tokens - t0 : kShrinkTile);

  if (tid < kShrinkTile) {
    s_expert[tid] = tid < nt ? (a.expert_index != nullptr ? static_cast<int>(a.expert_index[t0 + tid]) : 0) : -1;
  }
  if (a.rank_index != nullptr) {
    for (int idx = tid; idx < nt * k; idx += kThreads) s_rows[idx] = static_cast<int>(a.rank_index[t0 * k + idx]);
  }
  __syncthreads();

  if (blockIdx.y == 0) {  // tokens without an adapter: zero rank-space values and gate gradients
    for (int idx = tid; idx < nt * k; idx += kThreads) {
      if (s_expert[idx / k] >= 0) continue;
      a.out[t0 * k + idx] = 0.0f;
      if (kReduceB && a.grad_gate != nullptr) a.grad_gate[t0 * k + idx] = 0.0f;
    }
  }
  if (tid == 0) {
    int ngroups = 0, tasks = 0;
    for (int i = 0; i < nt;) {
      const int e = s_expert[i];
      if (e < 0) {
        ++i;
        continue;
      }
      int len = 1;
      int mode = a.rank_index != nullptr ? kSharedRow : kAllRanks;
      while (len < kGroupMax && i + len < nt && s_expert[i + len] == e) {
        if (mode == kSharedRow && !same_row(s_rows + i * k, s_rows + (i + len) * k, k)) {
          if (r > 2 * k) break;  // few of the r components in use: per-token groups read less
          mode = kAllRanked;
        }
        ++len;
      }
      s_gstart[ngroups] = i;
      s_glen[ngroups] = len;
      s_gmode[ngroups] = mode;
      s_gtask[ngroups] = tasks;
      tasks += ((mode == kSharedRow ? k : r) + kCols - 1) / kCols;
      ++ngroups;
      i += len;
    }
    s_gtask[ngroups] = tasks;
    s_ngroups = ngroups;
  }
  __syncthreads();

  const int ntasks = s_gtask[s_ngroups];
  const int y = static_cast<int>(blockIdx.y), ys = static_cast<int>(gridDim.y);
  const int mine = ntasks > y ? (ntasks - y + ys - 1) / ys : 0;
  if (mine == 0) return;  // the same for every thread of the CTA
  const int parts = mine >= kWarps ? 1 : kWarps / mine;  // parts > 1 only when mine·parts ≤ kWarps
  const int items = mine * parts;
  for (int base = 0; base < items; base += kWarps) {
    const int item = base + warp;
    const bool busy = item < items;
    int g = 0, cs = 0, part = 0;
    if (busy) {
      const int task = y + (item / parts) * ys;
      part = item % parts;
      while (s_gtask[g + 1] <= task) ++g;
      cs = (task - s_gtask[g]) * kCols;
      const int mode = s_gmode[g];
      const int count = min(kCols, (mode == kSharedRow ? k : r) - cs);
      const int* row = mode == kSharedRow ? s_rows + s_gstart[g] * k : nullptr;
      const int64_t tok0 = t0 + s_gstart[g];
      const int expert = s_expert[s_gstart[g]];
      if (s_glen[g] == 1) {
        shrink_task<T, kReduceB, kVec, 1>(a, tok0, 1, expert, row, cs, count, part, parts, lane, s_part[warp]);
      } else {
        shrink_task<T, kReduceB, kVec, kGroupMax>(a, tok0, s_glen[g], expert, row, cs, count, part, parts, lane,
                                                  s_part[warp]);
      }
    }
    __syncthreads();
    if (busy && part == 0) {  // this warp owns the task: sum its parts (slots warp..warp+parts-1)
      const int gs = s_gstart[g], mode = s_gmode[g];
      for (int tt = 0; tt < s_glen[g]; ++tt) {
        const int64_t t = t0 + gs + tt;
        for (int j = lane; j < k; j += kWarpSize) {
          const int pos = mode == kAllRanked ? s_rows[(gs + tt) * k + j] : j;
          if (pos < cs || pos >= cs + kCols) continue;
          float total = 0.0f;
          for (int p = 0; p < parts; ++p) total += s_part[warp + p][tt * kCols + (pos - cs)];
          a.out[t * k + j] = total;
          if (kReduceB && a.grad_gate != nullptr) a.grad_gate[t * k + j] = a.scale * a.shrink[t * k + j] * total;
        }
      }
    }
    __syncthreads();
  }
}

// ---- tile tables shared by the expand and backward kernels ----------------------------------------

// Dynamic shared memory of a kTile-token CTA: coef (r, kTile) floats, then sel (r) masks.
inline size_t tile_table_bytes(int64_t rank) {
  return static_cast<size_t>(rank) * (kTile * sizeof(float) + sizeof(unsigned));
}

// Loads the tile's experts (−1: no adapter, −2: past the last token) and fills, for every token i
// with an adapter and every j < k, coef[c·kTile + i] = scale · gate[t0+i][j] · val[t0+i][j] and bit i
// of sel[c], c = i_{t0+i, j}. Ends with __syncthreads().
__device__ void load_tile_tables(int64_t active, int64_t rank, const int64_t* expert_index,
                                 const int64_t* rank_index, const float* gate, const float* val, float scale,
                                 int64_t t0, int nt, int* s_expert, float* coef, unsigned* sel) {
  const int tid = threadIdx.x;
  const int k = static_cast<int>(active), r = static_cast<int>(rank);
  if (tid < kTile) {
    s_expert[tid] = tid < nt ? (expert_index != nullptr ? static_cast<int>(expert_index[t0 + tid]) : 0) : -2;
  }
  for (int idx = tid; idx < r * kTile; idx += blockDim.x) coef[idx] = 0.0f;
  for (int idx = tid; idx < r; idx += blockDim.x) sel[idx] = 0u;
  __syncthreads();
  for (int idx = tid; idx < nt * k; idx += blockDim.x) {
    const int i = idx / k;
    if (s_expert[i] < 0) continue;
    const int64_t at = t0 * k + idx;
    const int c = rank_index != nullptr ? static_cast<int>(rank_index[at]) : idx - i * k;
    const float g = gate != nullptr ? gate[at] : 1.0f;
    atomicAdd(coef + c * kTile + i, scale * g * val[at]);  // an add, so a duplicate index would sum
    atomicOr(sel + c, 1u << i);
  }
  __syncthreads();
}

// Splits the tile into runs of equal expert: mask bit i = token t0 + i. Thread 0 only.
__device__ __forceinline__ int tile_runs(const int* s_expert, int nt, int* run_expert, unsigned* run_mask) {
  int runs = 0;
  for (int i = 0; i < nt;) {
    const int e = s_expert[i];
    unsigned m = 0;
    while (i < nt && s_expert[i] == e) m |= 1u << i++;
    run_expert[runs] = e;
    run_mask[runs] = m;
    ++runs;
  }
  return runs;
}

// ---- expand: y[t] (+)= Σ_c coef[c][t] · B[e_t][:, c] ---------------------------------------------

template <typename T>
struct ExpandArgs {
  int64_t tokens, d_out, active, rank;
  const T* B;
  const int64_t* expert_index;
  const int64_t* rank_index;
  const float* gate;
  const float* shrink;  // h (T, k)
  float scale;
  T* y;
  int64_t ld_y;
  bool accumulate;
  int* nonfinite;
};

// Grid (ceil(T / kTile), ceil(d_out / slice)). Work items are (group, output o): a group is the
// tokens of one aligned quad of the tile that share an expert, so one B row read serves up to four
// tokens and their four coefficients are one float4. Each thread reads the whole row B[e][o][:]
// (contiguous: 16-byte loads when kVec) and uses the components some token of the group selected.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) lora_expand_kernel(const ExpandArgs<T> a, int slice) {
  extern __shared__ float4 s_dyn[];
  float* coef = reinterpret_cast<float*>(s_dyn);
  unsigned* sel = reinterpret_cast<unsigned*>(coef + a.rank * kTile);
  __shared__ int s_expert[kTile];
  __shared__ int s_gquad[kTile], s_gexpert[kTile];
  __shared__ unsigned s_gmask[kTile];
  __shared__ int s_ngroups;

  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int nt = static_cast<int>(a.tokens - t0 < kTile ? a.tokens - t0 : kTile);
  load_tile_tables(a.active, a.rank, a.expert_index, a.rank_index, a.gate, a.shrink, a.scale, t0, nt,
                   s_expert, coef, sel);
  if (threadIdx.x == 0) {
    int ng = 0;
    for (int q = 0; q < kTile / 4; ++q) {
      for (int i = 4 * q; i < 4 * q + 4 && i < nt;) {
        const int e = s_expert[i];
        unsigned m = 0;
        while (i < 4 * q + 4 && i < nt && s_expert[i] == e) m |= 1u << (i++ - 4 * q);
        s_gquad[ng] = q;
        s_gmask[ng] = m;
        s_gexpert[ng] = e;
        ++ng;
      }
    }
    s_ngroups = ng;
  }
  __syncthreads();

  constexpr int V = kVecWidth<T>;
  const int r = static_cast<int>(a.rank);
  const float4* coef4 = reinterpret_cast<const float4*>(coef);
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * slice;
  for (int it = threadIdx.x; it < s_ngroups * slice; it += kThreads) {
    const int g = it / slice;
    const int64_t o = o0 + it % slice;
    if (o >= a.d_out) continue;
    const int q = s_gquad[g], e = s_gexpert[g];
    const unsigned m = s_gmask[g];
    if (e < 0 && a.accumulate) continue;  // no adapter: y keeps its value
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    auto add = [&](int c, float b) {
      const unsigned sm = (sel[c] >> (4 * q)) & m;
      if (sm == 0u) return;
      const float4 cf = coef4[c * (kTile / 4) + q];
      if (sm & 1u) acc[0] = fmaf(cf.x, b, acc[0]);
      if (sm & 2u) acc[1] = fmaf(cf.y, b, acc[1]);
      if (sm & 4u) acc[2] = fmaf(cf.z, b, acc[2]);
      if (sm & 8u) acc[3] = fmaf(cf.w, b, acc[3]);
    };
    if (e >= 0) {
      const T* brow = a.B + (static_cast<int64_t>(e) * a.d_out + o) * a.rank;
      if constexpr (kVec) {
        for (int c0 = 0; c0 < r; c0 += V) {
          float b[V];
          load_vec16(brow + c0, b);
#pragma unroll
          for (int i = 0; i < V; ++i) add(c0 + i, b[i]);
        }
      } else {
        for (int c = 0; c < r; ++c) {
          if ((sel[c] >> (4 * q)) & m) add(c, to_f32(brow[c]));
        }
      }
    }
    bool finite = true;
#pragma unroll
    for (int tt = 0; tt < 4; ++tt) {
      if (!((m >> tt) & 1u)) continue;
      T* yp = a.y + (t0 + 4 * q + tt) * a.ld_y + o;
      float v = acc[tt];
      if (a.accumulate) v += to_f32(*yp);
      finite = store_scalar(yp, v) && finite;
    }
    raise_flag(a.nonfinite, finite);
  }
}

// ---- backward: grad_x, grad_A (from v) and grad_B (from h) -----------------------------------------

template <typename T>
struct BackwardArgs {
  int64_t tokens, d_in, d_out, active, rank;
  const T* x;       // (T, d_in)
  const T* A;       // (E, r, d_in)
  const T* grad_y;  // (T, d_out)
  const int64_t* expert_index;
  const int64_t* rank_index;
  const float* gate;
  const float* val;  // v = grad_y·B (input kernel) or h (grad_B kernel), (T, k)
  float scale;
  T* grad_x;         // (T, d_in) or null
  float* grad_A;     // (E, r, d_in) zeroed, or null
  float* grad_B;     // (E, d_out, r) zeroed, or null
};

__device__ __forceinline__ void load_coef16(const float* coef, int c, float (&cf)[kTile]) {
  const float4* row = reinterpret_cast<const float4*>(coef + c * kTile);
#pragma unroll
  for (int q = 0; q < kTile / 4; ++q) {
    const float4 v = row[q];
    cf[4 * q] = v.x;
    cf[4 * q + 1] = v.y;
    cf[4 * q + 2] = v.z;
    cf[4 * q + 3] = v.w;
  }
}

// Grid (ceil(T / kTile), ceil(d_in / slice)); items (run, column c). With u_tc = scale·g·v:
//   grad_x[t][c] = Σ_c' u_tc' A[e][c'][c]  and  grad_A[e][c'][c] += Σ_{t in run} u_tc' x[t][c],
// the latter summed over the run's tokens before one atomic add.
template <typename T>
__global__ void __launch_bounds__(kThreads) lora_backward_input_kernel(const BackwardArgs<T> a, int slice) {
  extern __shared__ float4 s_dyn[];
  float* coef = reinterpret_cast<float*>(s_dyn);
  unsigned* sel = reinterpret_cast<unsigned*>(coef + a.rank * kTile);
  __shared__ int s_expert[kTile];
  __shared__ int s_rexpert[kTile];
  __shared__ unsigned s_rmask[kTile];
  __shared__ int s_nruns;

  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int nt = static_cast<int>(a.tokens - t0 < kTile ? a.tokens - t0 : kTile);
  load_tile_tables(a.active, a.rank, a.expert_index, a.rank_index, a.gate, a.val, a.scale, t0, nt,
                   s_expert, coef, sel);
  if (threadIdx.x == 0) s_nruns = tile_runs(s_expert, nt, s_rexpert, s_rmask);
  __syncthreads();

  const int r = static_cast<int>(a.rank);
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * slice;
  for (int it = threadIdx.x; it < s_nruns * slice; it += kThreads) {
    const int run = it / slice;
    const int64_t c = c0 + it % slice;
    if (c >= a.d_in) continue;
    const int e = s_rexpert[run];
    const unsigned m = s_rmask[run];
    if (e < 0) {
      if (a.grad_x != nullptr) {
#pragma unroll
        for (int tt = 0; tt < kTile; ++tt) {
          if ((m >> tt) & 1u) a.grad_x[(t0 + tt) * a.d_in + c] = from_f32<T>(0.0f);
        }
      }
      continue;
    }
    float xr[kTile], gx[kTile];
#pragma unroll
    for (int tt = 0; tt < kTile; ++tt) {
      gx[tt] = 0.0f;
      xr[tt] = (a.grad_A != nullptr && ((m >> tt) & 1u)) ? to_f32(a.x[(t0 + tt) * a.d_in + c]) : 0.0f;
    }
    for (int s = 0; s < r; ++s) {
      const unsigned sm = sel[s] & m;
      if (sm == 0u) continue;
      float cf[kTile];
      load_coef16(coef, s, cf);
      const int64_t at = (static_cast<int64_t>(e) * a.rank + s) * a.d_in + c;
      if (a.grad_x != nullptr) {
        const float av = to_f32(a.A[at]);
#pragma unroll
        for (int tt = 0; tt < kTile; ++tt) {
          if ((sm >> tt) & 1u) gx[tt] = fmaf(cf[tt], av, gx[tt]);
        }
      }
      if (a.grad_A != nullptr) {
        float sum = 0.0f;
#pragma unroll
        for (int tt = 0; tt < kTile; ++tt) {
          if ((sm >> tt) & 1u) sum = fmaf(cf[tt], xr[tt], sum);
        }
        atomicAdd(a.grad_A + at, sum);
      }
    }
    if (a.grad_x != nullptr) {
#pragma unroll
      for (int tt = 0; tt < kTile; ++tt) {
        if ((m >> tt) & 1u) a.grad_x[(t0 + tt) * a.d_in + c] = from_f32<T>(gx[tt]);
      }
    }
  }
}

// Grid (ceil(T / kTile), ceil(d_out / slice)); items (run, output o). With w_tc = scale·g·h:
//   grad_B[e][o][c] += Σ_{t in run} w_tc grad_y[t][o], one atomic add per (run, o, c).
template <typename T>
__global__ void __launch_bounds__(kThreads) lora_backward_b_kernel(const BackwardArgs<T> a, int slice) {
  extern __shared__ float4 s_dyn[];
  float* coef = reinterpret_cast<float*>(s_dyn);
  unsigned* sel = reinterpret_cast<unsigned*>(coef + a.rank * kTile);
  __shared__ int s_expert[kTile];
  __shared__ int s_rexpert[kTile];
  __shared__ unsigned s_rmask[kTile];
  __shared__ int s_nruns;

  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int nt = static_cast<int>(a.tokens - t0 < kTile ? a.tokens - t0 : kTile);
  load_tile_tables(a.active, a.rank, a.expert_index, a.rank_index, a.gate, a.val, a.scale, t0, nt,
                   s_expert, coef, sel);
  if (threadIdx.x == 0) s_nruns = tile_runs(s_expert, nt, s_rexpert, s_rmask);
  __syncthreads();

  const int r = static_cast<int>(a.rank);
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * slice;
  for (int it = threadIdx.x; it < s_nruns * slice; it += kThreads) {
    const int run = it / slice;
    const int64_t o = o0 + it % slice;
    if (o >= a.d_out) continue;
    const int e = s_rexpert[run];
    if (e < 0) continue;
    const unsigned m = s_rmask[run];
    float dv[kTile];
#pragma unroll
    for (int tt = 0; tt < kTile; ++tt) dv[tt] = ((m >> tt) & 1u) ? to_f32(a.grad_y[(t0 + tt) * a.d_out + o]) : 0.0f;
    float* gb = a.grad_B + (static_cast<int64_t>(e) * a.d_out + o) * a.rank;
    for (int s = 0; s < r; ++s) {
      const unsigned sm = sel[s] & m;
      if (sm == 0u) continue;
      float cf[kTile];
      load_coef16(coef, s, cf);
      float sum = 0.0f;
#pragma unroll
      for (int tt = 0; tt < kTile; ++tt) {
        if ((sm >> tt) & 1u) sum = fmaf(cf[tt], dv[tt], sum);
      }
      atomicAdd(gb + s, sum);
    }
  }
}

// ---- host side -------------------------------------------------------------------------------------

void check_sizes(int64_t tokens, int64_t d_in, int64_t d_out, int64_t rank, int64_t active, int64_t experts,
                 bool has_rank_index) {
  auto positive = [](int64_t v, const char* name) {
    if (v < 1) throw ArgumentError(name, "must be at least 1, got " + std::to_string(v));
  };
  positive(tokens, "tokens");
  positive(d_in, "d_in");
  positive(d_out, "d_out");
  positive(rank, "rank");
  positive(experts, "experts");
  if (active < 1 || active > rank) {
    throw ArgumentError("active", "must be in [1, rank=" + std::to_string(rank) + "], got " + std::to_string(active));
  }
  if (!has_rank_index && active != rank) {
    throw ArgumentError("active", "must equal rank (" + std::to_string(rank) + ") when rank_index is null, got " +
                                      std::to_string(active));
  }
  if (rank > (1 << 24) || experts > (int64_t{1} << 30)) {
    throw ArgumentError("rank", "rank or expert count too large for the CUDA kernels");
  }
  // Column slices are the y dimension of the grid.
  if (ceil_div(d_out, kSliceSmall) > 65535) throw ArgumentError("d_out", "too large for the CUDA kernels");
  if (ceil_div(d_in, kSliceSmall) > 65535) throw ArgumentError("d_in", "too large for the CUDA kernels");
}

void require(const void* p, const char* name) {
  if (p == nullptr) throw ArgumentError(name, "must not be null");
}

template <typename T, bool kReduceB>
void launch_shrink(const ShrinkArgs<T>& a, bool vec, cudaStream_t stream) {
  const int64_t tiles = ceil_div(a.tokens, kShrinkTile);
  // Several CTAs per tile only when tiles alone leave SMs idle (CTAs of one tile share nothing, and
  // the warps of one CTA often read the same weight rows); beyond one task per CTA nothing is gained.
  const int64_t max_tasks = std::min<int64_t>(int64_t{kShrinkTile} * ceil_div(a.rank, kCols), 65535);
  const int64_t ys = std::clamp<int64_t>(sm_count() / tiles, 1, max_tasks);
  const size_t smem = a.rank_index != nullptr ? static_cast<size_t>(kShrinkTile) * a.active * sizeof(int) : 0;
  const char* name = kReduceB ? "lora_shrink(grad_y*B)" : "lora_shrink(x*A^T)";
  auto kernel = vec ? lora_shrink_kernel<T, kReduceB, true> : lora_shrink_kernel<T, kReduceB, false>;
  allow_dynamic_smem(kernel, smem, name, "rank_index rows of 8 tokens");
  kernel<<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(ys)), kThreads, smem, stream>>>(a);
  check_launch(name);
}

// Gets a kernel's dynamic shared memory ready for the rank tables and launches it on a grid of
// (token tiles, column slices); wide slices once there are enough CTAs to fill the device twice.
template <typename K, typename Args>
void launch_tile_kernel(K* kernel, const char* name, int64_t tokens, int64_t columns, int64_t rank, const Args& a,
                        cudaStream_t stream) {
  const size_t smem = tile_table_bytes(rank);
  allow_dynamic_smem(kernel, smem, name, "rank tables, 68 bytes per rank component");
  const int64_t tiles = ceil_div(tokens, kTile);
  const int slice = tiles * ceil_div(columns, kSliceLarge) >= 2 * int64_t{sm_count()} ? kSliceLarge : kSliceSmall;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(ceil_div(columns, slice)));
  kernel<<<grid, kThreads, smem, stream>>>(a, slice);
  check_launch(name);
}

}  // namespace

void lora_forward(const LoraForwardParams& p, int* nonfinite_flag, void* stream) {
  check_sizes(p.tokens, p.d_in, p.d_out, p.rank, p.active, p.experts, p.rank_index != nullptr);
  require(p.x, "x");
  require(p.A, "A");
  require(p.B, "B");
  require(p.y, "y");
  if (p.ld_x < p.d_in) throw ArgumentError("ld_x", "must be at least d_in");
  if (p.ld_y < p.d_out) throw ArgumentError("ld_y", "must be at least d_out");
  const auto s = static_cast<cudaStream_t>(stream);
  Workspace workspace(p.shrink_out != nullptr ? 0 : static_cast<size_t>(p.tokens * p.active) * sizeof(float), s);
  float* h = p.shrink_out != nullptr ? p.shrink_out : workspace.floats();
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const ShrinkArgs<T> sa{p.tokens, p.active, p.rank, p.d_in, static_cast<const T*>(p.x), p.ld_x,
                           static_cast<const T*>(p.A), p.expert_index, p.rank_index, h, nullptr, nullptr, p.scale};
    const bool vec_rows = aligned16(p.x) && aligned16(p.A) && (p.ld_x * sizeof(T)) % 16 == 0 &&
                          (p.d_in * sizeof(T)) % 16 == 0;
    launch_shrink<T, false>(sa, vec_rows, s);
    const ExpandArgs<T> ea{p.tokens, p.d_out, p.active, p.rank, static_cast<const T*>(p.B), p.expert_index,
                           p.rank_index, p.rank_gate, h, p.scale, static_cast<T*>(p.y), p.ld_y, p.accumulate,
                           nonfinite_flag};
    const bool vec_b = aligned16(p.B) && (p.rank * sizeof(T)) % 16 == 0;
    if (vec_b) {
      launch_tile_kernel(lora_expand_kernel<T, true>, "lora_expand", p.tokens, p.d_out, p.rank, ea, s);
    } else {
      launch_tile_kernel(lora_expand_kernel<T, false>, "lora_expand", p.tokens, p.d_out, p.rank, ea, s);
    }
  });
}

void lora_backward(const LoraBackwardParams& p, void* stream) {
  check_sizes(p.tokens, p.d_in, p.d_out, p.rank, p.active, p.experts, p.rank_index != nullptr);
  require(p.x, "x");
  require(p.A, "A");
  require(p.B, "B");
  require(p.grad_y, "grad_y");
  const bool need_v = p.grad_x != nullptr || p.grad_A != nullptr || p.grad_gate != nullptr;
  const bool need_h = p.grad_B != nullptr || p.grad_gate != nullptr;
  const bool recompute_h = need_h && p.shrink == nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  const int64_t tk = p.tokens * p.active;
  Workspace workspace(static_cast<size_t>(tk) * ((need_v ? 1 : 0) + (recompute_h ? 1 : 0)) * sizeof(float), s);
  float* v = need_v ? workspace.floats() : nullptr;
  float* h_recomputed = recompute_h ? workspace.floats() + (need_v ? tk : 0) : nullptr;
  const float* h = recompute_h ? h_recomputed : p.shrink;
  // Gradients of the weights are sums over tokens, accumulated with atomics into zeroed buffers.
  if (p.grad_A != nullptr) {
    check_cuda(cudaMemsetAsync(p.grad_A, 0, static_cast<size_t>(p.experts * p.rank * p.d_in) * sizeof(float), s),
               "zeroing grad_A");
  }
  if (p.grad_B != nullptr) {
    check_cuda(cudaMemsetAsync(p.grad_B, 0, static_cast<size_t>(p.experts * p.d_out * p.rank) * sizeof(float), s),
               "zeroing grad_B");
  }
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (recompute_h) {
      const ShrinkArgs<T> sa{p.tokens, p.active, p.rank, p.d_in, static_cast<const T*>(p.x), p.d_in,
                             static_cast<const T*>(p.A), p.expert_index, p.rank_index, h_recomputed,
                             nullptr, nullptr, p.scale};
      const bool vec_rows = aligned16(p.x) && aligned16(p.A) && (p.d_in * sizeof(T)) % 16 == 0;
      launch_shrink<T, false>(sa, vec_rows, s);
    }
    if (need_v) {
      const ShrinkArgs<T> sb{p.tokens, p.active, p.rank, p.d_out, static_cast<const T*>(p.grad_y), p.d_out,
                             static_cast<const T*>(p.B), p.expert_index, p.rank_index, v, p.grad_gate, h, p.scale};
      const bool vec_b = aligned16(p.B) && (p.rank * sizeof(T)) % 16 == 0;
      launch_shrink<T, true>(sb, vec_b, s);
    }
    BackwardArgs<T> ba{p.tokens, p.d_in, p.d_out, p.active, p.rank, static_cast<const T*>(p.x),
                       static_cast<const T*>(p.A), static_cast<const T*>(p.grad_y), p.expert_index, p.rank_index,
                       p.rank_gate, v, p.scale, static_cast<T*>(p.grad_x), p.grad_A, nullptr};
    if (p.grad_x != nullptr || p.grad_A != nullptr) {
      launch_tile_kernel(lora_backward_input_kernel<T>, "lora_backward_input", p.tokens, p.d_in, p.rank, ba, s);
    }
    if (p.grad_B != nullptr) {
      ba.val = h;
      ba.grad_x = nullptr;
      ba.grad_A = nullptr;
      ba.grad_B = p.grad_B;
      launch_tile_kernel(lora_backward_b_kernel<T>, "lora_backward_b", p.tokens, p.d_out, p.rank, ba, s);
    }
  });
}

}  // namespace bem::cuda
