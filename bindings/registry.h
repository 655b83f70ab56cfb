// Each bindings/*.cpp file contributes one bind_* function; module.cpp calls them all.
#pragma once
#include <pybind11/pybind11.h>

namespace bem_bindings {
void bind_ops(pybind11::module_& m);  // bindings/ops.cpp: lora, kron, film kernels
void bind_kv(pybind11::module_& m);  // bindings/kv.cpp: KVBlockManager, KVCacheFullError
}  // namespace bem_bindings
