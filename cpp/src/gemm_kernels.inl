// Register-blocked fp32 micro-kernels shared by the LoRA and Kronecker kernels. No include guard:
// a kernel file includes this once per instruction set, inside that set's target region and
// namespace, after `using V = simd::...;`.
//
//   gemm:    C (M, N) (+)= Aop (M, K) · Bop (K, N) with Aop read by scalar broadcasts through two
//            strides (so a transposed operand costs nothing) and Bop row-major (vector loads).
//   combine: out[t, :] (+)= Σ_j coef[t, j] · rows_t[j][:], the expand of the LoRA kernels.
// Every output element is accumulated in the same order whatever tile it falls in, so results do
// not depend on how work is split across threads.

using F = typename V::F;
constexpr int W = V::W;

// Tile shapes: MT rows broadcast against NV vectors of W columns; MT·NV accumulators plus NV loaded
// vectors and one broadcast fit in the register file (32 zmm, 16 ymm). One-row combine tiles take
// more vectors so that enough independent FMA chains are in flight.
constexpr int kGemmMT = W >= 16 ? 8 : (W >= 8 ? 6 : 2);
constexpr int kGemmNV = W >= 8 ? 2 : 4;
constexpr int kCombineMT = W >= 16 ? 6 : (W >= 8 ? 6 : 2);
constexpr int kCombineNV = W >= 16 ? 4 : (W >= 8 ? 2 : 4);
constexpr int kCombineNV1 = W >= 8 ? 8 : 4;

// The loops over tile rows and vectors below are fully unrolled so the accumulators stay in
// registers; FULL (every vector has W lanes) and the vector index are compile-time, so the masked
// load/store of a ragged last vector costs nothing in full tiles.
#define BEM_UNROLL _Pragma("GCC unroll 32")

template <int NV, bool FULL, class T>
BEM_INLINE F tile_load(const T* p, int v, int last) {
  return (FULL || v < NV - 1) ? V::load(p + v * W) : V::loadn(p + v * W, last);
}

template <int NV, bool FULL, class T>
BEM_INLINE void tile_store(T* p, int v, int last, F x) {
  if (FULL || v < NV - 1) {
    V::store(p + v * W, x);
  } else {
    V::storen(p + v * W, x, last);
  }
}

template <class TA, class TB, int MT, int NV, bool FULL>
void gemm_tile(int64_t K, const TA* a, int64_t sam, int64_t sak, const TB* b, int64_t ldb, int last,
               float* c, int64_t ldc, bool accumulate) {
  F acc[MT][NV];
  if (accumulate) {
    BEM_UNROLL for (int m = 0; m < MT; ++m) {
      BEM_UNROLL for (int v = 0; v < NV; ++v) acc[m][v] = tile_load<NV, FULL>(c + m * ldc, v, last);
    }
  } else {
    BEM_UNROLL for (int m = 0; m < MT; ++m) {
      BEM_UNROLL for (int v = 0; v < NV; ++v) acc[m][v] = V::zero();
    }
  }
  for (int64_t kk = 0; kk < K; ++kk) {
    const TB* brow = b + kk * ldb;
    const TA* acol = a + kk * sak;
    F bv[NV];
    BEM_UNROLL for (int v = 0; v < NV; ++v) bv[v] = tile_load<NV, FULL>(brow, v, last);
    BEM_UNROLL for (int m = 0; m < MT; ++m) {
      const F av = V::set1(to_float(acol[m * sam]));
      BEM_UNROLL for (int v = 0; v < NV; ++v) acc[m][v] = V::fmadd(av, bv[v], acc[m][v]);
    }
  }
  BEM_UNROLL for (int m = 0; m < MT; ++m) {
    BEM_UNROLL for (int v = 0; v < NV; ++v) tile_store<NV, FULL>(c + m * ldc, v, last, acc[m][v]);
  }
}

// Picks the tile for mt (≤ MT) rows and a column block of nvec vectors (the last one `last` lanes).
template <class TA, class TB, int MT, int NV>
void gemm_dispatch(int mt, int nvec, int last, int64_t K, const TA* a, int64_t sam, int64_t sak, const TB* b,
                   int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  if constexpr (MT > 1) {
    if (mt < MT) {
      gemm_dispatch<TA, TB, MT - 1, NV>(mt, nvec, last, K, a, sam, sak, b, ldb, c, ldc, accumulate);
      return;
    }
  }
  if constexpr (NV > 1) {
    if (nvec < NV) {
      gemm_dispatch<TA, TB, MT, NV - 1>(mt, nvec, last, K, a, sam, sak, b, ldb, c, ldc, accumulate);
      return;
    }
  }
  if (last == W) {
    gemm_tile<TA, TB, MT, NV, true>(K, a, sam, sak, b, ldb, last, c, ldc, accumulate);
  } else {
    gemm_tile<TA, TB, MT, NV, false>(K, a, sam, sak, b, ldb, last, c, ldc, accumulate);
  }
}

// C[m, n] (+)= Σ_k a[m·sam + k·sak] · b[k·ldb + n], m < M, n < N, k < K; C row-major (ldc).
// Tiles of MT × NV vectors (the default suits N of a few vectors; the LoRA shrink takes 6 × 4).
// When several row tiles reuse a column panel of Bop whose rows are far apart (e.g. token rows of
// x, 16 KB apart: they all map to the same L1 sets), the panel is first copied to contiguous fp32.
template <class TA, class TB, int MT = kGemmMT, int NV = kGemmNV>
void gemm(int64_t M, int64_t N, int64_t K, const TA* a, int64_t sam, int64_t sak, const TB* b,
          int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  constexpr int NB = NV * W;
  const bool pack = M > MT && K > 1 && ldb > NB && ldb * static_cast<int64_t>(sizeof(TB)) >= 1024;
  thread_local std::vector<float> panel_buf;
  float* panel = pack ? tls_buffer(panel_buf, K * NB) : nullptr;
  for (int64_t n0 = 0; n0 < N; n0 += NB) {
    const int ncols = static_cast<int>(std::min<int64_t>(NB, N - n0));
    const int nvec = (ncols + W - 1) / W;
    const int last = ncols - (nvec - 1) * W;
    if (pack) {
      for (int64_t kk = 0; kk < K; ++kk) {
        const TB* src = b + kk * ldb + n0;
        float* dst = panel + kk * NB;
        for (int v = 0; v < nvec; ++v) {
          const int lanes = v + 1 < nvec ? W : last;
          V::store(dst + v * W, lanes == W ? V::load(src + v * W) : V::loadn(src + v * W, lanes));
        }
      }
    }
    for (int64_t m0 = 0; m0 < M; m0 += MT) {
      const int mt = static_cast<int>(std::min<int64_t>(MT, M - m0));
      if (pack) {
        gemm_dispatch<TA, float, MT, NV>(mt, nvec, last, K, a + m0 * sam, sam, sak, panel, NB, c + m0 * ldc + n0,
                                         ldc, accumulate);
      } else {
        gemm_dispatch<TA, TB, MT, NV>(mt, nvec, last, K, a + m0 * sam, sam, sak, b + n0, ldb, c + m0 * ldc + n0,
                                      ldc, accumulate);
      }
    }
  }
}

// Loads W rows (rows[i], i < nrows; the others read as zero) at columns [col, col + nc), nc ≤ W,
// and transposes them in registers: v[c] holds column col + c of the W rows.
template <class T>
BEM_INLINE void load_transposed(const T* const* rows, int nrows, int64_t col, int nc, F* v) {
  for (int w = 0; w < W; ++w) {
    const T* p = rows[w < nrows ? w : 0] + col;
    v[w] = w >= nrows ? V::zero() : (nc == W ? V::load(p) : V::loadn(p, nc));
  }
  V::transpose(v);
}

// Stores one vector of results at p (lanes valid), adding the old values when accumulating, and
// folds what was written into the finiteness check.
template <class TY>
BEM_INLINE void store_out(TY* p, F v, int lanes, bool accumulate, F& chk) {
  if (lanes == W) {
    if (accumulate) v = V::add(V::load(p), v);
    V::check(chk, V::store(p, v));
  } else {
    if (accumulate) v = V::add(V::loadn(p, lanes), v);
    V::check(chk, V::storen(p, v, lanes));
  }
}

// MT output rows sharing one row set × NV vectors from column `col`:
//   out[m][col + c] (+)= Σ_j coef[m·k + j] · rows[j][col + c].
template <class TY, class TR, int MT, int NV, bool FULL>
void combine_tile(int64_t k, const TR* const* rows, int64_t col, int last, const float* coef,
                  TY* const* out, bool accumulate, F& chk_io) {
  F chk = chk_io;
  F acc[MT][NV];
  BEM_UNROLL for (int m = 0; m < MT; ++m) {
    BEM_UNROLL for (int v = 0; v < NV; ++v) acc[m][v] = V::zero();
  }
  for (int64_t j = 0; j < k; ++j) {
    const TR* r = rows[j] + col;
    F bv[NV];
    BEM_UNROLL for (int v = 0; v < NV; ++v) bv[v] = tile_load<NV, FULL>(r, v, last);
    BEM_UNROLL for (int m = 0; m < MT; ++m) {
      const F cv = V::set1(coef[m * k + j]);
      BEM_UNROLL for (int v = 0; v < NV; ++v) acc[m][v] = V::fmadd(cv, bv[v], acc[m][v]);
    }
  }
  BEM_UNROLL for (int m = 0; m < MT; ++m) {
    BEM_UNROLL for (int v = 0; v < NV; ++v) {
      store_out(out[m] + col + v * W, acc[m][v], (FULL || v < NV - 1) ? W : last, accumulate, chk);
    }
  }
  chk_io = chk;
}

template <class TY, class TR, int MT, int NV>
void combine_dispatch(int mt, int nvec, int last, int64_t k, const TR* const* rows, int64_t col,
                      const float* coef, TY* const* out, bool accumulate, F& chk) {
  if constexpr (MT > 1) {
    if (mt < MT) {
      combine_dispatch<TY, TR, MT - 1, NV>(mt, nvec, last, k, rows, col, coef, out, accumulate, chk);
      return;
    }
  }
  if constexpr (NV > 1) {
    if (nvec < NV) {
      combine_dispatch<TY, TR, MT, NV - 1>(mt, nvec, last, k, rows, col, coef, out, accumulate, chk);
      return;
    }
  }
  if (last == W) {
    combine_tile<TY, TR, MT, NV, true>(k, rows, col, last, coef, out, accumulate, chk);
  } else {
    combine_tile<TY, TR, MT, NV, false>(k, rows, col, last, coef, out, accumulate, chk);
  }
}

// Columns [c0, c1) of nt output rows: out[m][c] (+)= Σ_j coef[m·k + j] · rows[m·rows_stride + j][c].
// rows_stride is 0 when the rows share one row set (MT rows per tile), k when each has its own.
template <class TY, class TR, int MT, int NV>
void combine_rows(int nt, int64_t k, const TR* const* rows, int64_t rows_stride, int64_t c0, int64_t c1,
                  const float* coef, TY* const* out, bool accumulate, F& chk) {
  constexpr int CB = NV * W;
  for (int m0 = 0; m0 < nt; m0 += MT) {
    const int mt = std::min(MT, nt - m0);
    for (int64_t c = c0; c < c1; c += CB) {
      const int ncols = static_cast<int>(std::min<int64_t>(CB, c1 - c));
      const int nvec = (ncols + W - 1) / W;
      combine_dispatch<TY, TR, MT, NV>(mt, nvec, ncols - (nvec - 1) * W, k, rows + m0 * rows_stride, c,
                                       coef + m0 * k, out + m0, accumulate, chk);
    }
  }
}

// Returns false when a written value is not finite.
template <class TY, class TR>
bool combine(int nt, int64_t k, const TR* const* rows, int64_t rows_stride, int64_t c0, int64_t c1,
             const float* coef, TY* const* out, bool accumulate) {
  F chk = V::zero();
  if (rows_stride == 0 && nt > 1) {
    const int full_rows = nt - nt % kCombineMT;
    combine_rows<TY, TR, kCombineMT, kCombineNV>(full_rows, k, rows, 0, c0, c1, coef, out, accumulate, chk);
    if (full_rows < nt) {
      combine_rows<TY, TR, kCombineMT, kCombineNV>(nt - full_rows, k, rows, 0, c0, c1, coef + full_rows * k,
                                                   out + full_rows, accumulate, chk);
    }
  } else {
    for (int m = 0; m < nt; ++m) {
      combine_rows<TY, TR, 1, kCombineNV1>(1, k, rows + m * rows_stride, 0, c0, c1, coef + m * k, out + m,
                                           accumulate, chk);
    }
  }
  return V::all_zero(chk);
}

// dst[0, n) (+)= scale · src[0, n) (fp32 → TY), folding what was written into `chk`.
template <class TY>
void store_scaled(TY* dst, const float* src, int64_t n, float scale, bool accumulate, F& chk) {
  const F s = V::set1(scale);
  int64_t c = 0;
  for (; c + W <= n; c += W) store_out(dst + c, V::mul(s, V::load(src + c)), W, accumulate, chk);
  if (c < n) {
    const int lanes = static_cast<int>(n - c);
    store_out(dst + c, V::mul(s, V::loadn(src + c, lanes)), lanes, accumulate, chk);
  }
}
