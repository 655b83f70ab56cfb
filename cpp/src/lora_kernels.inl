// Masked multi-expert LoRA work items (shrink, expand, backward pieces) for one instruction set.
// No include guard: lora_cpu.cpp includes this once per set, inside that set's target region and
// namespace, after gemm_kernels.inl. Shared types (LoraArgs, Run, LoraKernels, segment_end,
// tls_buffer) come from lora_cpu.cpp.

// ---- shrink: S[t, j] = A[e][idx_tj, :] · x[t] ------------------------------------------------------
// Dot-product tiles of MT tokens × MR rank rows: MT + MR vector loads feed MT·MR FMAs, and each
// row of A is read once per MT tokens. A one-token tile (decode) takes more rows per pass over x.
constexpr int kShrinkMT = W >= 16 ? 4 : (W >= 8 ? 3 : 2);
constexpr int kShrinkMR = 4;
constexpr int kShrinkMR1 = W >= 8 ? 8 : 4;

// MT tokens × MR rank rows over d columns. With MT > 1 the x rows come interleaved (xi: for every
// W columns, the MT rows' W values one after the other, zero-padded to a whole vector): token rows
// of x lie d_in apart (16 KB for d_in = 4096) and as separate streams they would all fall into the
// same L1 sets as the rows of A.
template <class T, int MT, int MR>
void shrink_tile(const T* const* xr, const float* xi, const T* const* ar, int64_t d, float* out) {
  F acc[MT][MR];
  for (int m = 0; m < MT; ++m)
    for (int q = 0; q < MR; ++q) acc[m][q] = V::zero();
  int64_t c = 0;
  for (; c + W <= d; c += W) {
    F xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = MT > 1 ? V::load(xi + c * MT + m * W) : V::load(xr[m] + c);
    for (int q = 0; q < MR; ++q) {
      const F av = V::load(ar[q] + c);
      for (int m = 0; m < MT; ++m) acc[m][q] = V::fmadd(xv[m], av, acc[m][q]);
    }
  }
  if (c < d) {
    const int lanes = static_cast<int>(d - c);
    F xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = MT > 1 ? V::load(xi + c * MT + m * W) : V::loadn(xr[m] + c, lanes);
    for (int q = 0; q < MR; ++q) {
      const F av = V::loadn(ar[q] + c, lanes);
      for (int m = 0; m < MT; ++m) acc[m][q] = V::fmadd(xv[m], av, acc[m][q]);
    }
  }
  constexpr int N = MT * MR;
  constexpr int NPAD = (N + W - 1) / W * W;
  float lanes_out[NPAD];
  for (int g = 0; g < N; g += W) {
    F grp[W];
    for (int w = 0; w < W; ++w) grp[w] = g + w < N ? acc[(g + w) / MR][(g + w) % MR] : V::zero();
    V::store(lanes_out + g, V::reduce_lanes(grp));
  }
  for (int i = 0; i < N; ++i) out[i] = lanes_out[i];
}

// Columns [c0, c0 + kc) of the dot products of nt tokens with the rank rows [j0, j1): written to S
// for the first column block, added to it for the others.
template <class T, int MT>
void shrink_block(int nt, const T* const* xr, const T* A_e, int64_t d_in, int64_t c0, int64_t kc,
                  const int64_t* ranks, int64_t j0, int64_t j1, float* S, int64_t k) {
  if constexpr (MT > 1) {
    if (nt < MT) {
      shrink_block<T, MT - 1>(nt, xr, A_e, d_in, c0, kc, ranks, j0, j1, S, k);
      return;
    }
  }
  constexpr int MR = MT == 1 ? kShrinkMR1 : kShrinkMR;
  const T* xo[MT];
  for (int m = 0; m < MT; ++m) xo[m] = xr[m] + c0;
  thread_local std::vector<float> xi_buf;
  float* xi = nullptr;
  if constexpr (MT > 1) {
    const int64_t nvec = (kc + W - 1) / W;
    xi = tls_buffer(xi_buf, nvec * MT * W);
    for (int64_t v = 0; v < nvec; ++v) {
      const int lanes = static_cast<int>(std::min<int64_t>(W, kc - v * W));
      for (int m = 0; m < MT; ++m) {
        V::store(xi + (v * MT + m) * W, lanes == W ? V::load(xo[m] + v * W) : V::loadn(xo[m] + v * W, lanes));
      }
    }
  }
  float out[MT * MR];
  for (int64_t j = j0; j < j1; j += MR) {
    const int nr = static_cast<int>(std::min<int64_t>(MR, j1 - j));
    const T* ar[MR];
    for (int q = 0; q < MR; ++q) ar[q] = A_e + ranks[j + std::min(q, nr - 1)] * d_in + c0;
    shrink_tile<T, MT, MR>(xo, xi, ar, kc, out);
    for (int m = 0; m < MT; ++m) {
      for (int q = 0; q < nr; ++q) {
        float& s = S[m * k + j + q];
        s = c0 == 0 ? out[m * MR + q] : s + out[m * MR + q];
      }
    }
  }
}

// Long segments with k ≥ W take the broadcast form instead: the selected rows of A are transposed
// once per segment and 4 KB column block into At (kc, nj), and S = X·At is a register-blocked GEMM
// (one contiguous stream of At, no horizontal sums).
constexpr int kShrinkGemmMT = W >= 16 ? 6 : kGemmMT;
constexpr int kShrinkGemmNV = W >= 16 ? 4 : kGemmNV;

template <class T>
void shrink_gemm(const LoraArgs& a, const T* A_e, const int64_t* ranks, int64_t t, int64_t n, int64_t c0,
                 int64_t kc, int64_t j0, int64_t j1) {
  thread_local std::vector<float> at_buf;
  const int64_t nj = j1 - j0;
  float* At = tls_buffer(at_buf, kc * nj);
  for (int64_t jb = j0; jb < j1; jb += W) {
    const int nr = static_cast<int>(std::min<int64_t>(W, j1 - jb));
    const T* rows[W];
    for (int i = 0; i < W; ++i) rows[i] = A_e + ranks[jb + std::min(i, nr - 1)] * a.d_in;
    for (int64_t cc = 0; cc < kc; cc += W) {
      const int nc = static_cast<int>(std::min<int64_t>(W, kc - cc));
      F v[W];
      load_transposed(rows, nr, c0 + cc, nc, v);
      for (int c = 0; c < nc; ++c) {
        float* out = At + (cc + c) * nj + (jb - j0);
        if (nr == W) {
          V::store(out, v[c]);
        } else {
          V::storen(out, v[c], nr);
        }
      }
    }
  }
  const T* x = static_cast<const T*>(a.x) + t * a.ld_x + c0;
  gemm<T, float, kShrinkGemmMT, kShrinkGemmNV>(n, nj, kc, x, a.ld_x, 1, At, nj, a.S + t * a.k + j0, a.k, c0 > 0);
}

// S rows [t0, t1) of `run`, active slots [j0, j1). d_in is cut into blocks of 4 KB rows so the
// selected rows of A stay in L2 while every token of the run passes over them.
template <class T>
void shrink(const LoraArgs& a, const Run& run, int64_t t0, int64_t t1, int64_t j0, int64_t j1) {
  constexpr int64_t KC = 4096 / sizeof(T);
  const T* x = static_cast<const T*>(a.x);
  const T* A_e = static_cast<const T*>(a.A) + run.e * a.r * a.d_in;
  for (int64_t c0 = 0; c0 < a.d_in; c0 += KC) {
    const int64_t kc = std::min(KC, a.d_in - c0);
    int64_t t = t0;
    while (t < t1) {
      const int64_t* ranks = a.idx + t * a.idx_stride;
      const int64_t s1 = segment_end(a, t, t1);
      if (run.shrink_gemm) {
        shrink_gemm<T>(a, A_e, ranks, t, s1 - t, c0, kc, j0, j1);
      } else {
        for (int64_t tt = t; tt < s1; tt += kShrinkMT) {
          const int nt = static_cast<int>(std::min<int64_t>(kShrinkMT, s1 - tt));
          const T* xr[kShrinkMT];
          for (int m = 0; m < kShrinkMT; ++m) xr[m] = x + (tt + std::min(m, nt - 1)) * a.ld_x;
          shrink_block<T, kShrinkMT>(nt, xr, A_e, a.d_in, c0, kc, ranks, j0, j1, a.S + tt * a.k, a.k);
        }
      }
      t = s1;
    }
  }
}

// ---- expand: y[t, o] (+)= Σ_j coef[t, j] · B[e][o, idx_tj] ----------------------------------------
// coef = scale · gate · S for tokens [t0, t0 + n).
inline void fill_coef(const LoraArgs& a, int64_t t0, int64_t n, float* coef) {
  const int64_t k = a.k;
  for (int64_t i = 0; i < n * k; ++i) {
    const int64_t g = t0 * k + i;
    coef[i] = a.scale * (a.gate ? a.gate[g] : 1.0f) * a.S[g];
  }
}

// Tokens [t0, t0 + n) through `combine`, grouping tokens that share their rank set (one set of
// rows, MT tokens per tile) and batching the rest (one row set per token).
template <class TY, class TR>
bool combine_segments(const LoraArgs& a, int64_t t0, int64_t n, const TR* const* rows, int64_t c0,
                      int64_t c1, const float* coef, TY* const* outs, bool accumulate) {
  const int64_t k = a.k;
  if (a.idx_stride == 0) return combine<TY, TR>(static_cast<int>(n), k, rows, 0, c0, c1, coef, outs, accumulate);
  bool ok = true;
  int64_t t = 0;
  while (t < n) {
    int64_t s1 = segment_end(a, t0 + t, t0 + n) - t0;
    if (s1 - t >= 2) {
      ok &= combine<TY, TR>(static_cast<int>(s1 - t), k, rows + t * k, 0, c0, c1, coef + t * k,
                            outs + t, accumulate);
    } else {
      while (s1 < n && segment_end(a, t0 + s1, t0 + n) - t0 == s1 + 1) ++s1;
      ok &= combine<TY, TR>(static_cast<int>(s1 - t), k, rows + t * k, k, c0, c1, coef + t * k,
                            outs + t, accumulate);
    }
    t = s1;
  }
  return ok;
}

// Lane w = B[w, :] · c for the rows w < nrow of a block (row stride r, rv vectors per row, the last
// one rtail lanes); c is zero-padded to rv·W. RV > 0 fixes rv at compile time (unrolled, c kept in
// registers); FULL fixes nrow = W.
template <class T, int RV, bool FULL>
BEM_INLINE F rowdot_block(const T* block, int64_t r, int nrow, int64_t rv, int rtail, const float* c) {
  constexpr int CV = RV > 0 ? RV : 1;
  F cv[CV];
  if constexpr (RV > 0) {
    BEM_UNROLL for (int v = 0; v < RV; ++v) cv[v] = V::load(c + v * W);
  }
  F part[W];
  BEM_UNROLL for (int w = 0; w < W; ++w) {
    if (!FULL && w >= nrow) {
      part[w] = V::zero();
      continue;
    }
    const T* brow = block + w * r;
    F acc = V::zero();
    if constexpr (RV > 0) {
      BEM_UNROLL for (int v = 0; v + 1 < RV; ++v) acc = V::fmadd(V::load(brow + v * W), cv[v], acc);
      const T* last = brow + (RV - 1) * W;
      acc = V::fmadd(rtail == W ? V::load(last) : V::loadn(last, rtail), cv[RV - 1], acc);
    } else {
      for (int64_t v = 0; v + 1 < rv; ++v) acc = V::fmadd(V::load(brow + v * W), V::load(c + v * W), acc);
      const T* last = brow + (rv - 1) * W;
      acc = V::fmadd(rtail == W ? V::load(last) : V::loadn(last, rtail), V::load(c + (rv - 1) * W), acc);
    }
    part[w] = acc;
  }
  return V::reduce_lanes(part);
}

template <class T>
F rowdot_dispatch(const T* block, int64_t r, int nrow, int64_t rv, int rtail, const float* c) {
  if (nrow == W) {
    switch (rv) {
      case 1: return rowdot_block<T, 1, true>(block, r, nrow, rv, rtail, c);
      case 2: return rowdot_block<T, 2, true>(block, r, nrow, rv, rtail, c);
      case 4: return rowdot_block<T, 4, true>(block, r, nrow, rv, rtail, c);
      default: return rowdot_block<T, 0, true>(block, r, nrow, rv, rtail, c);
    }
  }
  return rowdot_block<T, 0, false>(block, r, nrow, rv, rtail, c);
}

// Short runs: each block of W output rows of B (W·r contiguous values) is multiplied by the
// token's zero-padded coefficient vector and reduced across lanes; no packing.
template <class T>
bool expand_rowdot(const LoraArgs& a, const Run& run, int64_t t0, int64_t t1, int64_t o0, int64_t o1) {
  const int64_t n = t1 - t0, k = a.k, r = a.r;
  const int64_t rv = (r + W - 1) / W, rpad = rv * W;
  const int rtail = static_cast<int>(r - (rv - 1) * W);
  thread_local std::vector<float> coef_buf, cfull_buf, cdup_buf;
  float* coef = tls_buffer(coef_buf, n * k);
  float* cfull = tls_buffer(cfull_buf, n * rpad);
  fill_coef(a, t0, n, coef);
  std::fill(cfull, cfull + n * rpad, 0.0f);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t* ranks = a.idx + (t0 + t) * a.idx_stride;
    for (int64_t j = 0; j < k; ++j) cfull[t * rpad + ranks[j]] = coef[t * k + j];
  }
  const T* Be = static_cast<const T*>(a.B) + run.e * a.d_out * r;
  T* y = static_cast<T*>(a.y);
  // r = 4 (or 8 under AVX-512): a block of W rows is r full vectors of W/r rows each, multiplied
  // by the coefficients repeated W/r times and reduced per row.
  const bool small_rows = (V::kReduceRows4 && r == 4) || (V::kReduceRows8 && r == 8);
  float* cdup = tls_buffer(cdup_buf, small_rows ? n * W : 0);
  if (small_rows) {
    for (int64_t t = 0; t < n; ++t)
      for (int i = 0; i < W; ++i) cdup[t * W + i] = cfull[t * rpad + i % r];
  }
  F chk = V::zero();
  for (int64_t ob = o0; ob < o1; ob += W) {
    const int nrow = static_cast<int>(std::min<int64_t>(W, o1 - ob));
    if (small_rows && nrow == W) {
      const T* block = Be + ob * r;
      for (int64_t t = 0; t < n; ++t) {
        const F c = V::load(cdup + t * W);
        F v[8];
        F out;
        if (r == 4) {
          for (int q = 0; q < 4; ++q) v[q] = V::mul(V::load(block + q * W), c);
          out = V::reduce_rows4(v);
        } else {
          for (int q = 0; q < 8; ++q) v[q] = V::mul(V::load(block + q * W), c);
          out = V::reduce_rows8(v);
        }
        store_out(y + (t0 + t) * a.ld_y + ob, out, W, a.accumulate, chk);
      }
      continue;
    }
    for (int64_t t = 0; t < n; ++t) {
      const F out = rowdot_dispatch(Be + ob * r, r, nrow, rv, rtail, cfull + t * rpad);
      store_out(y + (t0 + t) * a.ld_y + ob, out, nrow, a.accumulate, chk);
    }
  }
  return V::all_zero(chk);
}

// Rows [0, nrows) (nrows ≤ W) of a row-major (·, r) block → dst[slot[j]·ld + w] for the columns j
// with slot[j] ≥ 0, W×W tiles transposed in registers.
template <class T>
void pack_transposed(const T* rows, int64_t r, int nrows, const int32_t* slot, float* dst, int64_t ld) {
  const T* ptr[W];
  for (int w = 0; w < W; ++w) ptr[w] = rows + w * r;
  for (int64_t j0 = 0; j0 < r; j0 += W) {
    const int nc = static_cast<int>(std::min<int64_t>(W, r - j0));
    bool any = false;
    for (int c = 0; c < nc; ++c) any |= slot[j0 + c] >= 0;
    if (!any) continue;
    F v[W];
    load_transposed(ptr, nrows, j0, nc, v);
    for (int c = 0; c < nc; ++c) {
      if (slot[j0 + c] < 0) continue;
      float* out = dst + slot[j0 + c] * ld;
      if (nrows == W) {
        V::store(out, v[c]);
      } else {
        V::storen(out, v[c], nrows);
      }
    }
  }
}

// Long runs: the used columns of B[e] are packed transposed (fp32, kPackCols outputs at a time, so
// the panel stays in L2), then every token is a register-blocked rank-k update of its output row.
constexpr int64_t kPackCols = 256;

template <class T>
bool expand_packed(const LoraArgs& a, const Run& run, int64_t t0, int64_t t1, int64_t o0, int64_t o1) {
  const int64_t n = t1 - t0, k = a.k, r = a.r;
  thread_local std::vector<float> coef_buf, pack_buf;
  thread_local std::vector<int32_t> slot_buf;
  thread_local std::vector<int64_t> used_buf;
  thread_local std::vector<const float*> rows_buf;
  thread_local std::vector<T*> outs_buf;
  float* coef = tls_buffer(coef_buf, n * k);
  fill_coef(a, t0, n, coef);
  int32_t* slot = tls_buffer(slot_buf, r);
  int64_t* used = tls_buffer(used_buf, r);
  std::fill(slot, slot + r, -1);
  int64_t n_used = 0;
  for (int64_t t = t0; t < t1 && n_used < r; ++t) {
    const int64_t* ranks = a.idx + t * a.idx_stride;
    for (int64_t j = 0; j < k; ++j) {
      if (slot[ranks[j]] < 0) {
        slot[ranks[j]] = static_cast<int32_t>(n_used);
        used[n_used++] = ranks[j];
      }
    }
    if (a.idx_stride == 0) break;
  }
  float* packed = tls_buffer(pack_buf, n_used * kPackCols);
  const int64_t n_rows = a.idx_stride == 0 ? k : n * k;
  const float** rows = tls_buffer(rows_buf, n_rows);
  for (int64_t i = 0; i < n_rows; ++i) {
    rows[i] = packed + slot[a.idx[t0 * a.idx_stride + i]] * kPackCols;
  }
  T** outs = tls_buffer(outs_buf, n);
  const T* Be = static_cast<const T*>(a.B) + run.e * a.d_out * r;
  T* y = static_cast<T*>(a.y);
  bool ok = true;
  for (int64_t cb = o0; cb < o1; cb += kPackCols) {
    const int64_t nc = std::min<int64_t>(kPackCols, o1 - cb);
    for (int64_t o = 0; o < nc; o += W) {
      pack_transposed(Be + (cb + o) * r, r, static_cast<int>(std::min<int64_t>(W, nc - o)), slot, packed + o, kPackCols);
    }
    for (int64_t t = 0; t < n; ++t) outs[t] = y + (t0 + t) * a.ld_y + cb;
    ok &= combine_segments<T, float>(a, t0, n, rows, 0, nc, coef, outs, a.accumulate);
  }
  return ok;
}

// Row w of a block is addressed as (rows of group w / 4) + (w % 4)·stride, so each broadcast is one
// base register plus one of three loop-invariant offsets: 16 separate row offsets would not fit in
// the general registers, and their spills cost more than the FMAs.
BEM_INLINE void lanes_block(const float* rows, int64_t stride, const int64_t* ranks, int64_t k,
                            const float* coefT, F* acc) {
  constexpr int G = W >= 4 ? W / 4 : 1;  // groups of 4 rows
  constexpr int R = W >= 4 ? 4 : W;      // rows per group
  const int64_t off[4] = {0, stride, 2 * stride, 3 * stride};
  BEM_UNROLL for (int w = 0; w < W; ++w) acc[w] = V::zero();
  for (int64_t j = 0; j < k; ++j) {
    const F c = V::load(coefT + j * W);
    const float* col = rows + ranks[j];
    BEM_UNROLL for (int g = 0; g < G; ++g) {
      const float* base = col + g * 4 * stride;
      BEM_UNROLL for (int i = 0; i < R; ++i) acc[g * R + i] = V::fmadd(V::set1(base[off[i]]), c, acc[g * R + i]);
    }
  }
}

// Runs of a few to a few dozen tokens that share their rank set (a 16-token prefill, a chunk of a
// batch): W tokens go in the lanes of a vector. For a block of W output rows, accumulator w sums
// B[e][o_w, idx_j] · coef[·, j] over j (the row value broadcast from memory, so B needs no packing,
// no horizontal sums are taken, and picking the active ranks costs nothing); one in-register
// transpose then turns the W accumulators into W token rows of y. Every output element sums its k
// terms in j order whatever group or block it falls in. A group of fewer than W tokens leaves lanes
// idle: the cost model counts groups.
template <class T>
bool expand_lanes(const LoraArgs& a, const Run& run, int64_t t0, int64_t t1, int64_t o0, int64_t o1) {
  const int64_t n = t1 - t0, k = a.k, r = a.r;
  thread_local std::vector<float> coef_buf, coef_t_buf, block_buf;
  float* coef = tls_buffer(coef_buf, n * k);
  float* coef_t = tls_buffer(coef_t_buf, k * W);  // (k, W): the group's coefficients, token i in lane i
  float* block = tls_buffer(block_buf, W * r);    // fp32 copy of W rows of B (16-bit B, ragged last block)
  fill_coef(a, t0, n, coef);
  const T* Be = static_cast<const T*>(a.B) + run.e * a.d_out * r;
  T* y = static_cast<T*>(a.y);
  F chk = V::zero();
  for (int64_t s0 = t0; s0 < t1;) {
    const int64_t s1 = segment_end(a, s0, t1);
    const int64_t* ranks = a.idx + s0 * a.idx_stride;
    for (int64_t g0 = s0; g0 < s1; g0 += W) {
      const int ng = static_cast<int>(std::min<int64_t>(W, s1 - g0));
      for (int64_t j = 0; j < k; ++j) {
        for (int i = 0; i < W; ++i) coef_t[j * W + i] = i < ng ? coef[(g0 - t0 + i) * k + j] : 0.0f;
      }
      for (int64_t ob = o0; ob < o1; ob += W) {
        const int nrow = static_cast<int>(std::min<int64_t>(W, o1 - ob));
        const float* rows = nullptr;
        if constexpr (std::is_same_v<T, float>) {
          if (nrow == W) rows = Be + ob * r;  // float32 B, full block: read in place
        }
        if (rows == nullptr) {
          for (int w = 0; w < W; ++w) {  // rows past the last one repeat it; their lanes are not stored
            const T* src = Be + (ob + std::min(w, nrow - 1)) * r;
            for (int64_t c = 0; c < r; c += W) {
              const int m = static_cast<int>(std::min<int64_t>(W, r - c));
              V::storen(block + w * r + c, V::loadn(src + c, m), m);
            }
          }
          rows = block;
        }
        F acc[W];
        lanes_block(rows, r, ranks, k, coef_t, acc);
        V::transpose(acc);
        for (int i = 0; i < ng; ++i) store_out(y + (g0 + i) * a.ld_y + ob, acc[i], nrow, a.accumulate, chk);
      }
    }
    s0 = s1;
  }
  return V::all_zero(chk);
}

template <class T>
bool expand(const LoraArgs& a, const Run& run, int64_t t0, int64_t t1, int64_t o0, int64_t o1) {
  switch (item_form(a, run, t0, t1, W)) {
    case ExpandForm::kPacked: return expand_packed<T>(a, run, t0, t1, o0, o1);
    case ExpandForm::kLanes: return expand_lanes<T>(a, run, t0, t1, o0, o1);
    default: return a.rowdot != nullptr ? a.rowdot(a, run, t0, t1, o0, o1) : expand_rowdot<T>(a, run, t0, t1, o0, o1);
  }
}

// ---- backward pieces --------------------------------------------------------------------------------
// grad_s[t, j] = B[e][:, idx_tj] · dy[t]: the full r-vector dyᵀ·B[e] per token (B rows are
// contiguous in r), then the active slots are picked.
template <class T>
void grad_u(const LoraArgs& a, const Run& run, int64_t t0, int64_t t1) {
  const int64_t nt = t1 - t0, r = a.r, k = a.k;
  thread_local std::vector<float> ufull_buf;
  float* uf = tls_buffer(ufull_buf, nt * r);
  const T* dy = static_cast<const T*>(a.dy);
  const T* Be = static_cast<const T*>(a.B) + run.e * a.d_out * r;
  gemm<T, T, kShrinkGemmMT, kShrinkGemmNV>(nt, r, a.d_out, dy + t0 * a.d_out, a.d_out, 1, Be, r, uf, r, false);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t* ranks = a.idx + t * a.idx_stride;
    for (int64_t j = 0; j < k; ++j) a.grad_s[t * k + j] = uf[(t - t0) * r + ranks[j]];
  }
}

// grad_x[t] = Σ_j grad_s[t, j] · A[e][idx_tj, :] (rows of A are contiguous in d_in: no packing).
template <class T>
void grad_x(const LoraArgs& a, const Run& run, int64_t t0, int64_t t1) {
  const int64_t n = t1 - t0, k = a.k;
  thread_local std::vector<const T*> rows_buf;
  thread_local std::vector<T*> outs_buf;
  const int64_t n_rows = a.idx_stride == 0 ? k : n * k;
  const T** rows = tls_buffer(rows_buf, n_rows);
  T** outs = tls_buffer(outs_buf, n);
  const T* A_e = static_cast<const T*>(a.A) + run.e * a.r * a.d_in;
  for (int64_t i = 0; i < n_rows; ++i) rows[i] = A_e + a.idx[t0 * a.idx_stride + i] * a.d_in;
  T* gx = static_cast<T*>(a.grad_x);
  for (int64_t t = 0; t < n; ++t) outs[t] = gx + (t0 + t) * a.d_in;
  combine_segments<T, T>(a, t0, n, rows, 0, a.d_in, a.grad_s + t0 * k, outs, false);
}

// grad_A[e][:, c0:c1) = Σ over e's tokens of v_full[t]ᵀ · x[t, c0:c1), in token order.
template <class T>
void grad_A(const LoraArgs& a, int64_t e, int64_t c0, int64_t c1) {
  const int64_t r = a.r, d_in = a.d_in;
  float* G = a.grad_A + e * r * d_in;
  for (int64_t i = 0; i < r; ++i) std::fill(G + i * d_in + c0, G + i * d_in + c1, 0.0f);
  const T* x = static_cast<const T*>(a.x);
  for (int64_t q = 0; q < a.n_runs; ++q) {
    const Run& run = a.runs[q];
    if (run.e != e) continue;
    gemm<float, T, kShrinkGemmMT, kShrinkGemmNV>(r, c1 - c0, run.t1 - run.t0, a.v_full + run.t0 * r, 1, r,
                                                 x + run.t0 * d_in + c0, d_in, G + c0, d_in, true);
  }
}

// grad_B[e][o0:o1, :] = Σ over e's tokens of dy[t, o0:o1)ᵀ · w_full[t], in token order.
template <class T>
void grad_B(const LoraArgs& a, int64_t e, int64_t o0, int64_t o1) {
  const int64_t r = a.r, d_out = a.d_out;
  float* G = a.grad_B + e * d_out * r;
  std::fill(G + o0 * r, G + o1 * r, 0.0f);
  const T* dy = static_cast<const T*>(a.dy);
  for (int64_t q = 0; q < a.n_runs; ++q) {
    const Run& run = a.runs[q];
    if (run.e != e) continue;
    gemm<T, float, kShrinkGemmMT, kShrinkGemmNV>(o1 - o0, r, run.t1 - run.t0, dy + run.t0 * d_out + o0, 1, d_out,
                                                 a.w_full + run.t0 * r, r, G + o0 * r, r, true);
  }
}

template <class T>
LoraKernels lora_kernels_for() {
  return LoraKernels{W, &shrink<T>, &expand<T>, &expand_rowdot<T>, &grad_u<T>, &grad_x<T>, &grad_A<T>, &grad_B<T>};
}

inline const LoraKernels& lora_kernels(DType dtype) {
  static const LoraKernels f32 = lora_kernels_for<float>();
  static const LoraKernels b16 = lora_kernels_for<bf16>();
  static const LoraKernels h16 = lora_kernels_for<f16>();
  return dtype == DType::F32 ? f32 : (dtype == DType::BF16 ? b16 : h16);
}
