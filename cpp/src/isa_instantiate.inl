// Compiles one kernel file once per instruction set. Define BEM_ISA_KERNELS (the .inl holding the
// kernel templates, as a string literal) and, when those kernels use the shared GEMM
// micro-kernels, BEM_ISA_WITH_GEMM, then include this file. Each copy lands in namespace
// bem::(anonymous)::isa_{scalar,avx2,avx512} with V the matching SIMD type of simd.h; the caller's
// kernels_for() picks one by detail::simd_level() at run time.
#ifndef BEM_ISA_KERNELS
#error "define BEM_ISA_KERNELS before including isa_instantiate.inl"
#endif

namespace bem {
namespace {
namespace isa_scalar {
using V = simd::Scalar;
#ifdef BEM_ISA_WITH_GEMM
#include "gemm_kernels.inl"
#endif
#include BEM_ISA_KERNELS
}  // namespace isa_scalar
}  // namespace
}  // namespace bem

#ifdef BEM_SIMD_X86
BEM_TARGET_AVX2_BEGIN
namespace bem {
namespace {
namespace isa_avx2 {
using V = simd::Avx2;
#ifdef BEM_ISA_WITH_GEMM
#include "gemm_kernels.inl"
#endif
#include BEM_ISA_KERNELS
}  // namespace isa_avx2
}  // namespace
}  // namespace bem
BEM_TARGET_AVX2_END

BEM_TARGET_AVX512_BEGIN
namespace bem {
namespace {
namespace isa_avx512 {
using V = simd::Avx512;
#ifdef BEM_ISA_WITH_GEMM
#include "gemm_kernels.inl"
#endif
#include BEM_ISA_KERNELS
}  // namespace isa_avx512
}  // namespace
}  // namespace bem
BEM_TARGET_AVX512_END
#endif

#undef BEM_ISA_KERNELS
#undef BEM_ISA_WITH_GEMM
