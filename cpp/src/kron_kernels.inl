// Kronecker delta work items for one instruction set: a block of tokens through two small GEMMs
// per direction. No include guard: kron_cpu.cpp includes this once per set, inside that set's
// target region and namespace, after gemm_kernels.inl. KronArgs and KronKernels come from there.

// Y_t = A X_t Bᵀ for tokens [t0, t1), in the association order `a.order` picked for the shape:
//   order 1: Z = X_t Bᵀ for all tokens at once (one GEMM over the block's T·i1 rows), then A Z_t;
//   order 2: W_t = A X_t per token, then W Bᵀ for all tokens at once.
// Bᵀ is packed once per call (a.Bt, fp32 (i2, o2)); the block's fp32 result is scaled, converted
// and stored (or accumulated) row by row.
template <class T>
bool kron_forward_block(const KronArgs& a, int64_t t0, int64_t t1) {
  const int64_t nb = t1 - t0, o1 = a.o1, i1 = a.i1, o2 = a.o2, i2 = a.i2;
  const int64_t d_in = i1 * i2, d_out = o1 * o2;
  const T* x = static_cast<const T*>(a.x) + t0 * d_in;
  const T* A = static_cast<const T*>(a.A);
  thread_local std::vector<float> mid_buf, y_buf;
  float* Yf = tls_buffer(y_buf, nb * d_out);
  if (a.order == 1) {
    float* Z = tls_buffer(mid_buf, nb * i1 * o2);
    gemm<T, float>(nb * i1, o2, i2, x, i2, 1, a.Bt, o2, Z, o2, false);
    for (int64_t t = 0; t < nb; ++t) gemm<T, float>(o1, o2, i1, A, i1, 1, Z + t * i1 * o2, o2, Yf + t * d_out, o2, false);
  } else {
    float* Wm = tls_buffer(mid_buf, nb * o1 * i2);
    for (int64_t t = 0; t < nb; ++t) gemm<T, T>(o1, i2, i1, A, i1, 1, x + t * d_in, i2, Wm + t * o1 * i2, i2, false);
    gemm<float, float>(nb * o1, o2, i2, Wm, i2, 1, a.Bt, o2, Yf, o2, false);
  }
  T* y = static_cast<T*>(a.y);
  F chk = V::zero();
  for (int64_t t = 0; t < nb; ++t) store_scaled(y + (t0 + t) * a.ld_y, Yf + t * d_out, d_out, a.scale, a.accumulate, chk);
  return V::all_zero(chk);
}

// Block `blk` (tokens [blk·block, ...)): with P_t = dY_t B (o1, i2) and Q_t = A X_t (o1, i2),
//   grad_x[t] = scale · Aᵀ P_t,
//   partial_A[blk] = Σ_t X_t P_tᵀ (i1, o1; transposed, so P_tᵀ is the row-major operand),
//   partial_B[blk] = Σ_t dY_tᵀ Q_t (o2, i2; the sum over (t, a) is one GEMM over the block).
// The caller sums the partials in block order and applies the scale.
template <class T>
void kron_backward_block(const KronArgs& a, int64_t blk) {
  const int64_t t0 = blk * a.block, t1 = std::min(a.tokens, t0 + a.block), nb = t1 - t0;
  const int64_t o1 = a.o1, i1 = a.i1, o2 = a.o2, i2 = a.i2, d_in = i1 * i2, d_out = o1 * o2;
  const T* x = static_cast<const T*>(a.x) + t0 * d_in;
  const T* dy = static_cast<const T*>(a.dy) + t0 * d_out;
  const T* A = static_cast<const T*>(a.A);
  const T* B = static_cast<const T*>(a.B);
  thread_local std::vector<float> p_buf, pt_buf, q_buf, gx_buf;
  if (a.grad_x || a.partial_A) {
    float* P = tls_buffer(p_buf, nb * o1 * i2);
    gemm<T, T>(nb * o1, i2, o2, dy, o2, 1, B, i2, P, i2, false);
    if (a.grad_x) {
      float* GX = tls_buffer(gx_buf, d_in);
      T* gx = static_cast<T*>(a.grad_x) + t0 * d_in;
      F chk = V::zero();
      for (int64_t t = 0; t < nb; ++t) {
        gemm<T, float>(i1, i2, o1, A, 1, i1, P + t * o1 * i2, i2, GX, i2, false);
        store_scaled(gx + t * d_in, GX, d_in, a.scale, false, chk);
      }
    }
    if (a.partial_A) {
      float* Pt = tls_buffer(pt_buf, o1 * i2);
      float* GA = a.partial_A + blk * i1 * o1;
      for (int64_t t = 0; t < nb; ++t) {
        const float* Pt_src = P + t * o1 * i2;
        for (int64_t r = 0; r < o1; ++r)
          for (int64_t c = 0; c < i2; ++c) Pt[c * o1 + r] = Pt_src[r * i2 + c];
        gemm<T, float>(i1, o1, i2, x + t * d_in, i2, 1, Pt, o1, GA, o1, t > 0);
      }
    }
  }
  if (a.partial_B) {
    float* Q = tls_buffer(q_buf, nb * o1 * i2);
    for (int64_t t = 0; t < nb; ++t) gemm<T, T>(o1, i2, i1, A, i1, 1, x + t * d_in, i2, Q + t * o1 * i2, i2, false);
    gemm<T, float>(o2, i2, nb * o1, dy, 1, o2, Q, i2, a.partial_B + blk * o2 * i2, i2, false);
  }
}

template <class T>
KronKernels kron_kernels_for() {
  return KronKernels{&kron_forward_block<T>, &kron_backward_block<T>};
}

inline const KronKernels& kron_kernels(DType dtype) {
  static const KronKernels f32 = kron_kernels_for<float>();
  static const KronKernels b16 = kron_kernels_for<bf16>();
  static const KronKernels h16 = kron_kernels_for<f16>();
  return dtype == DType::F32 ? f32 : (dtype == DType::BF16 ? b16 : h16);
}
