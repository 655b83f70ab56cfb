// Shared vocabulary of the bem C++ core: element types and the error type kernels throw.
// Nothing here knows Python, torch or CUDA.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace bem {

// Element type of a floating-point buffer. Values match bem/_ext.py's mapping.
enum class DType : int32_t { F32 = 0, BF16 = 1, F16 = 2 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::BF16: return "bfloat16";
    case DType::F16: return "float16";
  }
  return "unknown";
}

// Thrown for a bad argument the caller could have avoided; `arg` names it. The bindings map this
// to ValueError (or IndexError when `index_error` is set) with the argument's name in the message.
class ArgumentError : public std::invalid_argument {
 public:
  ArgumentError(std::string arg, const std::string& what, bool index_error = false)
      : std::invalid_argument(arg + ": " + what), arg_(std::move(arg)), index_error_(index_error) {}
  const std::string& arg() const { return arg_; }
  bool index_error() const { return index_error_; }

 private:
  std::string arg_;
  bool index_error_;
};

}  // namespace bem
