// Helpers shared by bem's CUDA kernels (lora.cu, kron.cu, film.cu): dtype dispatch, fp32 conversion,
// 16-byte vector loads with a scalar fallback, launch checks, and a stream-ordered workspace.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>

#include "bem/common.h"

namespace bem::cuda::detail {

constexpr int kWarpSize = 32;

// ---- host side -------------------------------------------------------------------------------------

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<S>{}) with S the device storage type of `dtype`.
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::F32: f(Tag<float>{}); return;
    case DType::BF16: f(Tag<__nv_bfloat16>{}); return;
    case DType::F16: f(Tag<__half>{}); return;
  }
  throw ArgumentError("dtype", "unknown element type code " + std::to_string(static_cast<int>(dtype)));
}

inline void check_cuda(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) {
    throw std::runtime_error("bem CUDA: " + what + " failed: " + cudaGetErrorString(err));
  }
}

// Called right after every launch: reports a bad configuration (or an earlier asynchronous fault)
// with the kernel's name.
inline void check_launch(const char* kernel) {
  check_cuda(cudaGetLastError(), std::string("kernel ") + kernel);
}

inline int current_device() {
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  return dev;
}

inline int device_attribute(cudaDeviceAttr attr) {
  int value = 0;
  check_cuda(cudaDeviceGetAttribute(&value, attr, current_device()), "cudaDeviceGetAttribute");
  return value;
}

inline int sm_count() { return device_attribute(cudaDevAttrMultiProcessorCount); }

// Allows `kernel` to use `bytes` of dynamic shared memory; throws a message naming `what` (the
// parameter that makes it large) when the device cannot provide that much.
template <typename K>
void allow_dynamic_smem(K* kernel, size_t bytes, const char* name, const std::string& what) {
  const size_t limit = static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
  if (bytes > limit) {
    throw std::runtime_error(std::string("bem CUDA: kernel ") + name + " needs " + std::to_string(bytes) +
                             " bytes of shared memory (" + what + "), more than the device's " +
                             std::to_string(limit));
  }
  if (bytes > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
               std::string("cudaFuncSetAttribute for ") + name);
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// bem's own stream-ordered memory pool for kernel scratch buffers, one per device. It keeps freed
// memory (release threshold: unlimited) so that a workspace costs no driver allocation after the
// first call; allocations made during CUDA graph capture become graph allocation nodes.
inline cudaMemPool_t workspace_pool() {
  constexpr int kMaxDevices = 64;
  static std::mutex mutex;
  static cudaMemPool_t pools[kMaxDevices] = {};
  const int dev = current_device();
  if (dev < 0 || dev >= kMaxDevices) throw std::runtime_error("bem CUDA: device index out of range");
  std::lock_guard<std::mutex> lock(mutex);
  if (pools[dev] == nullptr) {
    int supported = 0;
    check_cuda(cudaDeviceGetAttribute(&supported, cudaDevAttrMemoryPoolsSupported, dev),
               "cudaDeviceGetAttribute(MemoryPoolsSupported)");
    if (!supported) {
      throw std::runtime_error(
          "bem CUDA: this device has no stream-ordered memory pools; pass a preallocated shrink buffer");
    }
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = dev;
    cudaMemPool_t pool = nullptr;
    check_cuda(cudaMemPoolCreate(&pool, &props), "cudaMemPoolCreate");
    uint64_t keep = UINT64_MAX;
    check_cuda(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep),
               "cudaMemPoolSetAttribute(ReleaseThreshold)");
    pools[dev] = pool;
  }
  return pools[dev];
}

// Scratch buffer allocated on `stream` and freed on it when the launcher returns (the free is
// ordered after the kernels queued in between, so they may still be running).
class Workspace {
 public:
  Workspace(size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes == 0) return;
    check_cuda(cudaMallocFromPoolAsync(&ptr_, bytes, workspace_pool(), stream), "allocating a kernel workspace");
  }
  ~Workspace() {
    if (ptr_ != nullptr) cudaFreeAsync(ptr_, stream_);
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  float* floats() const { return static_cast<float*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

// ---- device side -----------------------------------------------------------------------------------

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// Elements of T in one 16-byte vector.
template <typename T>
constexpr int kVecWidth = 16 / static_cast<int>(sizeof(T));

// out[0..kVecWidth<T>) = p[0..kVecWidth<T>), p 16-byte aligned.
__device__ __forceinline__ void load_vec16(const float* p, float* out) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  out[0] = v.x;
  out[1] = v.y;
  out[2] = v.z;
  out[3] = v.w;
}

__device__ __forceinline__ void load_vec16(const __nv_bfloat16* p, float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // element 2i is the low half of word i (little endian)
    out[2 * i] = __uint_as_float(w[i] << 16);
    out[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}

__device__ __forceinline__ void load_vec16(const __half* p, float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xFFFFu)));
    out[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
  }
}

// Loads kVecWidth<T> elements starting at p: one 16-byte load when kVec (caller guarantees alignment
// and that all of them exist), else `valid` scalar loads and zeros after them.
template <typename T, bool kVec>
__device__ __forceinline__ void load_chunk(const T* p, int valid, float* out) {
  constexpr int V = kVecWidth<T>;
  if constexpr (kVec) {
    load_vec16(p, out);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = i < valid ? to_f32(p[i]) : 0.0f;
  }
}

// Stores kVecWidth<T> values (rounded to T) to the 16-byte aligned p; returns false when a stored
// value is not finite.
__device__ __forceinline__ bool store_vec16(float* p, const float* v) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  return isfinite(v[0]) && isfinite(v[1]) && isfinite(v[2]) && isfinite(v[3]);
}

__device__ __forceinline__ unsigned short bits16(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
__device__ __forceinline__ unsigned short bits16(__half v) { return __half_as_ushort(v); }

template <typename T>
__device__ __forceinline__ bool store_vec16(T* p, const float* v) {  // bf16 / f16: 8 lanes
  uint32_t w[4];
  bool finite = true;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const T lo = from_f32<T>(v[2 * i]);
    const T hi = from_f32<T>(v[2 * i + 1]);
    finite = finite && isfinite(to_f32(lo)) && isfinite(to_f32(hi));
    w[i] = static_cast<uint32_t>(bits16(lo)) | (static_cast<uint32_t>(bits16(hi)) << 16);
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  return finite;
}

// Stores v rounded to T; returns false when the stored value is not finite.
template <typename T>
__device__ __forceinline__ bool store_scalar(T* p, float v) {
  const T s = from_f32<T>(v);
  *p = s;
  return isfinite(to_f32(s));
}

// Raises the optional non-finite flag (an atomic store, so concurrent writers are fine).
__device__ __forceinline__ void raise_flag(int* flag, bool finite) {
  if (!finite && flag != nullptr) atomicExch(flag, 1);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
  return v;
}

// torch.clamp semantics: NaN stays NaN (every comparison with NaN is false).
__device__ __forceinline__ float clamp_nan(float v, float lo, float hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

}  // namespace bem::cuda::detail
