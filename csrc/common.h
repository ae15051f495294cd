// Shared helpers for the CPU kernels: raw float buffers from numpy views of torch tensors.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace cnnviz {

// Only C-contiguous float32 arrays are accepted: the Python side passes zero-copy views.
using FloatArray = py::array_t<float, py::array::c_style>;
using LongArray = py::array_t<int64_t, py::array::c_style>;

inline int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline void check_ndim(const py::array& a, int ndim, const char* name) {
  if (a.ndim() != ndim)
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(ndim) +
                                " dimensions, got " + std::to_string(a.ndim()));
}

// Min-max normalization treats a map as constant when its range is within this many ulps
// of its magnitude (CONSTANT_RTOL_ULPS in cnnviz_fast/reference/upsample.py).
constexpr float kConstantUlps = 16.f;

// Source index and weight of the bilinear resize, as ATen's upsample_bilinear2d with
// align_corners=False computes them (area_pixel_compute_source_index), so results match
// F.interpolate to float32 rounding.
struct LinearTap {
  int64_t i0, i1;
  float w0, w1;
};

inline LinearTap linear_tap(int64_t dst, int64_t in_size, int64_t out_size) {
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  float src = scale * (static_cast<float>(dst) + 0.5f) - 0.5f;
  if (src < 0.f) src = 0.f;
  int64_t i0 = static_cast<int64_t>(src);
  int64_t i1 = i0 + ((i0 < in_size - 1) ? 1 : 0);
  float l1 = std::fmin(std::fmax(src - static_cast<float>(i0), 0.f), 1.f);
  return {i0, i1, 1.f - l1, l1};
}

// Nearest source index as ATen's nearest_idx computes it.
inline int64_t nearest_index(int64_t dst, int64_t in_size, int64_t out_size) {
  if (in_size == out_size) return dst;
  if (out_size == 2 * in_size) return dst >> 1;
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  int64_t i = static_cast<int64_t>(static_cast<float>(dst) * scale);
  return i < in_size - 1 ? i : in_size - 1;
}

}  // namespace cnnviz
