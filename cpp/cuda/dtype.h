// The element types the CUDA backend computes in. Plain C++ (no CUDA headers) so that the
// bindings, compiled by the host compiler, can name them.
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>

namespace pagedgpt2::cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

inline DType parse_dtype(const std::string& name) {
  if (name == "float32") return DType::kFloat32;
  if (name == "float16") return DType::kFloat16;
  if (name == "bfloat16") return DType::kBFloat16;
  throw std::invalid_argument("dtype must be 'float32', 'float16' or 'bfloat16', got '" + name +
                              "'");
}

inline size_t dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "?";
}

}  // namespace pagedgpt2::cuda
