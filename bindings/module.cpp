// The pybind11 module bem._C: build information, threading controls, error translation, and the
// per-subsystem bindings declared in registry.h.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "bem/common.h"
#include "bem/cpu_info.h"
#include "bem/parallel.h"
#include "registry.h"
#ifdef BEM_WITH_CUDA
#include "bem/cuda_ops.h"
#endif

namespace py = pybind11;

namespace {

// SIMD level the CPU offers, for `bem info` (the kernels dispatch on the same test).
std::string cpu_simd_level() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return "AVX-512";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "AVX2+FMA";
  if (__builtin_cpu_supports("avx")) return "AVX";
  return "SSE2";
#elif defined(__aarch64__)
  return "NEON";
#else
  return "scalar";
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "bem's compiled core (C++ kernels, CUDA kernels when built, data structures)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const bem::ArgumentError& e) {
      PyErr_SetString(e.index_error() ? PyExc_IndexError : PyExc_ValueError, e.what());
    }
  });

  m.attr("__version__") = BEM_VERSION;
  m.def("build_info", [] {
    py::dict d;
    d["version"] = BEM_VERSION;
#ifdef BEM_WITH_CUDA
    d["cuda"] = true;
    d["cuda_architectures"] = BEM_CUDA_ARCHS;
#else
    d["cuda"] = false;
    d["cuda_architectures"] = "";
#endif
#if defined(__clang__)
    d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    d["compiler"] = std::string("gcc ") + __VERSION__;
#else
    d["compiler"] = "unknown";
#endif
    return d;
  }, "Build options this module was compiled with.");
  m.def("cpu_simd_level", &cpu_simd_level, "Best SIMD instruction set the CPU supports.");
  m.def("kernel_simd_level", &bem::kernel_simd_level,
        "SIMD path the CPU kernels dispatch to (the CPU's best, capped by BEM_CPU_SIMD).");
  m.def("num_threads", &bem::num_threads, "Threads bem's CPU kernels use.");
  m.def("set_num_threads", &bem::set_num_threads, py::arg("n"),
        "Set the threads bem's CPU kernels use (n >= 1).");
  m.def("threading_backend", &bem::threading_backend,
        "Where bem's CPU kernels run their threads: 'openmp (<library>)' (the process's OpenMP "
        "runtime, e.g. torch's), 'pool' (bem's own) or 'serial'.");
  m.def("cuda_device_count", [] {
#ifdef BEM_WITH_CUDA
    return bem::cuda::device_count();
#else
    return 0;
#endif
  }, "Visible CUDA devices (0 when built without CUDA, or without a driver or device).");
  m.def("cuda_device_description", [](int index) {
#ifdef BEM_WITH_CUDA
    return bem::cuda::device_description(index);
#else
    (void)index;
    return std::string();
#endif
  }, py::arg("index"));

  bem_bindings::bind_ops(m);
  bem_bindings::bind_kv(m);
  bem_bindings::bind_stats(m);
}
