// Output allocation for every CPU/CUDA op. With PREFRANK_POISON_OUTPUTS set (the test suite sets it),
// outputs start as NaN, so an element a kernel forgets to write fails the reference comparison instead of
// passing on whatever the allocator happened to return.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdlib>

namespace prefrank {

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static const bool poison = std::getenv("PREFRANK_POISON_OUTPUTS") != nullptr;
  return poison ? at::full(sizes, NAN, options) : at::empty(sizes, options);
}

}  // namespace prefrank
