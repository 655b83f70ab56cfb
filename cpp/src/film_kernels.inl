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
BEM_INLINE F film_value(const Clip& k, F x, F g, F b) {
  return V::fmadd(V::min(k.g_hi, V::max(k.g_lo, g)), x, V::min(k.b_hi, V::max(k.b_lo, b)));
}

// Rows [r0, r1). Large fp32 outputs use non-temporal stores (they would only evict x from the
// cache on their way to memory); the head of each row up to W-float alignment is stored normally.
template <class T>
bool film_forward_rows(const FilmArgs& a, int64_t r0, int64_t r1) {
  const int64_t d = a.d;
  const T* x = static_cast<const T*>(a.x);
  const T* gamma = static_cast<const T*>(a.gamma);
  const T* beta = static_cast<const T*>(a.beta);
  T* y = static_cast<T*>(a.y);
  const Clip k = make_clip(a);
  F chk = V::zero();
  bool streamed = false;
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t g = row / a.rows_per_group;
    const T* xr = x + row * d;
    const T* gr = gamma + g * d;
    const T* br = beta + g * d;
    T* yr = y + row * d;
    int64_t c = 0;
    if constexpr (std::is_same<T, float>::value) {
      const uintptr_t addr = reinterpret_cast<uintptr_t>(yr);
      if (a.stream && addr % sizeof(float) == 0) {
        const int64_t head = std::min<int64_t>(
            d, static_cast<int64_t>((W * sizeof(float) - addr % (W * sizeof(float))) % (W * sizeof(float)) / sizeof(float)));
        if (head > 0) {
          const int n = static_cast<int>(head);
          V::check(chk, V::storen(yr, film_value(k, V::loadn(xr, n), V::loadn(gr, n), V::loadn(br, n)), n));
        }
        for (c = head; c + W <= d; c += W) {
          const F v = film_value(k, V::load(xr + c), V::load(gr + c), V::load(br + c));
          V::stream(yr + c, v);
          V::check(chk, v);
        }
        streamed = true;
      }
    }
    for (; c + W <= d; c += W) V::check(chk, V::store(yr + c, film_value(k, V::load(xr + c), V::load(gr + c), V::load(br + c))));
    if (c < d) {
      const int n = static_cast<int>(d - c);
      V::check(chk, V::storen(yr + c, film_value(k, V::loadn(xr + c, n), V::loadn(gr + c, n), V::loadn(br + c, n)), n));
    }
  }
  if (streamed) V::stream_fence();
  return V::all_zero(chk);
}

constexpr int64_t kFilmCols = 1024;  // columns per backward chunk: the group's sums stay in L1

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
      for (int64_t row = g * rpg; row < (g + 1) * rpg; ++row) {
        const T* xr = x + row * d + cb;
        const T* dr = dy + row * d + cb;
        T* gxr = gx ? gx + row * d + cb : nullptr;
        int64_t c = 0;
        for (; c + W <= n; c += W) {
          const F dv = V::load(dr + c);
          if (gxr) V::store(gxr + c, V::mul(V::load(gclip + c), dv));
          if (a.grad_gamma) V::store(sg + c, V::fmadd(dv, V::load(xr + c), V::load(sg + c)));
          if (a.grad_beta) V::store(sb + c, V::add(dv, V::load(sb + c)));
        }
        if (c < n) {
          const int lanes = static_cast<int>(n - c);
          const F dv = V::loadn(dr + c, lanes);
          if (gxr) V::storen(gxr + c, V::mul(V::load(gclip + c), dv), lanes);
          if (a.grad_gamma) V::store(sg + c, V::fmadd(dv, V::loadn(xr + c, lanes), V::load(sg + c)));
          if (a.grad_beta) V::store(sb + c, V::add(dv, V::load(sb + c)));
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
