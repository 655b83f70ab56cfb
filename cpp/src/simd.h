// Vector types the CPU kernels are written against: Scalar (portable, W = 1), Avx2 (W = 8) and
// Avx512 (W = 16). Each offers the same static functions, so a kernel body written against `V`
// compiles for every level; x86 types are defined inside target regions so the portable build can
// hold them and pick one at run time (cpu_features.h).
#pragma once
#include <cstdint>
#include <cstring>

#include "bem/dtype.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define BEM_SIMD_X86 1
#include <immintrin.h>
#endif

// Target regions: everything defined between BEGIN and END is compiled for that instruction set.
// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined_* (GCC bug 105593),
// so that warning is off inside the AVX-512 region; the same kernel code is also compiled for the
// scalar and AVX2 levels with every warning on.
#if defined(__clang__)
#define BEM_TARGET_AVX2_BEGIN \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,f16c\"))), apply_to = function)")
#define BEM_TARGET_AVX2_END _Pragma("clang attribute pop")
#define BEM_TARGET_AVX512_BEGIN \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c\"))), apply_to = function)")
#define BEM_TARGET_AVX512_END _Pragma("clang attribute pop")
#else
#define BEM_TARGET_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define BEM_TARGET_AVX2_END _Pragma("GCC pop_options")
#define BEM_TARGET_AVX512_BEGIN                                               \
  _Pragma("GCC push_options")                                                 \
  _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c\")") \
  _Pragma("GCC diagnostic push")                                              \
  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")                       \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define BEM_TARGET_AVX512_END _Pragma("GCC diagnostic pop") _Pragma("GCC pop_options")
#endif

#define BEM_INLINE inline __attribute__((always_inline))

namespace bem {
namespace simd {

// Contract shared by all three types (W lanes of float, F the register type):
//   zero, set1, load(p) / loadn(p, n) from float, bf16 or f16 (lanes >= n read as 0, nothing past
//   p + n is touched), store(p, v) / storen(p, v, n) rounding to the element type and returning the
//   value as stored (lanes >= n zero) so callers check finiteness of what was really written,
//   stream(p, v) a non-temporal fp32 store to p aligned to W floats (stream_fence orders them),
//   fmadd(a, b, c) = a·b + c, add, mul, min/max (x86 semantics: the second operand wins when
//   unordered), keep_in_range(v, g, lo, hi) = v where lo <= g <= hi else 0, reduce_lanes(v[W])
//   (lane w = sum of v[w]'s lanes, by one fixed tree for every w), transpose(v[W]) in place,
//   check/all_zero for the
//   finiteness accumulator (chk += stored·0 turns NaN for any inf or NaN).
struct Scalar {
  static constexpr int W = 1;
  using F = float;
  static BEM_INLINE F zero() { return 0.0f; }
  static BEM_INLINE F set1(float v) { return v; }
  template <class T> static BEM_INLINE F load(const T* p) { return to_float(*p); }
  template <class T> static BEM_INLINE F loadn(const T* p, int n) { return n > 0 ? to_float(*p) : 0.0f; }
  template <class T> static BEM_INLINE F store(T* p, F v) {
    const T s = from_float<T>(v);
    *p = s;
    return to_float(s);
  }
  template <class T> static BEM_INLINE F storen(T* p, F v, int n) { return n > 0 ? store(p, v) : 0.0f; }
  static BEM_INLINE void stream(float* p, F v) { *p = v; }
  static BEM_INLINE void stream_fence() {}
  static BEM_INLINE F fmadd(F a, F b, F c) { return a * b + c; }
  static BEM_INLINE F add(F a, F b) { return a + b; }
  static BEM_INLINE F mul(F a, F b) { return a * b; }
  static BEM_INLINE F min(F a, F b) { return a < b ? a : b; }
  static BEM_INLINE F max(F a, F b) { return a > b ? a : b; }
  static BEM_INLINE F keep_in_range(F v, F g, F lo, F hi) { return (g >= lo && g <= hi) ? v : 0.0f; }
  static BEM_INLINE F reduce_lanes(const F* v) { return v[0]; }
  static BEM_INLINE void transpose(F*) {}
  static constexpr bool kReduceRows4 = false, kReduceRows8 = false;
  static BEM_INLINE F reduce_rows4(const F* v) { return v[0]; }
  static BEM_INLINE F reduce_rows8(const F* v) { return v[0]; }
  static BEM_INLINE void check(F& chk, F stored) { chk = stored * 0.0f + chk; }
  static BEM_INLINE bool all_zero(F chk) { return chk == 0.0f; }
};

#ifdef BEM_SIMD_X86

BEM_TARGET_AVX2_BEGIN
struct Avx2 {
  static constexpr int W = 8;
  using F = __m256;
  static BEM_INLINE F zero() { return _mm256_setzero_ps(); }
  static BEM_INLINE F set1(float v) { return _mm256_set1_ps(v); }
  static BEM_INLINE __m256i lane_mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static BEM_INLINE F from_bf16(__m128i h) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static BEM_INLINE __m128i to_bf16(F v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                                           _mm256_set1_epi32(0x7F800000));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), nan);
    const __m256i hi = _mm256_srli_epi32(r, 16);
    const __m256i packed = _mm256_packus_epi32(hi, hi);  // per 128-bit lane: a0..3 a0..3 | a4..7 a4..7
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
  }
  static BEM_INLINE __m128i to_f16(F v) {
    return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static BEM_INLINE F load(const float* p) { return _mm256_loadu_ps(p); }
  static BEM_INLINE F load(const bf16* p) {
    return from_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static BEM_INLINE F load(const f16* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static BEM_INLINE F loadn(const float* p, int n) { return _mm256_maskload_ps(p, lane_mask(n)); }
  static BEM_INLINE __m128i load_u16n(const void* p, int n) {
    uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tmp, p, sizeof(uint16_t) * static_cast<size_t>(n));
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(tmp));
  }
  static BEM_INLINE F loadn(const bf16* p, int n) { return from_bf16(load_u16n(p, n)); }
  static BEM_INLINE F loadn(const f16* p, int n) { return _mm256_cvtph_ps(load_u16n(p, n)); }
  static BEM_INLINE F store(float* p, F v) {
    _mm256_storeu_ps(p, v);
    return v;
  }
  static BEM_INLINE F store(bf16* p, F v) {
    const __m128i h = to_bf16(v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
    return from_bf16(h);
  }
  static BEM_INLINE F store(f16* p, F v) {
    const __m128i h = to_f16(v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
    return _mm256_cvtph_ps(h);
  }
  static BEM_INLINE F storen(float* p, F v, int n) {
    const __m256i m = lane_mask(n);
    _mm256_maskstore_ps(p, m, v);
    return _mm256_and_ps(v, _mm256_castsi256_ps(m));
  }
  static BEM_INLINE void store_u16n(void* p, __m128i h, int n) {
    uint16_t tmp[8];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(tmp), h);
    std::memcpy(p, tmp, sizeof(uint16_t) * static_cast<size_t>(n));
  }
  static BEM_INLINE F storen(bf16* p, F v, int n) {
    const __m128i h = to_bf16(v);
    store_u16n(p, h, n);
    return _mm256_and_ps(from_bf16(h), _mm256_castsi256_ps(lane_mask(n)));
  }
  static BEM_INLINE F storen(f16* p, F v, int n) {
    const __m128i h = to_f16(v);
    store_u16n(p, h, n);
    return _mm256_and_ps(_mm256_cvtph_ps(h), _mm256_castsi256_ps(lane_mask(n)));
  }
  static BEM_INLINE void stream(float* p, F v) { _mm256_stream_ps(p, v); }
  static BEM_INLINE void stream_fence() { _mm_sfence(); }
  static BEM_INLINE F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static BEM_INLINE F add(F a, F b) { return _mm256_add_ps(a, b); }
  static BEM_INLINE F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static BEM_INLINE F min(F a, F b) { return _mm256_min_ps(a, b); }
  static BEM_INLINE F max(F a, F b) { return _mm256_max_ps(a, b); }
  static BEM_INLINE F keep_in_range(F v, F g, F lo, F hi) {
    const F m = _mm256_and_ps(_mm256_cmp_ps(g, lo, _CMP_GE_OQ), _mm256_cmp_ps(g, hi, _CMP_LE_OQ));
    return _mm256_and_ps(v, m);
  }
  static BEM_INLINE F reduce_lanes(const F* v) {
    const F s01 = _mm256_hadd_ps(v[0], v[1]);
    const F s23 = _mm256_hadd_ps(v[2], v[3]);
    const F s45 = _mm256_hadd_ps(v[4], v[5]);
    const F s67 = _mm256_hadd_ps(v[6], v[7]);
    const F s0123 = _mm256_hadd_ps(s01, s23);  // [v0..v3 low halves | v0..v3 high halves]
    const F s4567 = _mm256_hadd_ps(s45, s67);
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                         _mm256_permute2f128_ps(s0123, s4567, 0x31));
  }
  // Rows of 4 values packed two per vector: v[q] holds rows 2q, 2q+1 (of a block of 8 rows);
  // lane w of the result is the sum of row w (the same tree for every row).
  static constexpr bool kReduceRows4 = true, kReduceRows8 = false;
  static BEM_INLINE F reduce_rows4(const F* v) {
    const F s = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    return _mm256_permutevar8x32_ps(s, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  }
  static BEM_INLINE F reduce_rows8(const F* v) { return reduce_lanes(v); }
  // In-place 8×8 transpose: v[c] becomes column c of the rows v[0..7].
  static BEM_INLINE void transpose(F* v) {
    F t[8], u[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {
      u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
      u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
      u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
      u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int q = 0; q < 4; ++q) {
      v[q] = _mm256_permute2f128_ps(u[q], u[4 + q], 0x20);
      v[4 + q] = _mm256_permute2f128_ps(u[q], u[4 + q], 0x31);
    }
  }
  static BEM_INLINE void check(F& chk, F stored) { chk = _mm256_fmadd_ps(stored, _mm256_setzero_ps(), chk); }
  static BEM_INLINE bool all_zero(F chk) {
    return _mm256_movemask_ps(_mm256_cmp_ps(chk, _mm256_setzero_ps(), _CMP_EQ_OQ)) == 0xFF;
  }
};
BEM_TARGET_AVX2_END

BEM_TARGET_AVX512_BEGIN
struct Avx512 {
  static constexpr int W = 16;
  using F = __m512;
  static BEM_INLINE F zero() { return _mm512_setzero_ps(); }
  static BEM_INLINE F set1(float v) { return _mm512_set1_ps(v); }
  static BEM_INLINE __mmask16 lane_mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static BEM_INLINE F from_bf16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static BEM_INLINE __m256i to_bf16(F v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(
        _mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)), _mm512_set1_epi32(0x7F800000));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
  }
  static BEM_INLINE __m256i to_f16(F v) {
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static BEM_INLINE F load(const float* p) { return _mm512_loadu_ps(p); }
  static BEM_INLINE F load(const bf16* p) {
    return from_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static BEM_INLINE F load(const f16* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static BEM_INLINE F loadn(const float* p, int n) { return _mm512_maskz_loadu_ps(lane_mask(n), p); }
  static BEM_INLINE F loadn(const bf16* p, int n) {
    return from_bf16(_mm256_maskz_loadu_epi16(lane_mask(n), p));
  }
  static BEM_INLINE F loadn(const f16* p, int n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lane_mask(n), p));
  }
  static BEM_INLINE F store(float* p, F v) {
    _mm512_storeu_ps(p, v);
    return v;
  }
  static BEM_INLINE F store(bf16* p, F v) {
    const __m256i h = to_bf16(v);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
    return from_bf16(h);
  }
  static BEM_INLINE F store(f16* p, F v) {
    const __m256i h = to_f16(v);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
    return _mm512_cvtph_ps(h);
  }
  static BEM_INLINE F storen(float* p, F v, int n) {
    const __mmask16 m = lane_mask(n);
    _mm512_mask_storeu_ps(p, m, v);
    return _mm512_maskz_mov_ps(m, v);
  }
  static BEM_INLINE F storen(bf16* p, F v, int n) {
    const __mmask16 m = lane_mask(n);
    const __m256i h = to_bf16(v);
    _mm256_mask_storeu_epi16(p, m, h);
    return _mm512_maskz_mov_ps(m, from_bf16(h));
  }
  static BEM_INLINE F storen(f16* p, F v, int n) {
    const __mmask16 m = lane_mask(n);
    const __m256i h = to_f16(v);
    _mm256_mask_storeu_epi16(p, m, h);
    return _mm512_maskz_mov_ps(m, _mm512_cvtph_ps(h));
  }
  static BEM_INLINE void stream(float* p, F v) { _mm512_stream_ps(p, v); }
  static BEM_INLINE void stream_fence() { _mm_sfence(); }
  static BEM_INLINE F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static BEM_INLINE F add(F a, F b) { return _mm512_add_ps(a, b); }
  static BEM_INLINE F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static BEM_INLINE F min(F a, F b) { return _mm512_min_ps(a, b); }
  static BEM_INLINE F max(F a, F b) { return _mm512_max_ps(a, b); }
  static BEM_INLINE F keep_in_range(F v, F g, F lo, F hi) {
    const __mmask16 m = _mm512_cmp_ps_mask(g, lo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(g, hi, _CMP_LE_OQ);
    return _mm512_maskz_mov_ps(m, v);
  }
  // 16 vectors -> one: pairs within 128-bit lanes (unpack), then quads (shuffle), then the four
  // 128-bit lanes (shuffle_f32x4). Every output lane sees the same tree.
  static BEM_INLINE F reduce_lanes(const F* v) {
    F t[8];
    for (int i = 0; i < 8; ++i) {
      t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                           _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    }
    F u[4];
    for (int i = 0; i < 4; ++i) {
      const F a = t[2 * i], b = t[2 * i + 1];
      u[i] = _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
    }
    F w[2];
    for (int i = 0; i < 2; ++i) {
      const F a = u[2 * i], b = u[2 * i + 1];
      w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
    }
    return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  // Rows of 4 (or 8) values packed 4 (or 2) per vector, 16 rows in 4 (or 8) vectors; lane w of the
  // result is the sum of row w. The first stages of reduce_lanes, then a permutation back to row
  // order (the same tree for every row).
  static constexpr bool kReduceRows4 = true, kReduceRows8 = true;
  static BEM_INLINE F pair_sum(F a, F b) {
    return _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  }
  static BEM_INLINE F quad_sum(F a, F b) {
    return _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  static BEM_INLINE F reduce_rows4(const F* v) {
    // 128-bit lane L of v[q] is row 4q + L; after two stages lane 4L + q holds it.
    const F u = quad_sum(pair_sum(v[0], v[1]), pair_sum(v[2], v[3]));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), u);
  }
  static BEM_INLINE F reduce_rows8(const F* v) {
    // v[q] holds rows 2q (lanes 0-7) and 2q + 1 (lanes 8-15).
    const F u0 = quad_sum(pair_sum(v[0], v[1]), pair_sum(v[2], v[3]));
    const F u1 = quad_sum(pair_sum(v[4], v[5]), pair_sum(v[6], v[7]));
    const F w = _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(3, 1, 3, 1)));
    // w = [rows 0 2 4 6 | 1 3 5 7 | 8 10 12 14 | 9 11 13 15]
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15), w);
  }
  // In-place 16×16 transpose: v[c] becomes column c of the rows v[0..15]. After the 32- and 64-bit
  // interleaves, 128-bit lane L of u[4i + q] holds column 4L + q of rows 4i..4i+3.
  static BEM_INLINE void transpose(F* v) {
    F t[16], u[16];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
      const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
      const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
      u[4 * i + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
      u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
      u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
      u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int q = 0; q < 4; ++q) {
      const F a = _mm512_shuffle_f32x4(u[q], u[4 + q], _MM_SHUFFLE(1, 0, 1, 0));
      const F b = _mm512_shuffle_f32x4(u[q], u[4 + q], _MM_SHUFFLE(3, 2, 3, 2));
      const F c = _mm512_shuffle_f32x4(u[8 + q], u[12 + q], _MM_SHUFFLE(1, 0, 1, 0));
      const F d = _mm512_shuffle_f32x4(u[8 + q], u[12 + q], _MM_SHUFFLE(3, 2, 3, 2));
      v[q] = _mm512_shuffle_f32x4(a, c, _MM_SHUFFLE(2, 0, 2, 0));
      v[4 + q] = _mm512_shuffle_f32x4(a, c, _MM_SHUFFLE(3, 1, 3, 1));
      v[8 + q] = _mm512_shuffle_f32x4(b, d, _MM_SHUFFLE(2, 0, 2, 0));
      v[12 + q] = _mm512_shuffle_f32x4(b, d, _MM_SHUFFLE(3, 1, 3, 1));
    }
  }
  static BEM_INLINE void check(F& chk, F stored) { chk = _mm512_fmadd_ps(stored, _mm512_setzero_ps(), chk); }
  static BEM_INLINE bool all_zero(F chk) {
    return _mm512_cmp_ps_mask(chk, _mm512_setzero_ps(), _CMP_EQ_OQ) == 0xFFFF;
  }
};
BEM_TARGET_AVX512_END

#endif  // BEM_SIMD_X86

}  // namespace simd
}  // namespace bem
