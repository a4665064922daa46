// Integer helpers for launch planning, in plain C++ (no CUDA or torch headers), so that headers
// which plan launches can be compiled and checked by a host compiler alone.
#pragma once

#include <cstdint>

namespace crosslmm {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace crosslmm
