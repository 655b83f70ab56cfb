// Bindings of the bootstrap core (cpp/include/bem/bootstrap.h) used by bem.stats.bca_interval.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "bem/bootstrap.h"
#include "bem/common.h"
#include "registry.h"

namespace py = pybind11;

namespace bem_bindings {
namespace {

using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

// Checks that `a` is 1-D (and, when `expected_size` >= 0, of that length); returns its length.
int64_t vector_length(const DoubleArray& a, const char* name, int64_t expected_size = -1) {
  if (a.ndim() != 1) {
    throw bem::ArgumentError(name, "expected a 1-D array, got " + std::to_string(a.ndim()) + "-D");
  }
  const int64_t size = static_cast<int64_t>(a.shape(0));
  if (expected_size >= 0 && size != expected_size) {
    throw bem::ArgumentError(name, "expected length " + std::to_string(expected_size) +
                                       " (that of values), got " + std::to_string(size));
  }
  return size;
}

constexpr std::pair<const char*, bem::BootstrapKernel> kKernels[] = {
    {"best", bem::BootstrapKernel::Best},
    {"portable", bem::BootstrapKernel::Portable},
    {"avx2", bem::BootstrapKernel::Avx2},
    {"avx512", bem::BootstrapKernel::Avx512},
};

bem::BootstrapKernel kernel_from_name(const std::string& name) {
  for (const auto& [key, kernel] : kKernels) {
    if (name == key) return kernel;
  }
  throw bem::ArgumentError("kernel", "expected one of best, portable, avx2, avx512, got '" + name + "'");
}

const double* optional_weights(const std::optional<DoubleArray>& weights, int64_t n) {
  if (!weights) return nullptr;
  vector_length(*weights, "weights", n);
  return weights->data();
}

}  // namespace

void bind_stats(py::module_& m) {
  m.def(
      "bootstrap_linear",
      [](const DoubleArray& values, const std::optional<DoubleArray>& weights, int64_t n_resamples,
         uint64_t seed, const std::string& kernel) {
        const int64_t n = vector_length(values, "values");
        if (n_resamples < 1) {
          throw bem::ArgumentError("n_resamples", "expected >= 1, got " + std::to_string(n_resamples));
        }
        py::array_t<double> out(static_cast<py::ssize_t>(n_resamples));
        bem::LinearBootstrapParams p;
        p.n = n;
        p.values = values.data();
        p.weights = optional_weights(weights, n);
        p.n_resamples = n_resamples;
        p.seed = seed;
        p.kernel = kernel_from_name(kernel);
        p.out = out.mutable_data();
        double observed;
        {
          py::gil_scoped_release release;
          observed = bem::bootstrap_linear(p);
        }
        return py::make_tuple(out, observed);
      },
      py::arg("values"), py::arg("weights") = py::none(), py::arg("n_resamples"), py::arg("seed"),
      py::arg("kernel") = "best",
      "Statistics of n_resamples bootstrap resamples of the mean of values (n,) float64, or of the "
      "weighted mean sum(w*x)/sum(w) when weights (n,) float64 > 0 is given, and the observed "
      "statistic computed the same way: (out (n_resamples,) float64, observed float). `kernel` pins "
      "an implementation (all give identical results).");
  m.def(
      "bootstrap_kernels",
      [] {
        std::vector<std::string> names;
        for (const auto& [key, kernel] : kKernels) {
          if (bem::bootstrap_kernel_supported(kernel)) names.emplace_back(key);
        }
        return names;
      },
      "Names of the bootstrap kernels this CPU and build support: 'best', then the others from "
      "slowest to fastest ('best' runs the last).");
  m.def(
      "jackknife_acceleration",
      [](const DoubleArray& values, const std::optional<DoubleArray>& weights) {
        const int64_t n = vector_length(values, "values");
        const double* w = optional_weights(weights, n);
        py::gil_scoped_release release;
        return bem::jackknife_acceleration(n, values.data(), w);
      },
      py::arg("values"), py::arg("weights") = py::none(),
      "BCa acceleration from the leave-one-out jackknife of the (weighted) mean, in closed form; "
      "NaN when all values are equal.");
}

}  // namespace bem_bindings
