// Bounded FiLM work items for one instruction set. No include guard: film_cpu.cpp includes this
// once per set, inside that set's target region and namespace. FilmArgs and FilmKernels come from
// there.

using F = typename V::F;
constexpr int W = V::W;

struct Clip {
  F g_lo, g_hi, b_lo, b_hi;
};

inline Clip make_clip(const FilmArgs& a) {
  return Clip{V::set1(a.gamma_lo), V::set1(a.gamma_hi), V::set1(-a.beta_bound), V::set1(a.beta_bound)};
}

// clip(γ)·x + clip(β); NaN passes through (min/max keep their second operand when unordered).
// CLIP = false: γ and β arrive already clipped.
template <bool CLIP>
BEM_INLINE F film_value(const Clip& k, F x, F g, F b) {
  if constexpr (CLIP) {
    g = V::min(k.g_hi, V::max(k.g_lo, g));
    b = V::min(k.b_hi, V::max(k.b_lo, b));
  }
  return V::fmadd(g, x, b);
}

// R rows sharing one γ/β row (a sequence): each clipped γ/β vector is loaded once for R rows, so the
// γ/β row need not stay in L1 while x streams through (4 rows run at copy speed; 1 row at a time
// with d = 4096 ran ~60% slower). Streams when asked and every row starts W-aligned (d % W == 0).
template <int R, class T>
BEM_INLINE void film_rows_shared(const Clip& k, const T* x, const T* gr, const T* br, T* y, int64_t d, bool stream,
                                 F& chk) {
  int64_t c = 0;
  if constexpr (std::is_same<T, float>::value) {
    const uintptr_t addr = reinterpret_cast<uintptr_t>(y);
    constexpr uintptr_t align = W * sizeof(float);
    if (stream && d % W == 0 && addr % sizeof(float) == 0) {
      const int64_t head = std::min<int64_t>(d, static_cast<int64_t>((align - addr % align) % align / sizeof(float)));
      if (head > 0) {
        const int n = static_cast<int>(head);
        const F g = V::loadn(gr, n), b = V::loadn(br, n);
        for (int q = 0; q < R; ++q) V::check(chk, V::storen(y + q * d, film_value<true>(k, V::loadn(x + q * d, n), g, b), n));
      }
      F rchk[R];  // one finiteness chain per row: a single chain would serialise R FMAs per vector
      for (int q = 0; q < R; ++q) rchk[q] = V::zero();
      for (c = head; c + W <= d; c += W) {
        const F g = V::min(k.g_hi, V::max(k.g_lo, V::load(gr + c)));
        const F b = V::min(k.b_hi, V::max(k.b_lo, V::load(br + c)));
        for (int q = 0; q < R; ++q) {
          const F v = film_value<false>(k, V::load(x + q * d + c), g, b);
          V::stream(y + q * d + c, v);
          V::check(rchk[q], v);
        }
      }
      for (int q = 0; q < R; ++q) chk = V::add(chk, rchk[q]);
    }
  }
  for (; c + W <= d; c += W) {
    const F g = V::min(k.g_hi, V::max(k.g_lo, V::load(gr + c)));
    const F b = V::min(k.b_hi, V::max(k.b_lo, V::load(br + c)));
    for (int q = 0; q < R; ++q) V::check(chk, V::store(y + q * d + c, film_value<false>(k, V::load(x + q * d + c), g, b)));
  }
  if (c < d) {
    const int n = static_cast<int>(d - c);
    const F g = V::loadn(gr + c, n), b = V::loadn(br + c, n);
    for (int q = 0; q < R; ++q) V::check(chk, V::storen(y + q * d + c, film_value<true>(k, V::loadn(x + q * d + c, n), g, b), n));
  }
}

// Rows [r0, r1).
template <class T>
bool film_forward_rows(const FilmArgs& a, int64_t r0, int64_t r1) {
  const int64_t d = a.d, rpg = a.rows_per_group;
  const T* x = static_cast<const T*>(a.x);
  const T* gamma = static_cast<const T*>(a.gamma);
  const T* beta = static_cast<const T*>(a.beta);
  T* y = static_cast<T*>(a.y);
  const Clip k = make_clip(a);
  F chk = V::zero();
  int64_t row = r0;
  while (row < r1) {
    const int64_t g = row / rpg;
    const int64_t n = std::min(r1, (g + 1) * rpg) - row;  // rows left in this group
    const T* gr = gamma + g * d;
    const T* br = beta + g * d;
    if (n >= 4) {
      film_rows_shared<4>(k, x + row * d, gr, br, y + row * d, d, a.stream, chk);
      row += 4;
    } else {
      film_rows_shared<1>(k, x + row * d, gr, br, y + row * d, d, a.stream, chk);
      row += 1;
    }
  }
  if (a.stream) V::stream_fence();
  return V::all_zero(chk);
}

constexpr int64_t kFilmCols = 1024;  // columns per backward chunk: the group's sums stay in L1

// Row `row` with its own γ/β row, columns [c0, c1).
template <class T>
void film_backward_token(const FilmArgs& a, const Clip& k, int64_t row, int64_t c0, int64_t c1) {
  const int64_t off = row * a.d;
  const T* x = static_cast<const T*>(a.x) + off;
  const T* gr = static_cast<const T*>(a.gamma) + off;
  const T* br = static_cast<const T*>(a.beta) + off;
  const T* dr = static_cast<const T*>(a.dy) + off;
  T* gx = a.grad_x ? static_cast<T*>(a.grad_x) + off : nullptr;
  float* gg = a.grad_gamma ? a.grad_gamma + off : nullptr;
  float* gb = a.grad_beta ? a.grad_beta + off : nullptr;
  for (int64_t c = c0; c < c1; c += W) {
    const int lanes = static_cast<int>(std::min<int64_t>(W, c1 - c));
    const bool full = lanes == W;
    const F dv = full ? V::load(dr + c) : V::loadn(dr + c, lanes);
    const F g = full ? V::load(gr + c) : V::loadn(gr + c, lanes);
    if (gx) {
      const F v = V::mul(V::min(k.g_hi, V::max(k.g_lo, g)), dv);
      if (full) V::store(gx + c, v); else V::storen(gx + c, v, lanes);
    }
    if (gg) {
      const F xv = full ? V::load(x + c) : V::loadn(x + c, lanes);
      const F v = V::keep_in_range(V::mul(dv, xv), g, k.g_lo, k.g_hi);
      if (full) V::store(gg + c, v); else V::storen(gg + c, v, lanes);
    }
    if (gb) {
      const F b = full ? V::load(br + c) : V::loadn(br + c, lanes);
      const F v = V::keep_in_range(dv, b, k.b_lo, k.b_hi);
      if (full) V::store(gb + c, v); else V::storen(gb + c, v, lanes);
    }
  }
}

// R consecutive rows of one group, columns [cb, cb + n): grad_x = gclip·dy, and the group's running
// sums sg += dy·x, sb += dy, row after row (R rows per pass share the loads of the sums).
template <int R, class T>
BEM_INLINE void film_backward_rows(const FilmArgs& a, const T* x, const T* dy, T* gx, int64_t row, int64_t cb,
                                   int64_t n, const float* gclip, float* sg, float* sb) {
  const int64_t d = a.d;
  for (int64_t c = 0; c < n; c += W) {
    const int lanes = static_cast<int>(std::min<int64_t>(W, n - c));
    const bool full = lanes == W;
    F g = V::load(sg + c), b = V::load(sb + c);
    const F gc = V::load(gclip + c);
    for (int q = 0; q < R; ++q) {
      const int64_t off = (row + q) * d + cb + c;
      const F dv = full ? V::load(dy + off) : V::loadn(dy + off, lanes);
      if (gx) {
        if (full) V::store(gx + off, V::mul(gc, dv)); else V::storen(gx + off, V::mul(gc, dv), lanes);
      }
      if (a.grad_gamma) g = V::fmadd(dv, full ? V::load(x + off) : V::loadn(x + off, lanes), g);
      if (a.grad_beta) b = V::add(dv, b);
    }
    V::store(sg + c, g);
    V::store(sb + c, b);
  }
}

// Groups [g0, g1), columns [c0, c1): grad_x = clip(γ)·dy; grad_γ / grad_β = Σ over the group's rows
// (in row order) of dy·x / dy, zeroed where γ / β lies outside its bounds.
template <class T>
void film_backward_block(const FilmArgs& a, int64_t g0, int64_t g1, int64_t c0, int64_t c1) {
  const int64_t d = a.d, rpg = a.rows_per_group;
  const T* x = static_cast<const T*>(a.x);
  const T* gamma = static_cast<const T*>(a.gamma);
  const T* beta = static_cast<const T*>(a.beta);
  const T* dy = static_cast<const T*>(a.dy);
  T* gx = static_cast<T*>(a.grad_x);
  const Clip k = make_clip(a);
  if (rpg == 1) {  // per token: nothing to sum, one pass
    for (int64_t g = g0; g < g1; ++g) film_backward_token<T>(a, k, g, c0, c1);
    return;
  }
  thread_local std::vector<float> gclip_buf, sg_buf, sb_buf;
  float* gclip = tls_buffer(gclip_buf, kFilmCols + W);
  float* sg = tls_buffer(sg_buf, kFilmCols + W);
  float* sb = tls_buffer(sb_buf, kFilmCols + W);
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t cb = c0; cb < c1; cb += kFilmCols) {
      const int64_t n = std::min(kFilmCols, c1 - cb);
      const T* gr = gamma + g * d + cb;
      const T* br = beta + g * d + cb;
      for (int64_t c = 0; c < n; c += W) {
        const int lanes = static_cast<int>(std::min<int64_t>(W, n - c));
        V::store(gclip + c, V::min(k.g_hi, V::max(k.g_lo, V::loadn(gr + c, lanes))));
        V::store(sg + c, V::zero());
        V::store(sb + c, V::zero());
      }
      const int64_t row_end = (g + 1) * rpg;
      for (int64_t row = g * rpg; row < row_end;) {
        if (row_end - row >= 4) {
          film_backward_rows<4>(a, x, dy, gx, row, cb, n, gclip, sg, sb);
          row += 4;
        } else {
          film_backward_rows<1>(a, x, dy, gx, row, cb, n, gclip, sg, sb);
          row += 1;
        }
      }
      for (int64_t c = 0; c < n; c += W) {
        const int lanes = static_cast<int>(std::min<int64_t>(W, n - c));
        if (a.grad_gamma) {
          const F m = V::keep_in_range(V::load(sg + c), V::loadn(gr + c, lanes), k.g_lo, k.g_hi);
          V::storen(a.grad_gamma + g * d + cb + c, m, lanes);
        }
        if (a.grad_beta) {
          const F m = V::keep_in_range(V::load(sb + c), V::loadn(br + c, lanes), k.b_lo, k.b_hi);
          V::storen(a.grad_beta + g * d + cb + c, m, lanes);
        }
      }
    }
  }
}

template <class T>
FilmKernels film_kernels_for() {
  return FilmKernels{&film_forward_rows<T>, &film_backward_block<T>};
}

inline const FilmKernels& film_kernels(DType dtype) {
  static const FilmKernels f32 = film_kernels_for<float>();
  static const FilmKernels b16 = film_kernels_for<bf16>();
  static const FilmKernels h16 = film_kernels_for<f16>();
  return dtype == DType::F32 ? f32 : (dtype == DType::BF16 ? b16 : h16);
}
