// Each bindings/*.cpp file contributes one bind_* function; module.cpp calls them all.
#pragma once
#include <pybind11/pybind11.h>

namespace bem_bindings {
void bind_stats(pybind11::module_& m);
}  // namespace bem_bindings
